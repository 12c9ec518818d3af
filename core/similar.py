"""Similar past cases: users whose whole behaviour the model encodes most like this user's.

Each user's embedding is the model's pooled sequence representation (mean ‖ max of the decoder
states over the user's events, the sequence head's input) minus the training population's mean,
stored by batch scoring in ``user_embeddings``: similarity then compares how two users differ
from everyone else. Nearest users by cosine similarity, computed inside DuckDB
(``list_cosine_similarity``), so no embedding matrix is pulled into Python; a few hundred
thousand users take well under a second.
"""

from __future__ import annotations

import duckdb
import pandas as pd

from core import cases

SIMILAR_COLUMNS = ("user_id", "similarity", "score", "label", "case", "n_events")


def has_embeddings(con: duckdb.DuckDBPyConnection, model_id: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM user_embeddings WHERE model_id = ?", [model_id]
    ).fetchone()
    return bool(row and row[0])


def user_embedding(
    con: duckdb.DuckDBPyConnection, model_id: str, user_id: str
) -> list[float] | None:
    row = con.execute(
        "SELECT embedding FROM user_embeddings WHERE model_id = ? AND user_id = ? LIMIT 1",
        [model_id, str(user_id)],
    ).fetchone()
    return None if row is None else list(row[0])


def similar_users(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    user_id: str,
    k: int = 8,
    *,
    labelled_only: bool = False,
) -> pd.DataFrame:
    """The k users nearest to ``user_id`` (cosine over the model's user embeddings), with their
    similarity, current score, label and case status. Empty when the user has no embedding.

    ``labelled_only`` restricts to users an analyst (or the demo truth via labels) has labelled:
    "past cases" in the strict sense.
    """
    query = """
        WITH target AS (
            SELECT embedding FROM user_embeddings WHERE model_id = ? AND user_id = ? LIMIT 1
        ), labelled AS (
            SELECT user_id, arg_max(label, created_at) AS label FROM labels GROUP BY user_id
        )
        SELECT e.user_id,
               list_cosine_similarity(e.embedding, t.embedding) AS similarity,
               s.score, l.label, s.n_events
        FROM user_embeddings e CROSS JOIN target t
        LEFT JOIN labelled l USING (user_id)
        LEFT JOIN (
            SELECT user_id, arg_max(score, scored_at) AS score,
                   arg_max(n_events, scored_at) AS n_events
            FROM sequence_scores
            WHERE model_id = ? AND window_start IS NULL AND window_end IS NULL
            GROUP BY user_id
        ) s USING (user_id)
        WHERE e.model_id = ? AND e.user_id <> ? AND (NOT ? OR l.label IS NOT NULL)
        ORDER BY similarity DESC, e.user_id
        LIMIT ?
    """
    frame = con.execute(
        query, [model_id, str(user_id), model_id, model_id, str(user_id), labelled_only, int(k)]
    ).df()
    status = cases.user_case_status(con, frame["user_id"].astype(str).tolist())
    frame["case"] = frame["user_id"].astype(str).map(status)
    return frame.loc[:, list(SIMILAR_COLUMNS)]
