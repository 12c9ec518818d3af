"""The `fraudlens` command: build the demo, ingest files, describe the database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from core import store
from core.config import get_settings

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="fraudlens: find and explain fraudulent behaviour in e-commerce event logs.",
)

DbOption = Annotated[
    Path | None,
    typer.Option("--db", help="DuckDB file (default: $FRAUDLENS_DB or data/fraudlens.duckdb)."),
]


def _db(db: Path | None) -> Path:
    return db if db is not None else get_settings().db_path


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@app.command()
def demo(
    users: Annotated[int, typer.Option(min=10, help="Number of users in the world.")] = 3000,
    days: Annotated[int, typer.Option(min=1, help="Days of history.")] = 30,
    fraud_rate: Annotated[float, typer.Option(min=0.0, max=0.5, help="Fraud share.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same world).")] = 0,
    db: DbOption = None,
) -> None:
    """Simulate a demo world with labelled fraud typologies and load it into the database."""
    from core.demo import build_demo
    from core.simulate import WorldConfig

    path = _db(db)
    config = WorldConfig(n_users=users, days=days, fraud_rate=fraud_rate, seed=seed)
    bar = tqdm(total=users, desc="simulating users", unit="user")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        report = build_demo(path, config, progress=progress)
    except store.StoreError as exc:
        raise _fail(str(exc)) from None
    finally:
        bar.close()
    typer.echo(report.message())
    typer.echo(f"demo database ready: {path}")


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="CSV or Parquet files.")],
    map_: Annotated[
        list[str] | None,
        typer.Option("--map", help="canonical=source column, e.g. --map user_id=visitorid."),
    ] = None,
    event_map: Annotated[
        str | None, typer.Option(help="Rename event types, e.g. 'pv=view,buy=purchase'.")
    ] = None,
    no_header: Annotated[bool, typer.Option("--no-header", help="Files lack a header.")] = False,
    columns: Annotated[
        str | None, typer.Option(help="Column names for headerless files, comma-separated.")
    ] = None,
    ts_unit: Annotated[
        str, typer.Option(help="Timestamp format: auto, iso, s (epoch seconds), ms.")
    ] = "auto",
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
) -> None:
    """Validate and load event files; bad rows go to quarantine with their reason."""
    if ts_unit not in ("auto", "iso", "s", "ms"):
        raise _fail(f"--ts-unit must be auto, iso, s or ms, not {ts_unit!r}", 2)
    if no_header and not columns:
        raise _fail("--no-header needs --columns a,b,c naming the file's columns", 2)
    try:
        mapping = store.parse_mapping(map_ or [])
        events = store.parse_event_map(event_map) if event_map else None
    except store.StoreError as exc:
        raise _fail(str(exc), 2) from None
    names = [c.strip() for c in columns.split(",")] if columns else None

    reports: list[dict[str, object]] = []
    failures = 0
    try:
        con = store.connect(_db(db))
    except store.StoreError as exc:
        raise _fail(str(exc)) from None
    try:
        for path in tqdm(paths, desc="ingesting", unit="file", disable=len(paths) < 2):
            try:
                report = store.ingest_file(
                    con,
                    path,
                    mapping=mapping,
                    event_map=events,
                    columns=names,
                    ts_unit=ts_unit,  # type: ignore[arg-type]
                )
            except store.StoreError as exc:
                failures += 1
                reports.append({"source": str(path), "error": str(exc)})
                if not as_json:
                    typer.secho(f"{path}: {exc}", fg=typer.colors.RED, err=True)
                continue
            reports.append(report.to_dict())
            if not as_json:
                typer.echo(f"{path}: {report.message()}")
    finally:
        con.close()
    if as_json:
        typer.echo(json.dumps(reports, indent=2, default=str))
    # Quarantined rows are a normal outcome (reported above); fail only when nothing was done.
    if failures == len(paths):
        raise typer.Exit(1)


@app.command()
def info(
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise the database: events, users, time span, event types, fraud share."""
    path = _db(db)
    if not path.exists():
        raise _fail(f"no database at {path}; build one with `fraudlens demo` or `fraudlens ingest`")
    try:
        con = store.connect(path, read_only=True)
    except store.StoreError as exc:
        raise _fail(str(exc)) from None
    try:
        summary = store.dataset_summary(con)
    finally:
        con.close()
    data = summary.to_dict()
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    typer.echo(f"database     {path}")
    typer.echo(f"events       {summary.n_events:,}")
    typer.echo(f"users        {summary.n_users:,}")
    typer.echo(f"sessions     {summary.n_sessions:,}")
    typer.echo(f"time span    {summary.first_ts} .. {summary.last_ts}")
    typer.echo(f"batches      {summary.n_batches:,} ({summary.n_quarantined:,} rows quarantined)")
    if summary.fraud_share is not None:
        typer.echo(f"fraud share  {summary.fraud_share:.2%} of users (ground truth)")
    typer.echo("event types:")
    for name, count in summary.event_type_counts.items():
        typer.echo(f"  {name:<20} {count:>12,}")


@app.command()
def prepare(db: DbOption = None) -> None:
    """What `make run` needs before the app starts: the demo database when none exists."""
    path = _db(db)
    if not path.exists():
        demo(db=path)
    else:
        typer.echo(f"using existing database {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
