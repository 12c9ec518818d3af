"""The account-level half of the supervised evidence: gradient boosting on per-user aggregates.

The transformer reads events in windows of ``max_len``; it never sees a whole long history at
once, and a sequence head trained on ~100 fraudsters does not learn "five cards in a month" or
"returns every second purchase" as reliably as a tree ensemble on the aggregates does (measured
in ``fraudlens evaluate``: LightGBM on aggregates is the strongest single scorer on the demo).
So a model trained with labels carries both, saved side by side in the model directory, and the
combined score pools their log-odds with the unsupervised percentile (``scoring.combine_scores``).

The booster is the evaluation's ``LightGBMScorer`` with the same settings (one tuning, not two),
saved as LightGBM's own text format (no pickle). TreeSHAP contributions (LightGBM's
``pred_contrib``) say which aggregates raised a user's log-odds, for the Investigate page.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from core.baselines import AggregateFeaturizer, LightGBMScorer, TimeBound, UserData

AGGREGATE_DIR = "aggregate"
_BOOSTER_FILE = "booster.txt"
_FEATURIZER_FILE = "featurizer.json"


def _featurizer_to_dict(featurizer: AggregateFeaturizer) -> dict[str, Any]:
    return {
        "top_n": featurizer.top_n,
        "vocabulary": featurizer.vocabulary_,
        "columns": featurizer.columns_,
        "present_columns": sorted(featurizer.present_columns_),
        "has_money_types": featurizer.has_money_types_,
        "has_purchase_types": featurizer.has_purchase_types_,
        "has_return_types": featurizer.has_return_types_,
        "has_fail_types": featurizer.has_fail_types_,
    }


def _featurizer_from_dict(data: dict[str, Any]) -> AggregateFeaturizer:
    featurizer = AggregateFeaturizer(top_n=int(data["top_n"]))
    featurizer.vocabulary_ = list(data["vocabulary"])
    featurizer.columns_ = list(data["columns"])
    featurizer.present_columns_ = set(data["present_columns"])
    featurizer.has_money_types_ = bool(data["has_money_types"])
    featurizer.has_purchase_types_ = bool(data["has_purchase_types"])
    featurizer.has_return_types_ = bool(data["has_return_types"])
    featurizer.has_fail_types_ = bool(data["has_fail_types"])
    return featurizer


_READABLE = (
    (re.compile(r"^count__(.+)$"), "number of '{}' events"),
    (re.compile(r"^rate__(.+)$"), "share of '{}' events"),
)
_DISTINCT = {
    "device_id": "distinct devices",
    "ip": "distinct IP addresses",
    "country": "distinct countries",
    "payment_id": "distinct cards",
    "item_id": "distinct items",
    "category": "distinct categories",
}
_NAMED = {
    "n_events": "events",
    "active_days": "active days",
    "active_hours": "active hours",
    "span_days": "days between first and last event",
    "night_share": "share of events between 00:00 and 06:00 UTC",
    "gap_log_mean": "mean log gap between events (s)",
    "gap_log_median": "median log gap between events (s)",
    "gap_log_min": "shortest log gap between events (s)",
    "gap_log_std": "spread of log gaps between events",
    "gap_share_lt_2s": "share of events < 2 s after the previous one",
    "n_sessions": "sessions",
    "events_per_session": "events per session",
    "events_per_active_hour": "events per active hour",
    "price_mean": "mean amount",
    "price_max": "largest amount",
    "price_std": "spread of amounts",
    "return_ratio": "returns per purchase",
    "failure_ratio": "share of failed events",
}


def feature_event_type(name: str) -> str | None:
    """The event type a per-type aggregate counts ("rate__return" -> "return"), else None."""
    match = re.match(r"^(?:count|rate)__(.+)$", name)
    if match is None or match.group(1) == "__other__":
        return None
    return match.group(1)


def describe_feature(name: str) -> str:
    """An aggregate's column name as an analyst reads it."""
    if name in _NAMED:
        return _NAMED[name]
    if name.startswith("distinct_"):
        column = name.removeprefix("distinct_")
        return _DISTINCT.get(column, f"distinct values of {column}")
    for pattern, text in _READABLE:
        match = pattern.match(name)
        if match:
            return text.format(match.group(1).replace("__other__", "other"))
    return name


