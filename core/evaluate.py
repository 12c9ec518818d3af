"""Evaluation: user splits, ranking metrics at an alert budget, threshold tables, ground truth.

Every scorer is judged on the same questions an analyst asks: how well does the ranking
separate fraud (AUPRC, AUROC), how many of the first k alerts are real (precision@k), how much
fraud does a fixed review budget catch (recall in the top 1% of users, overall and per
typology), and how good is a threshold chosen on validation data when applied to test data.
Degenerate inputs (no users, one class only) give NaN metrics, never an exception.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb
import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
NORMAL_TYPOLOGIES = frozenset({"", "normal", "none", "benign", "legit"})
NAN = math.nan
# Scorers whose score is a fraud probability (the rest rank users on their own scales).
PROBABILITY_SCORERS = frozenset(
    {
        "transformer_supervised",
        "transformer_supervised_uncalibrated",
        "transformer_combined",
        "transformer_combined_without_aggregates",
        "lightgbm",
    }
)


# --------------------------------------------------------------------------------------------
# Splits


def _unit_hash(user_ids: Sequence[str], seed: int) -> np.ndarray:
    """A value in [0, 1) per user, stable across runs, platforms and Python versions."""
    out = np.empty(len(user_ids), dtype=np.float64)
    for i, uid in enumerate(user_ids):
        digest = hashlib.blake2b(f"{seed}\x1f{uid}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def _unique_users(user_ids: ArrayLike) -> np.ndarray:
    return np.asarray(pd.unique(pd.Series(np.asarray(user_ids, dtype=object), dtype=object)))


def split_users(
    user_ids: Sequence[str] | np.ndarray,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> dict[str, np.ndarray]:
    """Train / val / test users by a stable hash of (seed, user_id).

    A user's split depends only on the seed and its own id, so adding users never moves
    existing ones, and no user is ever in two splits. Sizes follow ``fractions`` roughly
    (binomially). Each array keeps the input order.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    users = _unique_users(user_ids)
    edges = np.cumsum(np.asarray(fractions, dtype=np.float64) / sum(fractions))
    bucket = np.searchsorted(edges[:-1], _unit_hash(users, seed), side="right")
    return {name: users[bucket == i] for i, name in enumerate(SPLIT_NAMES)}


