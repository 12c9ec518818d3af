"""AppTest for Triage, Thresholds and Cases on the demo fixture: they render, widgets drive
what they show, and actions write their rows and audit rows."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core import alerts, cases, rings, store

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture(autouse=True)
def _navigation(app_navigation_mode: None) -> None:
    """AppTest runs through app.py's st.navigation (see conftest)."""


def _app(db_path: Path, page: str | None = None, **params: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["db_path"] = str(db_path)
    at.session_state["analyst"] = "tess"
    at.run()
    if page is not None:
        at.switch_page(page)
    for key, value in params.items():
        at.query_params[key] = value
    if page is not None or params:
        at.run()
    assert not at.exception, at.exception
    return at


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _full_range(db_path: Path) -> tuple[datetime, datetime]:
    with store.open_db(db_path, read_only=True) as con:
        first, last = con.execute("SELECT min(ts), max(ts) FROM events").fetchall()[0]
    start = datetime.combine(first.date(), datetime.min.time())
    return start, datetime.combine(last.date(), datetime.min.time()) + timedelta(days=1)


def _kpis(env, threshold: float) -> alerts.RangeKpis:
    start, end = _full_range(env.db_path)
    with store.open_db(env.db_path, read_only=True) as con:
        return alerts.range_kpis(con, env.model_id, start, end, threshold)


def _threshold_with_alerts(env) -> float:
    with store.open_db(env.db_path, read_only=True) as con:
        scores = con.execute(
            "SELECT score FROM sequence_scores WHERE model_id = ? AND window_start IS NULL",
            [env.model_id],
        ).fetchnumpy()["score"]
    return round(float(np.quantile(scores, 0.85)), 2)


def test_triage_threshold_and_filters_drive_the_queue(demo_env) -> None:
    at = _app(demo_env.db_path)
    assert at.title[0].value.endswith("Triage")
    high = _metric(at, "Alerts")
    assert high == f"{_kpis(demo_env, at.sidebar.number_input[0].value).n_alerts:,}"

    threshold = _threshold_with_alerts(demo_env)
    at.sidebar.number_input(key="threshold").set_value(threshold).run()
    assert not at.exception
    expected = _kpis(demo_env, threshold)
    assert _metric(at, "Alerts") == f"{expected.n_alerts:,}" != high
    assert _metric(at, "Events") == f"{expected.n_events:,}"
    queue = at.dataframe(key="tri_queue").value
    assert len(queue) == expected.n_alerts and queue["score"].min() >= threshold

    at.number_input(key="tri_min").set_value(10**6).run()
    assert not at.exception
    assert not [d for d in at.dataframe if d.key == "tri_queue"]
    assert any("No alerts" in i.value for i in at.info)
    assert _metric(at, "Alerts") == f"{expected.n_alerts:,}"  # KPIs ignore the queue filters


def test_triage_lists_unusual_users_the_threshold_leaves_out(demo_env) -> None:
    at = _app(demo_env.db_path)
    start, end = _full_range(demo_env.db_path)
    with store.open_db(demo_env.db_path, read_only=True) as con:
        pct = con.execute(
            "SELECT percentile_unsupervised, score FROM sequence_scores"
            " WHERE model_id = ? AND window_start IS NULL AND percentile_unsupervised >= ?",
            [demo_env.model_id, alerts.NOVELTY_PERCENTILE],
        ).fetchnumpy()
        # just above the lowest combined score among the most unusual users
        threshold = round(float(pct["score"].min()) + 0.005, 3)
        expected = alerts.novelty_watchlist(con, demo_env.model_id, start, end, threshold)
    assert not expected.empty
    at.sidebar.number_input(key="threshold").set_value(threshold).run()
    assert not at.exception
    (box,) = [e for e in at.expander if e.label.startswith("Unusual but not alerted")]
    assert box.label == f"Unusual but not alerted ({len(expected):,})"
    shown = at.dataframe(key="tri_watch").value
    assert shown["user_id"].tolist() == expected["user_id"].tolist()
    assert (shown["score"] < threshold).all()

    # a looser level lists more users, the queue's rules otherwise unchanged
    at.button_group(key="tri_watch_level").set_value(0.95).run()
    assert not at.exception
    with store.open_db(demo_env.db_path, read_only=True) as con:
        looser = alerts.novelty_watchlist(
            con, demo_env.model_id, start, end, threshold, min_percentile=0.95
        )
    assert len(looser) > len(expected)
    assert at.dataframe(key="tri_watch").value["user_id"].tolist() == looser["user_id"].tolist()


def test_triage_lists_accounts_sharing_a_device_card_or_ip(demo_env) -> None:
    at = _app(demo_env.db_path)
    assert not [d for d in at.dataframe if d.key == "tri_rings_table"]  # off until asked
    at.toggle(key="tri_rings").set_value(True).run()
    assert not at.exception
    start, end = _full_range(demo_env.db_path)
    threshold = at.sidebar.number_input(key="threshold").value
    with store.open_db(demo_env.db_path, read_only=True) as con:
        scores = alerts.active_scores(con, demo_env.model_id, start, end)
        expected = rings.shared_entities_in_range(con, start, end, scores, threshold)
    kind = at.button_group(key="tri_ring_kind").value
    assert kind == expected["entity"].iloc[0]  # devices first when any is shared
    shown = at.dataframe(key="tri_rings_table").value
    mine = expected.loc[expected["entity"] == kind]
    assert shown["value"].tolist() == mine["value"].tolist()
    assert shown["top_user"].tolist() == mine["top_user"].tolist()

    at.button_group(key="tri_ring_kind").set_value("IP").run()
    assert not at.exception
    ips = at.dataframe(key="tri_rings_table").value
    assert ips["value"].tolist() == expected.loc[expected["entity"] == "IP", "value"].tolist()
    assert (ips["users"] >= rings.MIN_SHARED_USERS).all()


def test_switching_models_loads_that_models_threshold(demo_db_copy) -> None:
    with store.open_db(demo_db_copy.db_path) as con:
        con.execute(
            "INSERT INTO models (model_id, created_at, path, config, metrics)"
            " VALUES ('unlabelled', now() - INTERVAL 1 DAY, 'x', '{}', ?)",
            [json.dumps({"supervised": False})],
        )
    at = _app(demo_db_copy.db_path, "pages/data_model.py")
    assert at.sidebar.selectbox(key="model_id").value == demo_db_copy.model_id
    assert at.sidebar.number_input(key="threshold").value == alerts.DEFAULT_THRESHOLD
    at.sidebar.selectbox(key="model_id").set_value("unlabelled").run()
    assert not at.exception
    threshold = at.sidebar.number_input(key="threshold").value
    assert threshold == alerts.UNSUPERVISED_DEFAULT_THRESHOLD
    at.sidebar.number_input(key="threshold").set_value(0.97).run()  # the analyst's choice
    assert at.sidebar.number_input(key="threshold").value == 0.97
    at.sidebar.selectbox(key="model_id").set_value(demo_db_copy.model_id).run()
    assert at.sidebar.number_input(key="threshold").value == alerts.DEFAULT_THRESHOLD


def test_thresholds_sliders_and_save(demo_db_copy) -> None:
    at = _app(demo_db_copy.db_path, "pages/thresholds_page.py")
    assert at.title[0].value.endswith("Thresholds")
    before = _metric(at, "Alerts in range")
    threshold = _threshold_with_alerts(demo_db_copy)
    at.slider(key="thr_threshold").set_value(threshold).run()
    assert not at.exception
    assert _metric(at, "Alerts in range") == f"{_kpis(demo_db_copy, threshold).n_alerts:,}"
    assert _metric(at, "Alerts in range") != before
    assert _metric(at, "Recall") != "—"  # judged against the demo ground truth

    at.slider(key="thr_weight").set_value(1.0).run()  # unsupervised percentile only
    start, end = _full_range(demo_db_copy.db_path)
    with store.open_db(demo_db_copy.db_path, read_only=True) as con:
        only_pct = alerts.active_scores(con, demo_db_copy.model_id, start, end, weight=1.0)
    assert _metric(at, "Alerts in range") == f"{int((only_pct['score'] >= threshold).sum()):,}"

    next(b for b in at.button if b.label == "Save threshold").click().run()
    assert not at.exception
    assert any("Saved threshold" in s.value for s in at.success)
    assert at.sidebar.number_input(key="threshold").value == pytest.approx(threshold)
    with store.open_db(demo_db_copy.db_path, read_only=True) as con:
        saved = alerts.saved_setting(con, demo_db_copy.model_id)
        trail = cases.audit_trail(con)
    assert (saved.threshold, saved.weight, saved.analyst) == (pytest.approx(threshold), 1.0, "tess")
    assert trail["action"].tolist() == ["threshold_save"] and trail["analyst"][0] == "tess"


def test_cases_deep_link_actions_and_export(demo_db_copy) -> None:
    with store.open_db(demo_db_copy.db_path) as con:
        users = [
            r[0] for r in con.execute("SELECT DISTINCT user_id FROM events LIMIT 3").fetchall()
        ]
        cases.open_case(con, "ann", users[:1], title="first")
        second = cases.open_case(con, "ann", users[1:], title="second")
    at = _app(demo_db_copy.db_path, "pages/cases_page.py", case=str(second))
    assert at.subheader[0].value == f"#{second} · second"
    assert at.selectbox(key="case_pick").value == second

    at.text_area(key="case_note").input("=1+1")
    at.button(key="FormSubmitter:case_note_form-Add note").click().run()
    assert not at.exception
    at.selectbox(key="case_status").select("investigating")
    at.button(key="FormSubmitter:case_status_form-Change status").click().run()
    assert not at.exception
    assert any("is now investigating" in s.value for s in at.success)

    with store.open_db(demo_db_copy.db_path, read_only=True) as con:
        detail = cases.case_detail(con, second)
        trail = cases.audit_trail(con, target=f"case:{second}")
    assert detail.notes["note"].tolist() == ["=1+1"] and detail.notes["analyst"][0] == "tess"
    assert detail.status == "investigating" and detail.history["analyst"].iloc[-1] == "tess"
    assert trail["action"].tolist() == ["case_status", "case_note", "case_open"]
    assert at.subheader[0].value == f"#{second} · second"  # still on the linked case

    download = next(b for b in at.get("download_button") if b.label.startswith("Case CSV"))
    download.click().run()
    assert not at.exception
    with store.open_db(demo_db_copy.db_path, read_only=True) as con:
        last = cases.audit_trail(con, limit=1).iloc[0]
    assert last["action"] == "export_cases" and last["analyst"] == "tess"
    assert json.loads(last["detail"])["cases"] == [second]


def test_cases_new_case_form_opens_it(demo_db_copy) -> None:
    with store.open_db(demo_db_copy.db_path, read_only=True) as con:
        user = con.execute("SELECT min(user_id) FROM events").fetchall()[0][0]
    at = _app(demo_db_copy.db_path, "pages/cases_page.py")
    assert any("No cases" in i.value for i in at.info)
    at.text_input(key="case_new_users").input(f"{user}, nobody-here")
    at.button(key="FormSubmitter:case_new-Open case").click().run()
    assert any("unknown user" in e.value for e in at.error)  # nothing opened
    at.text_input(key="case_new_users").input(user)
    at.button(key="FormSubmitter:case_new-Open case").click().run()
    assert not at.exception
    assert at.subheader[0].value.startswith("#1 · Case 1")
    assert at.query_params["case"] in (["1"], "1")  # the URL now deep-links the new case


def test_pages_without_a_database_explain_what_to_do(tmp_path) -> None:
    for page in ("pages/thresholds_page.py", "pages/cases_page.py", None):
        at = _app(tmp_path / "missing.duckdb", page)
        assert any("No database" in i.value for i in at.info)


def test_first_run_of_a_session_primes_plotly_once(demo_env) -> None:
    """The sidebar's invisible chart (which starts the browser loading Plotly early) is drawn on
    a session's first run only."""
    at = _app(demo_env.db_path)
    primers = at.sidebar.get("plotly_chart")
    assert len(primers) == 1
    spec = json.loads(primers[0].proto.spec)
    assert [t.get("x") for t in spec["data"]] == [[]] and spec["layout"]["height"] == 10
    at.run()
    assert not at.exception
    assert at.sidebar.get("plotly_chart") == []
    assert at.title[0].value.endswith("Triage")


def test_a_database_locked_by_another_process_gets_a_message_not_a_stack_trace(
    demo_db_copy,
) -> None:
    """A CLI job holding the write lock: every page says the database is busy (after the
    store's retries) and offers a retry, which works once the lock is gone."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True);"
            " time.sleep(120)",
            str(demo_db_copy.db_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        at = AppTest.from_file(APP, default_timeout=60)
        at.session_state["db_path"] = str(demo_db_copy.db_path)
        at.run()
        assert not at.exception, at.exception
        assert any("database is busy" in e.value and "locked" in e.value for e in at.error)
        retry = next(b for b in at.button if b.key == "_store_retry")
    finally:
        holder.kill()
        holder.wait()
    retry.click().run()
    assert not at.exception, at.exception
    assert not at.error
    assert at.title[0].value.endswith("Triage") and at.metric


def test_triage_falls_back_to_stored_scores_when_the_model_does_not_load(
    demo_db_copy,
) -> None:
    import pandas as pd

    one = pd.DataFrame(
        {"ts": [datetime(2026, 10, 10, 12)], "user_id": ["solo"], "event_type": ["login"]}
    )
    with store.open_db(demo_db_copy.db_path) as con:
        store.ingest_dataframe(con, one, source="one-event")
        con.execute("UPDATE models SET path = ?", [str(demo_db_copy.db_path.parent / "gone")])
    at = _app(demo_db_copy.db_path)
    assert any("Could not score the new users now" in w.value for w in at.warning)
    assert any("have no score yet" in w.value for w in at.warning)
    assert _metric(at, "Alerts") != "" and at.get("plotly_chart")


def test_pages_without_a_model_say_how_to_train_one(tmp_path) -> None:
    """Events ingested, nothing trained: the model pages explain the next step, no error."""
    import pandas as pd

    db = tmp_path / "untrained.duckdb"
    events = pd.DataFrame(
        {
            "ts": [datetime(2026, 10, 1, 9) + timedelta(minutes=m) for m in range(6)],
            "user_id": ["a", "a", "b", "b", "c", "c"],
            "event_type": ["login", "view", "login", "view", "login", "purchase"],
        }
    )
    with store.open_db(db) as con:
        store.ingest_dataframe(con, events, source="six")
    for page in (None, "pages/thresholds_page.py"):
        at = _app(db, page)
        assert any("No trained model yet" in i.value and "fraudlens train" in i.value
                   for i in at.info), page  # fmt: skip
        assert not at.error
    # Investigate still shows the user's events and sessions; only the model's parts say why
    # they are missing.
    at = _app(db, "pages/investigate_page.py", user="a")
    assert any("Attributions need a model" in i.value for i in at.info)
    assert any(c.value.startswith("2 events, not scored: no model") for c in at.caption)
    assert [s.value for s in at.subheader][:2] == ["Score timeline", "Sessions (1)"]
    assert not at.error
