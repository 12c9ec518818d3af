"""Investigate: one user — scores, timeline, sessions, linked accounts, and the decision."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import duckdb
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import alerts, cases, charts, graphs, investigate, store
from core.investigate import UserView
from core.scoring import LoadedModel
from pages._shared import context, loaded_model, require_database

state = st.session_state
ctx = context()
st.title("Investigate")
require_database(ctx)


@st.cache_data(ttl=10, max_entries=4, show_spinner=False)
def db_version(db_path: str, model_id: str | None) -> tuple[int, float | None]:
    """Audit rows (they grow with every label / case change) and the saved weight: cache keys
    below, so an analyst's action shows at once."""
    with store.open_db(db_path) as con:
        saved = alerts.saved_setting(con, model_id) if model_id else None
        return cases.audit_count(con), saved.weight if saved else None


@st.cache_data(ttl=120, max_entries=8, show_spinner=False)
def pick_list(db_path: str, model_id: str | None) -> pd.DataFrame:
    with store.open_db(db_path) as con:
        return investigate.top_users(con, model_id)


class Ask(NamedTuple):
    """What the cached answers about a user depend on (hashable: a cache key)."""

    db_path: str
    model_id: str | None
    model_path: str | None
    user: str
    start: datetime | None
    end: datetime | None
    weight: float | None
    version: int


@st.cache_data(ttl=120, max_entries=32, show_spinner="Loading the user…")
def user_view(ask: Ask) -> tuple[UserView | None, str | None]:
    """The user, and a warning when on-demand scoring failed (then stored scores only): the
    failure is cached too, so a model that does not load is not retried on every rerun."""

    def load() -> LoadedModel:
        return loaded_model(str(ask.model_path))

    with store.open_db(ask.db_path) as con:
        args = (con, ask.user, ask.model_id, ask.start, ask.end)
        try:
            loader = load if ask.model_path else None
            return investigate.user_view(*args, weight=ask.weight, load_model=loader), None
        except Exception as exc:  # a model that does not load or score: say so, fall back
            view = investigate.user_view(*args, weight=ask.weight)
            return view, f"Could not score {ask.user} now ({exc}); showing stored scores only."


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def transitions(db_path: str, start: datetime | None, end: datetime | None) -> pd.DataFrame:
    with store.open_db(db_path) as con:
        return investigate.population_transitions(con, start, end)


@st.cache_data(ttl=120, max_entries=32, show_spinner=False)
def timeline_figure(ask: Ask, threshold: float) -> go.Figure:
    view, _ = user_view(ask)
    assert view is not None
    events, pop = view.timeline.events, transitions(ask.db_path, ask.start, ask.end)
    types = {*pop["event_type"], *pop["next_event_type"], *events["event_type"]}
    fig = charts.score_timeline(
        events,
        alert_level(ask.db_path, ask.model_id, threshold),
        color_map=charts.category_colors(list(types)),
        threshold_label=f"rarer than {threshold:.0%} of events",
    )
    return fig.update_layout(uirevision=ask.user)


def attribution_timeline(ask: Ask, attribution: pd.DataFrame | None) -> go.Figure:
    """The explained events over time, coloured by their attribution (red raises the score)."""
    view, _ = user_view(ask)
    assert view is not None and attribution is not None
    events = view.timeline.events.merge(attribution, on="event_id", how="inner")
    fig = charts.score_timeline(events, color_by="attribution", threshold_label="")
    return fig.update_layout(uirevision=f"attr-{ask.user}")


@st.cache_data(ttl=600, max_entries=16, show_spinner=False)
def alert_level(db_path: str, model_id: str | None, threshold: float) -> float | None:
    with store.open_db(db_path) as con:
        return investigate.event_alert_level(con, model_id, threshold)


@st.cache_data(ttl=300, max_entries=16, show_spinner=False)
def case_choices(db_path: str, version: int) -> dict[str, int | None]:
    with store.open_db(db_path) as con:
        return investigate.case_choices(con)


def open_user(user: str) -> None:
    """Point the picker and the URL (?user=) at a user; only before the picker is drawn or in
    a callback."""
    state["inv_user"] = user
    if st.query_params.get("user") != user:
        st.query_params["user"] = user


def on_entity_click(key: str, current: str) -> None:
    for point in state[key]["selection"]["points"]:
        data = point.get("customdata") or []
        if len(data) == 3 and data[1] == "user" and data[2] != current:
            return open_user(str(data[2]))


def act(action, message: str) -> None:
    """Run one analyst action (its change and audit row in one transaction), then refresh."""
    try:
        with store.open_db(ctx.db_path) as con:
            action(con)
    except (cases.CaseError, store.StoreError, duckdb.Error) as exc:
        st.error(store.error_message(exc))
        return
    db_version.clear()  # a new audit row: the next run reads fresh labels and cases
    state["_inv_flash"] = message
    st.rerun()


try:
    version, weight = db_version(ctx.db_path, ctx.model_id)
    top = pick_list(ctx.db_path, ctx.model_id)
except store.StoreError as exc:
    st.error(str(exc))
    st.stop()
linked = st.query_params.get("user")
if linked and linked != state.get("inv_user"):
    open_user(linked)
options = top["user_id"].astype(str).tolist()
score_of = dict(zip(options, top["score"], strict=True))
if state.get("inv_user") and state["inv_user"] not in options:
    options.insert(0, state["inv_user"])