def kfold_users(
    user_ids: Sequence[str] | np.ndarray, k: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, test) folds; every user is a test user in exactly one fold.

    Users are ordered by their stable hash and dealt round-robin, so fold sizes differ by at
    most one.
    """
    users = _unique_users(user_ids)
    if k < 2 or k > max(len(users), 2):
        raise ValueError(f"k must be between 2 and the number of users ({len(users)}), got {k}")
    order = np.argsort(_unit_hash(users, seed), kind="stable")
    fold = np.empty(len(users), dtype=np.int64)
    fold[order] = np.arange(len(users)) % k
    return [(users[fold != i], users[fold == i]) for i in range(k)]


# --------------------------------------------------------------------------------------------
# Metrics


@dataclass
class ScorerMetrics:
    name: str
    n_users: int
    n_positive: int
    auprc: float
    auroc: float
    precision_at_k: dict[int, float]
    recall_at_budget: float  # share of positives among the top ``budget_share`` of users
    precision_at_budget: float
    n_alerts_at_budget: int
    threshold: float  # F1-maximising threshold of the *validation* scores
    f1_at_val_threshold: float  # F1 on these (test) users at that threshold
    recall_per_typology: dict[str, float] = field(default_factory=dict)
    budget_share: float = 0.01
    # Mean squared error of the score read as a fraud probability (scorers whose score is one);
    # ranking metrics cannot see a head that says 0.99 for accounts that are fraud 1 time in 3.
    brier: float = NAN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clean(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(y) != len(s):
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    y = (np.nan_to_num(y, nan=0.0) > 0).astype(np.int64)
    finite = np.isfinite(s)
    if not finite.all():
        # a missing score ranks last: the scorer had nothing to say about that user
        low = s[finite].min() - 1.0 if finite.any() else 0.0
        s = np.where(finite, s, low)
    return y, s


def _two_classes(y: np.ndarray) -> bool:
    return len(y) > 0 and 0 < int(y.sum()) < len(y)


def budget_alerts(n_users: int, budget_share: float) -> int:
    """Alerts a budget of ``budget_share`` of the users allows: rounded up, at least one."""
    if n_users == 0:
        return 0
    return min(n_users, max(1, math.ceil(round(budget_share * n_users, 9))))


def _ranking(scores: np.ndarray) -> np.ndarray:
    # ties keep input order, so a ranking is reproducible
    return np.argsort(-scores, kind="stable")


def best_f1_threshold(y_true: ArrayLike, scores: ArrayLike) -> float:
    """The score threshold (alert when score >= threshold) with the highest F1; NaN if
    ``y_true`` lacks a class."""
    from sklearn.metrics import precision_recall_curve

    y, s = _clean(y_true, scores)
    if not _two_classes(y):
        return NAN
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thresholds[int(np.argmax(f1))])


def _f1_at(y: np.ndarray, s: np.ndarray, threshold: float) -> float:
    if not math.isfinite(threshold) or int(y.sum()) == 0:
        return NAN
    alert = s >= threshold
    tp = int((alert & (y == 1)).sum())
    denom = int(alert.sum()) + int(y.sum())
    return 2 * tp / denom if denom else NAN


def evaluate_scores(
    name: str,
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    typologies: ArrayLike | None = None,
    val_scores: ArrayLike | None = None,
    val_true: ArrayLike | None = None,
    ks: Sequence[int] = (10, 50, 100),
    budget_share: float = 0.01,
    probability: bool = False,
) -> ScorerMetrics:
    """Metrics of one scorer on one set of (test) users.

    The threshold is chosen on the validation users only (F1-maximising) and then applied to
    these users. precision@k is NaN when fewer than k users exist. A NaN score ranks last.
    ``probability``: the score is a fraud probability, so its Brier score means something
    (users without a score are left out of it).
    """
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    brier = NAN
    if probability:
        raw = np.asarray(scores, dtype=np.float64).ravel()
        known = np.isfinite(raw)
        truth = (np.nan_to_num(np.asarray(y_true, dtype=np.float64).ravel()) > 0)[known]
        if known.any():
            brier = float(brier_score_loss(truth, np.clip(raw[known], 0.0, 1.0)))

    y, s = _clean(y_true, scores)
    n, n_pos = len(y), int(y.sum())
    two = _two_classes(y)
    order = _ranking(s)
    ranked = y[order]

    precision_at_k = {int(k): float(ranked[:k].mean()) if 0 < k <= n else NAN for k in ks}
    n_alerts = budget_alerts(n, budget_share)
    in_budget = np.zeros(n, dtype=bool)
    in_budget[order[:n_alerts]] = True
    recall_at_budget = float(ranked[:n_alerts].sum() / n_pos) if n_pos else NAN
    precision_at_budget = float(ranked[:n_alerts].mean()) if n_alerts else NAN

    per_typology: dict[str, float] = {}
    if typologies is not None:
        typ = np.asarray(typologies, dtype=object).ravel()
        if len(typ) != n:
            raise ValueError(f"{len(typ)} typologies for {n} users")
        typ = np.array(["" if t is None or t != t else str(t) for t in typ], dtype=object)
        for t in sorted(set(typ) - NORMAL_TYPOLOGIES):
            members = typ == t
            per_typology[t] = float(in_budget[members].mean())

    threshold, f1 = NAN, NAN
    if val_scores is not None and val_true is not None:
        threshold = best_f1_threshold(val_true, val_scores)
        f1 = _f1_at(y, s, threshold)

    return ScorerMetrics(
        name=name,
        n_users=n,
        n_positive=n_pos,
        auprc=float(average_precision_score(y, s)) if two else NAN,
        auroc=float(roc_auc_score(y, s)) if two else NAN,
        precision_at_k=precision_at_k,
        recall_at_budget=recall_at_budget,
        precision_at_budget=precision_at_budget,
        n_alerts_at_budget=n_alerts,
        threshold=threshold,
        f1_at_val_threshold=f1,
        recall_per_typology=per_typology,
        budget_share=budget_share,
        brier=brier,
    )


def threshold_table(
    y_true: ArrayLike | None, scores: ArrayLike, thresholds: ArrayLike | None = None
) -> pd.DataFrame:
    """Alert counts and, when labels are given, tp / fp / fn / precision / recall / f1 per
    threshold (alert when score >= threshold), by ascending threshold.

    Default thresholds: every distinct score when there are at most 200, else the 101
    percentiles. Precision is NaN with no alerts, recall NaN with no positives.
    """
    if y_true is None:
        s = np.asarray(scores, dtype=np.float64).ravel()
        s = s[np.isfinite(s)]
        y = None
    else:
        y, s = _clean(y_true, scores)
    if thresholds is None:
        thr = np.unique(s)
        if len(thr) > 200:
            thr = np.unique(np.quantile(thr, np.linspace(0.0, 1.0, 101)))
    else:
        thr = np.sort(np.asarray(thresholds, dtype=np.float64).ravel())
    alerts = len(s) - np.searchsorted(np.sort(s), thr, side="left")
    table = pd.DataFrame({"threshold": thr, "alerts": alerts.astype(np.int64)})
    if y is None:
        for col in ("tp", "fp", "fn", "precision", "recall", "f1"):
            table[col] = NAN
        return table
    pos = np.sort(s[y == 1])
    n_pos = len(pos)
    tp = n_pos - np.searchsorted(pos, thr, side="left")
    table["tp"], table["fp"], table["fn"] = tp, alerts - tp, n_pos - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        table["precision"] = np.where(alerts > 0, tp / np.maximum(alerts, 1), NAN)
        table["recall"] = tp / n_pos if n_pos else NAN
        table["f1"] = 2 * tp / (alerts + n_pos) if n_pos else NAN
    return table


def _fmt(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3f}"


def metrics_table_markdown(rows: list[ScorerMetrics]) -> str:
    """The scorers side by side (one row each), then recall at the budget per typology."""
    if not rows:
        return "_no scorers evaluated_\n"
    ks = sorted({k for r in rows for k in r.precision_at_k})
    budgets = sorted({r.budget_share for r in rows})
    budget = f"{100 * budgets[0]:g}%" if len(budgets) == 1 else "budget"
    header = ["Scorer", "AUPRC", "AUROC", *[f"P@{k}" for k in ks]]
    header += [f"Recall@{budget}", f"Precision@{budget}", "F1 @ val threshold", "Brier"]
    header += ["Users", "Positive"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in rows:
        cells = [r.name, _fmt(r.auprc), _fmt(r.auroc)]
        cells += [_fmt(r.precision_at_k.get(k, NAN)) for k in ks]
        cells += [_fmt(r.recall_at_budget), _fmt(r.precision_at_budget)]
        cells += [_fmt(r.f1_at_val_threshold), _fmt(r.brier), str(r.n_users), str(r.n_positive)]
        lines.append("| " + " | ".join(cells) + " |")
    typologies = sorted({t for r in rows for t in r.recall_per_typology})
    if typologies:
        lines += ["", f"Recall at the {budget} alert budget, per typology:", ""]
        lines.append("| Typology | " + " | ".join(r.name for r in rows) + " |")
        lines.append("|" + "|".join(["---"] * (len(rows) + 1)) + "|")
        for t in typologies:
            cells = [_fmt(r.recall_per_typology.get(t, NAN)) for r in rows]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Ground truth


def _table_columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    rows = con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = ? "
        "AND schema_name = current_schema()",
        [table],
    ).fetchall()
    return {r[0] for r in rows}


def load_truth(
    con: duckdb.DuckDBPyConnection, users: Sequence[str] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(y, typology) for ``users``: y is 1 for fraud, typology "" for normal users.

    Simulator truth (``truth_users``) when it holds rows; otherwise analyst labels (each user's
    latest label; 'fraud' = 1, typology "labelled"). Users absent from the source are normal.
    Raises LookupError when the database has neither.
    """
    ids = [str(u) for u in np.asarray(users, dtype=object)]
    index = pd.Index(ids)
    truth_cols = _table_columns(con, "truth_users")
    found: pd.Series | None = None
    if {"user_id", "typology"} <= truth_cols:
        has_rows = con.execute("SELECT count(*) FROM truth_users").fetchone()
        if has_rows and has_rows[0] > 0:
            frame = con.execute(
                "SELECT user_id, any_value(typology) AS typology FROM truth_users "
                "WHERE user_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY user_id",
                [ids],
            ).df()
            found = frame.set_index("user_id")["typology"]
    if found is None:
        label_cols = _table_columns(con, "labels")
        if not {"user_id", "label"} <= label_cols:
            raise LookupError("no ground truth: truth_users is empty and there are no labels")
        # the latest label counts: an analyst may correct an earlier decision
        latest = "arg_max(label, created_at)" if "created_at" in label_cols else "any_value(label)"
        frame = con.execute(
            f"SELECT user_id, {latest} AS label FROM labels "  # noqa: S608 -- fixed choices
            "WHERE user_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY user_id",
            [ids],
        ).df()
        is_fraud = frame["label"].astype(object).str.lower().eq("fraud")
        found = pd.Series(np.where(is_fraud, "labelled", ""), index=frame["user_id"])
    typ = found.reindex(index).astype(object)
    typology = np.array(
        ["" if t is None or t != t or str(t).lower() in NORMAL_TYPOLOGIES else str(t) for t in typ],
        dtype=object,
    )
    return (typology != "").astype(np.int64), typology


