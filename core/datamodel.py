"""What the Data & model page asks: an uploaded file -> validated ingest with its report, the
models table, and the long jobs (build the demo, retrain, rescore) that the page runs in the
background through core.jobs.

Long jobs take a database PATH and open the file only for each read or write, so the other
pages (and the CLI) keep working while they run.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from core import schema, store
from core.jobs import Report

if TYPE_CHECKING:
    from core.simulate import WorldConfig
    from core.train import TrainConfig

# Every canonical column a file may provide (batch_id is set by ingest).
SETTABLE_COLUMNS: tuple[str, ...] = tuple(c for c in schema.COLUMN_NAMES if c != "batch_id")
_DELIMITERS = (",", "\t", ";", "|")
_SNIFF_BYTES = 1 << 16
# Columns of the models table shown first; other metrics follow in their stored order.
_MODEL_COLUMNS = (
    "model_id",
    "created_at",
    "size",
    "epochs",
    "supervised",
    "parameters",
    "n_users",
    "n_events",
    "val_nll",
    "train_seconds",
    "scored_users",
)


@dataclass(frozen=True)
class UploadOptions:
    """How to read an uploaded file: canonical -> file column, event-type renames, names for
    a headerless CSV, and the timestamp unit."""

    mapping: dict[str, str] = field(default_factory=dict)
    event_map: dict[str, str] = field(default_factory=dict)
    columns: tuple[str, ...] | None = None
    ts_unit: store.TsUnit = "auto"
    decimal_comma: bool = False
    skip_stored: bool = False
    keep_repeats: bool = False


@dataclass
class UploadResult:
    report: store.IngestReport
    reasons: pd.DataFrame  # reason, rows
    quarantined: pd.DataFrame  # a sample: line, reason, raw


def safe_filename(name: str) -> str:
    """The uploaded name reduced to a plain file name that keeps its extension (ingest reads
    the format from it)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "").name).strip("._")
    return base or "upload.csv"


def _is_parquet(data: bytes, filename: str) -> bool:
    return data[:4] == b"PAR1" or filename.lower().endswith((".parquet", ".pq", ".parq"))


def _text_head(data: bytes, filename: str) -> bytes:
    if data[:2] == b"\x1f\x8b":
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
            return gz.read(_SNIFF_BYTES)
    return data[:_SNIFF_BYTES]


def _delimiter(first_line: str, n_fields: int | None, filename: str) -> str:
    """The same choice ingest makes: tab for .tsv, else the delimiter that splits the first
    line into the named number of fields, else the one that splits it most."""
    if filename.lower().removesuffix(".gz").endswith((".tsv", ".tab")):
        return "\t"
    counts = {d: len(next(csv.reader([first_line], delimiter=d), [])) for d in _DELIMITERS}
    if n_fields is not None:
        for d in _DELIMITERS:
            if counts[d] == n_fields:
                return d
    best = max(_DELIMITERS, key=counts.__getitem__)
    return best if counts[best] > 1 else ","


def first_line_is_data(data: bytes, filename: str) -> bool:
    """Whether a CSV upload's first line is a row rather than a header (numbers, dates), so
    the page can tick "The file has no header row" for the analyst; False for Parquet."""
    if not data or _is_parquet(data, filename):
        return False
    try:
        head = _text_head(data, filename)
    except (OSError, EOFError, ValueError):  # a broken gzip: the preview will say so
        return False
    first = head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace").lstrip("\ufeff")
    fields = next(csv.reader([first], delimiter=_delimiter(first, None, filename)), [])
    return store.looks_like_data(fields)


