"""Tests for core.store: ingest rules, idempotence, atomicity, queries, locking."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import schema, store

T0 = datetime(2024, 3, 1, 12, 0, 0)


@pytest.fixture
def con(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    c = store.connect(tmp_path / "db" / "test.duckdb")
    yield c
    c.close()


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def snapshot(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    """Every row of the tables an ingest touches, events in physical order."""
    return {
        "events": con.execute("SELECT * FROM events ORDER BY rowid").fetchall(),
        "quarantine": con.execute("SELECT * FROM quarantine ORDER BY ALL").fetchall(),
        "ingest_batches": con.execute(
            "SELECT batch_id, source, checksum, rows_read FROM ingest_batches ORDER BY ALL"
        ).fetchall(),
    }


def quarantine_rows(con: duckdb.DuckDBPyConnection) -> list[tuple[int, str, str]]:
    return con.execute("SELECT line, reason, raw FROM quarantine ORDER BY line").fetchall()


# ---------------------------------------------------------------------------------------------
# Schema and connection


def test_migrate_creates_every_table_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "f.duckdb"
    con = store.connect(path)
    assert store.migrate(con) == store.SCHEMA_VERSION
    con.close()
    con = store.connect(path)  # second open: nothing to apply, nothing breaks
    assert store.migrate(con) == store.SCHEMA_VERSION
    assert con.execute("SELECT count(*) FROM schema_version").fetchone() == (len(store.MIGRATIONS),)
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    expected = {
        "events", "ingest_batches", "quarantine", "models", "event_scores", "sequence_scores",
        "labels", "cases", "case_users", "case_events", "case_notes", "case_status_history",
        "audit_log", "thresholds", "truth_users", "truth_events", "schema_version",
    }  # fmt: skip
    assert expected <= tables
    cols = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'events'"
        " ORDER BY column_index"
    ).fetchall()
    assert cols == [(c.name, c.duckdb_type) for c in schema.EVENT_COLUMNS]
    con.close()


def test_read_only_connection_reads_but_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "ro.duckdb"
    con = store.connect(path)
    store.ingest_dataframe(
        con, pd.DataFrame({"ts": [T0], "user_id": ["u"], "event_type": ["view"]}), source="x"
    )
    con.close()
    ro = store.connect(path, read_only=True)
    assert store.dataset_summary(ro).n_events == 1
    with pytest.raises(duckdb.Error):
        ro.execute("DELETE FROM events")
    ro.close()


# ---------------------------------------------------------------------------------------------
# CSV ingest


def test_good_csv_parses_every_timestamp_form_to_utc(con, tmp_path: Path) -> None:
    path = write(
        tmp_path / "good.csv",
        """
        ts,user_id,event_type,price,quantity,item_id,device_id
        2024-03-01T12:00:00Z,u1,view,10.5,1,i1,d1
        2024-03-01T14:00:00+02:00,u1,cart,,2,i1,d1
        2024-03-01 12:00:00,u2,view,0,,i2,
        1709294400,u3,view,1.25,3,,d3
        1709294400000,u4,purchase,99,1,i9,d4
        2024-03-01,u5,login,,,,
        """,
    )
    report = store.ingest_file(con, path)
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (6, 6, 0)
    assert report.reasons == {} and report.duplicate_of is None and report.batch_id == 1
    rows = con.execute(
        "SELECT user_id, ts, event_type, price, quantity, item_id, device_id, batch_id"
        " FROM events ORDER BY user_id, ts"
    ).fetchall()
    noon = datetime(2024, 3, 1, 12, 0)
    assert rows == [
        ("u1", noon, "view", 10.5, 1, "i1", "d1", 1),
        ("u1", noon, "cart", None, 2, "i1", "d1", 1),
        ("u2", noon, "view", 0.0, None, "i2", None, 1),
        ("u3", noon, "view", 1.25, 3, None, "d3", 1),
        ("u4", noon, "purchase", 99.0, 1, "i9", "d4", 1),
        ("u5", datetime(2024, 3, 1), "login", None, None, None, None, 1),
    ]
    ids = [r[0] for r in con.execute("SELECT event_id FROM events ORDER BY event_id").fetchall()]
    assert ids == [1, 2, 3, 4, 5, 6]
    assert "6 accepted" in report.message() and "0 quarantined" in report.message()


@pytest.mark.parametrize(
    ("unit", "accepted", "reasons"),
    [
        ("auto", 3, {}),
        ("s", 1, {"absurd timestamp": 1, "unparseable timestamp": 1}),
        ("ms", 1, {"absurd timestamp": 1, "unparseable timestamp": 1}),
        ("iso", 1, {"unparseable timestamp": 2}),
    ],
)
def test_explicit_timestamp_units(con, tmp_path: Path, unit, accepted, reasons) -> None:
    path = write(
        tmp_path / f"{unit}.csv",
        """
        ts|user_id|event_type
        1709294400|u1|view
        1709294400000|u2|view
        2024-03-01T12:00:00|u3|view
        """,
    )
    report = store.ingest_file(con, path, ts_unit=unit, delimiter="|")
    assert (report.rows_accepted, report.reasons) == (accepted, reasons)
    assert {r[0] for r in con.execute("SELECT ts FROM events").fetchall()} == {T0}


def test_a_strptime_timestamp_format_with_and_without_an_offset(con, tmp_path: Path) -> None:
    path = write(
        tmp_path / "de.csv",
        """
        zeit;kunde;aktion
        01.03.2024 12:00;k1;view
        01.03.2024 14:00 +0200;k2;view
        2024-03-01T12:00:00;k3;view
        ;k4;view
        """,
    )
    mapping = {"ts": "zeit", "user_id": "kunde", "event_type": "aktion"}
    report = store.ingest_file(con, path, mapping=mapping, ts_unit="%d.%m.%Y %H:%M", delimiter=";")
    # "%d.%m.%Y %H:%M" parses k1 only: k2 carries an offset the format lacks, k3 is ISO text
    assert (report.rows_read, report.rows_accepted) == (4, 1)
    assert report.reasons == {"unparseable timestamp": 2, "missing timestamp": 1}
    assert con.execute("SELECT user_id, ts FROM events").fetchall() == [("k1", T0)]
    offset = write(tmp_path / "tz.csv", "ts,user_id,event_type\n01.03.2024 14:00 +0200,k2,view\n")
    report = store.ingest_file(con, offset, ts_unit="%d.%m.%Y %H:%M %z")
    assert report.rows_accepted == 1  # 14:00 at +02:00 is 12:00 UTC
    assert con.execute("SELECT ts FROM events WHERE user_id = 'k2'").fetchall() == [(T0,)]
    for bad in ("dd.mm.yyyy", "%Q"):
        with pytest.raises(store.IngestError, match="timestamp format"):
            store.ingest_file(con, offset, ts_unit=bad)
    assert con.execute("SELECT count(*) FROM events").fetchall() == [(2,)]  # nothing changed


def test_bad_csv_quarantines_every_row_with_its_reason(con, tmp_path: Path) -> None:
    long_id = "x" * (schema.MAX_ID_LEN + 1)
    long_text = "y" * (schema.MAX_TEXT_LEN + 1)
    path = write(
        tmp_path / "bad.csv",
        f"""
        ts,user_id,event_type,price,quantity,text
        not a date,u1,view,1,1,
        1980-01-01T00:00:00,u1,view,1,1,
        99999999999999999,u1,view,1,1,
        2024-03-01T00:00:00,,view,1,1,
        2024-03-01T00:00:00,u1,,1,1,
        2024-03-01T00:00:00,u1,view,cheap,1,
        2024-03-01T00:00:00,u1,view,-1,1,
        2024-03-01T00:00:00,u1,view,1,1.5,
        2024-03-01T00:00:00,u1,view,1,-2,
        2024-03-01T00:00:00,{long_id},view,1,1,
        2024-03-01T00:00:00,u1,view,1,1,{long_text}
        2024-03-01T00:00:00,u1,view,1,1,extra,field
        2024-03-01T00:00:00,u1,view
        ,u1,view,1,1,
        2024-03-01T00:00:00,u1,view,nan,1,
        """,
    )
    report = store.ingest_file(con, path)
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (15, 0, 15)
    got = [(line, reason) for line, reason, _ in quarantine_rows(con)]
    assert got == [
        (2, "unparseable timestamp"),
        (3, "absurd timestamp"),
        (4, "absurd timestamp"),
        (5, "empty user_id"),
        (6, "empty event_type"),
        (7, "non-numeric price"),
        (8, "negative price"),
        (9, "non-integer quantity"),
        (10, "negative quantity"),
        (11, "over-long user_id"),
        (12, "over-long text"),
        (13, "wrong field count (too many)"),
        (14, "wrong field count (too few)"),
        (15, "missing timestamp"),
        (16, "non-numeric price"),
    ]
    assert sum(report.reasons.values()) == 15
    assert con.execute("SELECT count(*) FROM events").fetchone() == (0,)


def test_mixed_csv_keeps_raw_rows_and_true_line_numbers(con, tmp_path: Path) -> None:
    path = write(
        tmp_path / "mixed.csv",
        """
        ts,user_id,event_type,price,note
        2024-03-01T00:00:00,u1,view,1,a
        2024-03-01T00:01:00,u1,view,1,b,EXTRA
        2024-03-01T00:02:00,u2,view,"1"x,c
        2024-03-01T00:03:00,u2,view,-5,d
        2024-03-01T00:04:00,u3,view,2,"quoted, with comma"
        """,
    )
    report = store.ingest_file(con, path)
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (5, 2, 3)
    assert report.ignored_columns == ["note"]
    assert "Ignored columns: note" in report.message()
    q = quarantine_rows(con)
    assert [(line, reason) for line, reason, _ in q] == [
        (3, "wrong field count (too many)"),
        (4, "bad quoting"),
        (5, "negative price"),
    ]
    assert q[0][2] == "2024-03-01T00:01:00,u1,view,1,b,EXTRA"
    assert q[1][2] == '2024-03-01T00:02:00,u2,view,"1"x,c'
    assert json.loads(q[2][2]) == {
        "ts": "2024-03-01T00:03:00",
        "user_id": "u2",
        "event_type": "view",
        "price": "-5",
        "note": "d",
    }
    assert con.execute("SELECT user_id FROM events ORDER BY user_id").fetchall() == [
        ("u1",),
        ("u3",),
    ]


def test_bad_encoding_line_is_quarantined_not_fatal(con, tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(
        b"ts,user_id,event_type\n2024-03-01,u1,view\n2024-03-01,caf\xe9,view\n2024-03-01,u2,view\n"
    )
    report = store.ingest_file(con, path)
    assert (report.rows_accepted, report.rows_quarantined) == (2, 1)
    assert quarantine_rows(con)[0][:2] == (3, "bad encoding (not UTF-8)")


def test_delimiter_is_sniffed_from_the_header(con, tmp_path: Path) -> None:
    path = write(
        tmp_path / "semi.csv",
        """
        ts;user_id;event_type;price
        2024-03-01;u1;view;1,5
        """,
    )
    report = store.ingest_file(con, path)
    assert report.rows_accepted == 0 and report.reasons == {"non-numeric price": 1}
    tsv = tmp_path / "t.tsv"
    tsv.write_text("ts\tuser_id\tevent_type\n2024-03-01\tu1\tview\n", encoding="utf-8")
    assert store.ingest_file(con, tsv).rows_accepted == 1


# ---------------------------------------------------------------------------------------------
# Parquet and DataFrames


def test_parquet_with_typed_columns(con, tmp_path: Path) -> None:
    ts = pd.to_datetime(["2024-03-01T12:00:00+01:00", "2024-03-01T13:00:00+01:00", None], utc=True)
    table = pa.table(
        {
            "ts": pa.array(ts),
            "user_id": ["a", "b", "c"],
            "event_type": ["view", "purchase", "view"],
            "price": [1.5, float("nan"), -3.0],
            "quantity": pa.array([1, None, 2], type=pa.int64()),
            "item_id": pa.array([7, 8, 9], type=pa.int32()),
        }
    )
    path = tmp_path / "events.parquet"
    pq.write_table(table, path)
    report = store.ingest_file(con, path)
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (3, 2, 1)
    assert report.reasons == {"missing timestamp": 1}
    rows = con.execute("SELECT user_id, ts, price, quantity, item_id FROM events").fetchall()
    assert rows == [
        ("a", datetime(2024, 3, 1, 11), 1.5, 1, "7"),
        ("b", datetime(2024, 3, 1, 12), None, None, "8"),
    ]
    line, reason, raw = quarantine_rows(con)[0]
    assert (line, reason) == (3, "missing timestamp") and json.loads(raw)["user_id"] == "c"


def test_parquet_extension_without_parquet_content_is_rejected(con, tmp_path: Path) -> None:
    path = write(tmp_path / "fake.parquet", "ts,user_id,event_type\n")
    with pytest.raises(store.IngestError, match="not a Parquet file"):
        store.ingest_file(con, path)


def test_dataframe_ingest_and_duplicate_frame(con) -> None:
    df = pd.DataFrame(
        {
            "when": pd.to_datetime([T0, T0 + timedelta(minutes=5), T0, T0]).tz_localize("UTC"),
            "user": ["u1", "u1", "u2", "u3"],
            "event_type": ["view", "view", "buy", "buy"],
            "event_id": [10, 11, 10, 12],
            "quantity": [1.0, None, 2.0, 2.5],  # None becomes NaN: absent, not bad
        }
    )
    mapping = {"ts": "when", "user_id": "user"}
    report = store.ingest_dataframe(con, df, source="frame", mapping=mapping)
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (4, 2, 2)
    assert report.reasons == {"duplicate event_id": 1, "non-integer quantity": 1}
    got = con.execute("SELECT event_id, quantity, ts FROM events ORDER BY 1").fetchall()
    assert got == [(10, 1, T0), (11, None, T0 + timedelta(minutes=5))]
    again = store.ingest_dataframe(con, pa.Table.from_pandas(df), source="frame", mapping=mapping)
    assert again.duplicate_of == 1 and again.batch_id is None
    assert "already ingested as batch 1" in again.message()
    # An event id that already exists in the store is a duplicate too.
    later = df.iloc[[1]].assign(event_id=10, quantity=1.0, when=T0 + timedelta(hours=1))
    report = store.ingest_dataframe(con, later, source="later", mapping=mapping)
    assert report.reasons == {"duplicate event_id": 1}


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_skip_stored_quarantines_the_overlap_of_exports_without_event_ids(
    con, tmp_path: Path, kind: str
) -> None:
    columns = ["user", "when", "action", "item_id", "price"]
    first_day = [
        ("u1", "2024-03-01T10:00:00Z", "pv", "i1", 9.5),
        ("u1", "2024-03-01T10:00:00Z", "pv", "i1", 9.5),  # a real repeat, same second
        ("u1", "2024-03-01T10:05:00Z", "cart", "i1", 9.5),
        ("u2", "2024-03-01T11:00:00Z", "pv", "i2", None),
    ]
    overlap = [
        *first_day[:3],  # stored already
        ("u1", "2024-03-01T10:00:00Z", "pv", "i1", 9.5),  # a third copy: the store holds two
        ("u2", "2024-03-01T11:00:00Z", "pv", "i2", 4.0),  # one value differs: a new event
        ("u3", "2024-03-02T09:00:00Z", "pv", "i3", 1.0),  # new
    ]

    def export(name: str, rows: list[tuple]) -> Path:
        frame = pd.DataFrame(rows, columns=columns)
        path = tmp_path / f"{name}.{kind}"
        frame.to_csv(path, index=False) if kind == "csv" else frame.to_parquet(path)
        return path

    options = {"mapping": {"user_id": "user", "ts": "when", "event_type": "action"}}
    options["event_map"] = {"pv": "view"}
    store.ingest_file(con, export("day1", first_day), **options)
    report = store.ingest_file(con, export("day1-2", overlap), skip_stored=True, **options)

    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (6, 3, 3)
    assert report.reasons == {store.STORED_REASON: 3}
    lines = con.execute(
        "SELECT line, raw FROM quarantine WHERE batch_id = ? ORDER BY line", [report.batch_id]
    ).fetchall()
    first_line = 2 if kind == "csv" else 1  # a CSV's line 1 is its header
    assert [line for line, _ in lines] == [first_line, first_line + 1, first_line + 2]
    assert json.loads(lines[2][1])["action"] == "cart"  # the source row, as read
    counts = con.execute(
        "SELECT user_id, event_type, price, count(*) FROM events GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert counts == [
        ("u1", "cart", 9.5, 1),
        ("u1", "view", 9.5, 3),  # two stored + the third copy the overlap brought
        ("u2", "view", 4.0, 1),
        ("u2", "view", None, 1),
        ("u3", "view", 1.0, 1),
    ]

    # Without an option the file is refused whole and says what to choose; nothing is written
    before = snapshot(con)
    again = export("again", first_day[:1] + overlap[-1:])
    with pytest.raises(store.IngestError, match=r"again\.\w+: 2 rows repeat events already"):
        store.ingest_file(con, again, **options)
    assert snapshot(con) == before
    # --keep-repeats: a log can hold genuine repeats; stored again as asked
    kept = store.ingest_file(con, again, keep_repeats=True, **options)
    assert kept.rows_accepted == 2 and not kept.reasons
    with pytest.raises(store.StoreError, match="one of --skip-stored and --keep-repeats"):
        store.ingest_file(con, again, skip_stored=True, keep_repeats=True, **options)


def test_skip_stored_compares_every_stored_value(con) -> None:
    frame = pd.DataFrame(
        {"ts": [T0], "user_id": ["u1"], "event_type": ["login"], "device_id": ["d1"]}
    )
    store.ingest_dataframe(con, frame, source="with device")
    # the same moment without the device is not the stored event (it would store NULL there)
    bare = frame.drop(columns="device_id")
    report = store.ingest_dataframe(con, bare, source="no device", skip_stored=True)
    assert report.rows_accepted == 1 and not report.reasons
    later = frame.assign(ts=T0 + timedelta(hours=1))
    both = pd.concat([frame, later], ignore_index=True)  # not the same bytes as the first frame
    same = store.ingest_dataframe(con, both, source="again", skip_stored=True)
    assert same.rows_accepted == 1 and same.reasons == {store.STORED_REASON: 1}
    assert con.execute("SELECT count(*) FROM events").fetchone() == (3,)


def test_repeat_checks_leave_rows_with_event_ids_to_the_id_check(con) -> None:
    row = {"ts": [T0], "user_id": ["u1"], "event_type": ["view"]}
    store.ingest_dataframe(con, pd.DataFrame({**row, "event_id": [1]}), source="first")
    same_values = pd.DataFrame({**row, "event_id": [1]}).iloc[[0, 0]].assign(event_id=[2, 3])
    report = store.ingest_dataframe(con, same_values, source="new ids", skip_stored=True)
    assert report.rows_accepted == 2 and not report.reasons  # new ids are new events
    ids = con.execute("SELECT event_id FROM events ORDER BY 1").fetchall()
    assert ids == [(1,), (2,), (3,)]


def test_a_blank_session_does_not_hide_a_repeat(con, tmp_path: Path) -> None:
    # the stored copy's session is derived (u1:...), the file's is blank
    text = (
        "user_id,ts,event_type,session_id\n"
        "u1,2024-03-01T10:00:00,view,\n"
        "u1,2024-03-01T10:01:00,cart,s9\n"
    )
    store.ingest_file(con, write(tmp_path / "a.csv", text))
    again = write(tmp_path / "b.csv", text + "u2,2024-03-01T11:00:00,view,\n")
    with pytest.raises(store.IngestError, match="2 rows repeat events already stored"):
        store.ingest_file(con, again)
    report = store.ingest_file(con, again, skip_stored=True)
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (3, 1, 2)


def test_generated_event_ids_continue_after_existing_ones(con) -> None:
    df = pd.DataFrame({"ts": [T0, T0], "user_id": ["a", "b"], "event_type": ["v", "v"]})
    store.ingest_dataframe(con, df.assign(event_id=[100, 101]), source="first")
    store.ingest_dataframe(con, df, source="second", keep_repeats=True)
    ids = con.execute("SELECT event_id FROM events WHERE batch_id = 2 ORDER BY 1").fetchall()
    assert ids == [(102,), (103,)]


# ---------------------------------------------------------------------------------------------
# Idempotence and atomicity


def test_same_file_twice_is_a_noop(con, tmp_path: Path) -> None:
    path = write(
        tmp_path / "e.csv",
        """
        ts,user_id,event_type
        2024-03-01,u1,view
        garbage,u1,view
        """,
    )
    first = store.ingest_file(con, path)
    before = snapshot(con)
    second = store.ingest_file(con, path)
    assert second.duplicate_of == first.batch_id and second.checksum == first.checksum
    assert (second.rows_accepted, second.rows_quarantined) == (0, 0)
    assert "nothing changed" in second.message()
    assert snapshot(con) == before
    # The same bytes under another name are still the same content.
    copy = tmp_path / "copy.csv"
    copy.write_bytes(path.read_bytes())
    assert store.ingest_file(con, copy).duplicate_of == first.batch_id


@pytest.mark.parametrize("step", store.INGEST_STEPS)
def test_failure_mid_batch_leaves_database_unchanged(
    con, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    first = write(
        tmp_path / "first.csv",
        """
        ts,user_id,event_type
        2024-03-01T00:00:00,u2,view
        bad,u2,view
        """,
    )
    store.ingest_file(con, first)
    before = snapshot(con)
    second = write(
        tmp_path / "second.csv",
        """
        ts,user_id,event_type,price
        2024-03-01T00:00:00,u1,view,1
        2024-03-01T00:00:00,u1,view,-1
        2024-03-01T00:00:00,u3,view,1,1
        """,
    )
    monkeypatch.setattr(store, "_FAIL_AFTER_STEP", step)
    with pytest.raises(RuntimeError, match=f"injected failure after ingest step '{step}'"):
        store.ingest_file(con, second)
    assert snapshot(con) == before
    monkeypatch.setattr(store, "_FAIL_AFTER_STEP", None)
    report = store.ingest_file(con, second)  # the connection is usable and nothing is stale
    assert (report.batch_id, report.rows_accepted, report.rows_quarantined) == (2, 1, 2)


# ---------------------------------------------------------------------------------------------
# Property: whatever the malformation, every row is accounted for exactly once

_FIELD = st.text(alphabet="abcdefghij0123456789", min_size=1, max_size=6)
_BROKEN = (
    "bad_ts",
    "empty_user",
    "neg_price",
    "too_many",
    "too_few",
    "stray_quote",
    "open_quote",
)
_BAD_TS = ("not-a-date", "2024-13-45T00:00:00", "yesterday", "2024-02-30", "1e400", "--")


@st.composite
def _csv_rows(draw: st.DrawFn) -> list[tuple[str, str, str, str, str]]:
    """(kind, ts, user, event, price): kind is "ok" or one of _BROKEN."""
    n = draw(st.integers(min_value=1, max_value=25))
    rows = []
    for _ in range(n):
        kind = draw(st.sampled_from(("ok", "ok", *_BROKEN)))
        minute = draw(st.integers(min_value=0, max_value=60 * 24 * 30))
        ts = (T0 + timedelta(minutes=minute)).isoformat()
        price = f"{draw(st.integers(min_value=0, max_value=10_000)) / 100:.2f}"
        row = [kind, ts, draw(_FIELD), draw(st.sampled_from(("view", "cart", "buy"))), price]
        if kind == "bad_ts":
            row[1] = draw(st.sampled_from(_BAD_TS))
        elif kind == "empty_user":
            row[2] = draw(st.sampled_from(("", "  ")))
        elif kind == "neg_price":
            row[4] = "-" + price if price != "0.00" else "-1"
        rows.append(tuple(row))
    return rows


def _csv_line(kind: str, ts: str, user: str, event: str, price: str) -> str:
    fields = [ts, user, event, price]
    if kind == "too_many":
        fields.append("surplus")
    elif kind == "too_few":
        fields = fields[:2]
    elif kind == "stray_quote":
        fields[2] = f'"{event}"x'
    elif kind == "open_quote":  # never closed: the reader would take the rest of the file
        fields[2] = f'"{event}'
    return ",".join(fields)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_csv_rows())
def test_property_every_row_accepted_or_quarantined(rows, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("prop") / "p.csv"
    lines = ["ts,user_id,event_type,price"] + [_csv_line(*r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    con = store.connect(":memory:")
    report = store.ingest_file(con, path)
    assert report.rows_read == len(rows)
    assert report.rows_accepted + report.rows_quarantined == report.rows_read
    expected_ok = sorted(
        (datetime.fromisoformat(ts), user, event, float(price))
        for kind, ts, user, event, price in rows
        if kind == "ok"
    )
    got = con.execute("SELECT ts, user_id, event_type, price FROM events").fetchall()
    assert sorted(got) == expected_ok
    bad_lines = [i + 2 for i, r in enumerate(rows) if r[0] != "ok"]
    q = con.execute("SELECT line, reason FROM quarantine ORDER BY line").fetchall()
    assert [line for line, _ in q] == bad_lines
    expected_reason = {
        "bad_ts": "unparseable timestamp",
        "empty_user": "empty user_id",
        "neg_price": "negative price",
        "too_many": "wrong field count (too many)",
        "too_few": "wrong field count (too few)",
        "stray_quote": "bad quoting",
        "open_quote": "bad quoting",
    }
    broken = [r[0] for r in rows if r[0] != "ok"]
    assert len(q) == len(broken)
    for (_, reason), kind in zip(q, broken, strict=True):
        assert reason.startswith(expected_reason[kind]), (reason, kind)
    con.close()


# ---------------------------------------------------------------------------------------------
# Public data set layouts


def test_retailrocket_layout_with_mapping_and_event_map(con, tmp_path: Path) -> None:
    path = write(
        tmp_path / "events.csv",
        """
        timestamp,visitorid,event,itemid,transactionid
        1433221332117,257597,view,355908,
        1433224214164,992329,view,248676,
        1433221999827,111016,addtocart,10572,
        1433222276276,483717,transaction,253185,4000
        1433222276276,483717,transaction,253186,4000
        """,
    )
    mapping = store.parse_mapping(
        ["ts=timestamp", "user_id=visitorid", "event_type=event", "item_id=itemid"]
    )
    event_map = store.parse_event_map("addtocart=cart, transaction=purchase")
    report = store.ingest_file(con, path, mapping=mapping, event_map=event_map)
    assert (report.rows_accepted, report.rows_quarantined) == (5, 0)
    assert report.ignored_columns == ["transactionid"]
    counts = dict(con.execute("SELECT event_type, count(*) FROM events GROUP BY 1").fetchall())
    assert counts == {"view": 2, "cart": 1, "purchase": 2}
    ts = con.execute("SELECT ts FROM events WHERE user_id = '257597'").fetchone()[0]
    assert ts == datetime(2015, 6, 2, 5, 2, 12, 117000)


def test_taobao_headerless_layout_with_columns(con, tmp_path: Path) -> None:
    path = write(
        tmp_path / "UserBehavior.csv",
        """
        1,2268318,2520377,pv,1511544070
        1,2333346,2520771,pv,1511561733
        1,2576651,149192,buy,1511572885
        100,4365585,2520377,cart,1511596146
        100,4365585,2520377,fav,1511596200
        """,
    )
    report = store.ingest_file(
        con,
        path,
        columns=["user_id", "item_id", "category", "event_type", "ts"],
        event_map=store.parse_event_map("pv=view,buy=purchase,fav=wishlist,fvo=x"),
    )
    assert (report.rows_read, report.rows_accepted) == (5, 5)
    assert report.unmatched_event_map == ["fvo"]  # a typo renames nothing: the report says so
    assert "renames types no row has: fvo (a typo?)" in report.message()
    rows = con.execute("SELECT user_id, item_id, category, event_type, ts FROM events").fetchall()
    assert rows[0] == ("1", "2268318", "2520377", "view", datetime(2017, 11, 24, 17, 21, 10))
    assert {r[3] for r in rows} == {"view", "purchase", "cart", "wishlist"}
    with pytest.raises(store.IngestError, match="gives 3 names .* has 5 fields"):
        store.ingest_file(con, path, columns=["user_id", "item_id", "ts"])


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("gz", [False, True])
def test_an_unclosed_quote_does_not_swallow_the_lines_after_it(
    con, tmp_path: Path, newline: str, gz: bool
) -> None:
    """The CSV reader takes everything after an opening quote that never closes as one field;
    every line after it must still load, and the line itself be quarantined as it was."""
    lines = ["user_id,ts,event_type"] + [f"u{i},2024-03-01T12:00:{i:02d},view" for i in range(20)]
    lines[5] = 'u4,2024-03-01T12:00:04,"view'
    lines[12] = 'u11,"2024-03-01T12:00:11,view'
    data = (newline.join(lines) + newline).encode()
    path = tmp_path / ("q.csv.gz" if gz else "q.csv")
    path.write_bytes(gzip.compress(data) if gz else data)
    report = store.ingest_file(con, path)
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (20, 18, 2)
    assert con.execute("SELECT line, reason, raw FROM quarantine ORDER BY line").fetchall() == [
        (6, "bad quoting (a quote opened here is never closed)", lines[5]),
        (13, "bad quoting (a quote opened here is never closed)", lines[12]),
    ]
    loaded = {r[0] for r in con.execute("SELECT user_id FROM events").fetchall()}
    assert loaded == {f"u{i}" for i in range(20)} - {"u4", "u11"}


def test_thousand_rows_with_broken_ones(con, tmp_path: Path) -> None:
    broken = {17: "bad-ts", 250: "empty-user", 333: "neg-price", 512: "extra", 777: "quote"}
    lines = ["ts,user_id,event_type,price"]
    for i in range(1000):
        ts = (T0 + timedelta(seconds=97 * i)).isoformat()
        user, price = f"user{i % 37}", f"{i % 50}.5"
        line = f"{ts},{user},view,{price}"
        kind = broken.get(i)
        if kind == "bad-ts":
            line = f"yesterday,{user},view,{price}"
        elif kind == "empty-user":
            line = f"{ts},,view,{price}"
        elif kind == "neg-price":
            line = f"{ts},{user},view,-{price}"
        elif kind == "extra":
            line += ",surplus"
        elif kind == "quote":
            line = f'{ts},"{user}"!,view,{price}'
        lines.append(line)
    path = tmp_path / "thousand.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = store.ingest_file(con, path)
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (1000, 995, 5)
    q = quarantine_rows(con)
    assert [line for line, _, _ in q] == sorted(i + 2 for i in broken)
    assert all(reason and raw for _, reason, raw in q)
    assert con.execute("SELECT count(*) FROM events").fetchone() == (995,)
    before = snapshot(con)
    assert store.ingest_file(con, path).duplicate_of == report.batch_id
    assert snapshot(con) == before


# ---------------------------------------------------------------------------------------------
# Sessions and order


def test_sessions_split_on_gaps_longer_than_the_limit(con) -> None:
    gap = schema.SESSION_GAP_MINUTES
    minutes = [0, 10, 10 + gap, 10 + 2 * gap + 1, 20 + 2 * gap + 1]  # gap == limit stays
    df = pd.DataFrame(
        {
            "ts": [T0 + timedelta(minutes=m) for m in minutes] + [T0],
            "user_id": ["u"] * len(minutes) + ["other"],
            "event_type": ["view"] * (len(minutes) + 1),
        }
    ).sample(frac=1.0, random_state=3)  # input order must not matter
    store.ingest_dataframe(con, df, source="sessions")
    sessions = [r[0] for r in con.execute(
        "SELECT session_id FROM events WHERE user_id = 'u' ORDER BY ts"
    ).fetchall()]  # fmt: skip
    assert sessions[0] == sessions[1] == sessions[2] != sessions[3] == sessions[4]
    assert sessions[0] == "u:20240301T120000"
    other = con.execute("SELECT session_id FROM events WHERE user_id = 'other'").fetchone()
    assert other == ("other:20240301T120000",)


def test_a_session_continues_across_batches(con) -> None:
    """Logs shipped in files (hourly, daily) cut sessions at the file boundary unless the
    next batch picks up the session of the user's last stored event within the gap."""

    def batch(user: str, minutes: list[int], source: str) -> None:
        df = pd.DataFrame(
            {
                "ts": [T0 + timedelta(minutes=m) for m in minutes],
                "user_id": user,
                "event_type": "view",
            }
        )
        store.ingest_dataframe(con, df, source=source)

    batch("u", [0, 5], "first file")
    batch("v", [0], "first file, other user")
    batch("u", [15, 25, 90], "second file")  # 10 min after u's last: same session; 90: new
    batch("v", [45], "second file, other user")  # 45 min after v's last: a new session
    rows = con.execute("SELECT user_id, session_id FROM events ORDER BY user_id, ts").fetchall()
    u = [sid for user, sid in rows if user == "u"]
    v = [sid for user, sid in rows if user == "v"]
    assert u[:4] == ["u:20240301T120000"] * 4 and u[4] == "u:20240301T133000"
    assert v == ["v:20240301T120000", "v:20240301T124500"]


