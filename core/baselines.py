"""Baseline scorers: per-user aggregates + PyOD / LightGBM, and a DeepLog-style LSTM.

Every scorer answers in PyOD's shape so evaluation and the dashboard treat them (and the
transformer) alike: ``fit(data, labels=None)`` returns the scorer, ``decision_function(data)``
gives one score per user in ``data.user_ids`` (higher = more suspicious), and ``threshold_``
(set by fit) is the score above which a user counts as an alert.

Aggregates are computed in DuckDB from whatever columns ``events`` holds; the event vocabulary
is the data's own, capped to the training population's most frequent types so that train and
test feature columns line up (``AggregateFeaturizer``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from numpy.lib.stride_tricks import sliding_window_view

from core.schema import SESSION_GAP_MINUTES, naive_utc

TimeBound = datetime | pd.Timestamp | str | None

# Name patterns (data values never enter SQL text: these reach DuckDB as `$` parameters).
MONEY_PATTERN = r"(purchase|payment|pay|order|checkout|buy|transaction)"
PURCHASE_PATTERN = r"(purchase|order|checkout|buy)"
RETURN_PATTERN = r"(return|refund)"
FAIL_PATTERN = r"(fail|declin|denied|error)"
# A "failed payment" is not money spent, and a "returned order" is not a purchase.
NOT_SPEND_PATTERN = r"(fail|declin|denied|error|refund|return|cancel)"

OTHER_TYPE = "__other__"
# Aggregates that are undefined (NaN) rather than 0 when a user has no gap / no priced event;
# scorers impute them from the training population.
STAT_FEATURES: tuple[str, ...] = (
    "gap_log_mean",
    "gap_log_median",
    "gap_log_min",
    "gap_log_std",
    "gap_share_lt_2s",
    "price_mean",
    "price_max",
    "price_std",
)
# Optional columns summarised by their number of distinct values per user.
DISTINCT_COLUMNS: tuple[str, ...] = (
    "device_id",
    "ip",
    "country",
    "payment_id",
    "item_id",
    "category",
)
_LOG_PREFIXES = ("n_", "count__", "distinct_", "active_", "events_per_", "span_", "price_")


# --------------------------------------------------------------------------------------------
# The scorer API


@dataclass
class UserData:
    """What scorers see for a set of users.

    ``features`` is indexed by user_id (rows are looked up by ``user_ids``, so its order does not
    matter); ``events`` holds at least user_id, event_type (and ts) for the users.
    """

    user_ids: np.ndarray
    features: pd.DataFrame | None = None
    events: pa.Table | pd.DataFrame | None = None

    def __post_init__(self) -> None:
        self.user_ids = np.asarray(self.user_ids, dtype=object)
        if not pd.Index(self.user_ids).is_unique:
            raise ValueError("UserData.user_ids must not repeat a user")

    def feature_frame(self) -> pd.DataFrame:
        if self.features is None:
            raise ValueError(
                "this scorer needs per-user features: build them with "
                "AggregateFeaturizer and pass UserData(features=...)"
            )
        return self.features.reindex(pd.Index(self.user_ids, name="user_id"))


@runtime_checkable
class UserScorer(Protocol):
    name: str
    threshold_: float

    def fit(self, data: UserData, labels: np.ndarray | None = None) -> UserScorer: ...

    def decision_function(self, data: UserData) -> np.ndarray: ...


class NotFittedError(RuntimeError):
    """Raised when a scorer is asked for scores before ``fit``."""


def _check_fitted(scorer: Any, attribute: str) -> None:
    if getattr(scorer, attribute, None) is None:
        raise NotFittedError(f"{scorer.name}: call fit() before decision_function()")


# --------------------------------------------------------------------------------------------
# Per-user aggregates


def _event_columns(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {d[0] for d in con.execute("SELECT * FROM events LIMIT 0").description}


def _filter_sql(
    users: Sequence[str] | None, start: TimeBound, end: TimeBound
) -> tuple[str, dict[str, Any]]:
    """WHERE clause (constant text) and its named parameters."""
    clauses, params = ["TRUE"], {}
    if users is not None:
        clauses.append("user_id IN (SELECT unnest($users::VARCHAR[]))")
        params["users"] = [str(u) for u in users]
    if start is not None:
        clauses.append("ts >= $start::TIMESTAMP")
        params["start"] = naive_utc(start)
    if end is not None:
        clauses.append("ts < $end::TIMESTAMP")
        params["end"] = naive_utc(end)
    return " AND ".join(clauses), params


@dataclass
class AggregateFeaturizer:
    """Per-user aggregate features; fit on training users so columns align across splits.

    ``fit`` learns the ``top_n`` most frequent event types (the rest pool into ``__other__``),
    which optional columns exist, and which money / return / failure features the vocabulary
    supports (by name match). ``transform`` returns a frame indexed by user_id with exactly
    ``columns_``; requested users without events get zero counts and NaN statistics.
    """

    top_n: int = 32
    vocabulary_: list[str] | None = field(default=None, init=False)
    columns_: list[str] | None = field(default=None, init=False)
    present_columns_: set[str] = field(default_factory=set, init=False)
    has_money_types_: bool = field(default=False, init=False)
    has_purchase_types_: bool = field(default=False, init=False)
    has_return_types_: bool = field(default=False, init=False)
    has_fail_types_: bool = field(default=False, init=False)

    def fit(
        self,
        con: duckdb.DuckDBPyConnection,
        users: Sequence[str] | None = None,
        start: TimeBound = None,
        end: TimeBound = None,
    ) -> AggregateFeaturizer:
        self.fit_transform(con, users, start, end)
        return self

    def _learn(
        self,
        con: duckdb.DuckDBPyConnection,
        users: Sequence[str] | None,
        start: TimeBound,
        end: TimeBound,
    ) -> None:
        where, params = _filter_sql(users, start, end)
        counts = con.execute(
            f"SELECT event_type, count(*) AS n FROM events WHERE {where} "  # noqa: S608 constant
            "GROUP BY event_type ORDER BY n DESC, event_type",
            params,
        ).fetchall()
        types = [str(t) for t, _ in counts if t is not None]
        lowered = [t.lower() for t in types]

        def any_match(pattern: str, exclude: str | None = None) -> bool:
            return any(
                re.search(pattern, t) and not (exclude and re.search(exclude, t)) for t in lowered
            )

        self.vocabulary_ = types[: self.top_n]
        self.present_columns_ = _event_columns(con)
        self.has_money_types_ = any_match(MONEY_PATTERN, NOT_SPEND_PATTERN)
        self.has_purchase_types_ = any_match(PURCHASE_PATTERN, NOT_SPEND_PATTERN)
        self.has_return_types_ = any_match(RETURN_PATTERN)
        self.has_fail_types_ = any_match(FAIL_PATTERN)
        self.columns_ = None

    def transform(
        self,
        con: duckdb.DuckDBPyConnection,
        users: Sequence[str] | None = None,
        start: TimeBound = None,
        end: TimeBound = None,
    ) -> pd.DataFrame:
        if self.columns_ is None:
            raise NotFittedError("AggregateFeaturizer: call fit() before transform()")
        return self._compute(con, users, start, end)

    def fit_transform(
        self,
        con: duckdb.DuckDBPyConnection,
        users: Sequence[str] | None = None,
        start: TimeBound = None,
        end: TimeBound = None,
    ) -> pd.DataFrame:
        self._learn(con, users, start, end)
        frame = self._compute(con, users, start, end)
        self.columns_ = list(frame.columns)
        return frame

    # -- internals -----------------------------------------------------------------------

    def _select_list(self, present: set[str]) -> list[str]:
        """SQL select expressions over the `ev` CTE; identifiers come from core.schema only."""
        sel = [
            "count(*) AS n_events",
            "count(DISTINCT CAST(ts AS DATE)) AS active_days",
            "count(DISTINCT date_trunc('hour', ts)) AS active_hours",
            "(epoch(max(ts)) - epoch(min(ts))) / 86400.0 AS span_days",
            "avg(CASE WHEN hour(ts) < 6 THEN 1.0 ELSE 0.0 END) AS night_share",
            "avg(ln(1 + gap)) AS gap_log_mean",
            "median(ln(1 + gap)) AS gap_log_median",
            "min(ln(1 + gap)) AS gap_log_min",
            "stddev_samp(ln(1 + gap)) AS gap_log_std",
            "avg(CAST(gap < 2 AS DOUBLE)) AS gap_share_lt_2s",
        ]
        gap_sessions = "1 + count(*) FILTER (WHERE gap > $session_gap_s)"
        if "session_id" in present:
            sel.append(
                f"coalesce(nullif(count(DISTINCT session_id), 0), {gap_sessions}) AS n_sessions"
            )
        else:
            sel.append(f"{gap_sessions} AS n_sessions")
        for col in DISTINCT_COLUMNS:  # identifiers from the fixed schema list, not from data
            if col in present:
                sel.append(f"count(DISTINCT {col}) AS distinct_{col}")
        if "price" in present:
            money = "price IS NOT NULL" + (" AND is_money" if self.has_money_types_ else "")
            sel += [
                f"avg(price) FILTER (WHERE {money}) AS price_mean",
                f"max(price) FILTER (WHERE {money}) AS price_max",
                f"stddev_samp(price) FILTER (WHERE {money}) AS price_std",
            ]
        if self.has_return_types_:
            denominator = (
                "greatest(count(*) FILTER (WHERE is_purchase), 1)"
                if self.has_purchase_types_
                else "count(*)"
            )
            sel.append(f"count(*) FILTER (WHERE is_return) / {denominator} AS return_ratio")
        if self.has_fail_types_:
            sel.append("avg(CASE WHEN is_fail THEN 1.0 ELSE 0.0 END) AS failure_ratio")
        return sel

    def _compute(
        self,
        con: duckdb.DuckDBPyConnection,
        users: Sequence[str] | None,
        start: TimeBound,
        end: TimeBound,
    ) -> pd.DataFrame:
        present = _event_columns(con)
        extra = [c for c in ("session_id", *DISTINCT_COLUMNS, "price") if c in present]
        where, params = _filter_sql(users, start, end)
        query = f"""
            WITH ev AS (
                SELECT user_id, ts, {", ".join([*extra, "event_type"])},
                    (epoch_us(ts) - lag(epoch_us(ts)) OVER w) / 1e6 AS gap,
                    regexp_matches(lower(event_type), $money_re)
                        AND NOT regexp_matches(lower(event_type), $not_spend_re) AS is_money,
                    regexp_matches(lower(event_type), $purchase_re)
                        AND NOT regexp_matches(lower(event_type), $not_spend_re) AS is_purchase,
                    regexp_matches(lower(event_type), $return_re) AS is_return,
                    regexp_matches(lower(event_type), $fail_re) AS is_fail
                FROM events WHERE {where}
                WINDOW w AS (PARTITION BY user_id ORDER BY ts)
            )
            SELECT user_id, {", ".join(self._select_list(present))}
            FROM ev GROUP BY user_id
        """  # noqa: S608 -- identifiers from core.schema; every value is a `$` parameter
        params |= {
            "money_re": MONEY_PATTERN,
            "purchase_re": PURCHASE_PATTERN,
            "not_spend_re": NOT_SPEND_PATTERN,
            "return_re": RETURN_PATTERN,
            "fail_re": FAIL_PATTERN,
            "session_gap_s": SESSION_GAP_MINUTES * 60.0,
        }
        base = con.execute(query, params).df().set_index("user_id")
        base = base.apply(pd.to_numeric, errors="coerce").astype("float64")

        long = con.execute(
            f"SELECT user_id, event_type, count(*) AS n FROM events WHERE {where} "  # noqa: S608
            "GROUP BY user_id, event_type",
            _filter_sql(users, start, end)[1],
        ).df()
        counts = self._type_counts(long, base.index)

        feats = pd.concat([base, counts], axis=1)
        if users is not None:
            index = pd.Index(pd.unique(pd.Series([str(u) for u in users], dtype=object)))
        else:
            index = pd.Index(sorted(feats.index))
        feats = feats.reindex(index)
        feats.index.name = "user_id"
        n_events = feats["n_events"].fillna(0.0)
        feats["events_per_session"] = n_events / feats["n_sessions"].where(feats["n_sessions"] > 0)
        feats["events_per_active_hour"] = n_events / feats["active_hours"].where(
            feats["active_hours"] > 0
        )
        for col in counts.columns:
            feats["rate__" + col.removeprefix("count__")] = feats[col] / n_events.where(
                n_events > 0
            )
        fill = [c for c in feats.columns if c not in STAT_FEATURES]
        feats[fill] = feats[fill].fillna(0.0)
        if self.columns_ is not None:
            # columns the training data had but this data lacks are absent evidence: 0 / NaN
            feats = feats.reindex(columns=self.columns_)
            zero = [c for c in self.columns_ if c not in STAT_FEATURES]
            feats[zero] = feats[zero].fillna(0.0)
        return feats.astype("float64")

    def _type_counts(self, long: pd.DataFrame, index: pd.Index) -> pd.DataFrame:
        vocab = list(self.vocabulary_ or [])
        names = ["count__" + t for t in [*vocab, OTHER_TYPE]]
        if long.empty:
            return pd.DataFrame(0.0, index=index, columns=names)
        known = pd.Index(vocab)
        event_type = long["event_type"].astype(object)
        bucket = np.where(known.get_indexer(event_type) >= 0, event_type, OTHER_TYPE)
        wide = (
            long.assign(bucket=bucket)
            .pivot_table(index="user_id", columns="bucket", values="n", aggfunc="sum")
            .reindex(columns=[*vocab, OTHER_TYPE])
            .fillna(0.0)
        )
        wide.columns = names
        return wide.reindex(index).fillna(0.0).astype("float64")


def aggregate_features(
    con: duckdb.DuckDBPyConnection,
    users: Sequence[str] | None = None,
    start: TimeBound = None,
    end: TimeBound = None,
    *,
    featurizer: AggregateFeaturizer | None = None,
    top_n: int = 32,
) -> pd.DataFrame:
    """Per-user aggregates of ``events`` (for ``users``, in [start, end)).

    Pass a fitted ``featurizer`` to get the training population's columns; otherwise the
    vocabulary is fit on these same users.
    """
    if featurizer is None:
        featurizer = AggregateFeaturizer(top_n=top_n).fit(con, users, start, end)
    return featurizer.transform(con, users, start, end)


def load_user_events(
    con: duckdb.DuckDBPyConnection,
    users: Sequence[str] | None = None,
    start: TimeBound = None,
    end: TimeBound = None,
) -> pa.Table:
    """user_id, ts, event_type of the users' events, sorted by (user_id, ts)."""
    where, params = _filter_sql(users, start, end)
    return con.sql(
        f"SELECT user_id, ts, event_type FROM events WHERE {where} "  # noqa: S608 constant
        "ORDER BY user_id, ts",
        params=params,
    ).to_arrow_table()


