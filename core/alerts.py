"""The Triage and Thresholds questions: who is alerting in a time range, and what a threshold
(and a weight between the unsupervised and supervised scores) would cost and catch.

Scores are the model's stored full-history per-user scores (``sequence_scores`` rows with no
window); a time range selects the users *active* in it (at least one event in [start, end)).
Active users without a stored score are scored on demand (full history, written back) when the
caller passes a model loader.

An alert is a user whose combined score is >= the threshold. With ``weight`` given, the
combined score is recomputed as ``combine_scores(percentile, supervised, weight,
aggregate=aggregate)``; with
``weight=None`` the stored combined score is used.

**Alert day.** A per-user score has no date of its own. For "alerts per day" and the backtest
each alerted user is counted once, on the UTC day of their most surprising event (highest
per-event surprisal under the model) inside the window considered — the day the behaviour that
raised the alert peaked. Users without per-event scores fall back to the day of their last
event in the window. So the per-day counts of a window always sum to its number of alerts.

**Evaluation labels.** ``y`` arrays are floats: 1 = fraud, 0 = not fraud, NaN = unknown.
Demo ground truth knows every user (users absent from ``truth_users`` are normal); analyst
labels know only labelled users (latest label fraud = 1, legit = 0; unsure and unlabelled are
unknown). Precision / recall / F1 and the confusion matrix count known users only; alert counts
and the review cost count every user, since every alert is reviewed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

import duckdb
import numpy as np
import pandas as pd

from core import cases
from core.evaluate import load_truth, threshold_table
from core.scoring import DEFAULT_UNSUPERVISED_WEIGHT, combine_scores, score_users

if TYPE_CHECKING:
    from core.scoring import LoadedModel

ModelLoader = Callable[[], "LoadedModel"]
LabelSource = Literal["truth", "analyst"]

QUEUE_COLUMNS: tuple[str, ...] = (
    "user_id",
    "score",
    "percentile",
    "supervised",
    "events",
    "last_seen",
    "main_reason",
    "label",
    "case",
)


@dataclass(frozen=True)
class QueueFilters:
    """Which active users the queue considers: any event of these types / from these
    countries in the range (empty = no filter), and at least ``min_events`` events in it."""

    event_types: tuple[str, ...] = ()
    countries: tuple[str, ...] = ()
    min_events: int = 1


def _range_params(start: datetime | None, end: datetime | None) -> list[datetime | None]:
    return [start, start, end, end]


def _range_sql(column: str = "ts") -> str:
    """Half-open [start, end) on a timestamp column; either bound may be NULL (open)."""
    return f"(?::TIMESTAMP IS NULL OR {column} >= ?) AND (?::TIMESTAMP IS NULL OR {column} < ?)"


_RANGE_SQL = _range_sql()

# The alert threshold in use when none has been saved for the model (dashboard and CLI).
DEFAULT_THRESHOLD = 0.9
# The same for a model trained without labels, whose score is the unsupervised percentile
# itself: 0.9 would alert a tenth of all users on any data (a queue nobody can work through);
# 0.99 is the 1% alert budget the evaluation reports recall at.
UNSUPERVISED_DEFAULT_THRESHOLD = 0.99


def default_threshold(con: duckdb.DuckDBPyConnection, model_id: str | None) -> float:
    """DEFAULT_THRESHOLD, or UNSUPERVISED_DEFAULT_THRESHOLD for a model trained without
    labels (its metrics say ``"supervised": false``)."""
    if model_id is None:
        return DEFAULT_THRESHOLD
    row = con.execute(
        "SELECT CASE WHEN json_valid(metrics) THEN json_extract(metrics, '$.supervised') END"
        " FROM models WHERE model_id = ?",
        [model_id],
    ).fetchone()
    supervised = row is None or row[0] is None or str(row[0]).lower() != "false"
    return DEFAULT_THRESHOLD if supervised else UNSUPERVISED_DEFAULT_THRESHOLD


def threshold_in_use(con: duckdb.DuckDBPyConnection, model_id: str | None) -> float:
    """The threshold last saved for the model, else its default."""
    saved = saved_setting(con, model_id) if model_id is not None else None
    return saved.threshold if saved is not None else default_threshold(con, model_id)


def active_scores(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    start: datetime | None,
    end: datetime | None,
    *,
    filters: QueueFilters = QueueFilters(),
    weight: float | None = None,
    load: ModelLoader | None = None,
) -> pd.DataFrame:
    """One row per active user passing ``filters``: user_id, events (in range), last_seen
    (in range), percentile, supervised, score (combined), scored (False when no score exists
    and none could be computed). Sorted by score, highest first."""
    sql = (
        "WITH act AS (SELECT user_id, count(*) AS events, max(ts) AS last_seen FROM events"  # noqa: S608 -- fixed text
        f" WHERE {_RANGE_SQL} GROUP BY user_id HAVING count(*) >= ?"
        " AND (?::VARCHAR[] IS NULL OR bool_or(list_contains(?::VARCHAR[], event_type)))"
        " AND (?::VARCHAR[] IS NULL OR bool_or(list_contains(?::VARCHAR[], country))))"
        " SELECT act.user_id, act.events, act.last_seen, s.percentile_unsupervised AS percentile,"
        " s.score_supervised AS supervised, s.score_aggregate AS aggregate,"
        " s.score AS stored_score, s.score_unsupervised AS __rarity FROM act"
        " LEFT JOIN sequence_scores s ON s.user_id = act.user_id AND s.model_id = ?"
        " AND s.window_start IS NULL AND s.window_end IS NULL"
    )
    types = list(filters.event_types) or None
    countries = list(filters.countries) or None
    params = [
        *_range_params(start, end),
        int(filters.min_events),
        types,
        types,
        countries,
        countries,
        model_id,
    ]
    frame = con.execute(sql, params).df()
    missing = frame.loc[frame["stored_score"].isna(), "user_id"].astype(str).tolist()
    if missing and load is not None:
        score_users(con, load(), missing, write=True)
        frame = con.execute(sql, params).df()
    frame["scored"] = frame["stored_score"].notna()
    frame["score"] = _combined(frame, weight)
    # Ties in the score (every user beyond the training users shares percentile 1) go by the
    # raw unsupervised score, how far beyond, rather than by the user id's spelling.
    frame = frame.sort_values(
        ["score", "__rarity", "user_id"],
        ascending=[False, False, True],
        na_position="last",
        ignore_index=True,
    )
    return frame.drop(columns=["stored_score", "__rarity"])


def _combined(frame: pd.DataFrame, weight: float | None) -> np.ndarray:
    stored = frame["stored_score"] if "stored_score" in frame else frame["score"]
    if weight is None:
        return stored.to_numpy(dtype=np.float64, na_value=np.nan)
    pct = frame["percentile"].to_numpy(dtype=np.float64, na_value=np.nan)
    sup = frame["supervised"].to_numpy(dtype=np.float64, na_value=np.nan)
    agg = (
        frame["aggregate"].to_numpy(dtype=np.float64, na_value=np.nan)
        if "aggregate" in frame
        else None
    )
    return combine_scores(pct, sup, float(weight), aggregate=agg)


@dataclass(frozen=True)
class RangeKpis:
    n_events: int
    n_active_users: int
    n_scored: int
    n_alerts: int
    n_alerts_labelled: int

    @property
    def labelled_share(self) -> float | None:
        """Share of the alerts that carry an analyst label (any), None without alerts."""
        return self.n_alerts_labelled / self.n_alerts if self.n_alerts else None


def range_kpis(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    start: datetime | None,
    end: datetime | None,
    threshold: float,
    *,
    weight: float | None = None,
    load: ModelLoader | None = None,
    users: pd.DataFrame | None = None,
) -> RangeKpis:
    """Events and active users in [start, end); alerts among the active users; how many of
    those alerts an analyst has labelled. ``users``: this range's unfiltered
    ``active_scores`` when the caller has them already (one scan of the range, not one per
    question)."""
    row = con.execute(f"SELECT count(*) FROM events WHERE {_RANGE_SQL}", _range_params(start, end))  # noqa: S608
    n_events = int(row.fetchall()[0][0])
    if users is None:
        users = active_scores(con, model_id, start, end, weight=weight, load=load)
    alerted = users.loc[users["score"] >= threshold, "user_id"].astype(str).tolist()
    labelled = cases.latest_labels(con, alerted) if alerted else pd.DataFrame()
    return RangeKpis(
        n_events=n_events,
        n_active_users=len(users),
        n_scored=int(users["scored"].sum()),
        n_alerts=len(alerted),
        n_alerts_labelled=len(labelled),
    )


def alert_queue(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    start: datetime | None,
    end: datetime | None,
    threshold: float,
    *,
    filters: QueueFilters = QueueFilters(),
    weight: float | None = None,
    load: ModelLoader | None = None,
    limit: int | None = 1000,
    users: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Active users scoring >= threshold, highest first, with QUEUE_COLUMNS: the main reason
    (most surprising event type in the range, see ``cases.top_reasons``), the current label
    and the most recent case ("#3 investigating"). ``users``: ``active_scores`` for these
    filters, when the caller has them already."""
    if users is None:
        users = active_scores(con, model_id, start, end, filters=filters, weight=weight, load=load)
    queue = users.loc[users["score"] >= threshold].reset_index(drop=True)
    return _with_reasons_labels_cases(con, model_id, queue, start, end, limit)


