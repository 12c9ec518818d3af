"""Store benchmark: ingest speed (CSV, Parquet), per-user lookups, range queries, sequence
building, and the demo world generated + ingested. Writes results/bench_store.{json,md}.

    .venv/bin/python benchmarks/bench_store.py            # 1M and 10M events
    .venv/bin/python benchmarks/bench_store.py --quick    # 200k only (a smoke run)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import write_results  # noqa: E402
from core import store  # noqa: E402

EVENT_TYPES = ["view", "view", "view", "search", "cart", "purchase", "login", "payment", "review"]


def make_event_files(n_rows: int, directory: Path) -> tuple[Path, Path]:
    """Synthetic events at a realistic shape (~80 events per user, 30 days), written by DuckDB."""
    n_users = max(n_rows // 80, 1)
    csv_path = directory / f"events_{n_rows}.csv"
    parquet_path = directory / f"events_{n_rows}.parquet"
    con = duckdb.connect()
    # Fixed, trusted literals only (sizes are ints we computed): no outside values in this SQL.
    con.execute(
        "CREATE TABLE synth AS SELECT "
        "  i AS event_id, "
        "  TIMESTAMP '2026-10-01' + to_seconds((hash(i) % 2592000)::BIGINT) AS ts, "
        "  'u' || lpad(((hash(i * 31) % ?))::VARCHAR, 7, '0') AS user_id, "
        "  (?::VARCHAR[])[1 + (hash(i * 7) % 9)::INTEGER] AS event_type, "
        "  'i' || (hash(i * 11) % 50000)::VARCHAR AS item_id, "
        "  'cat' || (hash(i * 13) % 20)::VARCHAR AS category, "
        "  round((hash(i * 17) % 100000) / 100.0, 2) AS price, "
        "  1 + (hash(i * 19) % 3)::INTEGER AS quantity, "
        "  'd' || (hash(i * 23) % 200000)::VARCHAR AS device_id, "
        "  '10.' || (hash(i) % 256)::VARCHAR || '.' "
        "    || (hash(i * 29) % 256)::VARCHAR || '.1' AS ip, "
        "  (['DE','FR','US','GB','PL'])[1 + (hash(i * 37) % 5)::INTEGER] AS country "
        "FROM range(?) t(i)",
        [n_users, EVENT_TYPES, n_rows],
    )
    con.execute(f"COPY synth TO '{csv_path}' (HEADER, DELIMITER ',')")  # noqa: S608 — our temp path
    con.execute(f"COPY synth TO '{parquet_path}' (FORMAT parquet)")  # noqa: S608 — our temp path
    con.close()
    return csv_path, parquet_path


def time_ingest(path: Path, db_path: Path) -> tuple[float, store.IngestReport]:
    if db_path.exists():
        db_path.unlink()
    con = store.connect(db_path)
    started = time.perf_counter()
    report = store.ingest_file(con, path)
    seconds = time.perf_counter() - started
    con.close()
    return seconds, report


def query_timings(db_path: Path, lookups: int = 300) -> dict[str, float]:
    con = store.connect(db_path, read_only=True)
    users = [r[0] for r in con.execute("SELECT DISTINCT user_id FROM events").fetchall()]
    rng = np.random.default_rng(0)
    picks = rng.choice(users, size=min(lookups, len(users)), replace=False)
    store.user_events(con, str(picks[0]))  # warm the file cache once
    times = []
    for user in picks:
        started = time.perf_counter()
        store.user_events(con, str(user))
        times.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    store.active_users(con, datetime(2026, 10, 10), datetime(2026, 10, 17))
    range_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    con.execute(
        "SELECT user_id, list(event_type ORDER BY ts) AS seq FROM events GROUP BY user_id"
    ).fetchnumpy()
    sequences_s = time.perf_counter() - started
    con.close()
    times.sort()
    return {
        "timeline_p50_ms": statistics.median(times),
        "timeline_p95_ms": times[int(0.95 * (len(times) - 1))],
        "users_in_range_ms": range_ms,
        "all_sequences_s": sequences_s,
    }


def time_demo(target_events: int, directory: Path) -> dict[str, float | int]:
    from core.demo import build_demo
    from core.simulate import WorldConfig, simulate_world

    # Calibrate users for the target on a small world (events per user is a simulator outcome).

    probe = simulate_world(WorldConfig(n_users=500, seed=123))
    per_user = len(probe.events) / 500
    n_users = int(target_events / per_user)
    db_path = directory / "demo.duckdb"
    started = time.perf_counter()
    report = build_demo(db_path, WorldConfig(n_users=n_users, seed=7))
    seconds = time.perf_counter() - started
    return {"users": n_users, "events": report.rows_accepted, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200k rows only")
    parser.add_argument("--sizes", default="1000000,10000000")
    args = parser.parse_args()
    sizes = [200_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    rows: list[dict[str, object]] = []
    extra: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="fraudlens-bench-") as tmp:
        directory = Path(tmp)
        for n in sizes:
            csv_path, parquet_path = make_event_files(n, directory)
            for fmt, path in (("csv", csv_path), ("parquet", parquet_path)):
                seconds, report = time_ingest(path, directory / f"{fmt}_{n}.duckdb")
                row: dict[str, object] = {
                    "events": n,
                    "format": fmt,
                    "ingest_s": round(seconds, 2),
                    "rows_per_s": int(n / seconds),
                    "accepted": report.rows_accepted,
                    "quarantined": report.rows_quarantined,
                }
                if fmt == "parquet":
                    row.update(
                        {
                            k: round(v, 2)
                            for k, v in query_timings(directory / f"{fmt}_{n}.duckdb").items()
                        }
                    )
                rows.append(row)
                print(row, flush=True)
            for p in directory.glob(f"*_{n}.*"):
                p.unlink()
        demo = time_demo(200_000 if args.quick else 1_000_000, directory)
        extra["demo generated + ingested"] = (
            f"{demo['events']:,} events ({demo['users']:,} users) in {demo['seconds']:.1f} s"
        )
        print(extra, flush=True)
        shutil.rmtree(directory, ignore_errors=True)
    out = write_results("bench_store", rows, extra)
    print(out.read_text())


if __name__ == "__main__":
    main()
