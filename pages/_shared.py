"""What every page shares: the sidebar's context and the cached loaders.

Streamlit caches live here, next to the pages that use them; everything they call is core.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path

import pandas as pd
import streamlit as st

from core import alerts, store
from core.scoring import LoadedModel, load_model, resolve_model_path

DEFAULT_THRESHOLD = alerts.DEFAULT_THRESHOLD


@dataclass(frozen=True)
class PageContext:
    """The sidebar's choices, passed whole to the code that uses them."""

    db_path: str
    analyst: str
    start: datetime | None  # inclusive, naive UTC
    end: datetime | None  # exclusive, naive UTC
    model_id: str | None
    model_path: str | None
    threshold: float


@st.cache_data(ttl=30, max_entries=8, show_spinner=False)
def dataset_span(db_path: str) -> tuple[datetime | None, datetime | None, int]:
    with store.open_db(db_path) as con:
        row = con.execute("SELECT min(ts), max(ts), count(*) FROM events").fetchall()[0]
    return row[0], row[1], int(row[2])


@st.cache_data(ttl=30, max_entries=8, show_spinner=False)
def models_list(db_path: str) -> pd.DataFrame:
    with store.open_db(db_path) as con:
        return con.execute(
            "SELECT model_id, created_at, path, metrics FROM models ORDER BY created_at DESC"
        ).df()


@st.cache_data(ttl=30, max_entries=16, show_spinner=False)
def saved_threshold(db_path: str, model_id: str) -> float:
    """The threshold saved for the model, else its default (alerts.threshold_in_use)."""
    with store.open_db(db_path) as con:
        return alerts.threshold_in_use(con, model_id)


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def loaded_model(model_path: str) -> LoadedModel:
    """One model instance per process, shared by all sessions; its lock serialises use."""
    return load_model(model_path)


def day_bounds(start: date | None, end: date | None) -> tuple[datetime | None, datetime | None]:
    """A date range picked in the sidebar -> [start 00:00, end + 1 day 00:00) in UTC."""
    lo = datetime.combine(start, time()) if start else None
    hi = datetime.combine(end, time()) + timedelta(days=1) if end else None
    return lo, hi


def context() -> PageContext:
    state = st.session_state
    models = state.get("_models")
    model_id = state.get("model_id")
    model_path = None
    if models is not None and model_id is not None and not models.empty:
        match = models.loc[models["model_id"] == model_id, "path"]
        model_path = str(resolve_model_path(model_id, match.iloc[0])) if len(match) else None
    rng = state.get("time_range") or ()
    start, end = day_bounds(rng[0] if len(rng) > 0 else None, rng[1] if len(rng) > 1 else None)
    return PageContext(
        db_path=state["db_path"],
        analyst=(state.get("analyst") or "analyst").strip() or "analyst",
        start=start,
        end=end,
        model_id=model_id,
        model_path=model_path,
        threshold=float(state.get("threshold", DEFAULT_THRESHOLD)),
    )


def require_database(ctx: PageContext) -> None:
    """Stop the page with a helpful message when there is nothing to show yet."""
    if not Path(ctx.db_path).exists():
        st.info(
            f"No database at `{ctx.db_path}` yet. Build the demo with `make run` "
            "(or `fraudlens demo`), or upload your logs on the **Data & model** page."
        )
        st.stop()


def require_model(ctx: PageContext) -> None:
    if ctx.model_id is None or ctx.model_path is None:
        st.info(
            "No trained model yet. Train one on the **Data & model** page, or run "
            "`fraudlens train` then `fraudlens score`."
        )
        st.stop()


def blank_missing(
    frame: pd.DataFrame, formats: dict[str, str], text: tuple[str, ...] = ()
) -> pd.DataFrame:
    """For display: missing cells blank rather than Streamlit's "None" (a top event has no
    price, a similar user no label or case yet) in the text columns (object dtype, or named in
    ``text``: a column of nothing but missing values has no text dtype) and in the ``formats``
    columns, which become text written with their format."""
    out = frame.copy()
    for column in out.columns:
        values = out[column]
        if column in formats:
            fmt = formats[column]
            out[column] = ["" if pd.isna(v) else fmt.format(v) for v in values]
        elif column in text or values.dtype == object or pd.api.types.is_string_dtype(values):
            out[column] = values.astype(object).where(values.notna(), "")
    return out
