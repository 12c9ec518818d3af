"""The `fraudlens` command: build the demo, ingest files, describe the database."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from tqdm import tqdm

from core import schema, store
from core.config import MODEL_SIZE_NAMES, get_settings

if TYPE_CHECKING:
    import duckdb

    from core.evidence import Explanation
    from core.narrate import Summary

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
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


def _connect(db: Path | None, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """The command's database, or exit with the store's message (missing file, held lock)."""
    try:
        return store.connect(_db(db), read_only=read_only)
    except store.StoreError as exc:
        raise _fail(str(exc)) from None


THRESHOLD_HELP = (
    "Alert threshold (default: the saved one, else 0.9; 0.99 for a model trained without labels)."
)
ThresholdOption = Annotated[float | None, typer.Option(min=0.0, max=1.0, help=THRESHOLD_HELP)]
ModelOption = Annotated[str | None, typer.Option(help="Model id (default: the newest).")]
ActiveFromOption = Annotated[str | None, typer.Option(help="Active from (ISO date/time, UTC).")]
ActiveBeforeOption = Annotated[str | None, typer.Option(help="Active before (ISO date/time, UTC).")]


@app.command()
def demo(
    users: Annotated[int, typer.Option(min=10, help="Number of users in the world.")] = 3000,
    days: Annotated[int, typer.Option(min=3, help="Days of history (at least 3).")] = 30,
    fraud_rate: Annotated[float, typer.Option(min=0.0, max=0.5, help="Fraud share.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same world).")] = 0,
    db: DbOption = None,
) -> None:
    """Simulate a demo world with labelled fraud typologies and load it into the database."""
    from core.demo import build_demo
    from core.simulate import WorldConfig

    path = _db(db)
    config = WorldConfig(n_users=users, days=days, fraud_rate=fraud_rate, seed=seed)
    bar = tqdm(total=1, desc="simulating the demo world", unit="step")

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
        str,
        typer.Option(
            help="Timestamp format: auto, iso, s (epoch seconds), ms, or a strptime format"
            " such as '%d.%m.%Y %H:%M' (with %z the offset is honoured)."
        ),
    ] = "auto",
    decimal_comma: Annotated[
        bool,
        typer.Option(
            "--decimal-comma", help="Prices are written 12,99 or 1.234,50 (European exports)."
        ),
    ] = False,
    skip_stored: Annotated[
        bool,
        typer.Option(
            "--skip-stored",
            help="Files overlap earlier ones and have no event_id: rows identical to a stored"
            " event are quarantined as already stored instead of stored twice.",
        ),
    ] = False,
    keep_repeats: Annotated[
        bool,
        typer.Option(
            "--keep-repeats",
            help="Store rows identical to a stored event again (without this or --skip-stored"
            " such a file is refused).",
        ),
    ] = False,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
) -> None:
    """Validate and load event files; bad rows go to quarantine with their reason."""
    try:
        store.check_ts_unit(ts_unit)
    except store.StoreError as exc:
        raise _fail(f"--ts-unit: {exc}", 2) from None
    if no_header and not columns:
        raise _fail("--no-header needs --columns a,b,c naming the file's columns", 2)
    if columns and not no_header:  # else the header line would be read as a row of data
        raise _fail(
            "--columns names the columns of a file without a header: add --no-header "
            "(to rename a header's columns, use --map canonical=source)",
            2,
        )
    try:
        mapping = store.parse_mapping(map_ or [])
        events = store.parse_event_map(event_map) if event_map else None
    except store.StoreError as exc:
        raise _fail(str(exc), 2) from None
    names = [c.strip() for c in columns.split(",")] if columns else None

    reports: list[dict[str, object]] = []
    failures = 0
    con = _connect(db)
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
                    decimal_comma=decimal_comma,
                    skip_stored=skip_stored,
                    keep_repeats=keep_repeats,
                )
            except store.StoreError as exc:
                failures += 1
                reports.append({"source": str(path), "error": str(exc)})
                if not as_json:  # store messages name the file already
                    text = str(exc) if str(exc).startswith(path.name) else f"{path}: {exc}"
                    typer.secho(text, fg=typer.colors.RED, err=True)
                continue
            reports.append(report.to_dict())
            if (
                report.rows_read
                and not report.rows_accepted
                and report.duplicate_of is None
                and not report.all_stored_already
            ):
                failures += 1  # every row quarantined: the options are wrong, say so by rc
            if not as_json:
                typer.echo(report.message())
    finally:
        con.close()
    if as_json:
        typer.echo(json.dumps(reports, indent=2, default=str))
    # Quarantined rows are a normal outcome (reported above); fail only when nothing loaded.
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
    if summary.label_counts:
        labelled = ", ".join(f"{n:,} {label}" for label, n in summary.label_counts.items())
        typer.echo(f"labels       {labelled} (analysts' current labels)")
    typer.echo("event types:")
    for name, count in summary.event_type_counts.items():
        typer.echo(f"  {name:<20} {count:>12,}")


@app.command()
def compact(db: DbOption = None) -> None:
    """Rewrite events as one sorted run (after many small ingests; one transaction)."""
    path = _db(db)
    if not path.exists():
        raise _fail(f"no database at {path}; build one with `fraudlens demo` or `fraudlens ingest`")
    try:
        with store.open_db(path) as con:
            runs = store.compact(con)
    except store.StoreError as exc:
        raise _fail(str(exc)) from None
    if runs <= 1:
        typer.echo(f"events already form {runs} sorted run; nothing to do")
    else:
        typer.echo(f"compacted {runs} sorted runs of events into one")


def _read_users_file(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read the users file {path}: {exc}", 2) from None
    users = [line.strip() for line in text.splitlines() if line.strip()]
    if not users:
        raise _fail(f"{path} lists no users (one user id per line)", 2)
    return users


def _parse_ts(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise _fail(
            f"{name} {value!r} is not an ISO date/time (e.g. 2026-10-15 or 2026-10-15T08:00)", 2
        ) from None
    return schema.naive_utc(ts)


@app.command()
def train(
    size: Annotated[
        str, typer.Option(help="Model size: tiny, small (CPU default), medium, base (GPU).")
    ] = "small",
    epochs: Annotated[
        int, typer.Option(min=1, help="Pretraining epochs (early stopping may end sooner).")
    ] = 6,
    users_file: Annotated[
        Path | None, typer.Option(help="Train only on these users (one id per line).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Train only on events before this time.")
    ] = None,
    supervised: Annotated[
        bool,
        typer.Option("--supervised/--no-supervised", help="Fine-tune on labels when they exist."),
    ] = True,
    supervised_epochs: Annotated[
        int,
        typer.Option(
            min=1, help="Most fine-tuning epochs on labels (stops early on validation loss)."
        ),
    ] = 20,
    witness_windows: Annotated[
        bool,
        typer.Option(
            "--witness-windows/--every-fraud-window",
            help="After the first fine-tuning epoch a fraud account trains on its highest-scoring"
            " window only (labels belong to accounts); --every-fraud-window calls every window of"
            " a fraud account fraud.",
        ),
    ] = True,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate/--raw-head",
            help="Platt-scale the head's probabilities on the validation users after"
            " fine-tuning (the trained head overstates fraud); --raw-head keeps them as trained.",
        ),
    ] = True,
    aggregates: Annotated[
        bool,
        typer.Option(
            "--aggregates/--no-aggregates",
            help="With labels, also fit the account-level model on per-user aggregates "
            "(the combined score pools it with the head and the percentile).",
        ),
    ] = True,
    max_windows: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Pretrain on at most this many windows (a random sample, fixed by the seed):"
            " caps an epoch's time on a large log; scoring still covers every user.",
        ),
    ] = None,
    resume: Annotated[str | None, typer.Option(help="Model id whose checkpoint to resume.")] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda (default: FRAUDLENS_DEVICE, else auto).")
    ] = None,
    db: DbOption = None,
) -> None:
    """Pretrain the behaviour model on event sequences, then fine-tune on labels."""
    import torch

    from core.train import TrainConfig, train_model

    if size not in MODEL_SIZE_NAMES:
        raise _fail(f"--size must be one of {', '.join(MODEL_SIZE_NAMES)}", 2)
    cfg = TrainConfig(
        size=size,  # type: ignore[arg-type]
        epochs=epochs,
        supervised=supervised,
        supervised_epochs=supervised_epochs,
        witness_windows=witness_windows,
        calibrate_head=calibrate,
        aggregate_model=aggregates,
        device=device,
        max_train_windows=max_windows,
    )
    users = _read_users_file(users_file)
    until_ts = _parse_ts(until, "--until")
    models_dir = get_settings().models_dir
    if resume is not None and not (models_dir / resume / "checkpoint" / "state.pt").exists():
        raise _fail(
            f"--resume {resume}: no checkpoint at {models_dir / resume / 'checkpoint'}; "
            "leave --resume out to train a new model",
            2,
        )
    try:
        # A path, not a connection: the file is opened only to read events and to register
        # the model, so the dashboard can keep using it during the minutes of training.
        result = train_model(
            _db(db),
            cfg,
            models_dir=models_dir,
            users=users,
            until=until_ts,
            model_id=resume,
        )
    except (ValueError, store.StoreError) as exc:
        raise _fail(str(exc)) from None
    except torch.OutOfMemoryError:
        raise _fail(
            f"out of GPU memory training a {size} model: train a smaller --size, free the GPU, "
            "or train on the CPU with --device cpu (finished epochs are checkpointed: "
            "--resume MODEL_ID goes on from the last one)"
        ) from None
    typer.echo(f"model {result.model_id} saved to {result.path}")
    for key, value in result.metrics.items():
        typer.echo(f"  {key:<22} {value}")


def _model_path_or_fail(con: object, model: str | None) -> Path:
    from core.scoring import latest_model, resolve_model_path

    if model is None:
        found = latest_model(con)  # type: ignore[arg-type]
        if found is None:
            raise _fail("no trained model; run `fraudlens train` first")
        return found[1]
    row = con.execute(  # type: ignore[attr-defined]
        "SELECT path FROM models WHERE model_id = ?", [model]
    ).fetchone()
    return resolve_model_path(model, row[0] if row else None)


def _load_or_fail(path: Path, model: str | None) -> object:
    from core.scoring import load_model

    try:
        return load_model(path)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise _fail(f"cannot load model {model or path.name}: {exc}") from None


def _load_model_or_fail(con: object, model: str | None) -> object:
    return _load_or_fail(_model_path_or_fail(con, model), model)


@app.command()
def score(
    model: ModelOption = None,
    users_file: Annotated[Path | None, typer.Option(help="Score only these users.")] = None,
    start: Annotated[str | None, typer.Option(help="Only events at or after this time.")] = None,
    end: Annotated[str | None, typer.Option(help="Only events before this time.")] = None,
    db: DbOption = None,
) -> None:
    """Score users' sequences and store per-event and per-user scores in the database."""
    from core.oom import AcceleratorOutOfMemory
    from core.scoring import score_users

    users = _read_users_file(users_file)
    start_ts, end_ts = _parse_ts(start, "--start"), _parse_ts(end, "--end")
    try:
        with store.open_db(_db(db)) as con:
            loaded = _load_model_or_fail(con, model)
        # A path: each chunk opens the file briefly, so others can use it while we score.
        scores = score_users(_db(db), loaded, users, start_ts, end_ts, progress=True)  # type: ignore[arg-type]
    except (store.StoreError, AcceleratorOutOfMemory) as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"scored {len(scores):,} users, {int(scores['n_events'].sum()):,} events "
        f"with model {loaded.model_id}"
    )  # type: ignore[attr-defined]


