"""DuckDB event store: schema migrations, validated idempotent ingest, and the basic queries.

Ingest never loops over rows in Python: DuckDB reads the file (CSV as all-VARCHAR with its
reject tables catching structurally broken lines, or Parquet / Arrow as typed columns), one SQL
pass computes a rejection reason per row, valid rows go to `events` and the rest to `quarantine`
with the raw row. A batch is one transaction, so a failure leaves the database as it was.

Dynamic SQL in this module only splices identifiers: canonical names from core.schema, generated
aliases (`__s0`, `__s1`, ...) and source column names quoted by `_ident`. Every value that comes
from outside (paths, ids, timestamps, event maps) is a bound parameter.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from core import schema

# How timestamps are written: detected (auto), ISO 8601 text, epoch seconds or milliseconds; or,
# any string with a "%" in it, a strptime format for the rest ("%d.%m.%Y %H:%M", "%m/%d/%Y
# %I:%M %p"; with %z the offset is honoured), checked by check_ts_unit.
TsUnit = Literal["auto", "iso", "s", "ms"] | str
TS_UNITS = ("auto", "iso", "s", "ms")

# Test hook: name of an ingest step after which `_run_batch` raises, to prove atomicity.
_FAIL_AFTER_STEP: str | None = None
INGEST_STEPS: tuple[str, ...] = ("read", "sort", "quarantine", "events", "record")


class StoreError(Exception):
    """A user-facing store problem; str(e) is a one-line message fit for a page or the CLI."""


class IngestError(StoreError):
    """The input cannot be ingested at all (wrong format, encoding, columns, empty)."""


class StoreLockedError(StoreError):
    """Another process holds the database's write lock."""


def error_message(exc: BaseException) -> str:
    """One line an analyst can act on, for an error raised by a write (or a read) on the store.

    A transaction conflict (two sessions changing the same row at the same moment) rolls back
    the whole change, so nothing is half-saved; the analyst only needs to repeat it.
    """
    if isinstance(exc, duckdb.TransactionException) or "conflict" in str(exc).lower():
        return (
            "someone else changed the same record at the same moment; nothing was saved, "
            "please try again"
        )
    return _first_line(exc) if isinstance(exc, duckdb.Error) else str(exc)


# ---------------------------------------------------------------------------------------------
# Connection and migrations


def _events_ddl(table: str) -> str:
    cols = ", ".join(f"{c.name} {c.duckdb_type}" for c in schema.EVENT_COLUMNS)
    return f"CREATE TABLE IF NOT EXISTS {table} ({cols})"