@dataclass
class AggregateModel:
    """A fitted aggregate featurizer and booster; ``predict`` gives fraud probabilities."""

    featurizer: AggregateFeaturizer
    booster: Any  # lightgbm.Booster
    positives: int = 0
    # The training users' median of each aggregate: what "ordinary" looks like beside a
    # user's value when the page lists the aggregates that raised the probability.
    medians: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        con: duckdb.DuckDBPyConnection,
        users: Sequence[str],
        labels: np.ndarray,
        *,
        end: TimeBound = None,
        seed: int = 0,
    ) -> AggregateModel:
        """Fit on the labelled ``users`` (labels 1 / 0; NaN = unknown, left out)."""
        y = np.asarray(labels, dtype=float)
        known = ~np.isnan(y)
        users = [str(u) for u, k in zip(users, known, strict=True) if k]
        y = y[known].astype(np.int64)
        featurizer = AggregateFeaturizer().fit(con, users, None, end)
        features = featurizer.transform(con, users, None, end)
        scorer = LightGBMScorer(random_state=seed).fit(
            UserData(np.asarray(users, dtype=object), features), y
        )
        booster = scorer.model_.booster_
        # the boosted rounds past early stopping's best are dropped for good
        booster = booster.__class__(
            model_str=booster.model_to_string(num_iteration=scorer.best_iteration_)
        )
        medians = {
            str(name): float(value)
            for name, value in features.median(skipna=True).items()
            if np.isfinite(value)
        }
        return cls(featurizer=featurizer, booster=booster, positives=int(y.sum()), medians=medians)

    @property
    def n_splits(self) -> int:
        """Splits over all trees: 0 means the model says the same for every account."""
        return int(self.booster.feature_importance(importance_type="split").sum())

    def features(
        self,
        con: duckdb.DuckDBPyConnection,
        users: Sequence[str],
        start: TimeBound = None,
        end: TimeBound = None,
    ) -> pd.DataFrame:
        return self.featurizer.transform(con, [str(u) for u in users], start, end)

    def predict_features(self, features: pd.DataFrame) -> np.ndarray:
        if len(features) == 0:
            return np.zeros(0)
        x = features.reindex(columns=self.featurizer.columns_).to_numpy(dtype=np.float64)
        return np.asarray(self.booster.predict(x), dtype=np.float64)

    def predict(
        self,
        con: duckdb.DuckDBPyConnection,
        users: Sequence[str],
        start: TimeBound = None,
        end: TimeBound = None,
    ) -> np.ndarray:
        """Fraud probability per user in ``users`` (in order), from their events in [start, end)."""
        return self.predict_features(self.features(con, users, start, end))

    def predict_event_sets(self, event_sets: Sequence[pd.DataFrame]) -> np.ndarray:
        """Fraud probability of each frame of events taken as one user's whole history: the
        deletion check asks what the account looks like without some of its events.

        The frames go to a private in-memory DuckDB as its ``events`` table, so they are
        summarised by exactly the SQL that summarises the store.
        """
        if not event_sets:
            return np.zeros(0)
        names = [f"subset-{i}" for i in range(len(event_sets))]
        table = pd.concat(
            [frame.assign(user_id=name) for frame, name in zip(event_sets, names, strict=True)],
            ignore_index=True,
        )
        con = duckdb.connect()
        try:
            con.register("events", table)
            features = self.featurizer.transform(con, names)
        finally:
            con.close()
        return self.predict_features(features)

    def contributions(self, features: pd.DataFrame) -> pd.DataFrame:
        """TreeSHAP per user and aggregate in log-odds (LightGBM's ``pred_contrib``): columns
        are the features plus ``bias``; each row sums to the user's log-odds."""
        columns = list(self.featurizer.columns_ or [])
        x = features.reindex(columns=columns).to_numpy(dtype=np.float64)
        raw = np.asarray(self.booster.predict(x, pred_contrib=True), dtype=np.float64)
        return pd.DataFrame(raw, index=features.index, columns=[*columns, "bias"])

    def top_contributions(self, features: pd.DataFrame, k: int = 5) -> pd.DataFrame:
        """One user's ``k`` aggregates that raised the fraud log-odds most: feature, label
        (readable), event_type (for per-type counts and shares, else None), value, median
        (training users; NaN when unknown), contribution (log-odds). Positive ones only, and
        none whose value is the training median: "E67 events: 0 (median 0)" reads as no reason
        at all, whatever the trees made of it."""
        if len(features) != 1:
            raise ValueError("top_contributions explains one user at a time")
        values = features.iloc[0]
        contrib = self.contributions(features).iloc[0].drop("bias")
        typical = pd.Series(
            {
                n: bool(np.isclose(float(values[n]), self.medians.get(str(n), np.nan)))
                for n in contrib.index
            }
        )
        contrib = contrib[(contrib > 0) & ~typical].sort_values(ascending=False).head(k)
        return pd.DataFrame(
            {
                "feature": contrib.index.astype(str),
                "label": [describe_feature(str(n)) for n in contrib.index],
                "event_type": [feature_event_type(str(n)) for n in contrib.index],
                "value": [float(values[n]) for n in contrib.index],
                "median": [self.medians.get(str(n), np.nan) for n in contrib.index],
                "contribution": contrib.to_numpy(dtype=np.float64),
            }
        )

    def save(self, model_dir: Path) -> None:
        directory = Path(model_dir) / AGGREGATE_DIR
        directory.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(directory / _BOOSTER_FILE))
        meta = {
            "featurizer": _featurizer_to_dict(self.featurizer),
            "positives": self.positives,
            "medians": self.medians,
        }
        (directory / _FEATURIZER_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, model_dir: Path) -> AggregateModel | None:
        """The model directory's aggregate model, or None when it was trained without one."""
        import lightgbm as lgb

        directory = Path(model_dir) / AGGREGATE_DIR
        if not (directory / _BOOSTER_FILE).exists():
            return None
        meta = json.loads((directory / _FEATURIZER_FILE).read_text())
        return cls(
            featurizer=_featurizer_from_dict(meta["featurizer"]),
            booster=lgb.Booster(model_file=str(directory / _BOOSTER_FILE)),
            positives=int(meta.get("positives", 0)),
            medians={str(k): float(v) for k, v in meta.get("medians", {}).items()},
        )
