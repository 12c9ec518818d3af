"""Tests for the layout of `events` (a sorted run plus a small tail of appended runs) and for
CSV duplicate ids after broken lines. Proposed next to tests/test_store.py."""

from __future__ import annotations

import json
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from core import store

T0 = datetime(2024, 3, 1, 12, 0, 0)


@pytest.fixture
def con(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    c = store.connect(tmp_path / "layout.duckdb")
    yield c
    c.close()


def batch(users: list[str], offset: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "ts": [T0 + timedelta(minutes=offset + 7 * i) for i in range(len(users))],
            "user_id": users,
            "event_type": "view",
        }
    )


def physical(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    return con.execute(
        "SELECT user_id, ts, event_id, batch_id FROM events ORDER BY rowid"
    ).fetchall()


def runs(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("SELECT count(*) + 1 FROM events_runs").fetchall()[0][0]


def test_small_batches_are_appended_as_sorted_runs_until_compact(
    con, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "_COMPACT_BELOW_ROWS", 0)
    store.ingest_dataframe(con, batch(["c", "a", "b", "a", "c"], 0), source="one")
    store.ingest_dataframe(con, batch(["b", "a", "d", "c"], -3), source="two")
    store.ingest_dataframe(con, batch(["e", "a"], 100), source="three")
    assert runs(con) == 3
    rows = physical(con)
    for b in (1, 2, 3):  # each batch is one contiguous run, sorted by (user_id, ts, event_id)
        run = [r[:3] for r in rows if r[3] == b]
        assert run == sorted(run)
        positions = [i for i, r in enumerate(rows) if r[3] == b]
        assert positions == list(range(positions[0], positions[0] + len(positions)))
    assert [r[:3] for r in rows] != sorted(r[:3] for r in rows)  # not one run yet
    timeline = store.user_events(con, "a")
    assert list(timeline.ts) == sorted(timeline.ts) and len(timeline) == 4
    assert store.compact(con) == 3
    assert runs(con) == 1 and store.compact(con) == 1  # a single run is left alone
    rows = physical(con)
    assert len(rows) == 11 and [r[:3] for r in rows] == sorted(r[:3] for r in rows)


@pytest.mark.parametrize(("limit", "name"), [(3, "_MAX_TAIL_ROWS"), (2, "_MAX_RUNS")])
def test_a_tail_over_its_limit_rewrites_the_table(
    con, monkeypatch: pytest.MonkeyPatch, limit: int, name: str
) -> None:
    monkeypatch.setattr(store, "_COMPACT_BELOW_ROWS", 0)
    monkeypatch.setattr(store, name, limit)
    store.ingest_dataframe(con, batch(["c", "a", "b"], 0), source="one")
    store.ingest_dataframe(con, batch(["b", "a"], 1), source="two")  # 2 tail rows, 2 runs
    assert runs(con) == 2
    store.ingest_dataframe(con, batch(["a", "d"], 2), source="three")  # over the limit
    assert runs(con) == 1
    rows = [r[:3] for r in physical(con)]
    assert len(rows) == 7 and rows == sorted(rows)


def test_failure_while_appending_a_run_changes_nothing(
    con, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "_COMPACT_BELOW_ROWS", 0)
    store.ingest_dataframe(con, batch(["c", "a"], 0), source="one")
    before = (physical(con), runs(con))
    monkeypatch.setattr(store, "_FAIL_AFTER_STEP", "events")
    with pytest.raises(RuntimeError, match="injected failure"):
        store.ingest_dataframe(con, batch(["b"], 1), source="two")
    assert (physical(con), runs(con)) == before


def test_csv_duplicate_id_after_broken_lines_keeps_its_line_and_raw_row(
    con, tmp_path: Path
) -> None:
    # A stray quote and a short line before the duplicate: the re-read of the source rows
    # for the duplicate's raw row must skip the same lines as the first read.
    path = tmp_path / "dups.csv"
    path.write_text(
        textwrap.dedent(
            """\
            event_id,ts,user_id,event_type
            1,2024-03-01T00:00:00,u1,view
            2,2024-03-01T00:01:00,u1,"view"x
            3,2024-03-01T00:02:00
            4,2024-03-01T00:03:00,u2,view
            1,2024-03-01T00:04:00,u3,cart
            5,2024-03-01T00:05:00,u3,view
            """
        ),
        encoding="utf-8",
    )
    report = store.ingest_file(con, path)
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (6, 3, 3)
    q = con.execute("SELECT line, reason, raw FROM quarantine ORDER BY line").fetchall()
    assert [(line, reason) for line, reason, _ in q] == [
        (3, "bad quoting"),
        (4, "wrong field count (too few)"),
        (6, "duplicate event_id"),
    ]
    assert json.loads(q[2][2]) == {
        "event_id": "1", "ts": "2024-03-01T00:04:00", "user_id": "u3", "event_type": "cart"
    }  # fmt: skip
    ids = con.execute("SELECT event_id FROM events ORDER BY event_id").fetchall()
    assert ids == [(1,), (4,), (5,)]


def test_compact_command_merges_the_runs_and_says_how_many(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from core.cli import app

    monkeypatch.setattr(store, "_COMPACT_BELOW_ROWS", 0)
    path = tmp_path / "cli.duckdb"
    with store.open_db(path) as c:
        store.ingest_dataframe(c, batch(["c", "a"], 0), source="one")
        store.ingest_dataframe(c, batch(["b", "a"], 1), source="two")
        assert runs(c) == 2
    first = CliRunner().invoke(app, ["compact", "--db", str(path)])
    assert first.exit_code == 0, first.output
    assert "compacted 2 sorted runs" in first.output
    again = CliRunner().invoke(app, ["compact", "--db", str(path)])
    assert again.exit_code == 0 and "nothing to do" in again.output
    with store.open_db(path, read_only=True) as c:
        rows = physical(c)
        assert runs(c) == 1 and [r[:3] for r in rows] == sorted(r[:3] for r in rows)
    missing = CliRunner().invoke(app, ["compact", "--db", str(tmp_path / "none.duckdb")])
    assert missing.exit_code == 1 and "no database" in missing.output
