"""Batch and on-demand scoring: per-event surprisal and per-user sequence scores.

Scores (all "higher = more suspicious"):
- ``score_unsupervised``: a field-wise typicality test (after Nalisnick et al., 2019, "Detecting
  out-of-distribution inputs to deep generative models using typicality"). Each event's
  surprisal is split by field (event type, category, price, gap, hour, new device / IP /
  country / card) and standardised by the training population's mean and spread for that field;
  per field we take the user's mean, and the score is the length of that vector of means times
  sqrt(min(n_events, EVIDENCE_CAP)) — how many standard errors the user's behaviour sits from
  the population, field by field. It is two-sided on purpose: fraud is often *too* predictable
  (scripted clicking, bots, brushing repeat themselves) as well as surprising (a takeover's new
  device and country). Evidence is capped because a user's events are not independent.
  Reported with its percentile against the training users (``percentile_unsupervised``, 0..1).
  Per-event ``surprisal`` (stored in event_scores) stays the plain sum of field NLLs in nats.
- ``score_supervised``: the sequence head's fraud probability (max over the user's windows),
  present only when the model was fine-tuned on labels.
- ``score_aggregate``: the account-level model's fraud probability (gradient boosting on the
  user's aggregates, see ``core.aggregate_model``), trained beside the head when labels exist.
- ``score`` (combined): log-odds pooling of the evidence that exists,
  ``sigmoid(w * logit(percentile_unsupervised) + (1 - w) * mean(logit(score_supervised),
  logit(score_aggregate)))`` with ``w = DEFAULT_UNSUPERVISED_WEIGHT`` = 1/3: each of the three
  sources gets the same weight, none is fitted (a combiner fitted on the few validation
  fraudsters would be noise). Pooling log-odds rather than averaging probabilities lets one
  confident source speak: a 0.999 from the head is not diluted to 0.5 by an ordinary
  percentile. ``w`` reads as "how much to trust novelty vs. known fraud patterns"; the
  Thresholds page moves it. Without supervised evidence the score is the percentile itself.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from core import store
from core.schema import naive_utc
from core.sequences import (
    EncodedEvents,
    SequenceFeaturizer,
    WindowBatch,
    iter_window_batches,
    load_events,
    make_windows,
)

if TYPE_CHECKING:
    import torch

    from core.aggregate_model import AggregateModel
    from core.model import BehaviorModel
    from core.train import TrainConfig

# torch and the model are imported where they are used: pages that only read stored scores
# (Triage, Thresholds, Cases, and Investigate's timeline) start without paying for torch.

DEFAULT_UNSUPERVISED_WEIGHT = 1.0 / 3.0
# Probabilities are clipped before the logit: a percentile of exactly 1 (beyond every training
# user) or a saturated sigmoid would otherwise be infinite evidence.
_LOGIT_EPS = 1e-5
EVIDENCE_CAP = 256
# Events per scoring chunk: ~100 MB of model inputs and outputs on top of the model.
CHUNK_EVENTS = 250_000
_TIE_TOLERANCE = 1e-6
REFERENCE_FILE = "score_reference.json"


def typical_event(fields: np.ndarray, offsets: np.ndarray | None = None) -> list[int]:
    """The commonest token of each field over encoded events ([n, n_fields] tokens); ties go
    to the lower token. With ``offsets`` (user i's events are rows offsets[i]:offsets[i+1])
    each user weighs the same, however many events they logged: counted per event, one bot's
    100k events would decide what "typical" means (on a 300-user sample of a simulated world
    a single scraper set the typical category, gap and hour), and its own pattern would then
    get no credit. Fields are counted apart, so the result need not be an event anyone
    logged: it is a reference point (each field at its usual value), not a sample."""
    fields = np.asarray(fields)
    if fields.ndim != 2:
        raise ValueError(f"fields must be [events, fields], got shape {fields.shape}")
    if fields.shape[0] == 0 or fields.shape[1] == 0:
        return []
    if not np.issubdtype(fields.dtype, np.integer) or fields.min() < 0:
        raise ValueError("fields must be non-negative integer tokens")
    weights = None
    if offsets is not None:
        lengths = np.diff(np.asarray(offsets, dtype=np.int64))
        if lengths.sum() != fields.shape[0] or (lengths < 0).any():
            raise ValueError("offsets do not partition the events")
        weights = np.repeat(1.0 / np.maximum(lengths, 1), lengths)
    counts = (np.bincount(column.astype(np.int64), weights=weights) for column in fields.T)
    return [int(c.argmax()) for c in counts]


@dataclass
class ScoreReference:
    """What the training population looked like: per-field surprisal statistics (to
    standardise) and the distribution of user scores (for percentiles)."""

    field_mean: list[float]
    field_std: list[float]
    quantiles: list[float]  # sorted training-user scores, thinned to at most 2001 points
    mean: float
    std: float
    evidence_cap: int = EVIDENCE_CAP
    # The training users' mean pooled embedding: stored user embeddings are relative to it, so
    # cosine similarity compares how users differ from the population (raw pooled states all
    # point the same way and every pair scores ~0.99). Empty for models trained before.
    embedding_mean: list[float] = field(default_factory=list)
    # Each field's commonest token over the training users (each user weighing the same, see
    # typical_event): the supervised attribution's baseline (core.explain), so an event is
    # credited for how it differs from what users typically do. Empty for models trained
    # before: the neutral (absent) event then.
    typical_event: list[int] = field(default_factory=list)

    def percentile(self, raw: np.ndarray) -> np.ndarray:
        """Share of training users scoring below ``raw``, ties counted half (mid-rank).

        Ties matter on real logs: many users with the same short sequence (one event of the
        commonest kind) share one score, and counting them all as "below" put every one of
        them above the 90th percentile. Scores within a relative 1e-6 are ties: rescoring a
        user in another batch moves float32 sums by about that much, and the percentile of
        the same behaviour must not jump a rank (it did: the deletion check started from
        another score than the header's).
        """
        q = np.asarray(self.quantiles)
        x = np.asarray(raw, dtype=float)
        tol = _TIE_TOLERANCE * np.maximum(1.0, np.abs(x))
        below = np.searchsorted(q, x - tol, side="left")
        not_above = np.searchsorted(q, x + tol, side="right")
        return (below + not_above) / 2.0 / len(q)

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        return (np.asarray(raw, dtype=float) - self.mean) / (self.std or 1.0)

    def save(self, directory: Path) -> None:
        (Path(directory) / REFERENCE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, directory: Path) -> ScoreReference:
        return cls(**json.loads((Path(directory) / REFERENCE_FILE).read_text()))

    def user_scores(self, field_nll: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return typicality_scores(
            field_nll,
            offsets,
            np.asarray(self.field_mean),
            np.asarray(self.field_std),
            self.evidence_cap,
        )

    def centre(self, embedding: np.ndarray) -> np.ndarray:
        if not self.embedding_mean or embedding.shape[1] != len(self.embedding_mean):
            return embedding
        return embedding - np.asarray(self.embedding_mean, dtype=embedding.dtype)

    @classmethod
    def fit(
        cls,
        field_nll: np.ndarray,
        offsets: np.ndarray,
        embedding: np.ndarray | None = None,
        fields: np.ndarray | None = None,
    ) -> ScoreReference:
        mean = field_nll.mean(axis=0).astype(float)
        std = np.maximum(field_nll.std(axis=0), 1e-3).astype(float)
        scores = typicality_scores(field_nll, offsets, mean, std, EVIDENCE_CAP)
        scores = np.sort(scores[~np.isnan(scores)])
        if len(scores) > 2001:
            scores = np.quantile(scores, np.linspace(0, 1, 2001))
        return cls(
            field_mean=mean.tolist(),
            field_std=std.tolist(),
            quantiles=scores.tolist(),
            mean=float(scores.mean()),
            std=float(scores.std()),
            embedding_mean=[] if embedding is None else embedding.mean(axis=0).tolist(),
            typical_event=[] if fields is None else typical_event(fields, offsets),
        )


@dataclass
class LoadedModel:
    """A model ready to score: weights, fitted vocabularies, the score reference, a lock.

    The lock serialises use of the shared model (Captum hooks, and torch modules are not
    re-entrant for training-mode toggles); scoring under ``no_grad`` takes it too.
    """

    model_id: str
    path: Path
    model: BehaviorModel
    featurizer: SequenceFeaturizer
    reference: ScoreReference
    device: torch.device
    lock: threading.Lock
    aggregate: AggregateModel | None = None  # the account-level model, when trained with labels

    @property
    def supervised(self) -> bool:
        return bool(getattr(self.model.config, "has_supervised_head", False))


def load_model(path: str | Path, *, device: str | None = None) -> LoadedModel:
    """The model at ``path`` on ``device`` (None: FRAUDLENS_DEVICE, else the GPU when there is
    one)."""
    from core.aggregate_model import AggregateModel
    from core.model import BehaviorModel
    from core.train import resolve_device

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {path} (config.json missing)")
    dev = resolve_device(device)
    model = BehaviorModel.from_pretrained(path).to(dev).eval()
    return LoadedModel(
        model_id=path.name,
        path=path,
        model=model,
        featurizer=SequenceFeaturizer.load(path),
        reference=ScoreReference.load(path),
        device=dev,
        lock=threading.Lock(),
        aggregate=AggregateModel.load(path),
    )


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), _LOGIT_EPS, 1.0 - _LOGIT_EPS)
    return np.log(p) - np.log1p(-p)


def combine_scores(
    percentile: np.ndarray,
    supervised: np.ndarray | None,
    weight: float = DEFAULT_UNSUPERVISED_WEIGHT,
    *,
    aggregate: np.ndarray | None = None,
) -> np.ndarray:
    """The combined score (module docstring): per user, the supervised sources present (not
    None, not NaN) are averaged in log-odds and pooled with the percentile's log-odds."""
    pct = np.asarray(percentile, dtype=float)
    sources = [np.asarray(s, dtype=float) for s in (supervised, aggregate) if s is not None]
    if not sources:
        return pct
    stacked = np.stack([_logit(s) for s in sources])
    present = np.stack([~np.isnan(s) for s in sources])
    n_present = present.sum(axis=0)
    supervised_logit = np.where(present, stacked, 0.0).sum(axis=0) / np.maximum(n_present, 1)
    pooled = weight * _logit(pct) + (1.0 - weight) * supervised_logit
    combined = 1.0 / (1.0 + np.exp(-pooled))
    return np.where((n_present == 0) | np.isnan(pct), pct, combined)


@dataclass
class EncodedScores:
    surprisal: np.ndarray  # float32 [n_events], aligned with the encoded rows
    field_nll: np.ndarray  # float32 [n_events, n_fields], the surprisal split by field
    supervised: np.ndarray  # float32 [n_users] fraud probability (NaN without a head)
    embedding: np.ndarray  # float32 [n_users, hidden] mean-pooled hidden states


def score_encoded(
    model: BehaviorModel,
    encoded: EncodedEvents,
    *,
    max_len: int,
    device: torch.device,
    batch_size: int = 64,
    from_ts: np.datetime64 | None = None,
) -> EncodedScores:
    """One forward pass per window (length-bucketed batches). Windows overlap; each event keeps
    the surprisal of its primary window, the one that gave it the most preceding context.

    ``from_ts``: the supervised score is the maximum over the windows that reach it (a window
    of earlier events only gives context, not a verdict on the range)."""
    import torch

    from core.oom import PartSizer
    from core.train import autocast

    windows = make_windows(encoded, max_len=max_len)
    n_users = len(encoded.user_ids)
    surprisal = np.zeros(len(encoded.event_ids), dtype=np.float32)
    field_nll = np.zeros((len(encoded.event_ids), encoded.fields.shape[1]), dtype=np.float32)
    sup_logit = np.full(n_users, -np.inf, dtype=np.float32)
    emb_sum: np.ndarray | None = None
    emb_count = np.zeros(n_users, dtype=np.float32)
    has_head = bool(getattr(model.config, "has_supervised_head", False))
    model.eval()
    sizer = PartSizer("windows of events")  # halves the batches if the GPU runs out of memory

    def forward(whole: WindowBatch, part: slice) -> tuple[np.ndarray, ...]:
        """(surprisal, field NLL, sequence logit, pooled) of a part, on the host: the copies
        off the GPU are inside the part that is retried smaller when memory runs out."""
        fields = torch.from_numpy(whole.fields[part].astype(np.int64))
        mask = torch.from_numpy(whole.mask[part])
        with autocast(device):
            out = model(fields=fields.to(device), attention_mask=mask.to(device))
        assert out.surprisal is not None and out.field_nll is not None
        assert out.sequence_logit is not None and out.pooled is not None
        return tuple(
            t.float().cpu().numpy()
            for t in (out.surprisal, out.field_nll, out.sequence_logit, out.pooled)
        )

    with torch.no_grad():
        for whole in iter_window_batches(windows, batch_size):
            for part, out in sizer.run(len(whole.index), functools.partial(forward, whole)):
                window_surprisal, window_nll, logits, pooled = out
                batch = WindowBatch(*(a[part] for a in whole))
                users = windows.user_index[batch.index]
                width = batch.mask.shape[1]
                rows = encoded.offsets[users][:, None] + windows.start[batch.index][:, None]
                rows = rows + np.arange(width)
                surprisal[rows[batch.primary]] = window_surprisal[batch.primary]
                field_nll[rows[batch.primary]] = window_nll[batch.primary]
                if from_ts is not None:
                    last = rows[np.arange(len(rows)), batch.mask.sum(axis=1) - 1]
                    logits = np.where(encoded.ts[last] >= from_ts, logits, -np.inf)
                np.maximum.at(sup_logit, users, logits)
                if emb_sum is None:
                    emb_sum = np.zeros((n_users, pooled.shape[1]), dtype=np.float32)
                np.add.at(emb_sum, users, pooled)
                np.add.at(emb_count, users, 1.0)
    supervised = (
        (1.0 / (1.0 + np.exp(-sup_logit))).astype(np.float32)
        if has_head
        else np.full(n_users, np.nan, dtype=np.float32)
    )
    embedding = (
        emb_sum / np.maximum(emb_count[:, None], 1.0)
        if emb_sum is not None
        else np.zeros((n_users, 0), dtype=np.float32)
    )
    return EncodedScores(
        surprisal=surprisal, field_nll=field_nll, supervised=supervised, embedding=embedding
    )


def typicality_scores(
    field_nll: np.ndarray,
    offsets: np.ndarray,
    field_mean: np.ndarray,
    field_std: np.ndarray,
    evidence_cap: int = EVIDENCE_CAP,
) -> np.ndarray:
    """Per user: ||mean over events of standardised field surprisal|| * sqrt(min(n, cap)).

    Written with numpy segment sums (bincount): one pass, no per-user Python loop.
    """
    n_users = len(offsets) - 1
    lengths = np.diff(offsets)
    if n_users == 0:
        return np.zeros(0)
    z = (field_nll.astype(np.float64) - field_mean) / field_std
    segment = np.repeat(np.arange(n_users), lengths)
    means = (
        np.stack(
            [np.bincount(segment, weights=z[:, f], minlength=n_users) for f in range(z.shape[1])],
            axis=1,
        )
        / np.maximum(lengths, 1)[:, None]
    )
    score = np.sqrt((means**2).sum(axis=1)) * np.sqrt(np.minimum(lengths, evidence_cap))
    return np.where(lengths > 0, score, np.nan)


def fit_score_reference(
    model: BehaviorModel,
    featurizer: SequenceFeaturizer,
    encoded: EncodedEvents,
    cfg: TrainConfig,
    *,
    device: torch.device,
) -> ScoreReference:
    scores = score_encoded(model, encoded, max_len=cfg.max_len, device=device)
    return ScoreReference.fit(
        scores.field_nll, encoded.offsets, scores.embedding, fields=encoded.fields
    )


def register_model(
    con: duckdb.DuckDBPyConnection, model_id: str, path: Path, cfg: TrainConfig, metrics: dict
) -> None:
    con.execute(
        "INSERT OR REPLACE INTO models (model_id, created_at, kind, config, metrics, path) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [
            model_id,
            datetime.now(UTC).replace(tzinfo=None),
            "behavior-transformer",
            json.dumps(asdict(cfg)),
            json.dumps(metrics, default=str),
            str(Path(path).resolve()),  # absolute: the CLI and the app may run from elsewhere
        ],
    )


def resolve_model_path(model_id: str, stored: str | Path | None) -> Path:
    """Where a registered model's files are: the path stored with it when they are there, else
    ``<models_dir>/<model_id>`` (a database copied to another machine or folder with its
    models, or one registered with a path relative to where `fraudlens train` ran), else the
    stored path as it is (loading it then names it in its error)."""
    from core.config import get_settings

    candidates = [Path(stored)] if stored else []
    candidates.append(get_settings().models_dir / model_id)
    for candidate in candidates:
        if (candidate / "config.json").exists():
            return candidate
    return candidates[0]


def latest_model(con: duckdb.DuckDBPyConnection) -> tuple[str, Path] | None:
    row = con.execute(
        "SELECT model_id, path FROM models ORDER BY created_at DESC LIMIT 1"
    ).fetchone()
    return (str(row[0]), resolve_model_path(str(row[0]), row[1])) if row else None


def _user_chunks(
    con: duckdb.DuckDBPyConnection,
    users: Sequence[str] | None,
    start: datetime | None,
    end: datetime | None,
    chunk_users: int,
    chunk_events: int = CHUNK_EVENTS,
) -> Iterator[list[str]]:
    """Consecutive users, at most ``chunk_users`` of them and, unless one user alone has more,
    at most ``chunk_events`` events: memory follows events, and a few heavy accounts (bots,
    whales with 50,000 events) in one user-count chunk would hold far more than the rest."""
    counts = con.execute(
        "SELECT user_id, count(*) FROM events WHERE (? IS NULL OR ts >= ?) AND (? IS NULL OR"
        " ts < ?) AND (?::VARCHAR[] IS NULL OR user_id IN (SELECT unnest(?::VARCHAR[])))"
        " GROUP BY user_id",
        [start, start, end, end, *([None, None] if users is None else [list(users)] * 2)],
    ).fetchall()
    n_of = {str(u): int(n) for u, n in counts}
    order = sorted(n_of) if users is None else [str(u) for u in users]
    chunk: list[str] = []
    events = 0
    for user in order:
        n = n_of.get(user, 0)
        if chunk and (len(chunk) >= chunk_users or events + n > chunk_events):
            yield chunk
            chunk, events = [], 0
        chunk.append(user)
        events += n
    if chunk:
        yield chunk


def score_users(
    db: duckdb.DuckDBPyConnection | str | Path,
    loaded: LoadedModel,
    users: Sequence[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    write: bool = True,
    chunk_users: int = 2000,
    batch_size: int = 64,
    progress: bool = False,
) -> pd.DataFrame:
    """Score users (all, or the given ones) on their events in [start, end).

    Streams users in chunks, so memory stays bounded whatever the database size. With
    ``write`` the per-event surprisal goes to ``event_scores`` and the per-user scores to
    ``sequence_scores`` (replacing earlier rows of the same model, user and range), each chunk
    in one short transaction.
    """
    max_len = int(loaded.model.config.max_len)
    results: list[pd.DataFrame] = []
    with store.using(db) as con:
        chunks = list(_user_chunks(con, users, start, end, chunk_users))
    for chunk in tqdm(chunks, desc="scoring", unit="chunk", disable=not progress):
        with store.using(db) as con:
            # A range's events are read with everything before them: the model's context, a
            # device's first appearance and the gap before the first event in the range are
            # then what they were, not artefacts of the cut.
            events = load_events(con, users=chunk, start=None, end=end)
            aggregate_features = (
                loaded.aggregate.features(con, chunk, start, end)
                if loaded.aggregate is not None and events.num_rows
                else None
            )
        if events.num_rows == 0:
            continue
        encoded = loaded.featurizer.transform(events)
        from_ts = None if start is None else np.datetime64(naive_utc(start), "us")
        with loaded.lock:
            scores = score_encoded(
                loaded.model,
                encoded,
                max_len=max_len,
                device=loaded.device,
                batch_size=batch_size,
                from_ts=from_ts,
            )
        if from_ts is not None:
            encoded, scores = _in_range(encoded, scores, from_ts)
            if encoded.n_events == 0:
                continue
        raw = loaded.reference.user_scores(scores.field_nll, encoded.offsets)
        pct = loaded.reference.percentile(raw)
        sup = scores.supervised if loaded.supervised else None
        user_ids = encoded.user_ids.astype(str)
        aggregate = None
        if loaded.aggregate is not None and aggregate_features is not None:
            aggregate = (
                pd.Series(
                    loaded.aggregate.predict_features(aggregate_features),
                    index=aggregate_features.index.astype(str),
                )
                .reindex(user_ids)
                .to_numpy(dtype=np.float64)
            )
        frame = pd.DataFrame(
            {
                "user_id": user_ids,
                "model_id": loaded.model_id,
                "n_events": np.diff(encoded.offsets).astype(np.int64),
                "first_ts": encoded.ts[encoded.offsets[:-1]],
                "last_ts": encoded.ts[encoded.offsets[1:] - 1],
                "score_unsupervised": raw,
                "percentile_unsupervised": pct,
                "score_supervised": scores.supervised.astype(np.float64),
                "score_aggregate": (
                    np.full(len(user_ids), np.nan) if aggregate is None else aggregate
                ),
                "score": combine_scores(pct, sup, aggregate=aggregate),
            }
        )
        results.append(frame)
        if write:
            event_frame = pd.DataFrame(
                {
                    "event_id": encoded.event_ids.astype(np.int64),
                    "surprisal": scores.surprisal.astype(np.float64),
                }
            )
            embeddings = None
            if start is None and end is None:  # only a full history describes the user
                emb = np.ascontiguousarray(
                    loaded.reference.centre(scores.embedding), dtype=np.float32
                )
                embeddings = pa.table(
                    {
                        "user_id": pa.array(frame["user_id"].to_numpy(), pa.string()),
                        "embedding": pa.FixedSizeListArray.from_arrays(
                            pa.array(emb.ravel()), emb.shape[1]
                        ),
                    }
                )
            with store.using(db) as con:
                write_scores(con, loaded.model_id, frame, event_frame, start, end, embeddings)
    if not results:
        return pd.DataFrame(
            columns=[
                "user_id",
                "model_id",
                "n_events",
                "first_ts",
                "last_ts",
                "score_unsupervised",
                "percentile_unsupervised",
                "score_supervised",
                "score_aggregate",
                "score",
            ]
        )
    return pd.concat(results, ignore_index=True)


def _in_range(
    encoded: EncodedEvents, scores: EncodedScores, from_ts: np.datetime64
) -> tuple[EncodedEvents, EncodedScores]:
    """The events at or after ``from_ts`` (scored with their history as context), and the
    users who have any: a ranged score describes the range."""
    keep = encoded.ts >= from_ts
    lengths = np.diff(encoded.offsets)
    segment = np.repeat(np.arange(len(lengths)), lengths)
    counts = np.bincount(segment[keep], minlength=len(lengths))
    users = counts > 0
    offsets = np.concatenate([[0], np.cumsum(counts[users])]).astype(np.int64)
    kept = EncodedEvents(
        fields=encoded.fields[keep],
        user_ids=encoded.user_ids[users],
        offsets=offsets,
        event_ids=encoded.event_ids[keep],
        ts=encoded.ts[keep],
    )
    return kept, EncodedScores(
        surprisal=scores.surprisal[keep],
        field_nll=scores.field_nll[keep],
        supervised=scores.supervised[users],
        embedding=scores.embedding[users] if len(scores.embedding) else scores.embedding,
    )


def write_scores(
    con: duckdb.DuckDBPyConnection,
    model_id: str,
    users_frame: pd.DataFrame,
    events_frame: pd.DataFrame,
    start: datetime | None,
    end: datetime | None,
    embeddings: pa.Table | None = None,
) -> None:
    """Replace this model's scores (and, given, the users' embeddings) for these users and
    range, in one transaction.

    Event scores and embeddings have no range: one value per event (per user) and model, the
    one computed over the user's full history, where each event has all its context. A ranged
    run (``start`` or ``end`` given) therefore only fills in events and users that have none
    yet; it never overwrites what a full-history run wrote.
    """
    now = datetime.now(UTC).replace(tzinfo=None)
    ranged = start is not None or end is not None
    con.execute("BEGIN TRANSACTION")
    try:
        con.register("_new_event_scores", events_frame)
        con.register("_new_user_scores", users_frame)
        con.execute(
            "DELETE FROM event_scores WHERE model_id = ? "
            "AND event_id IN (SELECT event_id FROM _new_event_scores) AND NOT ?",
            [model_id, ranged],
        )
        con.execute(
            "INSERT INTO event_scores (event_id, model_id, surprisal) SELECT event_id, ?,"
            " surprisal FROM _new_event_scores WHERE NOT ? OR event_id NOT IN"
            " (SELECT event_id FROM event_scores WHERE model_id = ?)",
            [model_id, ranged, model_id],
        )
        con.execute(
            "DELETE FROM sequence_scores WHERE model_id = ? "
            "AND window_start IS NOT DISTINCT FROM ? AND window_end IS NOT DISTINCT FROM ? "
            "AND user_id IN (SELECT user_id FROM _new_user_scores)",
            [model_id, start, end],
        )
        con.execute(
            "INSERT INTO sequence_scores (user_id, window_start, window_end, model_id, n_events, "
            "score_unsupervised, percentile_unsupervised, score_supervised, score_aggregate, "
            "score, scored_at) "
            "SELECT user_id, ?, ?, ?, n_events, score_unsupervised, percentile_unsupervised, "
            "score_supervised, score_aggregate, score, ? FROM _new_user_scores",
            [start, end, model_id, now],
        )
        if embeddings is not None:
            con.register("_new_embeddings", embeddings)
            con.execute(
                "DELETE FROM user_embeddings WHERE model_id = ? "
                "AND user_id IN (SELECT user_id FROM _new_embeddings) AND NOT ?",
                [model_id, ranged],
            )
            con.execute(
                "INSERT INTO user_embeddings (model_id, user_id, embedding) "
                "SELECT ?, user_id, embedding::FLOAT[] FROM _new_embeddings WHERE NOT ? OR"
                " user_id NOT IN (SELECT user_id FROM user_embeddings WHERE model_id = ?)",
                [model_id, ranged, model_id],
            )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister("_new_event_scores")
        con.unregister("_new_user_scores")
        if embeddings is not None:
            con.unregister("_new_embeddings")
