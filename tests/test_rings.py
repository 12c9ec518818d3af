"""core.rings: accounts behind one shared device, card or IP in a time range."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from core import cases, rings, store

T0 = datetime(2024, 5, 1)  # the log's first event


@pytest.fixture
def con(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    rows = [
        # two regulars from the log's first day share a household device
        ("old1", T0, "dev_home", "10.0.0.1", None),
        ("old2", T0 + timedelta(hours=1), "dev_home", "10.0.0.1", None),
        ("old1", T0 + timedelta(days=5), "dev_home", "10.0.0.1", None),
    ]
    # a ring: four accounts opened within three hours on day 3, one device, one card
    for i, hours in enumerate((0, 1, 2, 3)):
        at = T0 + timedelta(days=3, hours=hours)
        rows += [(f"ring{i}", at, "dev_ring", "10.0.0.9", "card_ring")]
        rows += [(f"ring{i}", at + timedelta(minutes=5), "dev_ring", "10.0.0.9", "card_ring")]
    # a café IP: five users who appeared on five different days
    for i in range(5):
        rows += [(f"cafe{i}", T0 + timedelta(days=2 + 2 * i), f"dev_c{i}", "10.0.0.1", None)]
    frame = pd.DataFrame(rows, columns=["user_id", "ts", "device_id", "ip", "payment_id"])
    frame["event_type"] = "view"
    c = store.connect(tmp_path / "rings.duckdb")
    store.ingest_dataframe(c, frame, source="rows")
    yield c
    c.close()


def _scores(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    users = [u for (u,) in con.execute("SELECT DISTINCT user_id FROM events").fetchall()]
    score = {"ring0": 0.95, "ring1": 0.4, "cafe3": 0.99}
    return pd.DataFrame({"user_id": users, "score": [score.get(u, 0.1) for u in users]})


def test_devices_and_cards_first_and_accounts_opened_together_lead(con) -> None:
    cases.add_label(con, "ring2", "fraud", "tess")
    groups = rings.shared_entities_in_range(con, None, None, _scores(con), threshold=0.9)
    assert groups.columns.tolist() == rings.COLUMNS
    assert groups["entity"].tolist() == ["device", "device", "card", "IP", "IP"]
    ring = groups.iloc[0]
    assert (ring["value"], ring["users"], ring["opened_together"]) == ("dev_ring", 4, 4)
    assert (ring["alerts"], ring["labelled_fraud"], ring["top_user"]) == (1, 1, "ring0")
    assert ring["user_ids"].split(", ")[:2] == ["ring0", "ring1"]  # highest score first
    assert ring["max_score"] == pytest.approx(0.95)
    assert ring["first_seen"] == T0 + timedelta(days=3)
    # the household's accounts were there on the log's first day: not 'opened together'
    home = groups.iloc[1]
    assert (home["value"], home["users"], home["opened_together"]) == ("dev_home", 2, 0)
    assert groups.iloc[2]["value"] == "card_ring"
    # IPs: the ring's accounts, opened within hours, before the café's, spread over days
    ips = groups.loc[groups["entity"] == "IP"]
    assert ips["value"].tolist() == ["10.0.0.9", "10.0.0.1"]
    cafe = ips.iloc[1]
    assert cafe["users"] == 7 and cafe["opened_together"] == 1 and cafe["alerts"] == 1


def test_the_range_and_the_minimum_of_users_apply(con) -> None:
    scores = _scores(con)
    # day 4 onward: the ring is over, the household's device has one user left in range
    later = rings.shared_entities_in_range(con, T0 + timedelta(days=4), None, scores, 0.9)
    assert later["value"].tolist() == ["10.0.0.1"]
    assert later.iloc[0]["users"] == 5  # old1 and cafe1..cafe4
    wide = rings.shared_entities_in_range(con, None, None, scores, 0.9, min_users=5)
    assert wide["value"].tolist() == ["10.0.0.1"]
    nothing = rings.shared_entities_in_range(con, T0 + timedelta(days=30), None, scores, 0.9)
    assert nothing.empty and nothing.columns.tolist() == rings.COLUMNS
    with pytest.raises(ValueError, match="at least 2"):
        rings.shared_entities_in_range(con, None, None, scores, 0.9, min_users=1)


def test_opened_together_counts_the_fullest_window() -> None:
    hours = [0, 1, 30, 31, 32, 80]
    times = [T0 + timedelta(hours=h) for h in hours]
    assert rings.opened_together(times, 24) == 3
    assert rings.opened_together(times, 100) == 6
    assert rings.opened_together(times[:1], 24) == 1
    assert rings.opened_together([], 24) == 0


def test_the_limit_applies_after_ranking(tmp_path: Path) -> None:
    rows = []
    for family in range(6):  # three-person households, accounts years apart in the log
        for member in range(3):
            at = T0 + timedelta(days=2 + 10 * member)
            rows.append((f"f{family}_{member}", at, f"dev_family{family}"))
    for member in range(2):  # a two-account ring, minutes apart
        rows.append((f"ring{member}", T0 + timedelta(days=5, minutes=5 * member), "dev_ring"))
    rows.append(("early", T0, "dev_other"))  # the log's first event
    frame = pd.DataFrame(rows, columns=["user_id", "ts", "device_id"]).assign(event_type="view")
    con = store.connect(tmp_path / "limit.duckdb")
    store.ingest_dataframe(con, frame, source="rows")
    empty = pd.DataFrame({"user_id": pd.Series(dtype=str), "score": pd.Series(dtype=float)})
    top = rings.shared_entities_in_range(con, None, None, empty, 0.9, limit=3)
    assert top["value"].tolist()[:1] == ["dev_ring"] and len(top) == 3
    assert top["alerts"].tolist() == [0, 0, 0] and top["max_score"].isna().all()
    con.close()
