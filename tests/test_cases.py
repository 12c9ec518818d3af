"""Labels, cases, audit trail and CSV exports on a private copy of the demo database."""

from __future__ import annotations

import io
import json

import duckdb
import numpy as np
import pandas as pd
import pytest

from core import cases, store

TABLES = (
    "labels",
    "cases",
    "case_users",
    "case_events",
    "case_notes",
    "case_status_history",
    "audit_log",
)


def _users(con: duckdb.DuckDBPyConnection, n: int = 3) -> list[str]:
    rows = con.execute("SELECT DISTINCT user_id FROM events ORDER BY 1 LIMIT ?", [n]).fetchall()
    return [r[0] for r in rows]


def _snapshot(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    return {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall())) for t in TABLES}  # noqa: S608


def _actions(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [
        r[0] for r in con.execute('SELECT action FROM audit_log ORDER BY "at", rowid').fetchall()
    ]


def test_case_lifecycle_and_audit(demo_db_copy) -> None:
    with store.open_db(demo_db_copy.db_path) as con:
        u1, u2, u3 = _users(con)
        first = cases.open_case(con, "ann", [u1, u2], title="ring", note="looks linked")
        second = cases.open_case(con, "bob", u3)
        assert (first, second) == (1, 2)

        pinned = [
            r[0]
            for r in con.execute(
                "SELECT event_id FROM events WHERE user_id = ? ORDER BY ts LIMIT 2", [u3]
            ).fetchall()
        ]
        assert cases.add_to_case(con, first, "bob", [u3], event_ids=pinned) == ([u3], pinned)
        assert cases.add_to_case(con, first, "bob", [u3], event_ids=pinned) == ([], [])
        other = con.execute("SELECT event_id FROM events WHERE user_id = ? LIMIT 1", [u1])
        with pytest.raises(cases.CaseError, match="do not belong"):
            cases.add_to_case(con, second, "bob", event_ids=[other.fetchall()[0][0]])

        cases.set_case_status(con, first, "investigating", "bob")
        cases.assign_case(con, first, "carl", "bob")
        cases.add_note(con, first, "card shared with u3", "carl")
        cases.set_case_status(con, first, "closed-fraud", "carl")
        with pytest.raises(cases.CaseError, match="can move to investigating"):
            cases.set_case_status(con, first, "open", "carl")
        with pytest.raises(cases.CaseError, match="no case 99"):
            cases.add_note(con, 99, "x", "carl")

        detail = cases.case_detail(con, first)
        assert detail.status == "closed-fraud" and detail.assignee == "carl"
        assert detail.users["user_id"].tolist() == [u1, u2, u3]
        assert detail.users.set_index("user_id").loc[u3, "n_pinned_events"] == 2
        assert detail.events["event_id"].tolist() == pinned
        assert detail.notes["note"].tolist() == ["looks linked", "card shared with u3"]
        assert detail.history[["status", "analyst"]].values.tolist() == [
            ["open", "ann"],
            ["investigating", "bob"],
            ["closed-fraud", "carl"],
        ]
        assert detail.next_statuses == ["investigating"]

        listing = cases.list_cases(con, statuses=["open"])
        assert listing["case_id"].tolist() == [second]
        assert cases.list_cases(con, assignee="carl")["case_id"].tolist() == [first]
        assert set(cases.list_cases(con, user_id=u3)["case_id"]) == {first, second}
        assert cases.assignees(con) == ["bob", "carl"]
        assert cases.user_case_status(con, [u1, u3]).to_dict() == {
            u1: "#1 closed-fraud",
            u3: "#2 open",
        }

        assert _actions(con) == [
            "case_open",
            "case_open",
            "case_add",
            "case_status",
            "case_assign",
            "case_note",
            "case_status",
        ]
        trail = cases.audit_trail(con, target=f"case:{first}")
        assert trail["analyst"].tolist()[0] == "carl"
        assert json.loads(trail["detail"].iloc[0]) == {
            "from": "investigating",
            "to": "closed-fraud",
        }


def test_two_sessions_opening_cases_at_once_get_different_ids(demo_db_copy) -> None:
    """Two dashboard sessions (connections of one server process) inside their transactions at
    the same moment: the old max(case_id) + 1 gave both the same id."""
    first = store.connect(demo_db_copy.db_path)
    second = store.connect(demo_db_copy.db_path)
    try:
        users = _users(first, 2)
        first.begin()
        second.begin()
        a = cases.next_case_id(first)
        b = cases.next_case_id(second)
        assert a != b
        first.rollback()
        second.rollback()
        ids = [cases.open_case(first, "ann", users[0]), cases.open_case(second, "bob", users[1])]
        rows = first.execute("SELECT case_id, count(*) FROM cases GROUP BY 1").fetchall()
        assert len(set(ids)) == 2 and all(n == 1 for _, n in rows)
    finally:
        first.close()
        second.close()


def test_case_ids_skip_numbers_taken_before_the_sequence(demo_db_copy) -> None:
    """Cases written before schema step 5 (no sequence) keep their ids; new ones go past them."""
    with store.open_db(demo_db_copy.db_path) as con:
        user = _users(con, 1)[0]
        con.execute(
            "INSERT INTO cases (case_id, title, status) VALUES (1, 'old', 'open'),"
            " (2, 'old', 'closed'), (4, 'old', 'open')"
        )
        new = [cases.open_case(con, "ann", user) for _ in range(3)]
        assert new == [3, 5, 6]


def test_labels_latest_wins_and_are_audited(demo_db_copy) -> None:
    with store.open_db(demo_db_copy.db_path) as con:
        u1, u2, _ = _users(con)
        cases.add_label(con, u1, "unsure", "ann", "check again")
        cases.add_label(con, u1, "fraud", "bob", "confirmed")
        cases.add_label(con, u2, "legit", "ann")
        with pytest.raises(cases.CaseError, match="label must be"):
            cases.add_label(con, u2, "maybe", "ann")
        with pytest.raises(cases.CaseError, match="unknown user"):
            cases.add_label(con, "no-such-user", "fraud", "ann")
        with pytest.raises(cases.CaseError, match="analyst"):
            cases.add_label(con, u2, "fraud", "  ")
        latest = cases.latest_labels(con).set_index("user_id")
        assert latest.loc[u1, "label"] == "fraud" and latest.loc[u1, "analyst"] == "bob"
        assert latest.loc[u2, "label"] == "legit"
        assert cases.label_history(con, u1)["label"].tolist() == ["fraud", "unsure"]
        assert _actions(con) == ["label", "label", "label"]
        assert cases.audit_count(con) == 3


@pytest.mark.parametrize("step", ["label", "open", "status", "note", "add", "assign", "export"])
def test_failure_mid_write_leaves_tables_unchanged(demo_db_copy, monkeypatch, step) -> None:
    """Every write records its audit row last: failing there must roll back the whole change."""
    with store.open_db(demo_db_copy.db_path) as con:
        u1, u2, _ = _users(con)
        case_id = cases.open_case(con, "ann", [u1])
        before = _snapshot(con)

        def boom(*args, **kwargs):
            raise RuntimeError("disk full")

        monkeypatch.setattr(cases, "record_audit", boom)
        with pytest.raises(RuntimeError, match="disk full"):
            if step == "label":
                cases.add_label(con, u1, "fraud", "ann", "x")
            elif step == "open":
                cases.open_case(con, "ann", [u1, u2], note="n")
            elif step == "status":
                cases.set_case_status(con, case_id, "investigating", "ann")
            elif step == "note":
                cases.add_note(con, case_id, "a note", "ann")
            elif step == "add":
                cases.add_to_case(con, case_id, "ann", [u2])
            elif step == "assign":
                cases.assign_case(con, case_id, "zed", "ann")
            else:
                cases.record_export(con, "ann", "cases", [case_id], 1)
        assert _snapshot(con) == before


def _case_with_formulas(con: duckdb.DuckDBPyConnection) -> tuple[int, list[str]]:
    u1, u2, _ = _users(con)
    cases.add_label(con, u1, "fraud", "ann", "+x")
    case_id = cases.open_case(con, "@SUM(A1)", [u1, u2], title="-2", assignee="=1+1")
    cases.add_note(con, case_id, "=1+1", "ann")
    return case_id, [u1, u2]


def test_case_export_neutralises_formulas_and_keeps_numbers(demo_db_copy, tmp_path) -> None:
    with store.open_db(demo_db_copy.db_path) as con:
        case_id, users = _case_with_formulas(con)
        out = tmp_path / "cases.csv"
        n = cases.export_cases(
            con, [case_id], out, model_id=demo_db_copy.model_id, threshold=0.5, analyst="ann"
        )
        assert n == 2
        frame = pd.read_csv(out, keep_default_na=False)
        assert list(frame.columns) == list(cases.EXPORT_COLUMNS)
        assert frame["user_id"].tolist() == users
        row = frame.iloc[0]
        assert row["title"] == "'-2"
        assert row["assignee"] == "'=1+1"
        assert row["created_by"] == "'@SUM(A1)"
        assert row["label"] == "fraud" and row["label_note"] == "'+x"
        assert "=1+1" in row["notes"]  # the note text sits inside the cell, after its timestamp
        assert not any(str(v).startswith(("=", "+", "-", "@")) for v in frame.to_numpy().ravel())
        # numbers stay numbers: scores from the model, the threshold, the case id
        assert pd.api.types.is_float_dtype(frame["score"]) and frame["score"].between(0, 1).all()
        stored = dict(
            con.execute(
                "SELECT user_id, score FROM sequence_scores WHERE model_id = ?"
                " AND window_start IS NULL",
                [demo_db_copy.model_id],
            ).fetchall()
        )
        np.testing.assert_allclose(frame["score"], [stored[u] for u in users])
        assert (frame["threshold"] == 0.5).all() and frame["case_id"].dtype.kind == "i"
        assert (frame["alert"] == (frame["score"] >= 0.5)).all()
        assert frame["top_reasons"].str.contains(" ×").all()
        assert (frame["model_id"] == demo_db_copy.model_id).all()
        last = cases.audit_trail(con, limit=1).iloc[0]
        assert last["action"] == "export_cases" and last["target"] == f"case:{case_id}"
        assert json.loads(last["detail"])["rows"] == 2


def test_negative_numbers_stay_numeric_and_text_is_neutralised() -> None:
    frame = pd.DataFrame({"n": [-2, 3], "x": [-0.5, 1.0], "t": ["-2", "@SUM(A1)"]})
    text = cases.export_csv_bytes(frame).decode()
    assert text.splitlines() == ["n,x,t", "-2,-0.5,'-2", "3,1.0,'@SUM(A1)"]
    back = pd.read_csv(io.StringIO(text))
    assert back["n"].tolist() == [-2, 3] and back["x"].tolist() == [-0.5, 1.0]


def test_case_export_scores_with_the_saved_weight_like_the_dashboard(demo_db_copy) -> None:
    """After an analyst saves another unsupervised weight on Thresholds, Triage re-combines the
    scores with it; the case CSV's score and alert flag must be the same numbers."""
    from core import alerts

    model_id = demo_db_copy.model_id
    with store.open_db(demo_db_copy.db_path) as con:
        users = _users(con, 3)
        case_id = cases.open_case(con, "ann", users)
        before = cases.case_export_frame(
            con, [case_id], model_id=model_id, threshold=0.5, analyst="ann"
        )
        assert before["unsupervised_weight"].isna().all()  # nothing saved: stored scores
        alerts.save_threshold(con, model_id, 0.5, 0.9, "ann")
        after = cases.case_export_frame(
            con, [case_id], model_id=model_id, threshold=0.5, analyst="ann"
        )
        shown = alerts.active_scores(con, model_id, None, None, weight=0.9).set_index("user_id")
    assert (after["unsupervised_weight"] == 0.9).all()
    expected = shown.loc[after["user_id"], "score"].to_numpy()
    np.testing.assert_allclose(after["score"].to_numpy(dtype=float), expected, rtol=1e-9)
    assert not np.allclose(after["score"], before["score"])  # the weight did move them
    assert (after["alert"] == (after["score"] >= 0.5)).all()


def test_evidence_frame_has_events_with_surprisal(demo_db_copy, tmp_path) -> None:
    with store.open_db(demo_db_copy.db_path) as con:
        case_id, users = _case_with_formulas(con)
        pin = con.execute("SELECT min(event_id) FROM events WHERE user_id = ?", [users[1]])
        pinned = pin.fetchall()[0][0]
        cases.add_to_case(con, case_id, "ann", event_ids=[pinned])
        frame = cases.case_evidence_frame(con, case_id, model_id=demo_db_copy.model_id)
        expected = con.execute(
            "SELECT e.event_id, s.surprisal FROM events e JOIN event_scores s"
            " ON s.event_id = e.event_id AND s.model_id = ? WHERE e.user_id IN (?, ?)",
            [demo_db_copy.model_id, *users],
        ).df()
        assert len(frame) == len(expected) > 0
        merged = frame.merge(expected, on="event_id", suffixes=("", "_db"))
        np.testing.assert_allclose(merged["surprisal"], merged["surprisal_db"])
        assert frame.loc[frame["pinned"], "event_id"].tolist() == [pinned]
        assert frame["user_id"].is_monotonic_increasing
        out = tmp_path / "evidence.csv"
        n = cases.export_evidence(con, case_id, out, model_id=demo_db_copy.model_id, analyst="ann")
        assert n == len(frame) and pd.read_csv(out)["surprisal"].dtype.kind == "f"
        assert _actions(con)[-1] == "export_evidence"


def test_top_reasons_match_pandas(demo_env) -> None:
    with store.open_db(demo_env.db_path, read_only=True) as con:
        top = con.execute(
            "SELECT user_id FROM sequence_scores WHERE model_id = ? ORDER BY score DESC LIMIT 3",
            [demo_env.model_id],
        ).fetchall()
        users = [r[0] for r in top]
        reasons = cases.top_reasons(con, demo_env.model_id, users, max_reasons=1)
        events = con.execute(
            "SELECT e.user_id, e.event_type, e.ts, s.surprisal FROM events e JOIN event_scores s"
            " USING (event_id) WHERE s.model_id = ? AND e.user_id IN (?, ?, ?)",
            [demo_env.model_id, *users],
        ).df()
    for user in users:
        mine = events[events["user_id"] == user].sort_values(
            ["surprisal", "ts"], ascending=[False, True]
        )
        head = mine.head(cases.REASON_EVENTS)
        counts = head.groupby("event_type").agg(n=("ts", "size"), peak=("surprisal", "max"))
        best = counts.sort_values(["n", "peak"], ascending=False).index[0]
        peak_ts = head[head["event_type"] == best].iloc[0]["ts"]
        assert reasons[user] == f"{best} ×{counts.loc[best, 'n']} at {peak_ts:%Y-%m-%d %H:%M}"
