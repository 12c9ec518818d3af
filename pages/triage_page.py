"""Triage: who is alerting in the time range. Selecting a row opens Investigate for that user."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pandas as pd
import streamlit as st

from core import alert_charts, alerts, cases, rings, store
from core.scoring import LoadedModel
from pages._shared import context, loaded_model, require_database, require_model

state = st.session_state
if opened := state.pop("_tri_open", None):
    # A queue row was selected (see open_selected): switch before drawing anything, so the
    # browser goes straight to Investigate instead of first re-rendering this page.
    st.switch_page("pages/investigate_page.py", query_params={"user": opened})

ctx = context()
st.title("Triage")
require_database(ctx)
require_model(ctx)
assert ctx.model_id is not None and ctx.model_path is not None


@st.cache_data(ttl=10, max_entries=4, show_spinner=False)
def db_version(db_path: str, model_id: str) -> tuple[int, float | None]:
    """Audit rows (grow with every label / case change) and the saved weight: cache keys
    below, so analyst actions show up at once without clearing every cache."""
    with store.open_db(db_path) as con:
        setting = alerts.saved_setting(con, model_id)
        return cases.audit_count(con), setting.weight if setting else None


@st.cache_data(ttl=300, max_entries=16, show_spinner=False)
def options(db_path: str, start: datetime | None, end: datetime | None) -> tuple[list, list]:
    with store.open_db(db_path) as con:
        return alerts.filter_options(con, start, end)


@st.cache_data(ttl=120, max_entries=32, show_spinner="Finding alerts…")
def triage_data(
    db_path: str,
    model_id: str,
    model_path: str,
    start: datetime | None,
    end: datetime | None,
    threshold: float,
    weight: float | None,
    filters: tuple[tuple[str, ...], tuple[str, ...], int],
    version: int,
) -> tuple[
    alerts.RangeKpis, pd.DataFrame, int, pd.DataFrame, pd.DataFrame, pd.DataFrame, str | None
]:
    """KPIs, the queue's first rows, how many alerts pass the filters, every active user's
    score (user_id, score), alerts per day, the watchlist, and a problem to show (on-demand
    scoring failed).
    A plain tuple: st.cache_data pickles it, and a class defined in a page script would not
    unpickle across reruns."""

    def load() -> LoadedModel:
        return loaded_model(model_path)

    queue_filters = alerts.queue_filters(*filters)
    problem = None
    with store.open_db(db_path) as con:
        # One scan of the range for every question below (scoring unscored users once).
        try:
            everyone = alerts.active_scores(con, model_id, start, end, weight=weight, load=load)
        except store.StoreError:
            raise
        except Exception as exc:  # a model that does not load or score: stored scores only
            problem = f"Could not score the new users now ({exc}); showing stored scores only."
            everyone = alerts.active_scores(con, model_id, start, end, weight=weight)
        kpis = alerts.range_kpis(con, model_id, start, end, threshold, users=everyone)
        users = (
            everyone
            if queue_filters == alerts.QueueFilters()
            else alerts.active_scores(
                con, model_id, start, end, filters=queue_filters, weight=weight
            )
        )
        queue = alerts.alert_queue(con, model_id, start, end, threshold, users=users)
        per_day = alerts.daily_alerts(con, model_id, start, end, threshold, weight=weight)
        # at the loosest level: each tighter level is its rows at or above that level
        watch = alerts.novelty_watchlist(
            con,
            model_id,
            start,
            end,
            threshold,
            min_percentile=min(alerts.WATCH_LEVELS),
            users=users,
        )
        scores = everyone[["user_id", "score"]].reset_index(drop=True)
        n_queue = int((users["score"] >= threshold).sum())
    return kpis, queue, n_queue, scores, per_day, watch, problem


@st.cache_data(ttl=120, max_entries=8, show_spinner="Looking for shared devices, cards and IPs…")
def shared_entities(
    db_path: str,
    start: datetime | None,
    end: datetime | None,
    scores: pd.DataFrame,
    threshold: float,
    version: int,
) -> pd.DataFrame:
    with store.open_db(db_path) as con:
        return rings.shared_entities_in_range(con, start, end, scores, threshold)


def opens_user(key: str, user_of_row: pd.Series) -> Callable[[], None]:
    """on_select for a table keyed ``key``: the selected row's user opens in Investigate
    (the switch happens at the top of the next run, see ``_tri_open``)."""

    def open_selected() -> None:
        rows = state[key]["selection"]["rows"]
        if rows:
            state["_tri_open"] = str(user_of_row.iloc[rows[0]])

    return open_selected


def shared_entity_table(groups: pd.DataFrame, key: str) -> None:
    """Entities several accounts share; selecting a row opens its highest-scoring user."""

    st.dataframe(
        groups,
        key=key,
        hide_index=True,
        on_select=opens_user(key, groups["top_user"]),
        selection_mode="single-row",
        column_config={
            "value": st.column_config.TextColumn("value", pinned=True),
            "users": st.column_config.NumberColumn("users", help="Users with it in the range."),
            "alerts": st.column_config.NumberColumn(
                "alerts", help="Of those, users at or above the threshold."
            ),
            "labelled_fraud": st.column_config.NumberColumn("labelled fraud"),
            "max_score": st.column_config.ProgressColumn(
                "max score", format="%.3f", min_value=0.0, max_value=1.0
            ),
            "top_user": st.column_config.TextColumn("top user"),
            "opened_together": st.column_config.NumberColumn(
                "opened together",
                help=f"The most of its accounts first seen within {rings.TOGETHER_HOURS:.0f} h "
                "of each other (accounts already there on the log's first day are not counted: "
                "their first sighting is the log's start).",
            ),
            "first_seen": st.column_config.DatetimeColumn("first seen", format="YYYY-MM-DD HH:mm"),
            "last_seen": st.column_config.DatetimeColumn("last seen", format="YYYY-MM-DD HH:mm"),
            "user_ids": st.column_config.TextColumn("users (highest score first)", width="large"),
        },
    )


def user_table(users: pd.DataFrame, key: str) -> None:
    """A queue of users (alerts.QUEUE_COLUMNS); selecting a row opens Investigate."""

    st.dataframe(
        users.assign(percentile=users["percentile"] * 100),
        key=key,
        hide_index=True,
        on_select=opens_user(key, users["user_id"]),
        selection_mode="single-row",
        column_config={
            "user_id": st.column_config.TextColumn("user", pinned=True),
            "score": st.column_config.ProgressColumn(
                "score", format="%.3f", min_value=0.0, max_value=1.0
            ),
            "percentile": st.column_config.NumberColumn("percentile", format="%.1f"),
            "supervised": st.column_config.NumberColumn("supervised", format="%.3f"),
            "last_seen": st.column_config.DatetimeColumn("last seen", format="YYYY-MM-DD HH:mm"),
            "main_reason": st.column_config.TextColumn(
                "main reason",
                width="large",
                help=f"Event types among the user's {cases.REASON_EVENTS} most surprising "
                "events in the range: 'login ×3 at …' = 3 of them are logins, the most "
                "surprising of those at …",
            ),
        },
    )


version, weight = db_version(ctx.db_path, ctx.model_id)
event_types, countries = options(ctx.db_path, ctx.start, ctx.end)
st.caption(
    f"Model `{ctx.model_id}` · threshold {ctx.threshold:.2f}"
    + (f" · unsupervised weight {weight:.2f} (saved)" if weight is not None else "")
    + " · alerts are users active in the range whose full-history score is at or above it."
)

with st.expander("Filters", expanded=False):
    f1, f2, f3 = st.columns([2, 2, 1])
    chosen_types = f1.multiselect("Event type (any event of)", event_types, key="tri_types")
    chosen_countries = f2.multiselect("Country (any event from)", countries, key="tri_countries")
    min_events = f3.number_input("Minimum events", min_value=1, value=1, step=1, key="tri_min")

try:
    kpis, queue, n_queue, scores, per_day, watch, problem = triage_data(
        ctx.db_path,
        ctx.model_id,
        ctx.model_path,
        ctx.start,
        ctx.end,
        ctx.threshold,
        weight,
        (tuple(sorted(chosen_types)), tuple(sorted(chosen_countries)), int(min_events)),
        version,
    )
except (store.StoreError, FileNotFoundError, OSError) as exc:
    st.error(f"Could not load the alerts: {exc}")
    st.stop()

if problem:
    st.warning(problem)
k1, k2, k3, k4 = st.columns(4)
k1.metric("Events", f"{kpis.n_events:,}")
k2.metric("Active users", f"{kpis.n_active_users:,}")
k3.metric("Alerts", f"{kpis.n_alerts:,}", help="Active users at or above the threshold.")
share = kpis.labelled_share
k4.metric("Labelled alerts", "—" if share is None else f"{share:.0%}")
if kpis.n_scored < kpis.n_active_users:
    st.warning(f"{kpis.n_active_users - kpis.n_scored:,} active users have no score yet.")

shown = f"{len(queue):,}" if len(queue) == n_queue else f"first {len(queue):,} of {n_queue:,}"
st.subheader(f"Alert queue ({shown})")
if queue.empty:
    st.info(
        "No alerts in this range at this threshold (and filters). Lower the threshold in the "
        "sidebar or widen the time range."
    )
else:
    user_table(queue, "tri_queue")
    st.caption("Select a row to investigate that user.")

level = float(state.get("tri_watch_level") or alerts.NOVELTY_PERCENTILE)
watch = watch.loc[watch["percentile"] >= level].reset_index(drop=True)
with st.expander(f"Unusual but not alerted ({len(watch):,})"):
    supervised = pd.concat([queue, watch])["supervised"].notna().any()
    st.caption(
        "Users the unsupervised model finds rarer than most training users, yet under the "
        "threshold: the supervised scores, which know only the fraud labelled so far, "
        "outweighed it. Fraud nobody has labelled yet looks like this (see "
        "benchmarks/results/bench_novelty.md). Select a row to investigate."
        if supervised
        else "Users rarer than most training users, yet under the threshold. This model has "
        "no supervised head, so its score is that rarity itself: these are the users between "
        "the level chosen here and the threshold. Select a row to investigate."
    )
    st.segmented_control(
        "Rarer than",
        sorted(alerts.WATCH_LEVELS, reverse=True),
        default=alerts.NOVELTY_PERCENTILE,
        format_func=lambda level: f"{level:.0%} of training users",
        key="tri_watch_level",
    )
    if watch.empty:
        st.info("Nobody at this level: every such user is already in the queue, or none is active.")
    else:
        user_table(watch, "tri_watch")

if st.toggle(
    "Accounts sharing a device, card or IP",
    key="tri_rings",
    help="Multi-accounting (coupon and referral rings, mule networks) hides from a model that "
    "reads one user at a time: each account alone looks ordinary. The link shows here.",
):
    groups = shared_entities(ctx.db_path, ctx.start, ctx.end, scores, ctx.threshold, version)
    kinds = [k for k in rings.ENTITY_ORDER if (groups["entity"] == k).any()]
    if not kinds:
        st.info("No device, card or IP is shared by two or more users active in this range.")
    else:
        kind = st.segmented_control("Shared", kinds, default=kinds[0], key="tri_ring_kind")
        shown_groups = groups.loc[groups["entity"] == (kind or kinds[0])].reset_index(drop=True)
        st.caption(
            "Devices and cards are personal: a few accounts on one are a lead. IPs are shared by "
            "households, offices and carriers. Most accounts opened together first. Select a row "
            "to investigate its highest-scoring user (the entity graph shows the others)."
        )
        shared_entity_table(shown_groups.drop(columns="entity"), "tri_rings_table")

left, right = st.columns(2)
left.plotly_chart(
    alert_charts.score_histogram(scores["score"].to_numpy(dtype=float), ctx.threshold),
    key="tri_hist",
)
right.plotly_chart(alert_charts.alerts_per_day_chart(per_day), key="tri_per_day")
