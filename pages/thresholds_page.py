"""Thresholds: what a threshold and a weight would catch and cost. Sliders re-slice cached
data only (no query, no inference); saving is recorded in the audit log."""

from __future__ import annotations

import math
from datetime import datetime

import streamlit as st

from core import alert_charts, alerts, cases, store
from core.scoring import DEFAULT_UNSUPERVISED_WEIGHT
from pages._shared import context, require_database, require_model, saved_threshold

ctx = context()
st.title("Thresholds")
require_database(ctx)
require_model(ctx)
assert ctx.model_id is not None

SOURCE_NAMES = {"truth": "Demo ground truth", "analyst": "Analyst labels (fraud / legit)"}


@st.cache_data(ttl=10, max_entries=4, show_spinner=False)
def db_version(db_path: str, model_id: str) -> tuple[int, float]:
    with store.open_db(db_path) as con:
        setting = alerts.saved_setting(con, model_id)
        return cases.audit_count(con), setting.weight if setting else DEFAULT_UNSUPERVISED_WEIGHT


@st.cache_data(ttl=300, max_entries=16, show_spinner="Loading scores and labels…")
def tuning_data(
    db_path: str, model_id: str, start: datetime | None, end: datetime | None, version: int
) -> alerts.ThresholdData:
    with store.open_db(db_path) as con:
        return alerts.threshold_data(con, model_id, start, end)


def save(model_id: str, analyst: str) -> None:
    """Button callback: runs before the script, so it may set the sidebar's threshold."""
    state = st.session_state
    try:
        with store.open_db(ctx.db_path) as con:
            saved = alerts.save_threshold(
                con, model_id, state["thr_threshold"], state["thr_weight"], analyst
            )
    except (store.StoreError, ValueError) as exc:
        state["thr_message"] = ("error", f"Not saved: {exc}", None)
        return
    state["threshold"] = saved.threshold
    saved_threshold.clear()
    db_version.clear()
    state["thr_message"] = (
        "success",
        f"Saved threshold {saved.threshold:.3f} (weight {saved.weight:.2f}) for {model_id}.",
        (saved.threshold, saved.weight),
    )


version, saved_weight = db_version(ctx.db_path, ctx.model_id)
try:
    data = tuning_data(ctx.db_path, ctx.model_id, ctx.start, ctx.end, version)
except store.StoreError as exc:
    st.error(f"Could not load the scores: {exc}")
    st.stop()
if data.users.empty:
    st.info(f"Model `{ctx.model_id}` has no stored scores yet: run `fraudlens score`.")
    st.stop()

sources = data.label_sources()
st.caption(
    "Alerts count users active in the range; precision / recall count users whose truth is "
    "known. Alert day = the day of the user's most surprising event."
)


@st.fragment
def tuner() -> None:
    state = st.session_state
    state.setdefault("thr_threshold", float(ctx.threshold))
    state.setdefault("thr_weight", float(saved_weight))
    c1, c2 = st.columns(2)
    threshold = c1.slider("Threshold", 0.0, 1.0, step=0.005, format="%.3f", key="thr_threshold")
    weight = c2.slider(
        "Weight of the unsupervised score",
        0.0,
        1.0,
        step=0.05,
        key="thr_weight",
        help="combined = sigmoid(w × logit(unsupervised percentile) + (1 − w) × mean of the "
        "logits of the supervised probabilities: the sequence head's and the account-level "
        "model's). w = 1/3 weighs the three sources alike.",
    )
    all_scores = data.scores(weight)
    scores = all_scores[data.active]  # the range's users
    m = st.columns(5)
    m[0].metric("Alerts in range", f"{int((scores >= threshold).sum()):,}")
    source = None
    if sources:
        source = st.radio(
            "Judge against",
            sources,
            format_func=SOURCE_NAMES.__getitem__,
            horizontal=True,
            key="thr_source",
        )
    else:
        st.info("No labels yet: label users on Investigate to see precision and recall here.")
    if source is not None:
        y = data.y(source)[data.active]
        point = alerts.threshold_point(y, scores, threshold)
        for col, name, value in zip(
            m[1:4],
            ("Precision", "Recall", "F1"),
            (point.precision, point.recall, point.f1),
            strict=True,
        ):
            col.metric(name, "—" if math.isnan(value) else f"{value:.2f}")
        m[4].metric("Missed fraud", f"{point.fn:,}")
        left, right = st.columns(2)
        curve = alerts.pr_curve(y, scores)
        left.plotly_chart(alert_charts.pr_curve_chart(curve, point), key="thr_pr")
        right.plotly_chart(
            alert_charts.confusion_chart(alerts.confusion(y, scores, threshold)),
            key="thr_cm",
        )
        st.subheader("Expected cost")
        k1, k2, k3 = st.columns(3)
        cost_missed = k1.number_input("Cost of a missed fraud", 0.0, value=500.0, key="thr_cfn")
        cost_review = k2.number_input("Cost of one review", 0.0, value=5.0, key="thr_crev")
        best = alerts.min_cost(y, scores, cost_missed, cost_review)
        k3.metric(
            "Cost-minimising threshold",
            f"{best.threshold:.3f}",
            help=f"cost {best.cost:,.0f}: {best.alerts} alerts, {best.missed} missed",
        )
        cost = alerts.cost_curve(y, scores, cost_missed, cost_review)
        st.plotly_chart(alert_charts.cost_chart(cost, best, threshold), key="thr_cost")
    left, right = st.columns(2)
    left.plotly_chart(
        alert_charts.alerts_per_day_chart(
            alerts.range_alerts(data, threshold, weight), title="Alerts per day (range)"
        ),
        key="thr_range_days",
    )
    right.plotly_chart(
        alert_charts.alerts_per_day_chart(
            alerts.backtest(data, threshold, weight), title="Backtest: alerts per day, all history"
        ),
        key="thr_backtest",
    )
    if st.button(
        "Save threshold",
        type="primary",
        on_click=save,
        args=(ctx.model_id, ctx.analyst),
        help="Records the threshold and weight for this model and makes it the sidebar's.",
    ):
        st.rerun()  # the whole app, so the sidebar shows the saved threshold
    if "thr_message" in state:
        kind, text, values = state["thr_message"]
        if kind == "error":
            st.error(state.pop("thr_message")[1])
        elif values == (threshold, weight):  # shown until the sliders move on
            st.success(text)


tuner()
