"""Self-supervised pretraining and supervised fine-tuning of the behaviour model.

Pretraining teaches the model what normal behaviour looks like: next-event prediction on every
user's sequence (no labels needed). Fine-tuning then trains the sequence head on labels —
simulator truth in the demo, analyst labels in real use — while keeping the next-event loss,
so per-event surprisal stays meaningful after fine-tuning.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from core import store
from core.config import get_settings
from core.model import BehaviorConfig, BehaviorModel, SizeName
from core.sequences import SequenceFeaturizer, Windows, load_events, make_windows

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    size: SizeName = "small"
    epochs: int = 6
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_share: float = 0.05
    max_len: int = 128
    grad_clip: float = 1.0
    patience: int = 2
    seed: int = 0
    val_share: float = 0.1
    supervised: bool = True
    # Fine-tuning: at most this many epochs, stopped early on the validation users' loss.
    supervised_epochs: int = 20
    supervised_learning_rate: float = 1e-3
    # 4 bad epochs in a row end fine-tuning (the evaluations in benchmarks/results ran with
    # this stopping point, then written as `> 3`).
    supervised_patience: int = 4
    # Each epoch sees this many legit windows per fraud window, drawn afresh, beside the fraud
    # windows (with witness_windows, from the second epoch one per fraud account): an epoch
    # costs a fraction of a pass over all windows, and over the epochs the head still sees most
    # legit behaviour. None: every window, every epoch.
    negatives_per_positive: float | None = 4.0
    # Weight of the next-event loss while fine-tuning. Full weight slows the head (its gradients
    # dominate the clipped update) but regularises it: at 0.1 the head overfit sooner and scored
    # worse on unseen users, at 0 the unsupervised score degraded (see DESIGN.md).
    finetune_nll_weight: float = 1.0
    # With labels, also fit the account-level model (core.aggregate_model) whose probability
    # the combined score pools with the head's and the percentile.
    aggregate_model: bool = True
    # Labels are per account, windows are not: a fraud account's early windows often hold only
    # its normal life before the fraud. After the first epoch each fraud account contributes
    # one positive, the window the head scores highest (multiple-instance learning, matching
    # scoring's max over windows); its other windows are left out, not called legit.
    witness_windows: bool = True
    # Platt-scale the head on the validation users after fine-tuning (see calibrate_head).
    calibrate_head: bool = True
    device: str | None = None  # None: FRAUDLENS_DEVICE, else auto
    max_train_windows: int | None = None


@dataclass
class TrainResult:
    model_id: str
    path: Path
    metrics: dict[str, float | int | str | None] = field(default_factory=dict)


def resolve_device(name: str | None = None) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; None: ``FRAUDLENS_DEVICE`` (else
    auto). A GPU asked for where torch sees none falls back to the CPU, with a warning."""
    name = (name or get_settings().device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %r asked for, but torch sees no CUDA GPU: using the CPU", name)
        return torch.device("cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        log.warning("device %r asked for, but MPS is not available: using the CPU", name)
        return torch.device("cpu")
    return device


def autocast(device: torch.device) -> torch.autocast:
    # bf16 only pays off on CUDA; on this class of CPU it is ~16x slower than fp32.
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


def new_model_id(size: str) -> str:
    return f"{size}-{datetime.now(UTC):%Y%m%d-%H%M%S-%f}"


def _seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def _user_split(user_ids: np.ndarray, val_share: float, seed: int) -> np.ndarray:
    """Boolean mask of validation users (a user's windows never straddle the split)."""
    rng = np.random.default_rng(seed)
    return rng.random(len(user_ids)) < val_share


def _take(windows: Windows, index: np.ndarray) -> Windows:
    return Windows(
        fields=windows.fields[index],
        mask=windows.mask[index],
        event_ids=windows.event_ids[index],
        user_index=windows.user_index[index],
        start=windows.start[index],
        primary=windows.primary[index],
    )


def _batches(
    windows: Windows, batch_size: int, *, shuffle: bool, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """Length-bucketed batches: shuffle, then sort chunks of ~50 batches by length so padding
    is small without making batch order deterministic in length."""
    n = len(windows.mask)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    lengths = windows.mask.sum(axis=1)
    chunk = batch_size * 50
    for lo in range(0, n, chunk):
        part = order[lo : lo + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        for b in range(0, len(part), batch_size):
            idx = part[b : b + batch_size]
            width = int(lengths[idx].max())
            fields = torch.from_numpy(windows.fields[idx, :width].astype(np.int64))
            mask = torch.from_numpy(windows.mask[idx, :width])
            yield fields, mask, idx


def _evaluate_nll(
    model: BehaviorModel, windows: Windows, batch_size: int, device: torch.device
) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for fields, mask, _ in _batches(windows, batch_size * 2, shuffle=False, seed=0):
            with autocast(device):
                out = model(fields=fields.to(device), attention_mask=mask.to(device))
            total += float(out.surprisal.float().sum())
            count += int(mask.sum())
    return total / max(count, 1)


def _save_checkpoint(
    path: Path,
    model: BehaviorModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict,
    best_weights: dict[str, torch.Tensor],
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save(
        {
            "model": model.state_dict(),
            "best_model": best_weights,  # a resumed run ends on these if nothing beats them
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state,
        },
        tmp,
    )
    tmp.replace(path / "state.pt")  # atomic: a crash mid-save keeps the previous checkpoint


def pretrain(
    model: BehaviorModel,
    train: Windows,
    val: Windows,
    cfg: TrainConfig,
    *,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    """Next-event pretraining with AdamW, warm-up + cosine decay, clipping and early stopping."""
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = math.ceil(len(train.mask) / cfg.batch_size)
    total_steps = max(steps_per_epoch * cfg.epochs, 1)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(cfg.warmup_share * total_steps), total_steps
    )
    state: dict = {"epoch": 0, "best_val": math.inf, "bad_epochs": 0, "history": []}
    ckpt = checkpoint_dir / "state.pt" if checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
    best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ckpt is not None and ckpt.exists() and "best_model" in saved:
        best_weights = saved["best_model"]
    tokens, seconds = 0, 0.0
    # Early stopping: `patience` epochs in a row without a better validation NLL end it.
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"]
        model.train()
        started = time.perf_counter()
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"pretrain epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            disable=not progress,
        )
        for fields, mask, _ in _batches(train, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
            fields, mask = fields.to(device), mask.to(device)
            with autocast(device):
                out = model(fields=fields, attention_mask=mask)
            loss = out.nll_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            tokens += int(mask.sum())
            bar.update(1)
            bar.set_postfix(nll=f"{loss.item():.3f}")
        bar.close()
        seconds += time.perf_counter() - started
        val_nll = _evaluate_nll(model, val, cfg.batch_size, device) if len(val.mask) else math.nan
        state["history"].append({"epoch": epoch + 1, "val_nll": val_nll})
        if not math.isnan(val_nll) and val_nll < state["best_val"] - 1e-4:
            state["best_val"] = val_nll
            state["bad_epochs"] = 0
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif not math.isnan(val_nll):
            state["bad_epochs"] += 1
        else:
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state["epoch"] = epoch + 1
        if checkpoint_dir is not None:
            _save_checkpoint(checkpoint_dir, model, optimizer, scheduler, state, best_weights)
    model.load_state_dict(best_weights)
    return {
        "pretrain_epochs": state["epoch"],
        "val_nll": state["best_val"] if state["best_val"] < math.inf else math.nan,
        "train_tokens_per_s": tokens / seconds if seconds else math.nan,
    }


def _epoch_sample(
    labels: np.ndarray, negatives_per_positive: float | None, seed: int
) -> np.ndarray:
    """Window indices for one fine-tuning epoch: all positives plus a fresh draw of negatives."""
    if negatives_per_positive is None:
        return np.arange(len(labels))
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels != 1)
    keep = min(len(negatives), max(int(round(negatives_per_positive * len(positives))), 1))
    drawn = np.random.default_rng(seed).choice(negatives, keep, replace=False)
    return np.sort(np.concatenate([positives, drawn]))


def _window_logits(
    model: BehaviorModel, windows: Windows, batch_size: int, device: torch.device
) -> np.ndarray:
    # Full precision, not autocast: bf16 resolves a logit near 5 to ~0.03, and overlapping
    # windows of one account would tie for witness, the earliest (least likely fraud) winning.
    model.eval()
    logits = np.empty(len(windows.mask), dtype=np.float64)
    with torch.no_grad():
        for fields, mask, idx in _batches(windows, batch_size * 2, shuffle=False, seed=0):
            out = model(fields=fields.to(device), attention_mask=mask.to(device))
            logits[idx] = out.sequence_logit.float().cpu().numpy()
    return logits


def witness_positives(user_index: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Window indices to train on: every negative window, and for each positive account only
    its highest-scoring window (ties: the earliest)."""
    positive = np.flatnonzero(labels == 1)
    # Sort positives by (user, -logit): the first row of each user is its witness.
    order = positive[np.lexsort((-logits[positive], user_index[positive]))]
    first = np.ones(len(order), dtype=bool)
    first[1:] = user_index[order][1:] != user_index[order][:-1]
    return np.sort(np.concatenate([np.flatnonzero(labels != 1), order[first]]))


def _sequence_loss(
    model: BehaviorModel,
    windows: Windows,
    labels: np.ndarray,
    pos_weight: torch.Tensor,
    batch_size: int,
    device: torch.device,
    *,
    witness: bool = False,
) -> float:
    """Class-weighted sequence loss over windows (the validation criterion of fine-tuning);
    ``witness``: a fraud account counts once, by its highest-scoring window."""
    logits = _window_logits(model, windows, batch_size, device)
    keep = (
        witness_positives(windows.user_index, labels, logits) if witness else np.arange(len(labels))
    )
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight.cpu(), reduction="sum")
    total = float(
        bce(
            torch.from_numpy(logits[keep]).float(),
            torch.from_numpy(labels[keep].astype(np.float32)),
        )
    )
    return total / max(len(keep), 1)


MIN_CALIBRATION_ACCOUNTS = 5  # of each class among the validation users


def calibrate_head(
    model: BehaviorModel,
    val: Windows,
    val_labels: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
) -> dict[str, float | int | str]:
    """Platt-scale the fine-tuned head on the validation users; sets the config's
    ``head_logit_scale`` / ``head_logit_bias`` and returns what it fitted.

    Fine-tuning sees a few legit windows per fraud one and up-weights fraud on top, so the raw
    head says "fraud" far more often than fraud happens: an account scored 0.99 is not fraud 99
    times in 100. A one-feature logistic regression of each validation account's label on its
    highest window logit (the logit scoring reports) maps the head back to account-level odds.
    The fit is mildly regularised (C = 1): validation fraud is a handful of accounts, and when
    they separate perfectly an unregularised slope runs off to infinity. Monotone in the logit,
    so rankings, AUPRC and attributions' order do not change; probabilities, thresholds on
    them and relative drops do.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    model.config.head_logit_scale, model.config.head_logit_bias = 1.0, 0.0
    logits = _window_logits(model, val, batch_size, device)
    frame = pd.DataFrame({"user": val.user_index, "logit": logits, "y": val_labels})
    accounts = frame.groupby("user").agg(logit=("logit", "max"), y=("y", "max"))
    n_fraud = int((accounts["y"] == 1).sum())
    n_legit = len(accounts) - n_fraud
    if min(n_fraud, n_legit) < MIN_CALIBRATION_ACCOUNTS:
        return {
            "head_calibration": f"skipped: the validation users hold {n_fraud} labelled fraud "
            f"and {n_legit} legit accounts (fewer than {MIN_CALIBRATION_ACCOUNTS} of a class); "
            "the head's probabilities are as trained"
        }
    x = accounts[["logit"]].to_numpy(np.float64)
    y = accounts["y"].to_numpy(np.int64)
    platt = LogisticRegression(C=1.0).fit(x, y)
    scale, bias = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    if scale <= 0.0:
        # The head ranks the validation fraud no better than chance: a flipped or flat map
        # would hide that, so keep the head as trained and say so.
        return {
            "head_calibration": f"skipped: the fitted slope is {scale:.3f} (the head does not "
            "rank validation fraud above legit); the head's probabilities are as trained"
        }
    model.config.head_logit_scale, model.config.head_logit_bias = scale, bias
    raw_p = 0.5 * (1.0 + np.tanh(0.5 * x[:, 0]))  # sigmoid, no overflow
    return {
        "head_calibration": "platt",
        "head_logit_scale": round(scale, 4),
        "head_logit_bias": round(bias, 4),
        "head_calibration_accounts": len(accounts),
        "head_calibration_fraud": n_fraud,
        # in-sample for the two fitted numbers; evaluate's held-out Brier is the honest check
        "head_val_log_loss_raw": round(float(log_loss(y, raw_p, labels=[0, 1])), 4),
        "head_val_log_loss_calibrated": round(
            float(log_loss(y, platt.predict_proba(x)[:, 1], labels=[0, 1])), 4
        ),
    }


def finetune(
    model: BehaviorModel,
    train: Windows,
    window_labels: np.ndarray,
    cfg: TrainConfig,
    *,
    device: torch.device,
    val: Windows | None = None,
    val_labels: np.ndarray | None = None,
    progress: bool = True,
) -> dict[str, float | int | str | None]:
    """Train the sequence head (and the backbone) on labels, keeping the next-event loss.

    Fraud is rare: each epoch takes the fraud windows and a fresh draw of legit ones
    (``negatives_per_positive`` per fraud window), and the loss up-weights fraud by the epoch's
    remaining imbalance. With ``witness_windows``, epochs after the first take only each fraud
    account's highest-scoring window (see ``witness_positives``). With validation windows of
    both classes, training stops once their loss has not improved for ``supervised_patience``
    epochs and the best epoch's weights are kept.
    """
    # The loss below is on the head as trained: a calibration left from an earlier fit would
    # bend it (train_model calibrates again afterwards).
    model.config.head_logit_scale, model.config.head_logit_bias = 1.0, 0.0
    positives = float(window_labels.sum())
    epoch_size = len(_epoch_sample(window_labels, cfg.negatives_per_positive, cfg.seed))
    negatives = epoch_size - positives  # legit windows an epoch draws
    if cfg.witness_windows:
        # From the second epoch on, a fraud account is one positive among as many legit windows
        # as before: weigh, and schedule, for that.
        positives = float(len(np.unique(train.user_index[window_labels == 1])))
    uncapped_weight = negatives / max(positives, 1.0)
    pos_weight = torch.tensor(min(uncapped_weight, 100.0), device=device)
    validate = (
        val is not None and val_labels is not None and 0 < float(val_labels.sum()) < len(val_labels)
    )
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.supervised_learning_rate, weight_decay=cfg.weight_decay
    )
    steps = max(
        math.ceil(epoch_size / cfg.batch_size)
        + math.ceil((negatives + positives) / cfg.batch_size) * (cfg.supervised_epochs - 1),
        1,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_share * steps), steps)
    labels_all = torch.from_numpy(window_labels.astype(np.float32))
    best_loss, best_epoch, bad_epochs = math.inf, 0, 0
    best_weights: dict[str, torch.Tensor] | None = None
    history: list[float] = []
    epochs_run = 0
    for epoch in range(cfg.supervised_epochs):
        sample = _epoch_sample(window_labels, cfg.negatives_per_positive, cfg.seed + 1000 + epoch)
        if cfg.witness_windows and epoch > 0:
            positive = np.flatnonzero(window_labels == 1)
            logits = np.zeros(len(window_labels))
            logits[positive] = _window_logits(model, _take(train, positive), cfg.batch_size, device)
            sample = sample[
                np.isin(sample, witness_positives(train.user_index, window_labels, logits))
            ]
        # The first epoch takes every fraud window: weigh the classes as that epoch holds them.
        in_epoch = float(window_labels[sample].sum())
        bce = torch.nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor(
                min((len(sample) - in_epoch) / max(in_epoch, 1.0), 100.0), device=device
            )
        )
        epoch_windows = _take(train, sample)
        model.train()
        bar = tqdm(
            total=math.ceil(len(sample) / cfg.batch_size),
            desc=f"fine-tune epoch {epoch + 1}/{cfg.supervised_epochs}",
            unit="batch",
            disable=not progress,
        )
        for fields, mask, idx in _batches(
            epoch_windows, cfg.batch_size, shuffle=True, seed=cfg.seed + 1000 + epoch
        ):
            fields, mask = fields.to(device), mask.to(device)
            labels = labels_all[sample[idx]].to(device)
            with autocast(device):
                out = model(fields=fields, attention_mask=mask)
            loss = bce(out.sequence_logit.float(), labels) + cfg.finetune_nll_weight * out.nll_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        epochs_run = epoch + 1
        if not validate:
            continue
        assert val is not None and val_labels is not None
        val_loss = _sequence_loss(
            model, val, val_labels, pos_weight, cfg.batch_size, device, witness=cfg.witness_windows
        )
        history.append(round(val_loss, 4))
        if val_loss < best_loss - 1e-4:
            best_loss, best_epoch, bad_epochs = val_loss, epoch + 1, 0
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.supervised_patience:
                break
    if best_weights is not None:
        model.load_state_dict(best_weights)
    out: dict[str, float | int | str | None] = {
        "finetune_epochs": epochs_run,
        "finetune_best_epoch": best_epoch if validate else epochs_run,
        "finetune_val_loss": best_loss if validate else None,
        "finetune_val_history": history,  # type: ignore[dict-item]
        "positives": int(positives),  # fraud accounts when witness_windows, else windows
        "pos_weight": float(pos_weight),
    }
    if uncapped_weight > 100.0:
        # Fraud accounts with dozens of windows each: the classes are no longer balanced.
        out["pos_weight_capped_from"] = round(uncapped_weight, 1)
    if not validate:
        # Few labels: the validation users may hold no labelled fraud (or no legit), and then
        # nothing tells a good epoch from an overfit one. Say so where the metrics are read.
        out["finetune_unvalidated"] = (
            f"the validation users hold no labelled fraud or no labelled legit user: all "
            f"{epochs_run} epochs ran without early stopping; label more users and retrain"
        )
    return out


def training_labels(
    con: duckdb.DuckDBPyConnection, user_ids: Sequence[str]
) -> tuple[list[str], np.ndarray] | None:
    """(users, y): 1 = fraud, 0 = not fraud, NaN = unknown, from demo truth or analyst labels;
    None when fewer than 5 of either class (a head trained on less would be noise).

    With analyst labels, users without one count as not fraud (most accounts are not), but a
    user whose latest label is "unsure" is unknown: the analyst said it is neither, so neither
    the head nor the account-level model learns from it.
    """
    from core.evaluate import load_truth

    try:
        y, _ = load_truth(con, list(user_ids))
    except LookupError:
        return None
    y = np.asarray(y, dtype=float)
    truth_rows = con.execute("SELECT count(*) FROM truth_users").fetchone()
    if not (truth_rows and truth_rows[0]):  # load_truth read the analysts' labels
        unsure = {
            str(r[0])
            for r in con.execute(
                "SELECT user_id FROM labels WHERE user_id IN (SELECT unnest(?::VARCHAR[]))"
                " GROUP BY user_id HAVING lower(arg_max(label, created_at)) = 'unsure'",
                [[str(u) for u in user_ids]],
            ).fetchall()
        }
        y[[str(u) in unsure for u in user_ids]] = np.nan
    if np.nansum(y == 1) < 5 or np.nansum(y == 0) < 5:
        return None
    return list(user_ids), y


def _strict_json(value: Any) -> Any:
    """NaN and infinities as null, at any depth (other tools' JSON parsers refuse them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


def train_model(
    db: duckdb.DuckDBPyConnection | str | Path,
    cfg: TrainConfig,
    *,
    models_dir: Path,
    users: Sequence[str] | None = None,
    until: datetime | None = None,
    model_id: str | None = None,
    progress: bool = True,
    register: bool = True,
) -> TrainResult:
    """Fit featuriser, pretrain, optionally fine-tune, fit the score reference, save, register."""
    from core.scoring import fit_score_reference, register_model

    _seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model_id = model_id or new_model_id(cfg.size)
    path = Path(models_dir) / model_id
    path.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    with store.using(db) as con:
        events = load_events(con, users=users, end=until)
        all_labels = (
            training_labels(con, [str(u) for u in pa.compute.unique(events["user_id"]).to_pylist()])
            if cfg.supervised and events.num_rows
            else None
        )
    if events.num_rows == 0:
        raise ValueError("no events to train on (check --users-file / --until)")
    featurizer = SequenceFeaturizer().fit(events)
    encoded = featurizer.transform(events)
    windows = make_windows(encoded, max_len=cfg.max_len)
    is_val_user = _user_split(encoded.user_ids, cfg.val_share, cfg.seed)
    val_mask = is_val_user[windows.user_index]
    train_idx = np.flatnonzero(~val_mask)
    if cfg.max_train_windows is not None and len(train_idx) > cfg.max_train_windows:
        rng = np.random.default_rng(cfg.seed)
        train_idx = np.sort(rng.choice(train_idx, cfg.max_train_windows, replace=False))
    train_w, val_w = _take(windows, train_idx), _take(windows, np.flatnonzero(val_mask))

    config = BehaviorConfig.from_size(cfg.size, featurizer.vocab_sizes(), max_len=cfg.max_len)
    model = BehaviorModel(config)
    metrics: dict[str, float | int | str | None] = {
        "n_users": len(encoded.user_ids),
        "n_events": int(events.num_rows),
        "n_train_windows": len(train_idx),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
    }
    metrics.update(
        pretrain(
            model,
            train_w,
            val_w,
            cfg,
            device=device,
            checkpoint_dir=path / "checkpoint",
            progress=progress,
        )
    )

    metrics["supervised"] = False
    if cfg.supervised:
        y_user = (
            None
            if all_labels is None
            else pd.Series(all_labels[1], index=all_labels[0])
            .reindex(encoded.user_ids.astype(str))
            .to_numpy(float)
        )
        if y_user is None:
            metrics["supervised_skipped"] = "fewer than 5 fraud and 5 legit labelled users"
        else:
            window_y = y_user[train_w.user_index]
            keep = ~np.isnan(window_y)
            val_y = y_user[val_w.user_index]
            val_keep = ~np.isnan(val_y)
            metrics.update(
                finetune(
                    model,
                    _take(train_w, np.flatnonzero(keep)),
                    window_y[keep],
                    cfg,
                    device=device,
                    val=_take(val_w, np.flatnonzero(val_keep)),
                    val_labels=val_y[val_keep],
                    progress=progress,
                )
            )
            metrics["supervised"] = True
            model.config.has_supervised_head = True
            if cfg.calibrate_head:
                metrics.update(
                    calibrate_head(
                        model,
                        _take(val_w, np.flatnonzero(val_keep)),
                        val_y[val_keep],
                        batch_size=cfg.batch_size,
                        device=device,
                    )
                )

    aggregate = None
    metrics["aggregate_model"] = False
    if cfg.supervised and cfg.aggregate_model and all_labels is not None:
        from core.aggregate_model import AggregateModel

        with store.using(db) as con:
            aggregate = AggregateModel.fit(
                con, all_labels[0], all_labels[1], end=until, seed=cfg.seed
            )
        # Its trees need 10 users a leaf: from a dozen users they find no split, and a constant
        # probability in the pool would only water the head's evidence down.
        if aggregate.n_splits == 0:
            metrics["aggregate_skipped"] = (
                f"its trees found no split in {len(all_labels[0])} users"
                f" ({int(np.sum(all_labels[1] == 1))} labelled fraud)"
            )
            aggregate = None
        else:
            metrics["aggregate_model"] = True
            metrics["aggregate_trees"] = int(aggregate.booster.num_trees())

    model.eval()
    reference = fit_score_reference(model, featurizer, encoded, cfg, device=device)
    if aggregate is not None:
        aggregate.save(path)
    model.save_pretrained(path)
    featurizer.save(path)
    reference.save(path)
    (path / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    metrics = _strict_json(metrics)
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str, allow_nan=False))
    if register:  # evaluation runs train throw-away models that analysts should not see
        with store.using(db) as con:
            register_model(con, model_id, path, cfg, metrics)
    return TrainResult(model_id=model_id, path=path, metrics=metrics)
