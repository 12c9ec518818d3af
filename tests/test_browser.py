"""End-to-end: the real app in Debian's Chromium (Playwright). One Streamlit server for the
module, on a copy of the demo fixture; screenshots of each page land in test-artifacts/."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian chromium is not installed at /usr/bin/chromium "
    "(apt-get install -y chromium; `make test` installs it)",
)
sync_api = pytest.importorskip("playwright.sync_api")

from core import alerts, cases, store  # noqa: E402
from core.scoring import DEFAULT_UNSUPERVISED_WEIGHT  # noqa: E402
from tests.conftest import burst_users  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 2200}  # full_page screenshots stop at the viewport
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
FORMULA = "=1+1"


@dataclass(frozen=True)
class Server:
    url: str
    db_path: Path
    model_id: str
    user: str  # the top-scored user, in the open case
    case_id: int
    pid: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"streamlit not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(demo_env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The app on a private copy of the demo db: a saved threshold that raises alerts, and an
    open case for the top user whose title and label note are the formula ``=1+1``."""
    root = tmp_path_factory.mktemp("browser")
    db = root / "app.duckdb"
    shutil.copy(demo_env.db_path, db)
    with store.open_db(db) as con:
        scores = con.execute(
            "SELECT user_id, score FROM sequence_scores WHERE model_id = ?"
            " AND window_start IS NULL ORDER BY score DESC, user_id",
            [demo_env.model_id],
        ).df()
        threshold = round(float(np.quantile(scores["score"], 0.85)), 2)
        alerts.save_threshold(
            con, demo_env.model_id, threshold, DEFAULT_UNSUPERVISED_WEIGHT, "browser-test"
        )
        user = str(scores["user_id"].iloc[0])
        case_id = cases.open_case(con, "browser-test", [user], title=FORMULA)
        cases.add_label(con, user, "fraud", "browser-test", FORMULA)
    port = _free_port()
    env = {
        **os.environ,
        "FRAUDLENS_DB": str(db),
        "FRAUDLENS_MODELS": str(demo_env.models_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pages._serve",  # as `make run` starts it: streamlit run app.py, preloaded
                "--server.headless",
                "true",
                "--server.address",
                "127.0.0.1",
                "--server.port",
                str(port),
                "--browser.gatherUsageStats",
                "false",
                "--server.fileWatcherType",
                "none",
            ],  # fmt: skip
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        # the launcher imported the explanation stack before the server began to listen, and
        # froze it out of the collector's sight (hundreds of thousands of objects)
        preloaded = r"page modules loaded in [\d.]+ s \(([\d,]+) objects frozen\)"
        started = re.search(preloaded, log.read_text())
        assert started and int(started.group(1).replace(",", "")) > 100_000
        yield Server(url, db, demo_env.model_id, user, case_id, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser) -> Iterator[object]:
    """A fresh browser context per test: a new Streamlit session."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(60_000)
    yield tab
    context.close()


def _open(page, server: Server, path: str, title: str) -> None:
    page.goto(server.url + path)
    page.wait_for_selector('h1, [data-testid="stException"]', timeout=90_000)
    _no_exception(page)
    sync_api.expect(page.locator("h1").first).to_contain_text(title)
    page.wait_for_selector(IDLE, state="attached")
    # a pages/ folder beside st.navigation once made Streamlit answer the first deep link
    # after a start with a "Page not found" dialog over the right page (pages._serve now
    # tells it the app routes with st.navigation before the first request)
    assert page.get_by_text("Page not found").count() == 0


def _no_exception(page) -> None:
    errors = page.locator('[data-testid="stException"]')
    assert errors.count() == 0, errors.first.inner_text()


def _metric(page, label: str):
    card = page.locator('[data-testid="stMetric"]').filter(
        has=page.locator('[data-testid="stMetricLabel"]', has_text=label)
    )
    return card.locator('[data-testid="stMetricValue"]').first


def _plot(page, container: str):
    """The one Plotly graph div under `container`, once the app is idle. While a rerun replaces
    a chart, the old graph div and the new one can both be attached for a moment (CI saw two
    under the timeline's key), so wait for the run to finish and for exactly one."""
    page.wait_for_selector(IDLE, state="attached")
    plot = page.locator(f"{container} .js-plotly-plot")
    sync_api.expect(plot).to_have_count(1, timeout=60_000)
    return plot


def _timeline_points(page) -> int:
    """Events drawn in the Investigate timeline (Plotly keeps its data on the graph div);
    each point's customdata starts with the event id. Counted in one evaluation in the page,
    polled until exactly one drawn graph div is there: a rerun after the idle check (the
    explanation finishing re-runs the page) can attach a second div between a count and a read
    (CI saw a strict-mode error there)."""
    page.wait_for_selector(IDLE, state="attached")
    handle = page.wait_for_function(
        """sel => {
            const divs = document.querySelectorAll(sel);
            if (divs.length !== 1 || !divs[0].data) return null;
            // an object, so that zero points is an answer and not "keep waiting"
            return {points: divs[0].data.reduce(
                (n, t) => n + (t.customdata ? t.customdata.length : 0), 0)};
        }""",
        arg=".st-key-inv_timeline .js-plotly-plot",
        timeout=60_000,
    )
    return int(handle.json_value()["points"])


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_selector(IDLE, state="attached")
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_deep_link_on_a_fresh_server_opens_that_user(server: Server, page) -> None:
    """First in the module on purpose: the first session the server sees is a deep link."""
    _open(page, server, f"/investigate?user={quote(server.user)}", "Investigate")
    assert _timeline_points(page) > 0
    sync_api.expect(_metric(page, "Label")).to_have_text("fraud")


def test_every_page_renders(server: Server, page) -> None:
    _open(page, server, "/", "Triage")
    page.locator(".st-key-tri_queue canvas").first.wait_for()
    _screenshot(page, "triage")

    _open(page, server, f"/investigate?user={quote(server.user)}", "Investigate")
    assert _timeline_points(page) > 0
    _plot(page, ".st-key-inv_session_graph")
    _plot(page, "[class*='st-key-inv_entities']")
    _screenshot(page, "investigate")

    _open(page, server, "/thresholds", "Thresholds")
    _plot(page, ".st-key-thr_pr")
    _screenshot(page, "thresholds")

    _open(page, server, f"/cases?case={server.case_id}", "Cases")
    sync_api.expect(page.locator("h3", has_text=f"#{server.case_id}")).to_be_visible()
    _screenshot(page, "cases")

    _open(page, server, "/data", "Data & model")
    sync_api.expect(page.get_by_text("Upload events")).to_be_visible()
    page.locator('[data-testid="stDataFrame"]').last.wait_for()
    _screenshot(page, "data_model")


def test_selecting_a_triage_row_opens_its_timeline(server: Server, page) -> None:
    _open(page, server, "/", "Triage")
    grid = page.locator(".st-key-tri_queue")
    grid.locator("canvas").first.wait_for()
    # the grid draws on a canvas; its accessible twin table names the first row's user
    first_user = grid.locator("table[role=grid] tbody tr").first.locator("td").first.inner_text()
    box = grid.locator('[data-testid="stDataFrameResizable"]').bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + 18, box["y"] + 35 + 17)  # the first row's selection marker
    page.wait_for_url(f"**/investigate?user={quote(first_user.strip())}")
    sync_api.expect(page.locator("h1").first).to_contain_text("Investigate")
    assert _timeline_points(page) > 0
    _no_exception(page)


def test_explanation_panels_and_a_similar_case_click(server: Server, page) -> None:
    _open(page, server, f"/investigate?user={quote(server.user)}", "Investigate")
    assert _timeline_points(page) > 0
    sync_api.expect(page.get_by_text("ithout these", exact=False).first).to_be_visible(
        timeout=60_000
    )
    _plot(page, ".st-key-inv_fields")
    sync_api.expect(page.locator(".st-key-inv_summary")).to_contain_text("Written by")
    grid = page.locator(f".st-key-inv_similar_{server.user}")
    grid.locator("canvas").first.wait_for()
    first_user = grid.locator("table[role=grid] tbody tr").first.locator("td").first.inner_text()
    assert first_user.strip() and first_user.strip() != server.user
    grid.scroll_into_view_if_needed()
    page.wait_for_selector(IDLE, state="attached")  # the script is done: nothing moves now
    assert page.get_by_text("Page not found").count() == 0  # nothing covers the grid
    box = grid.locator('[data-testid="stDataFrameResizable"]').bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + 18, box["y"] + 35 + 17)  # the first similar user's marker
    # the app rewrites ?user= in place (history API): poll the address, not a page load
    page.wait_for_function(
        "u => location.search.includes('user=' + u)", arg=quote(first_user.strip())
    )
    # the page now shows that user: its decision form names it
    label_button = page.get_by_role("button", name=f"Label {first_user.strip()}")
    sync_api.expect(label_button).to_be_visible(timeout=60_000)
    _no_exception(page)
    _screenshot(page, "investigate_similar_click")