# Numbered, append-only: a released step is never edited, a change is a new step.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            _events_ddl("events"),
            """CREATE TABLE IF NOT EXISTS ingest_batches (
                batch_id BIGINT PRIMARY KEY, source VARCHAR, checksum VARCHAR UNIQUE,
                ingested_at TIMESTAMP, rows_read BIGINT, rows_accepted BIGINT,
                rows_quarantined BIGINT, seconds DOUBLE)""",
            """CREATE TABLE IF NOT EXISTS quarantine (
                batch_id BIGINT, source VARCHAR, line BIGINT, reason VARCHAR, raw VARCHAR)""",
            """CREATE TABLE IF NOT EXISTS models (
                model_id VARCHAR PRIMARY KEY, created_at TIMESTAMP, kind VARCHAR, config JSON,
                metrics VARCHAR, path VARCHAR)""",
            """CREATE TABLE IF NOT EXISTS event_scores (
                event_id BIGINT, model_id VARCHAR, surprisal DOUBLE)""",
            """CREATE TABLE IF NOT EXISTS sequence_scores (
                user_id VARCHAR, window_start TIMESTAMP, window_end TIMESTAMP, model_id VARCHAR,
                n_events INTEGER, score_unsupervised DOUBLE, percentile_unsupervised DOUBLE,
                score_supervised DOUBLE, score DOUBLE, scored_at TIMESTAMP)""",
            """CREATE TABLE IF NOT EXISTS labels (
                user_id VARCHAR, label VARCHAR, analyst VARCHAR, created_at TIMESTAMP,
                note VARCHAR)""",
            # No PRIMARY KEY: DuckDB rewrites UPDATEs on indexed tables as delete+insert, which
            # trips its own constraint check when a case is updated twice in one transaction.
            """CREATE TABLE IF NOT EXISTS cases (
                case_id BIGINT, title VARCHAR, status VARCHAR, assignee VARCHAR,
                created_by VARCHAR, created_at TIMESTAMP, updated_at TIMESTAMP)""",
            "CREATE TABLE IF NOT EXISTS case_users (case_id BIGINT, user_id VARCHAR)",
            "CREATE TABLE IF NOT EXISTS case_events (case_id BIGINT, event_id BIGINT)",
            """CREATE TABLE IF NOT EXISTS case_notes (
                case_id BIGINT, analyst VARCHAR, created_at TIMESTAMP, note VARCHAR)""",
            """CREATE TABLE IF NOT EXISTS case_status_history (
                case_id BIGINT, status VARCHAR, analyst VARCHAR, changed_at TIMESTAMP)""",
            """CREATE TABLE IF NOT EXISTS audit_log (
                analyst VARCHAR, "at" TIMESTAMP, action VARCHAR, target VARCHAR, detail VARCHAR)""",
            """CREATE TABLE IF NOT EXISTS thresholds (
                model_id VARCHAR, threshold DOUBLE, weight DOUBLE, analyst VARCHAR,
                saved_at TIMESTAMP)""",
            "CREATE TABLE IF NOT EXISTS truth_users (user_id VARCHAR, typology VARCHAR)",
            """CREATE TABLE IF NOT EXISTS truth_events (
                event_id BIGINT, user_id VARCHAR, typology VARCHAR)""",
        ),
    ),
    (
        2,
        (
            # The model's pooled sequence embedding of each user's full history (for "similar
            # past cases"); written by batch scoring next to sequence_scores.
            """CREATE TABLE IF NOT EXISTS user_embeddings (
                model_id VARCHAR, user_id VARCHAR, embedding FLOAT[])""",
            # What an analyst was shown as the reason for a score: the top attributed events
            # and the written summary (case exports carry them).
            """CREATE TABLE IF NOT EXISTS explanations (
                model_id VARCHAR, user_id VARCHAR, window_start TIMESTAMP,
                window_end TIMESTAMP, created_at TIMESTAMP, top_events VARCHAR,
                counterfactual VARCHAR, summary VARCHAR, summary_backend VARCHAR,
                grounded BOOLEAN, settings JSON)""",
        ),
    ),
    (
        3,
        (
            # Batches appended to events as their own sorted run since the table was last
            # rewritten as one sorted run (see store._MAX_RUNS); empty: events is one run.
            "CREATE TABLE IF NOT EXISTS events_runs (batch_id BIGINT, appended_at TIMESTAMP)",
        ),
    ),
    (
        4,
        (
            # The account-level model's fraud probability (core.aggregate_model), one of the
            # three sources the combined score pools; NULL for models trained without it.
            "ALTER TABLE sequence_scores ADD COLUMN IF NOT EXISTS score_aggregate DOUBLE",
        ),
    ),
    (
        5,
        (
            # Case ids: two sessions opening a case at the same moment both read the same
            # max(case_id) inside their transactions; a sequence never hands a number out twice
            # (core.cases.next_case_id skips numbers that cases from before this step hold).
            "CREATE SEQUENCE IF NOT EXISTS case_id_seq START 1",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_LOCK_RE = re.compile(r"lock", re.IGNORECASE)
_HOLDER_RE = re.compile(r"held in (.+?\(PID \d+\))")


def _current_version(con: duckdb.DuckDBPyConnection) -> int:
    exists = _one(
        con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'schema_version'"
            " AND schema_name = 'main' AND database_name = current_database()"
        )
    )
    if not exists or not exists[0]:
        return 0
    row = _one(con.execute("SELECT coalesce(max(version), 0) FROM schema_version"))
    return int(row[0]) if row else 0


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Apply the migration steps this database lacks; return the schema version it is at."""
    version = _current_version(con)
    if version >= SCHEMA_VERSION:
        return version
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
        " applied_at TIMESTAMP)"
    )
    for number, statements in MIGRATIONS:
        if number <= version:
            continue
        con.begin()
        try:
            for sql in statements:
                con.execute(sql)
            con.execute(
                "INSERT INTO schema_version VALUES (?, ?)", [number, _naive_utc(datetime.now(UTC))]
            )
            con.commit()
        except BaseException:
            con.rollback()
            raise
        version = number
    return version


def connect(
    db_path: str | Path,
    *,
    read_only: bool = False,
    retries: int = 8,
    backoff_s: float = 0.05,
) -> duckdb.DuckDBPyConnection:
    """Open the store; writable connections are migrated. Retries while another process holds
    the file lock (exponential backoff, each wait capped at 2 s), then raises StoreLockedError.

    The connection's TimeZone is set to UTC: naive timestamps in input files mean UTC. A
    read-only open of a missing file first creates and migrates it (an empty store).
    """
    path = Path(db_path)
    in_memory = str(db_path) == ":memory:"
    if not in_memory:
        path.parent.mkdir(parents=True, exist_ok=True)
        if read_only and not path.exists():
            connect(path, retries=retries, backoff_s=backoff_s).close()
    target = ":memory:" if in_memory else str(path)
    last: Exception | None = None
    waited = 0.0
    for attempt in range(retries + 1):
        try:
            con = duckdb.connect(target, read_only=read_only)
            break
        except duckdb.IOException as exc:
            if not _LOCK_RE.search(str(exc)):
                raise StoreError(f"cannot open database {path}: {_first_line(exc)}") from exc
            last = exc
            if attempt < retries:
                pause = min(backoff_s * 2**attempt, 2.0)
                time.sleep(pause)
                waited += pause
        except duckdb.Error as exc:
            raise StoreError(f"cannot open database {path}: {_first_line(exc)}") from exc
    else:
        holder = _HOLDER_RE.search(str(last))
        who = holder.group(1) if holder else _first_line(last)
        raise StoreLockedError(
            f"database {path} is locked by another process ({who}); gave up after "
            f"{retries + 1} attempts over {waited:.1f} s"
        ) from last
    con.execute("SET TimeZone = 'UTC'")
    if not read_only:
        migrate(con)
    return con


@contextmanager
def open_db(db_path: str | Path, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection for one unit of work, closed at the end so the file lock is released.

    The dashboard and the CLI share the database file: nobody may hold DuckDB's process-wide
    write lock longer than one read or write takes, so long-lived connections are avoided.
    """
    con = connect(db_path, read_only=read_only)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def using(
    db: duckdb.DuckDBPyConnection | str | Path, *, read_only: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Use a given connection as is, or open the database file just for this block.

    Long jobs (training, scoring millions of events) take a path and open the file only for
    each read or write, so the dashboard and the CLI can share it meanwhile.
    """
    if isinstance(db, duckdb.DuckDBPyConnection):
        yield db
    else:
        with open_db(db, read_only=read_only) as con:
            yield con


def _one(result: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
    """First row, fetching the whole (small) result: DuckDB 2.0 refuses further work on a
    connection whose last result was not read to the end."""
    rows = result.fetchall()
    return rows[0] if rows else None


def _first_line(exc: BaseException | None) -> str:
    return str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""


# ---------------------------------------------------------------------------------------------
# Ingest report


@dataclass
class IngestReport:
    batch_id: int | None
    source: str
    checksum: str
    rows_read: int
    rows_accepted: int
    rows_quarantined: int
    reasons: dict[str, int]
    duplicate_of: int | None
    seconds: float
    ignored_columns: list[str] = field(default_factory=list)
    # --event-map keys no row of the file has (a typo renames nothing, silently otherwise)
    unmatched_event_map: list[str] = field(default_factory=list)

    def message(self) -> str:
        name = Path(self.source).name or self.source
        if self.duplicate_of is not None:
            return (
                f"{name}: already ingested as batch {self.duplicate_of} (same content, "
                f"sha256 {self.checksum[:12]}); nothing changed. A column mapping or other options "
                "are not applied again: to load the file another way, use a fresh database."
            )
        text = (
            f"{name}: {self.rows_read:,} rows read, {self.rows_accepted:,} accepted, "
            f"{self.rows_quarantined:,} quarantined"
        )
        if self.reasons:
            text += " (" + ", ".join(f"{r}: {n:,}" for r, n in self.reasons.items()) + ")"
        text += f"; batch {self.batch_id}, {self.seconds:.2f} s."
        if self.ignored_columns:
            text += " Ignored columns: " + ", ".join(self.ignored_columns) + "."
        if self.unmatched_event_map:
            text += (
                " The event map renames types no row has: "
                + ", ".join(self.unmatched_event_map)
                + " (a typo?)."
            )
        if self.rows_read and not self.rows_accepted and self.all_stored_already:
            text += " Every row was stored already: nothing new."
        elif self.rows_read and not self.rows_accepted:
            text += " Nothing was loaded."
            if any("timestamp" in r for r in self.reasons):
                text += (
                    " Every row's timestamp failed: check which column is mapped to ts and "
                    "its unit or format (CLI: --map ts=COLUMN, --ts-unit s, ms or a strptime "
                    "format such as '%d/%m/%Y %H:%M')."
                )
            text += " The file can be ingested again with other options."
        return text

    @property
    def all_stored_already(self) -> bool:
        """Every quarantined row repeats a stored event (an overlap skipped with skip_stored)."""
        return bool(self.reasons) and set(self.reasons) == {STORED_REASON}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Input sniffing


_SNIFF_BYTES = 1 << 16
_CSV_EXTENSIONS = (".csv", ".tsv", ".tab", ".txt", ".dat", ".log")
_PARQUET_EXTENSIONS = (".parquet", ".pq", ".parq")
_DELIMITERS = (",", "\t", ";", "|")
_BINARY_MAGIC = {
    b"PK\x03\x04": "a ZIP archive (xlsx/zip)",
    b"\xd0\xcf\x11\xe0": "an old Office document (xls)",
    b"%PDF": "a PDF",
    b"\x89PNG": "a PNG image",
    b"ARROW1": "an Arrow IPC file",
    b"Obj\x01": "an Avro file",
    b"ORC": "an ORC file",
}


def _ident(name: str) -> str:
    """Quote an identifier that came from a file header or DataFrame."""
    return '"' + name.replace('"', '""') + '"'


def _sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _detect_format(path: Path) -> tuple[Literal["csv", "parquet"], bytes]:
    """Return ("csv" | "parquet", the first bytes of the (decompressed) text)."""
    name = path.name.lower()
    with path.open("rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if not head:
        raise IngestError(f"{path.name}: no rows (the file is empty)")
    if head[:4] == b"PAR1":
        return "parquet", head
    if name.endswith(_PARQUET_EXTENSIONS):
        raise IngestError(f"{path.name} is named like Parquet but is not a Parquet file")
    if head[:2] == b"\x1f\x8b":
        inner = name.removesuffix(".gz")
        if not inner.endswith(_CSV_EXTENSIONS):
            raise IngestError(
                f"{path.name}: gzip file is not a .csv.gz; fraudlens reads CSV or Parquet"
            )
        with gzip.open(path, "rb") as gz:
            head = gz.read(_SNIFF_BYTES)
        if not head:
            raise IngestError(f"{path.name}: no rows (the file is empty)")
    for magic, what in _BINARY_MAGIC.items():
        if head.startswith(magic):
            raise IngestError(f"{path.name} is {what}, not CSV or Parquet")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        raise IngestError(
            f"{path.name}: unreadable encoding (UTF-16 or binary data); save it as UTF-8 CSV"
        )
    text = head.decode("utf-8", errors="replace")
    # A cut multi-byte character at the end of the sample is not an encoding problem.
    if text.count("\ufffd") > max(3, len(text) // 100):
        raise IngestError(
            f"{path.name}: unreadable encoding (not UTF-8 text); save it as UTF-8 CSV"
        )
    suffix = Path(name.removesuffix(".gz")).suffix
    if suffix and suffix not in _CSV_EXTENSIONS:
        raise IngestError(
            f"{path.name}: unsupported file type '{suffix}'; fraudlens reads CSV or Parquet"
        )
    return "csv", head


def _first_line_text(head: bytes) -> str:
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    return line.decode("utf-8", errors="replace").lstrip("\ufeff")


def _sniff_delimiter(first_line: str, n_fields: int | None) -> str:
    counts = {d: _split_line(first_line, d) for d in _DELIMITERS}
    if n_fields is not None:
        for d in _DELIMITERS:
            if len(counts[d]) == n_fields:
                return d
    best = max(_DELIMITERS, key=lambda d: len(counts[d]))
    return best if len(counts[best]) > 1 else ","


_NUMBER = re.compile(r"[+-]?(\d+([.,]\d*)?|[.,]\d+)([eE][+-]?\d+)?")
_EPOCH = re.compile(r"\d{9,13}(\.\d+)?")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}.*)?")


def looks_like_data(fields: list[str]) -> bool:
    """A first line that is mostly numbers or dates is a row, not a header: no event log
    names its columns 100692 or 1569888045 (headerless dumps such as Taobao's UserBehavior
    are)."""
    values = [f.strip().strip('"') for f in fields]
    if any(_DATE.fullmatch(v) or _EPOCH.fullmatch(v) for v in values):
        return True  # no column is named 2024-01-01 or 1569888045
    data = sum(bool(_NUMBER.fullmatch(v)) for v in values)
    return len(values) >= 2 and data * 2 >= len(values)


def _split_line(line: str, delimiter: str) -> list[str]:
    return next(csv.reader([line], delimiter=delimiter, quotechar='"'), [])


def _unique_names(names: Iterable[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i, raw in enumerate(names):
        name = raw.strip() or f"column{i}"
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        seen.setdefault(name, 1)
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# Column plans: how each canonical column is computed from its source column


_INT_TYPES = (
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
    "UHUGEINT",
)
_FLOAT_TYPES = ("FLOAT", "DOUBLE", "REAL")
_INTEGER_TEXT = r"'^\s*[+-]?[0-9]+(\.0*)?\s*$'"
# A number written with a decimal comma and optional dots between thousands: 12,99 or
# 1.234,50. Anything else (12.99 among them) is not read as one: a price silently off by a
# factor of 100 would be worse than a quarantined row.
_COMMA_DECIMAL_TEXT = r"'^\s*[+-]?([0-9]+|[0-9]{1,3}(\.[0-9]{3})+)(,[0-9]+)?\s*$'"
# A time followed by a zone name, "Z" or an offset: "10:00:00+02:00", "10:00 UTC".
_ZONE_SUFFIX = r"'[0-9]:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?\s*([A-Za-z]|[+-][0-9]{2}(:?[0-9]{2})?)'"


def _kind(duck_type: str) -> str:
    t = duck_type.upper()
    if t.startswith("VARCHAR") or t == "JSON":
        return "text"
    if t in _INT_TYPES:
        return "int"
    if t in _FLOAT_TYPES or t.startswith("DECIMAL"):
        return "float"
    if t.startswith("TIMESTAMP WITH TIME ZONE") or t == "TIMESTAMPTZ":
        return "tstz"
    if t.startswith("TIMESTAMP") or t == "DATE":
        return "ts"
    return "other"


@dataclass
class _Plan:
    """SQL for one canonical column: its value (layer 1) and reject conditions (layer 2)."""

    value: str
    helpers: dict[str, str] = field(default_factory=dict)
    checks: list[tuple[str, str]] = field(default_factory=list)  # (condition, reason)


def _empty(e: str) -> str:
    return f"({e} IS NULL OR trim({e}) = '')"


def check_ts_unit(unit: str) -> str:
    """``unit`` when it is auto, iso, s, ms or a strptime format DuckDB accepts; else an
    IngestError saying what is allowed."""
    if unit in TS_UNITS:
        return unit
    if "%" not in unit:
        raise IngestError(
            f"timestamp format {unit!r}: use auto, iso, s (epoch seconds), ms (epoch "
            "milliseconds) or a strptime format such as '%d.%m.%Y %H:%M'"
        )
    try:
        with duckdb.connect() as probe:
            probe.execute("SELECT try_strptime('', ?)", [unit])
    except duckdb.Error as exc:
        raise IngestError(f"timestamp format {unit!r}: {_first_line(exc)}") from None
    return unit


def _plan_ts(e: str, kind: str, unit: TsUnit) -> _Plan:
    lo, hi = "$min_ts", "$max_ts"
    if kind == "tstz":
        return _Plan(
            f"timezone('UTC', {e})",
            checks=[
                (f"{e} IS NULL", "missing timestamp"),
                (f"v_ts < {lo} OR v_ts >= {hi}", "absurd timestamp"),
            ],
        )
    if kind == "ts":
        return _Plan(
            f"CAST({e} AS TIMESTAMP)",
            checks=[
                (f"{e} IS NULL", "missing timestamp"),
                (f"v_ts < {lo} OR v_ts >= {hi}", "absurd timestamp"),
            ],
        )
    text = e if kind == "text" else f"CAST({e} AS VARCHAR)"
    if unit not in TS_UNITS:  # a strptime format ($ts_format); %z gives an offset-aware time
        parsed = f"try_strptime(trim({text}), $ts_format)"
        value = f"timezone('UTC', {parsed})" if re.search(r"%[zZ]", unit) else parsed
        return _Plan(
            value,
            checks=[
                (_empty(text), "missing timestamp"),
                ("v_ts IS NULL", "unparseable timestamp"),
                (f"v_ts < {lo} OR v_ts >= {hi}", "absurd timestamp"),
            ],
        )
    helpers: dict[str, str] = {}
    if kind in ("int", "float"):
        helpers["h_ts_num"] = "CAST(NULL AS DOUBLE)" if unit == "iso" else f"CAST({e} AS DOUBLE)"
        helpers["h_ts_iso"] = "CAST(NULL AS TIMESTAMP)"
    elif unit in ("s", "ms"):
        helpers["h_ts_num"] = f"TRY_CAST({text} AS DOUBLE)"
        helpers["h_ts_iso"] = "CAST(NULL AS TIMESTAMP)"
    else:
        # Plain TIMESTAMP parsing is ~5x cheaper than TIMESTAMPTZ but silently drops a zone or
        # offset, so the TIMESTAMPTZ parser only sees values with something after the time.
        # Helpers refer to earlier helpers by alias (DuckDB lateral column aliases).
        helpers["h_ts_plain"] = f"TRY_CAST({text} AS TIMESTAMP)"
        helpers["h_ts_num"] = (
            "CAST(NULL AS DOUBLE)"
            if unit == "iso"
            else f"CASE WHEN h_ts_plain IS NULL THEN TRY_CAST({text} AS DOUBLE) END"
        )
        helpers["h_ts_iso"] = (
            "CASE WHEN h_ts_num IS NOT NULL THEN NULL"
            f" WHEN h_ts_plain IS NULL OR regexp_matches({text}, {_ZONE_SUFFIX})"
            f" THEN timezone('UTC', TRY_CAST({text} AS TIMESTAMPTZ)) ELSE h_ts_plain END"
        )
    if unit == "ms":
        sec = "h_ts_num / 1000"
    elif unit == "s":
        sec = "h_ts_num"
    else:  # auto: epoch seconds reach 1e11 only in the year 5138, epoch ms pass it in 1973
        sec = "CASE WHEN abs(h_ts_num) > 1e11 THEN h_ts_num / 1000 ELSE h_ts_num END"
    value = (
        "CASE WHEN h_ts_num IS NOT NULL THEN CASE WHEN isfinite(h_ts_num)"
        f" AND ({sec}) >= $min_epoch AND ({sec}) < $max_epoch"
        f" THEN make_timestamp(CAST(({sec}) * 1e6 AS BIGINT)) END ELSE h_ts_iso END"
    )
    return _Plan(
        value,
        helpers=helpers,
        checks=[
            (_empty(text), "missing timestamp"),
            (
                "(h_ts_num IS NULL AND h_ts_iso IS NULL) OR NOT isfinite(h_ts_num)",
                "unparseable timestamp",
            ),
            (f"v_ts IS NULL OR v_ts < {lo} OR v_ts >= {hi}", "absurd timestamp"),
        ],
    )


def _plan_text(name: str, e: str, kind: str, required: bool) -> _Plan:
    text = e if kind == "text" else f"CAST({e} AS VARCHAR)"
    limit = schema.MAX_TEXT_LEN if name == "text" else schema.MAX_ID_LEN
    checks = [(f"length(v_{name}) > {limit}", f"over-long {name}")]
    if required:
        return _Plan(text, checks=[(_empty(text), f"empty {name}"), *checks])
    return _Plan(f"NULLIF({text}, '')", checks=checks)


def _plan_number(
    name: str, e: str, kind: str, sql_type: str, integer: bool, decimal_comma: bool = False
) -> _Plan:
    noun = "non-integer" if integer else "non-numeric"
    if kind == "int":
        value = f"TRY_CAST({e} AS {sql_type})"
        bad = f"{e} IS NOT NULL AND v_{name} IS NULL"
    elif kind == "float":
        d = f"CAST({e} AS DOUBLE)"
        # pandas writes missing numbers as NaN: NaN is absent, infinity is bad. (Not isnan():
        # DuckDB 2.0 folds isnan() to false from Parquet statistics, which omit NaN.)
        value = f"CASE WHEN isfinite({d}) THEN TRY_CAST({e} AS {sql_type}) END"
        bad = f"isinf({d})"
        if integer:
            bad += f" OR (isfinite({d}) AND ({d} <> round({d}) OR v_{name} IS NULL))"
    else:
        text = e if kind == "text" else f"CAST({e} AS VARCHAR)"
        if integer:
            value = (
                f"CASE WHEN regexp_matches({text}, {_INTEGER_TEXT})"
                f" THEN TRY_CAST(trim({text}) AS {sql_type}) END"
            )
            bad = f"NOT {_empty(text)} AND v_{name} IS NULL"
        elif decimal_comma:
            value = (
                f"CASE WHEN regexp_matches({text}, {_COMMA_DECIMAL_TEXT}) THEN TRY_CAST("
                f"replace(replace(trim({text}), '.', ''), ',', '.') AS DOUBLE) END"
            )
            bad = f"NOT {_empty(text)} AND v_{name} IS NULL"
        else:
            value = f"TRY_CAST({text} AS DOUBLE)"
            bad = f"NOT {_empty(text)} AND (v_{name} IS NULL OR NOT isfinite(v_{name}))"
    checks = [(bad, f"{noun} {name}")]
    if name != "event_id":
        checks.append((f"v_{name} < 0", f"negative {name}"))
    return _Plan(value, checks=checks)


def _plans(
    resolved: dict[str, str],
    alias: dict[str, str],
    types: dict[str, str],
    ts_unit: TsUnit,
    decimal_comma: bool = False,
) -> dict[str, _Plan]:
    plans: dict[str, _Plan] = {}
    for col in schema.EVENT_COLUMNS:
        if col.name not in resolved:
            continue
        src = resolved[col.name]
        e, kind = alias[src], _kind(types[src])
        if col.name == "ts":
            plans[col.name] = _plan_ts(e, kind, ts_unit)
        elif col.duckdb_type == "VARCHAR":
            plans[col.name] = _plan_text(col.name, e, kind, col.required)
        else:
            integer = col.duckdb_type != "DOUBLE"
            plans[col.name] = _plan_number(
                col.name, e, kind, col.duckdb_type, integer, decimal_comma and not integer
            )
    return plans


def _synonym_column(canon: str, lower: dict[str, list[str]], taken: set[str]) -> str | None:
    """The file column a public log most likely uses for ``canon`` ("Timestamp" for ts), for
    the missing-column message's example."""
    for name in schema.COLUMN_SYNONYMS.get(canon, ()):
        hits = [c for c in lower.get(name, []) if c not in taken]
        if len(hits) == 1:
            return hits[0]
    return None


def suggested_mapping(found: list[str], resolved: dict[str, str] | None = None) -> dict[str, str]:
    """canonical -> file column for every column a public log's usual name gives away
    (schema.COLUMN_SYNONYMS), optional ones included: a hint that names only the required
    columns loses item, category and session on the first try, and a file loads once."""
    resolved = resolved or {}
    lower: dict[str, list[str]] = {}
    for name in found:
        lower.setdefault(name.lower(), []).append(name)
    taken = set(resolved.values())
    likely: dict[str, str] = {}
    for canon in schema.COLUMN_SYNONYMS:
        if canon in resolved:
            continue
        if (hit := _synonym_column(canon, lower, taken)) is not None:
            likely[canon] = hit
            taken.add(hit)
    return likely


def _resolve_columns(
    found: list[str], mapping: dict[str, str] | None, what: str
) -> tuple[dict[str, str], list[str]]:
    """canonical -> source column; plus the source columns nobody uses."""
    mapping = dict(mapping or {})
    settable = [c for c in schema.COLUMN_NAMES if c != "batch_id"]
    unknown = sorted(set(mapping) - set(settable))
    if unknown:
        raise StoreError(
            f"mapping names unknown column(s) {', '.join(unknown)}; known: {', '.join(settable)}"
        )
    absent = [f"{c}={s}" for c, s in mapping.items() if s not in found]
    if absent:
        raise IngestError(
            f"{what}: mapped source column(s) not found: {', '.join(absent)}; "
            f"columns found: {', '.join(found)}"
        )
    resolved = dict(mapping)
    lower: dict[str, list[str]] = {}
    for name in found:
        lower.setdefault(name.lower(), []).append(name)
    for canon in settable:
        if canon in resolved:
            continue
        if canon in found:
            resolved[canon] = canon
        elif len(lower.get(canon, [])) == 1:
            resolved[canon] = lower[canon][0]
    missing = [c for c in schema.REQUIRED_COLUMNS if c not in resolved]
    if missing:
        likely = suggested_mapping(found, resolved)
        pairs = [f"{k}={v}" for k, v in likely.items()] or ["ts=timestamp"]
        raise IngestError(
            f"{what}: missing required column(s) {', '.join(missing)}; "
            f"columns found: {', '.join(found) or '(none)'}"
            f" (map them, e.g. {', '.join(pairs)}; CLI: {' '.join('--map ' + p for p in pairs)})"
        )
    used = set(resolved.values())
    return resolved, [c for c in found if c not in used]


# ---------------------------------------------------------------------------------------------
# The batch


@dataclass
class _Source:
    name: str  # for reports and ingest_batches.source
    checksum: str
    select_sql: str  # SELECT producing __n (1-based row ordinal) and columns __s0, __s1, ...
    params: dict[str, Any]
    columns: list[str]  # original names, in alias order
    types: dict[str, str]  # original name -> DuckDB type
    rejects: bool  # CSV: structurally broken lines land in the reject tables
    header_lines: int
    # CSV: the file read straight into _CHECKED in file order (rowid numbers the rows), and
    # the same read staged as a table for select_sql when source rows are needed again.
    direct_sql: str | None = None
    stage_sql: str | None = None


# Scratch-table names. These fixed module constants are the only identifiers this module puts
# into f-string SQL; every value from outside (paths, user ids, times, batch ids) is a ? / $name
# parameter.
_REJECTS = "__fl_reject_errors"
_REJECT_SCANS = "__fl_reject_scans"
_REJECTS_AGAIN = "__fl_reject_errors_again"
_REJECT_SCANS_AGAIN = "__fl_reject_scans_again"
_CHECKED = "__fl_checked"
_SORTED = "__fl_events_sorted"
_STAGE = "__fl_stage"
_KEYS = "__fl_keys"
_SESSIONS = "__fl_sessions"
_CONTINUED = "__fl_continued"
_DUPS = "__fl_dups"
_SEEN = "__fl_seen"
_ORDINAL = "__fl_ordinal"

_REJECT_REASON = """CASE error_type
    WHEN 'TOO MANY COLUMNS' THEN 'wrong field count (too many)'
    WHEN 'MISSING COLUMNS' THEN 'wrong field count (too few)'
    WHEN 'UNQUOTED VALUE' THEN 'bad quoting'
    WHEN 'UNTERMINATED QUOTES' THEN 'bad quoting'
    WHEN 'INVALID ENCODING' THEN 'bad encoding (not UTF-8)'
    WHEN 'LINE SIZE OVER MAXIMUM' THEN 'line too long'
    ELSE 'malformed line: ' || lower(CAST(error_type AS VARCHAR)) END"""


def _step_done(step: str) -> None:
    if _FAIL_AFTER_STEP == step:
        raise RuntimeError(f"injected failure after ingest step '{step}'")


def _earlier_batch(con: duckdb.DuckDBPyConnection, checksum: str) -> tuple[int, bool] | None:
    """The batch this content went into before, and whether it holds any row. One that holds
    none (every row quarantined, say for a timestamp layout not yet given) does not make the
    content a duplicate: the file may be ingested again with other options and replaces it."""
    row = _one(
        con.execute(
            "SELECT batch_id, rows_accepted > 0 FROM ingest_batches WHERE checksum = ?",
            [checksum],
        )
    )
    return (int(row[0]), bool(row[1])) if row else None


def _duplicate_batch(con: duckdb.DuckDBPyConnection, checksum: str) -> int | None:
    earlier = _earlier_batch(con, checksum)
    return earlier[0] if earlier and earlier[1] else None


def _drop_scratch(con: duckdb.DuckDBPyConnection) -> None:
    # Identifiers in f-string SQL in this module are the module's own scratch-table constants
    # (_STAGE, _CHECKED, ...), never data: every value from outside is a ? / $name parameter.
    scratch = (_STAGE, _CHECKED, _DUPS, _SEEN, _KEYS, _SESSIONS, _CONTINUED, _REJECTS)
    for table in (*scratch, _REJECT_SCANS, _REJECTS_AGAIN, _REJECT_SCANS_AGAIN):
        con.execute(f"DROP TABLE IF EXISTS {table}")


def _run_batch(
    con: duckdb.DuckDBPyConnection,
    src: _Source,
    resolved: dict[str, str],
    ignored: list[str],
    event_map: dict[str, str] | None,
    ts_unit: TsUnit,
    decimal_comma: bool = False,
    repeats: Repeats = "refuse",
) -> IngestReport:
    """Validate into connection-local temp tables, then write everything in one transaction.

    The scratch tables live outside the transaction on purpose: they hold nothing the
    database keeps, and DuckDB 2.0 was seen to scan tables created inside an open transaction
    on one thread only (the whole ingest ran ~1.6x slower on 2 cores).
    """
    started = time.perf_counter()
    check_ts_unit(ts_unit)
    dup = _duplicate_batch(con, src.checksum)
    if dup is not None:
        return _duplicate_report(src, dup, ignored, started)
    con.execute("SET TimeZone = 'UTC'")
    alias = {n: f"__s{i}" for i, n in enumerate(src.columns)}
    plans = _plans(resolved, alias, src.types, ts_unit, decimal_comma)
    params: dict[str, Any] = {
        **src.params,
        "min_ts": _naive_utc(schema.MIN_TS),
        "max_ts": _naive_utc(schema.MAX_TS),
        "min_epoch": schema.MIN_TS.timestamp(),
        "max_epoch": schema.MAX_TS.timestamp(),
        "gap": schema.SESSION_GAP_MINUTES,
        "ts_format": ts_unit,
    }
    blanked: dict[int, str] = {}  # CSV line -> its text, for lines an open quote ran on from
    repair_dir: tempfile.TemporaryDirectory[str] | None = None
    try:
        _drop_scratch(con)
        sql = _checked_sql(src, plans)
        con.execute(sql, _used(sql, params))
        while src.rejects and (runaway := _runaway_quotes(con)):
            if len(blanked) >= _MAX_RUNAWAY_QUOTES:
                raise IngestError(
                    f"{Path(src.name).name}: more than {_MAX_RUNAWAY_QUOTES} lines open a quote "
                    '(") that they never close; the file seems to use " as a plain character. '
                    "Export it with quoted fields (or without quote characters) and ingest again"
                )
            # A field that opens a quote and never closes it makes the CSV reader take the rest
            # of the file as that one field: one reject, every later row gone. Read a copy in
            # which each such line is a plain broken line instead, so the lines after it are
            # read as rows; the line itself is quarantined with its own text (below).
            repair_dir = repair_dir or tempfile.TemporaryDirectory(prefix="fraudlens-")
            params["path"] = _blank_lines(
                src, Path(params["path"]), runaway, blanked, Path(repair_dir.name)
            )
            _drop_scratch(con)
            con.execute(sql, _used(sql, params))
        if src.direct_sql:
            # A CTAS keeps the scan's order, so rowid is the row ordinal; numbering in the
            # read (row_number() OVER ()) would force the parse onto one thread.
            rowid0 = _first_rowid(con, _CHECKED)
            # _CHECKED: a scratch-table constant (see above); the value is a parameter
            con.execute(f"UPDATE {_CHECKED} SET __n = rowid - ? + 1", [rowid0])  # noqa: S608
        if "event_id" in plans:
            _mark_duplicate_ids(con, src, params)
        # rows with their own event ids are told apart by id (the duplicate-id check above)
        if "event_id" not in plans and repeats != "keep" and _could_repeat(con, plans):
            n_seen = _find_stored_rows(con, src, plans, event_map, params)
            if repeats == "skip":
                _reject_listed(con, src, params, _SEEN, STORED_REASON)
            elif n_seen:
                raise IngestError(
                    f"{Path(src.name).name}: {n_seen:,} rows repeat events already stored (same"
                    " user, time and every value): the file overlaps one loaded before. Nothing"
                    " was loaded. Ingest it again with --skip-stored to load only the new rows"
                    " (the repeats go to quarantine), or --keep-repeats to store them twice"
                    " (Data & model page: 'Rows already stored')"
                )
        unmatched = _unmatched_event_map(con, src, plans, event_map, params)
        _step_done("read")
        n_rows, n_ok = _one(
            con.execute(
                f"SELECT count(*), count(*) FILTER (WHERE reason IS NULL) FROM {_CHECKED}"  # noqa: S608
            )
        ) or (0, 0)
        n_broken = 0
        if src.rejects:
            con.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {_REJECTS} AS SELECT CAST(NULL AS BIGINT)"
                " AS line, CAST(NULL AS VARCHAR) AS error_type, CAST(NULL AS VARCHAR) AS"
                " csv_line LIMIT 0"
            )
            # _REJECTS: a scratch-table constant (see above), no value in the SQL
            row = _one(con.execute(f"SELECT count(DISTINCT line) FROM {_REJECTS}"))  # noqa: S608
            n_broken = int(row[0]) if row else 0
        rows_read = int(n_rows) + n_broken
        if rows_read == 0:
            raise IngestError(f"{Path(src.name).name}: no rows")
        # _STAGE: a scratch-table constant (see above). Dropped for memory: _CHECKED has all
        con.execute(f"DROP TABLE IF EXISTS {_STAGE}")  # noqa: S608
        _sessionize(con, params)
        _step_done("sort")

        con.begin()
        try:
            # Checked again inside the transaction: another cursor of this process may have
            # committed the same content meanwhile (the UNIQUE checksum would stop it anyway).
            dup = _duplicate_batch(con, src.checksum)
            if dup is not None:
                con.rollback()
                return _duplicate_report(src, dup, ignored, started)
            new_rows = _new_rows_sql(src, plans, event_map, params)
            report = _write_batch(
                con,
                src,
                new_rows,
                params,
                "event_id" in plans,
                ignored,
                rows_read,
                int(n_ok),
                started,
                blanked,
            )
            con.commit()
            report.unmatched_event_map = unmatched
        except BaseException:
            con.rollback()
            raise
    except duckdb.Error as exc:
        raise IngestError(f"{Path(src.name).name}: cannot ingest: {_first_line(exc)}") from exc
    finally:
        _drop_scratch(con)
        if repair_dir is not None:
            repair_dir.cleanup()
    return report


_RUNAWAY_REASON = "bad quoting (a quote opened here is never closed)"
# Each such line costs one more read of the file; beyond this many the file is not quoted CSV.
_MAX_RUNAWAY_QUOTES = 100


def _runaway_quotes(con: duckdb.DuckDBPyConnection) -> list[tuple[int, int]]:
    """(line, byte offset of the line) of the first reject where an open quote swallowed later
    lines. Only the first: DuckDB numbers records, not lines, so past a swallowed stretch its
    line numbers and offsets no longer point at the file's lines (the next pass finds the
    next one)."""
    rows = con.execute(
        f"SELECT line, line_byte_position FROM {_REJECTS}"  # noqa: S608
        " WHERE error_type IN ('UNQUOTED VALUE', 'UNTERMINATED QUOTES')"
        " AND contains(csv_line, chr(10)) ORDER BY line LIMIT 1"
    ).fetchall()
    return [(int(line), int(pos)) for line, pos in rows]


def _blank_lines(
    src: _Source,
    source: Path,
    runaway: list[tuple[int, int]],
    blanked: dict[int, str],
    directory: Path,
) -> str:
    """A copy of the CSV in which each given line (with what ``blanked`` holds already) is
    replaced by delimiters only: a line with too many fields, rejected where it stands, which
    keeps every line number. ``blanked`` gains each line's original text."""
    opener = gzip.open if source.name.lower().endswith(".gz") else open
    filler = (str(src.params["delim"]) * len(src.columns)).encode()
    # ``source`` is the last copy when there was one: lines blanked before stay blanked, and
    # DuckDB's byte offsets are those of the file it read. Streamed: files can be large.
    target = directory / f"repaired-{len(blanked) + len(runaway)}.csv"
    with opener(source, "rb") as fh, target.open("wb") as out:
        done = 0
        for line, position in sorted(runaway, key=lambda r: r[1]):
            start = position - 1  # DuckDB counts bytes from 1
            if start < done:
                raise StoreError(f"internal: cannot find line {line} of {source.name}")
            _copy_bytes(fh, out, start - done)
            done = start
            first = fh.read(1)
            while first in (b"\r", b"\n"):  # with CRLF, DuckDB's record starts at the \n
                out.write(first)
                done += 1
                first = fh.read(1)
            if not first:
                raise StoreError(f"internal: cannot find line {line} of {source.name}")
            raw = first + fh.readline()
            blanked[line] = raw.rstrip(b"\r\n").decode("utf-8", errors="replace")
            out.write(filler + raw[len(raw.rstrip(b"\r\n")) :])  # keep its line ending
            done += len(raw)
        shutil.copyfileobj(fh, out)
    return str(target)


def _copy_bytes(src: Any, dst: Any, n: int, chunk: int = 1 << 20) -> None:
    while n > 0:
        block = src.read(min(chunk, n))
        if not block:
            raise StoreError("internal: the file ended before a line DuckDB reported")
        dst.write(block)
        n -= len(block)


def _first_rowid(con: duckdb.DuckDBPyConnection, table: str) -> int:
    """Row ids count up in insertion order (from 2**55 inside an open transaction)."""
    row = _one(con.execute(f"SELECT min(rowid), max(rowid), count(*) FROM {table}"))  # noqa: S608
    assert row is not None
    lo, hi, n = row
    if n and hi - lo + 1 != n:  # never seen; would make line numbers wrong, so refuse
        raise StoreError("internal: staged rows are not contiguous; cannot number them")
    return int(lo or 0)


def _used(sql: str, params: dict[str, Any]) -> dict[str, Any]:
    """DuckDB rejects named parameters that a statement does not use."""
    return {k: v for k, v in params.items() if f"${k}" in sql}


def _duplicate_report(src: _Source, dup: int, ignored: list[str], started: float) -> IngestReport:
    return IngestReport(
        None, src.name, src.checksum, 0, 0, 0, {}, dup, time.perf_counter() - started, ignored
    )


def _checked_sql(src: _Source, plans: dict[str, _Plan]) -> str:
    """One pass over the source: typed canonical values, the first reason a row is bad (NULL
    when it is good) and, for bad rows only, the source row as JSON.

    From a typed source (Parquet, Arrow) only the key columns are kept: the insert reads the
    source again for the rest, which costs less than materialising every column here. From
    CSV text every value is kept, as parsing it (regexes, casts) is the dear part.
    """
    layer1 = ["__n"] + [f"__s{i}" for i in range(len(src.columns))]
    for name, plan in plans.items():
        layer1 += [f"{sql} AS {h}" for h, sql in plan.helpers.items()]
        layer1.append(f"{plan.value} AS v_{name}")
    whens = [
        f"WHEN {cond} THEN '{reason}'" for plan in plans.values() for cond, reason in plan.checks
    ]
    reason0 = "CASE " + " ".join(whens) + " END" if whens else "CAST(NULL AS VARCHAR)"
    raw = _raw_json(src)
    keep = plans if _keeps_values(src) else [n for n in _KEYS_COLUMNS if n in plans]
    values = ", ".join(f"CAST(v_{n} AS {schema.COLUMN_TYPES[n]}) AS v_{n}" for n in keep)
    return f"""
        CREATE TEMP TABLE {_CHECKED} AS
        WITH s AS ({src.direct_sql or src.select_sql}),
        l1 AS (SELECT {", ".join(layer1)} FROM s),
        l2 AS (SELECT *, {reason0} AS reason FROM l1)
        SELECT __n, {values}, reason,
               CASE WHEN reason IS NOT NULL THEN CAST({raw} AS VARCHAR) END AS raw
        FROM l2"""  # noqa: S608


# The typed columns _CHECKED keeps from a typed source: the sort keys, and event_id for the
# duplicate check and the id base.
_KEYS_COLUMNS: tuple[str, ...] = ("user_id", "ts", "event_id")


def _keeps_values(src: _Source) -> bool:
    return src.direct_sql is not None


def _raw_json(src: _Source) -> str:
    """The source row as a JSON object, over the columns __s0, __s1, ... of src.select_sql."""
    return (
        "to_json(struct_pack("
        + ", ".join(f"{_ident(name)} := __s{i}" for i, name in enumerate(src.columns))
        + "))"
    )


def _mark_duplicate_ids(
    con: duckdb.DuckDBPyConnection, src: _Source, params: dict[str, Any]
) -> None:
    """Quarantine valid rows whose event_id an earlier valid row of the batch, or a stored
    event, already has: the first valid row with an id wins.

    Done after _CHECKED on the narrow (__n, v_event_id) columns: a window inside the
    validation pass dragged every column through its sort and cost more than the rest of the
    pass. Duplicates are rare, so their raw rows are read back from the source only then.
    """
    sql = f"""CREATE TEMP TABLE {_DUPS} AS SELECT c.__n FROM {_CHECKED} c
        LEFT JOIN (SELECT v_event_id, min(__n) AS first FROM {_CHECKED}
                   WHERE reason IS NULL AND v_event_id IS NOT NULL
                   GROUP BY v_event_id HAVING count(*) > 1) f ON c.v_event_id = f.v_event_id
        WHERE c.reason IS NULL AND c.v_event_id IS NOT NULL
          AND (c.__n > f.first OR c.v_event_id IN (SELECT event_id FROM events))"""  # noqa: S608
    con.execute(sql)
    _reject_listed(con, src, params, _DUPS, "duplicate event_id")


def _stage_source(con: duckdb.DuckDBPyConnection, src: _Source, params: dict[str, Any]) -> None:
    """Make src.select_sql readable: a CSV is staged as a table once (a typed source is read
    in place)."""
    if src.stage_sql and "rowid0" not in params:
        con.execute(f"DROP TABLE IF EXISTS {_STAGE}")
        con.execute(src.stage_sql, _used(src.stage_sql, params))
        params["rowid0"] = _first_rowid(con, _STAGE)


def _reject_listed(
    con: duckdb.DuckDBPyConnection,
    src: _Source,
    params: dict[str, Any],
    listed: str,
    reason: str,
) -> None:
    """Give the rows whose __n is in table `listed` this reason and their source row as raw.
    Such rows are rare, so their raw rows are read back from the source only when there are
    some."""
    row = _one(con.execute(f"SELECT count(*) FROM {listed}"))  # noqa: S608
    if not row or not row[0]:
        return
    _stage_source(con, src, params)
    params["reason"] = reason
    fix = f"""UPDATE {_CHECKED} SET reason = $reason, raw = d.raw
        FROM (SELECT __n, CAST({_raw_json(src)} AS VARCHAR) AS raw
              FROM ({src.select_sql}) WHERE __n IN (SELECT __n FROM {listed})) d
        WHERE {_CHECKED}.__n = d.__n"""  # noqa: S608
    con.execute(fix, _used(fix, params))


def _unmatched_event_map(
    con: duckdb.DuckDBPyConnection,
    src: _Source,
    plans: dict[str, _Plan],
    event_map: dict[str, str] | None,
    params: dict[str, Any],
) -> list[str]:
    """The event map's keys that no row of the file has, in the map's order."""
    if not event_map or "event_type" not in plans:
        return []
    if _keeps_values(src):
        sql = f"SELECT DISTINCT v_event_type FROM {_CHECKED}"  # noqa: S608
    else:
        value = plans["event_type"].value
        sql = f"SELECT DISTINCT CAST({value} AS VARCHAR) FROM ({src.select_sql})"  # noqa: S608
    present = {row[0] for row in con.execute(sql, _used(sql, params)).fetchall()}
    return [key for key in event_map if key not in present]


STORED_REASON = "already stored (the same event came in an earlier file)"


# What an ingest does with rows identical to stored events (files without event ids that
# overlap earlier ones): refuse the file (nothing written, the message names the choice),
# skip them (quarantined as already stored) or keep them (stored a second time).
Repeats = Literal["refuse", "skip", "keep"]


def repeats_choice(skip_stored: bool, keep_repeats: bool) -> Repeats:
    if skip_stored and keep_repeats:
        raise StoreError(
            "choose one of --skip-stored and --keep-repeats (skip_stored, keep_repeats)"
        )
    return "skip" if skip_stored else "keep" if keep_repeats else "refuse"


def _could_repeat(con: duckdb.DuckDBPyConnection, plans: dict[str, _Plan]) -> bool:
    """Whether checking for repeats can find any: a repeat needs a stored event at the same
    user and time."""
    # A repeat has a stored event's user and time: one join on those two keys (the batch's
    # side is hashed, events scanned once on two columns) rules most batches out before the
    # full comparison, which reads every column of the batch users' events.
    hit = _one(
        con.execute(
            f"SELECT EXISTS (SELECT 1 FROM {_CHECKED} c JOIN events e"  # noqa: S608
            " ON e.user_id = c.v_user_id AND e.ts = c.v_ts WHERE c.reason IS NULL)"
        )
    )
    return hit == (True,)


def _find_stored_rows(
    con: duckdb.DuckDBPyConnection,
    src: _Source,
    plans: dict[str, _Plan],
    event_map: dict[str, str] | None,
    params: dict[str, Any],
) -> int:
    """Table _SEEN: the valid rows that repeat an event already in `events`; returns how many.

    Overlapping exports (yesterday's file covered 00:00-24:00, today's 18:00-18:00) have no
    event_id to tell a repeat from a new event, so a row is a repeat when every value it would
    store equals a stored event's (user, time, type, item, price, device, ...; the derived
    session and id aside). Counted as multisets: when the file holds an event k times and the
    store m times, the first m are skipped and the other k - m kept, so genuine identical
    events (a log line repeated within a second) are not collapsed.
    """
    # The session is left out: a blank one is stored as the derived user:start value, and an
    # event re-exported under another session id is still the same event.
    compared = [
        c
        for c in schema.COLUMN_TYPES
        if c in plans and c not in ("user_id", "ts", "event_id", "batch_id", "session_id")
    ]
    absent = [
        c
        for c in schema.COLUMN_TYPES
        if c not in plans and c not in ("event_id", "batch_id", "session_id")
    ]

    def typed(name: str, value: str) -> str:
        if name == "event_type" and event_map:
            value = _renamed_event_type(value, event_map, params)
        return f"CAST({value} AS {schema.COLUMN_TYPES[name]}) AS {name}"

    if _keeps_values(src):
        rows = (
            f"SELECT __n, v_user_id AS user_id, v_ts AS ts"  # noqa: S608
            f"{''.join(', ' + typed(c, f'v_{c}') for c in compared)}"
            f" FROM {_CHECKED} WHERE reason IS NULL"
        )
    else:
        _stage_source(con, src, params)
        wide = "".join(f", {plans[c].value} AS v_{c}" for c in compared)
        rows = (
            f"SELECT c.__n, c.v_user_id AS user_id, c.v_ts AS ts"  # noqa: S608
            f"{''.join(', ' + typed(c, f'w.v_{c}') for c in compared)}"
            f" FROM {_CHECKED} c JOIN (SELECT __n{wide} FROM ({src.select_sql})) w USING (__n)"
            " WHERE c.reason IS NULL"
        )
    keys = ["user_id", "ts", *compared]
    same = " AND ".join(
        ["b.user_id = s.user_id", "b.ts = s.ts"]
        + [f"b.{c} IS NOT DISTINCT FROM s.{c}" for c in compared]
    )
    stored_where = "".join(f" AND {c} IS NULL" for c in absent)
    sql = f"""CREATE TEMP TABLE {_SEEN} AS
        WITH b AS (SELECT *, row_number() OVER (PARTITION BY {", ".join(keys)} ORDER BY __n)
                   AS __k FROM ({rows})),
             s AS (SELECT {", ".join(keys)}, count(*) AS __m FROM events
                   WHERE user_id IN (SELECT DISTINCT user_id FROM b){stored_where}
                   GROUP BY ALL)
        SELECT b.__n FROM b JOIN s ON {same} WHERE b.__k <= s.__m"""  # noqa: S608
    con.execute(sql, _used(sql, params))
    row = _one(con.execute(f"SELECT count(*) FROM {_SEEN}"))  # noqa: S608
    return int(row[0]) if row else 0


def _sessionize(con: duckdb.DuckDBPyConnection, params: dict[str, Any]) -> None:
    """The valid rows' keys in table _SESSIONS: __n, user_id, ts, __start (the start of the
    row's derived session, used where session_id is NULL) and __pos, the row's place in
    (user_id, ts, __n) order.

    All of it on the narrow keys: sorting them is cheap (a fourth column doubled the sort
    time), and the insert then orders the full rows by one integer instead of carrying every
    column through a string-keyed sort.
    """
    con.execute(
        f"CREATE TEMP TABLE {_KEYS} AS SELECT __n, v_user_id AS user_id, v_ts AS ts"  # noqa: S608
        f" FROM {_CHECKED} WHERE reason IS NULL ORDER BY user_id, ts, __n"
    )
    # A session starts at a user's first event and after every gap longer than the limit;
    # its id is the user plus the session's start time, stable across re-runs and batches.
    # The windows have an empty OVER (): DuckDB streams them in scan order (its streaming
    # window is a fixed-order operator), and the scan order of _KEYS is (user_id, ts, __n).
    sql = f"""CREATE TEMP TABLE {_SESSIONS} AS
        WITH g AS (SELECT *, CASE WHEN user_id = lag(user_id) OVER ()
                                   AND ts - lag(ts) OVER () <= to_minutes(CAST($gap AS BIGINT))
                                  THEN NULL ELSE ts END AS __start FROM {_KEYS})
        SELECT __n, user_id, ts,
               last_value(__start IGNORE NULLS) OVER (ROWS UNBOUNDED PRECEDING) AS __start,
               row_number() OVER () AS __pos
        FROM g"""  # noqa: S608
    con.execute(sql, _used(sql, params))
    con.execute(f"DROP TABLE {_KEYS}")
    # A user's first session in this batch continues the session of their last stored event
    # when that event is within the gap (a log shipped in hourly files must not break every
    # session at the hour). Later stored events (late data) do not re-split stored sessions.
    cont = f"""CREATE TEMP TABLE {_CONTINUED} AS
        WITH f AS (SELECT user_id, min(ts) AS first_ts FROM {_SESSIONS} GROUP BY user_id)
        SELECT f.user_id, f.first_ts, arg_max(e.session_id, e.ts) AS session_id
        FROM events e JOIN f ON e.user_id = f.user_id AND e.ts <= f.first_ts
        GROUP BY f.user_id, f.first_ts
        HAVING f.first_ts - max(e.ts) <= to_minutes(CAST($gap AS BIGINT))"""  # noqa: S608
    con.execute(cont, _used(cont, params))


def _renamed_event_type(value: str, event_map: dict[str, str], params: dict[str, Any]) -> str:
    """SQL for the event type ``value`` after --event-map (types it does not name unchanged);
    binds the map as $map_keys / $map_vals."""
    params["map_keys"] = list(event_map)
    params["map_vals"] = list(event_map.values())
    return (
        "coalesce(map_extract_value(MAP($map_keys::VARCHAR[], $map_vals::VARCHAR[]),"
        f" {value}), {value})"
    )


def _new_rows_sql(
    src: _Source,
    plans: dict[str, _Plan],
    event_map: dict[str, str] | None,
    params: dict[str, Any],
) -> str:
    """SELECT of the batch's valid rows as `events` columns (with $base and $batch_id to
    bind), exposing __pos for the caller's ORDER BY.

    The other columns come from _CHECKED or, when it kept only the keys, from the source read
    again; joining them with _SESSIONS keeps exactly the valid rows.
    """
    rest = [n for n in plans if n not in ("user_id", "ts")]
    if _keeps_values(src):
        wide = f"SELECT __n, {', '.join(f'v_{n}' for n in rest)} FROM {_CHECKED}"  # noqa: S608
    else:
        values = "".join(f", {plans[n].value} AS v_{n}" for n in rest)
        wide = f"SELECT __n{values} FROM ({src.select_sql})"  # noqa: S608
    exprs = {n: f"w.v_{n}" for n in rest}
    generated = "$base + k.__n"
    exprs.update(
        ts="k.ts",
        user_id="k.user_id",
        event_id=f"coalesce(w.v_event_id, {generated})" if "event_id" in plans else generated,
        batch_id="$batch_id",
    )
    session = "coalesce(c.session_id, k.user_id || ':' || strftime(k.__start, '%Y%m%dT%H%M%S'))"
    exprs["session_id"] = (
        f"coalesce(w.v_session_id, {session})" if "session_id" in plans else session
    )
    if event_map:
        exprs["event_type"] = _renamed_event_type("w.v_event_type", event_map, params)
    cols = ", ".join(
        f"CAST({exprs.get(c, 'NULL')} AS {t}) AS {c}" for c, t in schema.COLUMN_TYPES.items()
    )
    return (
        f"SELECT {cols}, k.__pos FROM ({wide}) w JOIN {_SESSIONS} k USING (__n)"  # noqa: S608
        f" LEFT JOIN {_CONTINUED} c ON c.user_id = k.user_id AND c.first_ts = k.__start"
    )


def _write_batch(
    con: duckdb.DuckDBPyConnection,
    src: _Source,
    new_rows: str,
    params: dict[str, Any],
    given_ids: bool,
    ignored: list[str],
    rows_read: int,
    n_ok: int,
    started: float,
    blanked: dict[int, str] | None = None,
) -> IngestReport:
    """The writes of a batch; the caller holds the transaction. A retry of an attempt that
    accepted nothing takes over its batch id: its quarantine rows are replaced by this
    attempt's, so every row of the file is accounted for once."""
    earlier = _earlier_batch(con, src.checksum)  # the caller saw no batch holding rows
    retry_of = earlier[0] if earlier else None
    if retry_of is not None:
        batch_id = retry_of
        con.execute("DELETE FROM quarantine WHERE batch_id = ?", [batch_id])
        con.execute("DELETE FROM events_runs WHERE batch_id = ?", [batch_id])
    else:
        row = _one(con.execute("SELECT coalesce(max(batch_id), 0) + 1 FROM ingest_batches"))
        batch_id = int(row[0]) if row else 1
    ids = {"batch_id": batch_id, "source": src.name}

    # Quarantine: value-level rejects with the row as JSON, then structural rejects with the
    # CSV line text. DuckDB numbers CSV records (header included); a valid row's record number
    # is its position among rows plus the header plus the broken records before it.
    if src.rejects:
        con.execute(
            f"""INSERT INTO quarantine
            WITH rj AS (SELECT line, row_number() OVER (ORDER BY line) AS j
                        FROM (SELECT DISTINCT line FROM {_REJECTS})),
                 g AS (SELECT line - $header - j AS good_before, max(j) AS k FROM rj GROUP BY 1)
            SELECT $batch_id, $source, c.__n + $header + coalesce(g.k, 0), c.reason, c.raw
            FROM {_CHECKED} c ASOF LEFT JOIN g ON c.__n > g.good_before
            WHERE c.reason IS NOT NULL ORDER BY c.__n""",  # noqa: S608
            {**ids, "header": src.header_lines},
        )
        con.execute(
            f"""INSERT INTO quarantine
            SELECT $batch_id, $source, line, {_REJECT_REASON},
                   trim(csv_line, chr(10) || chr(13))
            FROM (SELECT line, arg_min(error_type, error_type) AS error_type,
                         arg_min(csv_line, error_type) AS csv_line
                  FROM {_REJECTS} GROUP BY line)
            ORDER BY line""",  # noqa: S608
            ids,
        )
        for line, text in (blanked or {}).items():  # the blanked lines: their own reason and text
            con.execute(
                "UPDATE quarantine SET reason = ?, raw = ? WHERE batch_id = ? AND line = ?",
                [_RUNAWAY_REASON, text, batch_id, line],
            )
    else:
        con.execute(
            f"""INSERT INTO quarantine SELECT $batch_id, $source, __n, reason, raw
            FROM {_CHECKED} WHERE reason IS NOT NULL ORDER BY __n""",  # noqa: S608
            ids,
        )
    _step_done("quarantine")
    reasons = {
        str(r): int(n)
        for r, n in con.execute(
            "SELECT reason, count(*) AS n FROM quarantine WHERE batch_id = ?"
            " GROUP BY reason ORDER BY n DESC, reason",
            [batch_id],
        ).fetchall()
    }

    _insert_events(con, new_rows, params, given_ids, batch_id, n_ok)
    _step_done("events")

    seconds = time.perf_counter() - started
    if retry_of is not None:
        con.execute(
            "UPDATE ingest_batches SET source = ?, ingested_at = ?, rows_read = ?,"
            " rows_accepted = ?, rows_quarantined = ?, seconds = ? WHERE batch_id = ?",
            [
                src.name,
                _naive_utc(datetime.now(UTC)),
                rows_read,
                n_ok,
                rows_read - n_ok,
                seconds,
                batch_id,
            ],
        )
    else:
        con.execute(
            "INSERT INTO ingest_batches VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                batch_id,
                src.name,
                src.checksum,
                _naive_utc(datetime.now(UTC)),
                rows_read,
                n_ok,
                rows_read - n_ok,
                seconds,
            ],
        )
    _step_done("record")
    return IngestReport(
        batch_id,
        src.name,
        src.checksum,
        rows_read,
        n_ok,
        rows_read - n_ok,
        reasons,
        None,
        seconds,
        ignored,
    )