# The unsupervised percentile Triage's watchlist starts at, and the levels it offers. With a
# typology held out of the labels (benchmarks/bench_novelty.py, unseen world) the list held
# 8% of that typology's users at 0.99 (0.6 users listed per 1,000), 24% at 0.97 (20 per
# 1,000) and 30% at 0.95 (46 per 1,000): 0.97 finds most for a list an analyst can read.
NOVELTY_PERCENTILE = 0.97
WATCH_LEVELS = (0.95, 0.97, 0.99)


def novelty_watchlist(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    start: datetime | None,
    end: datetime | None,
    threshold: float,
    *,
    min_percentile: float = NOVELTY_PERCENTILE,
    filters: QueueFilters = QueueFilters(),
    weight: float | None = None,
    load: ModelLoader | None = None,
    limit: int | None = 200,
    users: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Active users whose behaviour the unsupervised model finds rarer than ``min_percentile``
    of the training users, yet whose combined score stays under the threshold: the supervised
    sources, trained on the fraud already labelled, outvoted the novelty. New kinds of fraud
    look like this until someone labels them, so Triage lists them beside the queue (same
    columns as ``alert_queue``, most unusual first). The list at a higher level is this one's
    rows at or above it. ``users`` as for ``alert_queue``."""
    if users is None:
        users = active_scores(con, model_id, start, end, filters=filters, weight=weight, load=load)
    unusual = (users["percentile"] >= min_percentile) & (users["score"] < threshold)
    watch = users.loc[unusual.fillna(False).astype(bool)]
    # stable: ties in the percentile keep active_scores' order (score, then the raw
    # unsupervised score), not the user ids' spelling
    watch = watch.sort_values("percentile", ascending=False, kind="stable", ignore_index=True)
    return _with_reasons_labels_cases(con, model_id, watch, start, end, limit)


def _with_reasons_labels_cases(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    queue: pd.DataFrame,
    start: datetime | None,
    end: datetime | None,
    limit: int | None,
) -> pd.DataFrame:
    if limit is not None:
        queue = queue.head(int(limit))
    ids = queue["user_id"].astype(str).tolist()
    reasons = cases.top_reasons(con, model_id, ids, start, end, max_reasons=1).to_dict()
    labels = cases.latest_labels(con, ids) if ids else None
    label_of = (
        dict(zip(labels["user_id"], labels["label"], strict=True)) if labels is not None else {}
    )
    case_of = cases.user_case_status(con, ids).to_dict()
    queue["main_reason"] = pd.Series([reasons.get(u, "") for u in ids], dtype=str)
    queue["label"] = pd.Series([label_of.get(u, "") for u in ids], dtype=str)
    queue["case"] = pd.Series([case_of.get(u, "") for u in ids], dtype=str)
    return queue.reindex(columns=list(QUEUE_COLUMNS))


def filter_options(
    con: duckdb.DuckDBPyConnection, start: datetime | None, end: datetime | None
) -> tuple[list[str], list[str]]:
    """Event types and countries present in the range (for the queue's filters)."""
    params = _range_params(start, end)
    types = con.execute(
        f"SELECT DISTINCT event_type FROM events WHERE {_RANGE_SQL} ORDER BY 1",  # noqa: S608
        params,
    ).fetchall()
    countries = con.execute(
        f"SELECT DISTINCT country FROM events WHERE {_RANGE_SQL} AND country IS NOT NULL"  # noqa: S608
        " ORDER BY 1",
        params,
    ).fetchall()
    return [str(r[0]) for r in types], [str(r[0]) for r in countries]


# ---------------------------------------------------------------------------------------------
# Alert days and per-day counts


def alert_days(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """Per user with events in [start, end): the alert day (see the module docstring)."""
    return con.execute(
        "SELECT e.user_id, coalesce(date_trunc('day', arg_max(e.ts, s.surprisal)),"  # noqa: S608 -- fixed text
        " date_trunc('day', max(e.ts))) AS day FROM events e"
        " LEFT JOIN event_scores s ON s.event_id = e.event_id AND s.model_id = ?"
        f" WHERE {_range_sql('e.ts')} GROUP BY e.user_id",
        [model_id, *_range_params(start, end)],
    ).df()


def alerts_per_day(
    days: pd.Series | np.ndarray,
    alert: np.ndarray,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """Count alerted users per alert day: columns day, alerts; every day of [start, end) (or
    of the days seen) is present, zero included."""
    day = pd.to_datetime(pd.Series(np.asarray(days)), errors="coerce").dt.floor("D")
    mask = np.asarray(alert, dtype=bool)
    counts = day[mask].value_counts()
    lo = pd.Timestamp(start).floor("D") if start is not None else day.min()
    hi = pd.Timestamp(end) - pd.Timedelta(microseconds=1) if end is not None else day.max()
    if pd.isna(lo) or pd.isna(hi) or lo > hi:
        return pd.DataFrame({"day": pd.Series(dtype="datetime64[us]"), "alerts": []})
    index = pd.date_range(lo, pd.Timestamp(hi).floor("D"), freq="D")
    counts.index = pd.DatetimeIndex(counts.index)
    out = counts.reindex(index, fill_value=0)
    return pd.DataFrame({"day": index, "alerts": out.to_numpy(dtype=np.int64)})


def daily_alerts(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    start: datetime | None,
    end: datetime | None,
    threshold: float,
    *,
    weight: float | None = None,
) -> pd.DataFrame:
    """Alerts per day in [start, end) at this threshold (Triage's chart)."""
    data = threshold_data(con, model_id, start, end)
    scores = data.scores(weight)
    active = data.users["active"].to_numpy(dtype=bool)
    return alerts_per_day(data.users["day"], active & (scores >= threshold), start, end)


# ---------------------------------------------------------------------------------------------
# Threshold tuning: one query, then pure functions of (threshold, weight, costs)


@dataclass
class ThresholdData:
    """Every scored user of a model with what tuning needs; cheap to re-slice per slider move.

    ``users`` columns: user_id, percentile, supervised, aggregate, stored_score, active (has
    events in the range), day (alert day in the range, NaT when not active), day_all (alert day
    over the whole history), y_truth, y_analyst (1 / 0 / NaN, see the module docstring).
    """

    users: pd.DataFrame
    has_truth: bool
    n_analyst_labels: int
    start: datetime | None
    end: datetime | None

    def scores(self, weight: float | None = None) -> np.ndarray:
        return _combined(self.users, weight)

    def label_sources(self) -> list[LabelSource]:
        out: list[LabelSource] = []
        if self.has_truth:
            out.append("truth")
        if self.n_analyst_labels:
            out.append("analyst")
        return out

    def y(self, source: LabelSource) -> np.ndarray:
        return self.users["y_truth" if source == "truth" else "y_analyst"].to_numpy(
            dtype=np.float64, na_value=np.nan
        )

    @property
    def active(self) -> np.ndarray:
        return self.users["active"].to_numpy(dtype=bool)


def threshold_data(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    start: datetime | None = None,
    end: datetime | None = None,
) -> ThresholdData:
    users = con.execute(
        "SELECT user_id, percentile_unsupervised AS percentile, score_supervised AS supervised,"
        " score_aggregate AS aggregate, score AS stored_score FROM sequence_scores"
        " WHERE model_id = ?"
        " AND window_start IS NULL AND window_end IS NULL ORDER BY user_id",
        [model_id],
    ).df()
    in_range = alert_days(con, model_id, start, end).set_index("user_id")["day"]
    overall = (
        in_range
        if start is None and end is None
        else alert_days(con, model_id).set_index("user_id")["day"]
    )
    users["active"] = users["user_id"].isin(in_range.index)
    users["day"] = users["user_id"].map(in_range)
    users["day_all"] = users["user_id"].map(overall)
    truth_n = con.execute("SELECT count(*) FROM truth_users").fetchall()[0][0]
    has_truth = bool(truth_n) and len(users) > 0
    if has_truth:
        y, _ = load_truth(con, users["user_id"].astype(str).tolist())
        users["y_truth"] = y.astype(np.float64)
    else:
        users["y_truth"] = np.nan
    labels = cases.latest_labels(con).set_index("user_id")["label"]
    y_analyst = users["user_id"].map(labels).map({"fraud": 1.0, "legit": 0.0})
    users["y_analyst"] = y_analyst.astype(np.float64)
    return ThresholdData(
        users=users,
        has_truth=has_truth,
        n_analyst_labels=int(users["y_analyst"].notna().sum()),
        start=start,
        end=end,
    )


@dataclass(frozen=True)
class ThresholdPoint:
    threshold: float
    alerts: int  # every user at or above the threshold
    tp: int
    fp: int
    fn: int
    tn: int
    precision: float  # NaN when no known user is alerted
    recall: float  # NaN without known positives
    f1: float


def _known(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    keep = ~np.isnan(y) & np.isfinite(s)
    return (y[keep] > 0).astype(np.int64), s[keep]


def threshold_point(y: np.ndarray, scores: np.ndarray, threshold: float) -> ThresholdPoint:
    s_all = np.asarray(scores, dtype=np.float64)
    yk, sk = _known(y, s_all)
    alert = sk >= threshold
    tp = int((alert & (yk == 1)).sum())
    fp = int((alert & (yk == 0)).sum())
    fn = int((~alert & (yk == 1)).sum())
    tn = int((~alert & (yk == 0)).sum())
    precision = tp / (tp + fp) if tp + fp else np.nan
    recall = tp / (tp + fn) if tp + fn else np.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fn else np.nan
    return ThresholdPoint(
        threshold=float(threshold),
        alerts=int((s_all >= threshold).sum()),
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
    )


def confusion(y: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """[[tn, fp], [fn, tp]] over the known users (sklearn's layout)."""
    p = threshold_point(y, scores, threshold)
    return np.array([[p.tn, p.fp], [p.fn, p.tp]], dtype=np.int64)


def metrics_table(
    y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | None = None
) -> pd.DataFrame:
    """evaluate.threshold_table over the known users, with ``alerts`` counting every user."""
    s_all = np.asarray(scores, dtype=np.float64)
    yk, sk = _known(y, s_all)
    if thresholds is None:
        finite = s_all[np.isfinite(s_all)]
        thresholds = np.unique(np.quantile(finite, np.linspace(0, 1, 101))) if len(finite) else []
    table = threshold_table(yk, sk, thresholds)
    table = table.rename(columns={"alerts": "alerts_known"})
    sorted_all = np.sort(s_all[np.isfinite(s_all)])
    thr = table["threshold"].to_numpy()
    table.insert(1, "alerts", len(sorted_all) - np.searchsorted(sorted_all, thr, side="left"))
    return table


def pr_curve(y: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """Precision / recall per threshold over the known users (sklearn), by threshold; empty
    when the known users lack a class."""
    from sklearn.metrics import precision_recall_curve

    yk, sk = _known(y, scores)
    if len(yk) == 0 or yk.min() == yk.max():
        return pd.DataFrame({"threshold": [], "precision": [], "recall": []})
    precision, recall, thr = precision_recall_curve(yk, sk)
    return pd.DataFrame({"threshold": thr, "precision": precision[:-1], "recall": recall[:-1]})


@dataclass(frozen=True)
class CostPoint:
    threshold: float  # alert when score >= threshold; above every score = no alerts
    cost: float
    alerts: int
    missed: int


def cost_curve(
    y: np.ndarray,
    scores: np.ndarray,
    cost_missed: float,
    cost_review: float,
    thresholds: np.ndarray | None = None,
) -> pd.DataFrame:
    """Expected cost = cost_missed × missed fraud (known positives below the threshold) +
    cost_review × alerts (every user at or above it). Default thresholds: every distinct score
    and one just above the highest (no alerts) — the candidates where the cost can change."""
    s_all = np.asarray(scores, dtype=np.float64)
    s_all = s_all[np.isfinite(s_all)]
    yk, sk = _known(y, scores)
    if thresholds is None:
        uniq = np.unique(s_all)
        top = np.nextafter(uniq[-1], np.inf) if len(uniq) else 1.0
        thresholds = np.append(uniq, top)
    thr = np.sort(np.asarray(thresholds, dtype=np.float64))
    alerts = len(s_all) - np.searchsorted(np.sort(s_all), thr, side="left")
    pos = np.sort(sk[yk == 1])
    missed = np.searchsorted(pos, thr, side="left")
    cost = cost_missed * missed + cost_review * alerts
    return pd.DataFrame({"threshold": thr, "alerts": alerts, "missed": missed, "cost": cost})


def min_cost(
    y: np.ndarray, scores: np.ndarray, cost_missed: float, cost_review: float
) -> CostPoint:
    """The cost-minimising threshold (the highest one among ties: fewest alerts)."""
    curve = cost_curve(y, scores, cost_missed, cost_review)
    costs = curve["cost"].to_numpy()
    best = int(np.flatnonzero(costs == costs.min())[-1])
    row = curve.iloc[best]
    return CostPoint(
        threshold=float(row["threshold"]),
        cost=float(row["cost"]),
        alerts=int(row["alerts"]),
        missed=int(row["missed"]),
    )


def backtest(data: ThresholdData, threshold: float, weight: float | None = None) -> pd.DataFrame:
    """Alerts per day over the whole history: every scored user at or above the threshold,
    counted on their alert day over the whole history."""
    scores = data.scores(weight)
    return alerts_per_day(data.users["day_all"], scores >= threshold)


def range_alerts(
    data: ThresholdData, threshold: float, weight: float | None = None
) -> pd.DataFrame:
    """Alerts per day inside the data's range (active users only)."""
    alert = data.active & (data.scores(weight) >= threshold)
    return alerts_per_day(data.users["day"], alert, data.start, data.end)


# ---------------------------------------------------------------------------------------------
# Saved settings


@dataclass(frozen=True)
class ThresholdSetting:
    model_id: str
    threshold: float
    weight: float
    analyst: str
    saved_at: datetime


def save_threshold(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    threshold: float,
    weight: float,
    analyst: str,
    detail: dict[str, object] | None = None,
) -> ThresholdSetting:
    """Record a threshold (and weight) for a model, with its audit row, in one transaction."""
    if not 0.0 <= threshold <= 1.0 or not 0.0 <= weight <= 1.0:
        raise ValueError("threshold and weight must lie in [0, 1]")
    who = (analyst or "").strip()
    if not who:
        raise cases.CaseError("an analyst name is required")
    now = datetime.now(UTC).replace(tzinfo=None)
    with cases.transaction(con):
        con.execute(
            "INSERT INTO thresholds (model_id, threshold, weight, analyst, saved_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [model_id, float(threshold), float(weight), who, now],
        )
        cases.record_audit(
            con,
            who,
            "threshold_save",
            f"model:{model_id}",
            {"threshold": float(threshold), "weight": float(weight), **(detail or {})},
        )
    return ThresholdSetting(model_id, float(threshold), float(weight), who, now)


def saved_setting(con: duckdb.DuckDBPyConnection, model_id: str) -> ThresholdSetting | None:
    rows = con.execute(
        "SELECT model_id, threshold, weight, analyst, saved_at FROM thresholds"
        " WHERE model_id = ? ORDER BY saved_at DESC LIMIT 1",
        [model_id],
    ).fetchall()
    if not rows:
        return None
    mid, thr, w, who, at = rows[0]
    weight = DEFAULT_UNSUPERVISED_WEIGHT if w is None else float(w)
    return ThresholdSetting(str(mid), float(thr), weight, str(who), at)


def queue_filters(
    event_types: Sequence[str] = (), countries: Sequence[str] = (), min_events: int = 1
) -> QueueFilters:
    return QueueFilters(tuple(sorted(event_types)), tuple(sorted(countries)), int(min_events))


__all__ = [
    "QUEUE_COLUMNS",
    "CostPoint",
    "QueueFilters",
    "RangeKpis",
    "ThresholdData",
    "ThresholdPoint",
    "ThresholdSetting",
    "active_scores",
    "alert_days",
    "alert_queue",
    "alerts_per_day",
    "backtest",
    "confusion",
    "cost_curve",
    "daily_alerts",
    "filter_options",
    "metrics_table",
    "min_cost",
    "pr_curve",
    "queue_filters",
    "range_alerts",
    "range_kpis",
    "save_threshold",
    "saved_setting",
    "threshold_data",
    "threshold_point",
]
