"""The demo world: determinism, schema, ground truth and behavioural structure."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from core.schema import COLUMN_NAMES, DEMO_EVENT_TYPES, FRAUD_TYPOLOGIES
from core.simulate import World, WorldConfig, simulate_world

SMALL = WorldConfig(n_users=600, days=30, fraud_rate=0.15, seed=7)
EVENT_COLUMNS = [c for c in COLUMN_NAMES if c != "batch_id"]
STRING_COLUMNS = [
    "user_id", "session_id", "event_type", "item_id", "category",
    "device_id", "ip", "country", "payment_id", "text",
]  # fmt: skip


@pytest.fixture(scope="module")
def world() -> World:
    return simulate_world(SMALL)


@pytest.fixture(scope="module")
def labelled(world: World) -> pd.DataFrame:
    """Events with the user's typology ('normal' for normal users) and a per-event truth flag."""
    e = world.events
    typ = world.truth_users.set_index("user_id").typology
    user_typ = e.user_id.map(typ).fillna("normal")
    is_truth = e.event_id.isin(world.truth_events.event_id)
    return e.assign(user_typology=user_typ.to_numpy(), truth=is_truth.to_numpy())


def _normal(labelled: pd.DataFrame) -> pd.DataFrame:
    return labelled[labelled.user_typology == "normal"]


def _truth_of(labelled: pd.DataFrame, typology: str) -> pd.DataFrame:
    return labelled[labelled.truth & (labelled.user_typology == typology)]


# ----------------------------------------------------------------------------- determinism


def test_same_config_gives_identical_world() -> None:
    cfg = WorldConfig(n_users=250, days=10, fraud_rate=0.1, seed=3)
    a, b = simulate_world(cfg), simulate_world(cfg)
    pd.testing.assert_frame_equal(a.events, b.events)
    pd.testing.assert_frame_equal(a.truth_users, b.truth_users)
    pd.testing.assert_frame_equal(a.truth_events, b.truth_events)


def test_different_seed_gives_different_world() -> None:
    a = simulate_world(WorldConfig(n_users=250, days=10, fraud_rate=0.1, seed=3))
    b = simulate_world(WorldConfig(n_users=250, days=10, fraud_rate=0.1, seed=4))
    same_len = len(a.events) == len(b.events)
    assert not (same_len and a.events.ts.equals(b.events.ts))
    assert set(a.truth_users.user_id) != set(b.truth_users.user_id)


def test_progress_is_reported_to_completion() -> None:
    calls: list[tuple[int, int]] = []
    simulate_world(WorldConfig(n_users=50, days=5, seed=1), lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(calls) >= 3
    assert calls[-1][0] == calls[-1][1]


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        WorldConfig(n_users=0)
    with pytest.raises(ValueError):
        WorldConfig(fraud_rate=1.5)


# ----------------------------------------------------------------------------- schema


def test_columns_and_dtypes(world: World) -> None:
    e = world.events
    assert list(e.columns) == EVENT_COLUMNS
    assert e.event_id.dtype == np.int64
    assert e.ts.dtype == np.dtype("datetime64[us]")
    assert e.price.dtype == np.float64
    assert e.quantity.dtype == pd.Int32Dtype()
    for col in STRING_COLUMNS:
        assert e[col].dtype == pd.StringDtype(na_value=np.nan), col
    for col in ("ts", "user_id", "event_type", "session_id", "device_id", "ip", "country"):
        assert e[col].notna().all(), col


def test_ids_sorting_and_values(world: World) -> None:
    e = world.events
    assert (e.event_id.to_numpy() == np.arange(len(e))).all()
    key = pd.DataFrame({"u": e.user_id, "t": e.ts})
    assert key.equals(key.sort_values(["u", "t"], kind="stable"))
    assert set(e.event_type.unique()) <= set(DEMO_EVENT_TYPES)
    assert (e.price.dropna() >= 0).all()
    assert (e.quantity.dropna() >= 1).all()
    start = SMALL.start.astimezone(UTC).replace(tzinfo=None)
    assert e.ts.min() >= pd.Timestamp(start)
    assert e.ts.max() < pd.Timestamp(start) + pd.Timedelta(days=SMALL.days)
    assert e.user_id.str.fullmatch(r"u\d{6}").all()
    assert e.ip.str.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}").all()
    assert e.payment_id.dropna().str.startswith("card_").all()
    assert e.item_id.dropna().str.fullmatch(r"i\d{6}").all()
    assert 15 <= e.category.nunique() <= 25


