"""The Investigate page in Streamlit's AppTest, through app.py, on the demo fixture."""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core import store
from tests.conftest import burst_users

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture()
def open_page(monkeypatch, app_navigation_mode):
    timings: list[float] = []

    def run(db_path: Path, user: str | None, time_range: tuple | None = None) -> AppTest:
        monkeypatch.setenv("FRAUDLENS_DB", str(db_path))
        at = AppTest.from_file(APP, default_timeout=120)
        at.session_state["db_path"] = str(db_path)
        at.session_state["analyst"] = "tester"
        if time_range is not None:  # the sidebar's date range, as an analyst would pick it
            at.session_state["time_range"] = time_range
        at.run()  # st.navigation registers the url paths; switch_page needs them
        if user is not None:
            at.query_params["user"] = user
        at.switch_page("pages/investigate_page.py")
        started = time.perf_counter()
        at.run()
        timings.append(time.perf_counter() - started)
        assert not at.exception, [e.value for e in at.exception]
        return at

    run.timings = timings  # type: ignore[attr-defined]
    return run


def top_user(db_path: Path, model_id: str) -> str:
    with store.open_db(db_path) as con:
        return str(
            con.execute(
                "SELECT user_id FROM sequence_scores WHERE model_id = ? AND window_start IS NULL"
                " ORDER BY score DESC LIMIT 1 OFFSET 3",
                [model_id],
            ).fetchall()[0][0]
        )


def explained(at: AppTest, timeout_s: float = 60) -> AppTest:
    """Rerun until the explanation panels are drawn: they are computed off the script thread
    (the page polls with a fragment, which AppTest does not run by itself)."""
    deadline = time.monotonic() + timeout_s
    while any("Attributing the score" in c.value for c in at.caption):
        assert time.monotonic() < deadline, "the explanation never arrived"
        time.sleep(0.2)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_deep_link_opens_that_user(open_page, demo_env) -> None:
    user = top_user(demo_env.db_path, demo_env.model_id)
    at = open_page(demo_env.db_path, user)
    assert at.selectbox(key="inv_user").value == user
    assert at.query_params["user"] == user
    with store.open_db(demo_env.db_path) as con:
        score = con.execute(
            "SELECT score FROM sequence_scores WHERE user_id = ? AND model_id = ?",
            [user, demo_env.model_id],
        ).fetchall()[0][0]
    assert metric(at, "Score") == f"{score:.2f}"
    assert metric(at, "Label") == "—"
    assert any("scored events" in c.value for c in at.caption)
    assert [s.value for s in at.subheader][:2] == ["Score timeline", f"Sessions ({_n(at)})"]
    # timeline, session graph, entity graph, attribution by field
    keys = [c.key for c in at.get("plotly_chart")]
    assert keys[:3] == ["inv_timeline", "inv_session_graph", f"inv_entities_{user}"]
    # the attributions are computed off the script thread and arrive on a later run
    assert keys[3:] == ["inv_fields"] or any("Attributing" in c.value for c in at.caption)
    explained(at)
    assert [c.key for c in at.get("plotly_chart")][3:] == ["inv_fields"]
    # Warm: a second run comes from the caches.
    started = time.perf_counter()
    at.run()
    warm = time.perf_counter() - started
    print(f"\nInvestigate AppTest: cold {open_page.timings[0]:.2f} s, warm {warm:.2f} s")
    assert not at.exception
    assert metric(at, "Score") != "—" and at.selectbox(key="inv_user").value == user


def _n(at: AppTest) -> str:
    title = next(s.value for s in at.subheader if s.value.startswith("Sessions ("))
    return title.removeprefix("Sessions (").removesuffix(")")


def test_picking_another_user_updates_the_link(open_page, demo_env) -> None:
    first = top_user(demo_env.db_path, demo_env.model_id)
    at = open_page(demo_env.db_path, first)
    other = next(o for o in at.selectbox(key="inv_user").options if not o.startswith(first))
    other_id = other.split(" · ")[0]
    at.selectbox(key="inv_user").set_value(other_id).run()
    assert not at.exception
    assert at.query_params["user"] == other_id
    assert at.selectbox(key="inv_user").value == other_id
    # A link followed while the page is open (entity-graph click, Triage row) switches too.
    at.query_params["user"] = first
    at.run()
    assert at.selectbox(key="inv_user").value == first