def load_user_data(
    con: duckdb.DuckDBPyConnection,
    users: Sequence[str],
    featurizer: AggregateFeaturizer | None = None,
    start: TimeBound = None,
    end: TimeBound = None,
    *,
    with_events: bool = True,
) -> UserData:
    """UserData for ``users``: features from a fitted ``featurizer`` and/or their raw events."""
    features = featurizer.transform(con, users, start, end) if featurizer is not None else None
    events = load_user_events(con, users, start, end) if with_events else None
    return UserData(np.asarray(users, dtype=object), features, events)


# --------------------------------------------------------------------------------------------
# Feature-based scorers


def _log_columns(columns: Sequence[str]) -> np.ndarray:
    return np.array([c.startswith(_LOG_PREFIXES) for c in columns], dtype=bool)


class _FeatureScaler:
    """log1p on count-like columns, median imputation, standardisation (fit on training)."""

    def fit(self, frame: pd.DataFrame) -> _FeatureScaler:
        from sklearn.impute import SimpleImputer
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.columns_ = list(frame.columns)
        self.log_mask_ = _log_columns(self.columns_)
        self.pipeline_ = make_pipeline(
            SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler()
        )
        self.pipeline_.fit(self._logged(frame))
        return self

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.pipeline_.transform(self._logged(frame)), dtype=np.float64)

    def _logged(self, frame: pd.DataFrame) -> np.ndarray:
        x = frame.reindex(columns=self.columns_).to_numpy(dtype=np.float64, copy=True)
        x[:, self.log_mask_] = np.log1p(np.clip(x[:, self.log_mask_], 0.0, None))
        return x


