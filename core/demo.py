"""Build the demo database: simulate a world, ingest it, store its ground truth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from core import store
from core.simulate import WorldConfig, simulate_world


def build_demo(
    db_path: str | Path,
    config: WorldConfig,
    progress: Callable[[int, int], None] | None = None,
) -> store.IngestReport:
    """Simulate ``config``'s world into ``db_path``; the database must not hold events yet.

    Demo event ids start at 0, so mixing a demo into a database that already holds other
    events would quarantine them as duplicates: refuse instead and say why.
    """
    con = store.connect(db_path)
    try:
        existing = store.dataset_summary(con).n_events
        if existing:
            raise store.StoreError(
                f"{db_path} already holds {existing:,} events; build the demo into a new "
                "database file (--db) or delete this one first"
            )
        world = simulate_world(config, progress=progress)
        source = (
            f"demo:seed={config.seed}:users={config.n_users}:days={config.days}"
            f":fraud_rate={config.fraud_rate}"
        )
        report = store.ingest_dataframe(con, world.events, source=source)
        try:
            store.write_truth(con, world.truth_users, world.truth_events)
        except BaseException:
            # Events without their ground truth would block a rebuild ("already holds
            # events"): take the batch back out, so a failed build leaves an empty store.
            con.execute("BEGIN TRANSACTION")
            # Table names from this fixed tuple; the batch id is a parameter.
            for table in ("events", "quarantine", "events_runs", "ingest_batches"):
                con.execute(f"DELETE FROM {table} WHERE batch_id = ?", [report.batch_id])  # noqa: S608
            con.execute("COMMIT")
            raise
        return report
    finally:
        con.close()
