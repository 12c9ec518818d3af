"""The questions the Investigate page asks about one user, as pure functions over a connection.

Scores come from what the batch job stored (``sequence_scores`` full-history rows, i.e.
window_start/window_end NULL, and ``event_scores``). When the model has no stored surprisal for
some of the user's events (ingested after the last batch run), the user's whole history is
scored on demand with ``score_users`` and written back, exactly as the batch job would have —
the whole history, because an event's surprisal depends on what came before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import duckdb
import numpy as np
import pandas as pd

from core import cases, schema, store
from core.scoring import LoadedModel, combine_scores, score_users

SurprisalSource = Literal["stored", "on_demand", "none"]


@dataclass(frozen=True)
class UserHeader:
    """What the page shows above the timeline."""

    user_id: str
    n_events: int  # in the range
    n_events_total: int
    first_ts: datetime | None  # in the range
    last_ts: datetime | None
    score: float | None  # combined, full history, [0, 1]
    percentile: float | None  # of the unsupervised score against the training population
    score_supervised: float | None
    score_unsupervised: float | None
    label: str | None
    label_analyst: str | None
    label_note: str | None
    open_cases: tuple[int, ...]  # cases holding the user that are not closed
    case_status: str | None  # the most recently updated case, "#3 investigating"
    score_aggregate: float | None = None  # the account-level model's fraud probability


@dataclass(frozen=True)
class UserTimeline:
    """The user's events in the range with per-event ``surprisal`` (NaN where unscored)."""

    events: pd.DataFrame
    source: SurprisalSource


def _float(value: object) -> float | None:
    return None if value is None or pd.isna(value) else float(value)  # type: ignore[arg-type]


def user_exists(con: duckdb.DuckDBPyConnection, user_id: str) -> bool:
    rows = con.execute("SELECT 1 FROM events WHERE user_id = ? LIMIT 1", [user_id]).fetchall()
    return bool(rows)


def top_users(
    con: duckdb.DuckDBPyConnection, model_id: str | None, limit: int = 200
) -> pd.DataFrame:
    """user_id, score: the model's highest full-history scores (most active users without a
    model), for the user picker."""
    if model_id is not None:
        frame = con.execute(
            "SELECT user_id, score FROM sequence_scores WHERE model_id = ?"
            " AND window_start IS NULL AND window_end IS NULL"
            " ORDER BY score DESC NULLS LAST, score_unsupervised DESC NULLS LAST, user_id"
            " LIMIT ?",
            [model_id, int(limit)],
        ).df()
        if not frame.empty:
            return frame
    users = store.active_users(con, limit=int(limit))[["user_id"]]
    return users.assign(score=np.nan)


def user_header(
    con: duckdb.DuckDBPyConnection,
    user_id: str,
    model_id: str | None,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    weight: float | None = None,
) -> UserHeader | None:
    """The user's scores, label and cases; None when the user has no events at all.

    With ``weight`` (the saved unsupervised weight) the combined score is recomputed from its
    parts, as Triage does; without it the stored combined score is shown.
    """
    counts = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE (? IS NULL OR ts >= ?) AND (? IS NULL OR ts < ?)),"
        " min(ts) FILTER (WHERE (? IS NULL OR ts >= ?) AND (? IS NULL OR ts < ?)),"
        " max(ts) FILTER (WHERE (? IS NULL OR ts >= ?) AND (? IS NULL OR ts < ?))"
        " FROM events WHERE user_id = ?",
        [start, start, end, end] * 3 + [user_id],
    ).fetchall()[0]
    if not counts[0]:
        return None
    score_row = con.execute(
        "SELECT score, percentile_unsupervised, score_supervised, score_unsupervised,"
        " score_aggregate FROM sequence_scores WHERE user_id = ? AND model_id = ?"
        " AND window_start IS NULL AND window_end IS NULL ORDER BY scored_at DESC LIMIT 1",
        [user_id, model_id],
    ).fetchall()
    score = [_float(v) for v in score_row[0]] if score_row else [None] * 5
    if weight is not None and score[1] is not None:
        sup = np.array([np.nan if score[2] is None else score[2]])
        agg = np.array([np.nan if score[4] is None else score[4]])
        score[0] = float(combine_scores(np.array([score[1]]), sup, weight, aggregate=agg)[0])
    labels = cases.latest_labels(con, [user_id])
    label = labels.iloc[0] if not labels.empty else None
    user_cases = cases.list_cases(con, user_id=user_id)
    still_open = user_cases[~user_cases["status"].isin(cases.CLOSED_STATUSES)]
    status = cases.user_case_status(con, [user_id])
    return UserHeader(
        user_id=user_id,
        n_events=int(counts[1]),
        n_events_total=int(counts[0]),
        first_ts=counts[2],
        last_ts=counts[3],
        score=score[0],
        percentile=score[1],
        score_supervised=score[2],
        score_unsupervised=score[3],
        label=None if label is None else str(label["label"]),
        label_analyst=None if label is None else str(label["analyst"]),
        label_note=None if label is None or pd.isna(label["note"]) else str(label["note"]),
        open_cases=tuple(int(c) for c in still_open["case_id"]),
        case_status=str(status.iloc[0]) if len(status) else None,
        score_aggregate=score[4],
    )