def test_label_action_writes_label_and_audit_rows(open_page, demo_db_copy) -> None:
    user = top_user(demo_db_copy.db_path, demo_db_copy.model_id)
    at = open_page(demo_db_copy.db_path, user)
    at.radio(key="inv_label").set_value("fraud")
    at.text_area(key="inv_label_note").input("=1+1 ring of cards")
    next(b for b in at.button if b.label == f"Label {user}").click().run()
    assert not at.exception
    assert any("Labelled" in s.value for s in at.success)
    assert metric(at, "Label") == "fraud"
    with store.open_db(demo_db_copy.db_path) as con:
        labels = con.execute("SELECT * FROM labels WHERE user_id = ?", [user]).df()
        audit = con.execute(
            "SELECT * FROM audit_log WHERE action = 'label' AND target = ?", [f"user:{user}"]
        ).df()
    assert labels[["label", "analyst", "note"]].values.tolist() == [
        ["fraud", "tester", "=1+1 ring of cards"]
    ]
    assert audit["analyst"].tolist() == ["tester"]


def test_case_action_opens_a_case(open_page, demo_db_copy) -> None:
    user = top_user(demo_db_copy.db_path, demo_db_copy.model_id)
    at = open_page(demo_db_copy.db_path, user)
    at.text_input(key="inv_case_title").input("Ring 1")
    next(b for b in at.button if b.label == "Open case / add to case").click().run()
    assert not at.exception
    assert metric(at, "Case").endswith("open")
    with store.open_db(demo_db_copy.db_path) as con:
        opened = con.execute("SELECT title, created_by FROM cases").fetchall()
        pinned = con.execute("SELECT count(*) FROM case_events").fetchall()[0][0]
    assert opened == [("Ring 1", "tester")] and pinned == 10


def test_unknown_user_shows_a_message(open_page, demo_env) -> None:
    at = open_page(demo_env.db_path, "nobody-here")
    assert any("nobody-here" in w.value for w in at.warning)
    assert not at.metric


def test_one_event_user_works_and_is_scored_on_demand(open_page, demo_db_copy) -> None:
    one = pd.DataFrame(
        {"ts": [datetime(2026, 10, 10, 12)], "user_id": ["solo"], "event_type": ["login"]}
    )
    with store.open_db(demo_db_copy.db_path) as con:
        store.ingest_dataframe(con, one, source="one-event")
    at = explained(open_page(demo_db_copy.db_path, "solo"))
    assert metric(at, "Events in range") == "1"
    assert metric(at, "Score") != "—"
    assert len(at.get("plotly_chart")) == 3  # timeline, session, attribution by field
    # no device, IP or card in its one event: a message instead of an empty entity graph
    assert any("no linked accounts" in i.value for i in at.info)
    assert any("Too few events to test" in m.value for m in at.markdown)
    # Nobody ran `fraudlens score` for the new user: the app scored it on demand and stored it.
    with store.open_db(demo_db_copy.db_path) as con:
        stored = con.execute(
            "SELECT count(*) FROM event_scores s JOIN events e USING (event_id) "
            "WHERE e.user_id = 'solo' AND s.model_id = ?",
            [demo_db_copy.model_id],
        ).fetchall()[0][0]
    assert stored == 1


def test_a_model_that_does_not_load_falls_back_to_stored_scores(open_page, demo_db_copy) -> None:
    one = pd.DataFrame(
        {"ts": [datetime(2026, 10, 10, 12)], "user_id": ["solo"], "event_type": ["login"]}
    )
    with store.open_db(demo_db_copy.db_path) as con:
        store.ingest_dataframe(con, one, source="one-event")
        con.execute("UPDATE models SET path = ?", [str(demo_db_copy.db_path.parent / "gone")])
    at = open_page(demo_db_copy.db_path, "solo")
    assert any("Could not score solo" in w.value for w in at.warning)
    assert metric(at, "Events in range") == "1" and metric(at, "Score") == "—"
    # The explanation starts on the page's next run (its poll's tick in a browser): it cannot
    # load the model either, and says so where its panels would be.
    assert any("Attributing the score" in c.value for c in at.caption)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Could not explain solo" in e.value for e in at.error)
    # and it stops there: no poll left to retry the load every tick
    assert not any("Attributing the score" in c.value for c in at.caption)


