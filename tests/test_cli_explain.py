"""`fraudlens explain` on the tiny demo world: the readable report, the JSON object, and the
failures an analyst can meet (unknown user, no model, a summary backend that is down or that
cites what is not in the evidence).

In-process with Typer's CliRunner, like tests/test_cli.py (a subprocess would pay the ~7 s
transformers import per command).
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core import store
from core.cli import app
from core.sequences import FIELDS
from tests.conftest import DemoEnv

LLM_VARS = (
    "FRAUDLENS_LLM_BACKEND",
    "FRAUDLENS_LLM_MODEL_DIR",
    "FRAUDLENS_LLM_BASE_URL",
    "FRAUDLENS_LLM_MODEL",
    "FRAUDLENS_LLM_API_KEY",
    "FRAUDLENS_LLM_TIMEOUT",
)
JSON_KEYS = {"facts", "attribution", "field_totals", "counterfactual", "method", "summary"}
COUNTERFACTUAL_LINE = re.compile(
    r"(On the explained window of \d+ events: w|W)ithout these \d+ events? "
    r"the score ((falls|rises) from \d\.\d{2,3} to \d\.\d{2,3}|stays at \d\.\d\d); "
    r"without \d+ random events? it (stays at|falls to|rises to) \d\.\d\d\."
    # the deletion ladder's ending, when the top events leave the score above the threshold
    r"( Only without the \d+ top-ranked events does it fall to \d\.\d\d, under the alert"
    r" threshold of \d\.\d\d: the evidence is spread over many events\."
    r"| Even without the \d+ top-ranked events it is \d\.\d\d, still above the alert"
    r" threshold of \d\.\d\d: the evidence is spread over most of the window\.)?"
)


@pytest.fixture(autouse=True)
def no_llm_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary backend comes from the command line here, never from the caller's shell."""
    for var in LLM_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def fraud_user(demo_env: DemoEnv) -> tuple[str, set[int]]:
    """The fraudulent user with the most injected events, and the ids of all its events."""
    with store.open_db(demo_env.db_path, read_only=True) as con:
        row = con.execute(
            "SELECT user_id FROM truth_events GROUP BY user_id "
            "ORDER BY count(*) DESC, user_id LIMIT 1"
        ).fetchone()
        assert row is not None
        user = str(row[0])
        ids = {int(r[0]) for r in con.execute(
            "SELECT event_id FROM events WHERE user_id = ?", [user]
        ).fetchall()}  # fmt: skip
    return user, ids


def invoke(*args: str):
    result = CliRunner().invoke(app, ["explain", *args])
    assert "Traceback" not in result.output, result.output
    return result


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_text_report_shows_events_counterfactual_and_summary(
    demo_env: DemoEnv, fraud_user: tuple[str, set[int]]
) -> None:
    user, ids = fraud_user
    result = invoke(user, "--db", str(demo_env.db_path), "--backend", "template", "--steps", "16")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"user         {user}" in out
    assert "default threshold 0.90" in out  # nothing saved for the fixture's model
    assert "16 steps from a typical event" in out  # the supervised logit's baseline
    table = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+\d{4}-\d\d-\d\d ", line)]
    assert len(table) == min(10, len(ids))
    # the fixture's model has a head: the first five rows show the fraud probability as the
    # deletion search removed them one by one, the rest leave the column empty
    assert "top events (the first 5 picked by a deletion search" in out and "p without" in out
    probability = re.compile(r"\s(0|1)\.\d{3}\s")
    assert all(probability.search(line) for line in table[:5]), table
    assert not any(probability.search(line) for line in table[5:]), table
    assert "attribution per field:" in out and "new device" in out and "event type" in out
    assert COUNTERFACTUAL_LINE.search(out), out
    assert "summary  [backend: template; grounding: grounded]" in out
    assert f"User {user} scores" in out  # the template summary itself
    assert "FLAGGED" not in out