# --------------------------------------------------------------------------------------------
# The protocol behind `fraudlens evaluate`


@dataclass
class EvaluationConfig:
    """What to evaluate; serialised into the report so a run can be reproduced."""

    seed: int = 0
    size: str = "small"
    epochs: int = 6
    supervised_epochs: int = 20  # at most; fine-tuning stops early on validation loss
    max_len: int = 128
    unseen_seed: int | None = 1001  # a second world generated with this seed (demo data only)
    cv: int = 0  # K-fold cross-validation over users when >= 2
    budget_share: float = 0.01
    deeplog_epochs: int = 5
    device: str = "auto"


@dataclass
class EvaluationReport:
    config: EvaluationConfig
    results: dict[str, list[ScorerMetrics]]  # evaluation set -> one row per scorer
    split_sizes: dict[str, int]
    seconds: dict[str, float]
    cv: dict[str, dict[str, float]] = field(default_factory=dict)
    tuning: dict[str, dict[str, float]] = field(default_factory=dict)  # baseline -> chosen

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "baseline_tuning": self.tuning,
            "split_sizes": self.split_sizes,
            "seconds": self.seconds,
            "results": {k: [m.to_dict() for m in v] for k, v in self.results.items()},
            "cv": self.cv,
        }

    def markdown(self) -> str:
        lines: list[str] = []
        if self.tuning:
            chosen = "; ".join(
                f"{name}: " + ", ".join(f"{k} {v}" for k, v in params.items())
                for name, params in self.tuning.items()
            )
            lines += [f"Baselines tuned on the validation users ({chosen}).", ""]
        for name, rows in self.results.items():
            lines += [f"## {name}", "", metrics_table_markdown(rows), ""]
        if self.cv:
            lines += [f"## {self.config.cv}-fold cross-validation (mean ± std over folds)", ""]
            lines += ["| scorer | AUPRC | AUROC | recall@1% |", "|---|---|---|---|"]
            for scorer, m in self.cv.items():
                lines.append(
                    f"| {scorer} | {m['auprc_mean']:.3f} ± {m['auprc_std']:.3f} "
                    f"| {m['auroc_mean']:.3f} ± {m['auroc_std']:.3f} "
                    f"| {m['recall_at_budget_mean']:.3f} ± {m['recall_at_budget_std']:.3f} |"
                )
            lines.append("")
        return "\n".join(lines)