def _user_with_a_session_group(server: Server, models_dir: Path) -> tuple[str, str]:
    """A scored fraudulent user whose explanation names a session that carries its score, and
    that session (computed here with the model, as the page computes it)."""
    from core.behaviour import behaviour_groups
    from core.explain import explain_events
    from core.scoring import load_model

    loaded = load_model(models_dir / server.model_id, device="cpu")
    for user in burst_users(server.db_path, server.model_id, limit=10):
        with store.open_db(server.db_path, read_only=True) as con:
            events = store.user_events(con, user)
        groups = behaviour_groups(loaded, events, explain_events(loaded, events))
        sessions = [g for g in groups if g.kind == "session"]
        if sessions:  # the latest: the picker starts on an earlier one
            return user, max(sessions, key=lambda g: g.first_ts).key
    raise AssertionError("no fixture user with a session that carries its score")


def test_selecting_a_session_that_carries_the_score_draws_its_graph(
    server: Server, page, demo_env
) -> None:
    user, session = _user_with_a_session_group(server, demo_env.models_dir)
    _open(page, server, f"/investigate?user={quote(user)}", "Investigate")
    grid = page.locator(f".st-key-inv_behaviour_{user}")
    grid.locator("canvas").first.wait_for(timeout=60_000)
    grid.scroll_into_view_if_needed()
    page.wait_for_selector(IDLE, state="attached")
    rows = grid.locator("table[role=grid] tbody tr")
    sync_api.expect(rows.first).to_be_attached()
    keys = [rows.nth(i).locator("td").nth(1).inner_text().strip() for i in range(rows.count())]
    assert session in keys
    # the session graph's picker shows its choice in its input ("s0001 · 2026-10-07 ...")
    picker = page.locator(f".st-key-inv_s_{user} input")
    assert not picker.input_value().startswith(f"{session} ")
    box = grid.locator('[data-testid="stDataFrameResizable"]').bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + 18, box["y"] + 35 + 17 + 35 * keys.index(session))
    sync_api.expect(picker).to_have_value(re.compile(rf"^{re.escape(session)} "), timeout=60_000)
    _no_exception(page)