AnalystOption = Annotated[
    str | None,
    typer.Option(help="Who does this, for the audit trail (default: your login name)."),
]


def _analyst(analyst: str | None) -> str:
    import getpass

    return (analyst or "").strip() or getpass.getuser()


@app.command("export-scores")
def export_scores(
    out: Annotated[Path, typer.Argument(help="CSV file to write.")],
    model: ModelOption = None,
    start: Annotated[
        str | None, typer.Option(help="The window a ranged `fraudlens score` scored: its start.")
    ] = None,
    end: Annotated[str | None, typer.Option(help="... and its end.")] = None,
    analyst: AnalystOption = None,
    db: DbOption = None,
) -> None:
    """Write the stored per-user scores of a model to CSV, ranked by score (audited): the
    full-history scores, or with --start / --end those of that scored window."""
    from core.export import export_user_scores

    start_ts, end_ts = _parse_ts(start, "--start"), _parse_ts(end, "--end")
    con = _connect(db, read_only=True)
    try:
        n = export_user_scores(con, out, model_id=model, start=start_ts, end=end_ts)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    finally:
        con.close()
    detail: dict[str, Any] = {"rows": n, "model": model or "newest"}
    if start_ts or end_ts:
        detail["window"] = [str(start_ts) if start_ts else None, str(end_ts) if end_ts else None]
    _audit_export(db, analyst, "export_scores", out, detail)
    typer.echo(f"wrote {n:,} users to {out}")


