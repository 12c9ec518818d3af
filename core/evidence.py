"""Everything that answers "why is this user flagged?", gathered into one object.

``explain_user`` attributes the user's score to events and fields (core.explain), runs the
deletion check, and assembles the facts a summary may cite (core.narrate.Facts): the score and
threshold, the top attributed events with their fields, the counterfactual, the devices / IPs /
cards shared with other users and those users' labels, and how the user's statistics compare with
the population's. The Investigate page, the CLI and the benchmark all call it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd

from core import cases, schema, store
from core.behaviour import BehaviourGroup, behaviour_groups
from core.explain import (
    Attribution,
    Counterfactual,
    ExplainSettings,
    counterfactual,
    explain_events,
)
from core.narrate import (
    AccountSignal,
    EventFact,
    Facts,
    GroupFact,
    LinkedEntity,
    PeerStat,
    Summary,
)
from core.scoring import LoadedModel
from core.sequences import add_accounts_before

# The event columns an analyst reads on a top event (fields of EventFact), in this order.
EVENT_FACT_COLUMNS: tuple[str, ...] = (
    "category",
    "item_id",
    "price",
    "device_id",
    "ip",
    "country",
    "payment_id",
    "status",
)
MAX_LINKED_ENTITIES = 6
MAX_LINKED_USERS = 8

# Per-user statistics compared with the population (any event vocabulary): name -> SQL
# aggregate over one user's events. Fixed text, no outside values.
_PEER_STATISTICS: dict[str, str] = {
    "events per active day": "count(*) / count(DISTINCT CAST(ts AS DATE))",
    "distinct devices": "count(DISTINCT device_id)",
    "distinct IPs": "count(DISTINCT ip)",
    "distinct countries": "count(DISTINCT country)",
    "distinct cards": "count(DISTINCT payment_id)",
}

# The event column each distinct-count statistic needs (absent column: statistic skipped).
_STATISTIC_COLUMN: dict[str, str] = {
    "distinct devices": "device_id",
    "distinct IPs": "ip",
    "distinct countries": "country",
    "distinct cards": "payment_id",
}


@dataclass
class Explanation:
    """One user's explanation: what the page draws and what a summary may cite."""

    attribution: Attribution
    counterfactual: Counterfactual
    facts: Facts
    top_events: pd.DataFrame  # the top attributed events joined with their event columns
    timeline_attribution: pd.DataFrame  # event_id, attribution: every explained event
    # The account-level model's top aggregates (core.aggregate_model.top_contributions) over
    # the full history; None when the model has no account-level half.
    account_signals: pd.DataFrame | None = None
    # The kinds of behaviour (event types, sessions) that carry the score (core.behaviour).
    behaviour: tuple[BehaviourGroup, ...] = ()


def at_threshold(explanation: Explanation, threshold: float) -> Explanation:
    """The same explanation read against another alert threshold. Attributions and the
    deletion check do not depend on it (only on the model, the events and the weight): a
    threshold slider must not start a new Captum run, only change what the facts say."""
    if explanation.facts.threshold == float(threshold):
        return explanation
    check = dataclasses.replace(explanation.counterfactual, threshold=float(threshold))
    facts = dataclasses.replace(
        explanation.facts, threshold=float(threshold), counterfactual=check.fact(decimals=4)
    )
    return dataclasses.replace(explanation, counterfactual=check, facts=facts)