def test_given_session_ids_are_kept(con) -> None:
    df = pd.DataFrame(
        {
            "ts": [T0, T0 + timedelta(hours=5)],
            "user_id": ["u", "u"],
            "event_type": ["view", "view"],
            "session_id": ["s-1", "s-1"],
        }
    )
    store.ingest_dataframe(con, df, source="given")
    assert con.execute("SELECT DISTINCT session_id FROM events").fetchall() == [("s-1",)]


def test_events_stay_physically_sorted_after_two_batches(con) -> None:
    def batch(users: list[str], offset: int) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "ts": [T0 + timedelta(minutes=offset + 7 * i) for i in range(len(users))],
                "user_id": users,
                "event_type": "view",
            }
        )

    store.ingest_dataframe(con, batch(["c", "a", "b", "a", "c"], 0), source="one")
    store.ingest_dataframe(con, batch(["b", "a", "d", "c"], -3), source="two")
    physical = con.execute("SELECT user_id, ts, event_id FROM events ORDER BY rowid").fetchall()
    assert len(physical) == 9 and physical == sorted(physical)


# ---------------------------------------------------------------------------------------------
# Queries against pandas


@pytest.fixture
def world(con) -> tuple[duckdb.DuckDBPyConnection, pd.DataFrame]:
    rows = []
    for i in range(240):
        user = f"u{i % 9}"
        rows.append(
            {
                "ts": T0 + timedelta(minutes=13 * i + (i % 9) * 50),
                "user_id": user,
                "event_type": ["view", "cart", "purchase"][i % 3],
                "device_id": f"dev{i % 9 // 2}",  # u0/u1 share, u2/u3 share, ...
                "ip": "10.0.0.1" if i % 9 in (0, 5) and i % 2 else f"10.1.{i % 9}.1",
                "payment_id": "card-x" if i % 9 in (1, 8) else None,
            }
        )
    df = pd.DataFrame(rows)
    store.ingest_dataframe(con, df, source="world")
    events = con.execute("SELECT * FROM events").df()
    return con, events


