"""The account-level model: fit on labelled users, save / load, TreeSHAP reasons."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logit
from sklearn.metrics import roc_auc_score

from core import store
from core.aggregate_model import AggregateModel, describe_feature, feature_event_type
from core.evaluate import load_truth, split_users
from core.scoring import load_model


@pytest.fixture(scope="module")
def fitted(demo_env):  # type: ignore[no-untyped-def]
    with store.open_db(demo_env.db_path, read_only=True) as con:
        users = np.array(
            [
                r[0]
                for r in con.execute("SELECT DISTINCT user_id FROM events ORDER BY 1").fetchall()
            ],
            dtype=object,
        )
        splits = split_users(users, seed=0)
        y_train, _ = load_truth(con, splits["train"])
        y_test, _ = load_truth(con, splits["test"])
        labels = np.asarray(y_train, dtype=float)
        labels[:10] = np.nan  # unknown users are left out, not read as legit
        model = AggregateModel.fit(con, list(splits["train"]), labels, seed=0)
        test_scores = model.predict(con, list(splits["test"]))
        features = model.features(con, list(splits["test"]))
    return model, splits, np.asarray(y_test, dtype=float), test_scores, features


def test_it_ranks_unseen_fraudsters_above_normal_users(fitted) -> None:  # type: ignore[no-untyped-def]
    model, _, y_test, scores, _ = fitted
    assert scores.shape == y_test.shape and ((scores >= 0) & (scores <= 1)).all()
    assert roc_auc_score(y_test, scores) > 0.8
    assert model.positives >= 5  # the fraudsters among the training users with a known label
    assert model.medians and all(np.isfinite(v) for v in model.medians.values())


def test_save_and_load_give_identical_probabilities(fitted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, _, _, scores, features = fitted
    model.save(tmp_path)
    again = AggregateModel.load(tmp_path)
    assert again is not None and again.medians == model.medians
    np.testing.assert_array_equal(again.predict_features(features), scores)
    assert AggregateModel.load(tmp_path / "elsewhere") is None  # trained without one


def test_treeshap_contributions_add_up_to_the_log_odds(fitted) -> None:  # type: ignore[no-untyped-def]
    model, _, _, scores, features = fitted
    contributions = model.contributions(features)
    np.testing.assert_allclose(contributions.sum(axis=1), logit(scores), rtol=1e-6, atol=1e-6)
    riskiest = features.iloc[[int(np.argmax(scores))]]
    top = model.top_contributions(riskiest, k=3)
    assert 1 <= len(top) <= 3 and (top["contribution"] > 0).all()
    assert top["contribution"].is_monotonic_decreasing
    assert list(top["value"]) == [float(riskiest.iloc[0][f]) for f in top["feature"]]
    with pytest.raises(ValueError, match="one user"):
        model.top_contributions(features.iloc[:2])
    # A value at the training median is no reason to show, whatever its contribution.
    first = str(top["feature"].iloc[0])
    typical = dataclasses.replace(
        model, medians={**model.medians, first: float(riskiest.iloc[0][first])}
    )
    assert first not in set(typical.top_contributions(riskiest, k=3)["feature"])


def test_the_demo_model_carries_one_and_scores_subsets_of_events(demo_env) -> None:  # type: ignore[no-untyped-def]
    loaded = load_model(demo_env.models_dir / demo_env.model_id)
    assert loaded.aggregate is not None
    with store.open_db(demo_env.db_path, read_only=True) as con:
        user = con.execute("SELECT user_id FROM truth_users ORDER BY 1 LIMIT 1").fetchone()[0]  # type: ignore[index]
        events = store.user_events(con, user)
        whole = loaded.aggregate.predict(con, [user])[0]
    halves = loaded.aggregate.predict_event_sets([events, events.iloc[: len(events) // 2]])
    assert halves[0] == pytest.approx(whole, rel=1e-9)
    assert halves[1] != pytest.approx(whole, rel=1e-9)  # a different history, another answer


def test_features_read_as_an_analyst_would() -> None:
    assert describe_feature("rate__payment_failed") == "share of 'payment_failed' events"
    assert describe_feature("count__return") == "number of 'return' events"
    assert describe_feature("distinct_payment_id") == "distinct cards"
    assert describe_feature("return_ratio") == "returns per purchase"
    assert describe_feature("something_new") == "something_new"
    assert feature_event_type("rate__login") == "login"
    assert feature_event_type("count____other__") is None
    assert feature_event_type("distinct_ip") is None