def test_sessions_follow_the_30_minute_rule(world: World) -> None:
    e = world.events
    gap = e.ts.diff().dt.total_seconds()
    same_user = e.user_id.eq(e.user_id.shift())
    same_session = e.session_id.eq(e.session_id.shift())
    assert (gap[same_session] <= 1800).all()
    assert (gap[same_user & ~same_session] > 1800).all()
    assert not (same_session & ~same_user).any()
    # a session id is used by one contiguous run of rows
    assert e.session_id.nunique() == int((~same_session).sum())


def test_truth_frames_shape(world: World) -> None:
    assert list(world.truth_users.columns) == ["user_id", "typology"]
    assert list(world.truth_events.columns) == ["event_id", "user_id", "typology"]
    assert world.truth_events.event_id.dtype == np.int64
    assert world.truth_users.user_id.is_unique


def test_zero_fraud_world_is_all_normal() -> None:
    w = simulate_world(WorldConfig(n_users=80, days=7, fraud_rate=0.0, seed=2))
    assert len(w.truth_users) == 0 and len(w.truth_events) == 0
    assert w.events.user_id.nunique() == 80


# ----------------------------------------------------------------------------- ground truth


def test_every_typology_present(world: World) -> None:
    assert set(world.truth_users.typology) == set(FRAUD_TYPOLOGIES)
    assert set(world.truth_events.typology) == set(FRAUD_TYPOLOGIES)


def test_fraud_share_matches_config(world: World) -> None:
    assert world.events.user_id.nunique() == SMALL.n_users
    share = len(world.truth_users) / SMALL.n_users
    assert abs(share - SMALL.fraud_rate) <= 0.01


def test_truth_events_match_events(world: World) -> None:
    e = world.events.set_index("event_id")
    te = world.truth_events
    assert te.event_id.is_unique
    assert te.event_id.isin(e.index).all()
    assert (e.loc[te.event_id, "user_id"].to_numpy() == te.user_id.to_numpy()).all()
    user_typ = world.truth_users.set_index("user_id").typology
    assert (te.user_id.map(user_typ).to_numpy() == te.typology.to_numpy()).all()
    assert set(world.truth_users.user_id) == set(te.user_id)  # each fraudster has truth events
    assert set(world.truth_users.user_id) <= set(world.events.user_id)


def test_fraud_is_a_minority_of_fraudster_events_when_embedded(labelled: pd.DataFrame) -> None:
    """Some fraudsters hide an episode inside a long normal history."""
    fraud = labelled[labelled.user_typology != "normal"]
    share = fraud.groupby("user_id").truth.mean()
    assert (share < 0.5).mean() >= 0.15
    assert (share > 0.8).mean() >= 0.15  # and others are accounts opened for the fraud


def test_ato_victims_have_normal_history_then_takeover(labelled: pd.DataFrame) -> None:
    ato = labelled[labelled.user_typology == "account_takeover"]
    for _, ev in ato.groupby("user_id"):
        first = ev.index[ev.truth.to_numpy()][0]
        before = ev.loc[: first - 1]
        assert (~before.truth).all()
        assert before.session_id.nunique() >= 3
        attack = ev.loc[first]
        assert attack.device_id not in set(before.device_id)  # a new device
        assert ev.truth.sum() < len(ev)
        assert ev[ev.truth].event_type.isin(["purchase"]).any()


# ----------------------------------------------------------------------------- typologies


