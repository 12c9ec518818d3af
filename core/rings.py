"""Shared devices, IPs and cards: groups of accounts behind one entity in a time range.

Multi-accounting (coupon and referral rings, promotion abuse, mule networks) hides from a
model that reads one user's sequence at a time: each account alone looks like a short, normal
visit. What gives it away is the link between accounts, so Triage lists the entities that many
active users share, with what is known about those users (their scores, alerts and labels) and
how close together the accounts first appeared: accounts opened within hours of each other
on one device are a ring until shown otherwise, a café's IP used by 40 regulars over a month is
not. The ranking stays plain (users sharing, then alerts) and every column is sortable: an
analyst can see why a row is where it is.
"""

from __future__ import annotations

from datetime import datetime

import duckdb
import numpy as np
import pandas as pd

from core import cases, schema

# The name an analyst reads for each entity column.
ENTITY_LABELS: dict[str, str] = {"device_id": "device", "ip": "IP", "payment_id": "card"}
# Which entities come first: a device or a card is personal, so a few accounts on one is
# already a lead; an IP is shared by every household, office and mobile carrier behind it.
ENTITY_ORDER: tuple[str, ...] = ("device", "card", "IP")
MIN_SHARED_USERS = 2
# The user ids a row lists (highest score first); a NAT address may have thousands.
SHOWN_USERS = 50
# Accounts whose first stored events fall within this window count as opened together.
TOGETHER_HOURS = 24.0

COLUMNS = [
    "entity",
    "value",
    "users",
    "alerts",
    "labelled_fraud",
    "max_score",
    "top_user",
    "opened_together",
    "first_seen",
    "last_seen",
    "user_ids",
]


def shared_entities_in_range(
    con: duckdb.DuckDBPyConnection,
    start: datetime | None,
    end: datetime | None,
    scores: pd.DataFrame,
    threshold: float,
    *,
    min_users: int = MIN_SHARED_USERS,
    limit: int = 200,
) -> pd.DataFrame:
    """Devices, cards and IPs used by at least ``min_users`` users in [start, end), at most
    ``limit`` of each kind (those with the most users).

    ``scores``: the range's active users with their combined ``score`` (alerts.active_scores).
    One row per entity (COLUMNS): how many users share it, how many of them alert at
    ``threshold``, how many an analyst labelled fraud, the highest score and its user, how
    many of the accounts were first seen within TOGETHER_HOURS of each other
    (``opened_together``), when the entity was first and last seen in the range, and the user
    ids (highest score first). Devices first, then cards, then IPs (ENTITY_ORDER); within
    each, by accounts opened together, then alerts, then users.
    """
    if min_users < 2:
        raise ValueError("a shared entity has at least 2 users")
    parts = []
    for column in schema.ENTITY_COLUMNS:  # identifiers from the fixed schema list
        parts.append(
            f"SELECT '{column}' AS entity, {column} AS value, user_id, ts FROM events"  # noqa: S608
            f" WHERE {column} IS NOT NULL AND (?::TIMESTAMP IS NULL OR ts >= ?)"
            " AND (?::TIMESTAMP IS NULL OR ts < ?)"
        )
    sql = (
        "SELECT entity, value, count(DISTINCT user_id) AS users, min(ts) AS first_seen,"  # noqa: S608
        " max(ts) AS last_seen, list(DISTINCT user_id) AS user_ids"
        f" FROM ({' UNION ALL '.join(parts)}) GROUP BY entity, value"
        " HAVING count(DISTINCT user_id) >= ?"
    )
    params: list[object] = []
    for _ in schema.ENTITY_COLUMNS:
        params += [start, start, end, end]
    # Every shared entity is ranked before the limit applies: cutting by users first hid a
    # two-account ring behind hundreds of three-person households.
    groups = con.execute(sql, [*params, int(min_users)]).df()
    if groups.empty:
        return pd.DataFrame(columns=COLUMNS)

    members = sorted({str(u) for ids in groups["user_ids"] for u in ids})
    born = dict(
        con.execute(
            "SELECT user_id, min(ts) FROM events WHERE list_contains(?::VARCHAR[], user_id)"
            " GROUP BY user_id",
            [members],
        ).fetchall()
    )
    # A user whose first stored event is in the log's first day may be much older than the log
    # (its start cuts every history): such first sightings say nothing about when the account
    # was opened, and all of them fall together.
    log_start = con.execute("SELECT min(ts) FROM events").fetchone()[0]  # type: ignore[index]
    censored_until = log_start + pd.Timedelta(hours=TOGETHER_HOURS)
    labels = cases.latest_labels(con, members)
    fraud = set(labels.loc[labels["label"] == "fraud", "user_id"].astype(str))
    score_of = dict(zip(scores["user_id"].astype(str), scores["score"].astype(float), strict=True))

    rows = []
    for group in groups.itertuples(index=False):
        ids = [str(u) for u in group.user_ids]
        user_scores = np.array([score_of.get(u, np.nan) for u in ids], dtype=float)
        order = np.argsort(-np.nan_to_num(user_scores, nan=-1.0), kind="stable")
        ids = [ids[i] for i in order]
        user_scores = user_scores[order]
        opened = [born[u] for u in ids if u in born and born[u] >= censored_until]
        known = ~np.isnan(user_scores)
        rows.append(
            {
                "entity": ENTITY_LABELS[group.entity],
                "value": str(group.value),
                "users": int(group.users),
                "alerts": int((user_scores[known] >= threshold).sum()),
                "labelled_fraud": sum(u in fraud for u in ids),
                "max_score": float(user_scores[known].max()) if known.any() else np.nan,
                "top_user": ids[0],
                "opened_together": opened_together(opened, TOGETHER_HOURS),
                "first_seen": group.first_seen,
                "last_seen": group.last_seen,
                "user_ids": ", ".join(ids[:SHOWN_USERS])
                + (f", … ({len(ids) - SHOWN_USERS:,} more)" if len(ids) > SHOWN_USERS else ""),
            }
        )
    out = pd.DataFrame(rows, columns=COLUMNS)
    kind = out["entity"].map({e: i for i, e in enumerate(ENTITY_ORDER)})
    out = out.assign(_kind=kind).sort_values(
        ["_kind", "opened_together", "alerts", "users", "value"],
        ascending=[True, False, False, False, True],
        ignore_index=True,
    )
    top = out.groupby("_kind", sort=True).head(int(limit))
    return top.drop(columns="_kind").reset_index(drop=True)


def opened_together(first_seen: list[datetime], hours: float) -> int:
    """The most accounts whose first sightings fit in one window of ``hours`` (0 or 1 when
    nothing is shared in time). A two-pointer sweep over the sorted times."""
    times = sorted(first_seen)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while (t - times[lo]).total_seconds() > hours * 3600:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
