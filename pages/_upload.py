"""The upload flow of the Data & model page: file, preview, column mapping, event-type
renames, timestamp unit, then a validated ingest and its report."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from streamlit.runtime.uploaded_file_manager import UploadedFile

from core import datamodel, schema, store

TS_UNITS = {
    "auto": "detect",
    "iso": "ISO text",
    "s": "epoch seconds",
    "ms": "epoch milliseconds",
    "format": "a format…",
}


@st.cache_data(ttl=600, max_entries=4, show_spinner="Reading the file…")
def preview(file_id: str, name: str, columns: tuple[str, ...] | None, _data: bytes) -> pd.DataFrame:
    return datamodel.preview_upload(_data, name, columns)


def upload_section(db_path: str) -> None:
    """File -> preview -> column mapping and event renames -> ingest -> the report."""
    st.subheader("Upload events")
    upload = st.file_uploader(
        "CSV (optionally .gz) or Parquet; one row per event",
        type=["csv", "tsv", "txt", "gz", "parquet", "pq"],
        key="dm_file",
    )
    if upload is not None:
        _ingest_form(db_path, upload)
    if (result := st.session_state.get("dm_upload")) is not None:
        validation_report(result)


def _ingest_form(db_path: str, upload: UploadedFile) -> None:
    fid = upload.file_id
    headerless = st.checkbox(
        "The file has no header row",
        key=f"dm_headerless_{fid}",
        # ticked for the analyst when the first line is numbers and dates (a row, not names)
        value=datamodel.first_line_is_data(upload.getvalue(), upload.name),
    )
    names = st.text_input(
        "Column names, comma-separated", key=f"dm_names_{fid}", disabled=not headerless
    )
    columns = tuple(n.strip() for n in names.split(",") if n.strip()) if headerless else None
    if headerless and not columns:
        st.info("Name the file's columns, in order, to read it.")
        return
    try:
        frame = preview(fid, upload.name, columns, upload.getvalue())
    except store.StoreError as exc:
        st.error(str(exc))
        return
    st.dataframe(frame.head(5), hide_index=True)
    st.markdown("**Column mapping** — * marks a required column; same-named ones map themselves.")
    choices, guess, grid = (
        ["—", *map(str, frame.columns)],
        datamodel.guess_mapping(frame.columns),
        st.columns(4),
    )
    mapping: dict[str, str] = {}
    for i, col in enumerate(
        c for c in schema.EVENT_COLUMNS if c.name in datamodel.SETTABLE_COLUMNS
    ):
        picked = grid[i % 4].selectbox(
            col.name + (" *" if col.required else ""),
            choices,
            index=choices.index(guess[col.name]) if col.name in guess else 0,
            key=f"dm_map_{col.name}_{fid}",
            help=col.doc,
        )
        if picked != "—":
            mapping[col.name] = picked
    event_map: dict[str, str] = {}
    if "event_type" in mapping:
        seen = frame[mapping["event_type"]].dropna().astype(str).value_counts()
        edited = st.data_editor(
            pd.DataFrame(
                {"event_type": seen.index, "in preview": seen.values, "becomes": seen.index}
            ),
            disabled=["event_type", "in preview"],
            hide_index=True,
            key=f"dm_events_{fid}",
        )
        st.caption("Rename event types (types seen in the first 1,000 rows).")
        event_map = datamodel.event_map_from_edits(edited)
    ts_unit = st.radio(
        "Timestamps", list(TS_UNITS), format_func=TS_UNITS.get, horizontal=True, key=f"dm_ts_{fid}"
    )
    if ts_unit == "format":
        ts_unit = st.text_input(
            "Timestamp format (strptime)",
            value="%d.%m.%Y %H:%M:%S",
            key=f"dm_ts_format_{fid}",
            help="For example %d.%m.%Y %H:%M or %m/%d/%Y %I:%M %p; add %z when the values "
            "carry an offset (+0200). Without an offset the times are taken as UTC.",
        )
    decimal_comma = st.checkbox(
        "Decimal comma (12,99 or 1.234,50)", key=f"dm_decimal_{fid}", help="European exports."
    )
    repeats = st.radio(
        "Rows already stored",
        ["refuse the file", "skip them", "store them again"],
        key=f"dm_repeats_{fid}",
        horizontal=True,
        help="For exports without event_id that overlap earlier ones: rows identical to a "
        "stored event (same user, time and every value). By default such a file is refused "
        "with a count; 'skip them' quarantines them as already stored; 'store them again' "
        "keeps genuine repeats.",
    )
    if not st.button("Validate and ingest", type="primary", key="dm_ingest"):
        return
    options = datamodel.UploadOptions(
        mapping,
        event_map,
        columns,
        ts_unit,  # type: ignore[arg-type]
        decimal_comma,
        skip_stored=repeats == "skip them",
        keep_repeats=repeats == "store them again",
    )
    with st.status(f"Ingesting {upload.name}…") as status:
        try:
            st.session_state["dm_upload"] = datamodel.ingest_upload(
                db_path, upload.getvalue(), upload.name, options
            )
        except store.StoreError as exc:
            status.update(label=f"{upload.name} was not ingested", state="error")
            st.error(str(exc))
            return
    st.cache_data.clear()
    st.rerun()


def validation_report(result: datamodel.UploadResult) -> None:
    rep = result.report
    with st.container(border=True):
        st.markdown("**Validation report**")
        if rep.duplicate_of is not None:
            st.info(rep.message())
        else:
            m = st.columns(3)
            m[0].metric("Rows read", f"{rep.rows_read:,}")
            m[1].metric("Accepted", f"{rep.rows_accepted:,}")
            m[2].metric("Quarantined", f"{rep.rows_quarantined:,}")
            st.caption(rep.message() + " Rescore below to score the new events.")
            if not result.reasons.empty:
                st.dataframe(result.reasons, hide_index=True)
                st.markdown("Sample of quarantined rows")
                st.dataframe(result.quarantined, hide_index=True)
