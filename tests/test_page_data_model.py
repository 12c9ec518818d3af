"""Data & model: the page renders (with and without a database), the upload -> ingest path the
page calls, the models table, the job registry, and a rescore started from the page."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from streamlit.testing.v1 import AppTest

from core import datamodel, jobs, store

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGE = "pages/data_model.py"

CSV = (
    b"When,Who,What,amount\n"
    b"2024-03-01T00:00:00,u1,pv,1.5\n"
    b"2024-03-01T00:01:00,u1,buy,20\n"
    b"2024-03-01T00:02:00,u2,pv,-5\n"  # negative price: quarantined
    b"not a time,u2,pv,1\n"  # bad timestamp: quarantined
    b"2024-03-01T00:04:00,u3,fav,2\n"
)
MAPPING = {"ts": "When", "user_id": "Who", "event_type": "What", "price": "amount"}


@pytest.fixture(autouse=True)
def _navigation(app_navigation_mode: None) -> None:
    """AppTest runs through app.py's st.navigation (see conftest)."""


def _page(db_path: Path) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["db_path"] = str(db_path)
    at.session_state["analyst"] = "tess"
    at.run()
    at.switch_page(PAGE)
    at.run()
    assert not at.exception, at.exception
    return at


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


# --- the page ---------------------------------------------------------------------------------


def test_page_shows_dataset_and_models(demo_env) -> None:
    at = _page(demo_env.db_path)
    assert at.title[0].value.endswith("Data & model")
    with store.open_db(demo_env.db_path) as con:
        n_events, n_users = con.execute(
            "SELECT count(*), count(DISTINCT user_id) FROM events"
        ).fetchall()[0]
    assert _metric(at, "Events") == f"{n_events:,}"
    assert _metric(at, "Users") == f"{n_users:,}"
    models = next(d.value for d in at.dataframe if "scored_users" in d.value.columns)
    row = models.set_index("model_id").loc[demo_env.model_id]
    assert row["size"] == "tiny" and row["scored_users"] == n_users
    assert row["parameters"] > 0 and row["n_events"] == n_events
    labels = [b.label for b in at.button]
    assert f"Rescore every user with {demo_env.model_id}" in labels
    assert any(b.label.startswith("Train a new model") for b in at.get("form_submit_button"))


def test_page_without_database_offers_demo_and_upload(tmp_path: Path) -> None:
    at = _page(tmp_path / "missing.duckdb")
    assert any("No events" in i.value for i in at.info)
    assert [b.label for b in at.get("form_submit_button")] == ["Build the demo database"]
    assert at.get("file_uploader")  # upload works without a database too
    assert not (tmp_path / "missing.duckdb").exists()  # looking created nothing


def test_rescore_button_runs_a_background_job(demo_db_copy) -> None:
    db = str(demo_db_copy.db_path)
    with store.open_db(db) as con:
        before = con.execute("SELECT max(scored_at) FROM sequence_scores").fetchall()[0][0]
    at = _page(demo_db_copy.db_path)
    at.button(key="dm_rescore").click().run()
    assert not at.exception
    job = jobs.registry().jobs(group=db)[0]
    assert job.kind == "rescore"
    final = jobs.registry().wait(job.job_id, timeout=120)
    assert final.status == "done", final.error
    assert final.result == 400 and final.message == "scored 400 users"
    with store.open_db(db) as con:
        after, n = con.execute(
            "SELECT min(scored_at), count(*) FROM sequence_scores"
            " WHERE model_id = ? AND window_start IS NULL",
            [demo_db_copy.model_id],
        ).fetchall()[0]
    assert n == 400 and after > before  # every user rescored, none duplicated
    at.run()
    assert not at.exception
    assert any(s.label.startswith("Rescore with") for s in at.get("status"))


# --- upload -> ingest (the page's core function) ---------------------------------------------