def test_user_events_matches_pandas(world) -> None:
    con, events = world
    start, end = T0 + timedelta(hours=5), T0 + timedelta(hours=30)
    got = store.user_events(con, "u3", start, end.replace(tzinfo=UTC))
    mask = (events.user_id == "u3") & (events.ts >= start) & (events.ts < end)
    want = events[mask].sort_values(["ts", "event_id"])
    assert list(got.columns) == list(schema.COLUMN_NAMES)
    assert got.event_id.tolist() == want.event_id.tolist() and len(got) > 0
    assert got.ts.is_monotonic_increasing
    assert store.user_events(con, "nobody").empty


def test_active_users_matches_pandas(world) -> None:
    con, events = world
    start, end = T0 + timedelta(hours=2), T0 + timedelta(hours=40)
    got = store.active_users(con, start, end, min_events=20, limit=5)
    window = events[(events.ts >= start) & (events.ts < end)]
    agg = (
        window.groupby("user_id")
        .agg(
            n_events=("event_id", "size"),
            n_sessions=("session_id", "nunique"),
            first_ts=("ts", "min"),
            last_ts=("ts", "max"),
        )
        .reset_index()
    )
    want = (
        agg[agg.n_events >= 20].sort_values(["n_events", "user_id"], ascending=[False, True])
    ).head(5)
    assert got.user_id.tolist() == want.user_id.tolist() and len(got) > 0
    assert got.n_events.tolist() == want.n_events.tolist()
    assert got.n_sessions.tolist() == want.n_sessions.tolist()
    assert got.first_ts.tolist() == want.first_ts.tolist()
    assert len(store.active_users(con)) == events.user_id.nunique()


