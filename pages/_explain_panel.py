"""Investigate's "why" panels: attributions, the deletion check, similar cases, the summary.

Kept apart from investigate_page.py so that page stays a layout; everything computed here is
core (core.evidence, core.narrate, core.similar) behind Streamlit caches.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime

import duckdb
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import charts, evidence, similar, store
from core.behaviour import groups_frame
from core.config import Settings, get_settings
from core.jobs import KeyedJobs
from core.narrate import (
    Narrator,
    Summary,
    SummaryCache,
    TemplateNarrator,
    make_narrator,
    narrate,
)
from pages._shared import blank_missing, loaded_model


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def population(db_path: str, start: datetime | None, end: datetime | None) -> pd.DataFrame:
    with store.open_db(db_path) as con:
        return evidence.population_statistics(con, start, end)


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def vocabulary(db_path: str, version: int) -> tuple[str, ...]:
    with store.open_db(db_path) as con:
        return evidence.event_vocabulary(con)


@st.cache_resource(show_spinner=False)
def explain_jobs() -> KeyedJobs:
    """Explanations are computed on one background thread: the page draws its timeline and
    graphs, then a placeholder, and its script ends; the attributions follow when ready."""
    return KeyedJobs()


def explanation_key(
    db_path: str,
    model_path: str,
    user: str,
    start: datetime | None,
    end: datetime | None,
    weight: float | None,
    version: int,
) -> tuple:
    """What one explanation depends on: the page looks its job up by it before starting one.
    Not the threshold: the attributions and the deletion check do not depend on it, and the
    page reads the result against the current one (evidence.at_threshold)."""
    return (db_path, model_path, user, start, end, weight, version)


def explanation_job(
    db_path: str,
    model_path: str,
    user: str,
    start: datetime | None,
    end: datetime | None,
    threshold: float,
    weight: float | None,
    version: int,
) -> Future:
    """The user's explanation, computing or done. The model and the population statistics
    come from the page's caches (resolved here, in the script thread); the job itself is core
    only (core.evidence), with no Streamlit call off the script thread."""
    key = explanation_key(db_path, model_path, user, start, end, weight, version)
    loaded = loaded_model(model_path)
    pop = population(db_path, start, end)
    words = vocabulary(db_path, version)

    def compute() -> evidence.Explanation | None:
        # The path, not a connection: the file is open only for the reads around Captum.
        return evidence.explain_user(
            db_path,
            loaded,
            user,
            start,
            end,
            threshold=threshold,
            population=pop,
            weight=weight,
            vocabulary=words,
        )

    return explain_jobs().get(key, compute)


@st.cache_resource(show_spinner=False)
def summary_cache() -> SummaryCache:
    return SummaryCache(maxsize=256)


@st.cache_resource(max_entries=4, show_spinner=False)
def narrator_for(settings: Settings) -> Narrator:
    """One narrator per backend setting (a local LM loads its weights once, not per user)."""
    return make_narrator(settings)


def write_summary(found: evidence.Explanation) -> Summary:
    settings = get_settings()
    try:
        narrator = narrator_for(settings)
    except ValueError as exc:
        st.warning(f"Summary backend not usable ({exc}); using the template.")
        narrator = TemplateNarrator()
    return narrate(found.facts, narrator, cache=summary_cache())


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def plain(text: str) -> str:
    """Markdown-escaped text: a summary (or data it quotes) cannot render links or images."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text)


@st.cache_data(ttl=120, max_entries=32, show_spinner=False)
def similar_cases(db_path: str, model_id: str, user: str, version: int) -> pd.DataFrame | None:
    with store.open_db(db_path) as con:
        if not similar.has_embeddings(con, model_id):
            return None
        return similar.similar_users(con, model_id, user, k=8)


def _failed_key(key: tuple) -> str:
    return f"_explain_failed_{hash(key)}"


def wait_for(key: tuple, start_job: Callable[[], Future]) -> None:
    """A placeholder that starts the explanation and polls it; once it is done it reruns the
    page (which then draws the panels and stops polling: the fragment is only defined while a
    job runs).

    The job starts on the poll's first tick after the page's own run, not during it: its
    torch, DuckDB and LightGBM work would otherwise take the cores while the browser draws the
    timeline and graphs the analyst came for (measured on 2 cores: the three plots drew ~0.5 s
    later). A later run of the page (a widget, a test's rerun) starts it at once."""
    seen = f"_explain_seen_{hash(key)}"

    @st.fragment(run_every=0.4)
    def poll() -> None:
        if st.session_state.get(seen):
            try:
                job = explain_jobs().peek(key) or start_job()
            except Exception as exc:  # a model that does not load must not take the page down
                # kept for this key, and the page rerun without the poll: no reload every tick
                st.session_state[_failed_key(key)] = str(exc)
                st.rerun()
            if job.done():
                st.rerun()
        else:
            st.session_state[seen] = True
        st.caption(":material/hourglass_top: Attributing the score to events…")

    poll()