@dataclass
class _FittedScorers:
    transformer_path: Any
    featurizer: Any
    baselines: list[Any]


def _fit_all(
    con: duckdb.DuckDBPyConnection,
    train_users: np.ndarray,
    tune_users: np.ndarray | None,
    cfg: EvaluationConfig,
    work_dir: Any,
    progress: bool,
    seconds: dict[str, float],
) -> _FittedScorers:
    import time

    from core.baselines import (
        AggregateFeaturizer,
        DeepLogScorer,
        ECODScorer,
        IForestScorer,
        LightGBMScorer,
        LOFScorer,
        LogBERTScorer,
        load_user_data,
    )
    from core.train import TrainConfig, train_model

    started = time.perf_counter()
    trained = train_model(
        con,
        TrainConfig(
            size=cfg.size,
            epochs=cfg.epochs,
            supervised_epochs=cfg.supervised_epochs,
            max_len=cfg.max_len,
            seed=cfg.seed,
            device=cfg.device,
        ),  # type: ignore[arg-type]
        models_dir=work_dir / "models",
        users=list(train_users),
        progress=progress,
        register=False,
    )
    seconds["train_transformer"] = time.perf_counter() - started

    started = time.perf_counter()
    featurizer = AggregateFeaturizer().fit(con, list(train_users))
    train_data = load_user_data(con, list(train_users), featurizer)
    y_train, _ = load_truth(con, train_users)
    baselines: list[Any] = [
        IForestScorer(random_state=cfg.seed),
        ECODScorer(random_state=cfg.seed),
        LOFScorer(random_state=cfg.seed),
        DeepLogScorer(random_state=cfg.seed, max_epochs=cfg.deeplog_epochs, progress=progress),
        LogBERTScorer(random_state=cfg.seed, progress=progress),
    ]

    def iforest(value: int) -> IForestScorer:
        return IForestScorer(random_state=cfg.seed, max_samples=value)

    def lof(value: int) -> LOFScorer:
        return LOFScorer(random_state=cfg.seed, n_neighbors=value)

    tune = (con, featurizer, train_users, tune_users)
    baselines[0] = _tuned(*tune, "max_samples", IFOREST_GRID, iforest)
    baselines[2] = _tuned(*tune, "n_neighbors", LOF_GRID, lof)
    for scorer in baselines:
        scorer.fit(train_data)  # unsupervised, like the transformer's pretraining: no labels
    lgbm = LightGBMScorer(random_state=cfg.seed).fit(train_data, y_train)
    baselines.append(lgbm)
    seconds["fit_baselines"] = time.perf_counter() - started
    return _FittedScorers(trained.path, featurizer, baselines)