def test_shared_entities_matches_pandas(world) -> None:
    con, events = world
    got = store.shared_entities(con, "u1")
    want = []
    mine = events[events.user_id == "u1"]
    others = events[events.user_id != "u1"]
    for col in schema.ENTITY_COLUMNS:
        values = set(mine[col].dropna())
        hit = others[others[col].isin(values)]
        for (value, user), n in hit.groupby([col, "user_id"]).size().items():
            want.append((col, value, user, n))
    want.sort(key=lambda r: (r[0], r[1], -r[3], r[2]))
    assert list(got.itertuples(index=False, name=None)) == want
    assert {r[0] for r in want} == {"device_id", "payment_id"}


def test_dataset_summary_and_truth(world) -> None:
    con, events = world
    summary = store.dataset_summary(con)
    assert summary.n_events == len(events) and summary.n_users == 9
    assert summary.n_sessions == events.session_id.nunique()
    assert summary.first_ts == events.ts.min() and summary.last_ts == events.ts.max()
    assert summary.event_type_counts == events.event_type.value_counts().to_dict()
    assert summary.n_batches == 1 and summary.n_quarantined == 0
    assert summary.fraud_share is None and summary.typology_counts == {}
    users = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "typology": ["card_testing"] * 2 + [""]})
    truth_events = events[events.user_id.isin(["u1", "u2"])][["event_id", "user_id"]].assign(
        typology="card_testing"
    )
    store.write_truth(con, users, truth_events)
    store.write_truth(con, users, truth_events)  # replaces, does not append
    summary = store.dataset_summary(con)
    assert summary.fraud_share == pytest.approx(2 / 9)
    assert summary.typology_counts == {"card_testing": 2}
    assert con.execute("SELECT count(*) FROM truth_events").fetchone() == (len(truth_events),)
    assert json.loads(json.dumps(summary.to_dict()))["n_users"] == 9