class PyODScorer:
    """A PyOD detector on standardised per-user aggregates (unsupervised: labels ignored)."""

    def __init__(self, name: str, contamination: float = 0.01, random_state: int = 0) -> None:
        self.name = name
        self.contamination = contamination
        self.random_state = random_state
        self.detector_: Any = None
        self.scaler_: _FeatureScaler | None = None
        self.threshold_: float = math.nan
        self.decision_scores_: np.ndarray | None = None

    def _make_detector(self, n_train: int) -> Any:
        raise NotImplementedError

    def fit(self, data: UserData, labels: np.ndarray | None = None) -> PyODScorer:
        frame = data.feature_frame()
        if len(frame) < 2:
            raise ValueError(f"{self.name}: need at least 2 training users, got {len(frame)}")
        self.scaler_ = _FeatureScaler().fit(frame)
        x = self.scaler_.transform(frame)
        self.detector_ = self._make_detector(len(x))
        self.detector_.fit(x)
        self.decision_scores_ = np.asarray(self.detector_.decision_scores_, dtype=np.float64)
        self.threshold_ = float(self.detector_.threshold_)
        return self

    def decision_function(self, data: UserData) -> np.ndarray:
        _check_fitted(self, "detector_")
        assert self.scaler_ is not None
        x = self.scaler_.transform(data.feature_frame())
        if len(x) == 0:
            return np.zeros(0)
        return np.asarray(self.detector_.decision_function(x), dtype=np.float64)