# Hyper-parameters of the outlier baselines, chosen per evaluation on validation users (by
# AUPRC): the baselines get the same chance to fit the data as the model they are compared to.
LOF_GRID = (10, 20, 35, 60, 100)
IFOREST_GRID = (64, 256, 1024)


def _tuned(
    con: duckdb.DuckDBPyConnection,
    featurizer: Any,
    train_users: np.ndarray,
    tune_users: np.ndarray | None,
    param: str,
    grid: tuple[int, ...],
    make: Any,
    cfg_seed_for_tuning: int = 7919,
) -> Any:
    """The grid value with the best validation AUPRC, as an unfitted scorer. Candidates are fit
    on the training users and scored on ``tune_users``; without them (a cross-validation fold)
    a quarter of the training users is held out for this. Labels are read for the validation
    users only."""
    from sklearn.metrics import average_precision_score

    from core.baselines import load_user_data

    fit_users = np.asarray(train_users, dtype=object)
    if tune_users is None:
        held = _unit_hash(fit_users, seed=cfg_seed_for_tuning) < 0.25
        fit_users, tune_users = fit_users[~held], fit_users[held]
    y_tune, _ = load_truth(con, tune_users)
    if y_tune.sum() == 0 or y_tune.sum() == len(y_tune):
        return make(grid[len(grid) // 2])  # nothing to choose by: the middle value
    fit_data = load_user_data(con, list(fit_users), featurizer, with_events=False)
    tune_data = load_user_data(con, list(tune_users), featurizer, with_events=False)
    best, best_ap = grid[0], -1.0
    for value in grid:
        scores = make(value).fit(fit_data).decision_function(tune_data)
        ap = float(average_precision_score(y_tune, scores))
        if ap > best_ap:
            best, best_ap = value, ap
    chosen = make(best)
    chosen.tuned_ = {param: best, "validation_auprc": round(best_ap, 4)}
    return chosen


def uncalibrated_probability(calibrated: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """The head's probability before its Platt scaling (``scale * logit + bias``), undone in
    the logit; probabilities that rounded to 0 or 1 stay at the ends."""
    p = np.clip(np.asarray(calibrated, dtype=np.float64), 1e-12, 1.0 - 1e-12)
    raw = (np.log(p) - np.log1p(-p) - bias) / scale
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * raw)), dtype=np.float64)  # sigmoid, no overflow