def preview_upload(
    data: bytes, filename: str, columns: Sequence[str] | None = None, rows: int = 1000
) -> pd.DataFrame:
    """The first ``rows`` rows of an uploaded CSV (all text) or Parquet file, to map its
    columns and see its event types. ``columns`` names the fields of a headerless CSV."""
    if not data:
        raise store.IngestError(f"{filename}: the file is empty")
    try:
        if _is_parquet(data, filename):
            batches = pq.ParquetFile(io.BytesIO(data)).iter_batches(batch_size=rows)
            batch = next(batches, None)
            return batch.to_pandas() if batch is not None else pd.DataFrame()
        head = _text_head(data, filename)
        first = head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace").lstrip("\ufeff")
        names = list(columns) if columns else None
        delim = _delimiter(first, len(names) if names else None, filename)
        return pd.read_csv(
            io.BytesIO(data),
            sep=delim,
            nrows=rows,
            dtype=str,
            header=None if names else "infer",
            names=names,
            compression="gzip" if data[:2] == b"\x1f\x8b" else None,
            on_bad_lines="skip",
            encoding="utf-8-sig",
            encoding_errors="replace",
        )
    except (OSError, ValueError, UnicodeError, csv.Error) as exc:
        # pyarrow's and pandas' parse errors are ValueErrors / OSErrors
        raise store.IngestError(f"{filename}: cannot read a preview: {exc}") from exc


def guess_mapping(file_columns: Sequence[str]) -> dict[str, str]:
    """canonical -> file column: the same name, or the one column with that name in another
    case (as ingest resolves them without a mapping), else the one column named by one of the
    canonical column's schema.COLUMN_SYNONYMS, the first that names exactly one ("Timestamp" before
    "Time", "visitorid", "EventId"). A file column is suggested for one canonical column."""
    found = [str(c) for c in file_columns]
    lower: dict[str, list[str]] = {}
    for name in found:
        lower.setdefault(name.lower(), []).append(name)
    out: dict[str, str] = {}
    for canon in SETTABLE_COLUMNS:
        if canon in found:
            out[canon] = canon
        elif len(lower.get(canon, [])) == 1:
            out[canon] = lower[canon][0]
    taken = set(out.values())
    for canon, names in schema.COLUMN_SYNONYMS.items():
        if canon in out:
            continue
        for name in names:  # in order of preference: "Timestamp" before "Time"
            hits = [c for c in lower.get(name, []) if c not in taken]
            if len(hits) == 1:
                out[canon] = hits[0]
                taken.add(hits[0])
                break
    return out


def event_map_from_edits(frame: pd.DataFrame) -> dict[str, str]:
    """Renames from an edited table with columns ``event_type`` and ``becomes``: rows whose
    new name is blank or unchanged are no renames."""
    out: dict[str, str] = {}
    for old, new in zip(frame["event_type"], frame["becomes"], strict=True):
        if pd.isna(old) or pd.isna(new):
            continue
        old_s, new_s = str(old), str(new).strip()
        if new_s and new_s != old_s:
            out[old_s] = new_s
    return out


def ingest_upload(
    db_path: str | Path,
    data: bytes,
    filename: str,
    options: UploadOptions,
    *,
    sample: int = 20,
) -> UploadResult:
    """Write the upload to a temporary file, ingest it in one short connection (one batch:
    validated, bad rows quarantined, a re-upload of the same bytes is a no-op) and return the
    report with a sample of the quarantined rows."""
    with tempfile.TemporaryDirectory(prefix="fraudlens-upload-") as tmp:
        path = Path(tmp) / safe_filename(filename)
        path.write_bytes(data)
        with store.open_db(db_path) as con:
            report = store.ingest_file(
                con,
                path,
                mapping=dict(options.mapping),
                event_map=dict(options.event_map) or None,
                columns=list(options.columns) if options.columns else None,
                ts_unit=options.ts_unit,
                decimal_comma=options.decimal_comma,
                skip_stored=options.skip_stored,
                keep_repeats=options.keep_repeats,
            )
            quarantined = con.execute(
                "SELECT line, reason, raw FROM quarantine WHERE batch_id = ? ORDER BY line LIMIT ?",
                [report.batch_id, int(sample)],
            ).df()
    reasons = pd.DataFrame(list(report.reasons.items()), columns=["reason", "rows"])
    return UploadResult(report=report, reasons=reasons, quarantined=quarantined)