class IForestScorer(PyODScorer):
    def __init__(
        self,
        n_estimators: int = 300,
        contamination: float = 0.01,
        random_state: int = 0,
        max_samples: int = 256,
    ) -> None:
        super().__init__("iforest", contamination, random_state)
        self.n_estimators = n_estimators
        self.max_samples = max_samples

    def _make_detector(self, n_train: int) -> Any:
        from pyod.models.iforest import IForest

        return IForest(
            n_estimators=self.n_estimators,
            max_samples=min(self.max_samples, n_train),
            contamination=self.contamination,
            random_state=self.random_state,
            n_jobs=1,
        )


class ECODScorer(PyODScorer):
    def __init__(self, contamination: float = 0.01, random_state: int = 0) -> None:
        super().__init__("ecod", contamination, random_state)

    def _make_detector(self, n_train: int) -> Any:
        from pyod.models.ecod import ECOD

        return ECOD(contamination=self.contamination)


class LOFScorer(PyODScorer):
    def __init__(
        self, n_neighbors: int = 35, contamination: float = 0.01, random_state: int = 0
    ) -> None:
        super().__init__("lof", contamination, random_state)
        self.n_neighbors = n_neighbors

    def _make_detector(self, n_train: int) -> Any:
        from pyod.models.lof import LOF

        return LOF(
            n_neighbors=max(1, min(self.n_neighbors, n_train - 1)),
            contamination=self.contamination,
            novelty=True,
        )