def _score_all(
    con: duckdb.DuckDBPyConnection, fitted: _FittedScorers, users: np.ndarray
) -> dict[str, np.ndarray]:
    from core.baselines import load_user_data
    from core.scoring import combine_scores, load_model, score_users

    loaded = load_model(fitted.transformer_path)
    frame = score_users(con, loaded, list(users), write=False).set_index("user_id")
    frame = frame.reindex(pd.Index([str(u) for u in users]))
    scores: dict[str, np.ndarray] = {
        "transformer_unsupervised": frame["score_unsupervised"].to_numpy(float),
    }
    if loaded.supervised:
        scores["transformer_supervised"] = frame["score_supervised"].to_numpy(float)
        config = loaded.model.config
        if config.head_logit_scale != 1.0 or config.head_logit_bias != 0.0:
            # same ranking: the Brier column says what the calibration did on unseen users
            scores["transformer_supervised_uncalibrated"] = uncalibrated_probability(
                scores["transformer_supervised"], config.head_logit_scale, config.head_logit_bias
            )
        scores["transformer_combined"] = frame["score"].to_numpy(float)
        if loaded.aggregate is not None:
            # what the transformer's two scores give without the account-level model: the
            # combined score's gain over LightGBM is not just LightGBM
            scores["transformer_combined_without_aggregates"] = combine_scores(
                frame["percentile_unsupervised"].to_numpy(float),
                frame["score_supervised"].to_numpy(float),
            )
    data = load_user_data(con, list(users), fitted.featurizer)
    for scorer in fitted.baselines:
        scores[scorer.name] = np.asarray(scorer.decision_function(data), dtype=float)
    return scores


def _metrics_for(
    scores: dict[str, np.ndarray],
    y: np.ndarray,
    typ: np.ndarray,
    val: tuple[dict[str, np.ndarray], np.ndarray] | None,
    budget_share: float,
) -> list[ScorerMetrics]:
    rows = []
    for name, s in scores.items():
        rows.append(
            evaluate_scores(
                name,
                y,
                s,
                typologies=typ,
                val_scores=val[0][name] if val else None,
                val_true=val[1] if val else None,
                budget_share=budget_share,
                probability=name in PROBABILITY_SCORERS,
            )
        )
    return rows


