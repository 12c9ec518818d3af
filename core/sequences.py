"""Events -> model inputs: per-event categorical fields, per-user windows, length-bucketed batches.

Everything here is vectorised (pandas / numpy / DuckDB); there is no per-event Python loop, so a
few million events featurise in seconds. Featurisation is per user: a caller can stream users in
chunks (never splitting one user across chunks) and get exactly the tokens of one big call.

Index convention for every field: 0 = padding, 1 = absent (column missing or value null),
2 = unknown / out of vocabulary, 3.. = real values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from core.schema import COLUMN_NAMES, naive_utc

PAD, ABSENT, UNK, FIRST_REAL = 0, 1, 2, 3

EventsT = TypeVar("EventsT", pa.Table, pd.DataFrame)

FIELDS: tuple[str, ...] = (
    "event_type",
    "category",
    "price",
    "gap",
    "hour",
    "new_device",
    "new_ip",
    "new_country",
    "new_card",
    "device_accounts",
    "card_accounts",
)

# The event column each "new_*" flag watches: the flag is on when the value is the first of its
# kind for this user.
NEW_VALUE_FIELDS: dict[str, str] = {
    "new_device": "device_id",
    "new_ip": "ip",
    "new_country": "country",
    "new_card": "payment_id",
}

# The entity each "*_accounts" field watches: how many *other* accounts had used this device /
# card before this event (bucketed). An entity shared across accounts is the mark of
# multi-accounting (rings, farms, a stolen card on many accounts) that a per-user sequence
# cannot see otherwise. IP addresses are left out on purpose: carrier NAT, offices and VPN exits
# put many honest accounts behind one address, so a count of accounts per IP says little.
SHARED_ENTITY_FIELDS: dict[str, str] = {
    "device_accounts": "device_id",
    "card_accounts": "payment_id",
}
# Column that carries the count of other accounts in a loaded table (see add_accounts_before).
ACCOUNTS_BEFORE_SUFFIX = "__accounts_before"
# Bucket i holds counts in [edge[i-1], edge[i]): 0, 1, 2-3, 4-7, 8-15, 16+.
ACCOUNTS_EDGES: tuple[int, ...] = (1, 2, 4, 8, 16)

# Which event column each field is read from (explanations name the column an analyst knows).
FIELD_SOURCES: dict[str, str] = {
    "event_type": "event_type",
    "category": "category",
    "price": "price",
    "gap": "ts",
    "hour": "ts",
    **NEW_VALUE_FIELDS,
    **SHARED_ENTITY_FIELDS,
}

# The columns featurisation reads; load_events selects only these by default.
SEQUENCE_COLUMNS: tuple[str, ...] = tuple(
    c for c in COLUMN_NAMES if c in {"event_id", "user_id", *FIELD_SOURCES.values()}
)
_COUNT_COLUMNS: tuple[str, ...] = tuple(
    c + ACCOUNTS_BEFORE_SUFFIX for c in SHARED_ENTITY_FIELDS.values()
)

# Gap buckets are fixed (not fitted) so that a gap token means the same thing in every model:
# doubling edges from 1 s to 2^21 s (~24 days), then 30 days. Bucket i covers [edge[i-1], edge[i]).
GAP_EDGES_S: tuple[float, ...] = (*(float(2**k) for k in range(22)), 30.0 * 86400.0)
GAP_FIRST = FIRST_REAL  # the user's first event has no previous event: its own token
GAP_BUCKET0 = FIRST_REAL + 1

FLAG_SEEN, FLAG_NEW = FIRST_REAL, FIRST_REAL + 1
_FIRST_FLAG = FIELDS.index("new_device")
_FIRST_SHARED = _FIRST_FLAG + len(NEW_VALUE_FIELDS)
if FIELDS[_FIRST_FLAG:] != (*NEW_VALUE_FIELDS, *SHARED_ENTITY_FIELDS):
    raise AssertionError("FIELDS must end with the NEW_VALUE_FIELDS then SHARED_ENTITY_FIELDS")

# 2: the device_accounts / card_accounts fields.
_FORMAT_VERSION = 2
_FILE_NAME = "featurizer.json"


@dataclass
class EncodedEvents:
    """One row per event; each user's events are contiguous and time-sorted."""

    fields: np.ndarray  # int32 [n_events, n_fields]
    user_ids: np.ndarray  # object [n_users]
    offsets: np.ndarray  # int64 [n_users + 1]: user i is rows offsets[i]:offsets[i + 1]
    event_ids: np.ndarray  # int64 [n_events]
    ts: np.ndarray  # datetime64[us] [n_events], UTC

    @property
    def n_events(self) -> int:
        return int(self.fields.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Windows:
    """Fixed-length windows over users; every position maps back to its event id.

    Users longer than max_len are cut into overlapping windows. ``primary`` marks, for every
    event, the one window that should report it: the earliest window holding it, where it has
    the most preceding context. Each event is primary exactly once.
    """

    fields: np.ndarray  # int32 [n_windows, max_len, n_fields], 0-padded on the right
    mask: np.ndarray  # bool [n_windows, max_len]
    event_ids: np.ndarray  # int64 [n_windows, max_len], -1 at padding
    user_index: np.ndarray  # int64 [n_windows] -> EncodedEvents.user_ids
    start: np.ndarray  # int64 [n_windows], first event's offset within its user
    primary: np.ndarray  # bool [n_windows, max_len]

    def __len__(self) -> int:
        return int(self.fields.shape[0])

    def lengths(self) -> np.ndarray:
        return self.mask.sum(axis=1)


class WindowBatch(NamedTuple):
    index: np.ndarray  # int64 [b]: rows of the Windows this batch holds
    fields: np.ndarray  # int32 [b, l, n_fields], l = longest window in the batch
    mask: np.ndarray  # bool [b, l]
    event_ids: np.ndarray  # int64 [b, l]
    primary: np.ndarray  # bool [b, l]


def _ranked_vocabulary(values: pd.Series, limit: int) -> list[str]:
    """Most frequent first; ties broken by value so a refit on the same data is identical."""
    counts = values.dropna().astype(str).value_counts()
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [str(v) for v, _ in order[:limit]]


def _lookup(values: pd.Series, vocabulary: Sequence[str]) -> np.ndarray:
    absent = values.isna().to_numpy()
    idx = pd.Index(list(vocabulary), dtype=object).get_indexer(values.astype(str).to_numpy(object))
    out = np.where(idx < 0, UNK, idx + FIRST_REAL)
    out[absent] = ABSENT
    return out


def _utc_naive(ts: pd.Series) -> np.ndarray:
    """Timestamps as naive UTC datetime64[us] (naive input is taken as UTC, as in the store)."""
    if not pd.api.types.is_datetime64_any_dtype(ts):
        ts = pd.to_datetime(ts, utc=True)
    if isinstance(ts.dtype, pd.DatetimeTZDtype):
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    return ts.to_numpy().astype("datetime64[us]")


def _as_frame(events: pd.DataFrame | pa.Table) -> pd.DataFrame:
    """Only the columns featurisation reads, so sorting does not copy text and the like."""
    keep = {*SEQUENCE_COLUMNS, *_COUNT_COLUMNS}
    if isinstance(events, pa.Table):
        return events.select([c for c in events.column_names if c in keep]).to_pandas()
    return events[[c for c in events.columns if c in keep]]


class SequenceFeaturizer:
    """Turns events into per-event field indices; vocabularies are fitted on training data.

    Fitted attributes (trailing underscore) exist only after ``fit``: ``event_types_``,
    ``categories_``, ``price_edges_`` (on log1p(price)).
    """

    def __init__(
        self, category_top_k: int = 64, price_buckets: int = 16, max_event_types: int = 512
    ) -> None:
        if category_top_k < 0 or price_buckets < 1 or max_event_types < 1:
            raise ValueError("category_top_k >= 0, price_buckets >= 1, max_event_types >= 1")
        self.category_top_k = category_top_k
        self.price_buckets = price_buckets
        self.max_event_types = max_event_types
        self.gap_edges_s: tuple[float, ...] = GAP_EDGES_S
        self.event_types_: list[str]
        self.categories_: list[str]
        self.price_edges_: list[float]

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, events: pd.DataFrame | pa.Table) -> SequenceFeaturizer:
        df = _as_frame(events)
        if "event_type" not in df.columns:
            raise ValueError("events need an 'event_type' column to fit the featurizer")
        self.event_types_ = _ranked_vocabulary(df["event_type"], self.max_event_types)
        self.categories_ = (
            _ranked_vocabulary(df["category"], self.category_top_k)
            if "category" in df.columns
            else []
        )
        self.price_edges_ = []
        if "price" in df.columns:
            price = pd.to_numeric(df["price"], errors="coerce").to_numpy(
                np.float64, na_value=np.nan
            )
            price = price[np.isfinite(price) & (price >= 0)]
            if price.size:
                qs = np.linspace(0.0, 1.0, self.price_buckets + 1)[1:-1]
                self.price_edges_ = np.unique(np.quantile(np.log1p(price), qs)).tolist()
        return self

    def is_fitted(self) -> bool:
        return hasattr(self, "event_types_")

    def _check_fitted(self) -> None:
        if not self.is_fitted():
            raise RuntimeError("SequenceFeaturizer is not fitted: call fit() or load() first")

    def vocab_sizes(self) -> dict[str, int]:
        """Embedding table size per field, special indices included."""
        self._check_fitted()
        flag = FLAG_NEW + 1
        return {
            "event_type": FIRST_REAL + len(self.event_types_),
            "category": FIRST_REAL + len(self.categories_),
            "price": FIRST_REAL + len(self.price_edges_) + 1,
            "gap": GAP_BUCKET0 + len(self.gap_edges_s) + 1,
            "hour": FIRST_REAL + 24,
            **{name: flag for name in NEW_VALUE_FIELDS},
            **{name: FIRST_REAL + len(ACCOUNTS_EDGES) + 1 for name in SHARED_ENTITY_FIELDS},
        }

    # -- transforming ------------------------------------------------------------------------
    def transform(self, events: pd.DataFrame | pa.Table) -> EncodedEvents:
        """Encode events; sorts by (user_id, ts, event_id) unless already in that order.

        Flags and gaps look only at the events given: pass a user's whole history (or accept
        that a device first seen before the window counts as new). The shared-entity fields
        read the ``<column>__accounts_before`` counts that load_events adds from the whole
        database; without them, the other accounts are counted among the events given.
        """
        self._check_fitted()
        df = _as_frame(events)
        missing = [c for c in ("user_id", "ts", "event_type") if c not in df.columns]
        if missing:
            raise ValueError(f"events are missing required column(s): {', '.join(missing)}")
        n = len(df)
        if df["user_id"].isna().any():
            raise ValueError("user_id must not be null")
        if "event_id" in df.columns:
            if df["event_id"].isna().any():
                raise ValueError("event_id must not be null (leave the column out to number rows)")
            event_ids = df["event_id"].to_numpy(np.int64)
        else:
            event_ids = np.arange(n, dtype=np.int64)
        ts = _utc_naive(df["ts"])
        ts_us = ts.view(np.int64)
        user_codes, user_uniques = pd.factorize(df["user_id"].astype(str), sort=True)

        order = _sort_order(user_codes, ts_us, event_ids)
        if order is not None:
            df = df.iloc[order].reset_index(drop=True)
            event_ids, ts, ts_us, user_codes = (
                event_ids[order],
                ts[order],
                ts_us[order],
                user_codes[order],
            )

        user_start = np.ones(n, dtype=bool)
        user_start[1:] = user_codes[1:] != user_codes[:-1]
        starts = np.flatnonzero(user_start)
        offsets = np.append(starts, n).astype(np.int64)
        user_ids = np.asarray(user_uniques, dtype=object)[user_codes[starts]]

        out = np.empty((n, len(FIELDS)), dtype=np.int32)
        out[:, 0] = _lookup(df["event_type"], self.event_types_)
        out[:, 1] = (
            _lookup(df["category"], self.categories_) if "category" in df.columns else ABSENT
        )
        out[:, 2] = self._price_tokens(df)
        out[:, 3], out[:, 4] = self._time_tokens(ts, ts_us, user_start)
        for j, column in enumerate(NEW_VALUE_FIELDS.values(), start=_FIRST_FLAG):
            out[:, j] = _new_value_flags(user_codes, df[column]) if column in df.columns else ABSENT
        for j, column in enumerate(SHARED_ENTITY_FIELDS.values(), start=_FIRST_SHARED):
            counts = df.get(column + ACCOUNTS_BEFORE_SUFFIX)
            if counts is None and column in df.columns:
                counts = pd.Series(_accounts_before_in_frame(user_codes, ts_us, df[column]))
            out[:, j] = ABSENT if counts is None else _accounts_tokens(counts)
        return EncodedEvents(
            fields=out, user_ids=user_ids, offsets=offsets, event_ids=event_ids, ts=ts
        )

    def _price_tokens(self, df: pd.DataFrame) -> np.ndarray | int:
        if "price" not in df.columns:
            return ABSENT
        price = pd.to_numeric(df["price"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        absent = np.isnan(price)
        bad = ~absent & ~(np.isfinite(price) & (price >= 0))
        with np.errstate(invalid="ignore"):
            logp = np.log1p(np.where(bad | absent, 0.0, price))
        tok = FIRST_REAL + np.searchsorted(np.asarray(self.price_edges_), logp, side="right")
        tok[bad] = UNK
        tok[absent] = ABSENT
        return tok

    def _time_tokens(
        self, ts: np.ndarray, ts_us: np.ndarray, user_start: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        nat = np.isnat(ts)
        gap_s = np.zeros(ts.shape[0], dtype=np.float64)
        gap_s[1:] = np.diff(ts_us) / 1e6
        gap = GAP_BUCKET0 + np.searchsorted(np.asarray(self.gap_edges_s), gap_s, side="right")
        gap[user_start] = GAP_FIRST
        # A missing time makes its own gap and the next one unknowable.
        after_nat = np.zeros_like(nat)
        after_nat[1:] = nat[:-1]
        gap[nat | after_nat] = ABSENT
        hour = FIRST_REAL + (ts_us // 3_600_000_000) % 24
        hour[nat] = ABSENT
        return gap, hour

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "format_version": _FORMAT_VERSION,
            "fields": list(FIELDS),
            "category_top_k": self.category_top_k,
            "price_buckets": self.price_buckets,
            "max_event_types": self.max_event_types,
            "vocab_sizes": self.vocab_sizes(),
            "event_types": self.event_types_,
            "categories": self.categories_,
            "price_edges_log1p": self.price_edges_,
            "gap_edges_s": list(self.gap_edges_s),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SequenceFeaturizer:
        if d.get("format_version") != _FORMAT_VERSION or tuple(d.get("fields", ())) != FIELDS:
            raise ValueError(
                f"featurizer file has format {d.get('format_version')} / fields "
                f"{d.get('fields')}; this code reads format {_FORMAT_VERSION} with {list(FIELDS)}"
            )
        f = cls(d["category_top_k"], d["price_buckets"], d["max_event_types"])
        f.event_types_ = [str(v) for v in d["event_types"]]
        f.categories_ = [str(v) for v in d["categories"]]
        f.price_edges_ = [float(v) for v in d["price_edges_log1p"]]
        f.gap_edges_s = tuple(float(v) for v in d["gap_edges_s"])
        return f

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        (directory / _FILE_NAME).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> SequenceFeaturizer:
        path = Path(directory) / _FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {_FILE_NAME} in {directory}")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    # -- reading tokens back -----------------------------------------------------------------
    def token_label(self, field: str, index: int) -> str:
        """A human-readable name for one field value (for explanations and tables)."""
        self._check_fitted()
        if field not in FIELDS:
            raise KeyError(field)
        if index in (PAD, ABSENT, UNK):
            return ("<pad>", "<absent>", "<unknown>")[index]
        i = index - FIRST_REAL
        if field == "event_type":
            return self.event_types_[i]
        if field == "category":
            return self.categories_[i]
        if field == "price":
            edges = [0.0, *np.expm1(self.price_edges_).tolist(), float("inf")]
            return f"{edges[i]:.2f}–{edges[i + 1]:.2f}"
        if field == "gap":
            if index == GAP_FIRST:
                return "first event"
            edges = [0.0, *self.gap_edges_s, float("inf")]
            j = index - GAP_BUCKET0
            return f"{_fmt_seconds(edges[j])}–{_fmt_seconds(edges[j + 1])}"
        if field == "hour":
            return f"{i:02d}h UTC"
        if field in SHARED_ENTITY_FIELDS:
            edges = [0, *ACCOUNTS_EDGES]
            lo = edges[i]
            hi = edges[i + 1] - 1 if i + 1 < len(edges) else None
            many = "other account" if lo == 1 and hi == 1 else "other accounts"
            span = f"{lo}" if hi == lo else (f"{lo}–{hi}" if hi is not None else f"{lo}+")
            return f"{span} {many} before"
        return "new" if index == FLAG_NEW else "seen before"


def _fmt_seconds(s: float) -> str:
    if s == float("inf"):
        return "∞"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if s >= 2 * size:
            return f"{s / size:.3g} {unit}"
    return f"{s:.3g} s"


def _sort_order(
    user_codes: np.ndarray, ts_us: np.ndarray, event_ids: np.ndarray
) -> np.ndarray | None:
    """The permutation into (user, ts, event_id) order, or None when already sorted."""
    if user_codes.size < 2:
        return None
    du, dt, de = np.diff(user_codes), np.diff(ts_us), np.diff(event_ids)
    if np.all((du > 0) | ((du == 0) & ((dt > 0) | ((dt == 0) & (de >= 0))))):
        return None
    return np.lexsort((event_ids, ts_us, user_codes))


def _new_value_flags(user_codes: np.ndarray, values: pd.Series) -> np.ndarray:
    """FLAG_NEW where a value is the user's first of its kind (rows already in time order)."""
    absent = values.isna().to_numpy()
    seen = pd.DataFrame({"u": user_codes, "v": values.to_numpy()}).duplicated().to_numpy()
    out = np.where(seen, FLAG_SEEN, FLAG_NEW)
    out[absent] = ABSENT
    return out


def _accounts_tokens(counts: pd.Series) -> np.ndarray:
    values = pd.to_numeric(counts, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    absent = np.isnan(values)
    tok = FIRST_REAL + np.searchsorted(
        np.asarray(ACCOUNTS_EDGES, dtype=np.float64), np.where(absent, 0.0, values), side="right"
    )
    tok[absent] = ABSENT
    return tok


# Per (entity, account): when the account first used it; then, per event, how many accounts had
# first used its entity strictly before it (an as-of join on the running count of accounts), less
# the event's own account when that one came earlier. Written in SQL because DuckDB's ASOF join
# does in one pass what pandas would need a per-entity loop for.
_ACCOUNTS_BEFORE_SQL = """
pairs AS (
    SELECT entity, user_id, min(ts) AS t0 FROM population WHERE entity IS NOT NULL GROUP BY ALL
), running AS (
    SELECT entity, t0, max(n) AS n FROM (
        SELECT entity, t0, count(*) OVER (PARTITION BY entity ORDER BY t0) AS n FROM pairs
    ) GROUP BY ALL
)
SELECT CASE WHEN s.entity IS NULL THEN NULL
            ELSE coalesce(r.n, 0) - CASE WHEN p.t0 < s.ts THEN 1 ELSE 0 END END AS n
FROM sel s
ASOF LEFT JOIN running r ON s.entity = r.entity AND s.ts > r.t0
LEFT JOIN pairs p ON p.entity = s.entity AND p.user_id = s.user_id
ORDER BY s.row
"""


def _count_accounts_before(
    con: duckdb.DuckDBPyConnection, sel: pa.Table, population: str
) -> np.ndarray:
    """Counts for the rows of ``sel`` (user_id, ts, entity), in their order; NaN where the
    entity is missing. ``population``: SQL giving (user_id, ts, entity) of every account."""
    sel = sel.append_column("row", pa.array(np.arange(sel.num_rows, dtype=np.int64)))
    sql = f"WITH population AS ({population}), {_ACCOUNTS_BEFORE_SQL}"
    out = con.from_arrow(sel).query("sel", sql).fetchnumpy()["n"]
    return np.asarray(pd.array(out, dtype="Float64").to_numpy(np.float64, na_value=np.nan))


def _accounts_before_in_frame(
    user_codes: np.ndarray, ts_us: np.ndarray, values: pd.Series
) -> np.ndarray:
    """For each event, how many other accounts among these rows used its value strictly earlier
    (NaN where the value is missing): the events given are taken as the whole population."""
    entity = values.astype("string").to_numpy(object, na_value=None)
    sel = pa.table(
        {
            "user_id": pa.array(user_codes.astype(np.int64)),
            "ts": pa.array(ts_us.astype(np.int64)),
            "entity": pa.array(entity, pa.string()),
        }
    )
    with duckdb.connect() as con:
        return _count_accounts_before(con, sel, "SELECT user_id, ts, entity FROM sel")


def add_accounts_before(con: duckdb.DuckDBPyConnection, events: EventsT) -> EventsT:
    """``events`` (loaded from ``con``'s events table; Arrow or pandas) with, per shared-entity
    column present, ``<column>__accounts_before``: how many other accounts in the whole
    database had used the event's device / card before it. Every account counts, not just the
    ones loaded."""
    is_table = isinstance(events, pa.Table)
    names = set(events.column_names if is_table else events.columns)
    if not {"user_id", "ts"} <= names:
        return events
    for column in SHARED_ENTITY_FIELDS.values():
        name = column + ACCOUNTS_BEFORE_SUFFIX
        if column not in names or name in names:
            continue
        part = (
            events
            if is_table
            else pa.Table.from_pandas(events[["user_id", "ts", column]], preserve_index=False)
        )
        sel = pa.table(
            {
                "user_id": part.column("user_id").cast(pa.string()),
                "ts": part.column("ts"),
                "entity": part.column(column).cast(pa.string()),
            }
        )
        # Identifiers from SHARED_ENTITY_FIELDS (a fixed list); only entities loaded are read.
        # Cast: a table built outside the ingest may hold numeric ids.
        population = (
            f"SELECT CAST(user_id AS VARCHAR) AS user_id, ts, CAST({column} AS VARCHAR) AS entity"  # noqa: S608
            f" FROM events WHERE CAST({column} AS VARCHAR) IN (SELECT entity FROM sel)"
        )
        counts = _count_accounts_before(con, sel, population)
        if is_table:
            events = events.append_column(name, pa.array(counts, pa.float64(), from_pandas=True))
        else:
            events = events.assign(**{name: counts})
    return events


# -- windows -------------------------------------------------------------------------------------
def make_windows(encoded: EncodedEvents, max_len: int = 256, stride: int | None = None) -> Windows:
    """Cut users into windows of at most max_len events (vectorised, no per-user loop).

    A user of n <= max_len events is one window. Longer users get windows starting every
    ``stride`` events (default max_len // 2); the last window is aligned to the user's end, so
    every event appears and all windows of a long user are full.
    """
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    stride = max(1, max_len // 2) if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in 1..max_len, got {stride}")
    lengths = encoded.lengths()
    lengths = np.asarray(lengths, dtype=np.int64)
    excess = np.maximum(lengths - max_len, 0)
    per_user = np.where(excess > 0, -(-excess // stride) + 1, 1)
    per_user[lengths == 0] = 0
    user_index = np.repeat(np.arange(lengths.size, dtype=np.int64), per_user)
    first_window = np.cumsum(per_user) - per_user
    j = np.arange(user_index.size, dtype=np.int64) - np.repeat(first_window, per_user)
    start = np.minimum(j * stride, excess[user_index])
    win_len = np.minimum(max_len, lengths[user_index] - start)

    pos = np.arange(max_len, dtype=np.int64)
    mask = pos[None, :] < win_len[:, None]
    rows = encoded.offsets[user_index][:, None] + start[:, None] + pos[None, :]
    rows = np.where(mask, rows, 0)
    n_fields = encoded.fields.shape[1]
    if encoded.n_events:
        fields = encoded.fields[rows]
        fields[~mask] = PAD
        event_ids = np.where(mask, encoded.event_ids[rows], -1)
    else:
        fields = np.zeros((0, max_len, n_fields), dtype=encoded.fields.dtype)
        event_ids = np.zeros((0, max_len), dtype=np.int64)

    # Earliest window holding an event: anything past the previous window's end.
    prev_end = np.zeros_like(start)
    later = j > 0
    prev_end[later] = start[np.flatnonzero(later) - 1] + max_len
    primary = mask & (start[:, None] + pos[None, :] >= prev_end[:, None])
    return Windows(
        fields=fields,
        mask=mask,
        event_ids=event_ids.astype(np.int64, copy=False),
        user_index=user_index,
        start=start,
        primary=primary,
    )


def iter_window_batches(
    windows: Windows, batch_size: int, *, sort_by_length: bool = True
) -> Iterator[WindowBatch]:
    """Batches trimmed to their longest window; with sort_by_length, windows of similar length
    go together (longest first, so an out-of-memory batch fails at once, not at the end)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    lengths = windows.lengths()
    order = (
        np.argsort(-lengths, kind="stable")
        if sort_by_length
        else np.arange(len(windows), dtype=np.int64)
    )
    for lo in range(0, order.size, batch_size):
        idx = order[lo : lo + batch_size]
        width = max(int(lengths[idx].max()), 1)
        yield WindowBatch(
            index=idx.astype(np.int64, copy=False),
            fields=windows.fields[idx, :width],
            mask=windows.mask[idx, :width],
            event_ids=windows.event_ids[idx, :width],
            primary=windows.primary[idx, :width],
        )


# -- loading -------------------------------------------------------------------------------------


def load_events(
    con: duckdb.DuckDBPyConnection,
    users: Sequence[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    columns: Sequence[str] = SEQUENCE_COLUMNS,
) -> pa.Table:
    """Events of some users in [start, end), sorted by user_id, ts, event_id.

    Selects only the requested columns that the ``events`` table has (data with just user_id,
    ts and event_type is fine). Pass ``columns=core.schema.COLUMN_NAMES`` for every column.
    Device and card columns come with their ``__accounts_before`` counts (add_accounts_before).
    """
    unknown = set(columns) - set(COLUMN_NAMES)
    if unknown:
        raise ValueError(f"not event columns: {sorted(unknown)}")
    present = {d[0] for d in con.execute("SELECT * FROM events LIMIT 0").description}
    selected = [c for c in COLUMN_NAMES if c in columns and c in present]
    where: list[str] = []
    params: list[Any] = []
    if users is not None:
        where.append("user_id IN (SELECT unnest(?::VARCHAR[]))")
        params.append([str(u) for u in users])
    if start is not None:
        where.append("ts >= ?")
        params.append(naive_utc(start))
    if end is not None:
        where.append("ts < ?")
        params.append(naive_utc(end))
    order = [c for c in ("user_id", "ts", "event_id") if c in present]
    # Identifiers come from core.schema.COLUMN_NAMES (a fixed list); every value is a parameter.
    query = (
        f"SELECT {', '.join(selected)} FROM events"  # noqa: S608
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + f" ORDER BY {', '.join(order)}"
    )
    return add_accounts_before(con, con.sql(query, params=params).to_arrow_table())