def test_json_has_attributions_per_event_and_field_and_a_grounded_summary(
    demo_env: DemoEnv, fraud_user: tuple[str, set[int]]
) -> None:
    user, ids = fraud_user
    result = invoke(
        user,
        "--db",
        str(demo_env.db_path),
        "--json",
        "--backend",
        "template",
        "--steps",
        "12",
        "--target",
        "unsupervised",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert JSON_KEYS <= set(data)

    att = data["attribution"]
    fields = att["field_names"]
    assert fields == list(FIELDS)
    events = att["events"]
    assert len(events) == att["n_events"] == min(len(ids), 128)  # the tiny model's max_len
    assert att["n_events_total"] == len(ids)
    assert {e["event_id"] for e in events} <= ids
    assert all(len(e["per_field"]) == len(fields) for e in events)
    assert all(abs(sum(e["per_field"]) - e["attribution"]) < 1e-6 for e in events)
    # Completeness survives the trip to JSON: the attributions add up to the target's change
    # from the neutral baseline (--target unsupervised), within the convergence delta reported
    # beside them.
    total = sum(e["attribution"] for e in events)
    gap = att["target_value"] - att["baseline_value"]
    assert abs(total - gap) <= data["method"]["convergence_delta"] + 1e-3 * max(1.0, abs(gap))
    assert len(data["field_totals"]) == len(fields)
    assert abs(sum(data["field_totals"].values()) - total) < 1e-6

    # the ranking: every explained event once, most important first; the search's path
    assert sorted(att["ranking"]) == sorted(e["event_id"] for e in events)
    assert len(att["deletion_path"]) == 5
    assert data["method"]["ranking"].startswith("deletion search")

    # The options reach the code that uses them.
    assert data["method"]["n_steps"] == 12
    assert data["method"]["target"] == att["target"] == "unsupervised"

    cf = data["counterfactual"]
    assert COUNTERFACTUAL_LINE.fullmatch(cf["sentence"])
    assert cf["k"] == data["facts"]["counterfactual"]["k"]
    assert abs(cf["drop_top"] - (cf["score_before"] - cf["score_without_top"])) < 1e-9

    facts = data["facts"]
    assert facts["user_id"] == user and facts["n_events"] == len(ids)
    assert facts["threshold"] == 0.9 and data["threshold_source"] == "default"
    summary = data["summary"]
    assert summary["backend"] == "template"
    assert summary["grounding"]["grounded"] is True and summary["flagged"] is False
    assert summary["grounding"]["problems"] == []
    assert user in summary["text"]


def test_unknown_user_or_empty_range_fails_with_a_message(demo_env: DemoEnv) -> None:
    result = invoke("nobody-here", "--db", str(demo_env.db_path))
    assert result.exit_code == 1
    assert "no user 'nobody-here'" in result.output

    with store.open_db(demo_env.db_path, read_only=True) as con:
        row = con.execute("SELECT user_id, max(ts) FROM events GROUP BY 1 LIMIT 1").fetchone()
    assert row is not None
    after = f"{row[1]:%Y-%m-%d}T23:59:59"
    result = invoke(str(row[0]), "--db", str(demo_env.db_path), "--start", after)
    assert result.exit_code == 1
    assert "has no events between" in result.output


def test_without_a_model_or_with_bad_options_it_says_what_to_do(
    tmp_path: Path, demo_env: DemoEnv
) -> None:
    empty = tmp_path / "empty.duckdb"
    store.connect(empty).close()
    result = invoke("u000001", "--db", str(empty))
    assert result.exit_code == 1
    assert "no trained model" in result.output and "fraudlens train" in result.output

    result = invoke("u000001", "--db", str(demo_env.db_path), "--backend", "gpt")
    assert result.exit_code == 2 and "--backend must be one of" in result.output
    result = invoke("u000001", "--db", str(demo_env.db_path), "--target", "both")
    assert result.exit_code == 2 and "--target must be one of" in result.output
    result = invoke("u000001", "--db", str(demo_env.db_path), "--baseline", "zero")
    assert result.exit_code == 2 and "--baseline must be one of" in result.output
    # openai-compatible without its URL is a usage error, found before any attribution.
    result = invoke("u000001", "--db", str(demo_env.db_path), "--backend", "openai-compatible")
    assert result.exit_code == 2 and "FRAUDLENS_LLM_BASE_URL" in result.output


def test_an_unreachable_llm_endpoint_falls_back_to_the_template(
    demo_env: DemoEnv, fraud_user: tuple[str, set[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    user, _ = fraud_user
    port = free_port()  # bound and released: nothing listens there
    monkeypatch.setenv("FRAUDLENS_LLM_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("FRAUDLENS_LLM_MODEL", "stub")
    monkeypatch.setenv("FRAUDLENS_LLM_TIMEOUT", "3")
    result = invoke(
        user, "--db", str(demo_env.db_path), "--backend", "openai-compatible", "--steps", "8"
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "backend: template (asked for openai-compatible)" in out
    assert "openai-compatible failed (cannot reach" in out
    assert "showing the template summary" in out
    assert f"User {user} scores" in out and "FLAGGED" not in out


class _Hallucinating(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint whose answer cites a device and an amount not in the facts."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        text = "The account paid 98,765.43 from device zz-ghost-device-77 at 03:17."
        body = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def hallucinating_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hallucinating)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_an_ungrounded_summary_is_flagged_loudly_with_the_template_beside_it(
    demo_env: DemoEnv,
    fraud_user: tuple[str, set[int]],
    monkeypatch: pytest.MonkeyPatch,
    hallucinating_endpoint: str,
) -> None:
    user, _ = fraud_user
    monkeypatch.setenv("FRAUDLENS_LLM_BASE_URL", hallucinating_endpoint)
    monkeypatch.setenv("FRAUDLENS_LLM_MODEL", "stub")
    result = invoke(
        user, "--db", str(demo_env.db_path), "--backend", "openai-compatible", "--steps", "8"
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "summary  [backend: openai-compatible; grounding: NOT GROUNDED]" in out
    assert "FLAGGED" in out and "zz-ghost-device-77" in out
    shown, _, beside = out.partition("template summary (grounded, from the facts only):")
    assert "98,765.43" in shown
    assert f"User {user} scores" in beside and "zz-ghost-device-77" not in beside


def test_a_ranged_explanation_reads_the_events_before_it_as_context(demo_env: DemoEnv) -> None:
    with store.open_db(demo_env.db_path, read_only=True) as con:
        user, start = con.execute(
            "SELECT user_id, quantile_disc(ts, 0.5) FROM events GROUP BY 1 "
            "HAVING count(*) >= 40 ORDER BY 1 LIMIT 1"
        ).fetchone()  # type: ignore[misc]
    result = invoke(
        str(user),
        "--db",
        str(demo_env.db_path),
        "--start",
        f"{start:%Y-%m-%dT%H:%M:%S.%f}",
        "--json",
    )
    assert result.exit_code == 0, result.output
    att = json.loads(result.stdout)["attribution"]
    assert att["n_context"] > 0
    assert sum(e["context"] for e in att["events"]) == att["n_context"]
    inside = {e["event_id"] for e in att["events"] if not e["context"]}
    assert set(att["ranking"]) == inside
    assert all(e["ts"] >= str(start) for e in att["events"] if not e["context"])


def test_baseline_option_reaches_the_attributions(
    demo_env: DemoEnv, fraud_user: tuple[str, set[int]]
) -> None:
    """The fraud logit is explained from the typical event unless --baseline absent asks for
    the neutral one; both add up to the logit's change from their own starting point."""
    from core.explain import NEUTRAL_BASELINE, TYPICAL_BASELINE

    user, _ = fraud_user
    runs = {}
    for option in ("typical", "absent"):
        result = invoke(
            user, "--db", str(demo_env.db_path), "--json", "--steps", "16",
            "--target", "supervised", "--baseline", option,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[option] = json.loads(result.stdout)
    assert runs["typical"]["method"]["baseline"] == TYPICAL_BASELINE
    assert runs["absent"]["method"]["baseline"] == NEUTRAL_BASELINE
    typical, absent = (runs[o]["attribution"] for o in ("typical", "absent"))
    assert typical["target_value"] == absent["target_value"]
    assert typical["baseline_value"] != absent["baseline_value"]
    for run in runs.values():
        att = run["attribution"]
        total = sum(e["attribution"] for e in att["events"])
        gap = att["target_value"] - att["baseline_value"]
        assert abs(total - gap) <= run["method"]["convergence_delta"] + 1e-3 * max(1.0, abs(gap))