def population_statistics(
    con: duckdb.DuckDBPyConnection,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """Median and 95th percentile over users of each peer statistic (one pass over events in
    the range). The page caches it: it is the same for every user of a range."""
    present = _present_statistics(con)
    if not present:
        return pd.DataFrame(columns=["name", "median", "p95"])
    where, params = _range(start, end)
    per_user = ", ".join(f'{_PEER_STATISTICS[n]} AS "{n}"' for n in present)
    aggregates = ", ".join(
        f'median("{n}") AS "{n} median", quantile_cont("{n}", 0.95) AS "{n} p95"' for n in present
    )
    # Statistic names and expressions come from the fixed _PEER_STATISTICS table.
    sql = f"SELECT {aggregates} FROM (SELECT {per_user} FROM events{where} GROUP BY user_id)"  # noqa: S608
    row = con.execute(sql, params).fetchone()
    assert row is not None
    return pd.DataFrame(
        {
            "name": present,
            "median": [row[2 * i] for i in range(len(present))],
            "p95": [row[2 * i + 1] for i in range(len(present))],
        }
    )


def _present_statistics(con: duckdb.DuckDBPyConnection) -> list[str]:
    columns = {d[0] for d in con.execute("SELECT * FROM events LIMIT 0").description}
    return [n for n in _PEER_STATISTICS if _STATISTIC_COLUMN.get(n, "ts") in columns]


def _range(start: datetime | None, end: datetime | None) -> tuple[str, list[object]]:
    clauses, params = [], []
    if start is not None:
        clauses.append("ts >= ?")
        params.append(schema.naive_utc(start))
    if end is not None:
        clauses.append("ts < ?")
        params.append(schema.naive_utc(end))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def user_statistics(events: pd.DataFrame, names: list[str]) -> dict[str, float]:
    """The peer statistics for one user's events (pandas, same definitions as the SQL)."""
    out: dict[str, float] = {}
    days = pd.to_datetime(events["ts"]).dt.date.nunique() if len(events) else 0
    for name in names:
        if name == "events per active day":
            out[name] = len(events) / days if days else 0.0
        else:
            column = _STATISTIC_COLUMN[name]
            out[name] = float(events[column].nunique()) if column in events else 0.0
    return out


def _fmt_value(column: str, value: object) -> str | None:
    if value is None or pd.isna(value):  # type: ignore[arg-type]
        return None
    if column == "price":
        return f"{float(value):.2f}"  # type: ignore[arg-type]
    return str(value)


def _linked_entities(
    con: duckdb.DuckDBPyConnection, user_id: str
) -> tuple[tuple[LinkedEntity, ...], pd.DataFrame]:
    shared = store.shared_entities(con, user_id)
    if shared.empty:
        return (), shared
    others = shared["other_user_id"].astype(str).unique().tolist()
    labels = cases.latest_labels(con, others)
    label_of = dict(zip(labels["user_id"].astype(str), labels["label"].astype(str), strict=True))
    linked = []
    # Entities shared with the most users first: a device used by 12 accounts says more.
    sizes = shared.groupby(["entity_type", "entity_value"], sort=False)["other_user_id"].nunique()
    for (kind, value), _ in sizes.sort_values(ascending=False).head(MAX_LINKED_ENTITIES).items():
        rows = shared[(shared["entity_type"] == kind) & (shared["entity_value"] == value)]
        everyone = rows["other_user_id"].astype(str).drop_duplicates().tolist()
        # Labelled users first (fraud, then unsure, then legit), then the most active: a known
        # fraudster among 30 sharers must not be cut off.
        rank = {"fraud": 0, "unsure": 1, "legit": 2}
        everyone.sort(key=lambda u: rank.get(label_of.get(u, ""), 3))
        users = tuple(everyone[:MAX_LINKED_USERS])
        linked.append(
            LinkedEntity(
                kind=str(kind),
                value=str(value),
                users=users,
                n_users=len(everyone),
                labels={u: label_of[u] for u in users if u in label_of},
            )
        )
    return tuple(linked), shared


def explain_user(
    db: duckdb.DuckDBPyConnection | str | Path,
    loaded: LoadedModel,
    user_id: str,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    threshold: float,
    settings: ExplainSettings | None = None,
    population: pd.DataFrame | None = None,
    top_k: int = 10,
    weight: float | None = None,
    vocabulary: tuple[str, ...] | None = None,
    read_only: bool = False,
) -> Explanation | None:
    """Attributions, deletion check and facts for one user's events in [start, end); None when
    the user has no events there.

    The score in the facts is the one the Investigate header shows (full history, combined
    with the saved unsupervised ``weight``); ``population`` and ``vocabulary`` may be passed
    in when a caller caches them (they are the same for every user of a range).

    ``db``: a connection, used as is; or the database path, opened (``read_only`` or not) only
    for the reads before and after the attributions, so that the file's lock is free while
    Captum runs and an ingest or scoring job elsewhere need not wait for it.
    """
    from core.investigate import user_header

    settings = settings or ExplainSettings()
    with store.using(db, read_only=read_only) as con:
        # Everything before the range too: the model's context (see core.explain), as ranged
        # scoring reads it; the facts and statistics describe the range's events only.
        history = add_accounts_before(con, store.user_events(con, user_id, None, end))
    events = history if start is None else history[history["ts"] >= schema.naive_utc(start)]
    if events.empty:
        return None
    attribution = explain_events(loaded, history, settings, start=start)
    check = counterfactual(loaded, history, attribution, weight=weight, threshold=threshold)
    groups = tuple(behaviour_groups(loaded, history, attribution, weight=weight))

    top = attribution.top_events(top_k)
    detail = history.set_index("event_id")
    top = top.join(detail.drop(columns=["ts"], errors="ignore"), on="event_id")
    event_facts = []
    for row in top.head(5).itertuples(index=False):
        if row.attribution <= 0:  # the deletion search may rank one above a positive one
            continue
        fields = {
            c: v
            for c in EVENT_FACT_COLUMNS
            if c in top.columns and (v := _fmt_value(c, getattr(row, c))) is not None
        }
        event_facts.append(
            EventFact(
                event_id=int(row.event_id),
                ts=pd.Timestamp(row.ts).to_pydatetime(),
                event_type=str(row.event_type),
                weight=float(row.share),
                fields=fields,
                top_field=str(row.top_field),
            )
        )

    with store.using(db, read_only=read_only) as con:
        linked, _ = _linked_entities(con, user_id)
        if population is None:
            population = population_statistics(con, start, end)
        names = population["name"].tolist()
        mine = user_statistics(events, names)
        peers = tuple(
            PeerStat(
                name=str(r.name),
                user_value=round(float(mine[r.name]), 2),
                population_median=round(float(r.median), 2),
                population_p95=round(float(r.p95), 2),
            )
            for r in population.itertuples(index=False)
            if r.median is not None and not pd.isna(r.median)
        )
        account_probability, signals = None, None
        if loaded.aggregate is not None:  # full history, as the header's probability
            features = loaded.aggregate.features(con, [user_id])
            account_probability = float(loaded.aggregate.predict_features(features)[0])
            signals = loaded.aggregate.top_contributions(features, k=5)
        header = user_header(con, user_id, loaded.model_id, start, end, weight=weight)
        # The header's score when the user has been scored, else the explained window's own.
        score = check.score_before if header is None or header.score is None else header.score
        percentile = None if header is None else header.percentile
        if vocabulary is None:
            vocabulary = event_vocabulary(con)
    stamps = pd.to_datetime(events["ts"])
    facts = Facts(
        first_ts=stamps.min().to_pydatetime(),
        last_ts=stamps.max().to_pydatetime(),
        user_id=str(user_id),
        model_id=loaded.model_id,
        start=start,
        end=end,
        n_events=len(events),
        score=round(score, 4),
        percentile=None if percentile is None else round(percentile, 4),
        threshold=float(threshold),
        top_events=tuple(event_facts),
        counterfactual=check.fact(decimals=4),
        linked=linked,
        peer_stats=peers,
        vocabulary=vocabulary,
        account_probability=None if account_probability is None else round(account_probability, 4),
        behaviour=tuple(
            GroupFact(
                kind=g.kind,
                key=g.key,
                n_events=g.n_events,
                share=round(g.share, 4),
                first_ts=g.first_ts,
                last_ts=g.last_ts,
                score_without=None if math.isnan(g.score_without) else round(g.score_without, 4),
            )
            for g in groups
        ),
        account_signals=()
        if signals is None
        else tuple(
            AccountSignal(
                label=str(r.label),
                value=round(float(r.value), 4),
                median=None if pd.isna(r.median) else round(float(r.median), 4),
                event_type=None if r.event_type is None else str(r.event_type),
            )
            for r in signals.itertuples(index=False)
        ),
    )
    explained = attribution.in_range
    timeline = pd.DataFrame(
        {
            "event_id": attribution.event_ids[explained],
            "attribution": attribution.per_event[explained],
        }
    )
    return Explanation(
        attribution=attribution,
        counterfactual=check,
        facts=facts,
        top_events=top,
        timeline_attribution=timeline,
        account_signals=signals,
        behaviour=groups,
    )


def event_vocabulary(con: duckdb.DuckDBPyConnection) -> tuple[str, ...]:
    """Every event type in the store (the grounding check's list of what could be cited)."""
    rows = con.execute("SELECT DISTINCT event_type FROM events ORDER BY 1").fetchall()
    return tuple(str(r[0]) for r in rows)


def describe_top_events(explanation: Explanation, k: int = 5) -> str:
    """The top attributed events as one line for a CSV cell:
    "2024-03-05 14:22 login (new device, 31%); …"."""
    parts = []
    for row in explanation.top_events.head(k).itertuples(index=False):
        if row.attribution <= 0:  # as the facts do: the search may rank one above a positive one
            continue
        when = pd.Timestamp(row.ts).strftime("%Y-%m-%d %H:%M")
        parts.append(f"{when} {row.event_type} ({row.top_field}, {row.share:.0%})")
    return "; ".join(parts)


def save_explanation(
    con: duckdb.DuckDBPyConnection,
    explanation: Explanation,
    summary: Summary | None = None,
) -> None:
    """Keep what the analyst was shown (one row per explanation; exports read the newest)."""
    facts = explanation.facts
    text = backend = grounded = None
    if summary is not None:
        # A flagged text is never kept as the explanation: the template that stood beside it is.
        flagged = summary.flagged and summary.fallback_text is not None
        text = summary.fallback_text if flagged else summary.text
        backend = f"template ({summary.backend} flagged)" if flagged else summary.backend
        grounded = not summary.flagged or flagged
    con.execute(
        "INSERT INTO explanations (model_id, user_id, window_start, window_end, created_at,"
        " top_events, counterfactual, summary, summary_backend, grounded, settings)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            facts.model_id,
            facts.user_id,
            facts.start,
            facts.end,
            datetime.now(UTC).replace(tzinfo=None),
            describe_top_events(explanation),
            explanation.counterfactual.sentence(),
            text,
            backend,
            grounded,
            json.dumps(explanation.attribution.method_settings(), default=str),
        ],
    )