def test_order_brushing_repeats_few_items_with_reviews(labelled: pd.DataFrame) -> None:
    t = _truth_of(labelled, "order_brushing")
    per = t[t.event_type == "purchase"].groupby("user_id").item_id.agg(["size", "nunique"])
    assert (per["size"] >= 3).all() and (per["nunique"] <= 4).all()
    assert (t.event_type == "review").any()


def test_click_fraud_is_regular_ad_click_bursts(labelled: pd.DataFrame) -> None:
    t = _truth_of(labelled, "click_fraud")
    assert (t.event_type == "ad_click").mean() > 0.6
    assert (t.groupby("user_id").item_id.nunique() <= 4).all()

    def click_gap_cv(ev: pd.DataFrame) -> pd.Series:
        clicks = ev[ev.event_type == "ad_click"]
        gap = clicks.ts.diff().dt.total_seconds()
        gap = gap[clicks.session_id.eq(clicks.session_id.shift())]
        g = gap.groupby(clicks.user_id).agg(["std", "mean", "size"])
        g = g[g["size"] >= 5]
        return g["std"] / g["mean"]

    fraud_cv = click_gap_cv(t).median()
    normal_cv = click_gap_cv(_normal(labelled)).median()
    assert fraud_cv < 0.5 * normal_cv


def test_return_abuse_returns_most_purchases_quickly(labelled: pd.DataFrame) -> None:
    t = _truth_of(labelled, "return_abuse")
    n = t.event_type.value_counts()
    assert n.get("return", 0) >= 0.4 * n["purchase"]
    normal = _normal(labelled).event_type.value_counts()
    assert normal["return"] / normal["purchase"] < 0.15


def test_card_testing_tries_many_cards_with_small_amounts(labelled: pd.DataFrame) -> None:
    t = _truth_of(labelled, "card_testing")
    pay = t[t.event_type.isin(["payment", "payment_failed"])]
    assert pay.groupby("user_id").payment_id.nunique().median() >= 3
    assert pay.price.median() < 10
    assert (pay.event_type == "payment_failed").mean() > 0.3


def test_coupon_ring_shares_code_and_devices(labelled: pd.DataFrame) -> None:
    t = _truth_of(labelled, "coupon_ring")
    per = t.groupby("user_id").event_type.agg(lambda s: tuple(sorted(s)))
    assert all(s.count("signup") == 1 and s.count("coupon_redeem") == 1 for s in per)
    assert all(s.count("purchase") == 1 for s in per)
    codes = t[t.event_type == "coupon_redeem"].text
    assert codes.value_counts().iloc[0] >= 3  # one code redeemed by several ring accounts
    users_per_device = t.groupby("device_id").user_id.nunique()
    assert users_per_device.max() >= 3


def test_fake_reviews_are_of_items_never_bought(labelled: pd.DataFrame) -> None:
    fraud_users = labelled[labelled.user_typology == "fake_reviews"]
    bought = set(
        zip(
            *fraud_users[fraud_users.event_type == "purchase"][["user_id", "item_id"]].T.to_numpy(),
            strict=True,
        )
    )
    reviews = fraud_users[fraud_users.truth & (fraud_users.event_type == "review")]
    assert len(reviews) > 0
    assert not any((u, i) in bought for u, i in zip(reviews.user_id, reviews.item_id, strict=True))
    # similar texts: the most common text accounts for a good part of each account's reviews
    top_share = reviews.groupby("user_id").text.agg(lambda s: s.value_counts().iloc[0] / len(s))
    assert top_share.median() >= 0.4


def test_scraping_bots_view_fast_and_never_buy(labelled: pd.DataFrame) -> None:
    t = _truth_of(labelled, "scraping_bot")
    assert t.event_type.isin(["view", "search"]).all()
    gap = t.ts.diff().dt.total_seconds()[t.session_id.eq(t.session_id.shift())]
    n = _normal(labelled)
    ngap = n.ts.diff().dt.total_seconds()[n.session_id.eq(n.session_id.shift())]
    assert gap.median() < 0.5 * ngap.median()
    assert t.groupby("user_id").size().median() >= 50


# ----------------------------------------------------------------------------- normal structure