class LightGBMScorer:
    """Supervised gradient boosting on raw aggregates (NaN handled natively by LightGBM).

    Class imbalance via ``scale_pos_weight`` (negatives / positives); early stopping on a
    stratified internal validation split of the training users when it holds enough positives.
    ``threshold_`` follows PyOD's convention with the training positive rate as contamination
    (unless ``contamination`` is given): alerts ≈ the expected number of positives.
    """

    name = "lightgbm"

    def __init__(
        self,
        n_estimators: int = 400,
        learning_rate: float = 0.05,
        num_leaves: int = 15,
        min_child_samples: int = 10,
        val_fraction: float = 0.2,
        early_stopping_rounds: int = 50,
        min_val_positives: int = 3,
        contamination: float | None = None,
        random_state: int = 0,
        n_jobs: int = 2,
    ) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.val_fraction = val_fraction
        self.early_stopping_rounds = early_stopping_rounds
        self.min_val_positives = min_val_positives
        self.contamination = contamination
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.model_: Any = None
        self.columns_: list[str] | None = None
        self.threshold_: float = math.nan
        self.decision_scores_: np.ndarray | None = None
        self.best_iteration_: int | None = None

    def fit(self, data: UserData, labels: np.ndarray | None = None) -> LightGBMScorer:
        import lightgbm as lgb
        from sklearn.model_selection import train_test_split

        if labels is None:
            raise ValueError("lightgbm is supervised: fit(data, labels) needs labels")
        frame = data.feature_frame()
        y = np.asarray(labels).astype(np.int64).ravel()
        if len(y) != len(frame):
            raise ValueError(f"lightgbm: {len(y)} labels for {len(frame)} users")
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == len(y):
            raise ValueError("lightgbm: training labels must contain both classes")
        self.columns_ = list(frame.columns)
        # numpy, not the frame: event-type names may hold characters LightGBM rejects.
        x = frame.to_numpy(dtype=np.float64)
        self.model_ = lgb.LGBMClassifier(
            n_estimators=self.n_estimators,
            learning_rate=self.learning_rate,
            num_leaves=self.num_leaves,
            min_child_samples=self.min_child_samples,
            subsample=0.8,
            subsample_freq=1,
            colsample_bytree=0.8,
            reg_lambda=1.0,
            scale_pos_weight=(len(y) - n_pos) / n_pos,
            random_state=self.random_state,
            deterministic=True,
            force_row_wise=True,
            n_jobs=self.n_jobs,
            verbose=-1,
        )
        if n_pos * self.val_fraction >= self.min_val_positives:
            x_fit, x_val, y_fit, y_val = train_test_split(
                x, y, test_size=self.val_fraction, stratify=y, random_state=self.random_state
            )
            self.model_.fit(
                x_fit,
                y_fit,
                eval_X=x_val,
                eval_y=y_val,
                eval_metric="average_precision",
                callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)],
            )
            self.best_iteration_ = int(self.model_.best_iteration_ or self.n_estimators)
        else:
            self.model_.fit(x, y)
            self.best_iteration_ = self.n_estimators
        self.decision_scores_ = self._predict(x)
        contamination = self.contamination if self.contamination is not None else n_pos / len(y)
        self.threshold_ = float(np.percentile(self.decision_scores_, 100 * (1 - contamination)))
        return self

    def _predict(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0)
        return np.asarray(self.model_.predict_proba(x)[:, 1], dtype=np.float64)

    def decision_function(self, data: UserData) -> np.ndarray:
        _check_fitted(self, "model_")
        frame = data.feature_frame().reindex(columns=self.columns_)
        return self._predict(frame.to_numpy(dtype=np.float64))


# --------------------------------------------------------------------------------------------
# DeepLog-style next-event LSTM

PAD, UNK = 0, 1


@dataclass
class _EncodedEvents:
    """Events as integer codes, contiguous per user, plus where each user's run starts."""

    codes: np.ndarray  # (N,) int64 event-type ids
    user_index: np.ndarray  # (N,) position of the event's user in the requested user list
    run_start: np.ndarray  # (N,) index of the first event of the event's user run
    windows_view: np.ndarray  # (N, h) view: row i = codes[i-h:i] (left-padded with PAD)

    def windows(self, idx: np.ndarray) -> np.ndarray:
        h = self.windows_view.shape[1]
        w = self.windows_view[idx]
        pos = idx[:, None] + np.arange(-h, 0)[None, :]
        return np.where(pos >= self.run_start[idx, None], w, PAD)


def _events_frame(events: pa.Table | pd.DataFrame | None) -> pd.DataFrame:
    if events is None:
        raise ValueError("this scorer needs the users' raw events: pass UserData(events=...)")
    names = events.column_names if isinstance(events, pa.Table) else list(events.columns)
    cols = ["user_id", "event_type"] + (["ts"] if "ts" in names else [])
    if isinstance(events, pa.Table):
        frame = events.select(cols).to_pandas()
    else:
        frame = events.loc[:, cols]
    if "ts" in frame.columns:
        frame = frame.sort_values(["user_id", "ts"], kind="stable")
    return frame