# The layout of `events`: one run sorted by (user_id, ts, event_id), so that zone maps let a
# per-user lookup read about one row group, plus at most a small tail of runs (each batch
# appended since the last rewrite, sorted the same way). Every lookup also scans the tail:
# at 10M events each 10k tail rows added ~0.5 ms to a lookup (measured; timeline p95 must
# stay under 20 ms), so the tail is capped in rows (_MAX_TAIL_ROWS) and runs (_MAX_RUNS).
# A batch that would exceed either rewrites the whole table as one run, as does compact().
# Small batches into a large table (an analyst's upload) thus cost the batch, not the table.
_MAX_RUNS = 8  # the sorted run plus at most 7 tail runs
_MAX_TAIL_ROWS = 20_000
_COMPACT_BELOW_ROWS = 250_000  # a table this small is rewritten anyway: ~0.3 s at most


def _insert_events(
    con: duckdb.DuckDBPyConnection,
    new_rows: str,
    params: dict[str, Any],
    given_ids: bool,
    batch_id: int,
    n_new: int,
) -> None:
    """Add the batch's valid rows to events (see _MAX_RUNS for the layout rule)."""
    if given_ids:
        # _CHECKED compared ids with events before this transaction began.
        clash = _one(
            con.execute(
                f"SELECT count(*) FROM {_CHECKED} c JOIN events e ON e.event_id = c.v_event_id"  # noqa: S608
                " WHERE c.reason IS NULL"
            )
        )
        if clash and clash[0]:
            raise IngestError("events changed while this file was validated; ingest it again")
    checked_max = (
        f"(SELECT max(v_event_id) FROM {_CHECKED} WHERE reason IS NULL)"  # noqa: S608
        if given_ids
        else "NULL"
    )
    row = _one(
        con.execute(
            "SELECT greatest((SELECT max(event_id) FROM events),"  # noqa: S608
            f" {checked_max}, 0), (SELECT count(*) FROM events),"
            " (SELECT count(*) FROM events_runs),"
            " (SELECT coalesce(sum(rows_accepted), 0) FROM ingest_batches"
            "  WHERE batch_id IN (SELECT batch_id FROM events_runs))"
        )
    )
    assert row is not None
    base, existing, tail_runs, tail_rows = (int(v) for v in row)
    bind = {"batch_id": batch_id, "base": base}
    batch = f"SELECT * EXCLUDE (__pos) FROM ({new_rows})"  # noqa: S608
    if existing and (
        existing < _COMPACT_BELOW_ROWS
        or tail_runs + 2 > _MAX_RUNS
        or tail_rows + n_new > _MAX_TAIL_ROWS
    ):
        union = f"SELECT * FROM events UNION ALL {batch}"  # noqa: S608
        _rewrite_events(con, union, {**params, **bind})
        return
    # __pos follows (user_id, ts, __n) and generated ids grow with __n, so the run lands
    # sorted by (user_id, ts, event_id).
    con.execute(f"INSERT INTO events {batch} ORDER BY __pos", _used(batch, {**params, **bind}))
    if existing:
        con.execute(
            "INSERT INTO events_runs (batch_id, appended_at) VALUES (?, ?)",
            [batch_id, _naive_utc(datetime.now(UTC))],
        )
    else:
        con.execute("DELETE FROM events_runs")