def _audit_export(
    db: Path | None, analyst: str | None, action: str, out: Path, detail: dict[str, Any]
) -> None:
    """Scores leave the database in this file: who wrote it, when and where goes to the audit
    log, as the dashboard's case exports do."""
    from core import cases

    try:
        with store.open_db(_db(db)) as con:
            cases.record_audit(con, _analyst(analyst), action, f"file:{out}", detail)
    except store.StoreError as exc:
        raise _fail(f"wrote {out}, but could not record it in the audit log: {exc}") from None


@app.command()
def label(
    path: Annotated[Path, typer.Argument(help="CSV of labels: a user column and a label column.")],
    user_column: Annotated[str, typer.Option(help="Column holding the user id.")] = "user_id",
    label_column: Annotated[
        str, typer.Option(help="Column holding fraud / legit / unsure (or 1/0, yes/no).")
    ] = "label",
    note_column: Annotated[str, typer.Option(help="Column with a note, if any.")] = "note",
    analyst: AnalystOption = None,
    db: DbOption = None,
) -> None:
    """Import analyst labels (known fraud, chargebacks, cleared accounts) from a CSV: the
    supervised head and the account-level model learn from them at the next `train`."""
    import pandas as pd

    from core import cases

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read {path}: {exc}", 2) from None
    try:
        with store.open_db(_db(db)) as con:
            result = cases.import_labels(
                con,
                frame,
                _analyst(analyst),
                source=path.name,
                user_column=user_column,
                label_column=label_column,
                note_column=note_column,
            )
    except (cases.CaseError, store.StoreError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{path.name}: {result.added:,} labels added, {len(result.rejected):,} rejected")
    if len(result.rejected):
        shown = result.rejected.head(20).to_string(index=False)
        typer.echo(shown + ("\n..." if len(result.rejected) > 20 else ""))
    if not result.added:
        raise typer.Exit(1)


def _model_id(con: Any, model: str | None) -> str | None:
    """The named model (an unknown name fails), else the newest; None when none exists."""
    row = con.execute(
        "SELECT model_id FROM models WHERE ? IS NULL OR model_id = ?"
        " ORDER BY created_at DESC LIMIT 1",
        [model, model],
    ).fetchone()
    if model is not None and row is None:
        raise _fail(f"no model {model}")
    return str(row[0]) if row else None


@app.command("export-cases")
def export_cases(
    out: Annotated[Path, typer.Argument(help="CSV file to write.")],
    case: Annotated[
        list[int] | None, typer.Option(help="Case id (repeat it; default: every case).")
    ] = None,
    evidence: Annotated[
        bool,
        typer.Option("--evidence", help="Write one case's events with per-event scores instead."),
    ] = False,
    model: ModelOption = None,
    threshold: ThresholdOption = None,
    analyst: AnalystOption = None,
    db: DbOption = None,
) -> None:
    """The case CSV the Cases page exports (one row per case and user, formula cells
    neutralised, written atomically, audited), or with --evidence one case's events."""
    from core import alerts, cases

    try:
        with store.open_db(_db(db)) as con:
            model_id = _model_id(con, model)
            ids = case or [int(r[0]) for r in con.execute(
                "SELECT case_id FROM cases ORDER BY case_id").fetchall()]  # fmt: skip
            if not ids:
                raise _fail("no cases yet: open one on Investigate", 1)
            who = _analyst(analyst)
            if evidence:
                if len(ids) != 1:
                    raise _fail("--evidence writes one case: give exactly one --case", 2)
                n = cases.export_evidence(con, ids[0], out, model_id=model_id, analyst=who)
            else:
                if threshold is None:
                    threshold = alerts.threshold_in_use(con, model_id)
                n = cases.export_cases(
                    con,
                    ids,
                    out,
                    model_id=model_id,
                    threshold=threshold,
                    analyst=who,
                )
    except (cases.CaseError, store.StoreError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"wrote {n:,} rows of {len(ids):,} case(s) to {out}")


@app.command()
def watchlist(
    out: Annotated[
        Path | None, typer.Argument(help="CSV file to write (default: print a table).")
    ] = None,
    level: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Unsupervised percentile the list starts at."),
    ] = 0.97,
    threshold: ThresholdOption = None,
    start: ActiveFromOption = None,
    end: ActiveBeforeOption = None,
    model: ModelOption = None,
    db: DbOption = None,
) -> None:
    """Users rarer than LEVEL of the training users whose combined score stays under the
    threshold: what the supervised scores outvote (Triage's "unusual but not alerted")."""
    from core import alerts
    from core.export import write_csv

    lo, hi = _parse_ts(start, "--start"), _parse_ts(end, "--end")
    con = _connect(db, read_only=True)
    try:
        found = _model_id(con, model)
        if found is None:
            raise _fail("no trained model; run `fraudlens train`")
        model_id = found
        if threshold is None:
            threshold = alerts.threshold_in_use(con, model_id)
        listed = alerts.novelty_watchlist(
            con, model_id, lo, hi, threshold, min_percentile=level, limit=None
        )
    finally:
        con.close()
    summary = (
        f"{len(listed):,} users rarer than {level:.0%} of training users under the threshold "
        f"{threshold:.2f} (model {model_id})"
    )
    if out is not None:
        write_csv(listed, out)
        _audit_export(db, None, "export_watchlist", out, {"rows": len(listed), "level": level})
        typer.echo(f"wrote {summary} to {out}")
        return
    typer.echo(summary)
    if not listed.empty:
        shown = listed[["user_id", "percentile", "score", "events", "main_reason"]]
        typer.echo(shown.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


@app.command()
def shared(
    out: Annotated[
        Path | None, typer.Argument(help="CSV file to write (default: print a table).")
    ] = None,
    entity: Annotated[
        str | None, typer.Option(help="Only this kind: device, card or IP (default: all).")
    ] = None,
    min_users: Annotated[int, typer.Option(min=2, help="Users sharing it, at least.")] = 2,
    threshold: ThresholdOption = None,
    start: ActiveFromOption = None,
    end: ActiveBeforeOption = None,
    model: ModelOption = None,
    db: DbOption = None,
) -> None:
    """Devices, cards and IPs several users share in the range, accounts opened together
    first (Triage's "accounts sharing a device, card or IP"). Works before any model is
    trained; with one, each row also counts alerts and names the highest-scoring user."""
    import pandas as pd

    from core import alerts, rings
    from core.export import write_csv

    kinds = {k.lower(): k for k in rings.ENTITY_ORDER}
    if entity is not None and entity.lower() not in kinds:
        raise _fail(f"--entity must be one of {', '.join(rings.ENTITY_ORDER)}", 2)
    lo, hi = _parse_ts(start, "--start"), _parse_ts(end, "--end")
    con = _connect(db, read_only=True)
    try:
        model_id = _model_id(con, model)
        scores = pd.DataFrame({"user_id": pd.Series(dtype=str), "score": pd.Series(dtype=float)})
        if model_id is not None:
            saved = alerts.saved_setting(con, model_id)
            if threshold is None:
                threshold = alerts.threshold_in_use(con, model_id)
            scores = alerts.active_scores(
                con, model_id, lo, hi, weight=saved.weight if saved else None
            )[["user_id", "score"]]
        threshold = alerts.DEFAULT_THRESHOLD if threshold is None else threshold
        groups = rings.shared_entities_in_range(
            con, lo, hi, scores, threshold, min_users=min_users, limit=1000
        )
    finally:
        con.close()
    if entity is not None:
        groups = groups.loc[groups["entity"] == kinds[entity.lower()]].reset_index(drop=True)
    summary = f"{len(groups):,} shared {entity or 'devices, cards and IPs'} ({min_users}+ users)"
    if out is not None:
        write_csv(groups, out)
        _audit_export(db, None, "export_shared", out, {"rows": len(groups)})
        typer.echo(f"wrote {summary} to {out}")
        return
    typer.echo(summary)
    if not groups.empty:
        shown = groups[["entity", "value", "users", "opened_together", "alerts", "top_user"]]
        typer.echo(shown.head(50).to_string(index=False))


@app.command()
def evaluate(
    json_out: Annotated[
        Path, typer.Option("--json", help="Where to write the JSON report (markdown beside it).")
    ] = Path("benchmarks/results/evaluate.json"),
    cv: Annotated[int, typer.Option(min=0, help="K-fold cross-validation (K >= 2).")] = 0,
    size: Annotated[str, typer.Option(help="tiny, small, medium or base.")] = "small",
    epochs: Annotated[int, typer.Option(min=1, help="Pretraining epochs.")] = 6,
    seed: Annotated[int, typer.Option(help="Split and training seed.")] = 0,
    unseen_seed: Annotated[
        int, typer.Option(help="Seed of the second, unseen demo world (-1: skip).")
    ] = 1001,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    db: DbOption = None,
) -> None:
    """Compare the transformer with IsolationForest, ECOD, LOF, LightGBM and DeepLog on users
    unseen in training (and on an unseen demo world): AUPRC, AUROC, precision@k, recall at a
    1% alert budget (per typology), F1 at a validation-chosen threshold."""
    import tempfile

    from core.evaluate import EvaluationConfig, run_evaluation, write_evaluation

    cfg = EvaluationConfig(
        seed=seed,
        size=size,
        epochs=epochs,
        cv=cv,
        device=device,
        unseen_seed=None if unseen_seed < 0 else unseen_seed,
    )
    con = _connect(db)
    try:
        with tempfile.TemporaryDirectory(prefix="fraudlens-eval-") as work:
            report = run_evaluation(con, cfg, work_dir=Path(work))
    except LookupError as exc:
        raise _fail(f"cannot evaluate: {exc}") from None
    finally:
        con.close()
    md_path = write_evaluation(report, json_out)
    typer.echo(report.markdown())
    typer.echo(f"wrote {json_out} and {md_path}")


@app.command()
def prepare(db: DbOption = None) -> None:
    """What `make run` needs before the app starts: the demo database when none exists, then a
    trained `small` model with every user scored when the database has no model yet."""
    from core.scoring import latest_model

    path = _db(db)
    if not path.exists():
        demo(db=path)
    else:
        typer.echo(f"using existing database {path}")
    with store.open_db(path) as con:
        found = latest_model(con)
        scored = (
            found is not None
            and con.execute(
                "SELECT count(*) FROM sequence_scores WHERE model_id = ?", [found[0]]
            ).fetchall()[0][0]
        )
    if found is not None and (stale := _unreadable_model(found[1])):
        typer.echo(f"model {found[0]} was trained by an older fraudlens ({stale}): retraining")
        found, scored = None, 0
    if found is None:
        typer.echo("no model yet: training the small model on this database (CPU: ~4 minutes)")
        train(db=path)
    if not scored:
        score(db=path)


def _unreadable_model(path: Path) -> str | None:
    """Why this code cannot read the model's featurizer (its fields changed), or None."""
    from core.sequences import SequenceFeaturizer

    try:
        SequenceFeaturizer.load(path)
    except (ValueError, FileNotFoundError) as err:
        return str(err)
    return None


EXPLAIN_TARGETS = ("auto", "supervised", "unsupervised")


@app.command()
def explain(
    user: Annotated[str, typer.Argument(help="The user id to explain.")],
    start: Annotated[str | None, typer.Option(help="Only events at or after this time.")] = None,
    end: Annotated[str | None, typer.Option(help="Only events before this time.")] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="Summary writer: template, hf-local or openai-compatible "
            "(default: $FRAUDLENS_LLM_BACKEND or template)."
        ),
    ] = None,
    model: ModelOption = None,
    steps: Annotated[int, typer.Option(min=2, help="Integrated-gradients steps.")] = 32,
    internal_batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Steps per forward pass (default: all; lower to save memory)."),
    ] = None,
    target: Annotated[
        str, typer.Option(help="Score to explain: auto, supervised or unsupervised.")
    ] = "auto",
    baseline: Annotated[
        str,
        typer.Option(
            help="What the fraud logit's attributions start from: typical (each field at its "
            "commonest value in training) or absent (every field unknown)."
        ),
    ] = "typical",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    db: DbOption = None,
) -> None:
    """Why a user scores as they do: top attributed events, per-field totals, the deletion
    check, linked accounts and a grounded summary."""
    from core import alerts
    from core.evidence import explain_user
    from core.explain import BASELINES, ExplainSettings
    from core.narrate import BACKENDS, make_narrator, narrate
    from core.oom import AcceleratorOutOfMemory

    if target not in EXPLAIN_TARGETS:
        raise _fail(f"--target must be one of {', '.join(EXPLAIN_TARGETS)}, not {target!r}", 2)
    if baseline not in BASELINES:
        raise _fail(f"--baseline must be one of {', '.join(BASELINES)}, not {baseline!r}", 2)
    if backend is not None and backend not in BACKENDS:
        raise _fail(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}", 2)
    start_ts, end_ts = _parse_ts(start, "--start"), _parse_ts(end, "--end")
    settings = get_settings()
    if backend is not None:
        settings = dataclasses.replace(settings, llm_backend=backend)
    try:
        # Before the attributions: a misconfigured backend is a usage error, found in no time.
        narrator = make_narrator(settings)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None

    path = _db(db)
    if not path.exists():
        raise _fail(f"no database at {path}; build one with `fraudlens demo` or `fraudlens ingest`")
    try:
        # Loading the model and the attributions take seconds: the file stays closed meanwhile
        # (the dashboard or an ingest may write), opened only for each read.
        with store.open_db(path, read_only=True) as con:
            model_path = _model_path_or_fail(con, model)
            n_user = con.execute("SELECT count(*) FROM events WHERE user_id = ?", [user]).fetchone()
            if not n_user or not n_user[0]:
                raise _fail(f"no user {user!r} in {path}")
        loaded = _load_or_fail(model_path, model)
        with store.open_db(path, read_only=True) as con:
            saved = alerts.saved_setting(con, loaded.model_id)  # type: ignore[attr-defined]
            threshold = alerts.threshold_in_use(con, loaded.model_id)  # type: ignore[attr-defined]
        explanation = explain_user(
            path,
            loaded,  # type: ignore[arg-type]
            user,
            start_ts,
            end_ts,
            threshold=threshold,
            weight=saved.weight if saved is not None else None,
            settings=ExplainSettings(
                n_steps=steps,
                internal_batch_size=internal_batch_size,
                target=target,  # type: ignore[arg-type]
                baseline=baseline,  # type: ignore[arg-type]
            ),
            read_only=True,
        )
    except store.StoreError as exc:
        raise _fail(str(exc)) from None
    except (ValueError, AcceleratorOutOfMemory) as exc:  # e.g. --target supervised, no head
        raise _fail(f"cannot explain {user!r}: {exc}") from None
    if explanation is None:
        raise _fail(
            f"user {user!r} has no events between {start or 'the start'} and {end or 'the end'}"
        )
    summary = narrate(explanation.facts, narrator)
    threshold_source = "saved" if saved is not None else "default"
    if as_json:
        typer.echo(
            json.dumps(
                _explanation_json(explanation, summary, threshold_source), indent=2, default=str
            )
        )
        return
    _print_explanation(explanation, summary, threshold_source)


