"""The `fraudlens` command end to end on a tiny world: demo, info, ingest, train, score, export.

Runs in-process with Typer's CliRunner (a subprocess would pay the ~7 s transformers import
per command); settings come from FRAUDLENS_DB / FRAUDLENS_MODELS as in real use.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from core import alerts, cases, store
from core.cli import app
from tests.conftest import DemoEnv

FORMULA_USER = '=HYPERLINK("http://x","y")'
EXPORT_COLUMNS = [
    "user_id",
    "model_id",
    "score_unsupervised",
    "percentile_unsupervised",
    "score_supervised",
    "score_aggregate",
    "score",
    "rank",
    "n_events",
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FRAUDLENS_DB", str(tmp_path / "cli.duckdb"))
    monkeypatch.setenv("FRAUDLENS_MODELS", str(tmp_path / "models"))
    return tmp_path


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def test_the_whole_flow_on_a_tiny_world(env: Path) -> None:
    db_path = env / "cli.duckdb"
    result = invoke("demo", "--users", "50", "--days", "4", "--fraud-rate", "0.2", "--seed", "5")
    assert result.exit_code == 0, result.output
    assert "demo database ready" in result.output and db_path.exists()

    result = invoke("info", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_users"] == 50 and summary["n_events"] > 50
    n_demo_events = summary["n_events"]

    mixed = env / "mixed.csv"
    mixed.write_text(
        "ts,user_id,event_type,price\n"
        f'2026-10-02T10:00:00,"{FORMULA_USER.replace(chr(34), chr(34) * 2)}",login,\n'
        f'2026-10-02T10:01:00,"{FORMULA_USER.replace(chr(34), chr(34) * 2)}",view,12.5\n'
        "2026-10-02T10:02:00,newcomer,login,\n"
        "not a date,newcomer,view,3\n"
        "2026-10-02T10:03:00,newcomer,view,-4\n"
        "2026-10-02T10:04:00,newcomer,purchase,30\n"
    )
    result = invoke("ingest", str(mixed))
    assert result.exit_code == 0, result.output
    assert "4 accepted" in result.output and "2 quarantined" in result.output
    assert "unparseable timestamp" in result.output and "negative price" in result.output

    result = invoke(
        "train", "--size", "tiny", "--epochs", "1", "--max-windows", "20", "--every-fraud-window",
        "--raw-head",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    found = re.search(r"^model (\S+) saved to ", result.stdout, re.MULTILINE)
    assert found, result.output
    model_id = found.group(1)
    assert (env / "models" / model_id / "config.json").exists()
    train_config = json.loads((env / "models" / model_id / "train_config.json").read_text())
    assert train_config["witness_windows"] is False and train_config["calibrate_head"] is False
    assert "head_calibration" not in result.stdout  # --raw-head: not even tried
    assert re.search(r"^\s+n_train_windows\s+20$", result.stdout, re.MULTILINE), result.output

    result = invoke("score")
    assert result.exit_code == 0, result.output
    assert f"scored 52 users, {n_demo_events + 4:,} events with model {model_id}" in result.output

    out = env / "export" / "scores.csv"
    result = invoke("export-scores", str(out), "--analyst", "ana")
    assert result.exit_code == 0, result.output
    with store.open_db(db_path, read_only=True) as con:
        audit = con.execute("SELECT analyst, action, target FROM audit_log").fetchall()
    assert audit == [("ana", "export_scores", f"file:{out}")]  # scores left the database
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == EXPORT_COLUMNS
    assert len(rows) == 52 and {r["model_id"] for r in rows} == {model_id}
    users = {r["user_id"] for r in rows}
    # A formula-like cell is neutralised: a spreadsheet shows it as text.
    assert "'" + FORMULA_USER in users and FORMULA_USER not in users
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and rows[0]["rank"] == "1"
    assert sum(int(r["n_events"]) for r in rows) == n_demo_events + 4

    # a window's scores: refused until that window is scored, then exported with its bounds
    window = ("--start", "2026-10-02", "--end", "2026-10-03")
    out = env / "export" / "window.csv"
    result = invoke("export-scores", str(out), *window)
    assert result.exit_code != 0 and "no scores stored for the window" in result.output
    assert invoke("score", *window).exit_code == 0
    result = invoke("export-scores", str(out), *window)
    assert result.exit_code == 0, result.output
    with out.open(newline="") as fh:
        ranged = list(csv.DictReader(fh))
    assert ranged and {(r["window_start"], r["window_end"]) for r in ranged} == {
        ("2026-10-02", "2026-10-03")  # pandas writes midnight timestamps as dates
    }
    assert "newcomer" in {r["user_id"] for r in ranged}
    assert len(ranged) < len(rows)  # the users active in that day only

    with store.open_db(db_path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM quarantine").fetchone() == (2,)
        assert con.execute("SELECT count(*) FROM models").fetchone() == (1,)
        expected = alerts.novelty_watchlist(
            con, model_id, None, None, 0.99, min_percentile=0.5, limit=None
        )
    assert not expected.empty
    out = env / "export" / "watch.csv"
    result = invoke("watchlist", str(out), "--level", "0.5", "--threshold", "0.99")
    assert result.exit_code == 0, result.output
    assert f"wrote {len(expected):,} users rarer than 50% of training users" in result.output
    with out.open(newline="") as fh:
        listed = list(csv.DictReader(fh))
    assert [r["user_id"] for r in listed] == [
        "'" + u if u == FORMULA_USER else u for u in expected["user_id"]
    ]


def test_ingest_of_a_non_csv_file_fails_clearly(env: Path) -> None:
    book = env / "events.xlsx"
    book.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    result = invoke("ingest", str(book))
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception
    assert "ZIP archive" in result.output and "not CSV or Parquet" in result.output


def test_ingest_skip_stored_loads_overlapping_exports_once(env: Path) -> None:
    header = "user_id,ts,event_type\n"
    monday = env / "monday.csv"
    monday.write_text(header + "u1,2024-03-04T23:50:00Z,view\nu1,2024-03-04T23:55:00Z,cart\n")
    overlap = env / "monday-tuesday.csv"
    overlap.write_text(header + "u1,2024-03-04T23:55:00Z,cart\nu1,2024-03-05T00:10:00Z,purchase\n")
    assert invoke("ingest", str(monday)).exit_code == 0
    result = invoke("ingest", str(overlap))  # refused whole: the cart would be stored twice
    assert result.exit_code == 1
    assert "1 rows repeat events already stored" in result.output
    assert "--skip-stored" in result.output and "--keep-repeats" in result.output
    result = invoke("ingest", "--skip-stored", "--json", str(overlap))
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.stdout)
    assert report["rows_accepted"] == 1 and report["rows_quarantined"] == 1
    assert report["reasons"] == {store.STORED_REASON: 1}
    with store.open_db(env / "cli.duckdb", read_only=True) as con:
        kinds = con.execute("SELECT event_type FROM events ORDER BY ts").fetchall()
    assert kinds == [("view",), ("cart",), ("purchase",)]
    # a file that brings nothing new is not an error
    inside = env / "monday-late.csv"
    inside.write_text(header + "u1,2024-03-04T23:55:00Z,cart\n")
    result = invoke("ingest", "--skip-stored", str(inside))
    assert result.exit_code == 0, result.output
    assert "Every row was stored already" in result.output


def test_shared_lists_entities_several_users_share_without_a_model(env: Path) -> None:
    rows = ["user_id,ts,event_type,device_id,ip"]
    rows += [f"old{i},2024-03-01T0{i}:00:00Z,view,d_old{i},10.0.0.1" for i in range(3)]
    rows += [f"ring{i},2024-03-04T0{i}:00:00Z,signup,d_ring,10.0.0.{i + 2}" for i in range(4)]
    log = env / "log.csv"
    log.write_text("\n".join(rows) + "\n")
    assert invoke("ingest", str(log)).exit_code == 0
    result = invoke("shared")
    assert result.exit_code == 0, result.output
    assert "2 shared devices, cards and IPs (2+ users)" in result.output
    lines = result.output.splitlines()
    assert "d_ring" in lines[2] and "10.0.0.1" in lines[3]  # the device first, then the IP
    result = invoke("shared", "--entity", "ip", "--min-users", "4")
    assert result.exit_code == 0 and "0 shared ip (4+ users)" in result.output
    out = env / "shared.csv"
    result = invoke("shared", str(out), "--entity", "device")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert frame["value"].tolist() == ["d_ring"] and frame["opened_together"].tolist() == [4]
    with store.open_db(env / "cli.duckdb", read_only=True) as con:
        trail = cases.audit_trail(con, target=f"file:{out}")
    assert trail["action"].tolist() == ["export_shared"]
    result = invoke("shared", "--entity", "phone")
    assert result.exit_code == 2 and "device, card, IP" in result.output


def test_commands_without_data_or_model_say_what_to_do(env: Path) -> None:
    result = invoke("info")
    assert result.exit_code != 0 and "fraudlens demo" in result.output

    store.connect(env / "cli.duckdb").close()  # an empty store: no model yet
    result = invoke("score")
    assert result.exit_code != 0 and "fraudlens train" in result.output
    result = invoke("export-scores", str(env / "out.csv"))
    assert result.exit_code != 0 and "fraudlens train" in result.output
    assert not (env / "out.csv").exists()


def test_evaluate_with_cross_validation_on_a_tiny_world(env: Path) -> None:
    result = invoke("demo", "--users", "60", "--days", "4", "--fraud-rate", "0.2", "--seed", "3")
    assert result.exit_code == 0, result.output
    out = env / "eval.json"
    result = invoke(
        "evaluate", "--json", str(out), "--cv", "2", "--size", "tiny", "--epochs", "1",
        "--unseen-seed", "-1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    scorers = {"transformer_unsupervised", "iforest", "lof", "lightgbm", "deeplog", "logbert"}
    # every scorer side by side on the held-out users, and its mean and spread over 2 folds
    held_out = next(iter(report["results"].values()))
    assert scorers <= {row["name"] for row in held_out}
    assert scorers <= set(report["cv"])
    for summary in report["cv"].values():
        assert {"auprc_mean", "auprc_std", "auroc_mean", "recall_at_budget_mean"} <= set(summary)
    assert out.with_suffix(".md").exists()


def test_real_layouts_through_the_cli_options(env: Path) -> None:
    """The issue's real-format checks, as an analyst types them: RetailRocket with --map and
    --event-map, Taobao UserBehavior with --no-header --columns."""
    retail = env / "events.csv"
    retail.write_text(
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n"
        "1433221999827,111016,addtocart,10572,\n"
        "1433222276276,483717,transaction,253185,4000\n"
    )
    result = invoke(
        "ingest",
        str(retail),
        "--map",
        "ts=timestamp",
        "--map",
        "user_id=visitorid",
        "--map",
        "event_type=event",
        "--map",
        "item_id=itemid",
        "--event-map",
        "addtocart=cart,transaction=purchase",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)[0]
    assert (report["rows_accepted"], report["rows_quarantined"]) == (3, 0)
    taobao = env / "UserBehavior.csv"
    taobao.write_text("1,2268318,2520377,pv,1511544070\n100,4365585,2520377,buy,1511596146\n")
    cols = "user_id,item_id,category,event_type,ts"
    result = invoke("ingest", str(taobao), "--no-header", "--columns", cols, "--json",
                    "--event-map", "pv=view,buy=purchase")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["rows_accepted"] == 2
    with store.open_db(env / "cli.duckdb", read_only=True) as con:
        rows = con.execute("SELECT user_id, event_type FROM events ORDER BY ts").fetchall()
    assert rows == [  # 2015 (RetailRocket) before 2017 (Taobao)
        ("257597", "view"),
        ("111016", "cart"),
        ("483717", "purchase"),
        ("1", "view"),
        ("100", "purchase"),
    ]


def test_option_mistakes_get_one_clear_line(env: Path) -> None:
    taobao = env / "UserBehavior.csv"
    taobao.write_text("user,item,cat,behavior,ts\n1,2268318,2520377,pv,1511544070\n")
    result = invoke("ingest", str(taobao), "--columns", "user_id,item_id,category,event_type,ts")
    assert result.exit_code == 2 and "add --no-header" in result.output
    old_mac = env / "mac.csv"
    old_mac.write_bytes(b"user_id,ts,event_type\ru1,2026-01-01T00:00:00,view\r")
    result = invoke("ingest", str(old_mac))
    assert result.exit_code == 1 and "CR only" in result.output
    result = invoke("demo", "--days", "2")
    assert result.exit_code == 2 and "--days" in result.output
    result = invoke("train", "--users-file", str(env / "missing.txt"))
    assert result.exit_code == 2 and "cannot read the users file" in result.output


def test_resume_of_an_unknown_model_is_refused(env: Path) -> None:
    store.connect(env / "cli.duckdb").close()
    result = invoke("train", "--resume", "no-such-model")
    assert result.exit_code == 2 and "no checkpoint" in result.output
    assert not (env / "models" / "no-such-model").exists()


def test_a_file_whose_every_row_is_quarantined_fails_with_a_hint(env: Path) -> None:
    """HDFS-style 'yymmdd HHMMSS' times read without their format: no timestamp parses. The
    command says what to check and exits non-zero; the same file then loads with the format."""
    log = env / "hdfs.csv"
    log.write_text("Time,Block,EventId\n081109 203518,blk_1,E5\n081109 203519,blk_1,E22\n")
    args = ("--map", "user_id=Block", "--map", "event_type=EventId")
    result = invoke("ingest", str(log), "--map", "ts=Time", *args)
    assert result.exit_code == 1
    assert result.output.startswith("hdfs.csv: 2 rows read, 0 accepted, 2 quarantined")
    assert "Nothing was loaded" in result.output and "--ts-unit" in result.output
    result = invoke("ingest", str(log), "--map", "ts=Time", "--ts-unit", "%y%m%d %H%M%S", *args)
    assert result.exit_code == 0 and "2 accepted" in result.output


def test_labels_from_a_file_then_cases_exported_from_the_cli(env: Path) -> None:
    """A chargeback list becomes labels (one transaction, one audit row, bad rows named);
    export-cases writes the Cases page's CSV, neutralised and audited."""
    result = invoke("demo", "--users", "30", "--days", "3", "--seed", "2")
    assert result.exit_code == 0, result.output
    with store.open_db(env / "cli.duckdb", read_only=True) as con:
        users = [r[0] for r in con.execute(
            "SELECT DISTINCT user_id FROM events ORDER BY 1 LIMIT 3").fetchall()]  # fmt: skip
    chargebacks = env / "chargebacks.csv"
    chargebacks.write_text(
        "customer,is_fraud,comment\n"
        f"{users[0]},1,chargeback 2026-10\n"
        f"{users[1]},no,cleared by phone\n"
        "ghost,1,not in the logs\n"
        f"{users[2]},perhaps,\n"
    )
    result = invoke("label", str(chargebacks), "--user-column", "customer",
                    "--label-column", "is_fraud", "--note-column", "comment",
                    "--analyst", "ana")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 labels added, 2 rejected" in result.output
    assert "no such user in the events" in result.output and "perhaps" in result.output
    result = invoke("info")  # what the analysts' labels now say, beside the ground truth
    assert "labels       1 fraud, 1 legit (analysts' current labels)" in result.output
    assert json.loads(invoke("info", "--json").output)["label_counts"] == {"fraud": 1, "legit": 1}
    from core import cases

    with store.open_db(env / "cli.duckdb") as con:
        labels = cases.latest_labels(con).set_index("user_id")
        assert labels.loc[users[0], "label"] == "fraud" and labels.loc[users[1], "label"] == "legit"
        assert labels.loc[users[0], "note"] == "chargeback 2026-10"
        audit = con.execute("SELECT action, analyst FROM audit_log").fetchall()
        assert audit == [("label_import", "ana")]
        case_id = cases.open_case(con, "ana", [users[0]], title="=cmd|' /C calc'!A0")

    out = env / "cases.csv"
    result = invoke("export-cases", str(out), "--analyst", "ana")
    assert result.exit_code == 0, result.output
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["case_id"], r["user_id"], r["label"]) for r in rows] == [
        (str(case_id), users[0], "fraud")
    ]
    assert rows[0]["title"].startswith("'=")  # a formula no longer
    result = invoke("export-cases", str(env / "ev.csv"), "--case", str(case_id), "--evidence")
    assert result.exit_code == 0, result.output
    with store.open_db(env / "cli.duckdb", read_only=True) as con:
        actions = [
            r[0]
            for r in con.execute('SELECT action FROM audit_log ORDER BY "at", rowid').fetchall()
        ]
    assert actions[-2:] == ["export_cases", "export_evidence"]
    result = invoke("export-cases", str(env / "x.csv"), "--case", "99")
    assert result.exit_code == 1 and "99" in result.output