def _rewrite_events(
    con: duckdb.DuckDBPyConnection, rows: str, params: dict[str, Any] | None = None
) -> None:
    """Replace events by `rows` sorted by (user_id, ts, event_id): one run. The caller holds
    the transaction."""
    con.execute(f"DROP TABLE IF EXISTS {_SORTED}")
    sql = f"CREATE TABLE {_SORTED} AS SELECT * FROM ({rows}) ORDER BY user_id, ts, event_id"  # noqa: S608
    con.execute(sql, _used(sql, params or {}))
    con.execute("DROP TABLE events")
    con.execute(f"ALTER TABLE {_SORTED} RENAME TO events")
    con.execute("DELETE FROM events_runs")


def compact(con: duckdb.DuckDBPyConnection) -> int:
    """Rewrite events as one run sorted by (user_id, ts, event_id), in one transaction, so
    per-user lookups touch the fewest row groups; returns the number of runs there were.
    Ingest does this by itself when runs pile up; call it after many small batches or before
    a read-heavy session. A table that is already one run is left alone."""
    con.begin()
    try:
        row = _one(
            con.execute(
                "SELECT (SELECT count(*) FROM events_runs), (SELECT count(*) > 0 FROM events)"
            )
        )
        appended, nonempty = (int(row[0]), bool(row[1])) if row else (0, False)
        if appended:
            _rewrite_events(con, "SELECT * FROM events")
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return appended + 1 if nonempty else 0