class _NextEventLSTM:  # built lazily so importing core.baselines does not import torch
    @staticmethod
    def build(vocab_size: int, embed_dim: int, hidden: int, layers: int) -> Any:
        import torch
        from torch import nn

        class NextEventLSTM(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
                self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
                self.head = nn.Linear(hidden, vocab_size)

            def forward(self, windows: torch.Tensor) -> torch.Tensor:
                out, _ = self.lstm(self.embed(windows))
                return self.head(out[:, -1])

        return NextEventLSTM()


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily cap torch's intra-op threads (on a shared small CPU, 1 thread avoids
    oversubscription stalls); None leaves torch's setting alone."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DeepLogScorer:
    """DeepLog (Du et al., 2017) on event types: an LSTM predicts each event from the h before.

    Training uses every event of the training users (or, when labels are given, of the users
    labelled 0 — DeepLog learns normal behaviour) as a target, with the h previous event types
    of the same user as context (left-padded at a user's start). Per event we get the NLL and
    DeepLog's top-g miss (actual type not among the g most likely). The user score is
    ``score="topk_nll"``: the mean of the user's k highest NLLs, or ``score="topg_miss"``: the
    share of the user's events that are top-g misses. topk_nll is the default: on the demo world
    (3,000 users, seed 0, test split, trained on the training split's normal users) it gave
    AUPRC 0.23 / AUROC 0.71 against 0.20 / 0.67 for the top-9 miss share (0.20 / 0.70 at g=5):
    a short burst of odd events (card testing) stands out in the top k but is diluted in a
    share. The miss share does better when a whole sequence breaks the grammar and normal
    users carry a little noise; g must sit well below the vocabulary size to mean anything.
    Event types unseen in training map to UNK, which the model never predicts: a sure miss.
    """

    name = "deeplog"

    def __init__(
        self,
        window: int = 10,
        embed_dim: int = 32,
        hidden_size: int = 64,
        num_layers: int = 2,
        top_g: int = 9,
        top_k: int = 5,
        score: Literal["topk_nll", "topg_miss"] = "topk_nll",
        max_epochs: int = 5,
        batch_size: int = 512,
        learning_rate: float = 2e-3,
        max_windows_per_epoch: int = 200_000,
        max_vocab: int = 1000,
        contamination: float = 0.01,
        random_state: int = 0,
        device: str = "cpu",
        progress: bool = False,
        num_threads: int | None = None,
    ) -> None:
        if score not in ("topk_nll", "topg_miss"):
            raise ValueError(f"deeplog: unknown score {score!r}")
        self.window = window
        self.embed_dim = embed_dim
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.top_g = top_g
        self.top_k = top_k
        self.score = score
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.max_windows_per_epoch = max_windows_per_epoch
        self.max_vocab = max_vocab
        self.contamination = contamination
        self.random_state = random_state
        self.device = device
        self.progress = progress
        self.num_threads = num_threads
        self.vocabulary_: pd.Index | None = None
        self.model_: Any = None
        self.threshold_: float = math.nan
        self.decision_scores_: np.ndarray | None = None
        self.loss_history_: list[float] = []
        self.fill_score_: float = math.nan  # score of a user without events

    # -- encoding ------------------------------------------------------------------------

    def _encode(self, frame: pd.DataFrame, user_ids: np.ndarray) -> _EncodedEvents:
        assert self.vocabulary_ is not None
        users = pd.Index(user_ids)
        user_index = users.get_indexer(frame["user_id"].astype(object))
        keep = user_index >= 0
        frame, user_index = frame.loc[keep], user_index[keep]
        type_ids = self.vocabulary_.get_indexer(frame["event_type"].astype(object))
        codes = np.where(type_ids >= 0, type_ids + 2, UNK).astype(np.int64)
        n = len(codes)
        is_start = np.ones(n, dtype=bool)
        if n:
            is_start[1:] = user_index[1:] != user_index[:-1]
        starts = np.flatnonzero(is_start)
        run_start = starts[np.cumsum(is_start) - 1] if n else np.zeros(0, dtype=np.int64)
        padded = np.concatenate([np.full(self.window, PAD, dtype=np.int64), codes])
        view = sliding_window_view(padded, self.window)[:n]
        return _EncodedEvents(codes, user_index, run_start, view)

    # -- fit / score ---------------------------------------------------------------------

    def fit(self, data: UserData, labels: np.ndarray | None = None) -> DeepLogScorer:
        with _torch_threads(self.num_threads):
            return self._fit(data, labels)

    def _fit(self, data: UserData, labels: np.ndarray | None) -> DeepLogScorer:
        import torch

        user_ids, encoded = self._training_events(data, labels)
        device = self._device()

        rng = np.random.default_rng(self.random_state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            model = _NextEventLSTM.build(
                len(self.vocabulary_) + 2, self.embed_dim, self.hidden_size, self.num_layers
            ).to(device)
            optimiser = torch.optim.Adam(model.parameters(), lr=self.learning_rate)
            loss_fn = torch.nn.CrossEntropyLoss()
            epochs = range(self.max_epochs)
            if self.progress:
                from tqdm.auto import tqdm

                epochs = tqdm(epochs, desc="deeplog", unit="epoch")
            n = len(encoded.codes)
            self.loss_history_ = []
            for _ in epochs:
                model.train()
                order = rng.permutation(n)[: self.max_windows_per_epoch]
                total, seen = 0.0, 0
                for lo in range(0, len(order), self.batch_size):
                    idx = order[lo : lo + self.batch_size]
                    x = torch.from_numpy(encoded.windows(idx)).to(device)
                    y = torch.from_numpy(encoded.codes[idx]).to(device)
                    loss = loss_fn(model(x), y)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    total += loss.item() * len(idx)
                    seen += len(idx)
                self.loss_history_.append(total / max(seen, 1))
        self.model_ = model.eval()
        self._score_training_users(encoded, len(user_ids))
        return self

    def _device(self) -> Any:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _training_events(
        self, data: UserData, labels: np.ndarray | None
    ) -> tuple[np.ndarray, _EncodedEvents]:
        """The users trained on (the label-0 ones when labels are given: normal behaviour),
        the vocabulary fitted on their events, and those events encoded."""
        user_ids = data.user_ids
        if labels is not None:
            labels = np.asarray(labels).ravel()
            if len(labels) != len(user_ids):
                raise ValueError(f"{self.name}: {len(labels)} labels for {len(user_ids)} users")
            user_ids = user_ids[labels == 0]
        frame = _events_frame(data.events)
        frame = frame[frame["user_id"].isin(pd.Index(user_ids))]
        if frame.empty:
            raise ValueError(f"{self.name}: no training events")
        freq = frame["event_type"].astype(object).value_counts(sort=True)
        self.vocabulary_ = pd.Index(sorted(freq.index[: self.max_vocab].tolist()))
        return user_ids, self._encode(frame, user_ids)

    def _score_training_users(self, encoded: _EncodedEvents, n_users: int) -> None:
        """decision_scores_, the fill score of a user without events, and threshold_."""
        scores = self._user_scores(encoded, n_users)
        finite = scores[np.isfinite(scores)]
        self.fill_score_ = float(np.median(finite)) if len(finite) else 0.0
        self.decision_scores_ = np.where(np.isfinite(scores), scores, self.fill_score_)
        self.threshold_ = float(
            np.percentile(self.decision_scores_, 100 * (1 - self.contamination))
        )

    def event_scores(self, data: UserData) -> pd.DataFrame:
        """Per event of ``data``'s users, in (user_id, ts) order: user_id, event_type, the NLL
        of the actual event type and whether it fell outside the model's top g (DeepLog)."""
        _check_fitted(self, "model_")
        frame = _events_frame(data.events)
        frame = frame[frame["user_id"].isin(pd.Index(data.user_ids))]
        encoded = self._encode(frame, data.user_ids)
        with _torch_threads(self.num_threads):
            nll, miss = self._event_scores(encoded)
        return frame.reset_index(drop=True).assign(nll=nll, top_g_miss=miss)

    def _event_scores(self, encoded: _EncodedEvents) -> tuple[np.ndarray, np.ndarray]:
        import torch

        _check_fitted(self, "model_")
        device = next(self.model_.parameters()).device
        n = len(encoded.codes)
        nll = np.empty(n, dtype=np.float64)
        miss = np.empty(n, dtype=bool)
        # top-g candidates are the known event types only: PAD is never an event, and an
        # unseen type (UNK) is a miss by definition, as in DeepLog
        g = max(1, min(self.top_g, len(self.vocabulary_)))
        step = self.batch_size * 4
        with torch.no_grad():
            for lo in range(0, n, step):
                idx = np.arange(lo, min(lo + step, n))
                x = torch.from_numpy(encoded.windows(idx)).to(device)
                y = torch.from_numpy(encoded.codes[idx]).to(device)
                logp = torch.log_softmax(self.model_(x).float(), dim=-1)
                nll[idx] = (-logp.gather(1, y[:, None]).squeeze(1)).cpu().numpy()
                top = logp[:, UNK + 1 :].topk(g, dim=-1).indices + (UNK + 1)
                miss[idx] = ~(top == y[:, None]).any(dim=1).cpu().numpy()
        return nll, miss

    def _user_scores(self, encoded: _EncodedEvents, n_users: int) -> np.ndarray:
        nll, miss = self._event_scores(encoded)
        u = encoded.user_index
        count = np.bincount(u, minlength=n_users).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.score == "topg_miss":
                return np.bincount(u, weights=miss, minlength=n_users) / count
            # rank of each event's NLL within its user, descending; keep the top k
            order = np.lexsort((-nll, u))
            first = np.searchsorted(u[order], u[order], side="left")
            top = order[(np.arange(len(order)) - first) < self.top_k]
            sums = np.bincount(u[top], weights=nll[top], minlength=n_users)
            return sums / np.bincount(u[top], minlength=n_users)

    def decision_function(self, data: UserData) -> np.ndarray:
        _check_fitted(self, "model_")
        encoded = self._encode(_events_frame(data.events), data.user_ids)
        with _torch_threads(self.num_threads):
            scores = self._user_scores(encoded, len(data.user_ids))
        # users without events: neither normal nor suspicious evidence -> the training median
        return np.where(np.isfinite(scores), scores, self.fill_score_)


class LogBERTScorer(DeepLogScorer):
    """LogBERT (Guo et al., 2021) on event types: a small bidirectional BERT trained by masked
    event prediction on the training users' sequences, cut into windows of ``window`` events
    with a leading [DIST] token. Scoring masks every event once: ``mask_passes`` passes per
    window, pass j masking the positions i with i % mask_passes == j (LogBERT masks a random
    share per pass; covering each event once is the fairer, deterministic version). Per event:
    the NLL of the actual type at its mask and whether it fell outside the top g (LogBERT's
    anomaly count); the user score is the same choice as DeepLog's (``topk_nll`` default).

    Vocabulary, UNK and user scores are DeepLog's (this class reuses them); only the model and
    the per-event pass differ. ``transformers``' BertForMaskedLM is the encoder.
    """

    name = "logbert"

    def __init__(
        self,
        window: int = 64,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        mask_share: float = 0.15,
        mask_passes: int = 7,
        top_g: int = 9,
        top_k: int = 5,
        score: Literal["topk_nll", "topg_miss"] = "topk_nll",
        max_epochs: int = 4,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        max_windows_per_epoch: int = 20_000,
        max_vocab: int = 1000,
        contamination: float = 0.01,
        random_state: int = 0,
        device: str = "cpu",
        progress: bool = False,
        num_threads: int | None = None,
    ) -> None:
        super().__init__(
            window=window,
            hidden_size=hidden_size,
            num_layers=num_layers,
            top_g=top_g,
            top_k=top_k,
            score=score,
            max_epochs=max_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            max_windows_per_epoch=max_windows_per_epoch,
            max_vocab=max_vocab,
            contamination=contamination,
            random_state=random_state,
            device=device,
            progress=progress,
            num_threads=num_threads,
        )
        self.num_heads = num_heads
        self.mask_share = mask_share
        self.mask_passes = mask_passes

    def _special(self) -> tuple[int, int, int]:
        """(MASK id, DIST id, vocabulary size) after the event types (PAD 0, UNK 1, types 2..)."""
        assert self.vocabulary_ is not None
        mask = len(self.vocabulary_) + 2
        return mask, mask + 1, mask + 2

    def _windows(self, encoded: _EncodedEvents) -> tuple[np.ndarray, np.ndarray]:
        """[DIST] + up to ``window`` codes per row (PAD after a user's last event), and the
        event index of every position (-1 for DIST and padding)."""
        _, dist, _ = self._special()
        n = len(encoded.codes)
        offset = np.arange(n) - encoded.run_start  # position within the user
        row_of_run = offset // self.window
        new_row = (offset % self.window == 0).astype(np.int64)
        row = np.cumsum(new_row) - 1
        width = self.window + 1
        tokens = np.full((int(row.max()) + 1 if n else 0, width), PAD, dtype=np.int64)
        where = np.full(tokens.shape, -1, dtype=np.int64)
        col = offset - row_of_run * self.window + 1
        tokens[row, col] = encoded.codes
        where[row, col] = np.arange(n)
        tokens[:, 0] = dist
        return tokens, where

    def _fit(self, data: UserData, labels: np.ndarray | None) -> LogBERTScorer:
        import torch
        from transformers import BertConfig, BertForMaskedLM

        user_ids, encoded = self._training_events(data, labels)
        tokens, where = self._windows(encoded)
        mask_id, _, vocab = self._special()
        device = self._device()
        rng = np.random.default_rng(self.random_state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            config = BertConfig(
                vocab_size=vocab,
                hidden_size=self.hidden_size,
                num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads,
                intermediate_size=4 * self.hidden_size,
                max_position_embeddings=self.window + 1,
                pad_token_id=PAD,
            )
            model = BertForMaskedLM(config).to(device)
            optimiser = torch.optim.AdamW(model.parameters(), lr=self.learning_rate)
            epochs = range(self.max_epochs)
            if self.progress:
                from tqdm.auto import tqdm

                epochs = tqdm(epochs, desc="logbert", unit="epoch")
            self.loss_history_ = []
            for _ in epochs:
                model.train()
                order = rng.permutation(len(tokens))[: self.max_windows_per_epoch]
                total, seen = 0.0, 0
                for lo in range(0, len(order), self.batch_size):
                    idx = order[lo : lo + self.batch_size]
                    x = tokens[idx].copy()
                    real = where[idx] >= 0
                    chosen = real & (rng.random(x.shape) < self.mask_share)
                    y = np.where(chosen, x, -100)
                    x[chosen] = mask_id
                    if not chosen.any():
                        continue
                    out = model(
                        input_ids=torch.from_numpy(x).to(device),
                        attention_mask=torch.from_numpy(x != PAD).to(device),
                        labels=torch.from_numpy(y).to(device),
                    )
                    optimiser.zero_grad()
                    out.loss.backward()
                    optimiser.step()
                    total += out.loss.item() * len(idx)
                    seen += len(idx)
                self.loss_history_.append(total / max(seen, 1))
        self.model_ = model.eval()
        self._score_training_users(encoded, len(user_ids))
        return self

    def _event_scores(self, encoded: _EncodedEvents) -> tuple[np.ndarray, np.ndarray]:
        import torch

        _check_fitted(self, "model_")
        device = next(self.model_.parameters()).device
        n = len(encoded.codes)
        nll = np.full(n, np.nan, dtype=np.float64)
        miss = np.zeros(n, dtype=bool)
        if n == 0:
            return nll, miss
        tokens, where = self._windows(encoded)
        mask_id, _, _ = self._special()
        g = max(1, min(self.top_g, len(self.vocabulary_)))
        first_type, end_type = UNK + 1, mask_id  # candidates: the known event types
        positions = np.arange(tokens.shape[1])
        with torch.no_grad():
            for j in range(self.mask_passes):
                chosen = (where >= 0) & ((positions - 1) % self.mask_passes == j)[None, :]
                for lo in range(0, len(tokens), self.batch_size * 4):
                    x = tokens[lo : lo + self.batch_size * 4].copy()
                    pick = chosen[lo : lo + self.batch_size * 4]
                    if not pick.any():
                        continue
                    truth = x[pick]
                    x[pick] = mask_id
                    logits = self.model_(
                        input_ids=torch.from_numpy(x).to(device),
                        attention_mask=torch.from_numpy(x != PAD).to(device),
                    ).logits
                    at = logits[torch.from_numpy(pick).to(device)].float()
                    logp = torch.log_softmax(at[:, :end_type], dim=-1)
                    y = torch.from_numpy(truth).to(device)
                    events = where[lo : lo + self.batch_size * 4][pick]
                    nll[events] = (-logp.gather(1, y[:, None]).squeeze(1)).cpu().numpy()
                    top = logp[:, first_type:].topk(g, dim=-1).indices + first_type
                    miss[events] = ~(top == y[:, None]).any(dim=1).cpu().numpy()
        return nll, miss


def default_scorers(random_state: int = 0) -> list[UserScorer]:
    """The baseline line-up used by evaluation, with the hyper-parameters documented above."""
    return [
        IForestScorer(random_state=random_state),
        ECODScorer(random_state=random_state),
        LOFScorer(random_state=random_state),
        LightGBMScorer(random_state=random_state),
        DeepLogScorer(random_state=random_state),
        LogBERTScorer(random_state=random_state),
    ]