def user_timeline(
    con: duckdb.DuckDBPyConnection,
    user_id: str,
    model_id: str | None,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    load_model: Callable[[], LoadedModel] | None = None,
) -> UserTimeline:
    """The user's events in [start, end) with per-event surprisal under ``model_id``.

    Stored surprisal is used when every event has one; otherwise, given ``load_model`` (called
    only then), the user's full history is scored on demand and written (a short write
    transaction on ``con``).
    """
    events = store.user_events(con, user_id, start, end)
    query = (
        "SELECT s.event_id, any_value(s.surprisal) AS surprisal FROM event_scores s"
        " JOIN events e USING (event_id) WHERE e.user_id = ? AND s.model_id = ?"
        " AND (? IS NULL OR e.ts >= ?) AND (? IS NULL OR e.ts < ?) GROUP BY s.event_id"
    )
    params = [user_id, model_id, start, start, end, end]
    stored = con.execute(query, params).df()
    source: SurprisalSource = "stored"
    if len(stored) < len(events) and load_model is not None and model_id is not None:
        score_users(con, load_model(), [user_id], write=True)
        stored = con.execute(query, params).df()
        source = "on_demand"
    elif stored.empty:
        source = "none"
    merged = events.merge(stored, on="event_id", how="left", validate="one_to_one")
    merged["surprisal"] = merged["surprisal"].astype("float64")
    return UserTimeline(events=merged, source=source)


def _most_frequent(frame: pd.DataFrame, column: str) -> pd.Series:
    """Per session, the most frequent non-null value of ``column`` (ties: first seen)."""
    if column not in frame.columns:
        return pd.Series(dtype=object)
    counts = (
        frame.dropna(subset=[column])
        .groupby(["session_id", column], sort=False)
        .size()
        .rename("n")
        .reset_index()
    )
    top = counts.sort_values("n", ascending=False, kind="stable").drop_duplicates("session_id")
    return top.set_index("session_id")[column].astype(str)


def user_sessions(events: pd.DataFrame) -> pd.DataFrame:
    """One row per session of a timeline frame, most surprising first: session_id, start, end,
    n_events, event_types (distinct, in order of first use), device_id, country (the most
    frequent), max_surprisal. Vectorised: a 50,000-event history has thousands of sessions."""
    columns = ["session_id", "start", "end", "n_events", "event_types", "device_id", "country"]
    if events.empty:
        return pd.DataFrame(columns=[*columns, "max_surprisal"])
    frame = events.assign(
        session_id=events["session_id"].fillna("(none)").astype(str),
        event_type=events["event_type"].astype(str),
        surprisal=events["surprisal"] if "surprisal" in events.columns else np.nan,
    ).sort_values(["ts", "event_id"], kind="stable")
    out = frame.groupby("session_id", sort=False).agg(
        start=("ts", "min"),
        end=("ts", "max"),
        n_events=("event_type", "size"),
        max_surprisal=("surprisal", "max"),
    )
    distinct = frame.drop_duplicates(["session_id", "event_type"])
    out["event_types"] = distinct.groupby("session_id", sort=False)["event_type"].agg(", ".join)
    for column in ("device_id", "country"):
        out[column] = _most_frequent(frame, column).reindex(out.index)
    out = out.reset_index()[[*columns, "max_surprisal"]]
    return out.sort_values(
        ["max_surprisal", "start"], ascending=[False, True], na_position="last"
    ).reset_index(drop=True)


def session_events(events: pd.DataFrame, session_id: str) -> pd.DataFrame:
    """The timeline rows of one session, in time order."""
    ids = events["session_id"].fillna("(none)").astype(str)
    return events[ids == session_id].sort_values(["ts", "event_id"], kind="stable")