def run_evaluation(
    con: duckdb.DuckDBPyConnection,
    cfg: EvaluationConfig,
    *,
    work_dir: Any,
    progress: bool = True,
) -> EvaluationReport:
    """Train every scorer on the training users only and compare them on unseen users.

    Users are split by a stable hash (a user is never in two splits). Thresholds for F1 are
    chosen on the validation users, metrics reported on the test users. With demo ground truth
    and ``unseen_seed``, the same fitted scorers are also evaluated on a whole new world
    simulated with that seed (every user unseen, a different population draw).
    """
    import time
    from pathlib import Path

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    users = np.array(
        [
            r[0]
            for r in con.execute("SELECT DISTINCT user_id FROM events ORDER BY user_id").fetchall()
        ],
        dtype=object,
    )
    splits = split_users(users, seed=cfg.seed)
    seconds: dict[str, float] = {}
    fitted = _fit_all(con, splits["train"], splits["val"], cfg, work_dir, progress, seconds)

    started = time.perf_counter()
    val_scores = _score_all(con, fitted, splits["val"])
    test_scores = _score_all(con, fitted, splits["test"])
    seconds["score_val_test"] = time.perf_counter() - started
    y_val, _ = load_truth(con, splits["val"])
    y_test, typ_test = load_truth(con, splits["test"])
    results = {
        "test users (same world, unseen in training)": _metrics_for(
            test_scores, y_test, typ_test, (val_scores, y_val), cfg.budget_share
        )
    }

    if cfg.unseen_seed is not None and _has_simulator_truth(con):
        from core import store
        from core.demo import build_demo
        from core.simulate import WorldConfig

        started = time.perf_counter()
        n_users, fraud_rate, days = _world_shape(con)
        world_db = work_dir / f"unseen_world_{cfg.unseen_seed}.duckdb"
        if world_db.exists():
            world_db.unlink()
        build_demo(
            world_db,
            WorldConfig(n_users=n_users, days=days, fraud_rate=fraud_rate, seed=cfg.unseen_seed),
        )
        with store.open_db(world_db) as other:
            other_users = np.array(
                [
                    r[0]
                    for r in other.execute(
                        "SELECT DISTINCT user_id FROM events ORDER BY user_id"
                    ).fetchall()
                ],
                dtype=object,
            )
            other_scores = _score_all(other, fitted, other_users)
            y_o, typ_o = load_truth(other, other_users)
        results[f"unseen world (seed {cfg.unseen_seed}, {n_users} users)"] = _metrics_for(
            other_scores, y_o, typ_o, (val_scores, y_val), cfg.budget_share
        )
        seconds["unseen_world"] = time.perf_counter() - started

    cv_summary: dict[str, dict[str, float]] = {}
    if cfg.cv >= 2:
        started = time.perf_counter()
        per_scorer: dict[str, list[ScorerMetrics]] = {}
        for fold, (train_users, test_users) in enumerate(kfold_users(users, cfg.cv, seed=cfg.seed)):
            fold_fit = _fit_all(con, train_users, None, cfg, work_dir / f"fold{fold}", progress, {})
            fold_scores = _score_all(con, fold_fit, test_users)
            y_f, typ_f = load_truth(con, test_users)
            for m in _metrics_for(fold_scores, y_f, typ_f, None, cfg.budget_share):
                per_scorer.setdefault(m.name, []).append(m)
        for name, ms in per_scorer.items():
            summary: dict[str, float] = {}
            for key in ("auprc", "auroc", "recall_at_budget"):
                values = np.array([getattr(m, key) for m in ms], dtype=float)
                summary[f"{key}_mean"] = float(np.nanmean(values))
                summary[f"{key}_std"] = float(np.nanstd(values))
            cv_summary[name] = summary
        seconds["cv"] = time.perf_counter() - started

    return EvaluationReport(
        config=cfg,
        results=results,
        split_sizes={k: len(v) for k, v in splits.items()},
        seconds={k: round(v, 1) for k, v in seconds.items()},
        cv=cv_summary,
        tuning={s.name: s.tuned_ for s in fitted.baselines if hasattr(s, "tuned_")},
    )


def _has_simulator_truth(con: duckdb.DuckDBPyConnection) -> bool:
    rows = con.execute("SELECT count(*) FROM ingest_batches WHERE source LIKE 'demo:%'").fetchall()
    return bool(rows and rows[0][0])


def _world_shape(con: duckdb.DuckDBPyConnection) -> tuple[int, float, int]:
    """Users, fraud share and days of the demo world in ``con`` (to simulate a twin world)."""
    n_users, first, last = con.execute(
        "SELECT count(DISTINCT user_id), min(ts), max(ts) FROM events"
    ).fetchall()[0]
    n_fraud = con.execute("SELECT count(DISTINCT user_id) FROM truth_users").fetchall()[0][0]
    days = max(int(round((last - first).total_seconds() / 86400)), 3)
    return int(n_users), round(n_fraud / max(n_users, 1), 3), days


def write_evaluation(report: EvaluationReport, json_path: Any) -> Any:
    """Write the report as JSON and as a markdown table beside it, naming the machine."""
    import json
    from pathlib import Path

    from core.machine import describe_machine

    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    json_path.write_text(
        json.dumps({"machine": machine, **report.to_dict()}, indent=2, default=str)
    )
    md_path = json_path.with_suffix(".md")
    header = (
        f"# fraudlens evaluate\n\nMachine: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB RAM, GPU: {machine['gpu'] or 'none'}; "
        f"commit {machine['commit']}; {machine['when']}\n\n"
        f"Config: {asdict(report.config)}\n\nSplit sizes: {report.split_sizes}; "
        f"seconds: {report.seconds}\n\n"
    )
    md_path.write_text(header + report.markdown())
    return md_path