def test_ingest_upload_maps_renames_quarantines_and_dedups(tmp_path: Path) -> None:
    db = tmp_path / "up.duckdb"
    options = datamodel.UploadOptions(mapping=MAPPING, event_map={"pv": "view", "buy": "purchase"})
    result = datamodel.ingest_upload(db, CSV, "../shop log.csv", options)
    rep = result.report
    assert (rep.rows_read, rep.rows_accepted, rep.rows_quarantined) == (5, 3, 2)
    assert set(result.reasons["reason"]) == set(rep.reasons) and result.reasons["rows"].sum() == 2
    assert result.quarantined["line"].tolist() == [4, 5]  # header is line 1
    assert "price" in result.quarantined["reason"].iloc[0]
    assert "-5" in result.quarantined["raw"].iloc[0]
    with store.open_db(db) as con:
        got = con.execute("SELECT user_id, event_type, price FROM events ORDER BY ts").fetchall()
    assert got == [("u1", "view", 1.5), ("u1", "purchase", 20.0), ("u3", "fav", 2.0)]

    again = datamodel.ingest_upload(db, CSV, "other-name.csv", options)
    assert (
        again.report.duplicate_of == rep.batch_id and "already ingested" in again.report.message()
    )
    assert again.quarantined.empty

    # An export overlapping this one: refused as it is, loaded with "Rows already stored: skip"
    overlap = CSV + b"2024-03-02T00:00:00,u9,pv,3\n"
    with pytest.raises(store.IngestError, match="3 rows repeat events already stored"):
        datamodel.ingest_upload(db, overlap, "overlap.csv", options)
    skipping = datamodel.UploadOptions(**{**vars(options), "skip_stored": True})
    later = datamodel.ingest_upload(db, overlap, "overlap.csv", skipping)
    assert later.report.rows_accepted == 1  # u9's new event; the two bad rows fail again
    assert later.report.reasons[store.STORED_REASON] == 3


def test_a_first_line_of_data_ticks_no_header() -> None:
    assert datamodel.first_line_is_data(b"100692,4167,1004,pv,1569888045\n1,2,3,buy,1\n", "u.csv")
    assert datamodel.first_line_is_data(b"2024-01-01;u1;view\n", "u.csv")
    assert not datamodel.first_line_is_data(CSV, "shop.csv")
    assert not datamodel.first_line_is_data(b"", "empty.csv")
    frame = pd.DataFrame({"a": [1]})
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    assert not datamodel.first_line_is_data(buffer.getvalue(), "x.parquet")


def test_ingest_upload_headerless_parquet_and_errors(tmp_path: Path) -> None:
    db = tmp_path / "up.duckdb"
    body = b"1709251200,u1,view\n1709251260,u1,cart\n"
    names = ("t", "user_id", "event_type")
    options = datamodel.UploadOptions(mapping={"ts": "t"}, columns=names, ts_unit="s")
    assert datamodel.ingest_upload(db, body, "raw.csv", options).report.rows_accepted == 2

    buf = io.BytesIO()
    pq.write_table(
        pa.table({"ts": ["2024-03-02T00:00:00"], "user_id": ["p1"], "event_type": ["login"]}), buf
    )
    parquet = buf.getvalue()
    assert datamodel.preview_upload(parquet, "x.parquet").columns.tolist() == list(
        ("ts", "user_id", "event_type")
    )
    assert (
        datamodel.ingest_upload(
            db, parquet, "x.parquet", datamodel.UploadOptions()
        ).report.rows_accepted
        == 1
    )

    with pytest.raises(store.IngestError, match="missing required column"):
        datamodel.ingest_upload(db, CSV, "log.csv", datamodel.UploadOptions())
    with pytest.raises(store.IngestError, match="not found"):
        datamodel.ingest_upload(db, CSV, "log.csv", datamodel.UploadOptions({"ts": "nope"}))


def test_preview_guess_and_event_renames() -> None:
    frame = datamodel.preview_upload(CSV.replace(b",", b";"), "log.csv")
    assert frame.columns.tolist() == ["When", "Who", "What", "amount"] and len(frame) == 5
    headerless = datamodel.preview_upload(b"1,u,v\n2,u,w\n", "x.csv", columns=["a", "b", "c"])
    assert headerless["c"].tolist() == ["v", "w"]
    assert datamodel.guess_mapping(["TS", "user_id", "Event_Type", "ip", "IP"]) == {
        "ts": "TS",
        "user_id": "user_id",
        "event_type": "Event_Type",
        "ip": "ip",
    }
    # loghub's structured logs and RetailRocket: their own names are suggested too
    loghub = ["LineId", "Label", "Timestamp", "Date", "Node", "Time", "Component", "EventId"]
    assert datamodel.guess_mapping(loghub) == {"ts": "Timestamp", "event_type": "EventId"}
    retail = ["timestamp", "visitorid", "event", "itemid", "transactionid"]
    assert datamodel.guess_mapping(retail) == {
        "ts": "timestamp",
        "user_id": "visitorid",
        "event_type": "event",
        "item_id": "itemid",
    }
    edits = pd.DataFrame({"event_type": ["pv", "buy", "fav"], "becomes": ["view", "buy", " "]})
    assert datamodel.event_map_from_edits(edits) == {"pv": "view"}
    assert datamodel.safe_filename("../../etc/pass wd.csv") == "pass_wd.csv"
    assert datamodel.safe_filename("") == "upload.csv"
    with pytest.raises(store.IngestError):
        datamodel.preview_upload(b"", "empty.csv")