# ---------------------------------------------------------------------------------------------
# Public ingest entry points


def ingest_file(
    con: duckdb.DuckDBPyConnection,
    path: str | Path,
    *,
    mapping: dict[str, str] | None = None,
    event_map: dict[str, str] | None = None,
    columns: list[str] | None = None,
    ts_unit: TsUnit = "auto",
    delimiter: str | None = None,
    decimal_comma: bool = False,
    skip_stored: bool = False,
    keep_repeats: bool = False,
) -> IngestReport:
    """Ingest a CSV (optionally .gz) or Parquet file as one batch; see the module docstring.

    `mapping` is canonical name -> source column; `columns` names the fields of a headerless
    CSV; `decimal_comma` reads prices written 12,99 or 1.234,50 (numbers stored as text).
    Re-ingesting the same bytes is a no-op reported through `duplicate_of`. Rows without
    event ids that repeat stored events exactly (an overlapping export) make the file fail
    with a message, nothing written, unless `skip_stored` (quarantine them as already
    stored) or `keep_repeats` (store them again) says what to do.
    """
    repeats = repeats_choice(skip_stored, keep_repeats)
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: file not found")
    kind, head = _detect_format(path)
    checksum = _sha256_file(path)
    if kind == "parquet":
        src = _parquet_source(con, path, checksum)
    else:
        src = _csv_source(path, head, checksum, columns, delimiter)
    resolved, ignored = _resolve_columns(src.columns, mapping, path.name)
    return _run_batch(con, src, resolved, ignored, event_map, ts_unit, decimal_comma, repeats)


