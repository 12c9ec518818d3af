"""Cases: list, detail (users, notes, status history), actions and CSV exports.
`?case=<id>` opens that case."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import TypeVar
from urllib.parse import quote

import duckdb
import pandas as pd
import streamlit as st

from core import cases, store
from pages._shared import context, require_database

ctx = context()
st.title("Cases")
require_database(ctx)
state = st.session_state
T = TypeVar("T")


@st.cache_data(ttl=10, max_entries=4, show_spinner=False)
def db_version(db_path: str) -> int:
    with store.open_db(db_path) as con:
        return cases.audit_count(con)


@st.cache_data(ttl=300, max_entries=32, show_spinner=False)
def case_list(
    db_path: str, statuses: tuple[str, ...], assignee: str | None, version: int
) -> tuple[pd.DataFrame, list[str]]:
    with store.open_db(db_path) as con:
        listing = cases.list_cases(con, statuses=statuses or None, assignee=assignee)
        return listing, cases.assignees(con)


@st.cache_data(ttl=300, max_entries=32, show_spinner=False)
def detail(db_path: str, case_id: int, version: int) -> cases.CaseDetail | None:
    with store.open_db(db_path) as con:
        try:
            return cases.case_detail(con, case_id)
        except cases.CaseError:
            return None


def build_export(
    db_path: str,
    ids: tuple[int, ...],
    evidence: bool,
    model_id: str | None,
    threshold: float,
    analyst: str,
) -> tuple[bytes, int]:
    """The case CSV of ``ids``, or (``evidence``) the evidence CSV of the single case."""
    with store.open_db(db_path) as con:
        if evidence:
            frame = cases.case_evidence_frame(con, ids[0], model_id=model_id)
        else:
            frame = cases.case_export_frame(
                con, ids, model_id=model_id, threshold=threshold, analyst=analyst
            )
    return cases.export_csv_bytes(frame), len(frame)


@st.cache_data(ttl=300, max_entries=16, show_spinner="Preparing the export…")
def export_file(
    db_path: str,
    ids: tuple[int, ...],
    evidence: bool,
    model_id: str | None,
    threshold: float,
    analyst: str,
    version: int,
) -> tuple[bytes, int]:
    """build_export, cached for the buttons' row counts (and as the fallback file)."""
    return build_export(db_path, ids, evidence, model_id, threshold, analyst)


def export_now(
    db_path: str,
    ids: tuple[int, ...],
    evidence: bool,
    model_id: str | None,
    threshold: float,
    analyst: str,
) -> Callable[[], bytes]:
    """The file as of the click: st.download_button calls this when the analyst downloads
    (on a thread of its own), so exported_at is the moment of the download, not when the
    page last prepared the button."""
    return lambda: build_export(db_path, ids, evidence, model_id, threshold, analyst)[0]


def act(action: Callable[[duckdb.DuckDBPyConnection], T], done: str) -> T | None:
    """Run one core write in its own short connection; report the outcome on the next run."""
    try:
        with store.open_db(ctx.db_path) as con:
            result = action(con)
    except (cases.CaseError, store.StoreError, duckdb.Error) as exc:
        state["case_message"] = ("error", store.error_message(exc))
        return None
    db_version.clear()
    state["case_message"] = ("success", done)
    return result


def record_download(kind: str, ids: list[int], rows: int) -> None:
    act(
        lambda con: cases.record_export(con, ctx.analyst, kind, ids, rows),
        done=f"Exported {kind} CSV ({rows} rows).",
    )


version = db_version(ctx.db_path)
if "case_message" in state:
    kind, text = state.pop("case_message")
    (st.success if kind == "success" else st.error)(text)

f1, f2 = st.columns(2)
statuses = f1.multiselect("Status", cases.CASE_STATUSES, key="case_statuses")
everyone = case_list(ctx.db_path, (), None, version)[1]
assignee = f2.selectbox("Assignee", ["anyone", *everyone], key="case_assignee")
listing, _ = case_list(
    ctx.db_path, tuple(statuses), None if assignee == "anyone" else assignee, version
)

with st.expander("New case"):
    with st.form("case_new", clear_on_submit=True):
        new_users = st.text_input("Users (comma separated)", key="case_new_users")
        new_title = st.text_input("Title (optional)", key="case_new_title")
        if st.form_submit_button("Open case"):
            users = [u.strip() for u in new_users.split(",") if u.strip()]
            new_id = act(
                lambda con: cases.open_case(con, ctx.analyst, users, title=new_title),
                done="Case opened.",
            )
            if new_id is not None:
                st.query_params["case"] = str(new_id)
            st.rerun()

ids = listing["case_id"].astype(int).tolist()
wanted = st.query_params.get("case")
if wanted is not None and wanted.isdigit() and wanted != state.get("case_link_seen"):
    # a deep link (or a new case) wins over the picker once, then the picker rules
    state["case_link_seen"] = wanted
    state["case_pick"] = int(wanted)
