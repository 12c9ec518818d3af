"""CSV exports that are safe to open in a spreadsheet.

A text cell that starts with = + - @ (or a tab / carriage return) would run as a formula in
Excel or LibreOffice (CSV injection); such cells are prefixed with a single quote, which the
spreadsheet shows as text. Numeric columns stay numbers.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import duckdb
import pandas as pd

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralise_cell(value: object) -> object:
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def neutralise_frame(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for column in out.columns:
        if not pd.api.types.is_numeric_dtype(
            out[column]
        ) and not pd.api.types.is_datetime64_any_dtype(out[column]):
            out[column] = out[column].map(neutralise_cell)
    out.columns = [str(neutralise_cell(str(c))) for c in out.columns]
    return out


def write_csv(frame: pd.DataFrame, out: str | Path) -> int:
    """Neutralise and write atomically (a crash never leaves a half-written export)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    neutralise_frame(frame).to_csv(tmp, index=False)
    tmp.replace(out)
    return len(frame)


def user_scores_frame(
    con: duckdb.DuckDBPyConnection,
    model_id: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """Per-user scores of a model (default: the newest), ranked by score: the full-history
    scores, or with ``start`` / ``end`` those a ranged ``fraudlens score`` stored for exactly
    that window."""
    if model_id is None:
        row = con.execute("SELECT model_id FROM models ORDER BY created_at DESC LIMIT 1").fetchone()
        if row is None:
            raise ValueError("no trained model; run `fraudlens train` first")
        model_id = str(row[0])
    frame = con.execute(
        "SELECT user_id, model_id, window_start, window_end, score_unsupervised,"
        " percentile_unsupervised, score_supervised, score_aggregate, score, "
        # Ties in the score (users beyond every training user share percentile 1) are broken
        # by the raw unsupervised score: how far beyond, not the user id's spelling.
        "row_number() OVER (ORDER BY score DESC NULLS LAST, score_unsupervised DESC NULLS LAST,"
        " user_id) AS rank, n_events "
        "FROM sequence_scores WHERE model_id = ? AND window_start IS NOT DISTINCT FROM ?"
        " AND window_end IS NOT DISTINCT FROM ? ORDER BY rank",
        [model_id, start, end],
    ).df()
    if frame.empty:
        what = (
            "no stored scores"
            if start is None and end is None
            else f"no scores stored for the window {start or '…'} .. {end or '…'}"
        )
        hint = (
            "`fraudlens score`"
            if start is None and end is None
            else "`fraudlens score` with the same --start / --end"
        )
        raise ValueError(f"model {model_id} has {what}; run {hint} first")
    if start is None and end is None:
        frame = frame.drop(columns=["window_start", "window_end"])
    return frame


def export_user_scores(
    con: duckdb.DuckDBPyConnection,
    out: str | Path,
    model_id: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> int:
    return write_csv(user_scores_frame(con, model_id, start, end), out)