def _parquet_source(con: duckdb.DuckDBPyConnection, path: Path, checksum: str) -> _Source:
    try:
        desc = con.execute("SELECT * FROM read_parquet(?) LIMIT 0", [str(path)]).description
    except duckdb.Error as exc:
        raise IngestError(f"{path.name}: cannot read Parquet: {_first_line(exc)}") from exc
    names = [d[0] for d in desc]
    types = {d[0]: str(d[1]) for d in desc}
    select = ", ".join(f"{_ident(n)} AS __s{i}" for i, n in enumerate(names))
    return _Source(
        str(path),
        checksum,
        # file_row_number keeps the scan parallel (row_number() OVER () would serialise it).
        f"SELECT file_row_number + 1 AS __n, {select}"  # noqa: S608
        " FROM read_parquet($path, file_row_number = true)",
        {"path": str(path)},
        names,
        types,
        rejects=False,
        header_lines=0,
    )


def _csv_source(
    path: Path, head: bytes, checksum: str, columns: list[str] | None, delimiter: str | None
) -> _Source:
    if b"\r" in head and b"\n" not in head:
        raise IngestError(
            f"{path.name}: lines end in CR only (classic Mac text); save it with LF or CRLF "
            "line endings and ingest again"
        )
    first = _first_line_text(head)
    if not first.strip():
        raise IngestError(f"{path.name}: no rows (the first line is empty)")
    if delimiter is None:
        stem = path.name.lower().removesuffix(".gz")
        delimiter = (
            "\t"
            if stem.endswith((".tsv", ".tab"))
            else _sniff_delimiter(first, len(columns) if columns else None)
        )
    if len(delimiter) != 1:
        raise IngestError(f"delimiter must be one character, got {delimiter!r}")
    fields = _split_line(first, delimiter)
    if columns is not None:
        names = _unique_names(columns)
        if len(fields) != len(names):
            raise IngestError(
                f"{path.name}: columns= gives {len(names)} names ({', '.join(names)}) but the "
                f"first line has {len(fields)} fields with delimiter {delimiter!r}"
            )
        header = False
    else:
        if looks_like_data(fields):
            raise IngestError(
                f"{path.name}: the first line looks like data, not a header "
                f"({', '.join(f.strip() for f in fields[:6])}{', …' if len(fields) > 6 else ''}):"
                " read as a header it would be lost. Name the columns instead: CLI --no-header"
                f" --columns {','.join(f'col{i + 1}' for i in range(len(fields)))} with the"
                " names that fit (user_id, ts, event_type, ...); on the Data & model page tick"
                " 'The file has no header row'"
            )
        names = _unique_names(fields)
        header = True
    params = {
        "path": str(path),
        "delim": delimiter,
        "header": header,
        "cols": {f"__s{i}": "VARCHAR" for i in range(len(names))},
    }
    # auto_detect off: DuckDB's sniffer guesses wrong on files with broken lines, and every
    # dialect choice is fixed above anyway. strict_mode sends malformed lines to the rejects
    # (the staged re-read skips the same lines). The rows are numbered by rowid after the
    # read; see _run_batch.
    read = (
        "read_csv($path, auto_detect = false, delim = $delim, quote = '\"', escape = '\"',"
        " header = $header, columns = $cols, strict_mode = true"
    )
    types = dict.fromkeys(names, "VARCHAR")
    return _Source(
        str(path),
        checksum,
        f"SELECT rowid - $rowid0 + 1 AS __n, * FROM {_STAGE}",  # noqa: S608
        params,
        names,
        types,
        rejects=True,
        header_lines=1 if header else 0,
        direct_sql=(
            f"SELECT CAST(NULL AS BIGINT) AS __n, * FROM {read}, store_rejects = true,"  # noqa: S608
            f" rejects_table = '{_REJECTS}', rejects_scan = '{_REJECT_SCANS}')"
        ),
        # store_rejects again, into other tables: plain ignore_errors skips other lines (an
        # unterminated quote swallows the rest of the file), which would shift the numbering.
        stage_sql=(
            f"CREATE TEMP TABLE {_STAGE} AS SELECT * FROM {read}, store_rejects = true,"  # noqa: S608
            f" rejects_table = '{_REJECTS_AGAIN}', rejects_scan = '{_REJECT_SCANS_AGAIN}')"
        ),
    )


