"""Analyst decisions: labels, cases, notes, the audit trail, and CSV exports of cases.

Every write is one short transaction on a connection the caller opened for this unit of work
(``with store.open_db(path) as con: ...``): the change and its ``audit_log`` row commit together
or not at all, so a crash mid-write leaves the database as it was. Every value is a bound
parameter; the only SQL text spliced in comes from fixed tuples in this module.

A user's label is their latest one (an analyst may correct a decision; the history is kept).
A case moves through ``CASE_TRANSITIONS``; each move is kept in ``case_status_history``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from core import schema
from core.export import neutralise_frame, write_csv

LABELS: tuple[str, ...] = ("fraud", "legit", "unsure")
CASE_STATUSES: tuple[str, ...] = ("open", "investigating", "closed-fraud", "closed-legit")
CLOSED_STATUSES: frozenset[str] = frozenset({"closed-fraud", "closed-legit"})
# A closed case can be reopened for investigation; an open one can be closed straight away.
CASE_TRANSITIONS: dict[str, frozenset[str]] = {
    "open": frozenset({"investigating", "closed-fraud", "closed-legit"}),
    "investigating": frozenset({"open", "closed-fraud", "closed-legit"}),
    "closed-fraud": frozenset({"investigating"}),
    "closed-legit": frozenset({"investigating"}),
}
# How many of a user's most surprising events the "top reasons" text summarises.
REASON_EVENTS = 20

EXPORT_COLUMNS: tuple[str, ...] = (
    "case_id",
    "title",
    "status",
    "assignee",
    "created_by",
    "created_at",
    "updated_at",
    "user_id",
    "label",
    "label_analyst",
    "label_note",
    "score",
    "percentile_unsupervised",
    "score_supervised",
    "model_id",
    "unsupervised_weight",
    "threshold",
    "alert",
    "top_reasons",
    "top_attributed_events",
    "counterfactual",
    "summary",
    "summary_backend",
    "summary_grounded",
    "notes",
    "exported_by",
    "exported_at",
)


class CaseError(ValueError):
    """A request that cannot be carried out (unknown case, bad status move); str(e) is fit for
    a page or the CLI."""


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT, or ROLLBACK on any exception (including KeyboardInterrupt)."""
    con.begin()
    try:
        yield con
        con.commit()
    except BaseException:
        con.rollback()
        raise