def test_normal_purchases_follow_cart_and_payment(labelled: pd.DataFrame) -> None:
    n = _normal(labelled)
    purchases = n[n.event_type == "purchase"]
    carts = n[n.event_type == "cart"]
    pairs = purchases.merge(carts, on=["session_id", "item_id"], suffixes=("", "_c"))
    carted = pairs[pairs.ts_c < pairs.ts].event_id.unique()
    assert len(carted) / len(purchases) >= 0.9
    pays = n[n.event_type == "payment"].groupby("session_id").ts.min()
    first_purchase = purchases.groupby("session_id").ts.min()
    assert (pays.reindex(first_purchase.index) <= first_purchase).mean() >= 0.95


def test_normal_returns_follow_a_purchase_days_later(labelled: pd.DataFrame) -> None:
    n = _normal(labelled)
    ret = n[n.event_type == "return"]
    assert len(ret) > 0
    pur = n[n.event_type == "purchase"].groupby(["user_id", "item_id"]).ts.min()
    first_buy = pd.Series(list(zip(ret.user_id, ret.item_id, strict=True))).map(pur)
    delay = (ret.ts.to_numpy() - first_buy.to_numpy()) / np.timedelta64(1, "h")
    assert (delay > 0).all()
    assert np.median(delay) > 24


def test_hour_of_day_is_not_uniform(labelled: pd.DataFrame) -> None:
    n = _normal(labelled)
    us = n[n.country == "US"]  # one timezone, so the local rhythm shows in UTC hours
    counts = np.bincount(us.ts.dt.hour, minlength=24)
    assert counts.min() < 0.3 * counts.max()


def test_normal_users_also_show_rare_event_types(labelled: pd.DataFrame) -> None:
    n = _normal(labelled)
    share = n.event_type.value_counts(normalize=True)
    for et in ("ad_click", "coupon_redeem", "password_change", "address_change", "signup",
               "login_failed", "payment_failed", "return", "review", "remove_cart"):  # fmt: skip
        assert 0 < share.get(et, 0) < 0.05, et
    assert n.groupby("user_id").country.nunique().gt(1).any()  # travel
    assert n.groupby("ip").user_id.nunique().max() >= 3  # shared networks


def test_activity_is_heavy_tailed(world: World) -> None:
    per_user = world.events.groupby("user_id").size()
    assert per_user.max() >= 10 * per_user.median()
    assert per_user.min() <= 10
    assert 50 <= per_user.mean() <= 150


def test_devices_per_normal_user(labelled: pd.DataFrame) -> None:
    dev = _normal(labelled).groupby("user_id").device_id.nunique()
    assert dev.median() <= 2 and (dev == 1).any() and (dev >= 3).any()


# ----------------------------------------------------------------------------- speed (last)


def test_generation_time_for_about_a_million_events() -> None:
    """Printed, not asserted: the budget (generate + ingest 1M in 60 s) is checked in bench."""
    t0 = time.perf_counter()
    w = simulate_world(WorldConfig(n_users=9_800, seed=11, start=datetime(2026, 10, 1, tzinfo=UTC)))
    dt = time.perf_counter() - t0
    print(f"\nsimulate_world: {len(w.events):,} events for 9,800 users in {dt:.2f} s")
    assert len(w.events) > 500_000


def test_a_demo_build_that_fails_at_the_truth_leaves_an_empty_store(tmp_path, monkeypatch) -> None:
    """Events without their ground truth would make the next `fraudlens demo` refuse ("already
    holds events"): a failure after the events are in takes them back out."""
    from core import store
    from core.demo import build_demo

    db = tmp_path / "demo.duckdb"
    config = WorldConfig(n_users=20, days=3, fraud_rate=0.2, seed=4)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "write_truth", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_demo(db, config)
    with store.open_db(db, read_only=True) as con:
        assert store.dataset_summary(con).n_events == 0
        assert con.execute("SELECT count(*) FROM ingest_batches").fetchone() == (0,)
    monkeypatch.undo()
    report = build_demo(db, config)
    assert report.rows_accepted > 0