def _explanation_json(
    explanation: Explanation, summary: Summary, threshold_source: str
) -> dict[str, Any]:
    att, cf = explanation.attribution, explanation.counterfactual
    return {
        "facts": explanation.facts.to_dict(),
        "threshold_source": threshold_source,
        "attribution": {
            "target": att.target,
            "target_value": att.target_value,
            "baseline_value": att.baseline_value,
            "n_events": att.n_events,
            "n_events_total": att.n_events_total,
            "n_context": att.n_context,
            "field_names": list(att.field_names),
            # most important first (the deletion search's picks, then attribution order), and
            # the target on its own scale as the search removed its picks one by one
            "ranking": att.event_ids[att.order].tolist(),
            "deletion_path": att.deletion_path.tolist(),
            # the window's events; "context": before the range, read but not explained
            "events": [
                {
                    "event_id": int(eid),
                    "ts": str(ts),
                    "attribution": float(total),
                    "per_field": pf,
                    "context": not inside,
                }
                for eid, ts, total, pf, inside in zip(
                    att.event_ids.tolist(),
                    att.ts.astype("datetime64[us]").tolist(),
                    att.per_event.tolist(),
                    att.per_field.tolist(),
                    att.in_range.tolist(),
                    strict=True,
                )
            ],
        },
        "field_totals": {k: float(v) for k, v in att.field_totals().items()},
        "counterfactual": {
            **dataclasses.asdict(cf),
            "drop_top": cf.drop_top,
            "drop_random": cf.drop_random,
            "sentence": cf.sentence(),
        },
        "behaviour": explanation.facts.to_dict()["behaviour"],
        "method": att.method_settings(),
        "summary": summary.to_dict(),
    }