def population_transitions(
    con: duckdb.DuckDBPyConnection,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """event_type -> next_event_type within sessions, over all users in [start, end):
    n and prob = P(next | current)."""
    return con.execute(
        "WITH steps AS (SELECT lag(event_type) OVER (PARTITION BY user_id, session_id"
        " ORDER BY ts, event_id) AS event_type, event_type AS next_event_type FROM events"
        " WHERE (? IS NULL OR ts >= ?) AND (? IS NULL OR ts < ?))"
        " SELECT event_type, next_event_type, count(*) AS n,"
        " count(*) / sum(count(*)) OVER (PARTITION BY event_type) AS prob"
        " FROM steps WHERE event_type IS NOT NULL GROUP BY event_type, next_event_type"
        " ORDER BY event_type, n DESC, next_event_type",
        [start, start, end, end],
    ).df()


@dataclass(frozen=True)
class EntityNeighbourhood:
    """Everything the entity graph needs (the arguments of ``graphs.entity_graph``)."""

    user_id: str
    own_entities: pd.DataFrame  # entity_type, entity_value, n_events
    shared: pd.DataFrame  # store.shared_entities
    scores: pd.DataFrame  # user_id, score for the user and the linked users
    labels: pd.DataFrame  # cases.latest_labels of the same users


def user_entities(con: duckdb.DuckDBPyConnection, user_id: str) -> pd.DataFrame:
    """The user's own devices, IPs and cards with their event counts (all time)."""
    parts = [
        # identifiers from the fixed schema.ENTITY_COLUMNS list; the user id is a parameter
        f"SELECT '{col}' AS entity_type, {col} AS entity_value, count(*) AS n_events"  # noqa: S608
        f" FROM events WHERE user_id = ? AND {col} IS NOT NULL GROUP BY ALL"
        for col in schema.ENTITY_COLUMNS
    ]
    sql = " UNION ALL ".join(parts) + " ORDER BY entity_type, n_events DESC, entity_value"
    return con.execute(sql, [user_id] * len(parts)).df()


def entity_neighbourhood(
    con: duckdb.DuckDBPyConnection, user_id: str, model_id: str | None
) -> EntityNeighbourhood:
    shared = store.shared_entities(con, user_id)
    users = [user_id, *dict.fromkeys(shared["other_user_id"].astype(str))]
    scores = con.execute(
        "SELECT user_id, arg_max(score, scored_at) AS score FROM sequence_scores"
        " WHERE model_id = ? AND window_start IS NULL AND window_end IS NULL"
        " AND user_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY user_id",
        [model_id, users],
    ).df()
    return EntityNeighbourhood(
        user_id=user_id,
        own_entities=user_entities(con, user_id),
        shared=shared,
        scores=scores,
        labels=cases.latest_labels(con, users),
    )


@dataclass(frozen=True)
class UserView:
    """One user as Investigate shows them: header, timeline, sessions, linked accounts."""

    header: UserHeader
    timeline: UserTimeline
    sessions: pd.DataFrame
    neighbourhood: EntityNeighbourhood


def user_view(
    con: duckdb.DuckDBPyConnection,
    user_id: str,
    model_id: str | None,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    weight: float | None = None,
    load_model: Callable[[], LoadedModel] | None = None,
) -> UserView | None:
    """Everything Investigate shows about a user; None for a user with no events at all."""
    if not user_exists(con, user_id):
        return None
    # The timeline first: scoring on demand stores the user's score that the header reads.
    timeline = user_timeline(con, user_id, model_id, start, end, load_model=load_model)
    header = user_header(con, user_id, model_id, start, end, weight=weight)
    assert header is not None
    return UserView(
        header=header,
        timeline=timeline,
        sessions=user_sessions(timeline.events),
        neighbourhood=entity_neighbourhood(con, user_id, model_id),
    )


def header_metrics(head: UserHeader) -> list[tuple[str, str, str]]:
    """The header as (label, shown value, help) triples, "—" where there is nothing."""

    def fmt(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    return [
        ("Score", fmt(head.score, ".2f"), "Combined score over the full history, in [0, 1]."),
        ("Percentile", fmt(head.percentile, ".1%"), "Unsupervised score vs the training users."),
        (
            "Supervised",
            fmt(head.score_supervised, ".2f"),
            "Fraud probability from the sequence head (its highest window), Platt-calibrated "
            "on the model's validation users when it was trained.",
        ),
        (
            "Account model",
            fmt(head.score_aggregate, ".2f"),
            "Fraud probability from the user's aggregates (rates, distinct cards and devices, "
            "returns per purchase) by gradient boosting.",
        ),
        ("Events in range", f"{head.n_events:,}", f"{head.n_events_total:,} in all."),
        ("Label", head.label or "—", "The latest analyst label."),
        ("Case", head.case_status or "—", "The most recently updated case."),
    ]


def session_options(sessions: pd.DataFrame) -> dict[str, str]:
    """session_id -> a readable choice ("s12 · 2026-10-07 11:08 · 5 events · max 18.2"), in
    the order of ``sessions``; sessions with at least one transition first."""
    ordered = pd.concat([sessions[sessions["n_events"] > 1], sessions[sessions["n_events"] <= 1]])
    return {
        str(sid): f"{sid} · {start:%Y-%m-%d %H:%M} · {n} event{'s' * (n != 1)} · max {peak:.1f}"
        for sid, start, n, peak in ordered[
            ["session_id", "start", "n_events", "max_surprisal"]
        ].itertuples(index=False)
    }


def describe_timeline(
    meta: dict[str, object] | None, source: SurprisalSource, n_events: int = 0
) -> str:
    """The caption under the timeline: what was drawn and where the scores came from."""
    meta = meta or {}
    if source == "none":
        n = n_events
        return (
            f"{n:,} {'event' if n == 1 else 'events'}, not scored: no model has scored this "
            "user yet (train one on the Data & model page). Shaded bands are sessions."
        )
    text = f"{meta.get('total_points', 0):,} scored events"
    if meta.get("aggregated"):
        text += f"; showing the {meta['shown_points']:,} most surprising plus the per-bin maximum"
    if meta.get("unscored"):
        text += f"; {meta['unscored']:,} without a score"
    text += {"on_demand": " (scored on demand just now)", "none": " (no model scores)"}.get(
        source, ""
    )
    return text + (
        ". Shaded bands are sessions; events above the dashed line are more surprising than"
        " the threshold's share of all events."
    )


def case_choices(con: duckdb.DuckDBPyConnection) -> dict[str, int | None]:
    """The case form's choices, label -> case id: a new case (None), or a case not closed."""
    frame = cases.list_cases(con)
    frame = frame[~frame["status"].isin(cases.CLOSED_STATUSES)]
    return {"New case": None} | {
        f"#{c} {t}": int(c) for c, t in zip(frame["case_id"], frame["title"], strict=True)
    }


def file_in_case(
    con: duckdb.DuckDBPyConnection,
    analyst: str,
    user_id: str,
    case_id: int | None,
    *,
    events: pd.DataFrame | None = None,
    pin_top: int = 10,
    title: str = "",
    note: str = "",
) -> int:
    """Open a case for the user (``case_id`` None) or add them to one, pinning their
    ``pin_top`` most surprising events of ``events``; returns the case id. Audited by
    core.cases."""
    pinned: list[int] = []
    if events is not None and pin_top > 0 and "surprisal" in events.columns:
        pinned = [int(e) for e in events.nlargest(pin_top, "surprisal")["event_id"]]
    if case_id is None:
        return cases.open_case(con, analyst, [user_id], title=title, event_ids=pinned, note=note)
    cases.add_to_case(con, case_id, analyst, [user_id], event_ids=pinned)
    if note.strip():
        cases.add_note(con, case_id, note, analyst)
    return int(case_id)


def event_alert_level(
    con: duckdb.DuckDBPyConnection, model_id: str | None, threshold: float
) -> float | None:
    """The timeline's alert line: the per-event surprisal that a ``threshold`` share of all the
    model's scored events stay below (threshold 0.9 -> the population's 90th percentile).

    A user's score is not on the per-event scale, so the sidebar threshold is read here as
    "flag events rarer than that share of everyone's events"; None without stored scores.
    """
    if model_id is None:
        return None
    row = con.execute(
        "SELECT quantile_cont(surprisal, ?) FROM event_scores WHERE model_id = ?",
        [min(max(float(threshold), 0.0), 1.0), model_id],
    ).fetchall()
    return None if not row or row[0][0] is None else float(row[0][0])


__all__ = [
    "EntityNeighbourhood",
    "case_choices",
    "file_in_case",
    "header_metrics",
    "session_options",
    "UserHeader",
    "UserTimeline",
    "UserView",
    "describe_timeline",
    "entity_neighbourhood",
    "population_transitions",
    "session_events",
    "event_alert_level",
    "top_users",
    "user_entities",
    "user_exists",
    "user_header",
    "user_sessions",
    "user_timeline",
    "user_view",
]