# ---------------------------------------------------------------------------------------------
# Whole-file errors


def test_missing_column_error_names_missing_and_found(con, tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "when,who,price\n2024-03-01,u1,3\n")
    with pytest.raises(store.IngestError) as err:
        store.ingest_file(con, path, mapping={"ts": "when"})
    text = str(err.value)
    assert "missing required column(s) user_id, event_type" in text
    assert "columns found: when, who, price" in text and "\n" not in text
    with pytest.raises(
        store.IngestError, match="not found: user_id=visitor; columns found: when, who"
    ):
        store.ingest_file(con, path, mapping={"user_id": "visitor"})
    # A loghub export: the message proposes the mapping from the names such logs use.
    log = write(tmp_path / "bgl.csv", "LineId,Timestamp,Node,Time,EventId\n1,1117838570,R02,x,E1\n")
    with pytest.raises(store.IngestError) as err:
        store.ingest_file(con, log)
    assert "e.g. ts=Timestamp, event_type=EventId; CLI: --map ts=Timestamp --map" in str(err.value)
    # REES46: the hint names the optional columns too (a file loads once: a hint for ts
    # alone would lose item, category and session for good)
    rees = write(
        tmp_path / "2019-Oct.csv",
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,"
        "user_session\n2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,"
        "35.79,541312140,72d76fde-8bb3-4e00-8c23-a032dfed738c\n",
    )
    with pytest.raises(store.IngestError) as err:
        store.ingest_file(con, rees)
    assert (
        "CLI: --map ts=event_time --map session_id=user_session --map item_id=product_id"
        " --map category=category_id" in str(err.value)
    )