class _HashSink:
    """File-like object that hashes what Arrow writes to it instead of keeping it."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.closed = False

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _arrow_checksum(table: pa.Table) -> str:
    """sha256 of the table's content as Arrow IPC, independent of chunking and of schema
    metadata (pandas stores its index and version there)."""
    table = table.replace_schema_metadata(None).combine_chunks()
    sink = _HashSink()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
        writer.write_table(table, max_chunksize=1 << 16)
    return sink.digest.hexdigest()


def ingest_dataframe(
    con: duckdb.DuckDBPyConnection,
    df: pd.DataFrame | pa.Table,
    *,
    source: str,
    mapping: dict[str, str] | None = None,
    event_map: dict[str, str] | None = None,
    ts_unit: TsUnit = "auto",
    skip_stored: bool = False,
    keep_repeats: bool = False,
) -> IngestReport:
    """Ingest an in-memory frame as one batch, with the same rules as `ingest_file`."""
    repeats = repeats_choice(skip_stored, keep_repeats)
    if isinstance(df, pd.DataFrame):
        frame = df.copy(deep=False)
        frame.columns = [str(c) for c in frame.columns]
        try:
            table = pa.Table.from_pandas(frame, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise IngestError(f"{source}: cannot convert the frame: {_first_line(exc)}") from exc
    elif isinstance(df, pa.Table):
        table = df
    else:
        raise IngestError(f"{source}: expected a pandas DataFrame or pyarrow Table")
    names = [str(n) for n in table.column_names]
    if len(set(names)) != len(names) or _ORDINAL in names:
        raise IngestError(f"{source}: duplicate or reserved column names: {', '.join(names)}")
    if table.num_rows == 0:
        raise IngestError(f"{source}: no rows")
    resolved, ignored = _resolve_columns(names, mapping, source)
    checksum = _arrow_checksum(table)
    # An ordinal column keeps the scan parallel (row_number() OVER () would serialise it).
    table = table.append_column(_ORDINAL, pa.array(np.arange(1, table.num_rows + 1)))
    view = f"__fl_df_{uuid.uuid4().hex}"
    con.register(view, table)
    try:
        desc = con.execute(f"SELECT * FROM {view} LIMIT 0").description  # noqa: S608
        types = {d[0]: str(d[1]) for d in desc}
        select = ", ".join(f"{_ident(n)} AS __s{i}" for i, n in enumerate(names))
        src = _Source(
            source,
            checksum,
            f"SELECT {_ORDINAL} AS __n, {select} FROM {view}",  # noqa: S608
            {},
            names,
            types,
            rejects=False,
            header_lines=0,
        )
        return _run_batch(con, src, resolved, ignored, event_map, ts_unit, repeats=repeats)
    finally:
        con.unregister(view)


def write_truth(
    con: duckdb.DuckDBPyConnection, truth_users: pd.DataFrame, truth_events: pd.DataFrame
) -> None:
    """Replace the simulator ground truth (truth_users, truth_events) in one transaction."""
    need = {
        "truth_users": ("user_id", "typology"),
        "truth_events": ("event_id", "user_id", "typology"),
    }
    frames = {"truth_users": truth_users, "truth_events": truth_events}
    for table, cols in need.items():
        missing = [c for c in cols if c not in frames[table].columns]
        if missing:
            raise StoreError(f"{table} is missing column(s) {', '.join(missing)}")
    con.begin()
    try:
        for table, cols in need.items():
            view = f"__fl_{table}_{uuid.uuid4().hex}"
            con.register(view, frames[table][list(cols)])
            try:
                con.execute(f"DELETE FROM {table}")  # noqa: S608
                con.execute(f"INSERT INTO {table} SELECT {', '.join(cols)} FROM {view}")  # noqa: S608
            finally:
                con.unregister(view)
        con.commit()
    except BaseException:
        con.rollback()
        raise


# ---------------------------------------------------------------------------------------------
# Queries


def _naive_utc(value: datetime | None) -> datetime | None:
    return None if value is None else schema.naive_utc(value)


def _time_filter(start: datetime | None, end: datetime | None) -> tuple[str, list[Any]]:
    """Half-open [start, end) filter on ts, as SQL text plus its parameters."""
    clauses, params = [], []
    if start is not None:
        clauses.append("ts >= ?")
        params.append(_naive_utc(start))
    if end is not None:
        clauses.append("ts < ?")
        params.append(_naive_utc(end))
    return "".join(f" AND {c}" for c in clauses), params


@dataclass
class DatasetSummary:
    n_events: int
    n_users: int
    n_sessions: int
    first_ts: datetime | None
    last_ts: datetime | None
    event_type_counts: dict[str, int]
    n_batches: int
    n_quarantined: int
    fraud_share: float | None
    typology_counts: dict[str, int]
    # Users by their current analyst label (fraud / legit / unsure): real data has no ground
    # truth, and these are what the supervised models learn from.
    label_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("first_ts", "last_ts"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


def dataset_summary(con: duckdb.DuckDBPyConnection) -> DatasetSummary:
    """Counts for the data page. fraud_share = users with a fraud typology in truth_users
    (typology not empty and not 'normal') over all users; None without ground truth."""
    row = _one(
        con.execute(
            "SELECT count(*), count(DISTINCT user_id), count(DISTINCT session_id), min(ts), max(ts)"
            " FROM events"
        )
    )
    assert row is not None
    types = con.execute(
        "SELECT event_type, count(*) AS n FROM events GROUP BY 1 ORDER BY n DESC, 1"
    ).fetchall()
    batches = _one(con.execute("SELECT count(*) FROM ingest_batches"))
    quarantined = _one(con.execute("SELECT count(*) FROM quarantine"))
    typologies = con.execute(
        "SELECT typology, count(DISTINCT user_id) AS n FROM truth_users"
        " WHERE typology IS NOT NULL AND typology NOT IN ('', 'normal')"
        " GROUP BY 1 ORDER BY n DESC, 1"
    ).fetchall()
    truth_rows = _one(con.execute("SELECT count(*) FROM truth_users"))
    fraud_share: float | None = None
    if truth_rows and truth_rows[0]:
        fraud = _one(
            con.execute(
                "SELECT count(DISTINCT user_id) FROM truth_users"
                " WHERE typology IS NOT NULL AND typology NOT IN ('', 'normal')"
            )
        )
        n_users = int(row[1]) or int(truth_rows[0])
        fraud_share = (int(fraud[0]) if fraud else 0) / n_users
    return DatasetSummary(
        n_events=int(row[0]),
        n_users=int(row[1]),
        n_sessions=int(row[2]),
        first_ts=row[3],
        last_ts=row[4],
        event_type_counts={str(t): int(n) for t, n in types},
        n_batches=int(batches[0]) if batches else 0,
        n_quarantined=int(quarantined[0]) if quarantined else 0,
        fraud_share=fraud_share,
        typology_counts={str(t): int(n) for t, n in typologies},
        label_counts={
            str(label): int(n)
            for label, n in con.execute(
                "SELECT label, count(*) FROM (SELECT arg_max(label, created_at) AS label"
                " FROM labels GROUP BY user_id) GROUP BY 1 ORDER BY 2 DESC, 1"
            ).fetchall()
        },
    )


_EVENT_SELECT = ", ".join(schema.COLUMN_NAMES)


def user_events(
    con: duckdb.DuckDBPyConnection,
    user_id: str,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """One user's events in [start, end), sorted by ts (then event_id)."""
    where, params = _time_filter(start, end)
    return con.execute(
        f"SELECT {_EVENT_SELECT} FROM events WHERE user_id = ?{where}"  # noqa: S608
        " ORDER BY ts, event_id",
        [user_id, *params],
    ).df()


