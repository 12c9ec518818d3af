"""Featurisation, windows, batches and loading of event sequences."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from core.schema import COLUMN_NAMES, COLUMN_TYPES
from core.sequences import (
    ABSENT,
    FIELDS,
    FLAG_NEW,
    FLAG_SEEN,
    GAP_BUCKET0,
    GAP_FIRST,
    PAD,
    UNK,
    SequenceFeaturizer,
    iter_window_batches,
    load_events,
    make_windows,
)

F = {name: j for j, name in enumerate(FIELDS)}


def shop_frame() -> pd.DataFrame:
    """Two users, rows deliberately out of order; expected tokens are spelled out per test."""
    return pd.DataFrame(
        {
            "event_id": [10, 11, 12, 13, 20, 21],
            "user_id": ["u1", "u1", "u1", "u1", "u2", "u2"],
            "ts": pd.to_datetime(
                [
                    "2024-03-01 08:00:00",
                    "2024-03-01 08:00:00",  # same second as the previous event: gap 0
                    "2024-03-01 08:01:00",  # 60 s later
                    "2024-03-02 08:01:00",  # a day later
                    "2024-03-01 23:30:00",
                    "2024-03-01 23:30:05",
                ]
            ),
            "event_type": ["login", "view", "view", "purchase", "view", "view"],
            "category": ["shoes", "shoes", "books", "garden", None, "shoes"],
            "price": [None, 50.0, 12.0, 50.0, 5.0, -1.0],
            "device_id": ["d1", "d1", "d2", "d1", None, "d9"],
            "ip": ["ip1", "ip1", "ip1", "ip1", "ip7", "ip7"],
        }
    ).iloc[[3, 0, 4, 2, 5, 1]]


def test_hand_made_frame_gives_the_expected_tokens() -> None:
    train = shop_frame()
    featurizer = SequenceFeaturizer(category_top_k=2, price_buckets=4).fit(train)
    assert featurizer.event_types_ == ["view", "login", "purchase"]  # by frequency
    assert featurizer.categories_ == ["shoes", "books"]  # top-2; garden is out

    enc = featurizer.transform(train)
    assert enc.user_ids.tolist() == ["u1", "u2"]
    assert enc.offsets.tolist() == [0, 4, 6]
    assert enc.event_ids.tolist() == [10, 11, 12, 13, 20, 21]
    assert enc.ts[2] == np.datetime64("2024-03-01T08:01:00")
    tok = enc.fields

    assert tok[:, F["event_type"]].tolist() == [4, 3, 3, 5, 3, 3]
    assert tok[:, F["category"]].tolist() == [3, 3, 4, UNK, ABSENT, 3]
    # gaps: first event, 0 s (bucket 0), 60 s in [32, 64), 1 day in [2^16, 2^17); u2: first, 5 s
    assert tok[:, F["gap"]].tolist() == [
        GAP_FIRST,
        GAP_BUCKET0,
        GAP_BUCKET0 + 6,
        GAP_BUCKET0 + 17,
        GAP_FIRST,
        GAP_BUCKET0 + 3,
    ]
    assert tok[:, F["hour"]].tolist() == [3 + 8, 3 + 8, 3 + 8, 3 + 8, 3 + 23, 3 + 23]
    # device: d1 new, d1 seen, d2 new, d1 seen again; u2: absent, then d9 new for u2
    assert tok[:, F["new_device"]].tolist() == [FLAG_NEW, FLAG_SEEN, FLAG_NEW, FLAG_SEEN] + [
        ABSENT,
        FLAG_NEW,
    ]
    assert tok[:, F["new_ip"]].tolist() == [FLAG_NEW, FLAG_SEEN, FLAG_SEEN, FLAG_SEEN] + [
        FLAG_NEW,
        FLAG_SEEN,
    ]
    # columns the data does not have embed as "absent"
    assert (tok[:, F["new_country"]] == ABSENT).all()
    assert (tok[:, F["new_card"]] == ABSENT).all()
    price = tok[:, F["price"]]
    assert price[0] == ABSENT and price[5] == UNK  # null, negative
    assert price[1] == price[3] > price[2] > price[4] >= 3  # 50 = 50 > 12 > 5

    sizes = featurizer.vocab_sizes()
    assert list(sizes) == list(FIELDS)
    assert (tok < np.array([sizes[f] for f in FIELDS])).all() and (tok > PAD).all()

    # unseen values at transform time are UNK, not an error
    later = shop_frame().assign(event_type="refund", category="toys")
    unseen = featurizer.transform(later).fields
    assert (unseen[:, F["event_type"]] == UNK).all() and (unseen[:, F["category"]] == UNK).all()


def test_timezone_aware_and_string_timestamps_read_as_utc() -> None:
    featurizer = SequenceFeaturizer().fit(shop_frame())
    frame = shop_frame()
    aware = frame.assign(ts=frame["ts"].dt.tz_localize("UTC").dt.tz_convert("Asia/Tokyo"))
    text = frame.assign(ts=frame["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    base = featurizer.transform(frame)
    for other in (aware, text):
        enc = featurizer.transform(other)
        np.testing.assert_array_equal(enc.fields, base.fields)
        np.testing.assert_array_equal(enc.ts, base.ts)


def log_key_frame(n_users: int = 5, per_user: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    keys = np.array([f"E{k}" for k in (5, 22, 7, 11, 9)])
    start = np.datetime64("2024-05-01T00:00:00")
    rows = []
    for u in range(n_users):
        ts = start + np.cumsum(rng.integers(1, 600, per_user)).astype("timedelta64[s]")
        rows.append(
            pd.DataFrame(
                {"user_id": f"blk_{u}", "ts": ts, "event_type": rng.choice(keys, per_user)}
            )
        )
    return pd.concat(rows, ignore_index=True)


def test_minimal_columns_and_an_unfamiliar_vocabulary() -> None:
    frame = log_key_frame()
    featurizer = SequenceFeaturizer().fit(frame)
    assert set(featurizer.event_types_) == {"E5", "E22", "E7", "E11", "E9"}
    enc = featurizer.transform(pa.Table.from_pandas(frame))
    assert enc.n_events == len(frame) and enc.n_users == 5
    for name in ("category", "price", "new_device", "new_ip", "new_country", "new_card"):
        assert (enc.fields[:, F[name]] == ABSENT).all(), name
    # no event_id column: events are numbered by input row
    assert sorted(enc.event_ids.tolist()) == list(range(len(frame)))
    assert (enc.fields[:, F["event_type"]] >= 3).all()
    assert (enc.fields[enc.offsets[:-1], F["gap"]] == GAP_FIRST).all()
    assert featurizer.vocab_sizes()["category"] == 3  # specials only


def test_missing_required_column_is_a_clear_error() -> None:
    featurizer = SequenceFeaturizer().fit(log_key_frame())
    with pytest.raises(ValueError, match="event_type"):
        featurizer.transform(log_key_frame().drop(columns="event_type"))
    with pytest.raises(RuntimeError, match="not fitted"):
        SequenceFeaturizer().transform(log_key_frame())


def test_transforming_users_in_chunks_matches_one_call() -> None:
    frame = log_key_frame(n_users=6)
    frame["event_id"] = np.arange(len(frame))
    frame = frame.sample(frac=1.0, random_state=1)  # shuffled rows
    frame["device_id"] = np.where(np.arange(len(frame)) % 3 == 0, "dA", "dB")
    featurizer = SequenceFeaturizer().fit(frame)
    con = duckdb.connect()
    con.execute("CREATE TABLE events AS SELECT * FROM frame")
    whole = featurizer.transform(load_events(con))
    users = sorted(frame["user_id"].unique())
    parts = [featurizer.transform(load_events(con, users=users[i : i + 2])) for i in (0, 2, 4)]
    np.testing.assert_array_equal(np.concatenate([p.fields for p in parts]), whole.fields)
    np.testing.assert_array_equal(np.concatenate([p.event_ids for p in parts]), whole.event_ids)
    assert np.all(np.diff(whole.ts.astype(np.int64)[: whole.offsets[1]]) >= 0)
    # A frame without the database's counts counts the other accounts among its own rows: for
    # the whole population that is the same thing.
    np.testing.assert_array_equal(featurizer.transform(frame).fields, whole.fields)
    assert (whole.fields[:, F["device_accounts"]] > FLAG_SEEN).any()


def shared_device_frame() -> pd.DataFrame:
    t = pd.Timestamp("2024-05-01 10:00:00")
    minute = pd.Timedelta(minutes=1)
    rows = [  # (user, minutes after t, device, card)
        ("a", 0, "dX", "c1"),
        ("b", 0, "dX", None),  # the same instant as a's first use: not "before"
        ("c", 5, "dX", "c1"),
        ("d", 9, "dX", None),
        ("a", 20, "dX", "c1"),  # a's own earlier use does not count
        ("e", 30, None, "c1"),
        ("f", 40, "dY", None),
        ("c", 50, "dX", None),  # a, b, d before: 3, the same bucket (2-3) as at c's first use
        ("c", 55, "dY", None),  # another device: its own count (f)
        ("c", 60, "dX", None),  # back to dX: still a, b, d
    ]
    return pd.DataFrame(
        {
            "event_id": np.arange(len(rows)),
            "user_id": [r[0] for r in rows],
            "ts": [t + r[1] * minute for r in rows],
            "event_type": "purchase",
            "device_id": [r[2] for r in rows],
            "payment_id": [r[3] for r in rows],
        }
    )


def test_shared_entity_fields_count_other_accounts_seen_before_each_event() -> None:
    frame = shared_device_frame()
    con = duckdb.connect()
    con.execute("CREATE TABLE events AS SELECT * FROM frame")
    loaded = load_events(con).to_pandas().set_index("event_id").sort_index()
    assert loaded["device_id__accounts_before"].tolist()[:5] == [0, 0, 2, 3, 3]
    assert loaded["device_id__accounts_before"].tolist()[7:] == [3, 1, 3]
    assert np.isnan(loaded.loc[5, "device_id__accounts_before"])
    assert loaded.loc[6, "device_id__accounts_before"] == 0
    card = loaded["payment_id__accounts_before"]
    assert card[[0, 2, 4, 5]].tolist() == [0, 1, 1, 2]
    assert card[[1, 3, 6]].isna().all()

    featurizer = SequenceFeaturizer().fit(frame)
    encoded = featurizer.transform(load_events(con))
    by_event = pd.DataFrame(encoded.fields, index=encoded.event_ids, columns=FIELDS).sort_index()
    # buckets 0, 1, 2-3, 4-7, ...: 0 other accounts is the first real index
    assert by_event["device_accounts"].tolist() == [
        FLAG_SEEN,
        FLAG_SEEN,
        FLAG_SEEN + 2,
        FLAG_SEEN + 2,
        FLAG_SEEN + 2,
        ABSENT,
        FLAG_SEEN,
        FLAG_SEEN + 2,  # every event says how many others used the device before it
        FLAG_SEEN + 1,
        FLAG_SEEN + 2,
    ]
    assert featurizer.token_label("device_accounts", FLAG_SEEN + 2) == "2–3 other accounts before"
    assert featurizer.token_label("card_accounts", FLAG_SEEN + 1) == "1 other account before"
    # One user's events loaded alone (a range of them, even) still count every account.
    alone = load_events(con, users=["d"], start=datetime(2024, 5, 1, 10, 9))
    assert alone.column("device_id__accounts_before").to_pylist() == [3]
    # Data without device or card columns: the fields are absent.
    bare = featurizer.transform(frame.drop(columns=["device_id", "payment_id"]))
    assert (bare.fields[:, [F["device_accounts"], F["card_accounts"]]] == ABSENT).all()


def test_windows_overlap_cover_every_event_and_map_back() -> None:
    frame = log_key_frame(n_users=3, per_user=1)
    frame = pd.concat([frame, log_key_frame(n_users=1, per_user=23, seed=3)], ignore_index=True)
    frame["user_id"] = frame["user_id"] + np.where(np.arange(len(frame)) < 3, "", "_long")
    frame["event_id"] = np.arange(len(frame)) * 7 + 100
    featurizer = SequenceFeaturizer().fit(frame)
    enc = featurizer.transform(frame)
    win = make_windows(enc, max_len=8)  # stride 4

    long_user = int(np.flatnonzero(enc.user_ids == "blk_0_long")[0])
    long_rows = win.user_index == long_user
    # 23 events, windows of 8 every 4, the last aligned to the end: starts 0, 4, 8, 12, 15
    assert win.start[long_rows].tolist() == [0, 4, 8, 12, 15]
    assert win.mask[long_rows].all()
    assert (win.mask[~long_rows].sum(axis=1) == 1).all()  # short users: one padded window

    # every event appears, padding is -1 / 0, and positions map back to the right row
    real = win.event_ids[win.mask]
    assert set(real.tolist()) == set(enc.event_ids.tolist())
    assert (win.event_ids[~win.mask] == -1).all() and (win.fields[~win.mask] == PAD).all()
    row_of = {int(e): i for i, e in enumerate(enc.event_ids)}
    w, p = np.nonzero(win.mask)
    rows = np.array([row_of[int(e)] for e in win.event_ids[w, p]])
    np.testing.assert_array_equal(win.fields[w, p], enc.fields[rows])
    np.testing.assert_array_equal(rows, enc.offsets[win.user_index[w]] + win.start[w] + p)

    # overlapping windows share events; "primary" picks each event exactly once
    first, second = np.flatnonzero(long_rows)[:2]
    assert set(win.event_ids[first, 4:]) == set(win.event_ids[second, :4])
    primary_ids = win.event_ids[win.primary]
    assert sorted(primary_ids.tolist()) == sorted(enc.event_ids.tolist())
    assert win.primary[second].tolist() == [False] * 4 + [True] * 4


def test_numeric_entity_ids_are_counted_like_text_ones() -> None:
    frame = shared_device_frame()
    numeric = frame.assign(device_id=frame["device_id"].map({"dX": 7, "dY": 8}).astype("Int64"))
    con_text, con_numeric = duckdb.connect(), duckdb.connect()
    con_text.execute("CREATE TABLE events AS SELECT * FROM frame")
    con_numeric.register("numeric_ids", numeric)
    con_numeric.execute("CREATE TABLE events AS SELECT * FROM numeric_ids")
    assert con_numeric.execute("SELECT typeof(device_id) FROM events LIMIT 1").fetchone() == (
        "BIGINT",
    )
    text = load_events(con_text, users=["c", "d"]).column("device_id__accounts_before")
    number = load_events(con_numeric, users=["c", "d"]).column("device_id__accounts_before")
    assert number.to_pylist() == text.to_pylist() == [2, 3, 1, 3, 3]


def test_length_bucketed_batches_cover_all_windows_trimmed() -> None:
    frame = pd.concat(
        [log_key_frame(n_users=1, per_user=n, seed=n).assign(user_id=f"u{n}") for n in range(1, 12)]
    )
    enc = SequenceFeaturizer().fit(frame).transform(frame)
    win = make_windows(enc, max_len=16)
    batches = list(iter_window_batches(win, batch_size=4))
    assert [len(b.index) for b in batches] == [4, 4, 3]
    assert sorted(np.concatenate([b.index for b in batches]).tolist()) == list(range(len(win)))
    widths = [b.fields.shape[1] for b in batches]
    assert widths == [11, 7, 3]  # longest first, each trimmed to its own longest window
    for b in batches:
        assert b.mask[:, -1].any() and b.fields.shape == (
            len(b.index),
            b.mask.shape[1],
            len(FIELDS),
        )
        np.testing.assert_array_equal(b.fields, win.fields[b.index, : b.mask.shape[1]])
        np.testing.assert_array_equal(b.event_ids, win.event_ids[b.index, : b.mask.shape[1]])
    unsorted = list(iter_window_batches(win, batch_size=4, sort_by_length=False))
    assert unsorted[0].index.tolist() == [0, 1, 2, 3]


def test_featurizer_save_load_round_trip(tmp_path) -> None:
    train = shop_frame()
    featurizer = SequenceFeaturizer(category_top_k=2, price_buckets=4).fit(train)
    featurizer.save(tmp_path)
    stored = json.loads((tmp_path / "featurizer.json").read_text())
    assert stored["event_types"] == ["view", "login", "purchase"]
    loaded = SequenceFeaturizer.load(tmp_path)
    assert loaded.vocab_sizes() == featurizer.vocab_sizes()
    np.testing.assert_array_equal(
        loaded.transform(train).fields, featurizer.transform(train).fields
    )
    assert loaded.token_label("event_type", 3) == "view"
    assert loaded.token_label("gap", GAP_BUCKET0 + 6) == "32 s–64 s"
    with pytest.raises(FileNotFoundError):
        SequenceFeaturizer.load(tmp_path / "nowhere")


def _duckdb_with(frame: pd.DataFrame) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    cols = [c for c in COLUMN_NAMES if c in frame.columns]
    con.execute(f"CREATE TABLE events ({', '.join(f'{c} {COLUMN_TYPES[c]}' for c in cols)})")
    con.register("incoming", frame[cols])
    con.execute(f"INSERT INTO events SELECT {', '.join(cols)} FROM incoming")  # noqa: S608
    return con


def test_load_events_filters_and_sorts() -> None:
    frame = shop_frame().assign(text="free text the model does not read")
    con = _duckdb_with(frame)
    table = load_events(con, users=["u1"], start=datetime(2024, 3, 1, 8, 0, 30))
    assert table.column_names == [
        "event_id",
        "ts",
        "user_id",
        "event_type",
        "category",
        "price",
        "device_id",
        "ip",
        "device_id__accounts_before",
    ]  # only the columns featurisation reads, those the table has, and the device's counts
    assert table["event_id"].to_pylist() == [12, 13]
    aware_end = datetime(2024, 3, 1, 23, 30, 1, tzinfo=UTC)
    both = load_events(con, end=aware_end)
    assert both["event_id"].to_pylist() == [10, 11, 12, 20]  # sorted by user, then time
    assert load_events(con, users=[]).num_rows == 0
    every = load_events(con, users=["u2"], columns=COLUMN_NAMES)
    assert "text" in every.column_names and every.num_rows == 2

    featurizer = SequenceFeaturizer().fit(load_events(con))
    from_db = featurizer.transform(load_events(con))
    np.testing.assert_array_equal(from_db.fields, featurizer.transform(frame).fields)

    minimal = _duckdb_with(log_key_frame(n_users=2, per_user=3))
    assert load_events(minimal).column_names == ["ts", "user_id", "event_type"]