def test_a_headerless_file_is_not_read_as_one_with_a_header(con, tmp_path: Path) -> None:
    # Taobao's UserBehavior.csv: no header, epoch seconds
    rows = "100692,4167,1004,pv,1569888045\n100692,4167,1004,buy,1569888100\n"
    path = write(tmp_path / "UserBehavior.csv", rows)
    mapping = {"user_id": "100692", "ts": "1569888045", "event_type": "pv"}
    with pytest.raises(store.IngestError) as err:
        store.ingest_file(con, path, mapping=mapping)  # its first row taken for names
    text = str(err.value)
    assert "the first line looks like data, not a header (100692, 4167, 1004, pv" in text
    assert "--no-header --columns col1,col2,col3,col4,col5" in text
    assert con.execute("SELECT count(*) FROM ingest_batches").fetchone() == (0,)
    names = ["user_id", "item_id", "category", "event_type", "ts"]
    report = store.ingest_file(con, path, columns=names)
    assert (report.rows_read, report.rows_accepted) == (2, 2)
    # a date or an epoch time is never a column name, even beside two names
    dated = write(tmp_path / "dated.csv", "2024-01-01,u1,view\n2024-01-02,u2,view\n")
    with pytest.raises(store.IngestError, match="looks like data"):
        store.ingest_file(con, dated)
    # a header of names with a number among them is still a header
    named = write(tmp_path / "named.csv", "user_id,ts,event_type,2024\nu1,2024-03-01,view,1\n")
    assert store.ingest_file(con, named).rows_accepted == 1


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.csv", b"", "no rows"),
        ("header.csv", b"ts,user_id,event_type\n", "no rows"),
        ("utf16.csv", "ts,user_id,event_type\n".encode("utf-16"), "unreadable encoding"),
        ("junk.csv", bytes(range(256)) * 40, "unreadable encoding"),
        ("book.xlsx", b"PK\x03\x04" + b"\x00" * 100, "ZIP archive"),
        ("data.json", b'[{"ts": 1}]', "unsupported file type '.json'"),
    ],
)
def test_unreadable_files_raise_one_clear_error(con, tmp_path, name, content, match) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(store.IngestError, match=match) as err:
        store.ingest_file(con, path)
    assert "\n" not in str(err.value)
    assert con.execute("SELECT count(*) FROM ingest_batches").fetchone() == (0,)