def render(
    *,
    db_path: str,
    model_id: str | None,
    model_path: str | None,
    user: str,
    start: datetime | None,
    end: datetime | None,
    threshold: float,
    weight: float | None,
    version: int,
    events: pd.DataFrame,
    timeline: Callable[[pd.DataFrame | None], go.Figure],
    open_user: Callable[[str], None],
) -> None:
    """Draw the panels, or a placeholder that polls while they are computed in the
    background. ``timeline(attribution)`` redraws the score timeline coloured by attribution
    (None: by event type)."""
    if not model_path or not model_id:
        st.info("Attributions need a model: train one on the Data & model page.")
        return
    key = explanation_key(db_path, model_path, user, start, end, weight, version)
    failed = st.session_state.get(_failed_key(key))
    if failed is not None:
        st.error(f"Could not explain {user}: {failed}")
        return
    job = explain_jobs().peek(key)
    if job is None or not job.done():
        wait_for(
            key,
            lambda: explanation_job(
                db_path, model_path, user, start, end, threshold, weight, version
            ),
        )
        return
    if job.exception() is not None:  # a model that cannot explain must not take the page down
        st.error(f"Could not explain {user}: {job.exception()}")
        return
    found = job.result()
    if found is None:
        st.info("No events in this range to explain.")
        return
    found = evidence.at_threshold(found, threshold)
    att = found.attribution

    with st.container(border=True, key="inv_attributions"):
        st.subheader("Why this score")
        st.markdown(f"**{found.counterfactual.sentence()}**")
        window = (
            f"the {att.n_events} events of the highest-scoring window of {att.n_events_total:,}"
            if att.n_events < att.n_events_total
            else f"all {att.n_events:,} events"
        )
        st.caption(
            f"Integrated gradients ({att.settings.n_steps} steps) of the "
            f"{'supervised fraud logit' if att.target == 'supervised' else 'typicality score'} "
            f"over {window}, against a {att.baseline.split(' (')[0]} at every position; "
            f"convergence delta {att.delta:.3g}."
            + (
                f" The {att.n_context} events before the range were read as context only"
                " (what the model knew when the range began), not ranked; they carry"
                f" {att.context_share:.0%} of the positive attribution, the shares below are"
                " of the rest."
                if att.n_context
                else ""
            )
            + (
                f" The first {att.deletion_path.size} events listed were picked by a deletion"
                f" search among the {min(att.settings.deletion_pool, att.n_events)} most"
                " attributed: the ones whose removal lowers the score most."
                if att.deletion_path.size
                else ""
            )
            + (f" {att.uncredited_picks_sentence()}" if att.picked_without_credit else "")
        )
        colour = st.toggle("Colour the timeline by attribution", key=f"inv_attr_tl_{user}")
        if colour:
            st.plotly_chart(timeline(found.timeline_attribution), key="inv_attr_timeline")
        left, right = st.columns([2, 3])
        left.plotly_chart(charts.field_attribution_bar(att.field_totals()), key="inv_fields")
        # The fraud probability as the deletion search removed its picks one by one (the
        # typicality score's raw scale would mean nothing to an analyst: shown for the head only).
        path = "target_without" if att.target == "supervised" and att.ranking.size else None
        table = found.top_events.loc[
            :,
            [
                c
                for c in ("ts", "event_type", "share", path, "top_field", "category", "price")
                + ("device_id", "ip", "country", "event_id")
                if c in found.top_events.columns
            ],
        ]
        right.dataframe(
            blank_missing(table, {"target_without": "{:.2f}", "price": "{:,.2f}"}),
            hide_index=True,
            height=300,
            column_config={
                "share": st.column_config.ProgressColumn(
                    "share", format="percent", min_value=0.0, max_value=1.0
                ),
                "ts": st.column_config.DatetimeColumn("time", format="YYYY-MM-DD HH:mm"),
                "target_without": st.column_config.TextColumn(
                    "fraud prob. without",
                    help=f"The fraud probability ({att.own_scale_value:.2f} with every"
                    " event) once this event and the ones listed above it are removed",
                ),
            },
        )

        if found.behaviour:
            behaviour_table(found)
        else:
            st.caption(
                "No kind of behaviour (an event type, a session) raises the score as a whole."
            )

    if found.account_signals is not None and found.facts.account_probability is not None:
        with st.container(border=True, key="inv_account"):
            st.subheader("Account-level signals")
            st.caption(
                f"The account-level model gives {found.facts.account_probability:.2f} over the "
                "whole history. These aggregates raised it most (TreeSHAP, in log-odds), "
                "beside the training users' median."
            )
            if found.account_signals.empty:
                st.write("No aggregate raises this user's fraud probability.")
            else:
                st.dataframe(
                    found.account_signals[["label", "value", "median", "contribution"]],
                    hide_index=True,
                    column_config={
                        "label": "aggregate",
                        "value": st.column_config.NumberColumn("user", format="%.3g"),
                        "median": st.column_config.NumberColumn("median", format="%.3g"),
                        "contribution": st.column_config.NumberColumn("log-odds +", format="%.2f"),
                    },
                )

    with st.container(border=True, key="inv_similar"):
        st.subheader("Similar past cases")
        near = similar_cases(db_path, model_id, user, version)
        if near is None:
            st.caption("Similar cases need user embeddings: rescore with this model.")
        elif near.empty:
            st.caption("No similar users.")
        else:
            key = f"inv_similar_{user}"

            def on_pick() -> None:  # a callback: may move the user picker drawn above
                rows = st.session_state[key].selection.rows
                if rows:
                    open_user(str(near["user_id"].iloc[rows[0]]))

            st.dataframe(
                blank_missing(near, {}, text=("label", "case")),
                hide_index=True,
                key=key,
                on_select=on_pick,
                selection_mode="single-row",
                column_config={
                    "similarity": st.column_config.NumberColumn(format="%.3f"),
                    "score": st.column_config.NumberColumn(format="%.2f"),
                },
            )
            st.caption("Users whose behaviour the model encodes most alike; select one to open it.")

    with st.container(border=True, key="inv_summary"):
        st.subheader("Summary")
        summary = write_summary(found)
        if summary.flagged and summary.fallback_text:
            st.warning(
                f"Written by {summary.backend} — NOT GROUNDED: "
                + "; ".join(summary.grounding.problems[:5])
            )
            left, right = st.columns(2)
            left.markdown("**Model text (unverified)**")
            left.markdown(plain(summary.text))
            right.markdown("**Template summary (grounded)**")
            right.markdown(plain(summary.fallback_text))
        elif summary.flagged:  # the template itself cites something the facts lack: a bug
            st.error(
                "The summary cites values not in the evidence ("
                + "; ".join(summary.grounding.problems[:5])
                + "). Rely on the attributions above."
            )
            st.markdown(plain(summary.text))
        else:
            if summary.message:
                st.info(summary.message)
            st.markdown(plain(summary.text))
            st.caption(
                f"Written by **{summary.backend}** · grounded: every number, time, event and "
                "entity it cites is in the evidence above."
            )
        # Keep what the analyst was shown (case exports carry it): once per view of a user.
        kept = (model_id, user, start, end, summary.backend)
        if st.session_state.get("_inv_kept") != kept:
            try:
                with store.open_db(db_path) as con:
                    evidence.save_explanation(con, found, summary)
                st.session_state["_inv_kept"] = kept
            except (store.StoreError, duckdb.Error) as exc:  # never a stack trace on the page
                st.caption(f"Explanation not kept for exports ({exc}).")


