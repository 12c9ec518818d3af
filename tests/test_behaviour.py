"""Kinds of behaviour that carry the score (core.behaviour), against a reference computed here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core import store
from core.behaviour import behaviour_groups, groups_frame
from core.explain import ExplainSettings, displayed_scores, explain_events
from core.scoring import LoadedModel, load_model
from tests.conftest import DemoEnv, burst_users


@pytest.fixture(scope="module")
def loaded(demo_env: DemoEnv) -> LoadedModel:
    return load_model(demo_env.models_dir / demo_env.model_id, device="cpu")


@pytest.fixture(scope="module")
def burst_user(demo_env: DemoEnv) -> pd.DataFrame:
    """The fraudulent user with many injected events (a scripted burst) that the model scores
    highest, whole history."""
    (user,) = burst_users(demo_env.db_path, demo_env.model_id)
    with store.open_db(demo_env.db_path, read_only=True) as con:
        return store.user_events(con, user)


def test_groups_are_attribution_sums_and_their_removal_is_rescored(
    loaded: LoadedModel, burst_user: pd.DataFrame
) -> None:
    events = burst_user
    att = explain_events(loaded, events, ExplainSettings(n_steps=8))
    groups = behaviour_groups(loaded, events, att)
    assert groups and {g.kind for g in groups} == {"event type", "session"}

    window = events.set_index("event_id").loc[att.event_ids]
    per_event = att.per_event
    positive = per_event[per_event > 0].sum()
    encoded = loaded.featurizer.transform(events)
    for kind, column in (("event type", "event_type"), ("session", "session_id")):
        sums = pd.Series(per_event, index=window[column].to_numpy()).groupby(level=0).sum()
        expected = sums[sums > 0].sort_values(ascending=False).head(3)
        mine = [g for g in groups if g.kind == kind]
        assert [g.key for g in mine] == [str(k) for k in expected.index]
        for g in mine:
            assert g.share == pytest.approx(expected[g.key] / positive, rel=1e-9)
            members = np.flatnonzero(window[column].to_numpy() == g.key)
            assert g.n_events == members.size
            assert g.first_ts == pd.Timestamp(att.ts[members].min()).to_pydatetime()
            keep = np.setdiff1d(np.arange(att.event_ids.size), members)
            if keep.size == 0:
                assert np.isnan(g.score_without)
                continue
            reference = displayed_scores(loaded, encoded, [att.window_rows[keep]], events=events)
            assert g.score_without == pytest.approx(float(reference[0]), abs=1e-6)
    table = groups_frame(groups)
    assert list(table["key"]) == [g.key for g in groups]


def test_a_group_of_every_explained_event_is_not_rescored(
    loaded: LoadedModel, burst_user: pd.DataFrame
) -> None:
    one_session = burst_user.assign(session_id="s-all")
    att = explain_events(loaded, one_session, ExplainSettings(n_steps=8))
    sessions = [g for g in behaviour_groups(loaded, one_session, att) if g.kind == "session"]
    assert len(sessions) == 1 and sessions[0].n_events == att.event_ids.size
    assert np.isnan(sessions[0].score_without) and np.isnan(sessions[0].target_without)


def test_a_range_groups_only_its_own_events(loaded: LoadedModel, burst_user: pd.DataFrame) -> None:
    start = burst_user["ts"].iloc[len(burst_user) // 2]
    att = explain_events(loaded, burst_user, ExplainSettings(n_steps=8), start=start)
    groups = behaviour_groups(loaded, burst_user, att)
    assert groups
    for g in groups:
        assert g.first_ts >= start.to_pydatetime()
    by_type = [g for g in groups if g.kind == "event type"]
    assert sum(g.n_events for g in by_type) <= att.n_events