def test_missing_file(con, tmp_path: Path) -> None:
    with pytest.raises(store.IngestError, match="file not found"):
        store.ingest_file(con, tmp_path / "nope.csv")


def test_gzipped_csv(con, tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "e.csv.gz"
    path.write_bytes(gzip.compress(b"ts,user_id,event_type\n2024-03-01,u1,view\n"))
    assert store.ingest_file(con, path).rows_accepted == 1


# ---------------------------------------------------------------------------------------------
# Argument parsing


def test_parse_mapping_and_event_map() -> None:
    assert store.parse_mapping(["ts=timestamp", " user_id = visitorid "]) == {
        "ts": "timestamp",
        "user_id": "visitorid",
    }
    for bad in (["ts"], ["ts="], ["=x"], ["when=timestamp"], ["ts=a", "ts=b"]):
        with pytest.raises(store.StoreError):
            store.parse_mapping(bad)
    assert store.parse_event_map("pv=view,buy=purchase") == {"pv": "view", "buy": "purchase"}
    assert store.parse_event_map("") == {}
    with pytest.raises(store.StoreError, match="bad event map entry 'pv'"):
        store.parse_event_map("pv,buy=purchase")
    with pytest.raises(store.StoreError, match="unknown column"):
        store.ingest_dataframe(
            store.connect(":memory:"), pd.DataFrame({"a": [1]}), source="x", mapping={"b": "a"}
        )


# ---------------------------------------------------------------------------------------------
# Locking


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    code = (
        "import duckdb, sys, time\n"
        "con = duckdb.connect(sys.argv[1])\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_locked_database_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "locked.duckdb"
    store.connect(path).close()
    proc = _hold_lock(path, 30)
    try:
        with pytest.raises(store.StoreLockedError) as err:
            store.connect(path, retries=2, backoff_s=0.01)
        assert f"PID {proc.pid}" in str(err.value) and "locked" in str(err.value)
        assert "3 attempts" in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_lock_released_while_retrying_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "brief.duckdb"
    store.connect(path).close()
    proc = _hold_lock(path, 0.4)
    try:
        con = store.connect(path, retries=8, backoff_s=0.05)
        assert store.migrate(con) == store.SCHEMA_VERSION
        con.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_file_that_loaded_nothing_can_be_ingested_again_with_other_options(
    con, tmp_path: Path
) -> None:
    path = write(
        tmp_path / "de.csv",
        """
        ts,user_id,event_type
        01.03.2024 12:00,k1,view
        01.03.2024 12:05,k1,purchase
        """,
    )
    first = store.ingest_file(con, path)
    assert (first.rows_accepted, first.reasons) == (0, {"unparseable timestamp": 2})
    again = store.ingest_file(con, path, ts_unit="%d.%m.%Y %H:%M")
    assert again.duplicate_of is None and again.rows_accepted == 2
    assert again.batch_id == first.batch_id  # it replaces the empty attempt
    assert con.execute("SELECT count(*) FROM quarantine").fetchall() == [(0,)]
    assert con.execute(
        "SELECT count(*), sum(rows_read), sum(rows_accepted) FROM ingest_batches"
    ).fetchall() == [(1, 2, 2)]
    # now it holds rows: the same content is a no-op, whatever the options
    third = store.ingest_file(con, path)
    assert third.duplicate_of == first.batch_id
    assert con.execute("SELECT count(*) FROM events").fetchall() == [(2,)]


def test_decimal_comma_prices_are_read_only_when_asked(con, tmp_path: Path) -> None:
    text = """
        ts;user_id;event_type;price
        2024-03-01T12:00:00;k1;purchase;12,99
        2024-03-01T12:01:00;k1;purchase;1.234,50
        2024-03-01T12:02:00;k1;view;
        2024-03-01T12:03:00;k1;purchase;12.99
        2024-03-01T12:04:00;k1;purchase;1,2,3
        """
    report = store.ingest_file(con, write(tmp_path / "eu.csv", text), decimal_comma=True)
    # 12.99 is ambiguous under a decimal comma (twelve, or 1,299?): quarantined, not guessed
    assert (report.rows_accepted, report.reasons) == (3, {"non-numeric price": 2})
    prices = con.execute("SELECT price FROM events ORDER BY ts").fetchall()
    assert prices == [(12.99,), (1234.5,), (None,)]
    # without the option the same file keeps only the rows whose price reads as a number
    plain = store.ingest_file(con, write(tmp_path / "eu2.csv", text.replace("k1", "k2")))
    assert (plain.rows_accepted, plain.reasons) == (2, {"non-numeric price": 3})
