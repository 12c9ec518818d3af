"""Triage and threshold questions against independent pandas / sklearn computations."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
)

from core import alert_charts, alerts, cases, investigate, store
from core.scoring import combine_scores


@pytest.fixture(scope="module")
def world(demo_env):
    """Events and full-history scores as plain pandas frames, plus a mid-history range."""
    with store.open_db(demo_env.db_path, read_only=True) as con:
        events = con.execute(
            "SELECT e.event_id, e.ts, e.user_id, e.event_type, e.country, s.surprisal"
            " FROM events e LEFT JOIN event_scores s ON s.event_id = e.event_id"
            " AND s.model_id = ?",
            [demo_env.model_id],
        ).df()
        scores = con.execute(
            "SELECT user_id, score, percentile_unsupervised, score_supervised, score_aggregate"
            " FROM sequence_scores"
            " WHERE model_id = ? AND window_start IS NULL AND window_end IS NULL",
            [demo_env.model_id],
        ).df()
        truth = {r[0] for r in con.execute("SELECT user_id FROM truth_users").fetchall()}
    first = events["ts"].min().normalize()
    start, end = first + timedelta(days=5), first + timedelta(days=12)
    threshold = float(np.quantile(scores["score"], 0.8))
    return (
        events,
        scores.set_index("user_id"),
        truth,
        start.to_pydatetime(),
        end.to_pydatetime(),
        threshold,
    )


def _in_range(events: pd.DataFrame, start: datetime, end: datetime) -> pd.DataFrame:
    return events[(events["ts"] >= start) & (events["ts"] < end)]


def test_kpis_and_queue_match_pandas(demo_db_copy, world) -> None:
    events, scores, _, start, end, threshold = world
    inside = _in_range(events, start, end)
    per_user = inside.groupby("user_id").agg(n=("ts", "size"), last=("ts", "max"))
    alerted = [u for u in per_user.index if scores.loc[u, "score"] >= threshold]
    with store.open_db(demo_db_copy.db_path) as con:
        cases.add_label(con, alerted[0], "fraud", "ann")
        cases.add_label(con, alerted[1], "unsure", "ann")
        case_id = cases.open_case(con, "ann", [alerted[1]])
        kpis = alerts.range_kpis(con, demo_db_copy.model_id, start, end, threshold)
        queue = alerts.alert_queue(con, demo_db_copy.model_id, start, end, threshold)
    assert kpis.n_events == len(inside)
    assert kpis.n_active_users == per_user.shape[0] == kpis.n_scored
    assert kpis.n_alerts == len(alerted) > 2
    assert kpis.labelled_share == pytest.approx(2 / len(alerted))

    assert list(queue.columns) == list(alerts.QUEUE_COLUMNS)
    assert sorted(queue["user_id"]) == sorted(alerted)
    assert queue["score"].is_monotonic_decreasing
    q = queue.set_index("user_id")
    np.testing.assert_allclose(q["score"], scores.loc[q.index, "score"])
    np.testing.assert_allclose(q["percentile"], scores.loc[q.index, "percentile_unsupervised"])
    assert (q["events"] == per_user.loc[q.index, "n"]).all()
    assert (q["last_seen"] == per_user.loc[q.index, "last"]).all()
    assert q.loc[alerted[0], "label"] == "fraud" and q.loc[alerted[1], "label"] == "unsure"
    assert q.loc[alerted[1], "case"] == f"#{case_id} open" and q.loc[alerted[0], "case"] == ""
    assert q["main_reason"].str.match(r"^\w+ ×\d+ at \d{4}-\d\d-\d\d \d\d:\d\d$").all()


def test_novelty_watchlist_holds_the_unusual_users_the_queue_leaves_out(demo_env, world) -> None:
    events, scores, _, start, end, _ = world
    active = set(_in_range(events, start, end)["user_id"])
    pct = scores["percentile_unsupervised"]
    # a threshold that leaves some of the most unusual active users out of the queue
    top = scores.loc[sorted(active)].query("percentile_unsupervised >= 0.95")
    threshold = float(top["score"].median())
    expected = {u for u in top.index if top.loc[u, "score"] < threshold}
    assert expected
    with store.open_db(demo_env.db_path) as con:
        watch = alerts.novelty_watchlist(
            con, demo_env.model_id, start, end, threshold, min_percentile=0.95
        )
        queue = alerts.alert_queue(con, demo_env.model_id, start, end, threshold)
        # given the range's active_scores, the same answers without scanning it again
        users = alerts.active_scores(con, demo_env.model_id, start, end)
        pd.testing.assert_frame_equal(
            alerts.novelty_watchlist(
                con, demo_env.model_id, start, end, threshold, min_percentile=0.95, users=users
            ),
            watch,
        )
        pd.testing.assert_frame_equal(
            alerts.alert_queue(con, demo_env.model_id, start, end, threshold, users=users), queue
        )
        assert alerts.range_kpis(
            con, demo_env.model_id, start, end, threshold, users=users
        ) == alerts.range_kpis(con, demo_env.model_id, start, end, threshold)
    assert list(watch.columns) == list(alerts.QUEUE_COLUMNS)
    assert set(watch["user_id"]) == expected
    assert not set(watch["user_id"]) & set(queue["user_id"])  # beside the queue, not in it
    assert watch["percentile"].is_monotonic_decreasing
    np.testing.assert_allclose(watch["percentile"], pct.loc[watch["user_id"]])
    assert (watch["main_reason"] != "").all()


def test_queue_filters_match_pandas(demo_env, world) -> None:
    events, scores, _, start, end, _ = world
    inside = _in_range(events, start, end)
    kind = inside["event_type"].value_counts().index[3]
    country = inside["country"].dropna().value_counts().index[0]
    filters = alerts.queue_filters([kind], [country], min_events=20)
    with store.open_db(demo_env.db_path, read_only=True) as con:
        queue = alerts.alert_queue(con, demo_env.model_id, start, end, 0.0, filters=filters)
    groups = inside.groupby("user_id")
    expected = {
        u
        for u, g in groups
        if len(g) >= 20 and (g["event_type"] == kind).any() and (g["country"] == country).any()
    }
    assert set(queue["user_id"]) == expected and expected


def test_reweighting_uses_combine_scores(demo_env, world) -> None:
    _, scores, _, start, end, _ = world
    with store.open_db(demo_env.db_path, read_only=True) as con:
        frame = alerts.active_scores(con, demo_env.model_id, start, end, weight=0.2)
    s = scores.loc[frame["user_id"]]
    expected = combine_scores(
        s["percentile_unsupervised"].to_numpy(),
        s["score_supervised"].to_numpy(),
        0.2,
        aggregate=s["score_aggregate"].to_numpy(),
    )
    assert s["score_aggregate"].notna().all()
    np.testing.assert_allclose(frame["score"], expected)


def test_missing_scores_are_scored_on_demand(demo_db_copy, world) -> None:
    from core.scoring import load_model

    _, scores, _, start, end, _ = world
    with store.open_db(demo_db_copy.db_path) as con:
        path = con.execute(
            "SELECT path FROM models WHERE model_id = ?", [demo_db_copy.model_id]
        ).fetchall()[0][0]
        user = alerts.active_scores(con, demo_db_copy.model_id, start, end)["user_id"].iloc[0]
        con.execute("DELETE FROM sequence_scores WHERE user_id = ?", [user])
        without = alerts.active_scores(con, demo_db_copy.model_id, start, end)
        assert not without.set_index("user_id").loc[user, "scored"]
        calls = []

        def load():
            calls.append(1)
            return load_model(path)

        again = alerts.active_scores(con, demo_db_copy.model_id, start, end, load=load)
        assert calls == [1]
        assert again.set_index("user_id").loc[user, "score"] == pytest.approx(
            scores.loc[user, "score"], abs=1e-5
        )
        stored = con.execute(
            "SELECT count(*) FROM sequence_scores WHERE user_id = ? AND window_start IS NULL",
            [user],
        ).fetchall()[0][0]
        assert stored == 1
        alerts.active_scores(con, demo_db_copy.model_id, start, end, load=load)
        assert calls == [1]  # nothing missing any more: the model is not even loaded


def test_alert_days_and_daily_counts(demo_env, world) -> None:
    events, scores, _, start, end, threshold = world
    with store.open_db(demo_env.db_path, read_only=True) as con:
        per_day = alerts.daily_alerts(con, demo_env.model_id, start, end, threshold)
        kpis = alerts.range_kpis(con, demo_env.model_id, start, end, threshold)
        data = alerts.threshold_data(con, demo_env.model_id, start, end)
    assert per_day["day"].tolist() == list(pd.date_range(start, end - timedelta(days=1)))
    assert per_day["alerts"].sum() == kpis.n_alerts
    inside = _in_range(events, start, end)
    peak = inside.loc[inside.groupby("user_id")["surprisal"].idxmax()]
    peak_day = peak.set_index("user_id")["ts"].dt.floor("D")
    active = data.users[data.users["active"]].set_index("user_id")
    assert (active["day"] == peak_day.loc[active.index]).all()
    alerted = scores.loc[peak_day.index, "score"].to_numpy() >= threshold
    expected = peak_day[alerted].value_counts().to_dict()
    got = per_day.set_index("day")["alerts"]
    assert got[got > 0].to_dict() == expected
    # the backtest: the whole history, every scored user counted once on their peak day
    history = alerts.backtest(data, threshold).set_index("day")["alerts"]
    assert history.sum() == int((scores["score"] >= threshold).sum())
    peak_all = events.loc[events.groupby("user_id")["surprisal"].idxmax()].set_index("user_id")
    days_all = peak_all["ts"].dt.floor("D")
    hit = scores.loc[days_all.index, "score"].to_numpy() >= threshold
    assert history[history > 0].to_dict() == days_all[hit].value_counts().to_dict()


def test_alerts_per_day_fills_empty_days() -> None:
    days = pd.to_datetime(["2026-01-02 10:00", "2026-01-02 11:00", "2026-01-05 00:00"])
    out = alerts.alerts_per_day(
        days, np.array([True, True, False]), datetime(2026, 1, 1), datetime(2026, 1, 6)
    )
    assert out["alerts"].tolist() == [0, 2, 0, 0, 0]
    empty = alerts.alerts_per_day(pd.Series([], dtype="datetime64[us]"), np.array([], bool))
    assert empty.empty


def test_threshold_data_labels(demo_db_copy, world) -> None:
    _, scores, truth, start, end, _ = world
    users = sorted(scores.index)
    with store.open_db(demo_db_copy.db_path) as con:
        cases.add_label(con, users[0], "fraud", "ann")
        cases.add_label(con, users[1], "legit", "ann")
        cases.add_label(con, users[2], "unsure", "ann")
        data = alerts.threshold_data(con, demo_db_copy.model_id, start, end)
    u = data.users.set_index("user_id")
    assert data.has_truth and data.label_sources() == ["truth", "analyst"]
    assert set(u.index[u["y_truth"] == 1]) == truth
    assert u["y_analyst"].notna().sum() == data.n_analyst_labels == 2
    assert u.loc[users[0], "y_analyst"] == 1 and u.loc[users[1], "y_analyst"] == 0


def _random_problem(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 300
    y = (rng.random(n) < 0.15).astype(float)
    scores = np.clip(rng.normal(0.4 + 0.3 * y, 0.15), 0, 1).round(3)  # ties on purpose
    y[rng.random(n) < 0.3] = np.nan  # unknown
    return y, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_metrics_match_sklearn(seed) -> None:
    y, scores = _random_problem(seed)
    known = ~np.isnan(y)
    yk, sk = y[known].astype(int), scores[known]
    for threshold in (0.2, 0.45, 0.6, 0.75):
        pred = (sk >= threshold).astype(int)
        point = alerts.threshold_point(y, scores, threshold)
        assert point.alerts == int((scores >= threshold).sum())  # unknown users are alerts too
        expected = precision_score(yk, pred, zero_division=np.nan)
        assert point.precision == pytest.approx(expected, nan_ok=True)
        assert point.recall == pytest.approx(recall_score(yk, pred))
        assert point.f1 == pytest.approx(f1_score(yk, pred))
        np.testing.assert_array_equal(
            alerts.confusion(y, scores, threshold), confusion_matrix(yk, pred, labels=[0, 1])
        )
    table = alerts.metrics_table(y, scores, np.array([0.3, 0.5, 0.7]))
    for row in table.itertuples():
        pred = (sk >= row.threshold).astype(int)
        assert row.alerts == int((scores >= row.threshold).sum())
        expected = precision_score(yk, pred, zero_division=np.nan)
        assert row.precision == pytest.approx(expected, nan_ok=True)
        assert row.recall == pytest.approx(recall_score(yk, pred))
        assert row.f1 == pytest.approx(f1_score(yk, pred))
    curve = alerts.pr_curve(y, scores)
    precision, recall, thresholds = precision_recall_curve(yk, sk)
    np.testing.assert_allclose(curve["threshold"], thresholds)
    np.testing.assert_allclose(curve["precision"], precision[:-1])
    np.testing.assert_allclose(curve["recall"], recall[:-1])


@pytest.mark.parametrize(("seed", "missed", "review"), [(0, 500, 5), (1, 50, 20), (2, 1, 100)])
def test_min_cost_matches_brute_force(seed, missed, review) -> None:
    y, scores = _random_problem(seed)
    best = alerts.min_cost(y, scores, missed, review)
    grid = np.concatenate([np.linspace(-0.01, 1.01, 2001), np.unique(scores)])
    positives = scores[y == 1]

    def cost(t: float) -> float:
        return missed * int((positives < t).sum()) + review * int((scores >= t).sum())

    brute = min(cost(t) for t in grid)
    assert best.cost == pytest.approx(brute)
    assert cost(best.threshold) == pytest.approx(best.cost)
    assert best.alerts == int((scores >= best.threshold).sum())
    curve = alerts.cost_curve(y, scores, missed, review)
    assert curve["cost"].min() == pytest.approx(brute)


def test_save_threshold_is_recorded(demo_db_copy, monkeypatch) -> None:
    with store.open_db(demo_db_copy.db_path) as con:
        assert alerts.saved_setting(con, demo_db_copy.model_id) is None
        alerts.save_threshold(con, demo_db_copy.model_id, 0.7, 0.4, "ann", {"cost_missed": 500})
        alerts.save_threshold(con, demo_db_copy.model_id, 0.65, 0.3, "bob")
        setting = alerts.saved_setting(con, demo_db_copy.model_id)
        assert (setting.threshold, setting.weight, setting.analyst) == (0.65, 0.3, "bob")
        trail = cases.audit_trail(con)
        assert trail["action"].tolist() == ["threshold_save", "threshold_save"]
        assert json.loads(trail["detail"].iloc[1]) == {
            "threshold": 0.7,
            "weight": 0.4,
            "cost_missed": 500,
        }
        with pytest.raises(ValueError, match="lie in"):
            alerts.save_threshold(con, demo_db_copy.model_id, 1.5, 0.4, "ann")

        def boom(*args, **kwargs):
            raise RuntimeError("crash")

        monkeypatch.setattr(cases, "record_audit", boom)
        with pytest.raises(RuntimeError):
            alerts.save_threshold(con, demo_db_copy.model_id, 0.9, 0.5, "ann")
        assert con.execute("SELECT count(*) FROM thresholds").fetchall()[0][0] == 2


def test_figures() -> None:
    scores = np.array([0.1, 0.2, 0.85, 0.95, np.nan])
    hist = alert_charts.score_histogram(scores, 0.8, bins=10)
    bar = hist.data[0]
    assert sum(bar.y) == 4
    red = [c == alert_charts.ALERT_COLOUR for c in bar.marker.color]
    assert red == [x >= 0.8 - 1e-9 for x in np.linspace(0, 0.9, 10)]
    y, s = _random_problem(0)
    point = alerts.threshold_point(y, s, 0.5)
    pr = alert_charts.pr_curve_chart(alerts.pr_curve(y, s), point)
    assert len(pr.data) == 2 and pr.data[1].x == (point.recall,)
    cm = alert_charts.confusion_chart(alerts.confusion(y, s, 0.5))
    assert np.asarray(cm.data[0].z).sum() == int((~np.isnan(y)).sum())
    best = alerts.min_cost(y, s, 500, 5)
    cost = alert_charts.cost_chart(alerts.cost_curve(y, s, 500, 5), best, 0.5)
    assert cost.data[1].x == (best.threshold,)
    days = alerts.alerts_per_day(pd.to_datetime(["2026-01-01"]), np.array([True]))
    assert list(alert_charts.alerts_per_day_chart(days).data[0].y) == [1]
    table = alerts.metrics_table(y, s)
    assert {t.name for t in alert_charts.metrics_chart(table, 0.5).data} == {
        "precision",
        "recall",
        "f1",
    }


def test_a_model_without_labels_alerts_on_the_rarest_percent_by_default(tmp_path) -> None:
    con = store.connect(tmp_path / "t.duckdb")
    for model_id, supervised in (("with-labels", True), ("without", False)):
        con.execute(
            "INSERT INTO models (model_id, created_at, path, config, metrics)"
            " VALUES (?, now(), ?, '{}', ?)",
            [model_id, str(tmp_path / model_id), json.dumps({"supervised": supervised})],
        )
    assert alerts.threshold_in_use(con, "with-labels") == alerts.DEFAULT_THRESHOLD == 0.9
    assert alerts.threshold_in_use(con, "without") == alerts.UNSUPERVISED_DEFAULT_THRESHOLD
    assert alerts.threshold_in_use(con, None) == alerts.DEFAULT_THRESHOLD
    con.execute(
        "INSERT INTO models (model_id, created_at, path, config, metrics)"
        " VALUES ('odd', now(), 'x', '{}', 'not json')"
    )
    assert alerts.threshold_in_use(con, "odd") == alerts.DEFAULT_THRESHOLD
    alerts.save_threshold(con, "without", 0.95, 1 / 3, "tess")
    assert alerts.threshold_in_use(con, "without") == 0.95  # a saved one wins
    con.close()


def test_users_tied_at_the_top_percentile_rank_by_how_far_beyond_they_are(tmp_path) -> None:
    from core.export import user_scores_frame

    con = store.connect(tmp_path / "t.duckdb")
    t0 = datetime(2024, 3, 1)
    frame = pd.DataFrame(
        {"user_id": ["a", "b", "c", "d"], "ts": [t0] * 4, "event_type": ["view"] * 4}
    )
    store.ingest_dataframe(con, frame, source="f")
    # beyond every training user, all three share percentile 1 (the score of an unlabelled
    # model); their raw scores say how far beyond
    rows = [("a", 20.0, 1.0), ("b", 34.7, 1.0), ("c", 33.7, 1.0), ("d", 5.0, 0.6)]
    for user, raw, pct in rows:
        con.execute(
            "INSERT INTO sequence_scores (user_id, model_id, n_events, score_unsupervised,"
            " percentile_unsupervised, score) VALUES (?, 'm', 1, ?, ?, ?)",
            [user, raw, pct, pct],
        )
    con.execute("INSERT INTO models (model_id, created_at, path) VALUES ('m', now(), 'x')")
    ranked = alerts.active_scores(con, "m", None, None)
    assert ranked["user_id"].tolist() == ["b", "c", "a", "d"]
    exported = user_scores_frame(con, "m")
    assert exported["user_id"].tolist() == ["b", "c", "a", "d"]
    assert exported["rank"].tolist() == [1, 2, 3, 4]
    watch = alerts.novelty_watchlist(con, "m", None, None, threshold=1.5)
    assert watch["user_id"].tolist() == ["b", "c", "a"]
    picker = investigate.top_users(con, "m")  # Investigate's user picker
    assert picker["user_id"].tolist() == ["b", "c", "a", "d"]
    con.close()
