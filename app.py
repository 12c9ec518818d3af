"""fraudlens — the router and frame: page config, navigation, the shared sidebar."""

from __future__ import annotations

import getpass
from pathlib import Path

import duckdb
import streamlit as st

from core import store
from core.charts import blank_figure
from core.config import get_settings
from pages._shared import dataset_span, models_list, saved_threshold

st.set_page_config(page_title="fraudlens", page_icon=":material/policy:", layout="wide")

state = st.session_state
state.setdefault("db_path", str(get_settings().db_path))

# Page files end in "_page" on purpose: while a `pages/` folder sits next to app.py, Streamlit
# maps a first request for /<file stem> straight to that file (its old folder-based mode)
# until st.navigation has run once, skipping this frame. No url_path below equals a file stem.
pages = {
    "Work": [
        st.Page(
            "pages/triage_page.py",
            title="Triage",
            icon=":material/notifications_active:",
            url_path="triage",
            default=True,
        ),
        st.Page(
            "pages/investigate_page.py",
            title="Investigate",
            icon=":material/person_search:",
            url_path="investigate",
        ),
        st.Page(
            "pages/cases_page.py", title="Cases", icon=":material/folder_open:", url_path="cases"
        ),
    ],
    "Tune": [
        st.Page(
            "pages/thresholds_page.py",
            title="Thresholds",
            icon=":material/tune:",
            url_path="thresholds",
        ),
        st.Page(
            "pages/data_model.py", title="Data & model", icon=":material/database:", url_path="data"
        ),
    ],
}
navigation = st.navigation(pages)

# The sidebar's widgets go in a frame created first, so that an invisible Plotly chart can sit
# below them yet reach the browser before them: on a session's first run it makes the browser
# fetch and evaluate Plotly's 4.7 MB bundle while the page computes, rather than after the
# page's first chart arrives. Measured on this 2-core VM, fresh server and browser: Investigate
# drawn 5.2 s after navigation instead of 5.9 s (3 alternating pairs, each faster). Later runs
# leave it out (the bundle stays loaded in the tab); at the bottom, nothing moves when it goes.
sidebar_frame = st.sidebar.container()
if not state.get("_plotly_primed"):
    state["_plotly_primed"] = True
    st.sidebar.plotly_chart(blank_figure(), key="plotly_primer", config={"staticPlot": True})


def store_problem(exc: Exception) -> None:
    """A database that is locked by another process (an ingest or scoring job in the CLI) or
    cannot answer: one clear message and a retry, never a stack trace. The page's widgets keep
    their state; nothing was written (every write is one transaction)."""
    if isinstance(exc, store.StoreLockedError):
        st.error(
            f"The database is busy: {exc}. A CLI job (ingest, train, score) may be writing to "
            "it; try again when it has finished."
        )
    else:
        st.error(f"The database could not answer: {exc}")
    st.button("Try again", key="_store_retry", icon=":material/refresh:")


# Every page and the sidebar read the database; a busy or broken one stops here, whichever
# page asked. Streamlit's own control flow (st.stop, st.rerun, switch_page) passes through.
try:
    with sidebar_frame:
        st.text_input("Analyst", key="analyst", value=state.get("analyst") or getpass.getuser())
        if Path(state["db_path"]).exists():
            first, last, n_events = dataset_span(state["db_path"])
            if first is not None and last is not None:
                if "time_range" not in state:
                    state["time_range"] = (first.date(), last.date())
                st.date_input(
                    "Time range (UTC)",
                    key="time_range",
                    min_value=first.date(),
                    max_value=last.date(),
                    help="Applies to every page.",
                )
            models = models_list(state["db_path"])
            state["_models"] = models
            if not models.empty:
                ids = models["model_id"].tolist()
                if state.get("model_id") not in ids:
                    state["model_id"] = ids[0]
                st.selectbox("Model", ids, key="model_id")
                # Each model has its threshold (saved, else 0.90 / 0.99 without labels): a
                # switch of model, here or by "Use" on Data & model, loads the new one's.
                switched = state.get("_threshold_of") not in (None, state["model_id"])
                if "threshold" not in state or switched:
                    state["threshold"] = saved_threshold(state["db_path"], state["model_id"])
                state["_threshold_of"] = state["model_id"]
                st.number_input(
                    "Alert threshold (combined score)",
                    key="threshold",
                    min_value=0.0,
                    max_value=1.0,
                    step=0.01,
                    format="%.2f",
                    help="Users scoring at or above it are alerts. Tune it on the Thresholds page.",
                )
            else:
                state["model_id"] = None
            st.caption(f"`{state['db_path']}` · {n_events:,} events")
        else:
            state["_models"] = None
            state["model_id"] = None
            st.caption(f"No database yet at `{state['db_path']}`")

    navigation.run()
except (store.StoreError, duckdb.Error) as exc:
    store_problem(exc)
