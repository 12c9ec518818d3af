"""Data & model: what the database holds (upload, models, retrain and rescore come next)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core import store


@st.cache_data(ttl=30, max_entries=8, show_spinner=False)
def load_summary(db_path: str) -> dict[str, object]:
    con = store.connect(db_path, read_only=True)
    try:
        return store.dataset_summary(con).to_dict()
    finally:
        con.close()


st.title("fraudlens")
st.caption("Find and explain fraudulent behaviour in e-commerce event logs.")

db_path = st.session_state["db_path"]
if not Path(db_path).exists():
    st.info(
        f"No database at `{db_path}` yet. Build the demo with `make run` "
        "(or `fraudlens demo`), or load your own logs with `fraudlens ingest FILE`."
    )
    st.stop()

try:
    summary = load_summary(db_path)
except store.StoreError as exc:
    st.error(str(exc))
    st.stop()

cols = st.columns(4)
cols[0].metric("Events", f"{summary['n_events']:,}")
cols[1].metric("Users", f"{summary['n_users']:,}")
cols[2].metric("Sessions", f"{summary['n_sessions']:,}")
share = summary.get("fraud_share")
cols[3].metric("Fraud share (ground truth)", "—" if share is None else f"{share:.1%}")
st.write(f"**Time span:** {summary['first_ts']} — {summary['last_ts']}")
st.write(
    f"**Ingest batches:** {summary['n_batches']:,} · "
    f"**rows in quarantine:** {summary['n_quarantined']:,}"
)

left, right = st.columns(2)
with left:
    st.subheader("Event types")
    counts = pd.DataFrame(
        sorted(summary["event_type_counts"].items(), key=lambda kv: -kv[1]),  # type: ignore[union-attr]
        columns=["event_type", "events"],
    )
    st.dataframe(counts, hide_index=True, width="stretch")
with right:
    typologies = summary.get("typology_counts") or {}
    if typologies:
        st.subheader("Fraud typologies (ground truth)")
        st.dataframe(
            pd.DataFrame(sorted(typologies.items()), columns=["typology", "users"]),  # type: ignore[union-attr]
            hide_index=True,
            width="stretch",
        )