def behaviour_table(found: evidence.Explanation) -> None:
    """The kinds of behaviour (event types, sessions) that carry the score, and the score of
    the explained window without each (core.behaviour)."""
    st.markdown("**Behaviour that carries the score**")
    shown = ["kind", "key", "n_events", "share", "first_ts", "last_ts", "score_without"]
    table = groups_frame(list(found.behaviour))[shown]
    user = found.facts.user_id
    key = f"inv_behaviour_{user}"

    def on_pick() -> None:  # a callback: may move the session picker drawn above
        rows = st.session_state[key].selection.rows
        group = found.behaviour[rows[0]] if rows else None
        if group is not None and group.kind == "session":
            show_session(user, group.key)

    st.dataframe(
        blank_missing(table, {"score_without": "{:.2f}"}),
        hide_index=True,
        key=key,
        on_select=on_pick,
        selection_mode="single-row",
        column_config={
            "key": "event type / session",
            "n_events": st.column_config.NumberColumn("events", format="%d"),
            "share": st.column_config.ProgressColumn(
                "share", format="percent", min_value=0.0, max_value=1.0
            ),
            "first_ts": st.column_config.DatetimeColumn("from", format="YYYY-MM-DD HH:mm"),
            "last_ts": st.column_config.DatetimeColumn("to", format="YYYY-MM-DD HH:mm"),
            "score_without": st.column_config.TextColumn(
                "score without",
                help="The explained window's score once every event of the group is removed"
                " (empty: the group is every explained event)",
            ),
        },
    )
    if any(g.kind == "session" for g in found.behaviour):
        st.caption("Select a session to draw its graph under Sessions above.")


def show_session(user: str, session_id: str) -> None:
    """Point the Investigate page's session picker (key ``inv_s_<user>``, drawn above, with
    its session graph) at a session, when the page offers it (the same range)."""
    offered = st.session_state.get(f"_inv_sessions_{user}", ())
    if session_id in offered:
        st.session_state[f"inv_s_{user}"] = session_id