user = st.selectbox(
    "User",
    options,
    key="inv_user",
    accept_new_options=True,
    on_change=lambda: open_user(str(state["inv_user"] or "").strip()),
    format_func=lambda u: u if pd.isna(score_of.get(u)) else f"{u} · score {score_of[u]:.2f}",
    help="Highest-scored users first; type any user id. The URL (?user=…) links here.",
)
user = str(user or "").strip()
if not user:
    st.info("Pick a user, or type a user id.")
    st.stop()
if st.query_params.get("user") != user:
    st.query_params["user"] = user
if flash := state.pop("_inv_flash", None):
    st.success(flash)

ask = Ask(ctx.db_path, ctx.model_id, ctx.model_path, user, ctx.start, ctx.end, weight, version)
try:
    view, problem = user_view(ask)
    population = transitions(ctx.db_path, ctx.start, ctx.end)
except store.StoreError as exc:
    st.error(f"Could not load user {user}: {exc}")
    st.stop()
if problem:
    st.warning(problem)
if view is None:
    st.warning(f"No user `{user}` in the database. Check the id, or pick one from the list.")
    st.stop()

head, events = view.header, view.timeline.events
metrics = investigate.header_metrics(head)
for col, (name, value, tip) in zip(st.columns(len(metrics)), metrics, strict=True):
    col.metric(name, value, help=tip)
if head.label:
    st.caption(f"Labelled {head.label} by {head.label_analyst}: {head.label_note or 'no note'}")

if events.empty:
    st.info(
        f"{user} has no events in the selected time range ({head.n_events_total:,} in all): "
        "widen the range in the sidebar."
    )
else:
    st.subheader("Score timeline")
    fig = timeline_figure(ask, ctx.threshold)
    st.plotly_chart(fig, key="inv_timeline", config={"scrollZoom": True})
    st.caption(investigate.describe_timeline(fig.layout.meta, view.timeline.source, len(events)))

    @st.fragment
    def session_panel() -> None:
        left, right = st.columns([3, 2])
        left.subheader(f"Sessions ({len(view.sessions):,})")
        left.dataframe(
            view.sessions,
            hide_index=True,
            height=320,
            column_config={"max_surprisal": st.column_config.NumberColumn(format="%.2f")},
        )
        labels = investigate.session_options(view.sessions)
        state[f"_inv_sessions_{user}"] = tuple(labels)  # what a behaviour row may pick
        sid = right.selectbox(
            "Session graph for", list(labels), format_func=labels.get, key=f"inv_s_{user}"
        )
        graph = graphs.session_transition_graph(
            investigate.session_events(events, str(sid)), population
        )
        right.plotly_chart(graphs.graph_figure(graph, height=300), key="inv_session_graph")
        right.caption("Blue: this session's moves · red: rare in the population · grey: typical.")

    session_panel()

st.subheader("Linked accounts")
hood = view.neighbourhood
if hood.own_entities.empty and hood.shared.empty:
    # Logs without device, IP or card columns (clickstreams, log keys): say so, not a lone dot.
    st.info(f"No device, IP or card is recorded for {user}: there are no linked accounts.")
else:
    entity = graphs.entity_graph(
        user, hood.shared, hood.scores, hood.labels, own_entities=hood.own_entities
    )
    key = f"inv_entities_{user}"
    st.plotly_chart(
        graphs.graph_figure(entity, height=440),
        key=key,
        on_select=lambda: on_entity_click(key, user),
        selection_mode="points",
    )
    hidden = entity.graph["hidden_users"]
    st.caption(
        "Devices (■), IPs (◆) and cards (▲) of this user and who shares them; users coloured "
        "by label (red fraud, green legit, orange unsure), else by score. Click a user to "
        "open it." + (f" {hidden} more linked users not drawn." if hidden else "")
    )

if not events.empty:
    # Imported here, after the timeline and graphs are on their way to the browser: the
    # explanation engine pulls in torch and Captum (pages._serve imports them at start-up).
    from pages import _explain_panel as explain_panel

    explain_panel.render(
        db_path=ctx.db_path,
        model_id=ctx.model_id,
        model_path=ctx.model_path,
        user=user,
        start=ctx.start,
        end=ctx.end,
        threshold=ctx.threshold,
        weight=weight,
        version=version,
        events=events,
        timeline=lambda attribution: attribution_timeline(ask, attribution),
        open_user=open_user,
    )

with st.expander(f"Raw events ({len(events):,})"):
    st.dataframe(events, hide_index=True)

st.subheader("Decision")
left, right = st.columns(2)
with left, st.form("inv_label_form", clear_on_submit=True):
    label = st.radio("Label", cases.LABELS, horizontal=True, key="inv_label")
    note = st.text_area("Note", key="inv_label_note")
    if st.form_submit_button(f"Label {user}"):
        act(
            lambda con: cases.add_label(con, user, label, ctx.analyst, note),
            f"Labelled {user} as {label}.",
        )
with right, st.form("inv_case_form", clear_on_submit=True):
    choices = case_choices(ctx.db_path, version)
    target = st.selectbox("Case", list(choices), key="inv_case_target")
    title = st.text_input("Title (new case)", key="inv_case_title")
    case_note = st.text_area("Note", key="inv_case_note")
    pin = st.checkbox("Pin the 10 most surprising events", value=True, key="inv_case_pin")
    if st.form_submit_button("Open case / add to case"):
        case_id = choices.get(target)
        act(
            lambda con: investigate.file_in_case(
                con,
                ctx.analyst,
                user,
                case_id,
                events=events,
                pin_top=10 if pin else 0,
                title=title,
                note=case_note,
            ),
            f"Opened a case for {user}." if case_id is None else f"Added {user} to #{case_id}.",
        )
