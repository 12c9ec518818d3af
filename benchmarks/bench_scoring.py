"""Scoring benchmark: events/s of our causal transformer vs a DeepLog-style LSTM vs LogBERT-style
masked scoring, on the same data, machine and run; peak RSS of batch scoring at scale; training
events/s; and, when CUDA is present, `base` in bf16. Writes results/bench_scoring.{json,md}.

    .venv/bin/python benchmarks/bench_scoring.py           # 3,000-user world; RSS at 1M and 3M
    .venv/bin/python benchmarks/bench_scoring.py --full    # ... and RSS at 10M events too
    .venv/bin/python benchmarks/bench_scoring.py --quick   # small sizes: a smoke run (~2 min)

Why these competitors are set up the way they are:
- ours (`small`, batch 64): one causal forward pass per window scores every event in it;
  timed on featurise + score_encoded over events already in memory (`model`), and through
  score_users from DuckDB (`end to end`, no write).
- DeepLog-style: core.baselines.DeepLogScorer scoring windows of h=10 events in batches of
  2,048 (its own batching, not one window at a time), encoding included.
- LogBERT-style: a bidirectional BERT encoder of the same width and depth as `small`, randomly
  initialised (speed does not depend on the weights). Scoring an event means masking it and
  predicting it, so a sequence of L events takes L forward passes of length L + 1; the L masked
  copies are batched (64 rows), as LogBERT batches masked positions. Timed on a seeded sample of
  users (the model alone, no featurisation: flattering to LogBERT).
- `medium` (the previous CPU default, 128 wide and 4 deep) is timed too, with random weights
  (speed does not depend on them), to show what `small` gains.
- The model is pretrained without labels (speed does not depend on the head) and given an
  account-level model fitted on the world's truth, so end-to-end scoring and peak RSS include
  its per-chunk DuckDB aggregates and LightGBM, as `fraudlens score` does with a labelled model.
- Peak RSS: each size runs `score_users(..., write=True)` — the `fraudlens score` batch job — in
  its own subprocess, so the figure is that size's own peak. 10M events adds ~15 min on 2 CPU
  cores (world build, ingest and scoring), hence behind --full.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks._common import peak_rss_mib, write_results  # noqa: E402

T = TypeVar("T")
BATCH_SIZE = 64
MAX_LEN = 256


@dataclass(frozen=True)
class Plan:
    users: int  # throughput world
    days: int
    train_windows: int | None  # cap on pretraining windows (None: one full epoch)
    logbert_users: int
    rss_events: tuple[int, ...]
    repeats: int  # best-of for the throughput timings (LogBERT, minutes long, runs once)


QUICK = Plan(
    users=300, days=10, train_windows=64, logbert_users=6, rss_events=(50_000, 150_000), repeats=2
)
DEFAULT = Plan(
    users=3000,
    days=30,
    train_windows=None,
    logbert_users=48,
    rss_events=(1_000_000, 3_000_000),
    repeats=3,
)
FULL = Plan(
    users=3000,
    days=30,
    train_windows=None,
    logbert_users=48,
    rss_events=(1_000_000, 3_000_000, 10_000_000),
    repeats=3,
)


def log(message: str) -> None:
    print(f"[bench_scoring] {message}", file=sys.stderr, flush=True)


# -- data ---------------------------------------------------------------------------------------


def build_world(db_path: Path, users: int, days: int, seed: int) -> None:
    """build_demo in a subprocess: the simulator's frames never inflate this process's RSS."""
    code = (
        "import sys; from core.demo import build_demo; from core.simulate import WorldConfig; "
        "build_demo(sys.argv[1], WorldConfig(n_users=int(sys.argv[2]), days=int(sys.argv[3]), "
        "seed=int(sys.argv[4])))"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(db_path), str(users), str(days), str(seed)],
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def count_events(db_path: Path) -> tuple[int, int]:
    from core import store

    with store.open_db(db_path, read_only=True) as con:
        row = con.execute("SELECT count(*), count(DISTINCT user_id) FROM events").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# -- LogBERT-style masked scoring ------------------------------------------------------------------


def logbert_model(n_types: int, device: object) -> tuple[object, int, int]:
    """A BERT MLM the size of `small` over event-type tokens; returns (model, mask_id, dist_id)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from core.model import MODEL_SIZES

    size = MODEL_SIZES["small"]
    mask_id, dist_id = n_types, n_types + 1  # after the featuriser's event_type indices
    config = BertConfig(
        vocab_size=n_types + 2,
        hidden_size=size["hidden_size"],
        num_hidden_layers=size["n_layers"],
        num_attention_heads=size["n_heads"],
        intermediate_size=4 * size["hidden_size"],
        max_position_embeddings=MAX_LEN + 1,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return BertForMaskedLM(config).to(device).eval(), mask_id, dist_id


def logbert_score(
    model: object, sequences: list[np.ndarray], mask_id: int, dist_id: int, device: object
) -> np.ndarray:
    """Per-event NLL with each event masked in turn: L forward rows per sequence of L events."""
    import torch

    out: list[np.ndarray] = []
    with torch.no_grad():
        for seq in sequences:
            tokens = torch.as_tensor(np.concatenate([[dist_id], seq]), device=device)
            n = len(seq)
            positions = torch.arange(1, n + 1, device=device)
            nll = np.empty(n, dtype=np.float32)
            for lo in range(0, n, BATCH_SIZE):
                pos = positions[lo : lo + BATCH_SIZE]
                rows = tokens.repeat(len(pos), 1)
                rows[torch.arange(len(pos), device=device), pos] = mask_id
                logits = model(input_ids=rows).logits  # type: ignore[operator]
                picked = logits[torch.arange(len(pos), device=device), pos].float()
                logp = torch.log_softmax(picked, dim=-1)
                nll[lo : lo + len(pos)] = (
                    (-logp.gather(1, tokens[pos][:, None]).squeeze(1)).cpu().numpy()
                )
            out.append(nll)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# -- peak RSS child -------------------------------------------------------------------------------


def _vm_mib(key: str) -> float:
    """VmHWM / VmRSS of this process from /proc. Unlike ru_maxrss, the high-water mark starts
    afresh at exec: a child forked from a big parent would otherwise report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()  # not Linux: ru_maxrss (may include the parent's peak at fork)


def rss_child(db_path: Path, model_dir: Path) -> None:
    """Runs in its own process: load the model, batch-score every user, report the peak."""
    import torch

    from core import store
    from core.scoring import load_model, score_users

    loaded = load_model(model_dir)
    after_load = _vm_mib("VmRSS")
    started = time.perf_counter()
    with store.open_db(db_path) as con:
        scores = score_users(con, loaded, write=True)
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "users": len(scores),
                "events": int(scores["n_events"].sum()),
                "seconds": seconds,
                "rss_after_load_mib": after_load,
                "peak_rss_mib": _vm_mib("VmHWM"),
                "device": str(loaded.device),
                "threads": torch.get_num_threads(),
            }
        )
    )


def measure_rss(db_path: Path, model_dir: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(db_path), str(model_dir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the benchmark ----------------------------------------------------------------------------


def timed(fn: Callable[..., T], *args: object, **kwargs: object) -> tuple[T, float]:
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - started


def best_of(repeats: int, fn: Callable[..., T], *args: object, **kwargs: object) -> tuple[T, float]:
    """The fastest of ``repeats`` runs (timeit's rule: slower runs measure other load)."""
    runs = [timed(fn, *args, **kwargs) for _ in range(max(repeats, 1))]
    return min(runs, key=lambda run: run[1])


def run(plan: Plan, work: Path, mode: str) -> Path:
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    from core import store
    from core.baselines import DeepLogScorer, UserData
    from core.model import BehaviorConfig, BehaviorModel
    from core.scoring import load_model, score_encoded, score_users
    from core.sequences import FIELDS, load_events, make_windows
    from core.train import TrainConfig, train_model

    rows: list[dict[str, object]] = []
    threads = torch.get_num_threads()
    cpu = torch.device("cpu")

    # The throughput world, and the small model trained on it (its metrics give training speed).
    db_path = work / "throughput.duckdb"
    if not db_path.exists():
        log(f"building the throughput world: {plan.users:,} users, {plan.days} days")
        build_world(db_path, plan.users, plan.days, seed=0)
    n_events, n_users = count_events(db_path)
    log(f"{n_events:,} events of {n_users:,} users; training `small` (1 epoch)")
    cfg = TrainConfig(
        size="small",
        epochs=1,
        max_len=MAX_LEN,
        supervised=False,
        device="cpu",
        max_train_windows=plan.train_windows,
    )
    with store.open_db(db_path) as con:
        trained = train_model(con, cfg, models_dir=work / "models", progress=False)
    train_tps = float(trained.metrics["train_tokens_per_s"])  # type: ignore[arg-type]
    rows.append(
        {
            "measure": "pretraining",
            "scorer": "ours small",
            "device": "cpu",
            "events_per_s": round(train_tps, 1),
            "note": f"train_tokens_per_s from train metrics, batch {cfg.batch_size}, "
            f"{trained.metrics['n_train_windows']} windows",
        }
    )
    # Batch scoring of a model trained with labels also runs the account-level model (DuckDB
    # aggregates + LightGBM per chunk of users): fit one on the world's truth, so that the end
    # to end and peak RSS rows measure what `fraudlens score` does. The sequence head itself
    # (a linear layer on pooled states) does not change scoring cost; it is left out.
    from core.aggregate_model import AggregateModel
    from core.evaluate import load_truth

    with store.open_db(db_path, read_only=True) as con:
        labelled = [r[0] for r in con.execute("SELECT DISTINCT user_id FROM events").fetchall()]
        y_truth, _ = load_truth(con, labelled)
        AggregateModel.fit(con, labelled, y_truth).save(trained.path)
    loaded = load_model(trained.path, device="cpu")
    assert loaded.aggregate is not None

    with store.open_db(db_path, read_only=True) as con:
        events = load_events(con)
    user_ids = np.asarray(sorted(set(events.column("user_id").to_pylist())), dtype=object)

    # Ours: featurise + one forward pass per window (events already in memory).
    warm = loaded.featurizer.transform(events.slice(0, 2000))
    score_encoded(loaded.model, warm, max_len=MAX_LEN, device=cpu, batch_size=BATCH_SIZE)

    def ours_model() -> int:
        encoded = loaded.featurizer.transform(events)
        score_encoded(loaded.model, encoded, max_len=MAX_LEN, device=cpu, batch_size=BATCH_SIZE)
        return encoded.n_events

    _, ours_s = best_of(plan.repeats, ours_model)
    ours_eps = n_events / ours_s
    log(f"ours small (model): {ours_eps:,.0f} events/s")

    medium_config = BehaviorConfig.from_size(
        "medium", loaded.featurizer.vocab_sizes(), max_len=MAX_LEN
    )
    torch.manual_seed(0)
    medium = BehaviorModel(medium_config).eval()

    def medium_model() -> int:
        encoded = loaded.featurizer.transform(events)
        score_encoded(medium, encoded, max_len=MAX_LEN, device=cpu, batch_size=BATCH_SIZE)
        return encoded.n_events

    medium_model()  # warm-up
    _, medium_s = best_of(plan.repeats, medium_model)
    log(f"ours medium (model): {n_events / medium_s:,.0f} events/s")
    rows.append(
        {
            "measure": "scoring",
            "scorer": "ours small (featurise + model)",
            "device": "cpu",
            "events": n_events,
            "seconds": round(ours_s, 2),
            "events_per_s": round(ours_eps, 1),
            "note": f"score_encoded, batch {BATCH_SIZE}, windows of {MAX_LEN}, "
            f"{sum(p.numel() for p in loaded.model.parameters()):,} parameters",
        }
    )
    rows.append(
        {
            "measure": "scoring",
            "scorer": "ours medium (featurise + model)",
            "device": "cpu",
            "events": n_events,
            "seconds": round(medium_s, 2),
            "events_per_s": round(n_events / medium_s, 1),
            "note": f"the previous CPU default; random weights (speed only), "
            f"{sum(p.numel() for p in medium.parameters()):,} parameters",
        }
    )
    with store.open_db(db_path, read_only=True) as con:
        scored, e2e_s = best_of(
            plan.repeats, score_users, con, loaded, write=False, batch_size=BATCH_SIZE
        )
    e2e_events = int(scored["n_events"].sum())  # type: ignore[index]
    rows.append(
        {
            "measure": "scoring",
            "scorer": "ours small (score_users end to end)",
            "device": "cpu",
            "events": e2e_events,
            "seconds": round(e2e_s, 2),
            "events_per_s": round(e2e_events / e2e_s, 1),
            "note": "DuckDB read + featurise + model, chunks of 2,000 users, no write",
        }
    )

    # DeepLog-style LSTM: fitted briefly (speed does not depend on how well it learned).
    deeplog = DeepLogScorer(max_epochs=1, max_windows_per_epoch=20_000, random_state=0)
    data = UserData(user_ids=user_ids, events=events)
    deeplog.fit(data)
    deeplog.decision_function(UserData(user_ids=user_ids[:20], events=events))  # warm-up
    _, deeplog_s = best_of(plan.repeats, deeplog.decision_function, data)
    deeplog_eps = n_events / deeplog_s
    log(f"DeepLog-style LSTM: {deeplog_eps:,.0f} events/s")
    rows.append(
        {
            "measure": "scoring",
            "scorer": "DeepLog-style LSTM",
            "device": "cpu",
            "events": n_events,
            "seconds": round(deeplog_s, 2),
            "events_per_s": round(deeplog_eps, 1),
            "note": f"h={deeplog.window}, 2x{deeplog.hidden_size} LSTM, "
            f"{deeplog.batch_size * 4} windows per batch, encoding included",
        }
    )

    # LogBERT-style: a seeded sample of users, each window's events masked one at a time.
    encoded_all = loaded.featurizer.transform(events)
    windows = make_windows(encoded_all, max_len=MAX_LEN)
    rng = np.random.default_rng(0)
    first_window = np.flatnonzero(np.r_[True, np.diff(windows.user_index) > 0])
    n_sample = min(plan.logbert_users, len(first_window))
    sample = rng.choice(first_window, size=n_sample, replace=False)
    type_col = FIELDS.index("event_type")
    sequences = [windows.fields[i, windows.mask[i], type_col].astype(np.int64) for i in sample]
    n_types = int(loaded.featurizer.vocab_sizes()["event_type"])
    bert, mask_id, dist_id = logbert_model(n_types, cpu)
    logbert_score(bert, sequences[:1], mask_id, dist_id, cpu)  # warm-up
    _, bert_s = timed(logbert_score, bert, sequences, mask_id, dist_id, cpu)
    bert_events = int(sum(len(s) for s in sequences))
    bert_eps = bert_events / bert_s
    log(f"LogBERT-style masked: {bert_eps:,.0f} events/s over {bert_events:,} events")
    rows.append(
        {
            "measure": "scoring",
            "scorer": "LogBERT-style masked (one pass per position)",
            "device": "cpu",
            "events": bert_events,
            "seconds": round(bert_s, 2),
            "events_per_s": round(bert_eps, 1),
            "note": f"{len(sequences)} users' first windows (mean length "
            f"{bert_events / max(len(sequences), 1):.0f}), {BATCH_SIZE} masked rows per batch, "
            f"{sum(p.numel() for p in bert.parameters()):,} parameters",  # type: ignore[attr-defined]
        }
    )
    # Ours over exactly the LogBERT sample, model alone as for LogBERT: like for like.
    sample_users = windows.user_index[sample]
    chosen = pa.array([str(u) for u in encoded_all.user_ids[sample_users]])
    sample_table = events.filter(pc.is_in(events.column("user_id"), value_set=chosen))
    sample_encoded = loaded.featurizer.transform(sample_table)
    _, ours_sample_s = best_of(
        plan.repeats,
        score_encoded,
        loaded.model,
        sample_encoded,
        max_len=MAX_LEN,
        device=cpu,
        batch_size=BATCH_SIZE,
    )
    ours_sample_eps = sample_encoded.n_events / ours_sample_s

    # GPU: the same code path on CUDA; `base` in bf16 (random weights: speed only).
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        gpu_encoded = loaded.featurizer.transform(events)
        for size, batch in (("small", BATCH_SIZE), ("base", BATCH_SIZE), ("base", 256)):
            if size == "small":
                model = BehaviorModel.from_pretrained(trained.path).to(gpu).eval()
            else:
                config = BehaviorConfig.from_size(
                    "base", loaded.featurizer.vocab_sizes(), max_len=MAX_LEN
                )
                torch.manual_seed(0)
                model = BehaviorModel(config).to(gpu).eval()
            score_encoded(model, warm, max_len=MAX_LEN, device=gpu, batch_size=batch)
            torch.cuda.synchronize()
            _, gpu_s = best_of(
                plan.repeats,
                score_encoded,
                model,
                gpu_encoded,
                max_len=MAX_LEN,
                device=gpu,
                batch_size=batch,
            )
            rows.append(
                {
                    "measure": "scoring",
                    "scorer": f"ours {size} bf16",
                    "device": torch.cuda.get_device_name(0),
                    "events": n_events,
                    "seconds": round(gpu_s, 2),
                    "events_per_s": round(n_events / gpu_s, 1),
                    "note": f"score_encoded, batch {batch}, "
                    f"{sum(p.numel() for p in model.parameters()):,} parameters",
                }
            )
            log(f"ours {size} bf16 on CUDA, batch {batch}: {n_events / gpu_s:,.0f} events/s")
            del model
        bert_gpu, mask_id, dist_id = logbert_model(n_types, gpu)
        logbert_score(bert_gpu, sequences[:1], mask_id, dist_id, gpu)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, bert_gpu_s = timed(logbert_score, bert_gpu, sequences, mask_id, dist_id, gpu)
        rows.append(
            {
                "measure": "scoring",
                "scorer": "LogBERT-style masked bf16",
                "device": torch.cuda.get_device_name(0),
                "events": bert_events,
                "seconds": round(bert_gpu_s, 2),
                "events_per_s": round(bert_events / bert_gpu_s, 1),
                "note": "same sample as on CPU",
            }
        )

    # Peak RSS of the batch job at scale, each size in its own process.
    rate = n_events / (n_users * plan.days)  # events per user per day in the demo world
    for target in plan.rss_events:
        users = max(math.ceil(target / (rate * 30)), 10)
        size_db = work / f"rss_{target}.duckdb"
        if not size_db.exists():
            log(f"building a {users:,}-user world for ~{target:,} events")
            _, build_s = timed(build_world, size_db, users, 30, 1)
            log(f"built in {build_s:.0f} s")
        log(f"scoring ~{target:,} events in a subprocess")
        child = measure_rss(size_db, trained.path)
        rows.append(
            {
                "measure": "peak RSS (score_users, write=True)",
                "scorer": "ours small",
                "device": child["device"],
                "events": child["events"],
                "seconds": round(float(child["seconds"]), 1),  # type: ignore[arg-type]
                "events_per_s": round(int(child["events"]) / float(child["seconds"]), 1),  # type: ignore[arg-type]
                "peak_rss_mib": round(float(child["peak_rss_mib"]), 1),  # type: ignore[arg-type]
                "note": f"{child['users']:,} users; {child['threads']} threads; VmHWM; RSS "
                f"after model load "
                f"{float(child['rss_after_load_mib']):,.0f} MiB",  # type: ignore[arg-type]
            }
        )
        log(f"{child['events']:,} events: peak RSS {float(child['peak_rss_mib']):,.0f} MiB")

    extra: dict[str, object] = {
        "mode": mode,
        "torch_threads": threads,
        "world": f"demo world, {n_users:,} users, {plan.days} days, {n_events:,} events",
        "ratio_ours_over_logbert": round(ours_eps / bert_eps, 1),
        "ratio_ours_over_logbert_same_sample": round(ours_sample_eps / bert_eps, 1),
        "ratio_ours_over_deeplog": round(ours_eps / deeplog_eps, 2),
        "training_events_per_s": round(train_tps, 1),
        "quality": "reported by `fraudlens evaluate`, not here",
    }
    if mode != "full":
        extra["note"] = (
            "10M-event peak RSS runs only with --full (well over 15 min on 2 CPU cores)"
            if mode == "default"
            else "--quick: smoke-run sizes; not the issue's figures"
        )
    return write_results("bench_scoring", rows, extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    group.add_argument("--full", action="store_true", help="also peak RSS at 10M events")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep generated worlds and the model here (reused by a later run); default: a "
        "temporary folder, removed at the end",
    )
    parser.add_argument("--rss-child", nargs=2, metavar=("DB", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(Path(args.rss_child[0]), Path(args.rss_child[1]))
        return
    plan, mode = (
        (QUICK, "quick")
        if args.quick
        else (FULL, "full")
        if args.full
        else (
            DEFAULT,
            "default",
        )
    )
    started = time.perf_counter()
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        out = run(plan, args.work_dir, mode)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmp:
            out = run(plan, Path(tmp), mode)
    log(f"done in {time.perf_counter() - started:.0f} s: {out}")
    print(out.read_text())


if __name__ == "__main__":
    main()
