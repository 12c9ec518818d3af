"""UI benchmark (Playwright + Debian Chromium): how long after navigation a page is ready.

- Investigate ready = the score timeline, the session graph and the entity graph are drawn
  (Plotly has rendered each one's SVG).
  cold: a first visit (a fresh browser profile: nothing cached) on a freshly started server
  (no server caches, model not loaded), median over
  --cold-runs servers, each started as `make run` starts it (`python -m pages._serve`, which
  imports torch, transformers and Captum before listening; the start-up time is recorded).
  warm: (a) selecting a row of the Triage queue, in the same tab — the analyst's path, the
  Plotly bundle already loaded — each row a user not opened before; (b) a new tab on the
  same user again; (c) a new tab on a user not opened before.
- Triage ready (warm) = score histogram and alerts-per-day chart drawn and the script done:
  (a) the sidebar link from Investigate, same tab; (b) a new tab.
New tabs open in one persistent browser profile that has loaded the app before, as a real
browser's tabs share its HTTP and code caches. A new tab is still a new Streamlit session whose
page boots the frontend and evaluates Plotly's 4.7 MB bundle again, so new-tab figures include
that; two bare Streamlit scripts served beside the app (a line of text; the same plus one Plotly
chart) measure that floor, new tab in the same kind of profile, without any fraudlens code.
Targets: Investigate <= 2 s warm, <= 6 s cold; Triage <= 1.5 s warm.
Writes results/bench_ui.{json,md}.

    .venv/bin/python benchmarks/bench_ui.py                    # data/fraudlens.duckdb (built
                                                               # like `make run` when absent)
    .venv/bin/python benchmarks/bench_ui.py --db path/to.duckdb --models path/to/models

The database is copied to a temporary folder first: the benchmark never writes to it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from benchmarks._common import write_results  # noqa: E402
from core import alerts, store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
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
TARGETS = {"investigate warm": 2.0, "investigate cold": 6.0, "triage warm": 1.5}
_DRAWN = """keys => keys.every(key => {
    const gd = document.querySelector(key + ' .js-plotly-plot');
    return gd && gd._fullLayout && gd.querySelector('.main-svg') && gd.data && gd.data.length;
})"""
INVESTIGATE_PLOTS = [
    ".st-key-inv_timeline",
    ".st-key-inv_session_graph",
    "[class*=st-key-inv_entities]",
]
TRIAGE_PLOTS = [".st-key-tri_hist", ".st-key-tri_per_day"]
# The invisible chart app.py draws on a session's first run: on Data & model, which has no
# chart of its own, a new tab is drawn when Plotly has drawn that empty figure.
PLOTLY_FLOOR_PLOTS = [".st-key-plotly_primer"]
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
ERROR = '[data-testid="stException"]'


SERVER_FLAGS = [
    "--server.headless=true",
    "--server.address=127.0.0.1",
    "--browser.gatherUsageStats=false",
    "--server.fileWatcherType=none",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _serving(
    args: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None, timeout_s: float = 90
) -> Iterator[str]:
    """`python args...` (a Streamlit server) on a free port until its health check answers;
    yields its URL and stops it by its PID on exit."""
    port = _free_port()
    with log.open("a") as out:
        proc = subprocess.Popen(
            [sys.executable, *args, *SERVER_FLAGS, f"--server.port={port}"],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start; see {log}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def app_server(
    db: Path,
    models: Path,
    log: Path,
    startups: list[float] | None = None,
    env_extra: dict[str, str] | None = None,
) -> Iterator[str]:
    """A fresh server started as `make run` starts it (`python -m pages._serve`: `streamlit run
    app.py` with the page modules imported first) on a free port; stopped by its PID on exit.
    Appends the seconds until it answered its health check to ``startups``."""
    started = time.monotonic()
    env = {**os.environ, "FRAUDLENS_DB": str(db), "FRAUDLENS_MODELS": str(models)}
    env.update(env_extra or {})
    with _serving(["-m", "pages._serve"], ROOT, log, env) as url:
        if startups is not None:
            startups.append(time.monotonic() - started)
        yield url


_BARE_SCRIPTS = {
    "text": 'import streamlit as st\n\nst.write("ready")\n',
    "plotly": "import plotly.graph_objects as go\nimport streamlit as st\n\n"
    'st.write("ready")\n'
    'st.plotly_chart(go.Figure(go.Scatter(x=[1, 2], y=[1, 2])), key="probe")\n',
}


@contextmanager
def _bare_server(script: Path, log: Path) -> Iterator[str]:
    """`streamlit run script` on a free port (no fraudlens code); stopped by its PID."""
    with _serving(["-m", "streamlit", "run", str(script)], script.parent, log, None, 60) as url:
        yield url


def _streamlit_floors(p, tmp: Path, runs: int) -> dict[str, list[float]]:
    """New-tab seconds of the bare scripts (text; text + one Plotly chart), each in its own
    persistent profile that has loaded the page once: what any Streamlit page costs on this
    machine before its own work."""
    out: dict[str, list[float]] = {}
    for name, code in _BARE_SCRIPTS.items():
        script = tmp / f"bare_{name}.py"
        script.write_text(code)
        with _bare_server(script, tmp / "bare.log") as url:
            profile = _profile(p, tmp / f"profile_{name}")
            keys = [".st-key-probe"] if name == "plotly" else []

            def new_tab(url: str = url, profile=profile, keys: list[str] = keys) -> float:
                page = profile.new_page()
                try:
                    started = time.perf_counter()
                    page.goto(url)
                    page.get_by_text("ready").wait_for(timeout=60_000)
                    _wait_drawn(page, keys, 60)
                    page.wait_for_selector(IDLE, state="attached", timeout=60_000)
                    return time.perf_counter() - started
                finally:
                    page.close()

            try:
                new_tab()  # fills the profile's caches
                out[name] = [new_tab() for _ in range(runs)]
            finally:
                profile.close()
    return out


def _profile(p, directory: Path):
    """A persistent browser profile (its own HTTP and code caches on disk, as a real browser's
    profile has); new tabs opened in it share them."""
    return p.chromium.launch_persistent_context(
        str(directory),
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 2200},
    )


def _new_tab(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 2200})
    return context, context.new_page()


def _wait_drawn(page, keys: list[str], timeout_s: float) -> None:
    if not keys:
        return
    page.wait_for_function(
        f"keys => ({_DRAWN})(keys) || document.querySelector('{ERROR}')",
        arg=keys,
        polling="raf",
        timeout=timeout_s * 1000,
    )
    if page.locator(ERROR).count():
        raise RuntimeError(f"{page.url}: {page.locator(ERROR).first.inner_text()[:300]}")


def _timed_goto(
    browser, url: str, keys: list[str], timeout_s: float = 60, *, idle: bool = False, context=None
) -> float:
    """Seconds from opening ``url`` in a new tab (a new session) until the plots are drawn.
    In ``context``: a new tab of a browser that has been here before (its HTTP cache holds the
    app's JavaScript, as a real browser's does); without one: a first visit, nothing cached."""
    own = context is None
    if own:
        context, page = _new_tab(browser)
    else:
        page = context.new_page()
    try:
        started = time.perf_counter()
        page.goto(url)
        _wait_drawn(page, keys, timeout_s)
        if idle:
            page.wait_for_selector(IDLE, state="attached", timeout=timeout_s * 1000)
        return time.perf_counter() - started
    finally:
        (context if own else page).close()


def _timed_row_click(browser, url: str, row: int, timeout_s: float = 60) -> float:
    """Seconds from selecting row ``row`` of the Triage queue until Investigate is drawn:
    the analyst's path, in one tab (Plotly already loaded by Triage's charts)."""
    context, page = _new_tab(browser)
    try:
        page.goto(url + "/")
        _wait_drawn(page, TRIAGE_PLOTS, timeout_s)
        grid = page.locator(".st-key-tri_queue [data-testid=stDataFrameResizable]")
        grid.locator("canvas").first.wait_for(timeout=timeout_s * 1000)
        page.wait_for_selector(IDLE, state="attached", timeout=timeout_s * 1000)
        box = grid.bounding_box()
        assert box is not None
        started = time.perf_counter()
        page.mouse.click(box["x"] + 18, box["y"] + 35 * (row + 1) + 17)  # row marker
        page.wait_for_url("**/investigate?user=*", timeout=timeout_s * 1000)
        _wait_drawn(page, INVESTIGATE_PLOTS, timeout_s)
        return time.perf_counter() - started
    finally:
        context.close()


def _timed_nav_click(browser, url: str, link: str, keys: list[str], timeout_s: float = 60) -> float:
    """Seconds from clicking the sidebar's ``link`` on Investigate until that page is drawn and
    idle: moving between pages inside one session, as an analyst does all day."""
    context, page = _new_tab(browser)
    try:
        page.goto(url)
        _wait_drawn(page, INVESTIGATE_PLOTS, timeout_s)
        page.wait_for_selector(IDLE, state="attached", timeout=timeout_s * 1000)
        target = page.locator("[data-testid=stSidebarNavLink]", has_text=link).first
        started = time.perf_counter()
        target.click()
        page.wait_for_selector(".st-key-inv_timeline", state="detached", timeout=timeout_s * 1000)
        _wait_drawn(page, keys, timeout_s)
        page.wait_for_selector(IDLE, state="attached", timeout=timeout_s * 1000)
        return time.perf_counter() - started
    finally:
        context.close()


def _prepare_db(db: Path, models: Path) -> None:
    """The default demo, as `make run` builds it (demo world, `small` model, all scored)."""
    print(f"{db} not found: building the default demo (`fraudlens prepare`, minutes on CPU)")
    env = {**os.environ, "FRAUDLENS_MODELS": str(models)}
    subprocess.run(
        [sys.executable, "-m", "core.cli", "prepare", "--db", str(db)],
        cwd=ROOT,
        env=env,
        check=True,
    )


def _pick_users(db: Path) -> tuple[str, list[str], dict[str, object]]:
    """The top-scored user (the one an analyst opens first) and others from the top of the
    queue for the warm-new-user runs."""
    with store.open_db(db) as con:
        model = con.execute(
            "SELECT model_id FROM models ORDER BY created_at DESC LIMIT 1"
        ).fetchall()
        if not model:
            raise SystemExit(f"{db} has no trained model: run `fraudlens train` and `score`")
        model_id = str(model[0][0])
        users = [
            str(r[0])
            for r in con.execute(
                "SELECT user_id FROM sequence_scores WHERE model_id = ? AND window_start IS NULL"
                " ORDER BY score DESC, user_id LIMIT 40",
                [model_id],
            ).fetchall()
        ]
        n_events, n_users = con.execute(
            "SELECT count(*), count(DISTINCT user_id) FROM events"
        ).fetchall()[0]
    if not users:
        raise SystemExit(f"model {model_id} has no stored scores: run `fraudlens score`")
    info = {"model_id": model_id, "n_events": int(n_events), "n_users": int(n_users)}
    return users[0], users[1:], info


def _ensure_alerts(db: Path, model_id: str, wanted: int) -> str:
    """Triage needs a queue to click: when the threshold in force (saved, else the app's
    default) leaves fewer than ``wanted`` alerts, save one on the COPY that alerts the top
    ``wanted`` users (a score percentile any analyst would pick). Returns what was done."""
    from core.scoring import DEFAULT_UNSUPERVISED_WEIGHT

    with store.open_db(db) as con:
        saved = alerts.saved_setting(con, model_id)
        threshold = saved.threshold if saved else alerts.DEFAULT_THRESHOLD
        scores = con.execute(
            "SELECT score FROM sequence_scores WHERE model_id = ? AND window_start IS NULL"
            " ORDER BY score DESC LIMIT ?",
            [model_id, wanted],
        ).fetchall()
        if len(scores) < wanted or scores[-1][0] >= threshold:
            return f"threshold {threshold:.3f} (as found)"
        lowered = float(np.floor(scores[-1][0] * 1000) / 1000)
        weight = saved.weight if saved else DEFAULT_UNSUPERVISED_WEIGHT
        alerts.save_threshold(con, model_id, lowered, weight, "bench_ui")
    return f"threshold {lowered:.3f} saved on the copy (was {threshold:.3f}: under {wanted} alerts)"


def _row(name: str, times: list[float], note: str = "") -> dict[str, object]:
    median = statistics.median(times)
    target = TARGETS.get(name)
    return {
        "measure": name,
        "median_s": round(median, 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "runs": len(times),
        "target_s": target,
        "meets_target": "" if target is None else "yes" if median <= target else "no",
        "note": note,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=Path("data/fraudlens.duckdb"))
    parser.add_argument(
        "--models", type=Path, default=Path(os.environ.get("FRAUDLENS_MODELS", "data/models"))
    )
    parser.add_argument("--runs", type=int, default=5, help="warm runs per measure")
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh servers for cold")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(
            "Debian chromium is missing at /usr/bin/chromium: apt-get install chromium"
        )
    from playwright.sync_api import sync_playwright

    source = args.db if args.db.is_absolute() else ROOT / args.db
    models = (args.models if args.models.is_absolute() else ROOT / args.models).resolve()
    if not source.exists():
        _prepare_db(source, models)
    user, others, info = _pick_users(source)

    with tempfile.TemporaryDirectory(prefix="bench-ui-") as tmp:
        db = Path(tmp) / "bench.duckdb"
        shutil.copy(source, db)
        threshold_note = _ensure_alerts(db, str(info["model_id"]), 2 * args.runs + 2)
        log = Path(tmp) / "server.log"
        inv = f"/investigate?user={quote(user)}"
        times: dict[str, list[float]] = {
            k: []
            for k in (
                *("cold", "same", "row", "new", "tri", "tri_nav", "floor", "startup"),
                *("startup_source", "bare_text", "bare_plotly"),
            )
        }
        # Side by side with the starts below: one start that cannot use cached bytecode (an
        # empty cache folder it may not write to), as a venv installed with --no-compile starts
        # where PYTHONDONTWRITEBYTECODE is set, before `make run` has compiled it.
        no_bytecode = {
            "PYTHONPYCACHEPREFIX": str(Path(tmp) / "no-pyc"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        with app_server(db, models, log, times["startup_source"], no_bytecode):
            pass
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for run in range(args.cold_runs):
                with app_server(db, models, log, times["startup"]) as url:
                    times["cold"].append(_timed_goto(browser, url + inv, INVESTIGATE_PLOTS, 120))
                    if run < args.cold_runs - 1:
                        continue
                    # the last server stays up for the warm measures; new tabs open in one
                    # persistent profile, which has loaded the app once (its caches are warm)
                    tabs = _profile(p, Path(tmp) / "profile")
                    first = tabs.new_page()
                    try:
                        first.goto(url + inv)
                        _wait_drawn(first, INVESTIGATE_PLOTS, 60)
                        first.close()
                        for _ in range(args.runs):
                            times["same"].append(
                                _timed_goto(browser, url + inv, INVESTIGATE_PLOTS, context=tabs)
                            )
                        for row in range(1, args.runs + 1):  # queue rows: users not opened yet
                            times["row"].append(_timed_row_click(browser, url, row))
                        for other in others[args.runs : 2 * args.runs]:
                            page = f"{url}/investigate?user={quote(other)}"
                            times["new"].append(
                                _timed_goto(browser, page, INVESTIGATE_PLOTS, context=tabs)
                            )
                        for _ in range(args.runs):
                            times["tri"].append(
                                _timed_goto(
                                    browser, url + "/", TRIAGE_PLOTS, idle=True, context=tabs
                                )
                            )
                        for _ in range(args.runs):
                            times["floor"].append(
                                _timed_goto(
                                    browser, url + "/data", PLOTLY_FLOOR_PLOTS, context=tabs
                                )
                            )
                    finally:
                        tabs.close()
                    for _ in range(args.runs):
                        times["tri_nav"].append(
                            _timed_nav_click(browser, url + inv, "Triage", TRIAGE_PLOTS)
                        )
            browser.close()
            floors = _streamlit_floors(p, Path(tmp), args.runs)
            times["bare_text"], times["bare_plotly"] = floors["text"], floors["plotly"]

    rows = [
        _row(
            "server start",
            times["startup"],
            "until the health check answers; includes importing torch, transformers, Captum",
        ),
        _row(
            "server start, no cached bytecode",
            times["startup_source"],
            "the same, every module compiled from source (what `make run`'s one-off "
            "compileall saves at each start)",
        ),
        _row(
            "investigate cold",
            times["cold"],
            "first visit (empty browser cache) on a fresh server; model not loaded",
        ),
        _row("investigate warm", times["row"], "click a Triage queue row (same tab), new user"),
        _row("investigate warm", times["same"], "new tab, same user again"),
        _row("investigate warm", times["new"], "new tab, a user not opened before"),
        _row("triage warm", times["tri"], "new tab; queue and charts drawn, script done"),
        _row(
            "plotly floor",
            times["floor"],
            "new tab on Data & model: its only chart is app.py's empty one, so this is the "
            "frontend's boot plus Plotly's bundle and first draw, not waiting for page work",
        ),
        _row(
            "triage warm",
            times["tri_nav"],
            "sidebar link from Investigate (same tab); queue and charts drawn, script done",
        ),
        _row(
            "streamlit floor",
            times["bare_text"],
            "new tab on a bare Streamlit script that writes one line (no fraudlens code), "
            "script done",
        ),
        _row(
            "streamlit + plotly floor",
            times["bare_plotly"],
            "new tab on a bare Streamlit script with one two-point Plotly chart (no fraudlens "
            "code): chart drawn, script done",
        ),
    ]
    extra = {
        "database": f"{source} ({info['n_users']:,} users, {info['n_events']:,} events)",
        "model": info["model_id"],
        "user": user,
        "threshold": threshold_note,
        "method": "median seconds from navigation until the page's plots are drawn; a new tab "
        "(same persistent browser profile, HTTP and code caches warm) also boots the frontend, "
        "evaluates Plotly's bundle and opens a new session; cold = a first visit (fresh "
        "browser profile) on a fresh server",
    }
    path = write_results("bench_ui", rows, extra)
    print(path.read_text())


if __name__ == "__main__":
    main()