def test_models_table_on_an_empty_store(tmp_path: Path) -> None:
    with store.open_db(tmp_path / "e.duckdb") as con:
        table = datamodel.models_table(con)
    assert table.empty and "model_id" in table.columns


# --- the job registry -------------------------------------------------------------------------


def test_failed_job_keeps_its_message_and_runs_on_finish_first() -> None:
    registry = jobs.JobRegistry()
    seen: list[str] = []

    def work(report: jobs.Report) -> None:
        report(0.5, "half way")
        raise store.StoreError("database x is locked by another process")

    def on_finish(state: jobs.JobState) -> None:
        seen.append(state.status)
        assert registry.get(state.job_id).running  # not published yet

    job = registry.start("rescore", "Rescore", work, group="db", on_finish=on_finish)
    final = registry.wait(job.job_id, timeout=10)
    assert final.status == "failed" and seen == ["failed"]
    assert final.error == "database x is locked by another process"
    assert final.progress == 0.5 and final.finished_at is not None
    assert registry.active("db") is None

    crash = registry.start("x", "Crash", lambda report: {}["missing"], group="db")
    assert registry.wait(crash.job_id, timeout=10).error == "'missing'"
    boom = registry.start("x", "Boom", lambda report: 1 / 0)
    assert registry.wait(boom.job_id, timeout=10).error == "ZeroDivisionError: division by zero"


def test_one_running_job_per_group_with_progress() -> None:
    registry = jobs.JobRegistry(keep_finished=2)
    gate = threading.Event()

    def work(report: jobs.Report) -> str:
        report(0.25, "a quarter")
        gate.wait(10)
        return "ok"

    job = registry.start("retrain", "Train", work, group="db")
    for _ in range(100):
        if registry.get(job.job_id).progress == 0.25:
            break
        time.sleep(0.01)
    assert registry.get(job.job_id).message == "a quarter"
    with pytest.raises(jobs.JobBusyError, match="Train"):
        registry.start("rescore", "Rescore", work, group="db")
    other = registry.start("rescore", "Other db", lambda report: 7, group="db2")
    assert registry.wait(other.job_id, timeout=10).result == 7
    gate.set()
    final = registry.wait(job.job_id, timeout=10)
    assert (final.status, final.result, final.progress) == ("done", "ok", 1.0)
    for i in range(3):
        registry.wait(registry.start("x", f"n{i}", lambda report: None).job_id, timeout=10)
    assert len(registry.jobs()) == 2  # only the newest finished jobs are kept


def test_ingest_upload_with_a_timestamp_format_and_decimal_comma(tmp_path: Path) -> None:
    body = b"when;who;what;eur\n01.03.2024 12:00;k1;view;\n31.12.2024 23:59;k1;purchase;12,99\n"
    mapping = {"ts": "when", "user_id": "who", "event_type": "what", "price": "eur"}
    options = datamodel.UploadOptions(mapping=mapping, ts_unit="%d.%m.%Y %H:%M", decimal_comma=True)
    result = datamodel.ingest_upload(tmp_path / "fmt.duckdb", body, "de.csv", options)
    assert result.report.rows_accepted == 2 and result.quarantined.empty
    with store.open_db(tmp_path / "fmt.duckdb") as con:
        assert con.execute("SELECT max(price) FROM events").fetchall() == [(12.99,)]
    bad = datamodel.UploadOptions(mapping=mapping, ts_unit="dd.mm")
    with pytest.raises(store.StoreError, match="timestamp format"):
        datamodel.ingest_upload(tmp_path / "fmt.duckdb", body, "de2.csv", bad)
