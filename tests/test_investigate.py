"""core.investigate against independent pandas computations on the demo world."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from core import cases, investigate, store
from core.scoring import load_model


@pytest.fixture(scope="module")
def frames(demo_env) -> dict[str, pd.DataFrame]:
    with store.open_db(demo_env.db_path) as con:
        return {
            "events": con.execute("SELECT * FROM events").df(),
            "event_scores": con.execute(
                "SELECT event_id, surprisal FROM event_scores WHERE model_id = ?",
                [demo_env.model_id],
            ).df(),
            "scores": con.execute(
                "SELECT * FROM sequence_scores WHERE model_id = ? AND window_start IS NULL",
                [demo_env.model_id],
            ).df(),
        }


def busiest_user(frames) -> str:
    return str(frames["events"]["user_id"].value_counts().index[0])


def test_timeline_is_the_users_events_with_stored_surprisal(demo_env, frames) -> None:
    user = busiest_user(frames)
    events = frames["events"]
    start, end = (
        events["ts"].min() + pd.Timedelta(days=3),
        events["ts"].max() - pd.Timedelta(days=3),
    )
    with store.open_db(demo_env.db_path) as con:
        tl = investigate.user_timeline(con, user, demo_env.model_id, start, end)
    mine = events[(events["user_id"] == user) & (events["ts"] >= start) & (events["ts"] < end)]
    expected = mine.merge(frames["event_scores"], on="event_id").sort_values(["ts", "event_id"])
    assert tl.source == "stored"
    assert tl.events["event_id"].tolist() == expected["event_id"].tolist()
    np.testing.assert_allclose(tl.events["surprisal"], expected["surprisal"])


def test_sessions_match_a_pandas_groupby(demo_env, frames) -> None:
    user = busiest_user(frames)
    with store.open_db(demo_env.db_path) as con:
        tl = investigate.user_timeline(con, user, demo_env.model_id)
    sessions = investigate.user_sessions(tl.events).set_index("session_id")
    groups = tl.events.groupby("session_id")
    assert set(sessions.index) == set(groups.groups)
    pd.testing.assert_series_equal(
        sessions["n_events"].sort_index(), groups.size().sort_index(), check_names=False
    )
    pd.testing.assert_series_equal(
        sessions["max_surprisal"].sort_index(),
        groups["surprisal"].max().sort_index(),
        check_names=False,
    )
    assert sessions["max_surprisal"].is_monotonic_decreasing
    one = sessions.index[0]
    assert len(investigate.session_events(tl.events, one)) == sessions.loc[one, "n_events"]


def test_population_transitions_match_pandas(demo_env, frames) -> None:
    ev = frames["events"].sort_values(["user_id", "session_id", "ts", "event_id"])
    ev["prev"] = ev.groupby(["user_id", "session_id"])["event_type"].shift(1)
    pairs = ev.dropna(subset=["prev"]).groupby(["prev", "event_type"]).size()
    with store.open_db(demo_env.db_path) as con:
        got = investigate.population_transitions(con)
    got = got.set_index(["event_type", "next_event_type"])
    assert got["n"].sum() == pairs.sum()
    for (a, b), n in pairs.items():
        assert got.loc[(a, b), "n"] == n
    np.testing.assert_allclose(got.groupby(level=0)["prob"].sum(), 1.0)


def test_header_neighbourhood_and_top_users(demo_env, frames) -> None:
    scores = frames["scores"].sort_values("score", ascending=False)
    user = str(scores["user_id"].iloc[0])
    with store.open_db(demo_env.db_path) as con:
        top = investigate.top_users(con, demo_env.model_id, limit=5)
        head = investigate.user_header(con, user, demo_env.model_id)
        hood = investigate.entity_neighbourhood(con, user, demo_env.model_id)
        shared = store.shared_entities(con, user)
        assert investigate.user_header(con, "no-such-user", demo_env.model_id) is None
        assert investigate.user_view(con, "no-such-user", demo_env.model_id) is None
    assert top["user_id"].tolist() == scores["user_id"].head(5).tolist()
    assert head is not None and head.score == pytest.approx(scores["score"].iloc[0])
    assert head.n_events == head.n_events_total == (frames["events"]["user_id"] == user).sum()
    assert head.label is None and head.open_cases == ()
    pd.testing.assert_frame_equal(hood.shared, shared)
    mine = frames["events"][frames["events"]["user_id"] == user]
    for kind, value, n in hood.own_entities.itertuples(index=False):
        assert (mine[kind] == value).sum() == n
    linked = set(shared["other_user_id"]) | {user}
    assert set(hood.scores["user_id"]) <= linked
    assert user in set(hood.scores["user_id"])


def test_weight_recombines_the_header_score(demo_env, frames) -> None:
    row = frames["scores"].iloc[0]
    with store.open_db(demo_env.db_path) as con:
        head = investigate.user_header(con, str(row["user_id"]), demo_env.model_id, weight=1.0)
    assert head is not None and head.score == pytest.approx(row["percentile_unsupervised"])


def test_label_and_case_show_in_the_header(demo_db_copy, frames) -> None:
    user = busiest_user(frames)
    with store.open_db(demo_db_copy.db_path) as con:
        cases.add_label(con, user, "fraud", "ana", "card testing")
        tl = investigate.user_timeline(con, user, demo_db_copy.model_id)
        case_id = investigate.file_in_case(
            con, "ana", user, None, events=tl.events, pin_top=3, title="t"
        )
        head = investigate.user_header(con, user, demo_db_copy.model_id)
        pinned = con.execute("SELECT event_id FROM case_events WHERE case_id = ?", [case_id]).df()
        assert list(investigate.case_choices(con).values()) == [None, case_id]
    assert head is not None and head.label == "fraud" and head.label_analyst == "ana"
    assert head.label_note == "card testing" and head.open_cases == (case_id,)
    assert set(pinned["event_id"]) == set(tl.events.nlargest(3, "surprisal")["event_id"])


def test_user_without_stored_scores_is_scored_on_demand(demo_db_copy) -> None:
    one = pd.DataFrame(
        {
            "ts": [datetime(2026, 10, 10, 12, 0)],
            "user_id": ["solo"],
            "event_type": ["login"],
            "device_id": ["dev-solo"],
        }
    )
    with store.open_db(demo_db_copy.db_path) as con:
        store.ingest_dataframe(con, one, source="one-event")
        model_path = con.execute(
            "SELECT path FROM models WHERE model_id = ?", [demo_db_copy.model_id]
        ).fetchall()[0][0]
        before = investigate.user_timeline(con, "solo", demo_db_copy.model_id)
        calls: list[int] = []

        def load():
            calls.append(1)
            return load_model(model_path)

        after = investigate.user_timeline(con, "solo", demo_db_copy.model_id, load_model=load)
        again = investigate.user_timeline(con, "solo", demo_db_copy.model_id, load_model=load)
        head = investigate.user_header(con, "solo", demo_db_copy.model_id)
    assert before.source == "none" and before.events["surprisal"].isna().all()
    assert after.source == "on_demand" and after.events["surprisal"].notna().all()
    assert again.source == "stored" and len(calls) == 1  # written back, not scored twice
    assert head is not None and head.score is not None and head.n_events == 1


def test_event_alert_level_is_the_population_quantile(demo_env, frames) -> None:
    with store.open_db(demo_env.db_path) as con:
        level = investigate.event_alert_level(con, demo_env.model_id, 0.9)
        assert investigate.event_alert_level(con, None, 0.9) is None
        assert investigate.event_alert_level(con, "no-such-model", 0.9) is None
    surprisal = frames["event_scores"]["surprisal"]
    assert level == pytest.approx(float(np.quantile(surprisal, 0.9)))
    assert (surprisal < level).mean() == pytest.approx(0.9, abs=0.01)