def test_prepare_retrains_a_model_this_code_cannot_read(
    demo_db_copy: DemoEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model from before a featurizer change (its fields differ) is not reused by `make run`:
    the app could not load it. A model it can read is kept."""
    import shutil

    from core import cli

    trained: list[Path] = []
    scored: list[Path] = []
    monkeypatch.setattr(cli, "train", lambda db: trained.append(db))
    monkeypatch.setattr(cli, "score", lambda db: scored.append(db))
    db = demo_db_copy.db_path
    result = CliRunner().invoke(app, ["prepare", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert trained == [] and scored == [] and "retraining" not in result.output

    old = tmp_path / "old_model"
    shutil.copytree(demo_db_copy.models_dir / demo_db_copy.model_id, old)
    featurizer = json.loads((old / "featurizer.json").read_text())
    featurizer["format_version"] = 1
    featurizer["fields"] = featurizer["fields"][:9]
    (old / "featurizer.json").write_text(json.dumps(featurizer))
    with store.open_db(db) as con:
        con.execute(
            "UPDATE models SET path = ? WHERE model_id = ?", [str(old), demo_db_copy.model_id]
        )
    result = CliRunner().invoke(app, ["prepare", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "older fraudlens" in result.output and "retraining" in result.output
    assert trained == [db] and scored == [db]  # the new model's scores too
