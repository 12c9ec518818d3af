"""Which window does the supervised head call fraud? On fraud accounts that have both windows
holding injected fraud (`truth_events`) and windows holding none (their life before the fraud),
the share whose highest-scoring window, the one scoring reports, holds the fraud, and the mean
head logit of each kind of window. Run it on models trained with `fraudlens train
--witness-windows` (the default) and `--every-fraud-window` on the same database.
Writes results/<name>.{json,md}.

    .venv/bin/python benchmarks/bench_witness.py --db W.duckdb --model LABEL=PATH [--model ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import write_results  # noqa: E402
from core import store  # noqa: E402
from core.scoring import load_model  # noqa: E402
from core.sequences import load_events, make_windows  # noqa: E402
from core.train import _take, _window_logits, training_labels  # noqa: E402


def witness_rows(db: str, label: str, model_path: str) -> dict[str, object]:
    loaded = load_model(model_path, device="cpu")
    with store.open_db(db, read_only=True) as con:
        events = load_events(con)
        users, y = training_labels(
            con, [str(u) for u in pa.compute.unique(events["user_id"]).to_pylist()]
        )
        truth = {int(r[0]) for r in con.execute("SELECT event_id FROM truth_events").fetchall()}
    encoded = loaded.featurizer.transform(events)
    windows = make_windows(encoded, max_len=loaded.model.config.max_len)
    y_window = pd.Series(y, index=users).reindex(encoded.user_ids.astype(str)).to_numpy(float)
    y_window = y_window[windows.user_index]
    holds_fraud = np.array(
        [any(int(e) in truth for e in row[row >= 0]) for row in windows.event_ids]
    )
    fraud_windows = np.flatnonzero(y_window == 1)
    logits = _window_logits(loaded.model, _take(windows, fraud_windows), 64, torch.device("cpu"))
    frame = pd.DataFrame(
        {
            "user": windows.user_index[fraud_windows],
            "holds": holds_fraud[fraud_windows],
            "logit": logits,
        }
    )
    mixed = frame.groupby("user").filter(lambda g: bool(g.holds.any() and not g.holds.all()))
    witness = mixed.loc[mixed.groupby("user").logit.idxmax()]
    return {
        "model": label,
        "model_id": Path(model_path).name,
        "database": Path(db).name,
        "fraud_accounts_with_clean_and_fraud_windows": int(mixed.user.nunique()),
        "top_window_holds_fraud_share": round(float(witness.holds.mean()), 3),
        "mean_logit_fraud_windows": round(float(mixed[mixed.holds].logit.mean()), 2),
        "mean_logit_clean_windows_of_fraud_accounts": round(
            float(mixed[~mixed.holds].logit.mean()), 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", action="append", required=True, help="once per --model, or once")
    parser.add_argument("--model", action="append", required=True, help="LABEL=PATH")
    parser.add_argument("--name", default="bench_witness")
    args = parser.parse_args()
    dbs = args.db * len(args.model) if len(args.db) == 1 else args.db
    if len(dbs) != len(args.model):
        parser.error("give one --db, or one per --model")
    rows = []
    for db, spec in zip(dbs, args.model, strict=True):
        label, _, path = spec.partition("=")
        rows.append(witness_rows(db, label, path))
        print(rows[-1], flush=True)
    write_results(
        args.name,
        rows,
        {
            "definition": "fraud accounts (labels as training reads them) with at least one window "
            "holding an injected fraud event and one holding none; top_window_holds_fraud_share = "
            "share whose highest-logit window holds fraud (scoring reports that window); mean "
            "logits of the head over their fraud and clean windows. In-sample: the models were "
            "trained on most of these accounts.",
        },
    )


if __name__ == "__main__":
    main()