def _print_explanation(explanation: Explanation, summary: Summary, threshold_source: str) -> None:
    from core.narrate import percent_text

    facts, att = explanation.facts, explanation.attribution
    span = (
        f"{facts.start or 'the first event'} .. {facts.end or 'the last event'}"
        if facts.start or facts.end
        else "whole history"
    )
    typer.echo(f"user         {facts.user_id}  ({facts.n_events:,} events, {span})")
    typer.echo(f"model        {facts.model_id}")
    side = "ABOVE" if facts.above_threshold else "below"
    # the summary's own wording: '.1%' printed 0.9998 as 100.0% beside a summary's 99.98%
    pct = "n/a" if facts.percentile is None else percent_text(facts.percentile)
    typer.echo(
        f"score        {facts.score:.3f} ({side} the {threshold_source} threshold "
        f"{facts.threshold:.2f}); unsupervised percentile {pct}"
    )
    method = att.method_settings()
    typer.echo(
        f"attribution  {att.n_events} of {att.n_events_total} events explained, target "
        f"{att.target}, {method['n_steps']} steps from a {method['baseline']}, "
        f"convergence delta {att.delta:.2e}"
        + (
            f"; {att.n_context} earlier events read as context "
            f"({att.context_share:.0%} of the positive attribution)"
            if att.n_context
            else ""
        )
    )

    typer.echo("")
    picked = att.deletion_path.size
    typer.echo(
        f"top events (the first {picked} picked by a deletion search, then by attribution):"
        if picked
        else "top events by attribution:"
    )
    # the fraud probability as the search removed its picks (the head's target only: raw
    # typicality means nothing to a reader)
    path = att.target == "supervised" and picked > 0
    without = f" {'p without':>9}" if path else ""
    typer.echo(f"  {'#':>2}  {'time':<19}  {'event type':<16} {'share':>6}{without}  top field")
    top = explanation.top_events
    for i, row in enumerate(top.itertuples(index=False), start=1):
        ts = f"{row.ts:%Y-%m-%d %H:%M:%S}"
        etype = str(getattr(row, "event_type", ""))
        value = float(row.target_without)
        cell = (f" {value:>9.3f}" if value == value else f" {'':>9}") if path else ""
        typer.echo(f"  {i:>2}  {ts:<19}  {etype:<16} {row.share:>6.1%}{cell}  {row.top_field}")
    if att.picked_without_credit:
        typer.echo(f"  ({att.uncredited_picks_sentence()})")

    typer.echo("")
    typer.echo("attribution per field:")
    for name, value in att.field_totals().sort_values(ascending=False).items():
        typer.echo(f"  {name:<14} {value:>+9.4f}")

    typer.echo("")
    typer.echo(f"counterfactual  {explanation.counterfactual.sentence()}")
    if facts.behaviour:
        typer.echo("")
        typer.echo("behaviour that carries the score (share; score of the window without it):")
        for g in facts.behaviour:
            without = "-" if g.score_without is None else f"{g.score_without:.3f}"
            span = f"{g.first_ts:%Y-%m-%d %H:%M} .. {g.last_ts:%Y-%m-%d %H:%M}"
            typer.echo(
                f"  {g.kind:<10}  {g.key:<18} {g.n_events:>6,} events  "
                f"{g.share:>6.1%}  {without:>6}  {span}"
            )

    typer.echo("")
    if facts.linked:
        typer.echo("linked accounts:")
        for entity in facts.linked:
            users = ", ".join(f"{u} ({entity.labels.get(u, 'unlabelled')})" for u in entity.users)
            typer.echo(f"  {entity.kind} {entity.value}: {users}")
    else:
        typer.echo("linked accounts: none (no device, IP or card shared with other users)")

    typer.echo("")
    asked = summary.requested_backend
    by = summary.backend + (f" (asked for {asked})" if asked and asked != summary.backend else "")
    verdict = "grounded" if summary.grounding.grounded else "NOT GROUNDED"
    typer.echo(f"summary  [backend: {by}; grounding: {verdict}]")
    if summary.message:
        typer.secho(f"note: {summary.message}", fg=typer.colors.YELLOW)
    if summary.flagged:
        typer.secho(
            "!!! FLAGGED: this summary cites values that are not in the evidence !!!",
            fg=typer.colors.RED,
            bold=True,
        )
        for problem in summary.grounding.problems:
            typer.secho(f"  - {problem}", fg=typer.colors.RED)
    typer.echo(summary.text)
    if summary.flagged and summary.fallback_text:
        typer.echo("")
        typer.echo("template summary (grounded, from the facts only):")
        typer.echo(summary.fallback_text)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