def _json(text: object) -> dict[str, Any]:
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def models_table(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """One row per registered model, newest first: its size and training settings, the
    metrics it was trained with (the models.metrics JSON, one column per scalar metric), how
    many users it has stored scores for, and its folder."""
    frame = con.execute(
        "SELECT m.model_id, m.created_at, m.config, m.metrics, m.path,"
        " coalesce(s.n, 0) AS scored_users FROM models m LEFT JOIN"
        " (SELECT model_id, count(DISTINCT user_id) AS n FROM sequence_scores"
        "  WHERE window_start IS NULL AND window_end IS NULL GROUP BY model_id) s"
        " USING (model_id) ORDER BY m.created_at DESC, m.model_id"
    ).df()
    rows = []
    for rec in frame.to_dict("records"):
        config, metrics = _json(rec.pop("config")), _json(rec.pop("metrics"))
        row = {"size": config.get("size"), "epochs": config.get("epochs"), **rec}
        row.update(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool, type(None)))}
        )
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=[*_MODEL_COLUMNS, "path"])
    first = [c for c in _MODEL_COLUMNS if c in out.columns]
    rest = [c for c in out.columns if c not in first and c != "path"]
    return out[[*first, *rest, "path"]]


def all_user_ids(db_path: str | Path) -> list[str]:
    with store.open_db(db_path) as con:
        return [
            r[0] for r in con.execute("SELECT DISTINCT user_id FROM events ORDER BY 1").fetchall()
        ]


def rescore_all(
    db_path: str | Path,
    model_path: str | Path,
    report: Report,
    *,
    device: str | None = None,
    chunk_users: int = 500,
) -> int:
    """Score every user's full history with the model and store the scores (replacing the
    model's earlier full-history scores of those users); returns the number of users.

    Chunk by chunk, each written in its own short transaction, so readers see progress and the
    file is free between chunks. A private model instance: the dashboard's shared one stays
    free for on-demand scoring meanwhile."""
    from core.scoring import load_model, score_users

    report(None, "loading the model…")
    loaded = load_model(model_path, device=device)
    users = all_user_ids(db_path)
    if not users:
        raise ValueError("the database holds no events to score")
    for lo in range(0, len(users), chunk_users):
        report(
            lo / len(users),
            f"scoring users {lo + 1:,}–{min(lo + chunk_users, len(users)):,} of {len(users):,}",
        )
        score_users(db_path, loaded, users[lo : lo + chunk_users], chunk_users=chunk_users)
    report(1.0, f"scored {len(users):,} users")
    return len(users)


def retrain(db_path: str | Path, cfg: TrainConfig, models_dir: str | Path, report: Report) -> str:
    """Train a new model on the whole database, register it, then score every user with it;
    returns the new model's id. Training reports no fraction done (the page shows elapsed
    time); scoring does."""
    from core.train import train_model

    report(None, f"training a {cfg.size} model ({cfg.epochs} epoch(s))…")
    result = train_model(db_path, cfg, models_dir=Path(models_dir), progress=False)

    def scoring(progress: float | None, message: str) -> None:
        report(progress, f"{result.model_id}: {message}")

    rescore_all(db_path, result.path, scoring, device=cfg.device)
    return result.model_id


def build_demo_db(db_path: str | Path, config: WorldConfig, report: Report) -> str:
    """Simulate the demo world into a new database; returns the ingest report's message."""
    from core.demo import build_demo

    def progress(done: int, total: int) -> None:
        report(done / total if total else None, f"simulating users: {done:,} / {total:,}")

    report(None, f"simulating {config.n_users:,} users over {config.days} days…")
    message = build_demo(db_path, config, progress=progress).message()
    report(1.0, message)
    return message


__all__ = [
    "SETTABLE_COLUMNS",
    "UploadOptions",
    "UploadResult",
    "build_demo_db",
    "event_map_from_edits",
    "guess_mapping",
    "ingest_upload",
    "models_table",
    "preview_upload",
    "rescore_all",
    "retrain",
    "safe_filename",
]
