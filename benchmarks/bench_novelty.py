"""Novel fraud: does fraudlens catch a fraud typology nobody has labelled yet?

Leave one typology out. The transformer is pretrained once, without labels, on the training
users of the demo world (unlabelled logs hold every kind of fraud, so that is fair). Then, for
each typology T, the supervised head and the account-level model are fitted on labels from
which T is missing: T's fraudsters count as unlabelled (legit), as novel fraud does until an
analyst labels it. LightGBM on aggregates, the supervised competitor, is fitted on the same
labels. Every scorer is then judged on T alone, in a world simulated with an unseen seed: T's
users against the normal users (the other typologies are left out of the ranking).

Measures, per held-out typology and scorer: AUPRC of T against normal users, and recall of T
at a 1% alert budget of all those users; plus the share of T's users on Triage's "unusual but
not alerted" list (unsupervised percentile >= L, combined score under the budget's cut) at
each level L the list offers, and how many users that list holds.
Writes results/bench_novelty.{json,md}.

    .venv/bin/python benchmarks/bench_novelty.py          # demo world, 3,000 users (~20 min)
    .venv/bin/python benchmarks/bench_novelty.py --quick  # 400 users, 1 epoch: a smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks._common import write_results  # noqa: E402


def _users(con) -> np.ndarray:
    rows = con.execute("SELECT DISTINCT user_id FROM events ORDER BY user_id").fetchall()
    return np.array([r[0] for r in rows], dtype=object)


def main() -> None:
    import torch
    from sklearn.metrics import average_precision_score

    from core import store
    from core.alerts import WATCH_LEVELS
    from core.baselines import AggregateFeaturizer, LightGBMScorer, LOFScorer, load_user_data
    from core.demo import build_demo
    from core.evaluate import budget_alerts, load_truth, split_users
    from core.scoring import load_model, score_users
    from core.simulate import WorldConfig
    from core.train import TrainConfig, train_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unseen-seed", type=int, default=1001)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    n_users, epochs, sup_epochs = (400, 1, 3) if args.quick else (3000, 6, 20)
    budget_share = 0.01

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-novelty-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        world = WorldConfig(n_users=n_users, days=30, fraud_rate=0.05, seed=args.seed)
        build_demo(work / "train.duckdb", world)
        build_demo(work / "unseen.duckdb", replace(world, seed=args.unseen_seed))
        with store.open_db(work / "train.duckdb") as con:
            train_users = split_users(_users(con), seed=args.seed)["train"]
            typologies = sorted(
                r[0] for r in con.execute("SELECT DISTINCT typology FROM truth_users").fetchall()
            )
        with store.open_db(work / "unseen.duckdb") as con:
            unseen_users = _users(con)
            y_unseen, typ_unseen = load_truth(con, unseen_users)
        seconds = {"worlds": time.perf_counter() - started}

        cfg = TrainConfig(size="small", epochs=epochs, supervised_epochs=sup_epochs, seed=args.seed)
        started = time.perf_counter()
        base = train_model(
            work / "train.duckdb",
            replace(cfg, supervised=False),
            models_dir=work / "models",
            users=list(train_users),
            model_id="pretrained",
            progress=False,
            register=False,
        )
        seconds["pretrain"] = time.perf_counter() - started

        started = time.perf_counter()
        for held_out in typologies:
            # labels without the held-out typology: its fraudsters look like everyone else
            db = work / f"without_{held_out}.duckdb"
            shutil.copy(work / "train.duckdb", db)
            with store.open_db(db) as con:
                con.execute("DELETE FROM truth_users WHERE typology = ?", [held_out])
            model_dir = work / "models" / f"without_{held_out}"
            shutil.copytree(base.path / "checkpoint", model_dir / "checkpoint")
            # the finished pretraining checkpoint resumes with no epoch left: only the head
            # and the account-level model are fitted on these labels
            trained = train_model(
                db,
                cfg,
                models_dir=work / "models",
                users=list(train_users),
                model_id=f"without_{held_out}",
                progress=False,
                register=False,
            )
            loaded = load_model(trained.path)
            with store.open_db(work / "unseen.duckdb") as con:
                frame = score_users(con, loaded, list(unseen_users), write=False)
            frame = frame.set_index("user_id").reindex([str(u) for u in unseen_users])
            with store.open_db(db) as con:
                featurizer = AggregateFeaturizer().fit(con, list(train_users))
                train_data = load_user_data(con, list(train_users), featurizer)
                y_train, _ = load_truth(con, train_users)
            lgbm = LightGBMScorer(random_state=args.seed).fit(train_data, y_train)
            lof = LOFScorer(random_state=args.seed).fit(train_data)
            with store.open_db(work / "unseen.duckdb") as con:
                unseen_data = load_user_data(con, list(unseen_users), featurizer)
            scores = {
                "transformer_unsupervised": frame["score_unsupervised"].to_numpy(float),
                "transformer_supervised": frame["score_supervised"].to_numpy(float),
                "transformer_combined": frame["score"].to_numpy(float),
                "lof": np.asarray(lof.decision_function(unseen_data), float),
                "lightgbm": np.asarray(lgbm.decision_function(unseen_data), float),
            }
            # T against normal users; the other typologies leave the ranking
            judged = (typ_unseen == held_out) | (y_unseen == 0)
            y = (typ_unseen[judged] == held_out).astype(int)
            n_alerts = budget_alerts(int(judged.sum()), budget_share)
            combined = scores["transformer_combined"][judged]
            cut = np.sort(np.nan_to_num(combined, nan=-np.inf))[::-1][n_alerts - 1]
            pct = frame["percentile_unsupervised"].to_numpy(float)[judged]
            # Triage's list at its default and at the looser cuts it offers: T's share on it,
            # and how many users the list holds per 1,000 judged users (its cost to read)
            watch = {}
            for level in WATCH_LEVELS:
                listed = (pct >= level) & (combined < cut)
                watch[f"on_watchlist_{level:g}"] = round(float(listed[y == 1].mean()), 3)
                watch[f"listed_per_1000_{level:g}"] = round(1000 * float(listed.mean()), 1)
            for name, s in scores.items():
                s = np.nan_to_num(s[judged], nan=-np.inf)
                top = np.argsort(-s, kind="stable")[:n_alerts]
                rows.append(
                    {
                        "held_out": held_out,
                        "scorer": name,
                        "users": int(y.sum()),
                        "auprc": round(float(average_precision_score(y, s)), 3),
                        "recall_at_1pct": round(float(y[top].sum() / max(y.sum(), 1)), 3),
                        **(watch if name == "transformer_combined" else dict.fromkeys(watch, "")),
                    }
                )
            print(held_out, [(r["scorer"], r["auprc"]) for r in rows[-len(scores) :]], flush=True)
        seconds["held_out_fits_and_scoring"] = time.perf_counter() - started

    for name in ("transformer_unsupervised", "transformer_combined", "lof", "lightgbm"):
        mine = [r for r in rows if r["scorer"] == name]
        rows.append(
            {
                "held_out": "mean",
                "scorer": name,
                "users": sum(int(r["users"]) for r in mine),
                "auprc": round(float(np.mean([r["auprc"] for r in mine])), 3),
                "recall_at_1pct": round(float(np.mean([r["recall_at_1pct"] for r in mine])), 3),
                **{
                    k: round(float(np.mean([r[k] for r in mine])), 3) if mine[0][k] != "" else ""
                    for k in mine[0]
                    if k.startswith(("on_watchlist", "listed_per"))
                },
            }
        )
    extra = {
        "mode": "quick" if args.quick else "default",
        "worlds": f"train seed {args.seed}, unseen seed {args.unseen_seed}, {n_users} users, "
        "30 days, 5% fraud",
        "training": f"small, {epochs} pretraining epochs once (no labels), then per held-out "
        f"typology the head (<= {sup_epochs} epochs) and the account-level model on labels "
        "without it; LightGBM and LOF on the same users and labels",
        "judged": "the held-out typology's users against the normal users of the unseen world; "
        "recall_at_1pct = share of them among the top 1% of those users; on_watchlist_L = "
        "share with unsupervised percentile >= L whose combined score is under the 1% cut "
        "(Triage's 'unusual but not alerted' list at level L); listed_per_1000_L = users of "
        "any kind on that list per 1,000 judged users",
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    path = write_results("bench_novelty", rows, extra)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