if state.get("case_pick") is not None and state["case_pick"] not in ids:
    ids = [state["case_pick"], *ids]  # the linked case opens even when the filters hide it
if not ids:
    st.info("No cases match. Open one here or from a user on the **Investigate** page.")
    st.stop()
if not listing.empty:
    st.dataframe(
        listing.assign(link="?case=" + listing["case_id"].astype(str)),
        hide_index=True,
        column_config={"link": st.column_config.LinkColumn("open", display_text="open")},
        key="case_table",
    )
case_id = st.selectbox("Open case", ids, key="case_pick", format_func=lambda c: f"#{c}")
state["case_link_seen"] = str(case_id)
st.query_params["case"] = str(case_id)
case = detail(ctx.db_path, int(case_id), version)
if case is None:
    st.error(f"There is no case {case_id}.")
    st.stop()

st.subheader(f"#{case.case_id} · {case.title}")
st.caption(
    f"**{case.status}** · assignee {case.assignee or '—'} · opened by {case.created_by} "
    f"{case.created_at:%Y-%m-%d %H:%M} · updated {case.updated_at:%Y-%m-%d %H:%M} UTC"
)
left, right = st.columns(2)
with left:
    st.markdown("**Users**")
    links = case.users["user_id"].map(lambda u: "/investigate?user=" + quote(str(u), safe=""))
    users = case.users.assign(investigate=links)
    st.dataframe(
        users,
        hide_index=True,
        column_config={"investigate": st.column_config.LinkColumn(display_text="investigate")},
    )
    if not case.events.empty:
        st.markdown("**Pinned events**")
        st.dataframe(case.events, hide_index=True)
with right:
    st.markdown("**Status history**")
    st.dataframe(case.history, hide_index=True)
    st.markdown("**Notes**")
    if case.notes.empty:
        st.caption("No notes yet.")
    for note in case.notes.itertuples():
        st.markdown(f"*{note.analyst}, {note.created_at:%Y-%m-%d %H:%M}*")
        st.text(note.note)

a1, a2, a3 = st.columns(3)
with a1.form("case_note_form", clear_on_submit=True):
    note = st.text_area("Note", key="case_note")
    if st.form_submit_button("Add note"):
        act(lambda con: cases.add_note(con, case.case_id, note, ctx.analyst), done="Note added.")
        st.rerun()
with a2.form("case_status_form"):
    status = st.selectbox("Move to", case.next_statuses, key="case_status")
    if st.form_submit_button("Change status"):
        act(
            lambda con: cases.set_case_status(con, case.case_id, status, ctx.analyst),
            done=f"Case #{case.case_id} is now {status}.",
        )
        st.rerun()
with a3.form("case_assign_form"):
    who = st.text_input("Assignee", value=case.assignee or "", key="case_assign")
    if st.form_submit_button("Assign"):
        act(
            lambda con: cases.assign_case(con, case.case_id, who, ctx.analyst),
            done=f"Assigned to {who}.",
        )
        st.rerun()

st.subheader("Export")
chosen = st.multiselect(
    "Cases in the case CSV",
    sorted({*listing["case_id"].astype(int).tolist(), case.case_id}),
    default=[case.case_id],
    key="case_export_ids",
    format_func=lambda c: f"#{c}",
)
stamp = date.today().isoformat()
picked = tuple(sorted(set(chosen)))
exports = [  # (kind, cases, file name, label prefix)
    ("cases", picked, f"cases-{stamp}.csv", f"Case CSV · {len(picked)} cases"),
    (
        "evidence",
        (case.case_id,),
        f"case-{case.case_id}-evidence-{stamp}.csv",
        f"Evidence CSV of #{case.case_id}",
    ),
]
for column, (kind, ids_, name, label) in zip(st.columns(2), exports, strict=True):
    try:
        data, rows = (
            export_file(
                ctx.db_path,
                ids_,
                kind == "evidence",
                ctx.model_id,
                ctx.threshold,
                ctx.analyst,
                version,
            )
            if ids_
            else (b"", 0)
        )
    except (cases.CaseError, store.StoreError, duckdb.Error) as exc:
        column.error(f"Could not prepare the {kind} export: {store.error_message(exc)}")
        continue
    column.download_button(
        f"{label} · {rows} rows",
        export_now(ctx.db_path, ids_, kind == "evidence", ctx.model_id, ctx.threshold, ctx.analyst)
        if ids_
        else data,
        name,
        "text/csv",
        on_click=record_download,
        args=(kind, list(ids_), rows),
        key=f"case_dl_{kind}",
        disabled=not ids_,
    )
st.caption(
    f"Scores from model `{ctx.model_id or '—'}`, threshold {ctx.threshold:.2f}. Cells that "
    "a spreadsheet would run as formulas (= + - @) are prefixed with '."
)