def test_why_panels_show_attributions_similar_cases_and_a_grounded_summary(
    open_page, demo_db_copy
) -> None:
    user = top_user(demo_db_copy.db_path, demo_db_copy.model_id)
    at = explained(open_page(demo_db_copy.db_path, user))
    markdown = " ".join(m.value for m in at.markdown)
    assert "ithout these 5 events the score" in markdown
    assert any("Integrated gradients (32 steps)" in c.value for c in at.caption)
    # the top events table: the fraud probability as the deletion search removed its picks
    top_table = next(d for d in at.dataframe if "top_field" in d.value.columns).value
    # shown as text: two decimals along the path, blank past it (not Streamlit's "None")
    assert top_table["target_without"].iloc[:5].astype(float).between(0, 1).all()
    assert (top_table["target_without"].iloc[5:] == "").all()
    assert not top_table.isna().any().any()
    assert any("Written by **template**" in c.value for c in at.caption)
    similar_table = next(d for d in at.dataframe if "similarity" in d.value.columns)
    assert len(similar_table.value) == 8 and user not in set(similar_table.value["user_id"])
    assert not similar_table.value[["label", "case"]].isna().any().any()  # blank, not "None"
    # the account-level model's reasons: aggregates that raised its probability, with medians
    assert any(h.value == "Account-level signals" for h in at.subheader)
    signals = next(d for d in at.dataframe if "contribution" in d.value.columns).value
    assert len(signals) >= 1 and (signals["contribution"] > 0).all()
    assert signals["label"].str.len().gt(0).all()
    at.toggle(key=f"inv_attr_tl_{user}").set_value(True).run()
    assert not at.exception
    # What the analyst saw is kept, and a case export carries it.
    with store.open_db(demo_db_copy.db_path) as con:
        row = con.execute(
            "SELECT top_events, summary, summary_backend, grounded FROM explanations "
            "WHERE user_id = ?",
            [user],
        ).fetchone()
        assert row is not None and row[0] and row[1] and row[2] == "template" and row[3]
        from core import cases

        case_id = cases.open_case(con, "tester", [user], title="ring")
        frame = cases.case_export_frame(
            con, [case_id], model_id=demo_db_copy.model_id, threshold=0.5, analyst="tester"
        )
    assert frame.loc[0, "top_attributed_events"] == row[0]
    assert frame.loc[0, "summary"] == row[1]


def test_the_behaviour_that_carries_a_burst_is_tabled(open_page, demo_env) -> None:
    from core.behaviour import behaviour_groups
    from core.explain import explain_events
    from core.scoring import load_model
    from core.sequences import add_accounts_before

    (user,) = burst_users(demo_env.db_path, demo_env.model_id)
    with store.open_db(demo_env.db_path, read_only=True) as con:
        events = add_accounts_before(con, store.user_events(con, user))
    loaded = load_model(demo_env.models_dir / demo_env.model_id, device="cpu")
    groups = behaviour_groups(loaded, events, explain_events(loaded, events))
    expected = sorted(groups, key=lambda g: -g.share)  # largest share first
    assert expected, "the fixture's burst user should have a kind of behaviour that carries it"
    at = explained(open_page(demo_env.db_path, user))
    table = next(d for d in at.dataframe if "score_without" in d.value.columns).value
    assert list(table["kind"]) == [g.kind for g in expected]
    assert list(table["key"]) == [g.key for g in expected]
    assert table["share"].tolist() == pytest.approx([g.share for g in expected], rel=1e-6)
    # a group of every explained event is not rescored: its cell is blank, not "None"
    assert table["score_without"].tolist() == [
        "" if pd.isna(g.score_without) else f"{g.score_without:.2f}" for g in expected
    ]


def test_a_range_is_explained_with_the_history_before_it(open_page, demo_env) -> None:
    with store.open_db(demo_env.db_path, read_only=True) as con:
        user, first, last = con.execute(
            # one window holds the whole history: the events before the range are in it
            "SELECT user_id, min(ts), max(ts) FROM events GROUP BY 1 "
            "HAVING count(DISTINCT CAST(ts AS DATE)) >= 6 AND count(*) <= 128 "
            "ORDER BY count(*) DESC, 1 LIMIT 1"
        ).fetchone()  # type: ignore[misc]
    start = (first + (last - first) / 2).date()
    at = explained(open_page(demo_env.db_path, user, (start, last.date())))
    caption = next(c.value for c in at.caption if "Integrated gradients" in c.value)
    context = re.search(r"The (\d+) events before the range were read as context only", caption)
    assert context and int(context.group(1)) > 0, caption
    assert "of the positive attribution" in caption
    # the top events are the range's own
    top = next(d for d in at.dataframe if "top_field" in d.value.columns).value
    assert (pd.to_datetime(top["ts"]) >= pd.Timestamp(start)).all()
