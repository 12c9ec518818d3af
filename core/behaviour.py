"""Which kind of behaviour carries the score: the explained events grouped by event type and by
session, each group's share of the attribution, and the score once the group is removed.

Why: when a scripted burst carries the score (a scraper's 80 views, a brusher's 40 purchases),
no five events move it, and the top-events list cannot say what does. The same attributions
summed over what an analyst acts on (a kind of event, one session) can: "without its 54 view
events the score falls from 0.99 to 0.10". Each group is removed whole from the explained
window and the window rescored (one batched pass for all groups), like the deletion check.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from core.explain import Attribution, window_scores
from core.scoring import LoadedModel

GroupKind = Literal["event type", "session"]
GROUP_COLUMNS: dict[GroupKind, str] = {"event type": "event_type", "session": "session_id"}


@dataclass(frozen=True)
class BehaviourGroup:
    kind: GroupKind
    key: str  # the event type, or the session id
    n_events: int  # the group's events in the explained window
    share: float  # of the positive attribution of the range's events in the window
    first_ts: datetime
    last_ts: datetime
    # The displayed score and the attribution target (own scale) with the group removed; NaN
    # when the group is every explained event (nothing would be left to score).
    score_without: float
    target_without: float


def behaviour_groups(
    loaded: LoadedModel,
    events: pd.DataFrame | pa.Table,
    attribution: Attribution,
    *,
    weight: float | None = None,
    top: int = 3,
) -> list[BehaviourGroup]:
    """The ``top`` groups of each kind with the largest positive attribution, largest share
    first (the order the facts, the page and the CLI list them in). ``events``: what the
    attribution was computed on (every column, as ``store.user_events`` gives them, so the
    account-level model rescores too)."""
    frame = events.to_pandas() if isinstance(events, pa.Table) else events
    by_id = frame.set_index("event_id")
    inside = attribution.in_range
    per_event = attribution.per_event
    explained = per_event[inside]
    positive = float(explained[explained > 0].sum())
    if positive <= 0:
        return []
    positions = np.arange(attribution.event_ids.size)
    found: list[tuple[GroupKind, str, np.ndarray, float]] = []
    for kind, column in GROUP_COLUMNS.items():
        if column not in by_id.columns:
            continue
        keys = by_id[column].reindex(attribution.event_ids).to_numpy(dtype=object)
        table = pd.DataFrame({"key": keys, "weight": per_event, "position": positions})[inside]
        table = table[table["key"].notna()]
        if table.empty:
            continue
        sums = table.groupby("key", sort=False)["weight"].sum()
        for key, weight_sum in sums[sums > 0].nlargest(top).items():
            members = table.loc[table["key"] == key, "position"].to_numpy()
            found.append((kind, str(key), members, float(weight_sum) / positive))
    if not found:
        return []
    found.sort(key=lambda group: -group[3])

    every = np.flatnonzero(inside)
    removable = [i for i, (_, _, members, _) in enumerate(found) if members.size < every.size]
    keep = [np.setdiff1d(positions, found[i][2]) for i in removable]
    shown = np.full(len(found), np.nan)
    own = np.full(len(found), np.nan)
    if keep:
        s, o = window_scores(loaded, events, attribution, keep, weight=weight)
        shown[removable], own[removable] = s, o
    ts = pd.to_datetime(attribution.ts)
    return [
        BehaviourGroup(
            kind=kind,
            key=key,
            n_events=int(members.size),
            share=share,
            first_ts=ts[members].min().to_pydatetime(),
            last_ts=ts[members].max().to_pydatetime(),
            score_without=float(shown[i]),
            target_without=float(own[i]),
        )
        for i, (kind, key, members, share) in enumerate(found)
    ]


def groups_frame(groups: list[BehaviourGroup]) -> pd.DataFrame:
    """One row per group, for tables and the case export."""
    columns = list(BehaviourGroup.__dataclass_fields__)
    return pd.DataFrame([g.__dict__ for g in groups], columns=columns)
