"""Attributions (Captum LayerIntegratedGradients) and the deletion check on the tiny demo model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from core import store
from core.explain import (
    NEUTRAL_BASELINE,
    TYPICAL_BASELINE,
    ExplainSettings,
    counterfactual,
    displayed_scores,
    explain_events,
    resolve_target,
    window_target_scores,
)
from core.scoring import LoadedModel, ScoreReference, combine_scores, load_model, score_users
from core.sequences import ABSENT, PAD, add_accounts_before, load_events
from tests.conftest import DemoEnv


@pytest.fixture(scope="module")
def loaded(demo_env: DemoEnv) -> LoadedModel:
    return load_model(demo_env.models_dir / demo_env.model_id, device="cpu")


@pytest.fixture(scope="module")
def fraud_users(demo_env: DemoEnv) -> list[str]:
    with store.open_db(demo_env.db_path, read_only=True) as con:
        rows = con.execute(
            "SELECT user_id FROM truth_events GROUP BY user_id HAVING count(*) >= 5 "
            "ORDER BY user_id LIMIT 12"
        ).fetchall()
    return [r[0] for r in rows]


def _events(env: DemoEnv, user_id: str) -> pd.DataFrame:
    """Every column, as the Investigate page passes them (the account-level model reads more
    than the sequence fields)."""
    with store.open_db(env.db_path, read_only=True) as con:
        return add_accounts_before(con, store.user_events(con, user_id))


@pytest.mark.parametrize("target", ["supervised", "unsupervised"])
def test_attributions_are_complete_per_event_and_field(
    demo_env: DemoEnv, loaded: LoadedModel, fraud_users: list[str], target: str
) -> None:
    events = _events(demo_env, fraud_users[0])
    att = explain_events(loaded, events, ExplainSettings(n_steps=48, target=target))  # type: ignore[arg-type]
    n = min(len(events), loaded.model.config.max_len)
    assert att.per_field.shape == (n, len(loaded.model.config.field_names))
    assert att.n_events_total == len(events)
    assert set(att.event_ids) <= set(events["event_id"])
    # Completeness: the attributions add up to target(input) - target(baseline), within the
    # convergence delta Captum reports (plus float32 slack).
    gap = att.target_value - att.baseline_value
    assert abs(att.per_field.sum() - gap) <= abs(att.delta) + 1e-3 * max(1.0, abs(gap))
    assert abs(att.delta) < 0.05 * max(1.0, abs(gap))
    assert np.isfinite(att.per_field).all()
    assert att.per_field.any()
    top = att.top_events(8)
    assert len(top) == 8
    # the deletion search orders the first five; the rest follow the attributions
    assert list(top["event_id"]) == list(att.event_ids[att.order[:8]])
    assert top["attribution"].iloc[5:].is_monotonic_decreasing
    assert sorted(att.order.tolist()) == list(range(att.n_events))
    assert att.method_settings()["n_steps"] == 48


def test_supervised_attributions_start_from_the_typical_event(
    demo_env: DemoEnv, loaded: LoadedModel, fraud_users: list[str]
) -> None:
    """The supervised target integrates from the training users' typical event: every field
    at its commonest value, each user weighing the same (counted here with pandas, apart from
    the code under test), so a field already at its usual value gets no credit at all, and the
    attributions add up to the logit minus the logit of a window of typical events."""
    with store.open_db(demo_env.db_path, read_only=True) as con:
        events = load_events(con).to_pandas()
    encoded = loaded.featurizer.transform(events)
    tokens = pd.DataFrame(encoded.fields)
    tokens["user"] = events.set_index("event_id").loc[encoded.event_ids, "user_id"].to_numpy()
    share = 1.0 / tokens.groupby("user")["user"].transform("size")
    commonest = [
        int(share.groupby(tokens[j]).sum().sort_index().idxmax())
        for j in range(tokens.shape[1] - 1)
    ]
    assert loaded.reference.typical_event == commonest

    events = _events(demo_env, fraud_users[2])
    att = explain_events(loaded, events, ExplainSettings(n_steps=32, target="supervised"))
    assert att.baseline == TYPICAL_BASELINE == att.method_settings()["baseline"]
    usual = att.fields == np.asarray(commonest)[None, :]
    assert usual.sum() > att.n_events  # plenty of fields at their usual value
    assert np.all(att.per_field[usual] == 0.0)
    assert np.abs(att.per_field[~usual]).max() > 0
    typical = torch.tensor(commonest).expand(1, att.n_events, len(commonest))
    with torch.no_grad():
        logit = loaded.model(
            fields=typical, attention_mask=torch.ones(1, att.n_events, dtype=torch.bool)
        ).sequence_logit
    assert att.baseline_value == pytest.approx(float(logit[0]), abs=1e-4)
    gap = att.target_value - att.baseline_value
    assert abs(att.per_field.sum() - gap) <= abs(att.delta) + 1e-3 * max(1.0, abs(gap))

    # The unsupervised target, and a model saved before the typical event was stored, start
    # from the neutral event: there the absent fields are the ones without credit.
    old = LoadedModel(
        **{
            **loaded.__dict__,
            "reference": ScoreReference(**{**loaded.reference.__dict__, "typical_event": []}),
        }  # fmt: skip
    )
    for model, target in ((loaded, "unsupervised"), (old, "supervised")):
        neutral = explain_events(model, events, ExplainSettings(n_steps=8, target=target))  # type: ignore[arg-type]
        assert neutral.baseline == NEUTRAL_BASELINE
        absent = neutral.fields == ABSENT
        assert np.all(neutral.per_field[absent] == 0.0)
        assert np.abs(neutral.per_field[usual & ~absent]).max() > 0
    with pytest.raises(ValueError, match="baseline must be one of typical, absent"):
        ExplainSettings(baseline="zero")  # type: ignore[arg-type]


def _hand_rolled_ig(loaded: LoadedModel, fields: torch.Tensor, steps: int) -> np.ndarray:
    """Integrated gradients written out directly over the per-field embedding tensors, with the
    unsupervised typicality target, the Riemann midpoint rule and plain autograd."""
    model = loaded.model
    ref = loaded.reference
    mean = torch.tensor(ref.field_mean)
    std = torch.tensor(ref.field_std)
    tables = list(model.field_embeddings.values())
    x = [t.weight[fields[..., j]].detach() for j, t in enumerate(tables)]
    b = [
        t.weight[torch.where(fields[..., j] == PAD, PAD, ABSENT)].detach()
        for j, t in enumerate(tables)
    ]
    absent = fields <= ABSENT  # no path for absent fields: their factor stays 1
    mask = torch.ones(fields.shape[:2], dtype=torch.bool)
    n = float(fields.shape[1])
    total = [torch.zeros_like(xi) for xi in x]
    for i in range(steps):
        alpha = (i + 0.5) / steps
        points = [
            (bi + alpha * (xi - bi)).requires_grad_(True) for xi, bi in zip(x, b, strict=True)
        ]
        out = model.forward_from_embeddings(sum(points), mask, targets=fields)
        # The own-surprisal factor is the point's position along its field's path (alpha on
        # the path, written as a function of the point so that its gradient counts).
        factor = torch.stack(
            [
                ((p - bi) * (xi - bi)).sum(-1) / ((xi - bi) ** 2).sum(-1).clamp(min=1e-12)
                for p, xi, bi in zip(points, x, b, strict=True)
            ],
            dim=-1,
        )
        z = (out.field_nll - mean) / std
        z = z * torch.where(absent, 1.0, factor)
        value = (z.sum(dim=1) / n).norm(dim=-1) * np.sqrt(min(n, ref.evidence_cap))
        grads = torch.autograd.grad(value.sum(), points)
        for t, g in zip(total, grads, strict=True):
            t += g / steps
    return torch.stack(
        [((xi - bi) * t).sum(dim=-1)[0] for xi, bi, t in zip(x, b, total, strict=True)], dim=-1
    ).numpy()


def test_matches_a_hand_rolled_integrated_gradients(
    demo_env: DemoEnv, loaded: LoadedModel, fraud_users: list[str]
) -> None:
    events = _events(demo_env, fraud_users[1]).head(40)
    settings = ExplainSettings(n_steps=16, method="riemann_middle", target="unsupervised")
    att = explain_events(loaded, events, settings)
    encoded = loaded.featurizer.transform(events)
    fields = torch.from_numpy(encoded.fields.astype(np.int64))[None]
    reference = _hand_rolled_ig(loaded, fields, steps=16)
    assert reference.shape == att.per_field.shape
    scale = np.abs(reference).max()
    np.testing.assert_allclose(att.per_field, reference, atol=2e-3 * scale, rtol=1e-2)


def test_long_history_explains_its_highest_scoring_window(
    demo_env: DemoEnv, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.explain._WINDOW_CHUNK", 1)  # one window per pass
    with store.open_db(demo_env.db_path, read_only=True) as con:
        user = con.execute(
            "SELECT user_id FROM events GROUP BY user_id ORDER BY count(*) DESC LIMIT 1"
        ).fetchone()[0]  # type: ignore[index]
        events = load_events(con, users=[user]).to_pandas()
    max_len = loaded.model.config.max_len
    assert len(events) > max_len, "fixture should hold a user longer than one window"
    att = explain_events(loaded, events, ExplainSettings(n_steps=8))
    assert att.n_events == max_len
    rows = att.window_rows
    assert np.array_equal(rows, np.arange(rows[0], rows[0] + max_len))
    assert np.array_equal(att.event_ids, events["event_id"].to_numpy()[rows])
    # the window chosen (in chunks of windows) is the one whose fraud probability is highest
    from core.explain import _subset_scores
    from core.sequences import make_windows

    encoded = loaded.featurizer.transform(events)
    windows = make_windows(encoded, max_len=max_len)
    every = [np.arange(s, s + max_len) for s in windows.start]
    probability = _subset_scores(loaded, encoded, every).probability
    assert rows[0] == windows.start[int(np.argmax(probability))]


def test_lock_serialises_attribution_on_the_shared_model(
    demo_env: DemoEnv, loaded: LoadedModel, fraud_users: list[str]
) -> None:
    events = [_events(demo_env, u) for u in fraud_users[:2]]
    settings = ExplainSettings(n_steps=16)
    serial = [explain_events(loaded, e, settings).per_field for e in events]

    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = explain_events(loaded, events[i], settings).per_field

    # While someone holds the model's lock, an explanation waits for it.
    with loaded.lock:
        blocked = threading.Thread(target=work, args=(0,))
        blocked.start()
        time.sleep(0.3)
        assert blocked.is_alive() and 0 not in results
    blocked.join(timeout=60)
    # Two threads at once give exactly the serial answers (no hook from one leaks into the other).
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(2):
        np.testing.assert_allclose(results[i], serial[i], rtol=1e-5, atol=1e-6)
    assert not loaded.model.training


def test_refuses_inference_mode_and_missing_head(
    demo_env: DemoEnv, loaded: LoadedModel, fraud_users: list[str]
) -> None:
    events = _events(demo_env, fraud_users[0])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        explain_events(loaded, events)
    with pytest.raises(ValueError, match="one user"):
        explain_events(loaded, pd.concat([events, _events(demo_env, fraud_users[1])]))
    assert resolve_target(loaded, "auto") == "supervised"
    headless = LoadedModel(**{**loaded.__dict__, "model": loaded.model})
    headless.model.config.has_supervised_head = False
    try:
        assert resolve_target(headless, "auto") == "unsupervised"
        with pytest.raises(ValueError, match="no supervised head"):
            resolve_target(headless, "supervised")
    finally:
        headless.model.config.has_supervised_head = True


def test_deletion_check_removes_more_score_than_random_events(
    demo_env: DemoEnv, loaded: LoadedModel, fraud_users: list[str]
) -> None:
    drops_top, drops_random = [], []
    shown_top, shown_random = [], []
    for user in fraud_users[:8]:
        events = _events(demo_env, user)
        att = explain_events(loaded, events, ExplainSettings(n_steps=16))
        cf = counterfactual(loaded, events, att, k=5)
        assert cf.k == 5
        encoded = loaded.featurizer.transform(events)
        # "before" is the displayed score of the explained window itself
        assert cf.score_before == pytest.approx(
            displayed_scores(loaded, encoded, [att.window_rows], events=events)[0], abs=1e-6
        )
        drops_top.append(cf.target_before - cf.target_without_top)
        drops_random.append(cf.target_before - cf.target_without_random)
        shown_top.append(cf.drop_top)
        shown_random.append(cf.drop_random)
        assert "ithout these 5 events the score" in cf.sentence()
        # the fraud probability joins the line exactly when it is what was explained
        assert ("fraud probability" in cf.sentence()) == (att.target == "supervised")
        assert cf.target == att.target
        if att.n_events < att.n_events_total:
            assert cf.sentence().startswith(f"On the explained window of {att.n_events} events")
    # On the attribution target's own scale, and on the score the sentence reports (the tiny
    # model's head has barely learned, so that one moves mostly with the percentile and the
    # account-level model, which the attributions do not explain).
    assert np.mean(drops_top) > np.mean(drops_random)
    assert np.mean(shown_top) > np.mean(shown_random)


def test_deletion_ladder_rescores_ever_more_of_the_top_events(
    demo_env: DemoEnv, loaded: LoadedModel, fraud_users: list[str]
) -> None:
    events = _events(demo_env, fraud_users[3])
    att = explain_events(loaded, events, ExplainSettings(n_steps=8))
    n = att.n_events
    assert n > 12
    cf = counterfactual(loaded, events, att, k=3, random_draws=2, threshold=0.5)
    expected_k = [m for m in (6, 12, 24, 48, 96, 192) if m < n]
    assert [k for k, _, _ in cf.ladder] == expected_k
    # Each step agrees with an independent rescoring of the window without its top-m events.
    encoded = loaded.featurizer.transform(events)
    order = att.order
    subsets = [att.window_rows[np.sort(order[m:])] for m in expected_k]
    shown = displayed_scores(loaded, encoded, subsets, events=events)
    own = window_target_scores(loaded, events, att, [np.sort(order[m:]) for m in expected_k])
    for (_, score, target), s, t in zip(cf.ladder, shown, own, strict=True):
        assert score == pytest.approx(float(s), abs=1e-6)
        assert target == pytest.approx(float(t), rel=1e-5)
    # the smallest tried deletion that takes the score under a threshold
    steps = [(3, cf.score_without_top), *((k, s) for k, s, _ in cf.ladder)]
    for thr in (0.0, cf.score_before / 2, cf.score_before + 1e-9):
        want = 0 if cf.score_before < thr else next((k for k, s in steps if s < thr), None)
        assert cf.events_to_fall_below(thr) == want
    fact = cf.fact(decimals=4)
    assert fact.threshold == 0.5 and [k for k, _ in fact.ladder] == expected_k
    # k = 0 has no ladder
    assert counterfactual(loaded, events, att, k=0, random_draws=0).ladder == ()


@pytest.mark.parametrize("target", ["supervised", "unsupervised"])
def test_window_target_scores_agree_with_the_deletion_check(
    demo_env: DemoEnv, loaded: LoadedModel, fraud_users: list[str], target: str
) -> None:
    events = _events(demo_env, fraud_users[2])
    att = explain_events(loaded, events, ExplainSettings(n_steps=8, target=target))  # type: ignore[arg-type]
    cf = counterfactual(loaded, events, att, k=5, random_draws=0)
    n = att.n_events
    top = att.order[:5]
    rest = np.setdiff1d(np.arange(n), top)
    whole, without_top = window_target_scores(loaded, events, att, [np.arange(n), rest[::-1]])
    assert whole == pytest.approx(cf.target_before, rel=1e-5)
    assert without_top == pytest.approx(cf.target_without_top, rel=1e-5)
    for bad in ([], [0, 0], [n]):
        with pytest.raises(ValueError):
            window_target_scores(loaded, events, att, [np.asarray(bad, dtype=np.int64)])


def test_displayed_score_matches_batch_scoring(demo_env: DemoEnv, loaded: LoadedModel) -> None:
    with store.open_db(demo_env.db_path, read_only=True) as con:
        user, stored, pct, sup, agg = con.execute(
            "SELECT s.user_id, s.score, s.percentile_unsupervised, s.score_supervised,"
            " s.score_aggregate FROM sequence_scores s JOIN (SELECT user_id FROM events "
            "GROUP BY user_id HAVING count(*) <= ?) e USING (user_id) WHERE s.model_id = ? "
            "AND s.window_start IS NULL ORDER BY s.user_id LIMIT 1",
            [int(loaded.model.config.max_len), loaded.model_id],
        ).fetchone()  # type: ignore[misc]
        events = add_accounts_before(con, store.user_events(con, user))
    assert loaded.aggregate is not None
    # the account-level model summarises the frame with the store's own SQL: same probability
    assert loaded.aggregate.predict_event_sets([events])[0] == pytest.approx(agg, rel=1e-9)
    encoded = loaded.featurizer.transform(events)
    score = displayed_scores(loaded, encoded, [np.arange(encoded.n_events)], events=events)[0]
    # The percentile is a step function: float noise may move it by one step.
    step = 1.0 / len(loaded.reference.quantiles)
    low, high = (
        combine_scores(np.array([p]), np.array([sup]), aggregate=np.array([agg]))[0]
        for p in (max(pct - step, 0.0), min(pct + step, 1.0))
    )
    assert low - 1e-9 <= score <= high + 1e-9
    assert stored == pytest.approx(
        combine_scores(np.array([pct]), np.array([sup]), aggregate=np.array([agg]))[0]
    )


def _search_scale(
    loaded: LoadedModel, events: pd.DataFrame, att: object, keep: list[np.ndarray]
) -> np.ndarray:
    """The scale the deletion search compares, computed apart from core.explain: the sequence
    logit from a plain forward pass (supervised), or the raw typicality (unsupervised)."""
    if att.target == "unsupervised":  # type: ignore[attr-defined]
        return window_target_scores(loaded, events, att, keep)  # type: ignore[arg-type]
    fields = att.fields  # type: ignore[attr-defined]
    width = max(len(k) for k in keep)
    batch = np.zeros((len(keep), width, fields.shape[1]), dtype=np.int64)
    mask = np.zeros((len(keep), width), dtype=bool)
    for i, k in enumerate(keep):
        batch[i, : len(k)], mask[i, : len(k)] = fields[k], True
    with torch.no_grad():
        out = loaded.model(fields=torch.from_numpy(batch), attention_mask=torch.from_numpy(mask))
    return out.sequence_logit.double().numpy()


@pytest.mark.parametrize("target", ["supervised", "unsupervised"])
def test_deletion_search_picks_what_brute_force_removal_finds(
    demo_env: DemoEnv, loaded: LoadedModel, fraud_users: list[str], target: str
) -> None:
    """With no tolerance and every event in the pool, each pick is the event whose removal
    (beside the earlier picks) lowers the target most -- compared as logits when supervised,
    where a probability near 1 would make every removal look alike -- checked by rescoring
    every removal."""
    events = _events(demo_env, fraud_users[4]).head(40)
    exhaustive = ExplainSettings(
        n_steps=8,
        target=target,
        deletion_pool=1000,
        deletion_tolerance=0.0,  # type: ignore[arg-type]
    )
    att = explain_events(loaded, events, exhaustive)
    n = att.n_events
    picked: list[int] = []
    lowest: list[float] = []
    by_attribution = np.argsort(-att.per_event, kind="stable")
    for _ in range(3):
        # in attribution order: on an exact tie the search keeps the more attributed event
        candidates = [int(i) for i in by_attribution if i not in picked]
        keep = [np.setdiff1d(np.arange(n), [*picked, c]) for c in candidates]
        scale = _search_scale(loaded, events, att, keep)
        best = int(np.argmin(scale))
        picked.append(candidates[best])
        lowest.append(float(window_target_scores(loaded, events, att, [keep[best]])[0]))
    assert att.order[:3].tolist() == picked
    # the path the table shows: the target on its own scale once each pick is removed
    assert att.deletion_path[:3] == pytest.approx(lowest, rel=1e-5)
    whole = window_target_scores(loaded, events, att, [np.arange(n)])
    assert att.own_scale_value == pytest.approx(float(whole[0]), rel=1e-4)
    table = att.top_events(8)
    assert table["target_without"].iloc[:5].tolist() == pytest.approx(att.deletion_path.tolist())
    assert table["target_without"].iloc[5:].isna().all()
    assert att.method_settings()["ranking"].startswith("deletion search")

    # A tolerance of one half: the first pick is the most attributed event whose drop comes
    # within half of the larger of the largest drop and the top attribution, and is a drop
    half = explain_events(
        loaded,
        events,
        ExplainSettings(n_steps=8, target=target, deletion_pool=1000, deletion_tolerance=0.5),  # type: ignore[arg-type]
    )
    order = [int(i) for i in np.argsort(-half.per_event, kind="stable")]
    before = float(_search_scale(loaded, events, half, [np.arange(n)])[0])
    drops = before - _search_scale(
        loaded, events, half, [np.setdiff1d(np.arange(n), [c]) for c in order]
    )
    assert drops.max() > 0
    slack = 0.5 * max(drops.max(), half.per_event.max())
    bar = max(drops.max() - slack, 0.0)  # never one that raises it while another lowers it
    first_good = order[int(np.flatnonzero(drops >= bar)[0])]
    assert int(half.order[0]) == first_good

    # No pool: the attributions' own order.
    plain = explain_events(
        loaded, events, ExplainSettings(n_steps=8, target=target, deletion_pool=0)
    )  # type: ignore[arg-type]
    assert plain.ranking.size == 0 and plain.method_settings()["ranking"] == "attribution"
    assert plain.order.tolist() == np.argsort(-plain.per_event, kind="stable").tolist()
    # A tolerance wider than any drop: the most attributed event whose removal lowers the
    # score (the attribution order, less those that would raise it while others lower it).
    lenient = explain_events(
        loaded,
        events,
        ExplainSettings(n_steps=8, target=target, deletion_tolerance=1e9),  # type: ignore[arg-type]
    )
    ig_order = [int(i) for i in np.argsort(-lenient.per_event, kind="stable")]
    before = float(_search_scale(loaded, events, lenient, [np.arange(n)])[0])
    single = before - _search_scale(
        loaded, events, lenient, [np.setdiff1d(np.arange(n), [c]) for c in ig_order]
    )
    assert single.max() > 0
    assert int(lenient.order[0]) == ig_order[int(np.flatnonzero(single >= 0)[0])]

    with pytest.raises(ValueError, match="deletion_tolerance"):
        explain_events(loaded, events, ExplainSettings(n_steps=8, deletion_tolerance=float("nan")))

    # the deletion check removes exactly the ranking's first five
    cf = counterfactual(loaded, events, att, k=5, random_draws=0)
    without = window_target_scores(loaded, events, att, [np.sort(att.order[5:])])
    assert cf.target_without_top == pytest.approx(float(without[0]), rel=1e-5)


@pytest.fixture(scope="module")
def ranged_user(demo_env: DemoEnv, loaded: LoadedModel) -> tuple[str, pd.DataFrame, pd.Timestamp]:
    """A user whose whole history fits one window, cut at its 60th-percentile event, whose
    first event in the range comes from a device it used before the range."""
    with store.open_db(demo_env.db_path, read_only=True) as con:
        users = con.execute(
            "SELECT user_id FROM events GROUP BY user_id HAVING count(*) BETWEEN 30 AND ? "
            "ORDER BY user_id",
            [int(loaded.model.config.max_len)],
        ).fetchall()
        for (user,) in users:
            history = add_accounts_before(con, store.user_events(con, user))
            start = history["ts"].iloc[int(len(history) * 0.6)]
            before = history[history["ts"] < start]
            first = history[history["ts"] >= start].iloc[0]
            if first["device_id"] in set(before["device_id"].dropna()):
                return user, history, start
    raise AssertionError("no fixture user reuses a device across the cut")


def test_a_range_is_explained_with_the_history_before_it_as_context(
    demo_env: DemoEnv, loaded: LoadedModel, ranged_user: tuple[str, pd.DataFrame, pd.Timestamp]
) -> None:
    from core.sequences import FIELDS, FLAG_NEW, FLAG_SEEN

    user, history, start = ranged_user
    in_range = (history["ts"] >= start).to_numpy()
    att = explain_events(
        loaded, history, ExplainSettings(n_steps=8, target="unsupervised"), start=start
    )
    assert att.n_context == int((~in_range).sum()) and att.n_events == int(in_range.sum())
    assert att.n_events_total == int(in_range.sum())
    # only the range's events are ranked, and every one of them is
    assert sorted(att.order.tolist()) == np.flatnonzero(att.in_range).tolist()
    # how much of the positive attribution the history carries is reported beside the shares
    per_event = att.per_event
    positive = per_event[per_event > 0].sum()
    in_history = per_event[(per_event > 0) & ~att.in_range].sum()
    assert att.context_share == pytest.approx(in_history / positive)
    assert att.method_settings()["context_share_of_positive_attribution"] == att.context_share
    assert (att.top_events(10)["ts"] >= start).all()
    # the first event in the range uses a device seen before: not "new" with its history ...
    device = FIELDS.index("new_device")
    first = int(np.flatnonzero(att.in_range)[0])
    assert att.fields[first, device] == FLAG_SEEN
    # ... while the range cut from its history would call it new (what was explained before)
    cut = loaded.featurizer.transform(history[in_range])
    assert cut.fields[0, device] == FLAG_NEW

    # the target is the score ranged scoring gives this range: typicality over the range's
    # events, each scored with the history before it
    ranged = score_users(demo_env.db_path, loaded, users=[user], start=start, write=False)
    assert att.target_value == pytest.approx(float(ranged["score_unsupervised"].iloc[0]), rel=1e-4)
    sup = explain_events(
        loaded, history, ExplainSettings(n_steps=8, target="supervised"), start=start
    )
    assert sup.own_scale_value == pytest.approx(float(ranged["score_supervised"].iloc[0]), rel=1e-4)

    # the deletion check scores the same target and never removes a context event
    check = counterfactual(loaded, history, att)
    assert check.target_before == pytest.approx(att.target_value, rel=1e-5)
    every = window_target_scores(loaded, history, att, [np.arange(att.window_rows.size)])
    assert every[0] == pytest.approx(att.target_value, rel=1e-5)
    context_only = np.flatnonzero(~att.in_range)
    keep_context_and_one = np.sort(np.append(context_only, first))
    one = window_target_scores(loaded, history, att, [keep_context_and_one])[0]
    assert np.isfinite(one)  # one range event read, with the context before it


@pytest.mark.parametrize("field", ["new_device", "device_accounts"])
def test_the_field_that_carried_an_event_is_labelled_by_its_value(
    loaded: LoadedModel, ranged_user: tuple[str, pd.DataFrame, pd.Timestamp], field: str
) -> None:
    """A flag that carried the score while off reads "device seen before", not "new device";
    a device count of 0 reads "used by no other account"."""
    from core.explain import FIELD_LABELS, SEEN_LABELS
    from core.sequences import FIELDS, FLAG_NEW, FLAG_SEEN

    _, history, start = ranged_user
    history = history.assign(device_id__accounts_before=np.arange(len(history)) % 3)
    att = explain_events(loaded, history, ExplainSettings(n_steps=8), start=start)
    column = FIELDS.index(field)
    # make the field carry each event's attribution, then read the labels
    att.per_field[:] = 0.0
    att.per_field[:, column] = 1.0
    top = att.top_events(att.n_events)
    if field == "new_device":
        flags = att.fields[att.order, column]
        assert FLAG_SEEN in flags.tolist() and set(flags.tolist()) <= {FLAG_SEEN, FLAG_NEW}
        seen = flags == FLAG_SEEN
    else:  # from the counts given, not from the tokens the labels are read from
        counts = history.set_index("event_id")["device_id__accounts_before"]
        shown = counts.loc[att.event_ids[att.order]].to_numpy()
        assert set(shown.tolist()) == {0, 1, 2}
        seen = shown == 0
    expected = [SEEN_LABELS[field] if s else FIELD_LABELS[field] for s in seen]
    assert top["top_field"].tolist() == expected


def test_a_range_in_a_long_history_explains_its_best_window_that_reaches_the_range(
    demo_env: DemoEnv, loaded: LoadedModel
) -> None:
    from core.explain import _subset_scores
    from core.sequences import make_windows

    with store.open_db(demo_env.db_path, read_only=True) as con:
        user = con.execute(
            "SELECT user_id FROM events GROUP BY user_id ORDER BY count(*) DESC LIMIT 1"
        ).fetchone()[0]  # type: ignore[index]
        events = store.user_events(con, user)
    max_len = int(loaded.model.config.max_len)
    assert len(events) > 2 * max_len, "fixture should hold a user of several windows"
    start = events["ts"].iloc[len(events) - max_len // 4]  # a range shorter than one window
    att = explain_events(loaded, events, ExplainSettings(n_steps=8), start=start)
    assert att.n_events == int((events["ts"] >= start).sum())  # the whole range is explained
    assert att.n_context == max_len - att.n_events  # the rest of the window is its history
    # a range of several windows: the best of the windows that end inside it
    start = events["ts"].iloc[len(events) - 3 * max_len // 2]
    att = explain_events(loaded, events, ExplainSettings(n_steps=8), start=start)
    assert att.n_events_total == int((events["ts"] >= start).sum())
    encoded = loaded.featurizer.transform(events)
    windows = make_windows(encoded, max_len=max_len)
    ends = windows.start + windows.lengths() - 1
    reaching = [s for s, e in zip(windows.start, ends, strict=True) if encoded.ts[e] >= start]
    assert len(reaching) >= 2
    rows = [np.arange(s, s + max_len) for s in reaching]
    probability = _subset_scores(loaded, encoded, rows).probability
    assert att.window_rows[0] == reaching[int(np.argmax(probability))]


def test_picks_the_attributions_credit_nothing_are_counted_and_said() -> None:
    """A deletion pick whose attribution is 0 or less shows a 0% share beside a drop: the
    explanation counts such picks (only among the picks) and says why."""
    from core.explain import Attribution

    per_event = np.array([0.5, -0.2, 0.0, 0.3, -0.1, 0.4])
    att = Attribution(
        user_id="u1",
        model_id="m",
        target="supervised",
        event_ids=np.arange(6, dtype=np.int64),
        ts=np.array(["2026-10-01T00:00:00"] * 6, dtype="datetime64[us]")
        + np.arange(6).astype("timedelta64[s]"),
        per_field=np.stack([per_event, np.zeros(6)], axis=1),
        field_names=["event_type", "gap"],
        target_value=2.0,
        baseline_value=0.0,
        delta=0.0,
        n_events_total=6,
        # picks: 1 (-0.2) and 0 (0.5) and 2 (0.0); then by attribution; event 4 (-0.1) is
        # not a pick and must not count
        ranking=np.array([1, 0, 2, 5, 3, 4]),
        deletion_path=np.array([0.8, 0.6, 0.5]),
    )
    assert att.picked_without_credit == 2
    assert att.uncredited_picks_sentence().startswith("2 of the events")
    assert att.top_events(3)["share"].tolist() == pytest.approx([0.0, 0.5 / 1.2, 0.0])
    one = Attribution(**{**att.__dict__, "deletion_path": np.array([0.8, 0.6])})
    assert one.picked_without_credit == 1
    assert one.uncredited_picks_sentence().startswith("One of the events")
    none = Attribution(**{**att.__dict__, "ranking": np.array([0, 5, 3, 1, 2, 4])})
    assert none.picked_without_credit == 0 and none.uncredited_picks_sentence() == ""


def _stub_search(
    monkeypatch: pytest.MonkeyPatch, base_logit: float, drop_by_event: list[float]
) -> None:
    """core.explain._subset_scores replaced by a model whose logit loses
    ``drop_by_event[i]`` when event i is removed; probabilities in float32 as the model's
    head gives them (1.0 exactly from a logit near 17)."""
    import core.explain as explain_module

    drops = np.asarray(drop_by_event)

    def fake(_loaded: object, _encoded: object, subsets: list[np.ndarray], **_: object) -> object:
        logits = np.array(
            [base_logit - drops[np.setdiff1d(np.arange(drops.size), s)].sum() for s in subsets]
        )
        prob = (1.0 / (1.0 + np.exp(-logits.astype(np.float32)))).astype(np.float32)
        return explain_module._SubsetScores(prob, prob, logits, logits)

    monkeypatch.setattr(explain_module, "_subset_scores", fake)


def _search(per_event: list[float], tolerance: float = 0.1, k: int = 1) -> np.ndarray:
    from core.explain import _refine_by_deletion

    n = len(per_event)
    settings = ExplainSettings(counterfactual_k=k, deletion_tolerance=tolerance)
    ranking, _ = _refine_by_deletion(
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        np.arange(n),
        "supervised",
        np.asarray(per_event, dtype=float),
        settings,
        np.ones(n, dtype=bool),
    )
    return ranking


def test_deletion_search_rule_on_a_stubbed_model(monkeypatch: pytest.MonkeyPatch) -> None:
    attribution = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5]
    # Saturated: every removal leaves the probability at 1.0 in float32; only the logit tells
    # that event 3 carries the score (a probability search would keep event 0 first).
    _stub_search(monkeypatch, 30.0, [0.1, 0.1, 0.1, 2.0, 0.1, 0.1])
    assert _search(attribution)[0] == 3
    # Every removal moves the logit by a hair beside what IG credits: the attributions decide.
    _stub_search(monkeypatch, 3.0, [0.001, 0.004, 0.002, 0.003, 0.001, 0.002])
    assert _search(attribution)[0] == 0
    # ... but never a removal that raises the score while another lowers it.
    _stub_search(monkeypatch, 3.0, [-0.001, 0.004, 0.002, 0.003, 0.001, 0.002])
    assert _search(attribution)[0] == 1
    # No removal lowers it: the most attributed among those that raise it least (within slack).
    _stub_search(monkeypatch, 3.0, [-2.0, -0.1, -0.3, -0.05, -0.2, -0.1])
    assert _search(attribution)[0] == 1
    # Tolerance 0: the largest drop, whatever the attributions.
    _stub_search(monkeypatch, 3.0, [0.001, 0.004, 0.002, 0.003, 0.001, 0.002])
    assert _search(attribution, tolerance=0.0)[0] == 1
    # Greedy picks in order, then the rest by attribution.
    _stub_search(monkeypatch, 30.0, [0.1, 0.1, 0.1, 2.0, 0.1, 3.0])
    assert _search(attribution, k=2).tolist() == [5, 3, 0, 1, 2, 4]
