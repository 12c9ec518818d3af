"""Data & model: what the database holds, upload with a validation report, the models and their
metrics, and retrain / rescore as background jobs (other pages keep working meanwhile)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from core import datamodel, jobs, store
from core.config import MODEL_SIZE_NAMES, get_settings
from core.simulate import WorldConfig
from pages._shared import context
from pages._upload import upload_section

ctx = context()
state = st.session_state
registry = jobs.registry()
st.title("Data & model")
SUPERVISED_HELP = "Demo truth or analyst labels; skipped with fewer than 5 of each."


@st.cache_data(ttl=30, max_entries=8, show_spinner=False)
def load_summary(db_path: str) -> dict[str, object]:
    with store.open_db(db_path) as con:
        return store.dataset_summary(con).to_dict()


@st.cache_data(ttl=30, max_entries=8, show_spinner=False)
def load_models(db_path: str) -> pd.DataFrame:
    with store.open_db(db_path) as con:
        return datamodel.models_table(con)


def refresh_caches(_job: jobs.JobState) -> None:
    """Runs in the job's thread when it ends: every page reads the new data from then on."""
    st.cache_data.clear()


def start(kind: str, title: str, work: Callable[[jobs.Report], Any]) -> None:
    try:
        registry.start(kind, title, work, group=ctx.db_path, on_finish=refresh_caches)
    except jobs.JobBusyError as exc:
        st.warning(str(exc))
        return
    st.rerun()  # so the job panel polls


def use_model(model_id: str) -> None:
    state["model_id"] = model_id  # the sidebar's model picker, set before it is drawn


active = registry.active(ctx.db_path)
recent = registry.jobs(group=ctx.db_path)


@st.fragment(run_every=1.0 if active else None)
def job_panel() -> None:
    """The latest job on this database, polled while one runs."""
    job = registry.get(recent[0].job_id) or recent[0]
    look = {"running": "running", "done": "complete", "failed": "error"}[job.status]
    title = f"{job.title} · {job.status} · {job.elapsed_s:,.0f} s"
    with st.status(title, state=look, expanded=job.status != "done"):  # type: ignore[arg-type]
        if job.running and job.progress is not None:
            st.progress(job.progress, text=job.message)
        else:
            st.write(job.error if job.status == "failed" else job.message)
    if not job.running and active is not None:
        st.rerun()  # the job ended while polling: redraw the whole app (sidebar included)


if recent:
    job_panel()
    done = recent[0]
    if done.kind == "retrain" and done.status == "done" and done.result != ctx.model_id:
        st.button(f"Use {done.result}", on_click=use_model, args=(done.result,), key="dm_use")

summary = None
if Path(ctx.db_path).exists():
    try:
        summary = load_summary(ctx.db_path)
    except store.StoreError as exc:
        st.error(str(exc))
        st.stop()
if summary is None or not summary["n_events"]:
    st.info(f"No events in `{ctx.db_path}` yet: build the demo world, or upload your own log.")
    with st.form("dm_demo"):
        c1, c2 = st.columns(2)
        n_users = c1.number_input("Users", min_value=10, max_value=200_000, value=3000, step=100)
        n_days = c2.number_input("Days of history", min_value=3, max_value=365, value=30)
        if st.form_submit_button("Build the demo database", type="primary", disabled=bool(active)):
            world, db = WorldConfig(n_users=int(n_users), days=int(n_days)), ctx.db_path
            start("demo", "Build the demo", lambda r: datamodel.build_demo_db(db, world, r))
else:
    for col, (name, value) in zip(
        st.columns(4),
        [
            ("Events", summary["n_events"]),
            ("Users", summary["n_users"]),
            ("Sessions", summary["n_sessions"]),
            ("Quarantined rows", summary["n_quarantined"]),
        ],
        strict=True,
    ):
        col.metric(name, f"{value:,}")
    share = summary.get("fraud_share")
    st.write(
        f"**Time span:** {summary['first_ts']} — {summary['last_ts']} · **ingest batches:** "
        f"{summary['n_batches']:,} · **fraud share (ground truth):** "
        + ("—" if share is None else f"{share:.1%}")
        + " · **analyst labels:** "
        + (", ".join(f"{n:,} {k}" for k, n in summary.get("label_counts", {}).items()) or "none")
    )
    left, right = st.columns(2)
    for where, key, names in (
        (left, "event_type_counts", ["event type", "events"]),
        (right, "typology_counts", ["fraud typology (ground truth)", "users"]),
    ):
        if items := summary.get(key):
            where.dataframe(pd.DataFrame(list(items.items()), columns=names), hide_index=True)  # type: ignore[union-attr]


upload_section(ctx.db_path)

if summary is None or not summary["n_events"]:
    st.stop()
st.subheader("Models")
models = load_models(ctx.db_path)
if models.empty:
    st.info("No trained model yet: train one below.")
else:
    st.dataframe(models, hide_index=True, key="dm_models")
settings = get_settings()
with st.form("dm_train"):
    c1, c2, c3 = st.columns(3)
    size = c1.selectbox("Size", MODEL_SIZE_NAMES, index=1, help="small: ~2 min on CPU")
    epochs = c2.number_input("Epochs", min_value=1, max_value=50, value=3)
    supervised = c3.checkbox("Fine-tune on labels", value=True, help=SUPERVISED_HELP)
    if st.form_submit_button("Train a new model and score every user", disabled=bool(active)):
        from core.train import TrainConfig

        db, models_dir = ctx.db_path, settings.models_dir
        cfg = TrainConfig(
            size=size, epochs=int(epochs), supervised=supervised, device=settings.device
        )
        start(
            "retrain", f"Train a {size} model", lambda r: datamodel.retrain(db, cfg, models_dir, r)
        )
if ctx.model_id and ctx.model_path:
    db, path, device = ctx.db_path, ctx.model_path, settings.device
    if st.button(
        f"Rescore every user with {ctx.model_id}", disabled=bool(active), key="dm_rescore"
    ):
        start(
            "rescore",
            f"Rescore with {ctx.model_id}",
            lambda r: datamodel.rescore_all(db, path, r, device=device),
        )
