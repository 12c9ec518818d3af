"""Evaluation metrics against hand-computed values, user splits, ground truth loading."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pandas as pd
import pytest

from core.evaluate import (
    ScorerMetrics,
    best_f1_threshold,
    evaluate_scores,
    kfold_users,
    load_truth,
    metrics_table_markdown,
    split_users,
    threshold_table,
)

# Ten users ranked by score 10..1; the fraudsters sit at ranks 1, 3 and 10.
Y = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1])
S = np.arange(10, 0, -1, dtype=float)
TYP = np.array(["ato", "", "card", "", "", "", "", "", "", "ato"], dtype=object)
# Validation: alerting at >= 4.5 gives F1 0.8 there (the best); on the test users the best
# threshold would be 8 (F1 2/3), but the validation choice must be used: F1 = 2*2/(6+3).
VAL_Y = np.array([1, 1, 0, 0])
VAL_S = np.array([9.5, 4.5, 6.5, 1.5])


def test_metrics_match_hand_computed_values() -> None:
    m = evaluate_scores(
        "toy",
        Y,
        S,
        typologies=TYP,
        val_scores=VAL_S,
        val_true=VAL_Y,
        ks=(1, 3, 5, 20),
        budget_share=0.2,
    )
    assert (m.n_users, m.n_positive) == (10, 3)
    assert m.precision_at_k[1] == 1.0
    assert m.precision_at_k[3] == pytest.approx(2 / 3)
    assert m.precision_at_k[5] == pytest.approx(2 / 5)
    assert math.isnan(m.precision_at_k[20])  # fewer than 20 users
    # 20% of 10 users = 2 alerts: ranks 1-2 hold one of three fraudsters
    assert m.n_alerts_at_budget == 2
    assert m.recall_at_budget == pytest.approx(1 / 3)
    assert m.precision_at_budget == pytest.approx(1 / 2)
    assert m.auroc == pytest.approx(13 / 21)  # positive-negative pairs ordered right
    assert m.auprc == pytest.approx((1 + 2 / 3 + 3 / 10) / 3)
    assert m.recall_per_typology == {"ato": 0.5, "card": 0.0}
    assert m.threshold == 4.5
    assert m.f1_at_val_threshold == pytest.approx(4 / 9)


def test_budget_rounds_up_and_nan_scores_rank_last() -> None:
    y = np.r_[np.ones(2), np.zeros(148)]
    s = np.r_[np.nan, 5.0, np.linspace(0, 1, 148)]
    m = evaluate_scores("nan", y, s, budget_share=0.01)
    assert m.n_alerts_at_budget == 2  # ceil(1.5)
    assert m.recall_at_budget == 0.5  # the NaN-scored fraudster is ranked last
    assert m.auroc == pytest.approx(0.5)


def test_threshold_table_matches_brute_force() -> None:
    table = threshold_table(Y, S, thresholds=[8.0, 4.5])
    assert list(table.columns) == [
        "threshold",
        "alerts",
        "tp",
        "fp",
        "fn",
        "precision",
        "recall",
        "f1",
    ]
    assert table["threshold"].tolist() == [4.5, 8.0]
    assert table["alerts"].tolist() == [6, 3]
    assert table["tp"].tolist() == [2, 2] and table["fp"].tolist() == [4, 1]
    assert table["fn"].tolist() == [1, 1]
    np.testing.assert_allclose(table["precision"], [1 / 3, 2 / 3])
    np.testing.assert_allclose(table["f1"], [4 / 9, 2 / 3])

    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.1).astype(int)
    s = rng.normal(size=300) + y
    full = threshold_table(y, s)
    assert len(full) == 101  # more than 200 distinct scores: percentiles
    for row in full.sample(10, random_state=0).itertuples():
        alert = s >= row.threshold
        assert row.alerts == alert.sum() and row.tp == (alert & (y == 1)).sum()
        assert row.recall == pytest.approx((alert & (y == 1)).sum() / y.sum())
    assert full["alerts"].is_monotonic_decreasing
    best = full.loc[full["f1"].idxmax(), "f1"]
    assert best <= threshold_table(y, s, [best_f1_threshold(y, s)])["f1"].iloc[0] + 1e-12


def test_threshold_table_without_labels_counts_alerts_only() -> None:
    table = threshold_table(None, [0.1, 0.5, 0.5, np.nan])
    assert table["threshold"].tolist() == [0.1, 0.5]
    assert table["alerts"].tolist() == [3, 2]
    assert table["precision"].isna().all()


def test_degenerate_inputs_give_nan_without_raising() -> None:
    empty = evaluate_scores("empty", [], [], val_scores=[], val_true=[])
    assert empty.n_users == 0
    assert all(
        math.isnan(v) for v in (empty.auprc, empty.auroc, empty.recall_at_budget, empty.threshold)
    )
    assert all(math.isnan(v) for v in empty.precision_at_k.values())
    one_class = evaluate_scores(
        "normal only", np.zeros(50), np.arange(50.0), val_scores=[1, 2], val_true=[0, 0]
    )
    assert math.isnan(one_class.auprc) and math.isnan(one_class.auroc)
    assert math.isnan(one_class.recall_at_budget) and math.isnan(one_class.threshold)
    assert one_class.precision_at_k[10] == 0.0
    all_fraud = evaluate_scores("fraud only", np.ones(5), np.arange(5.0))
    assert math.isnan(all_fraud.auroc) and all_fraud.recall_at_budget == 0.2
    assert threshold_table([], []).empty
    with pytest.raises(ValueError):
        evaluate_scores("bug", [0, 1], [0.5])  # a length mismatch is a bug, not degenerate


def test_brier_is_scored_for_probabilities_only_and_skips_missing_scores() -> None:
    y = [1, 0, 0, 1, 0]
    p = [0.9, 0.2, np.nan, 0.4, 0.0]
    got = evaluate_scores("head", y, p, probability=True)
    # by hand over the four users with a score: (0.1^2 + 0.2^2 + 0.6^2 + 0) / 4
    assert got.brier == pytest.approx((0.01 + 0.04 + 0.36 + 0.0) / 4)
    assert math.isnan(evaluate_scores("iforest", y, [3.0, -1.0, 2.0, 7.0, 0.5]).brier)
    # an overconfident head with the same ranking ranks the same and scores worse
    sure = evaluate_scores("sure", y, [0.99, 0.9, 0.5, 0.98, 0.8], probability=True)
    fair = evaluate_scores("fair", y, [0.7, 0.2, 0.1, 0.6, 0.15], probability=True)
    assert sure.auprc == fair.auprc and sure.brier > fair.brier


def test_uncalibrated_probability_undoes_the_heads_platt_scaling() -> None:
    import torch

    from core.evaluate import uncalibrated_probability
    from core.model import BehaviorConfig, BehaviorModel

    torch.manual_seed(0)
    model = BehaviorModel(BehaviorConfig.from_size("tiny", {"event_type": 12}, max_len=16)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.sequence_head.weight, std=0.3)  # logits of a few units
    fields = torch.randint(2, 12, (32, 8, 1))
    with torch.no_grad():
        raw = torch.sigmoid(model(fields).sequence_logit).numpy()
        model.config.head_logit_scale, model.config.head_logit_bias = 0.7, -1.8
        calibrated = torch.sigmoid(model(fields).sequence_logit).numpy()
    assert np.abs(calibrated - raw).max() > 0.05  # the map did something
    np.testing.assert_allclose(uncalibrated_probability(calibrated, 0.7, -1.8), raw, atol=1e-5)


def test_markdown_table_shows_scorers_side_by_side() -> None:
    a = evaluate_scores("iforest", Y, S, typologies=TYP, ks=(1, 3), budget_share=0.2)
    b = evaluate_scores("flat", np.zeros(10), S, ks=(1, 3), budget_share=0.2)
    text = metrics_table_markdown([a, b])
    lines = text.splitlines()
    assert lines[0].startswith("| Scorer | AUPRC | AUROC | P@1 | P@3 | Recall@20% |")
    assert lines[2].startswith("| iforest | 0.656 | 0.619 | 1.000 | 0.667 | 0.333 |")
    assert lines[3].startswith("| flat | – | – | 0.000 |")
    assert "| ato | 0.500 | – |" in text
    assert isinstance(a, ScorerMetrics) and a.to_dict()["precision_at_k"] == {1: 1.0, 3: 2 / 3}


# ---------------------------------------------------------------------------------------------
# splits


def test_split_users_is_disjoint_stable_and_roughly_proportional() -> None:
    users = [f"user-{i}" for i in range(5000)]
    split = split_users(users, seed=7)
    sets = {k: set(v) for k, v in split.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"])
    assert not sets["val"] & sets["test"]
    assert set().union(*sets.values()) == set(users)
    for name, share in zip(("train", "val", "test"), (0.6, 0.2, 0.2), strict=True):
        assert abs(len(split[name]) / len(users) - share) < 0.03
    # stable: same seed, same answer; a user's split does not depend on who else is there
    again = split_users(list(reversed(users)), seed=7)
    assert {k: set(v) for k, v in again.items()} == sets
    subset = split_users(users[:100], seed=7)
    assert set(subset["test"]) == sets["test"] & set(users[:100])
    other = split_users(users, seed=8)
    assert set(other["test"]) != sets["test"]
    assert len(split_users(users, fractions=(0.5, 0.0, 0.5))["val"]) == 0


def test_kfold_covers_every_user_exactly_once_as_test() -> None:
    users = [f"u{i}" for i in range(103)]
    folds = kfold_users(users, k=5, seed=1)
    assert len(folds) == 5
    tests = np.concatenate([test for _, test in folds])
    assert sorted(tests) == sorted(users)
    for train, test in folds:
        assert not set(train) & set(test)
        assert len(train) + len(test) == len(users)
    assert {len(test) for _, test in folds} == {20, 21}
    with pytest.raises(ValueError):
        kfold_users(users, k=1)


# ---------------------------------------------------------------------------------------------
# ground truth


def test_load_truth_from_simulator_truth() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE truth_users (user_id VARCHAR, typology VARCHAR)")
    con.execute(
        "INSERT INTO truth_users VALUES ('a', 'card_testing'), ('b', 'normal'), ('c', NULL),"
        " ('d', 'account_takeover')"
    )
    y, typology = load_truth(con, ["d", "b", "c", "zz", "a"])
    assert y.tolist() == [1, 0, 0, 0, 1]
    assert typology.tolist() == ["account_takeover", "", "", "", "card_testing"]


def test_load_truth_falls_back_to_latest_analyst_label() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE truth_users (user_id VARCHAR, typology VARCHAR)")  # empty
    con.execute(
        "CREATE TABLE labels (user_id VARCHAR, label VARCHAR, analyst VARCHAR,"
        " created_at TIMESTAMP, note VARCHAR)"
    )
    ts = pd.Timestamp("2024-05-01")
    con.execute(
        "INSERT INTO labels VALUES (?, ?, 'ann', ?, ''), (?, ?, 'bob', ?, ''),"
        " (?, ?, 'ann', ?, '')",
        ["a", "fraud", ts, "a", "not_fraud", ts + pd.Timedelta(hours=1), "b", "fraud", ts],
    )
    y, typology = load_truth(con, ["a", "b", "c"])
    assert y.tolist() == [0, 1, 0]  # a was corrected to not fraud
    assert typology.tolist() == ["", "labelled", ""]
    with pytest.raises(LookupError):
        load_truth(duckdb.connect(), ["a"])


def test_outlier_baselines_are_tuned_on_validation_users_only(demo_env) -> None:
    """The chosen n_neighbors is the grid value with the best validation AUPRC, recomputed
    here by brute force; without validation users (a CV fold) a quarter of the training users
    stands in, and the test users are never read."""
    from sklearn.metrics import average_precision_score

    from core import store
    from core.baselines import AggregateFeaturizer, LOFScorer, load_user_data
    from core.evaluate import LOF_GRID, _tuned, split_users

    with store.open_db(demo_env.db_path, read_only=True) as con:
        users = np.array(
            [
                r[0]
                for r in con.execute("SELECT DISTINCT user_id FROM events ORDER BY 1").fetchall()
            ],
            dtype=object,
        )
        splits = split_users(users, seed=0)
        featurizer = AggregateFeaturizer().fit(con, list(splits["train"]))

        def lof(value: int) -> LOFScorer:
            return LOFScorer(n_neighbors=value)

        chosen = _tuned(
            con, featurizer, splits["train"], splits["val"], "n_neighbors", LOF_GRID, lof
        )
        fit = load_user_data(con, list(splits["train"]), featurizer, with_events=False)
        val = load_user_data(con, list(splits["val"]), featurizer, with_events=False)
        y_val, _ = load_truth(con, splits["val"])
        aps = {
            k: average_precision_score(y_val, lof(k).fit(fit).decision_function(val))
            for k in LOF_GRID
        }
        fold = _tuned(con, featurizer, splits["train"], None, "n_neighbors", LOF_GRID, lof)
    best = max(LOF_GRID, key=lambda k: (aps[k], -LOF_GRID.index(k)))
    assert chosen.n_neighbors == best == chosen.tuned_["n_neighbors"]
    assert chosen.tuned_["validation_auprc"] == pytest.approx(aps[best], abs=1e-4)
    assert fold.n_neighbors in LOF_GRID and getattr(chosen, "detector_", None) is None