def record_audit(
    con: duckdb.DuckDBPyConnection,
    analyst: str,
    action: str,
    target: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """One audit row. Callers write it inside the transaction of the change it records."""
    con.execute(
        'INSERT INTO audit_log (analyst, "at", action, target, detail) VALUES (?, ?, ?, ?, ?)',
        [_analyst(analyst), _now(), action, target, json.dumps(detail or {}, default=str)],
    )


def audit_trail(
    con: duckdb.DuckDBPyConnection, *, target: str | None = None, limit: int = 500
) -> pd.DataFrame:
    """Audit rows, newest first (optionally for one target such as ``case:3`` or ``user:u1``)."""
    return con.execute(
        'SELECT analyst, "at", action, target, detail FROM audit_log'
        ' WHERE (? IS NULL OR target = ?) ORDER BY "at" DESC, rowid DESC LIMIT ?',
        [target, target, int(limit)],
    ).df()


def audit_count(con: duckdb.DuckDBPyConnection) -> int:
    """Number of audit rows: grows with every analyst action, so pages use it as a cache key
    that changes whenever labels or cases change."""
    row = con.execute("SELECT count(*) FROM audit_log").fetchall()
    return int(row[0][0])


def _analyst(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise CaseError("an analyst name is required")
    return name


def _clean_users(users: Sequence[str] | str) -> list[str]:
    if isinstance(users, str):
        users = [users]
    out = list(dict.fromkeys(str(u).strip() for u in users if str(u).strip()))
    return out


def _check_users_exist(con: duckdb.DuckDBPyConnection, users: list[str]) -> None:
    found = {
        r[0]
        for r in con.execute(
            "SELECT DISTINCT user_id FROM events WHERE user_id IN (SELECT unnest(?::VARCHAR[]))",
            [users],
        ).fetchall()
    }
    missing = [u for u in users if u not in found]
    if missing:
        raise CaseError(f"unknown user(s): {', '.join(missing[:5])}")


# ---------------------------------------------------------------------------------------------
# Labels


def add_label(
    con: duckdb.DuckDBPyConnection, user_id: str, label: str, analyst: str, note: str = ""
) -> None:
    """Label a user fraud / legit / unsure (a later label supersedes an earlier one)."""
    if label not in LABELS:
        raise CaseError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    user = str(user_id).strip()
    who = _analyst(analyst)
    with transaction(con):
        _check_users_exist(con, [user])
        con.execute(
            "INSERT INTO labels (user_id, label, analyst, created_at, note) VALUES (?, ?, ?, ?, ?)",
            [user, label, who, _now(), note or ""],
        )
        record_audit(con, who, "label", f"user:{user}", {"label": label, "note": note or ""})


# How label files from elsewhere (chargeback lists, "is_fraud" columns) write the three labels.
_LABEL_SPELLINGS: dict[str, str] = {
    **{w: "fraud" for w in ("fraud", "fraudulent", "1", "true", "yes", "y", "bad", "chargeback")},
    **{w: "legit" for w in ("legit", "legitimate", "genuine", "0", "false", "no", "n", "good")},
    **{w: "unsure" for w in ("unsure", "unknown", "maybe", "?")},
}


@dataclass(frozen=True)
class LabelImport:
    """What a label file did: labels written, and each rejected row with its reason."""

    added: int
    rejected: pd.DataFrame  # row (1-based, header excluded), user_id, label, reason


def import_labels(
    con: duckdb.DuckDBPyConnection,
    frame: pd.DataFrame,
    analyst: str,
    *,
    source: str,
    user_column: str = "user_id",
    label_column: str = "label",
    note_column: str | None = "note",
) -> LabelImport:
    """Labels from a file (known fraud, chargebacks, cleared accounts) in one transaction and
    one audit row. Labels read fraud / legit / unsure, or 1/0, true/false, yes/no. Rows with
    an unknown user, an empty user or an unreadable label are rejected with their reason and
    written nowhere; the rest are written (a later label supersedes an earlier one)."""
    for column in (user_column, label_column):
        if column not in frame.columns:
            raise CaseError(
                f"{source}: no column {column!r}; found {', '.join(map(str, frame.columns))}"
            )
    who = _analyst(analyst)
    rows = pd.DataFrame(
        {
            "row": np.arange(1, len(frame) + 1),
            "user_id": frame[user_column].astype("string").str.strip().fillna(""),
            "given": frame[label_column].astype("string").str.strip().fillna(""),
            "note": (
                frame[note_column].astype("string").fillna("")
                if note_column and note_column in frame.columns
                else ""
            ),
        }
    )
    rows["label"] = rows["given"].str.lower().map(_LABEL_SPELLINGS)
    with transaction(con):
        known = {
            r[0]
            for r in con.execute(
                "SELECT DISTINCT user_id FROM events WHERE user_id IN"
                " (SELECT unnest(?::VARCHAR[]))",
                [rows["user_id"].tolist()],
            ).fetchall()
        }
        reason = np.select(
            [rows["user_id"] == "", rows["label"].isna(), ~rows["user_id"].isin(known)],
            [
                "empty user_id",
                "label not fraud / legit / unsure (nor 1/0, true/false, yes/no)",
                "no such user in the events",
            ],
            default="",
        )
        good = rows.loc[reason == ""]
        if len(good):
            now = _now()
            con.execute(
                "INSERT INTO labels (user_id, label, analyst, created_at, note) SELECT"
                " unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), ?, ?, unnest(?::VARCHAR[])",
                [good["user_id"].tolist(), good["label"].tolist(), who, now, good["note"].tolist()],
            )
        rejected = rows.loc[reason != "", ["row", "user_id", "given"]].rename(
            columns={"given": "label"}
        )
        rejected["reason"] = reason[reason != ""]
        counts = good["label"].value_counts().to_dict() if len(good) else {}
        record_audit(
            con,
            who,
            "label_import",
            f"file:{source}",
            {"rows": len(rows), "added": len(good), "rejected": len(rejected), "labels": counts},
        )
    return LabelImport(added=len(good), rejected=rejected.reset_index(drop=True))


def latest_labels(
    con: duckdb.DuckDBPyConnection, users: Sequence[str] | None = None
) -> pd.DataFrame:
    """Each user's current label: user_id, label, analyst, created_at, note."""
    return con.execute(
        "SELECT user_id, arg_max(label, created_at) AS label, arg_max(analyst, created_at)"
        " AS analyst, max(created_at) AS created_at, arg_max(note, created_at) AS note"
        " FROM labels WHERE (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], user_id))"
        " GROUP BY user_id ORDER BY user_id",
        [_list_or_none(users), _list_or_none(users)],
    ).df()


def label_history(con: duckdb.DuckDBPyConnection, user_id: str) -> pd.DataFrame:
    """Every label given to the user, newest first."""
    return con.execute(
        "SELECT label, analyst, created_at, note FROM labels WHERE user_id = ?"
        " ORDER BY created_at DESC, rowid DESC",
        [str(user_id)],
    ).df()


def _list_or_none(users: Sequence[str] | None) -> list[str] | None:
    return None if users is None else [str(u) for u in users]


# ---------------------------------------------------------------------------------------------
# Cases


def next_case_id(con: duckdb.DuckDBPyConnection) -> int:
    """A case id no other session can get, even one whose transaction runs at the same time.

    Numbers come from the case_id_seq sequence (not transactional: never handed out twice);
    numbers already used by cases opened before the sequence existed are skipped.
    """
    while True:
        case_id = int(con.execute("SELECT nextval('case_id_seq')").fetchall()[0][0])
        taken = con.execute("SELECT count(*) FROM cases WHERE case_id = ?", [case_id]).fetchall()
        if not taken[0][0]:
            return case_id


def open_case(
    con: duckdb.DuckDBPyConnection,
    analyst: str,
    users: Sequence[str] | str,
    *,
    title: str = "",
    event_ids: Sequence[int] = (),
    assignee: str | None = None,
    note: str = "",
) -> int:
    """Open a case for one or more users (optionally pinning events); returns its id."""
    who = _analyst(analyst)
    members = _clean_users(users)
    if not members:
        raise CaseError("a case needs at least one user")
    now = _now()
    with transaction(con):
        _check_users_exist(con, members)
        case_id = next_case_id(con)
        title = title.strip() or f"Case {case_id}: {', '.join(members[:3])}"
        con.execute(
            "INSERT INTO cases (case_id, title, status, assignee, created_by, created_at,"
            " updated_at) VALUES (?, ?, 'open', ?, ?, ?, ?)",
            [case_id, title, (assignee or who).strip() or who, who, now, now],
        )
        con.execute("INSERT INTO case_users SELECT ?, unnest(?::VARCHAR[])", [case_id, members])
        events = _insert_events(con, case_id, event_ids)
        con.execute("INSERT INTO case_status_history VALUES (?, 'open', ?, ?)", [case_id, who, now])
        if note.strip():
            con.execute("INSERT INTO case_notes VALUES (?, ?, ?, ?)", [case_id, who, now, note])
        record_audit(
            con,
            who,
            "case_open",
            f"case:{case_id}",
            {"title": title, "users": members, "events": events, "note": note},
        )
    return case_id


def _insert_events(
    con: duckdb.DuckDBPyConnection, case_id: int, event_ids: Sequence[int]
) -> list[int]:
    """Pin events not yet in the case; only events of the case's users are accepted."""
    ids = sorted({int(e) for e in event_ids})
    if not ids:
        return []
    rows = con.execute(
        "SELECT e.event_id FROM events e WHERE e.event_id IN (SELECT unnest(?::BIGINT[]))"
        " AND e.user_id IN (SELECT user_id FROM case_users WHERE case_id = ?)"
        " AND e.event_id NOT IN (SELECT event_id FROM case_events WHERE case_id = ?)",
        [ids, case_id, case_id],
    ).fetchall()
    accepted = sorted(int(r[0]) for r in rows)
    rejected = sorted(set(ids) - set(accepted))
    if rejected:
        known = con.execute(
            "SELECT event_id FROM case_events WHERE case_id = ?"
            " AND event_id IN (SELECT unnest(?::BIGINT[]))",
            [case_id, rejected],
        ).fetchall()
        strange = sorted(set(rejected) - {int(r[0]) for r in known})
        if strange:
            raise CaseError(
                f"event(s) {', '.join(map(str, strange[:5]))} do not belong to the case's users"
            )
    if accepted:
        con.execute("INSERT INTO case_events SELECT ?, unnest(?::BIGINT[])", [case_id, accepted])
    return accepted


def _case_status(con: duckdb.DuckDBPyConnection, case_id: int) -> str:
    row = con.execute("SELECT status FROM cases WHERE case_id = ?", [int(case_id)]).fetchall()
    if not row:
        raise CaseError(f"no case {case_id}")
    return str(row[0][0])


def _touch(con: duckdb.DuckDBPyConnection, case_id: int, now: datetime) -> None:
    con.execute("UPDATE cases SET updated_at = ? WHERE case_id = ?", [now, int(case_id)])


def add_to_case(
    con: duckdb.DuckDBPyConnection,
    case_id: int,
    analyst: str,
    users: Sequence[str] | str = (),
    *,
    event_ids: Sequence[int] = (),
) -> tuple[list[str], list[int]]:
    """Add users (and/or events of the case's users) to a case; returns what was new."""
    who = _analyst(analyst)
    members = _clean_users(users)
    with transaction(con):
        _case_status(con, case_id)
        if members:
            _check_users_exist(con, members)
        rows = con.execute(
            "SELECT unnest(?::VARCHAR[]) AS u EXCEPT SELECT user_id FROM case_users"
            " WHERE case_id = ?",
            [members, int(case_id)],
        ).fetchall()
        new_users = [u for u in members if u in {r[0] for r in rows}]
        if new_users:
            con.execute(
                "INSERT INTO case_users SELECT ?, unnest(?::VARCHAR[])", [int(case_id), new_users]
            )
        events = _insert_events(con, case_id, event_ids)
        if not new_users and not events:
            return [], []
        _touch(con, case_id, _now())
        record_audit(
            con, who, "case_add", f"case:{case_id}", {"users": new_users, "events": events}
        )
    return new_users, events


def set_case_status(
    con: duckdb.DuckDBPyConnection, case_id: int, status: str, analyst: str
) -> None:
    """Move a case to ``status`` along CASE_TRANSITIONS, keeping the history."""
    who = _analyst(analyst)
    if status not in CASE_STATUSES:
        raise CaseError(f"status must be one of {', '.join(CASE_STATUSES)}, got {status!r}")
    now = _now()
    with transaction(con):
        current = _case_status(con, case_id)
        if status == current:
            return
        if status not in CASE_TRANSITIONS[current]:
            allowed = ", ".join(sorted(CASE_TRANSITIONS[current]))
            raise CaseError(f"case {case_id} is {current}: it can move to {allowed}")
        con.execute(
            "UPDATE cases SET status = ?, updated_at = ? WHERE case_id = ?",
            [status, now, int(case_id)],
        )
        con.execute(
            "INSERT INTO case_status_history VALUES (?, ?, ?, ?)", [int(case_id), status, who, now]
        )
        record_audit(con, who, "case_status", f"case:{case_id}", {"from": current, "to": status})


def assign_case(con: duckdb.DuckDBPyConnection, case_id: int, assignee: str, analyst: str) -> None:
    who = _analyst(analyst)
    assignee = (assignee or "").strip()
    if not assignee:
        raise CaseError("an assignee name is required")
    with transaction(con):
        _case_status(con, case_id)
        row = con.execute("SELECT assignee FROM cases WHERE case_id = ?", [int(case_id)]).fetchall()
        before = row[0][0]
        if before == assignee:
            return
        con.execute(
            "UPDATE cases SET assignee = ?, updated_at = ? WHERE case_id = ?",
            [assignee, _now(), int(case_id)],
        )
        record_audit(con, who, "case_assign", f"case:{case_id}", {"from": before, "to": assignee})


def add_note(con: duckdb.DuckDBPyConnection, case_id: int, note: str, analyst: str) -> None:
    who = _analyst(analyst)
    if not (note or "").strip():
        raise CaseError("the note is empty")
    now = _now()
    with transaction(con):
        _case_status(con, case_id)
        con.execute("INSERT INTO case_notes VALUES (?, ?, ?, ?)", [int(case_id), who, now, note])
        _touch(con, case_id, now)
        record_audit(con, who, "case_note", f"case:{case_id}", {"note": note})


def list_cases(
    con: duckdb.DuckDBPyConnection,
    *,
    statuses: Sequence[str] | None = None,
    assignee: str | None = None,
    user_id: str | None = None,
) -> pd.DataFrame:
    """Cases, most recently updated first, with their users joined as text."""
    return con.execute(
        "SELECT c.case_id, c.title, c.status, c.assignee, c.created_by, c.created_at,"
        " c.updated_at, count(u.user_id) AS n_users,"
        " string_agg(u.user_id, ', ' ORDER BY u.user_id) AS users"
        " FROM cases c LEFT JOIN case_users u USING (case_id)"
        " WHERE (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], c.status))"
        " AND (? IS NULL OR c.assignee = ?)"
        " AND (? IS NULL OR c.case_id IN (SELECT case_id FROM case_users WHERE user_id = ?))"
        " GROUP BY ALL ORDER BY c.updated_at DESC, c.case_id DESC",
        [
            _list_or_none(statuses),
            _list_or_none(statuses),
            assignee,
            assignee,
            user_id,
            user_id,
        ],
    ).df()


def assignees(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(
        "SELECT DISTINCT assignee FROM cases WHERE assignee IS NOT NULL ORDER BY 1"
    ).fetchall()
    return [str(r[0]) for r in rows]


@dataclass
class CaseDetail:
    case_id: int
    title: str
    status: str
    assignee: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    users: pd.DataFrame  # user_id, label, label_analyst, label_at, n_pinned_events
    events: pd.DataFrame  # pinned events: event_id, ts, user_id, event_type
    notes: pd.DataFrame  # analyst, created_at, note (oldest first)
    history: pd.DataFrame  # status, analyst, changed_at (oldest first)

    @property
    def closed(self) -> bool:
        return self.status in CLOSED_STATUSES

    @property
    def next_statuses(self) -> list[str]:
        return [s for s in CASE_STATUSES if s in CASE_TRANSITIONS[self.status]]


def case_detail(con: duckdb.DuckDBPyConnection, case_id: int) -> CaseDetail:
    """Everything about one case; raises CaseError for an unknown id."""
    rows = con.execute(
        "SELECT case_id, title, status, assignee, created_by, created_at, updated_at"
        " FROM cases WHERE case_id = ?",
        [int(case_id)],
    ).fetchall()
    if not rows:
        raise CaseError(f"no case {case_id}")
    cid, title, status, assignee, created_by, created_at, updated_at = rows[0]
    users = con.execute(
        "WITH l AS (SELECT user_id, arg_max(label, created_at) AS label,"
        " arg_max(analyst, created_at) AS label_analyst, max(created_at) AS label_at"
        " FROM labels GROUP BY user_id),"
        " p AS (SELECT e.user_id, count(*) AS n_pinned_events FROM case_events ce"
        " JOIN events e USING (event_id) WHERE ce.case_id = ? GROUP BY e.user_id)"
        " SELECT cu.user_id, l.label, l.label_analyst, l.label_at,"
        " coalesce(p.n_pinned_events, 0) AS n_pinned_events"
        " FROM case_users cu LEFT JOIN l USING (user_id) LEFT JOIN p USING (user_id)"
        " WHERE cu.case_id = ? ORDER BY cu.rowid",
        [int(case_id), int(case_id)],
    ).df()
    events = con.execute(
        "SELECT e.event_id, e.ts, e.user_id, e.event_type FROM case_events ce"
        " JOIN events e USING (event_id) WHERE ce.case_id = ? ORDER BY e.ts, e.event_id",
        [int(case_id)],
    ).df()
    notes = con.execute(
        "SELECT analyst, created_at, note FROM case_notes WHERE case_id = ?"
        " ORDER BY created_at, rowid",
        [int(case_id)],
    ).df()
    history = con.execute(
        "SELECT status, analyst, changed_at FROM case_status_history WHERE case_id = ?"
        " ORDER BY changed_at, rowid",
        [int(case_id)],
    ).df()
    return CaseDetail(
        case_id=int(cid),
        title=str(title),
        status=str(status),
        assignee=assignee,
        created_by=str(created_by),
        created_at=created_at,
        updated_at=updated_at,
        users=users,
        events=events,
        notes=notes,
        history=history,
    )


# ---------------------------------------------------------------------------------------------
# Reasons and exports


def top_reasons(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    users: Sequence[str],
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    top_events: int = REASON_EVENTS,
    max_reasons: int = 3,
) -> pd.Series:
    """A short text per user from their most surprising events in [start, end).

    Of the user's ``top_events`` highest-surprisal events, the event types are ranked by how
    many of those events they account for (then by peak surprisal); each becomes
    ``"<type> ×<count> at <time of its most surprising event>"``, joined by "; ".
    Users without per-event scores get no entry.
    """
    ids = [str(u) for u in users]
    if not ids:
        return pd.Series(dtype=str, name="top_reasons")
    frame = con.execute(
        "WITH ranked AS (SELECT e.user_id, e.event_type, e.ts, s.surprisal FROM events e"
        " JOIN event_scores s ON s.event_id = e.event_id AND s.model_id = ?"
        " WHERE e.user_id IN (SELECT unnest(?::VARCHAR[]))"
        " AND (?::TIMESTAMP IS NULL OR e.ts >= ?) AND (?::TIMESTAMP IS NULL OR e.ts < ?)"
        " QUALIFY row_number() OVER (PARTITION BY e.user_id"
        " ORDER BY s.surprisal DESC, e.ts) <= ?),"
        " by_type AS (SELECT user_id, event_type, count(*) AS n, max(surprisal) AS peak,"
        " arg_max(ts, surprisal) AS peak_ts FROM ranked GROUP BY user_id, event_type"
        " QUALIFY row_number() OVER (PARTITION BY user_id"
        " ORDER BY n DESC, peak DESC, event_type) <= ?)"
        " SELECT user_id, string_agg(event_type || ' ×' || n || ' at '"
        " || strftime(peak_ts, '%Y-%m-%d %H:%M'), '; ' ORDER BY n DESC, peak DESC, event_type)"
        " AS reasons FROM by_type GROUP BY user_id",
        [model_id, ids, start, start, end, end, int(top_events), int(max_reasons)],
    ).fetchall()
    return pd.Series({str(u): str(r) for u, r in frame}, name="top_reasons", dtype=str)


def _case_users_frame(con: duckdb.DuckDBPyConnection, case_ids: list[int]) -> pd.DataFrame:
    return con.execute(
        "WITH l AS (SELECT user_id, arg_max(label, created_at) AS label,"
        " arg_max(analyst, created_at) AS label_analyst, arg_max(note, created_at) AS label_note"
        " FROM labels GROUP BY user_id),"
        " n AS (SELECT case_id, string_agg(strftime(created_at, '%Y-%m-%d %H:%M') || ' '"
        " || analyst || ': ' || note, ' | ' ORDER BY created_at) AS notes FROM case_notes"
        " GROUP BY case_id)"
        " SELECT c.case_id, c.title, c.status, c.assignee, c.created_by, c.created_at,"
        " c.updated_at, cu.user_id, l.label, l.label_analyst, l.label_note, n.notes"
        " FROM cases c JOIN case_users cu USING (case_id) LEFT JOIN l USING (user_id)"
        " LEFT JOIN n USING (case_id)"
        " WHERE c.case_id IN (SELECT unnest(?::BIGINT[])) ORDER BY c.case_id, cu.rowid",
        [case_ids],
    ).df()


def _saved_weight(con: duckdb.DuckDBPyConnection, model_id: str | None) -> float | None:
    """The unsupervised weight last saved for ``model_id`` on Thresholds; None when never saved
    (the stored combined score then stands, as on every page)."""
    if model_id is None:
        return None
    rows = con.execute(
        "SELECT weight FROM thresholds WHERE model_id = ? ORDER BY saved_at DESC LIMIT 1",
        [model_id],
    ).fetchall()
    return float(rows[0][0]) if rows and rows[0][0] is not None else None


def case_export_frame(
    con: duckdb.DuckDBPyConnection,
    case_ids: Sequence[int],
    *,
    model_id: str | None,
    threshold: float,
    analyst: str,
) -> pd.DataFrame:
    """One row per (case, user): case fields, the user's label, full-history score under
    ``model_id``, the threshold in use and whether the user is above it, top reasons, the
    case's notes, who exported and when. Not yet neutralised (see ``export_csv_bytes``)."""
    ids = sorted({int(c) for c in case_ids})
    missing = set(ids) - set(
        int(r[0])
        for r in con.execute(
            "SELECT case_id FROM cases WHERE case_id IN (SELECT unnest(?::BIGINT[]))", [ids]
        ).fetchall()
    )
    if missing:
        raise CaseError(f"no case {', '.join(map(str, sorted(missing)))}")
    frame = _case_users_frame(con, ids)
    users = frame["user_id"].astype(str).unique().tolist()
    scores = con.execute(
        "SELECT user_id, score, percentile_unsupervised, score_supervised, score_aggregate"
        " FROM sequence_scores"
        " WHERE model_id = ? AND window_start IS NULL AND window_end IS NULL"
        " AND user_id IN (SELECT unnest(?::VARCHAR[]))",
        [model_id, users],
    ).df()
    frame = frame.merge(scores, on="user_id", how="left")
    weight = _saved_weight(con, model_id)
    if weight is not None and len(frame):
        # The dashboard combines with the weight saved on Thresholds; so does the export, or
        # its score and alert flag would disagree with what the analyst saw in Triage.
        from core.scoring import combine_scores  # here: scoring pulls in the model code

        frame["score"] = combine_scores(
            frame["percentile_unsupervised"].to_numpy(dtype=float, na_value=np.nan),
            frame["score_supervised"].to_numpy(dtype=float, na_value=np.nan),
            weight,
            aggregate=frame["score_aggregate"].to_numpy(dtype=float, na_value=np.nan),
        )
    frame["unsupervised_weight"] = weight
    reasons = top_reasons(con, model_id, users) if model_id else pd.Series(dtype=str)
    frame["top_reasons"] = frame["user_id"].map(reasons).astype(object).fillna("")
    # The newest kept explanation per user, whole (arg_max per column would skip NULLs and
    # mix rows).
    explained = con.execute(
        "SELECT user_id, top_events AS top_attributed_events, counterfactual, summary,"
        " summary_backend, grounded AS summary_grounded FROM explanations"
        " WHERE model_id = ? AND user_id IN (SELECT unnest(?::VARCHAR[]))"
        " QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY created_at DESC) = 1",
        [model_id, users],
    ).df()
    frame = frame.merge(explained, on="user_id", how="left")
    frame["model_id"] = model_id or ""
    frame["threshold"] = float(threshold)
    frame["alert"] = frame["score"].astype(float) >= float(threshold)
    frame["exported_by"] = _analyst(analyst)
    frame["exported_at"] = _now()
    return frame.reindex(columns=list(EXPORT_COLUMNS))


def case_evidence_frame(
    con: duckdb.DuckDBPyConnection, case_id: int, *, model_id: str | None
) -> pd.DataFrame:
    """The events of every user in the case, with per-event surprisal under ``model_id`` and
    ``pinned`` = True for events an analyst attached to the case; by user, then time."""
    _case_status(con, case_id)
    cols = ", ".join(f"e.{c}" for c in schema.COLUMN_NAMES)  # identifiers from the fixed schema
    return con.execute(
        f"SELECT ?::BIGINT AS case_id, {cols}, s.surprisal, ? AS model_id,"  # noqa: S608
        " e.event_id IN (SELECT event_id FROM case_events WHERE case_id = ?) AS pinned"
        " FROM events e LEFT JOIN event_scores s ON s.event_id = e.event_id AND s.model_id = ?"
        " WHERE e.user_id IN (SELECT user_id FROM case_users WHERE case_id = ?)"
        " ORDER BY e.user_id, e.ts, e.event_id",
        [int(case_id), model_id, int(case_id), model_id, int(case_id)],
    ).df()


def export_csv_bytes(frame: pd.DataFrame) -> bytes:
    """The frame as UTF-8 CSV with formula-like text cells neutralised (for a download)."""
    return neutralise_frame(frame).to_csv(index=False).encode("utf-8")


def record_export(
    con: duckdb.DuckDBPyConnection,
    analyst: str,
    kind: str,
    case_ids: Sequence[int],
    rows: int,
    destination: str = "download",
) -> None:
    """Audit an export that was handed out (a download) or written to a file."""
    ids = sorted({int(c) for c in case_ids})
    with transaction(con):
        record_audit(
            con,
            analyst,
            f"export_{kind}",
            ",".join(f"case:{c}" for c in ids),
            {"cases": ids, "rows": int(rows), "destination": destination},
        )


def export_cases(
    con: duckdb.DuckDBPyConnection,
    case_ids: Sequence[int],
    out: str | Path,
    *,
    model_id: str | None,
    threshold: float,
    analyst: str,
) -> int:
    """Write the case CSV atomically (neutralised) and audit it; returns the rows written."""
    frame = case_export_frame(
        con, case_ids, model_id=model_id, threshold=threshold, analyst=analyst
    )
    n = write_csv(frame, out)
    record_export(con, analyst, "cases", case_ids, n, str(out))
    return n


def export_evidence(
    con: duckdb.DuckDBPyConnection,
    case_id: int,
    out: str | Path,
    *,
    model_id: str | None,
    analyst: str,
) -> int:
    frame = case_evidence_frame(con, case_id, model_id=model_id)
    n = write_csv(frame, out)
    record_export(con, analyst, "evidence", [case_id], n, str(out))
    return n


def user_case_status(con: duckdb.DuckDBPyConnection, users: Sequence[str]) -> pd.Series:
    """Per user, their most relevant case as text ("#3 investigating"): a case still open or
    under investigation before a closed one, then the most recently updated."""
    ids = [str(u) for u in users]
    if not ids:
        return pd.Series(dtype=str, name="case")
    rows = con.execute(
        "SELECT cu.user_id, '#' || c.case_id || ' ' || c.status FROM case_users cu"
        " JOIN cases c USING (case_id) WHERE cu.user_id IN (SELECT unnest(?::VARCHAR[]))"
        " QUALIFY row_number() OVER (PARTITION BY cu.user_id ORDER BY"
        " list_contains(?::VARCHAR[], c.status), c.updated_at DESC, c.case_id DESC) = 1",
        [ids, sorted(CLOSED_STATUSES)],
    ).fetchall()
    return pd.Series({str(u): str(s) for u, s in rows}, name="case", dtype=str)


__all__ = [
    "CASE_STATUSES",
    "CASE_TRANSITIONS",
    "CLOSED_STATUSES",
    "LABELS",
    "CaseDetail",
    "CaseError",
    "add_label",
    "add_note",
    "add_to_case",
    "assign_case",
    "assignees",
    "audit_count",
    "audit_trail",
    "case_detail",
    "case_evidence_frame",
    "case_export_frame",
    "export_cases",
    "export_csv_bytes",
    "export_evidence",
    "label_history",
    "latest_labels",
    "list_cases",
    "open_case",
    "record_audit",
    "record_export",
    "set_case_status",
    "top_reasons",
    "transaction",
    "user_case_status",
]