def test_threshold_slider_changes_the_alert_count(server: Server, page) -> None:
    _open(page, server, "/thresholds", "Thresholds")
    count = _metric(page, "Alerts in range")
    before = int(count.inner_text().replace(",", ""))
    slider = page.locator(".st-key-thr_threshold input[type=range]")
    slider.wait_for(state="attached")  # visually hidden
    start = float(slider.get_attribute("value"))
    slider.focus()
    for _ in range(20):  # 20 steps of 0.005 down: a lower threshold raises more alerts
        page.keyboard.press("ArrowLeft")
    sync_api.expect(count).not_to_have_text(f"{before:,}")
    page.wait_for_selector(IDLE, state="attached")
    assert float(slider.get_attribute("value")) == pytest.approx(start - 0.1)
    assert int(count.inner_text().replace(",", "")) > before
    _no_exception(page)


def test_case_csv_export_neutralises_formulas(server: Server, page, tmp_path: Path) -> None:
    _open(page, server, f"/cases?case={server.case_id}", "Cases")
    form = page.locator('[data-testid="stForm"]').filter(
        has=page.get_by_role("button", name="Add note")
    )
    form.locator("textarea").fill(FORMULA)
    form.get_by_role("button", name="Add note").click()
    sync_api.expect(page.get_by_text("Note added")).to_be_visible()
    page.wait_for_selector(IDLE, state="attached")

    button = page.locator('[data-testid="stDownloadButton"] button', has_text="Case CSV")
    time.sleep(1.5)  # the page prepared its buttons before this: the file must be newer
    clicked = datetime.now(UTC).replace(tzinfo=None)
    with page.expect_download() as download:
        button.click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert len(frame) == 1  # one row per (case, user)
    row = frame.iloc[0]
    assert (row["case_id"], row["user_id"]) == (str(server.case_id), server.user)
    assert row["model_id"] == server.model_id and row["label"] == "fraud"
    assert pd.Timestamp(row["exported_at"]) >= pd.Timestamp(clicked)  # made at the click
    assert row["title"] == "'=1+1" and row["label_note"] == "'=1+1"
    assert FORMULA in row["notes"]  # the note, inside "<when> <who>: =1+1"
    text_cells = frame.select_dtypes(exclude="number").to_numpy().ravel()
    assert not [c for c in text_cells if str(c).startswith(("=", "+", "@"))]

    # The download's audit row is written by the rerun its click starts: wait for it (bounded).
    deadline = time.monotonic() + 30
    while True:
        page.wait_for_selector(IDLE, state="attached")
        with store.open_db(server.db_path) as con:
            trail = cases.audit_trail(con, target=f"case:{server.case_id}")
        if {"case_note", "export_cases"} <= set(trail["action"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"case_note", "export_cases"} <= set(trail["action"])
    _no_exception(page)


def test_upload_ingests_and_reports(server: Server, page) -> None:
    """Last in the module: it adds events to the shared database copy."""
    _open(page, server, "/data", "Data & model")
    body = (
        b"ts,user_id,event_type,price\n"
        b"2026-10-05T10:00:00,upload-u1,view,3.5\n"
        b"2026-10-05T10:01:00,upload-u1,purchase,-2\n"  # negative price: quarantined
        b"2026-10-05T10:02:00,upload-u2,view,1\n"
    )
    page.locator("input[type=file]").set_input_files(
        files=[{"name": "upload.csv", "mimeType": "text/csv", "buffer": body}]
    )
    ingest = page.get_by_role("button", name="Validate and ingest")
    ingest.click()
    sync_api.expect(page.get_by_text("Validation report")).to_be_visible()
    sync_api.expect(_metric(page, "Accepted")).to_have_text("2")
    sync_api.expect(_metric(page, "Quarantined")).to_have_text("1")
    sync_api.expect(page.get_by_text("Sample of quarantined rows")).to_be_visible()
    _no_exception(page)
    _screenshot(page, "data_model_upload")
    with store.open_db(server.db_path) as con:
        got = con.execute(
            "SELECT user_id, event_type FROM events WHERE user_id LIKE 'upload-%' ORDER BY ts"
        ).fetchall()
        reasons = con.execute(
            "SELECT reason FROM quarantine WHERE source LIKE '%upload.csv'"
        ).fetchall()
    assert got == [("upload-u1", "view"), ("upload-u2", "view")]
    assert len(reasons) == 1 and "price" in reasons[0][0]