def active_users(
    con: duckdb.DuckDBPyConnection,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    min_events: int = 1,
    limit: int | None = None,
) -> pd.DataFrame:
    """Users with at least `min_events` events in [start, end), most active first."""
    where, params = _time_filter(start, end)
    sql = (
        "SELECT user_id, count(*) AS n_events, count(DISTINCT session_id) AS n_sessions,"  # noqa: S608
        f" min(ts) AS first_ts, max(ts) AS last_ts FROM events WHERE TRUE{where}"
        " GROUP BY user_id HAVING count(*) >= ? ORDER BY n_events DESC, user_id"
    )
    params.append(int(min_events))
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return con.execute(sql, params).df()


def shared_entities(con: duckdb.DuckDBPyConnection, user_id: str) -> pd.DataFrame:
    """Devices, IPs and cards this user shares with other users, with those users' event
    counts on the shared value."""
    parts, params = [], []
    for col in schema.ENTITY_COLUMNS:  # identifiers from the fixed schema list
        parts.append(
            f"SELECT '{col}' AS entity_type, {col} AS entity_value, user_id AS other_user_id,"  # noqa: S608
            f" count(*) AS other_events FROM events WHERE user_id <> ? AND {col} IN"
            f" (SELECT {col} FROM events WHERE user_id = ? AND {col} IS NOT NULL)"
            " GROUP BY ALL"
        )
        params += [user_id, user_id]
    sql = (
        " UNION ALL ".join(parts)
        + " ORDER BY entity_type, entity_value, other_events DESC, other_user_id"
    )
    return con.execute(sql, params).df()


# ---------------------------------------------------------------------------------------------
# CLI / page argument parsing


def parse_mapping(items: list[str]) -> dict[str, str]:
    """["ts=timestamp", "user_id=visitorid"] -> {"ts": "timestamp", "user_id": "visitorid"}."""
    settable = [c for c in schema.COLUMN_NAMES if c != "batch_id"]
    out: dict[str, str] = {}
    for item in items:
        canon, sep, source = (part.strip() for part in item.partition("="))
        if not sep or not canon or not source:
            raise StoreError(f"bad mapping {item!r}: expected COLUMN=SOURCE, e.g. ts=timestamp")
        if canon not in settable:
            raise StoreError(
                f"bad mapping {item!r}: {canon!r} is not a column; known: {', '.join(settable)}"
            )
        if canon in out:
            raise StoreError(f"bad mapping: {canon!r} is mapped twice")
        out[canon] = source
    return out


def parse_event_map(text: str) -> dict[str, str]:
    """ "pv=view,buy=purchase" -> {"pv": "view", "buy": "purchase"}."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        src, sep, dst = (part.strip() for part in item.partition("="))
        if not sep or not src or not dst:
            raise StoreError(f"bad event map entry {item.strip()!r}: expected SOURCE=EVENT_TYPE")
        out[src] = dst
    return out


__all__ = [
    "DatasetSummary",
    "IngestError",
    "IngestReport",
    "StoreError",
    "StoreLockedError",
    "active_users",
    "compact",
    "connect",
    "dataset_summary",
    "ingest_dataframe",
    "ingest_file",
    "migrate",
    "parse_event_map",
    "parse_mapping",
    "shared_entities",
    "user_events",
    "write_truth",
]
