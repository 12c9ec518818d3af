"""Demo world: normal shoppers and labelled fraud typologies, with per-event ground truth.

The world is built for a model to learn real behaviour from, so fraud is never marked by a
single token: every event type, country, shared device or IP and coupon code that fraud uses
also occurs in normal histories, and each fraudster draws its own rates, timing and intensity.

Normal behaviour is generated for all users at once with numpy (session plans, then funnels
expanded with ``np.repeat``/``cumsum``); only the few fraudsters get a Python loop each.
Pipeline: users -> roles -> session plans -> fraud episodes -> normal session contents ->
session timing (no two sessions of a user overlap) -> follow-ups (returns, reviews) -> one sort.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa

from core.schema import COLUMN_NAMES, DEMO_EVENT_TYPES, FRAUD_TYPOLOGIES, SESSION_GAP_MINUTES

__all__ = ["World", "WorldConfig", "simulate_world"]


@dataclass(frozen=True)
class WorldConfig:
    n_users: int = 3000
    days: int = 30
    fraud_rate: float = 0.05  # share of users who are fraudulent (incl. ATO victims)
    seed: int = 0
    start: datetime = datetime(2026, 10, 1, tzinfo=UTC)

    def __post_init__(self) -> None:
        if self.n_users < 1:
            raise ValueError(f"n_users must be >= 1, got {self.n_users}")
        if self.days < 3:
            raise ValueError(f"days must be >= 3, got {self.days}")
        if not 0.0 <= self.fraud_rate <= 0.5:
            raise ValueError(f"fraud_rate must be in [0, 0.5], got {self.fraud_rate}")


@dataclass
class World:
    events: pd.DataFrame  # schema columns except batch_id, sorted by (user_id, ts)
    truth_users: pd.DataFrame  # user_id, typology: fraudsters and ATO victims only
    truth_events: pd.DataFrame  # event_id, user_id, typology: exactly the injected events


# --------------------------------------------------------------------------------------------
# Vocabulary of the world
# --------------------------------------------------------------------------------------------

_ET = {name: i for i, name in enumerate(DEMO_EVENT_TYPES)}
SIGNUP, LOGIN, LOGIN_FAILED, LOGOUT = (
    _ET["signup"],
    _ET["login"],
    _ET["login_failed"],
    _ET["logout"],
)
SEARCH, VIEW, AD_CLICK, WISHLIST = _ET["search"], _ET["view"], _ET["ad_click"], _ET["wishlist"]
CART, REMOVE_CART, COUPON = _ET["cart"], _ET["remove_cart"], _ET["coupon_redeem"]
PAYMENT, PAYMENT_FAILED, PURCHASE = _ET["payment"], _ET["payment_failed"], _ET["purchase"]
RETURN, REVIEW = _ET["return"], _ET["review"]
PASSWORD, ADDRESS = _ET["password_change"], _ET["address_change"]
_TYPO = {name: i for i, name in enumerate(FRAUD_TYPOLOGIES)}

# Seconds before an event inside a session, by event type: (median, log-sigma). Log-normal
# gives the heavy right tail of real dwell times; a per-user speed factor scales them.
_GAP = {
    SIGNUP: (5.0, 0.5), LOGIN: (6.0, 0.6), LOGIN_FAILED: (5.0, 0.6), LOGOUT: (12.0, 1.0),
    SEARCH: (14.0, 0.9), VIEW: (22.0, 1.0), AD_CLICK: (18.0, 1.0), WISHLIST: (8.0, 0.8),
    CART: (9.0, 0.8), REMOVE_CART: (20.0, 1.0), COUPON: (25.0, 0.8), PAYMENT: (35.0, 0.7),
    PAYMENT_FAILED: (35.0, 0.7), PURCHASE: (1.5, 0.5), RETURN: (40.0, 0.8),
    REVIEW: (90.0, 0.8), PASSWORD: (45.0, 0.6), ADDRESS: (60.0, 0.6),
}  # fmt: skip
_GAP_MED = np.array([_GAP[i][0] for i in range(len(DEMO_EVENT_TYPES))])
_GAP_SIG = np.array([_GAP[i][1] for i in range(len(DEMO_EVENT_TYPES))])
_MAX_IN_SESSION_GAP = 1500.0  # seconds; below the 30-minute session rule
_SESSION_SPACING = SESSION_GAP_MINUTES * 60.0 + 60.0  # planned sessions never touch

# name, median price, price log-sigma, popularity, return propensity factor, query nouns
_CATEGORIES: tuple[tuple[str, float, float, float, float, tuple[str, ...]], ...] = (
    ("electronics", 120.0, 0.9, 9, 1.0, ("headphones", "charger", "speaker", "tv")),
    ("phones", 380.0, 0.6, 5, 0.8, ("smartphone", "phone case", "iphone", "android phone")),
    ("computers", 650.0, 0.6, 4, 0.8, ("laptop", "monitor", "keyboard", "gaming pc")),
    ("fashion", 40.0, 0.7, 12, 2.5, ("dress", "jacket", "jeans", "t-shirt")),
    ("shoes", 65.0, 0.5, 7, 2.5, ("sneakers", "boots", "running shoes", "sandals")),
    ("jewelry", 140.0, 1.1, 3, 1.5, ("necklace", "ring", "watch", "earrings")),
    ("beauty", 20.0, 0.6, 8, 0.6, ("lipstick", "moisturizer", "perfume", "shampoo")),
    ("health", 16.0, 0.6, 5, 0.4, ("vitamins", "protein powder", "thermometer", "masks")),
    ("home", 35.0, 0.9, 8, 1.0, ("lamp", "bedding", "curtains", "rug")),
    ("furniture", 220.0, 0.8, 3, 1.2, ("sofa", "desk", "office chair", "bookshelf")),
    ("kitchen", 30.0, 0.8, 6, 0.8, ("coffee maker", "knife set", "blender", "pan")),
    ("garden", 28.0, 0.9, 3, 0.8, ("hose", "plant pot", "lawn mower", "seeds")),
    ("toys", 22.0, 0.8, 5, 0.8, ("lego", "doll", "puzzle", "rc car")),
    ("baby", 25.0, 0.7, 3, 0.8, ("diapers", "stroller", "baby monitor", "bottle")),
    ("sports", 45.0, 0.9, 5, 1.0, ("yoga mat", "dumbbells", "bike helmet", "tent")),
    ("books", 13.0, 0.4, 7, 0.4, ("novel", "cookbook", "kids book", "thriller")),
    ("video_games", 45.0, 0.4, 4, 0.6, ("ps5 game", "controller", "switch game", "headset")),
    ("grocery", 7.0, 0.6, 8, 0.2, ("coffee", "olive oil", "snacks", "tea")),
    ("pet_supplies", 18.0, 0.7, 4, 0.4, ("dog food", "cat litter", "leash", "pet bed")),
    ("gift_cards", 50.0, 0.5, 2, 0.1, ("gift card", "e-gift card", "voucher", "gift")),
)
_N_CAT = len(_CATEGORIES)
_CAT_INDEX = {c[0]: i for i, c in enumerate(_CATEGORIES)}
_HIGH_VALUE = np.array([_CAT_INDEX[c] for c in ("electronics", "phones", "computers", "jewelry")])
_RESALE = np.array([_CAT_INDEX[c] for c in ("phones", "computers", "gift_cards", "electronics")])
_WARDROBE = np.array(
    [_CAT_INDEX[c] for c in ("fashion", "shoes", "jewelry", "electronics", "phones", "computers")]
)
_STAPLE = np.array([_CAT_INDEX[c] for c in ("grocery", "pet_supplies", "health", "beauty", "baby")])
_ITEMS_PER_POPULARITY = 150  # catalogue: ~17k items
_SELLER_BLOCK = 25  # consecutive item ids of a category belong to one seller

# country code, share of users, UTC offset in hours
_COUNTRIES: tuple[tuple[str, float, float], ...] = (
    ("US", 0.28, -5), ("GB", 0.08, 0), ("DE", 0.08, 1), ("FR", 0.06, 1), ("ES", 0.04, 1),
    ("IT", 0.04, 1), ("NL", 0.03, 1), ("PL", 0.03, 1), ("BR", 0.06, -3), ("MX", 0.04, -6),
    ("CA", 0.04, -5), ("IN", 0.06, 5.5), ("JP", 0.04, 9), ("KR", 0.02, 9), ("CN", 0.03, 8),
    ("AU", 0.03, 10), ("TR", 0.02, 3), ("NG", 0.01, 1), ("VN", 0.01, 7), ("ID", 0.01, 7),
)  # fmt: skip
_N_COUNTRY = len(_COUNTRIES)
_COUNTRY_P = np.array([c[1] for c in _COUNTRIES]) / sum(c[1] for c in _COUNTRIES)
_COUNTRY_TZ = np.array([c[2] for c in _COUNTRIES])

# Local hour-of-day activity of shoppers: quiet at night, lunch bump, evening peak.
_HOUR_PROFILE = np.array(
    [0.9, 0.5, 0.3, 0.2, 0.2, 0.3, 0.6, 1.2, 1.8, 2.2, 2.4, 2.6,
     3.0, 3.0, 2.7, 2.6, 2.7, 3.0, 3.5, 4.2, 4.6, 4.3, 3.2, 1.9]
)  # fmt: skip
_HOUR_CDF = np.cumsum(_HOUR_PROFILE) / _HOUR_PROFILE.sum()

_PUBLIC_COUPONS = ("WELCOME10", "FALL15", "FREESHIP", "SAVE20", "FLASH25", "APP5")
_PUBLIC_COUPON_P = np.array([0.35, 0.2, 0.2, 0.1, 0.1, 0.05])
_REVIEW_OPENERS = (
    "Works as described.", "Good value for the price.", "Not bad overall.",
    "Arrived a bit late but fine.", "Quality is okay.", "Really happy with it.",
    "Smaller than I expected.", "Does the job.",
)  # fmt: skip
_REVIEW_DETAILS = (
    "Would buy again.", "Packaging was damaged.", "Battery could be better.",
    "Colour matches the photos.", "Took a while to set up.", "My kids love it.",
    "Returned the first one, this one works.", "3 stars.",
)  # fmt: skip
_PROMO_REVIEWS = tuple(
    f"{a} {b}"
    for a in ("Amazing product!!!", "Best purchase ever!!", "Excellent quality!!!", "5 stars!!")
    for b in ("Highly recommend this seller.", "Fast shipping, great seller!", "Must buy!!")
)
_QUERY_ADJ = ("", "cheap ", "best ", "new ", "sale ", "gift ")


class _Vocab:
    """String values of one column: code -> text, so rows carry small integers until the end."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self._index: dict[str, int] = {}

    def code(self, value: str) -> int:
        got = self._index.get(value)
        if got is None:
            got = self._index[value] = len(self.values)
            self.values.append(value)
        return got

    def codes(self, values: Sequence[str]) -> np.ndarray:
        return np.array([self.code(v) for v in values], dtype=np.int64)


# Columns of the internal event table. Follow-up columns (ret_*, rev_*) hold, for purchase
# rows, the chance and typical delay of a later return / review.
_SINK_COLUMNS: dict[str, tuple[type, float]] = {
    "user": (np.int64, -1), "sess": (np.int64, -1), "off": (np.float64, 0.0),
    "etype": (np.int16, -1), "item": (np.int64, -1), "cat": (np.int16, -1),
    "price": (np.float64, math.nan), "qty": (np.int16, -1), "dev": (np.int64, -1),
    "ip": (np.int64, -1), "country": (np.int16, -1), "pay": (np.int64, -1),
    "text": (np.int64, -1), "truth": (np.int8, -1), "ret_p": (np.float64, 0.0),
    "ret_med": (np.float64, 86400.0), "rev_p": (np.float64, 0.0),
    "rev_med": (np.float64, 86400.0), "rev_promo": (np.float64, 0.0),
}  # fmt: skip


class _Sink:
    """Collects event blocks (arrays or scalars per column) and concatenates them once."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in _SINK_COLUMNS}

    def add(self, n: int, **cols: object) -> None:
        unknown = set(cols) - set(_SINK_COLUMNS)
        if unknown:
            raise KeyError(f"unknown event columns {sorted(unknown)}")
        for name, (dtype, fill) in _SINK_COLUMNS.items():
            value = np.asarray(cols.get(name, fill), dtype=dtype)
            self.parts[name].append(np.broadcast_to(value, (n,)))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            name: (np.concatenate(self.parts[name]) if self.parts[name] else np.empty(0, dtype))
            for name, (dtype, _) in _SINK_COLUMNS.items()
        }


class _Draft:
    """One hand-built session (fraud episodes): events appended with gaps in seconds."""

    def __init__(self) -> None:
        self.t = 0.0
        self.rows: list[tuple[float, int, int, float, int, int, int, int]] = []

    def ev(
        self,
        etype: int,
        gap: float,
        item: int = -1,
        price: float = math.nan,
        qty: int = -1,
        pay: int = -1,
        text: int = -1,
        cat: int = -1,
    ) -> None:
        self.t += gap if self.rows else 0.0
        self.rows.append((self.t, etype, item, price, qty, pay, text, cat))

    def columns(self) -> dict[str, np.ndarray]:
        off, et, item, price, qty, pay, text, cat = (
            np.array(c) for c in zip(*self.rows, strict=True)
        )
        return {"off": off, "etype": et, "item": item, "price": price, "qty": qty, "pay": pay,
                "text": text, "cat": cat}  # fmt: skip


def _scale(q: float, lo: float, hi: float) -> float:
    """A fraudster's intensity q in [0, 1] mapped log-linearly onto lo .. hi."""
    return float(lo * (hi / lo) ** q)


def _group_starts(counts: np.ndarray) -> np.ndarray:
    return np.cumsum(counts) - counts


def _group_cumsum(values: np.ndarray, group: np.ndarray, inclusive: bool = True) -> np.ndarray:
    """Cumulative sum restarting at each new value of ``group`` (rows sorted by group)."""
    cs = np.cumsum(values)
    first = np.r_[True, group[1:] != group[:-1]]
    base = (cs - values)[first]
    out = cs - np.repeat(base, np.diff(np.r_[np.flatnonzero(first), len(values)]))
    return out if inclusive else out - values


class _Builder:
    def __init__(self, config: WorldConfig, progress: Callable[[int, int], None] | None) -> None:
        self.cfg = config
        self.rng = np.random.default_rng(config.seed)
        self.progress = progress
        self.T = config.days * 86400.0  # window length in seconds
        self.sink = _Sink()
        self.text = _Vocab()
        self.n_dev = 0
        self.n_card = 0
        # fraud sessions: user, planned start
        self.f_user: list[int] = []
        self.f_plan: list[float] = []

    # ---------------------------------------------------------------- small allocators
    def _step(self, i: int, total: int = 8) -> None:
        if self.progress is not None:
            self.progress(i, total)

    def new_devices(self, n: int) -> np.ndarray:
        out = np.arange(self.n_dev, self.n_dev + n, dtype=np.int64)
        self.n_dev += n
        return out

    def new_cards(self, n: int) -> np.ndarray:
        out = np.arange(self.n_card, self.n_card + n, dtype=np.int64)
        self.n_card += n
        return out

    def random_ips(self, countries: np.ndarray) -> np.ndarray:
        """Random addresses inside each country's blocks (two /8 blocks per country)."""
        countries = np.asarray(countries)
        pick = self.rng.integers(0, 2, countries.shape)
        first = self.country_octets[countries, pick]
        rest = self.rng.integers(1, 1 << 24, countries.shape)
        return (first.astype(np.int64) << 24) | rest

    # ---------------------------------------------------------------- catalogue
    def build_catalogue(self) -> None:
        rng = self.rng
        n_items = np.array([int(c[3] * _ITEMS_PER_POPULARITY) for c in _CATEGORIES])
        self.item_cat = np.repeat(np.arange(_N_CAT, dtype=np.int16), n_items)
        med = np.array([c[1] for c in _CATEGORIES])[self.item_cat]
        sig = np.array([c[2] for c in _CATEGORIES])[self.item_cat]
        price = med * np.exp(sig * rng.standard_normal(len(self.item_cat)))
        price = np.maximum(np.round(price) - 0.01, 0.99)
        gift = self.item_cat == _CAT_INDEX["gift_cards"]
        price[gift] = rng.choice([10.0, 25.0, 50.0, 100.0, 200.0], gift.sum())
        self.item_price = price
        self.cat_first = _group_starts(n_items)
        self.cat_n = n_items
        # Zipf-like popularity inside each category, popular items scattered over the ids.
        weights = np.empty(len(price))
        for c in range(_N_CAT):
            lo, n = self.cat_first[c], n_items[c]
            w = 1.0 / (rng.permutation(n) + 3.0) ** 1.05
            weights[lo : lo + n] = w / w.sum()
        self.item_pop = weights
        # cumulative popularity shifted by the category index: item = searchsorted(cat + u)
        self.item_cum = _group_cumsum(weights, self.item_cat.astype(np.int64)) + self.item_cat
        self.item_cum[self.cat_first + n_items - 1] = np.arange(_N_CAT) + 1.0
        self.cat_pop = np.array([c[3] for c in _CATEGORIES], dtype=float)
        self.cat_pop /= self.cat_pop.sum()
        self.cat_return = np.array([c[4] for c in _CATEGORIES])
        # texts
        self.query_codes = np.array(
            [self.text.codes([a + noun for a in _QUERY_ADJ for noun in c[5]]) for c in _CATEGORIES]
        )
        self.review_codes = self.text.codes(
            [f"{a} {b}" for a in _REVIEW_OPENERS for b in _REVIEW_DETAILS]
        )
        self.promo_codes = self.text.codes(_PROMO_REVIEWS)
        self.public_coupon_codes = self.text.codes(_PUBLIC_COUPONS)
        n_ref = max(20, self.cfg.n_users // 8)
        self.referral_codes = self.text.codes(self._referral_strings(n_ref))

    def _referral_strings(self, n: int) -> list[str]:
        letters = np.array(list("ABCDEFGHJKLMNPQRSTUVWXYZ23456789"))
        picks = letters[self.rng.integers(0, len(letters), (n, 5))]
        return ["REF-" + "".join(row) for row in picks]

    def sample_items(self, cats: np.ndarray) -> np.ndarray:
        u = self.rng.random(len(cats))
        idx = np.searchsorted(self.item_cum, cats + u, side="right")
        return np.minimum(idx, self.cat_first[cats] + self.cat_n[cats] - 1)

    def seller_items(self, cat: int, k: int, unpopular: bool = True) -> np.ndarray:
        """k items of one seller (a block of consecutive ids) in a category."""
        n_blocks = max(1, self.cat_n[cat] // _SELLER_BLOCK)
        block = int(self.rng.integers(0, n_blocks))
        lo = self.cat_first[cat] + block * _SELLER_BLOCK
        ids = np.arange(lo, min(lo + _SELLER_BLOCK, self.cat_first[cat] + self.cat_n[cat]))
        if unpopular:
            ids = ids[np.argsort(self.item_pop[ids])]
            ids = ids[: max(k, len(ids) // 2)]
        return self.rng.choice(ids, size=min(k, len(ids)), replace=False)

    # ---------------------------------------------------------------- users
    def build_users(self) -> None:
        rng, n = self.rng, self.cfg.n_users
        self.country_octets = rng.permutation(np.r_[11:100, 128:224])[: 2 * _N_COUNTRY]
        self.country_octets = self.country_octets.reshape(_N_COUNTRY, 2)
        country = rng.choice(_N_COUNTRY, n, p=_COUNTRY_P).astype(np.int16)
        # Activity is heavy-tailed: most users a few sessions a month, a few several a day.
        self.rate = np.exp(-1.75 + 1.1 * rng.standard_normal(n))  # sessions per day
        self.is_new = rng.random(n) < 0.12
        self.shift = rng.normal(0.0, 1.2, n)
        owls = rng.random(n) < 0.05
        self.shift[owls] += rng.uniform(3.0, 6.0, owls.sum())
        self.speed = np.exp(rng.normal(0.0, 0.45, n))
        # devices (1-3), home IPs (2), cards (1-3)
        n_dev = rng.choice([1, 2, 3], n, p=[0.5, 0.35, 0.15])
        self.devs = self.new_devices(3 * n).reshape(n, 3)
        self.n_devs = n_dev
        self.ips = self.random_ips(np.repeat(country, 2)).reshape(n, 2)
        # cards: most have one or two; families and small businesses juggle several
        self.n_cards = rng.choice(np.arange(1, 7), n, p=[0.66, 0.22, 0.06, 0.03, 0.02, 0.01])
        self.cards = self.new_cards(6 * n).reshape(n, 6)
        # households: shared home IP (and sometimes the family computer) with another user
        hh = np.flatnonzero(rng.random(n) < 0.05)
        partner = rng.integers(0, n, len(hh))
        country[hh] = country[partner]
        self.ips[hh, 0] = self.ips[partner, 0]
        family = rng.random(len(hh)) < 0.4
        self.devs[hh[family], 0] = self.devs[partner[family], 0]
        self.country = country
        self.tz = _COUNTRY_TZ[country]
        # mobile carriers put many users behind few addresses (CGNAT)
        per_country = max(6, n // 200)
        self.carrier = self.random_ips(np.repeat(np.arange(_N_COUNTRY), per_country)).reshape(
            _N_COUNTRY, per_country
        )
        # datacenter / VPN / proxy addresses: used by VPN users, bots and attackers alike
        n_proxy = max(30, n // 40)
        self.proxy_country = rng.choice(_N_COUNTRY, n_proxy).astype(np.int16)
        self.proxy_ip = self.random_ips(self.proxy_country)
        self.vpn_p = np.where(rng.random(n) < 0.03, rng.uniform(0.2, 0.6, n), 0.0)
        self.vpn_idx = rng.integers(0, n_proxy, n)
        # a trip abroad, a new phone, a new card: legitimate changes in the window
        self.trip_start = np.where(rng.random(n) < 0.08, rng.uniform(0, self.T, n), np.inf)
        self.trip_end = self.trip_start + rng.uniform(2, 10, n) * 86400
        self.trip_country = (country + rng.integers(1, _N_COUNTRY, n)) % _N_COUNTRY
        self.trip_ip = self.random_ips(self.trip_country)
        self.new_dev_t = np.where(rng.random(n) < 0.10, rng.uniform(0, self.T, n), np.inf)
        self.new_dev = self.new_devices(n)
        self.new_card_t = np.where(rng.random(n) < 0.05, rng.uniform(0, self.T, n), np.inf)
        self.new_card = self.new_cards(n)

        # shopping habits
        # shopping habits, each with a legitimate heavy tail (a persona of a few % of users) so
        # that no fraud typology is the only source of its characteristic events
        def persona(share: float, lo: float, hi: float, usual: np.ndarray) -> np.ndarray:
            return np.where(rng.random(n) < share, rng.uniform(lo, hi, n), usual)

        self.buy_p = rng.beta(2.0, 8.0, n)
        self.ad_p = persona(0.1, 0.05, 0.15, rng.uniform(0, 0.03, n))
        self.ad_p = persona(0.04, 0.15, 0.45, self.ad_p)  # deal hunters clicking every ad
        self.coupon_p = persona(0.05, 0.3, 0.8, rng.beta(1.0, 12.0, n))
        self.payfail_p = persona(0.02, 0.15, 0.4, rng.beta(1.0, 30.0, n))  # card trouble
        self.loginfail_p = persona(0.03, 0.1, 0.3, rng.beta(1.0, 40.0, n))  # forgetful
        self.ret_p = persona(0.08, 0.2, 0.6, rng.beta(1.0, 30.0, n))  # size bracketers
        self.ret_med = np.where(self.ret_p > 0.2, rng.uniform(1.5, 5, n), 5.0) * 86400
        self.rev_p = persona(0.06, 0.5, 0.95, rng.beta(1.2, 6.0, n))  # prolific reviewers
        self.stray_review_p = np.where(self.rev_p > 0.5, rng.uniform(0.05, 0.3, n), 0.02)
        self.staple_p = np.where(rng.random(n) < 0.08, rng.uniform(0.3, 0.8, n), 0.0)
        self.staple = self.sample_items(rng.choice(_STAPLE, n))
        # category affinity: a concentrated Dirichlet around global popularity
        aff = rng.gamma(np.broadcast_to(self.cat_pop * 3.0, (n, _N_CAT)))
        aff /= aff.sum(axis=1, keepdims=True)
        self.aff_cum = np.cumsum(aff, axis=1)
        self.first_t = np.zeros(n)
        self.n_sessions = 1 + rng.poisson(self.rate * self.cfg.days)
        self.role = np.full(n, -1, dtype=np.int8)

    # ---------------------------------------------------------------- fraud roles
    def assign_roles(self) -> None:
        rng, n = self.rng, self.cfg.n_users
        n_fraud = int(round(self.cfg.fraud_rate * n))
        weights = np.array([0.14, 0.12, 0.12, 0.16, 0.10, 0.14, 0.12, 0.10])
        raw = weights / weights.sum() * n_fraud
        counts = np.floor(raw).astype(int)
        for i in np.argsort(-(raw - counts))[: n_fraud - counts.sum()]:
            counts[i] += 1
        if n_fraud >= len(FRAUD_TYPOLOGIES):  # every typology present when possible
            while (counts == 0).any():
                counts[np.argmax(counts)] -= 1
                counts[np.argmin(counts)] += 1
        self.embed_share = rng.uniform(0.3, 0.6, len(FRAUD_TYPOLOGIES))
        order = rng.permutation(n)
        # ATO victims: existing accounts with some history before the takeover
        n_ato = counts[_TYPO["account_takeover"]]
        cand = order[(~self.is_new[order]) & (self.n_sessions[order] >= 4)]
        if len(cand) < n_ato:
            extra = order[~self.is_new[order] & (self.n_sessions[order] < 4)][: n_ato - len(cand)]
            self.n_sessions[extra] = 4 + rng.poisson(3, len(extra))
            cand = np.r_[cand, extra]
        victims = cand[:n_ato]
        self.role[victims] = _TYPO["account_takeover"]
        rest = order[self.role[order] < 0]
        pos = 0
        self.embedded = np.zeros(n, dtype=bool)
        self.embedded[victims] = True
        for t, name in enumerate(FRAUD_TYPOLOGIES):
            if name == "account_takeover":
                continue
            us = rest[pos : pos + counts[t]]
            pos += counts[t]
            self.role[us] = t
            if name == "coupon_ring":
                continue
            emb = rng.random(len(us)) < self.embed_share[t]
            self.embedded[us[emb]] = True
            self.n_sessions[us[emb]] = np.maximum(
                self.n_sessions[us[emb]], rng.integers(5, 25, emb.sum())
            )
            pure = us[~emb]
            self.n_sessions[pure] = rng.integers(0, 3, len(pure))
            fresh = pure[rng.random(len(pure)) < 0.6]
            self.is_new[pure] = False
            self.is_new[fresh] = True
            self.n_sessions[fresh] += 1  # the signup session
        ring = np.flatnonzero(self.role == _TYPO["coupon_ring"])
        self.is_new[ring] = False  # their signup is part of the fraud episode
        self.n_sessions[ring] = rng.integers(0, 5, len(ring))
        self.fraud_users = np.flatnonzero(self.role >= 0)

    # ---------------------------------------------------------------- session plans
    def session_times(self, users: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Start times (s) following the users' daily rhythm, weekends a bit busier, >= lo."""
        rng, days = self.rng, self.cfg.days
        weekday0 = self.cfg.start.weekday()
        w = np.where(((np.arange(days) + weekday0) % 7) >= 5, 1.25, 1.0)
        cum = np.r_[0.0, np.cumsum(w)]
        lo_day = np.minimum(np.floor(lo / 86400).astype(int), days - 1)
        u = cum[lo_day] + rng.random(len(users)) * (cum[-1] - cum[lo_day])
        day = np.minimum(np.searchsorted(cum, u, side="right") - 1, days - 1)
        hour = np.searchsorted(_HOUR_CDF, rng.random(len(users))) + rng.random(len(users))
        t = day * 86400.0 + ((hour + self.shift[users] - self.tz[users]) % 24.0) * 3600.0
        t = np.where(t >= self.T, t - 86400.0, t)
        late = t < lo
        t[late] = lo[late] + rng.random(late.sum()) * (self.T - lo[late]) * 0.999
        return t

    def plan_normal_sessions(self) -> None:
        rng, n = self.rng, self.cfg.n_users
        # new users sign up during the window; their first session is the signup
        new = np.flatnonzero(self.is_new)
        pure_fraud = self.is_new & (self.role >= 0)
        self.first_t[new] = self.session_times(new, np.zeros(len(new)))
        # pure fraud accounts open shortly before their episode (set in plan_fraud_starts)
        self.first_t[pure_fraud] = self.episode_t0[pure_fraud] - rng.uniform(
            1800, 3 * 86400, pure_fraud.sum()
        )
        self.first_t = np.maximum(self.first_t, 0.0)
        ring = self.role == _TYPO["coupon_ring"]
        self.first_t[ring] = self.episode_t0[ring] + 3600.0
        cnt = self.n_sessions
        s_user = np.repeat(np.arange(n), cnt)
        t = self.session_times(s_user, self.first_t[s_user])
        order = np.lexsort((t, s_user))
        s_user, t = s_user[order], t[order]
        first = _group_starts(cnt)[cnt > 0]
        signup = np.zeros(len(s_user), dtype=bool)
        signup[first] = self.is_new[s_user[first]]
        t[first[signup[first]]] = self.first_t[s_user[first[signup[first]]]]
        self.s_user, self.s_plan, self.s_signup = s_user, t, signup

    def plan_fraud_starts(self) -> None:
        """Episode start per fraudster: somewhere in the window, leaving room to finish."""
        rng, n = self.rng, self.cfg.n_users
        self.episode_t0 = np.full(n, np.nan)
        f = self.role >= 0
        self.episode_t0[f] = rng.uniform(0.08, 0.75, f.sum()) * self.T
        ring = self.role == _TYPO["coupon_ring"]
        self.episode_t0[ring] = np.nan  # set per ring below
        ring_users = np.flatnonzero(ring)
        self.rings: list[np.ndarray] = []
        pos = 0
        while pos < len(ring_users):
            left = len(ring_users) - pos
            size = int(min(rng.integers(3, 13), left))
            size = left if left - size < 3 else size  # no ring of one or two
            members = ring_users[pos : pos + size]
            pos += size
            t0 = rng.uniform(0.0, min(5.0, self.cfg.days * 0.2)) * 86400
            self.episode_t0[members] = t0 + np.sort(rng.uniform(0, rng.uniform(3, 48) * 3600, size))
            self.country[members] = self.country[members[0]]
            self.tz[members] = self.tz[members[0]]
            self.ips[members] = self.random_ips(np.repeat(self.country[members], 2)).reshape(-1, 2)
            self.rings.append(members)

    # ---------------------------------------------------------------- normal contents
    def normal_sessions(self) -> None:
        rng, sink = self.rng, _Sink()
        su, st = self.s_user, self.s_plan
        S = len(su)
        # session context: device, network, country
        r = rng.random(S)
        devk = np.minimum((r > 0.65).astype(int) + (r > 0.9), self.n_devs[su] - 1)
        dev = self.devs[su, devk]
        newd = (st >= self.new_dev_t[su]) & (rng.random(S) < 0.6)
        dev[newd] = self.new_dev[su[newd]]
        ip = self.ips[su, rng.integers(0, 2, S)]
        mobile = (devk > 0) & (rng.random(S) < 0.5)
        ip[mobile] = self.carrier[
            self.country[su[mobile]], rng.integers(0, self.carrier.shape[1], mobile.sum())
        ]
        country = self.country[su].copy()
        vpn = rng.random(S) < self.vpn_p[su]
        ip[vpn] = self.proxy_ip[self.vpn_idx[su[vpn]]]
        country[vpn] = self.proxy_country[self.vpn_idx[su[vpn]]]
        trip = (st >= self.trip_start[su]) & (st < self.trip_end[su])
        ip[trip] = self.trip_ip[su[trip]]
        country[trip] = self.trip_country[su[trip]]
        any_card = self.cards[su, (rng.random(S) * self.n_cards[su]).astype(np.int64)]
        primary_p = np.where(self.n_cards[su] > 3, 0.4, 0.8)
        card = np.where(rng.random(S) < primary_p, self.cards[su, 0], any_card)
        newc = (st >= self.new_card_t[su]) & (rng.random(S) < 0.7)
        card[newc] = self.new_card[su[newc]]
        self.s_dev, self.s_ip, self.s_country = dev, ip, country

        # session shape
        signup = self.s_signup
        login = ~signup & (rng.random(S) < np.where(devk == 0, 0.6, 0.85))
        n_fail = np.where(login & (rng.random(S) < self.loginfail_p[su]), rng.integers(1, 3, S), 0)
        pw = rng.random(S) < 0.002 + 0.3 * (n_fail > 0)
        addr = rng.random(S) < 0.004 + 0.3 * signup
        n_browse = np.clip(np.round(np.exp(np.log(4.5) + 0.85 * rng.standard_normal(S))), 1, 120)
        n_browse = n_browse.astype(np.int64)
        burst = rng.random(S) < 0.01  # an occasional binge of views
        n_browse[burst] *= rng.integers(4, 15, burst.sum())
        buy = rng.random(S) < np.where(signup, 0.5, self.buy_p[su])  # welcome offers
        cart_only = ~buy & (rng.random(S) < 0.22)
        n_cart = np.where(
            buy | cart_only, np.minimum(rng.geometric(0.6, S), np.minimum(n_browse, 6)), 0
        )
        coupon = buy & (rng.random(S) < self.coupon_p[su] + 0.6 * signup)
        pay_fail = buy & (rng.random(S) < self.payfail_p[su])
        remove = cart_only & (rng.random(S) < 0.3)
        logout = rng.random(S) < 0.12
        stray_review = rng.random(S) < self.stray_review_p[su]  # bought before the window

        # categories: a main and a second interest per session
        a = self.aff_cum[su]
        prim = np.minimum((a < rng.random((S, 1))).sum(axis=1), _N_CAT - 1)
        sec = np.minimum((a < rng.random((S, 1))).sum(axis=1), _N_CAT - 1)

        # browse block
        B = int(n_browse.sum())
        b_s = np.repeat(np.arange(S), n_browse)
        b_start = _group_starts(n_browse)
        b_pos = np.arange(B) - b_start[b_s]
        rc = rng.random(B)
        b_cat = np.where(
            rc < 0.72, prim[b_s], np.where(rc < 0.95, sec[b_s], rng.integers(0, _N_CAT, B))
        )
        b_item = self.sample_items(b_cat)
        rt = rng.random(B)
        ad = self.ad_p[su[b_s]]
        b_type = np.full(B, VIEW, dtype=np.int16)
        p_search = np.where(b_pos == 0, 0.45, 0.12)
        b_type[rt < p_search] = SEARCH
        b_type[(rt >= p_search) & (rt < p_search + ad)] = AD_CLICK
        b_type[(rt >= p_search + ad) & (rt < p_search + ad + 0.02)] = WISHLIST

        # carts: items seen in the session (the view is forced right before the cart)
        C = int(n_cart.sum())
        c_s = np.repeat(np.arange(S), n_cart)
        c_pos = (rng.random(C) * n_browse[c_s]).astype(np.int64)
        c_b = b_start[c_s] + c_pos
        b_type[c_b] = VIEW
        staple = rng.random(C) < self.staple_p[su[c_s]]
        b_item[c_b[staple]] = self.staple[su[c_s[staple]]]
        b_cat = np.where(b_type == SEARCH, b_cat, self.item_cat[b_item])
        c_item = b_item[c_b]
        c_price = self.item_price[c_item]
        c_qty = np.where(rng.random(C) < 0.87, 1, rng.integers(2, 5, C))
        b_text = np.where(
            b_type == SEARCH,
            self.query_codes[b_cat, rng.integers(0, self.query_codes.shape[1], B)],
            -1,
        )
        b_item = np.where(b_type == SEARCH, -1, b_item)
        b_price = np.where(b_type == SEARCH, np.nan, self.item_price[np.maximum(b_item, 0)])

        K = 10 + 2 * n_browse + 2  # checkout key per session
        sink.add(B, sess=b_s, off=10 + 2 * b_pos, etype=b_type, item=b_item, cat=b_cat,
                 price=b_price, text=b_text)  # fmt: skip
        sink.add(C, sess=c_s, off=11 + 2 * c_pos, etype=CART, item=c_item,
                 cat=self.item_cat[c_item], price=c_price, qty=c_qty)  # fmt: skip
        # account block
        ss = np.flatnonzero(signup)
        sink.add(len(ss), sess=ss, off=0, etype=SIGNUP)
        fs = np.repeat(np.arange(S), n_fail)
        sink.add(len(fs), sess=fs, off=1, etype=LOGIN_FAILED)
        ls = np.flatnonzero(login)
        sink.add(len(ls), sess=ls, off=2, etype=LOGIN)
        ps = np.flatnonzero(pw)
        sink.add(len(ps), sess=ps, off=3, etype=PASSWORD)
        ads = np.flatnonzero(addr)
        sink.add(len(ads), sess=ads, off=4, etype=ADDRESS)
        # checkout block
        total = np.bincount(c_s, weights=c_price * c_qty, minlength=S)
        total = np.where(coupon, np.round(total * 0.85, 2), total)
        rs = np.flatnonzero(remove)
        r_item = c_item[_group_starts(n_cart)[rs]]
        sink.add(len(rs), sess=rs, off=K[rs], etype=REMOVE_CART, item=r_item,
                 cat=self.item_cat[r_item], price=self.item_price[r_item], qty=1)  # fmt: skip
        cs_ = np.flatnonzero(coupon)
        code = np.where(
            rng.random(len(cs_)) < 0.75,
            self.public_coupon_codes[
                rng.choice(len(_PUBLIC_COUPONS), len(cs_), p=_PUBLIC_COUPON_P)
            ],
            self.referral_codes[rng.integers(0, len(self.referral_codes), len(cs_))],
        )
        sink.add(len(cs_), sess=cs_, off=K[cs_] + 2, etype=COUPON, text=code)
        pf = np.flatnonzero(pay_fail)
        sink.add(
            len(pf), sess=pf, off=K[pf] + 3, etype=PAYMENT_FAILED, price=total[pf], pay=card[pf]
        )
        switch = pay_fail & (self.n_cards[su] > 1) & (rng.random(S) < 0.6)
        other = self.cards[su, 1 + (rng.random(S) * (self.n_cards[su] - 1)).astype(np.int64)]
        card = np.where(switch, other, card)
        bs = np.flatnonzero(buy)
        sink.add(len(bs), sess=bs, off=K[bs] + 4, etype=PAYMENT, price=total[bs], pay=card[bs])
        pc = np.flatnonzero(buy[c_s])
        p_s = c_s[pc]
        pu = su[p_s]
        sink.add(
            len(pc), sess=p_s, off=K[p_s] + 5, etype=PURCHASE, item=c_item[pc],
            cat=self.item_cat[c_item[pc]], price=c_price[pc], qty=c_qty[pc], pay=card[p_s],
            ret_p=np.minimum(self.ret_p[pu] * self.cat_return[self.item_cat[c_item[pc]]], 0.9),
            ret_med=self.ret_med[pu], rev_p=self.rev_p[pu], rev_med=4 * 86400.0, rev_promo=0.05,
        )  # fmt: skip
        srs = np.flatnonzero(stray_review)
        s_item = self.sample_items(prim[srs])
        s_text = self.review_codes[rng.integers(0, len(self.review_codes), len(srs))]
        sink.add(len(srs), sess=srs, off=K[srs] + 8, etype=REVIEW, item=s_item,
                 cat=self.item_cat[s_item], text=s_text)  # fmt: skip
        los = np.flatnonzero(logout)
        sink.add(len(los), sess=los, off=K[los] + 9, etype=LOGOUT)
        self._order_and_time(sink)

    def _order_and_time(self, sink: _Sink) -> None:
        """Order each normal session's events by key and turn keys into second offsets."""
        cols = sink.arrays()
        order = np.lexsort((cols["off"], cols["sess"]))
        cols = {k: v[order] for k, v in cols.items()}
        s = cols["sess"]
        u = self.s_user[s]
        et = cols["etype"]
        n = len(s)
        gap = _GAP_MED[et] * np.exp(_GAP_SIG[et] * self.rng.standard_normal(n)) * self.speed[u]
        distracted = self.rng.random(n) < 0.03
        gap[distracted] *= self.rng.uniform(3, 15, distracted.sum())
        gap = np.minimum(gap, _MAX_IN_SESSION_GAP)
        first = np.r_[True, s[1:] != s[:-1]]
        gap[first] = 0.0
        cols["off"] = _group_cumsum(gap, s)
        cols["user"] = u
        cols["dev"] = self.s_dev[s]
        cols["ip"] = self.s_ip[s]
        cols["country"] = self.s_country[s]
        self.normal_cols = cols

    # ---------------------------------------------------------------- fraud episodes
    def fsession(self, u: int, t: float) -> int:
        self.f_user.append(u)
        self.f_plan.append(float(np.clip(t, 0.0, self.T - 3600.0)))
        return len(self.f_user) - 1

    def flush(self, sess: int, d: _Draft, u: int, typo: int, dev: int, ip: int, country: int,
              **extra: object) -> None:  # fmt: skip
        cols = d.columns()
        cat = np.where(
            (cols["cat"] < 0) & (cols["item"] >= 0), self.item_cat[cols["item"]], cols["cat"]
        )
        cols["cat"] = cat
        self.sink.add(len(cols["off"]), sess=sess, user=u, truth=typo, dev=dev, ip=ip,
                      country=country, **cols, **extra)  # fmt: skip

    def home_ip(self, u: int) -> int:
        return int(self.ips[u, self.rng.integers(0, 2)])

    def own_device(self, u: int) -> int:
        return int(self.devs[u, self.rng.integers(0, self.n_devs[u])])

    def own_card(self, u: int) -> int:
        return int(self.cards[u, 0])

    def user_cat(self, u: int) -> int:
        return int(min((self.aff_cum[u] < self.rng.random()).sum(), _N_CAT - 1))

    def fit_span(self, u: int, span: float) -> float:
        """An episode's length, cut so that it ends inside the window."""
        room = self.T - 1.5 * 86400 - float(self.episode_t0[u])
        return float(np.clip(span, 600.0, max(room, 600.0)))

    def fraud_episodes(self) -> None:
        rng = self.rng
        # shared resources of organised groups
        self.attacker_ips = self.proxy_ip[rng.integers(0, len(self.proxy_ip), 12)]
        brushers = np.flatnonzero(self.role == _TYPO["order_brushing"])
        self.brush_group = {}
        pos = 0
        while pos < len(brushers):
            size = int(min(rng.integers(1, 5), len(brushers) - pos))
            cat = int(rng.choice(_N_CAT - 1))
            items = self.seller_items(cat, int(rng.integers(1, 5)))
            farm = self.new_devices(int(rng.integers(1, 4)))
            for u in brushers[pos : pos + size]:
                self.brush_group[int(u)] = (items, farm)
            pos += size
        gen = {
            "order_brushing": self.order_brushing,
            "click_fraud": self.click_fraud,
            "return_abuse": self.return_abuse,
            "account_takeover": self.account_takeover,
            "card_testing": self.card_testing,
            "fake_reviews": self.fake_reviews,
            "scraping_bot": self.scraping_bot,
        }
        # intensity: 0 = subtle (a handful of events, human-like), 1 = blatant
        intensity = rng.beta(1.0, 1.5, self.cfg.n_users)
        for u in self.fraud_users:
            name = FRAUD_TYPOLOGIES[self.role[u]]
            if name != "coupon_ring":
                gen[name](int(u), float(intensity[u]))
        for members in self.rings:
            self.coupon_ring(members)

    def order_brushing(self, u: int, q: float) -> None:
        rng, typo = self.rng, _TYPO["order_brushing"]
        items, farm = self.brush_group[u]
        n_orders = max(3, round(_scale(q, 3, 60) * rng.lognormal(0, 0.2)))
        span = self.fit_span(u, rng.uniform(0.3, 8.0) * 86400)
        t0 = self.episode_t0[u]
        times = t0 + np.sort(rng.uniform(0, span, n_orders))
        farm_p = rng.uniform(0.0, 0.9)
        speed = _scale(q, 1.2, 0.25)
        review_p = rng.uniform(0.4, 1.0)
        in_session_review = rng.random() < 0.5
        view_p = rng.uniform(0.1, 0.7)
        card = self.own_card(u)
        promo = self.promo_codes[rng.integers(0, len(self.promo_codes), 3)]
        for t in times:
            d = _Draft()
            if rng.random() < 0.5:
                d.ev(LOGIN, 0)
            item = int(rng.choice(items))
            price = float(self.item_price[item])
            if rng.random() < view_p:
                d.ev(VIEW, rng.lognormal(np.log(8), 0.5) * speed, item, price)
            d.ev(CART, rng.lognormal(np.log(6), 0.5) * speed, item, price, 1)
            d.ev(PAYMENT, rng.lognormal(np.log(20), 0.5) * speed, price=price, pay=card)
            d.ev(PURCHASE, 1.0 + rng.random(), item, price, 1, card)
            follow = {}
            if in_session_review and rng.random() < review_p:
                d.ev(REVIEW, rng.lognormal(np.log(30), 0.5), item, text=int(rng.choice(promo)))
            else:
                follow = {"rev_p": np.r_[np.zeros(len(d.rows) - 1), review_p],
                          "rev_med": rng.uniform(1, 48) * 3600, "rev_promo": 0.9}  # fmt: skip
            dev = int(rng.choice(farm)) if rng.random() < farm_p else self.own_device(u)
            self.flush(self.fsession(u, t), d, u, typo, dev, self.home_ip(u), int(self.country[u]),
                       **follow)  # fmt: skip

    def click_fraud(self, u: int, q: float) -> None:
        rng, typo = self.rng, _TYPO["click_fraud"]
        cat = int(rng.choice(_N_CAT - 1))
        items = self.seller_items(cat, int(rng.integers(1, 5)), unpopular=False)
        n_bursts = max(1, round(_scale(q, 1, 12) * rng.lognormal(0, 0.3)))
        base_gap = rng.uniform(1.5, 25.0)
        cv = _scale(q, 0.45, 0.005)  # machine-regular when blatant
        view_p = 0.5 * (1.0 - q)  # subtle scripts mix in views
        rotate_ip = rng.random() < 0.5
        dev = self.own_device(u) if rng.random() < 0.6 else int(self.new_devices(1)[0])
        span = self.fit_span(u, rng.uniform(1, 10) * 86400)
        for t in self.episode_t0[u] + np.sort(rng.uniform(0, span, n_bursts)):
            n = max(4, round(_scale(q, 6, 250) * rng.lognormal(0, 0.4)))
            gaps = np.minimum(np.maximum(base_gap * (1 + cv * rng.standard_normal(n)), 0.2), 600.0)
            gaps[0] = 0.0
            it = (
                items[rng.integers(0, len(items), n)] if rng.random() < 0.5 else np.resize(items, n)
            )
            if rotate_ip:
                k = int(rng.integers(0, len(self.proxy_ip)))
                ip, country = int(self.proxy_ip[k]), int(self.proxy_country[k])
            else:
                ip, country = self.home_ip(u), int(self.country[u])
            et = np.where(rng.random(n) < view_p, VIEW, AD_CLICK)
            self.sink.add(n, sess=self.fsession(u, t), off=np.cumsum(gaps), etype=et,
                          item=it, cat=self.item_cat[it], price=self.item_price[it], user=u,
                          truth=typo, dev=dev, ip=ip, country=country)  # fmt: skip

    def return_abuse(self, u: int, q: float) -> None:
        rng, typo = self.rng, _TYPO["return_abuse"]
        n_orders = max(2, round(_scale(q, 2, 20) * rng.lognormal(0, 0.2)))
        hi_p = rng.uniform(0.4, 0.95)
        ret_p = min(1.0, 0.45 + 0.55 * q + rng.uniform(0, 0.1))
        ret_med = _scale(q, 96, 3) * 3600
        span = self.fit_span(u, rng.uniform(3, 18) * 86400)
        card = self.own_card(u)
        for t in self.episode_t0[u] + np.sort(rng.uniform(0, span, n_orders)):
            d = _Draft()
            if rng.random() < 0.6:
                d.ev(LOGIN, 0)
            cat = int(rng.choice(_WARDROBE)) if rng.random() < hi_p else self.user_cat(u)
            seen = self.sample_items(np.full(int(rng.integers(1, 7)), cat))
            for it in seen:
                d.ev(VIEW, rng.lognormal(np.log(25), 0.9), int(it), float(self.item_price[it]))
            bought = seen[: int(rng.integers(1, min(3, len(seen)) + 1))]
            qty = [int(q) for q in rng.choice([1, 1, 2, 3], len(bought))]  # bracketing sizes
            for it, q in zip(bought, qty, strict=True):
                d.ev(CART, rng.lognormal(np.log(9), 0.7), int(it), float(self.item_price[it]), q)
            total = float((self.item_price[bought] * qty).sum())
            d.ev(PAYMENT, rng.lognormal(np.log(35), 0.6), price=total, pay=card)
            n_before = len(d.rows)
            for it, q in zip(bought, qty, strict=True):
                d.ev(PURCHASE, 1.0 + rng.random(), int(it), float(self.item_price[it]), q, card)
            rp = np.r_[np.zeros(n_before), np.full(len(bought), ret_p)]
            self.flush(self.fsession(u, t), d, u, typo, self.own_device(u), self.home_ip(u),
                       int(self.country[u]), ret_p=rp, ret_med=ret_med)  # fmt: skip

    def account_takeover(self, u: int, q: float) -> None:
        rng, typo = self.rng, _TYPO["account_takeover"]
        # takeover between two of the victim's sessions, after at least three of them
        plans = self.s_plan[
            np.searchsorted(self.s_user, u) : np.searchsorted(self.s_user, u, "right")
        ]
        k = int(rng.integers(3, len(plans) + 1))
        lo = plans[k - 1] + 3600.0
        hi = plans[k] - 2 * 3600.0 if k < len(plans) else self.T - 86400.0
        t0 = lo + rng.random() * max(hi - lo, 3600.0)
        t0 = min(t0, self.T - 86400.0)
        subtle = q < 0.25
        dev = int(self.new_devices(1)[0])
        if rng.random() < 0.8:
            country = int((self.country[u] + rng.integers(1, _N_COUNTRY)) % _N_COUNTRY)
            ip = int(self.random_ips(np.array([country]))[0])
            if rng.random() < 0.4:  # attackers reuse a few proxy addresses
                k_ip = int(rng.integers(0, len(self.attacker_ips)))
                ip = int(self.attacker_ips[k_ip])
                country = int(self.proxy_country[np.flatnonzero(self.proxy_ip == ip)[0]])
        else:  # residential proxy in the victim's own country
            country = int(self.country[u])
            ip = int(self.random_ips(np.array([country]))[0])
        card = int(self.new_cards(1)[0])
        n_sessions = 1 + int(rng.integers(0, 1 + round(3 * q)))
        t = t0
        for s in range(n_sessions):
            d = _Draft()
            if s == 0:
                for _ in range(int(rng.integers(1, 7)) if rng.random() < 0.5 else 0):
                    d.ev(LOGIN_FAILED, rng.uniform(2, 12))
            d.ev(LOGIN, rng.uniform(3, 10))
            if s == 0:
                changes = [PASSWORD, ADDRESS] if not subtle else []
                if not subtle:
                    changes = [c for c in changes if rng.random() < 0.75] or [
                        int(rng.choice(changes))
                    ]
                for c in changes:
                    d.ev(c, rng.lognormal(np.log(25), 0.5))
            for _ in range(int(rng.integers(0, 4))):
                it = int(self.sample_items(np.array([rng.choice(_RESALE)]))[0])
                d.ev(VIEW, rng.lognormal(np.log(10), 0.6), it, float(self.item_price[it]))
            cats = rng.choice(_RESALE, int(rng.integers(1, 4)))
            bought = self.sample_items(cats)
            if subtle:
                bought = bought[:1]
            qty = [int(q) for q in rng.choice([1, 1, 2, 5], len(bought))]
            for it, q in zip(bought, qty, strict=True):
                d.ev(CART, rng.lognormal(np.log(6), 0.5), int(it), float(self.item_price[it]), q)
            total = float((self.item_price[bought] * qty).sum())
            if rng.random() < 0.2:
                d.ev(PAYMENT_FAILED, rng.lognormal(np.log(25), 0.5), price=total, pay=card)
            d.ev(PAYMENT, rng.lognormal(np.log(25), 0.5), price=total, pay=card)
            for it, q in zip(bought, qty, strict=True):
                d.ev(PURCHASE, 1.0 + rng.random(), int(it), float(self.item_price[it]), q, card)
            self.flush(self.fsession(u, t), d, u, typo, dev, ip, country)
            t += rng.uniform(0.7, 24) * 3600
            if t > self.T - 7200.0:
                break

    def card_testing(self, u: int, q: float) -> None:
        rng, typo = self.rng, _TYPO["card_testing"]
        n_bursts = int(rng.integers(1, 2 + round(3 * q)))
        fail_p = 0.3 + 0.65 * q
        new_card_p = 0.3 + 0.7 * q
        base_gap = rng.uniform(2, 15)
        tiny = rng.random() < 0.5
        dev = self.own_device(u) if rng.random() < 0.5 else int(self.new_devices(1)[0])
        span = self.fit_span(u, rng.uniform(0.1, 5) * 86400)
        for t in self.episode_t0[u] + np.sort(rng.uniform(0, span, n_bursts)):
            n = max(3, round(_scale(q, 3, 120) * rng.lognormal(0, 0.3)))
            cards = np.where(rng.random(n) < new_card_p, self.new_cards(n), self.own_card(u))
            amount = np.full(n, 1.0) if tiny else np.round(rng.uniform(0.5, 5.0, n), 2)
            fail = rng.random(n) < fail_p
            gaps = np.maximum(base_gap * np.exp(0.3 * rng.standard_normal(n)), 0.5)
            d = _Draft()
            if rng.random() < 0.7:
                d.ev(LOGIN, 0)
            gift = int(self.sample_items(np.array([_CAT_INDEX["gift_cards"]]))[0])
            if rng.random() < 0.5:
                d.ev(CART, rng.uniform(3, 20), gift, float(self.item_price[gift]), 1)
            for i in range(n):
                d.ev(
                    PAYMENT_FAILED if fail[i] else PAYMENT,
                    gaps[i],
                    price=amount[i],
                    pay=int(cards[i]),
                )
            good = cards[~fail]
            if len(good) and rng.random() < 0.4:
                price = float(self.item_price[gift])
                d.ev(PAYMENT, rng.uniform(5, 30), price=price, pay=int(good[-1]))
                d.ev(PURCHASE, 1.0 + rng.random(), gift, price, 1, int(good[-1]))
            ip = self.home_ip(u)
            country = int(self.country[u])
            if rng.random() < 0.5:
                k = int(rng.integers(0, len(self.proxy_ip)))
                ip, country = int(self.proxy_ip[k]), int(self.proxy_country[k])
            self.flush(self.fsession(u, t), d, u, typo, dev, ip, country)

    def coupon_ring(self, members: np.ndarray) -> None:
        rng, typo = self.rng, _TYPO["coupon_ring"]
        ring_devs = self.new_devices(int(rng.integers(1, 4)))
        country = int(self.country[members[0]])
        ring_ips = self.random_ips(np.full(int(rng.integers(1, 4)), country))
        if rng.random() < 0.6:  # a referral code shared inside the ring
            code = int(self.referral_codes[rng.integers(0, len(self.referral_codes))])
        else:  # a leaked public code
            code = int(self.public_coupon_codes[rng.integers(0, len(_PUBLIC_COUPONS))])
        dev_p, ip_p = rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)
        shared_card = int(self.new_cards(1)[0])
        card_p = rng.uniform(0.0, 0.6)
        cat = self.user_cat(int(members[0]))
        for u in members:
            u = int(u)
            d = _Draft()
            d.ev(SIGNUP, 0)
            if rng.random() < 0.5:
                d.ev(ADDRESS, rng.lognormal(np.log(40), 0.5))
            seen = self.sample_items(np.full(int(rng.integers(1, 5)), cat))
            for it in seen:
                d.ev(VIEW, rng.lognormal(np.log(15), 0.8), int(it), float(self.item_price[it]))
            it = int(seen[-1])
            price = float(self.item_price[it])
            d.ev(CART, rng.lognormal(np.log(8), 0.6), it, price, 1)
            d.ev(COUPON, rng.lognormal(np.log(15), 0.6), text=code)
            card = shared_card if rng.random() < card_p else self.own_card(u)
            d.ev(PAYMENT, rng.lognormal(np.log(30), 0.6), price=round(price * 0.85, 2), pay=card)
            d.ev(PURCHASE, 1.0 + rng.random(), it, price, 1, card)
            dev = int(rng.choice(ring_devs)) if rng.random() < dev_p else self.own_device(u)
            ip = int(rng.choice(ring_ips)) if rng.random() < ip_p else self.home_ip(u)
            self.flush(self.fsession(u, self.episode_t0[u]), d, u, typo, dev, ip, country)

    def fake_reviews(self, u: int, q: float) -> None:
        rng, typo = self.rng, _TYPO["fake_reviews"]
        cat = int(rng.choice(_N_CAT - 1))
        items = self.seller_items(cat, int(rng.integers(3, 21)))
        n_total = max(3, round(_scale(q, 3, 60) * rng.lognormal(0, 0.2)))
        base = self.promo_codes[rng.integers(0, len(self.promo_codes))]
        same_p = 0.3 + 0.65 * q
        view_p = rng.uniform(0.0, 0.6)
        gap = rng.uniform(15, 120)
        span = self.fit_span(u, rng.uniform(0.2, 6) * 86400)
        n_bursts = int(rng.integers(1, 7))
        sizes = np.bincount(rng.integers(0, n_bursts, n_total), minlength=n_bursts)
        dev = self.own_device(u)
        for t, size in zip(
            self.episode_t0[u] + np.sort(rng.uniform(0, span, n_bursts)), sizes, strict=True
        ):
            if size == 0:
                continue
            d = _Draft()
            if rng.random() < 0.6:
                d.ev(LOGIN, 0)
            for it in rng.choice(items, size, replace=size > len(items)):
                if rng.random() < view_p:
                    d.ev(VIEW, rng.lognormal(np.log(10), 0.6), int(it), float(self.item_price[it]))
                text = (
                    base
                    if rng.random() < same_p
                    else self.promo_codes[rng.integers(0, len(self.promo_codes))]
                )
                d.ev(REVIEW, gap * np.exp(0.4 * rng.standard_normal()), int(it), text=int(text))
            self.flush(self.fsession(u, t), d, u, typo, dev, self.home_ip(u), int(self.country[u]))

    def scraping_bot(self, u: int, q: float) -> None:
        rng, typo = self.rng, _TYPO["scraping_bot"]
        n_sessions = int(rng.integers(1, 2 + round(5 * q)))
        base_gap = _scale(q, 10.0, 0.3) * rng.lognormal(0, 0.2)
        cv = _scale(q, 0.5, 0.02)
        night_p = 0.5 + 0.5 * q
        crawl = rng.random() < 0.5
        search_p = rng.uniform(0.0, 0.15)
        rotate = rng.random() < 0.5
        dev = self.own_device(u)
        cursor = int(rng.integers(0, len(self.item_cat)))
        day0 = int(self.episode_t0[u] // 86400) + 1  # after the account's signup
        days = np.minimum(
            day0 + np.sort(rng.choice(np.arange(7), n_sessions, replace=False)), self.cfg.days - 2
        )
        for day in days:
            if rng.random() < night_p:
                local_hour = rng.uniform(0.0, 4.0)
            else:
                local_hour = np.searchsorted(_HOUR_CDF, rng.random()) + rng.random()
            t = day * 86400.0 + ((local_hour - self.tz[u]) % 24.0) * 3600.0
            n = max(20, round(_scale(q, 30, 2000) * rng.lognormal(0, 0.4)))
            gaps = np.maximum(base_gap * (1 + cv * rng.standard_normal(n)), 0.1)
            gaps[0] = 0.0
            if crawl:
                it = (cursor + np.arange(n)) % len(self.item_cat)
                cursor = int(it[-1]) + 1
            else:
                it = rng.integers(0, len(self.item_cat), n)
            et = np.where(rng.random(n) < search_p, SEARCH, VIEW)
            cat = self.item_cat[it]
            text = np.where(
                et == SEARCH,
                self.query_codes[cat, rng.integers(0, self.query_codes.shape[1], n)],
                -1,
            )
            if rotate:
                k = int(rng.integers(0, len(self.proxy_ip)))
                ip, country = int(self.proxy_ip[k]), int(self.proxy_country[k])
            else:
                ip, country = self.home_ip(u), int(self.country[u])
            self.sink.add(n, sess=self.fsession(u, t), off=np.cumsum(gaps), etype=et,
                          item=np.where(et == SEARCH, -1, it), cat=cat,
                          price=np.where(et == SEARCH, np.nan, self.item_price[it]), text=text,
                          user=u, truth=typo, dev=dev, ip=ip, country=country)  # fmt: skip

    # ---------------------------------------------------------------- timing
    def place_sessions(self) -> dict[str, np.ndarray]:
        """Shift planned sessions so a user's sessions never overlap, then absolute times."""
        nc = self.normal_cols
        fc = self.sink.arrays()
        S_n = len(self.s_user)
        fc["sess"] = fc["sess"] + S_n
        cols = {k: np.concatenate([nc[k], fc[k]]) for k in nc}
        sess_user = np.r_[self.s_user, np.array(self.f_user, dtype=np.int64)]
        plan = np.r_[self.s_plan, np.array(self.f_plan)]
        fixed = np.r_[np.zeros(S_n, bool), np.ones(len(self.f_user), bool)]
        dur = np.zeros(len(plan))
        np.maximum.at(dur, cols["sess"], cols["off"])
        order = np.lexsort((plan, sess_user))
        g, p, d = sess_user[order], plan[order], dur[order]
        # start'_k = max(plan_k, start'_{k-1} + dur_{k-1} + spacing): with C the exclusive sum
        # of (dur + spacing), start' = C + running max of (plan - C), per user.
        c = _group_cumsum(d + _SESSION_SPACING, g, inclusive=False)
        big = 10.0 * (self.T + c.max() + 1.0)
        v = np.maximum.accumulate(p - c + g * big) - g * big
        start = np.empty(len(plan))
        start[order] = v + c
        # an injected episode pushed past the window end is pulled back inside (rare)
        late = fixed & (start + dur >= self.T)
        start[late] = np.maximum(self.T - dur[late] - 1.0, 0.0)
        keep_sess = fixed | (start < self.T - 60.0)
        t = start[cols["sess"]] + cols["off"]
        keep = keep_sess[cols["sess"]] & (fixed[cols["sess"]] | (t < self.T))
        cols = {k: v[keep] for k, v in cols.items()}
        cols["t"] = t[keep]
        return cols

    # ---------------------------------------------------------------- follow-ups
    def follow_ups(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = self.rng
        pur = np.flatnonzero(cols["etype"] == PURCHASE)
        out = _Sink()
        extra_t: list[np.ndarray] = []
        for kind in ("ret", "rev"):
            p = cols[f"{kind}_p"][pur]
            hit = pur[rng.random(len(pur)) < p]
            delay = cols[f"{kind}_med"][hit] * np.exp(0.6 * rng.standard_normal(len(hit)))
            delay = np.maximum(delay, 1800.0)
            t = cols["t"][hit] + delay
            ok = t < self.T
            hit, t = hit[ok], t[ok]
            n = len(hit)
            u = cols["user"][hit]
            truth = cols["truth"][hit]
            fraud = truth >= 0
            # normal follow-ups come from home; fraud ones from the purchase's context
            dev = np.where(fraud, cols["dev"][hit], self.devs[u, 0])
            ip = np.where(fraud, cols["ip"][hit], self.ips[u, 0])
            country = np.where(fraud, cols["country"][hit], self.country[u])
            who = dict(user=u, dev=dev, ip=ip, country=country, truth=truth)
            what = dict(item=cols["item"][hit], cat=cols["cat"][hit])
            if kind == "ret":
                li = np.flatnonzero(rng.random(n) < 0.5)  # some log in first
                out.add(len(li), etype=LOGIN, **{k: v[li] for k, v in who.items()})
                extra_t.append(t[li] - rng.uniform(20, 120, len(li)))
                out.add(n, etype=RETURN, price=cols["price"][hit], qty=cols["qty"][hit],
                        pay=cols["pay"][hit], **who, **what)  # fmt: skip
                extra_t.append(t)
            else:
                promo = rng.random(n) < cols["rev_promo"][hit]
                text = np.where(
                    promo,
                    self.promo_codes[rng.integers(0, len(self.promo_codes), n)],
                    self.review_codes[rng.integers(0, len(self.review_codes), n)],
                )
                out.add(n, etype=REVIEW, text=text, **who, **what)
                extra_t.append(t)
        fu = out.arrays()
        fu["t"] = np.concatenate(extra_t) if extra_t else np.empty(0)
        fu["t"] = np.maximum(fu["t"], 0.0)
        return {k: np.concatenate([cols[k], fu[k]]) for k in cols}

    # ---------------------------------------------------------------- assembly
    def assemble(self, cols: dict[str, np.ndarray]) -> World:
        cfg = self.cfg
        t_us = np.round(cols["t"] * 1e6).astype(np.int64)
        order = np.lexsort((np.arange(len(t_us)), t_us, cols["user"]))
        cols = {k: v[order] for k, v in cols.items()}
        t_us = t_us[order]
        n = len(t_us)
        user = cols["user"]
        # sessions by the house rule: a new one after 30 minutes of inactivity
        new_sess = np.r_[
            True, (user[1:] != user[:-1]) | (np.diff(t_us) > SESSION_GAP_MINUTES * 60e6)
        ]
        sess = np.cumsum(new_sess) - 1
        width = max(6, len(str(cfg.n_users - 1)))
        user_vocab = [f"u{i:0{width}d}" for i in range(cfg.n_users)]
        base = np.datetime64(cfg.start.astimezone(UTC).replace(tzinfo=None), "us")
        ip_u, ip_codes = np.unique(cols["ip"], return_inverse=True)  # every event has an IP
        ip_vocab = [
            f"{x >> 24}.{(x >> 16) & 255}.{(x >> 8) & 255}.{x & 255}" for x in ip_u.tolist()
        ]
        # payment fingerprints look random: an odd multiplier is a bijection mod 2**32
        card_vocab = [f"card_{(i * 2654435761) & 0xFFFFFFFF:08x}" for i in range(self.n_card)]
        dw = max(7, len(str(self.n_dev)))
        qty = cols["qty"].astype(np.int64)
        data: dict[str, object] = {
            "event_id": np.arange(n, dtype=np.int64),
            "ts": base + t_us.astype("timedelta64[us]"),
            "user_id": _strings(user, user_vocab),
            "session_id": _strings(
                sess, [f"s{i:08d}" for i in range(int(sess[-1]) + 1 if n else 0)]
            ),
            "event_type": _strings(cols["etype"], list(DEMO_EVENT_TYPES)),
            "item_id": _strings(cols["item"], [f"i{i:06d}" for i in range(len(self.item_cat))]),
            "category": _strings(cols["cat"], [c[0] for c in _CATEGORIES]),
            "price": np.round(cols["price"], 2),
            "quantity": pd.arrays.IntegerArray(np.maximum(qty, 0).astype(np.int32), qty < 0),
            "device_id": _strings(cols["dev"], [f"d{i:0{dw}d}" for i in range(self.n_dev)]),
            "ip": _strings(ip_codes, ip_vocab),
            "country": _strings(cols["country"], [c[0] for c in _COUNTRIES]),
            "payment_id": _strings(cols["pay"], card_vocab),
            "text": _strings(cols["text"], self.text.values),
        }
        columns = [c for c in COLUMN_NAMES if c != "batch_id"]
        events = pd.DataFrame({c: data[c] for c in columns})
        truth = cols["truth"]
        te = np.flatnonzero(truth >= 0)
        typo_names = list(FRAUD_TYPOLOGIES)
        truth_events = pd.DataFrame(
            {
                "event_id": te.astype(np.int64),
                "user_id": _strings(user[te], user_vocab),
                "typology": _strings(truth[te], typo_names),
            }
        )
        fu = self.fraud_users
        truth_users = pd.DataFrame(
            {"user_id": _strings(fu, user_vocab), "typology": _strings(self.role[fu], typo_names)}
        )
        return World(events=events, truth_users=truth_users, truth_events=truth_events)

    def run(self) -> World:
        self.build_catalogue()
        self.build_users()
        self._step(1)
        self.assign_roles()
        self.plan_fraud_starts()
        self._step(2)
        self.plan_normal_sessions()
        self._step(3)
        self.fraud_episodes()
        self._step(4)
        self.normal_sessions()
        self._step(5)
        cols = self.place_sessions()
        self._step(6)
        cols = self.follow_ups(cols)
        self._step(7)
        world = self.assemble(cols)
        self._step(8)
        return world


def _strings(codes: np.ndarray, vocab: Sequence[str]) -> pd.api.extensions.ExtensionArray:
    """Integer codes (-1 = missing) -> pandas ``str`` array, via a dictionary decode in Arrow."""
    codes = np.asarray(codes, dtype=np.int64)
    indices = pa.array(np.maximum(codes, 0).astype(np.int32), mask=codes < 0)
    dictionary = pa.array(list(vocab) if len(vocab) else [""], type=pa.string())
    return pd.array(
        pa.DictionaryArray.from_arrays(indices, dictionary).cast(pa.string()), dtype="str"
    )


def simulate_world(
    config: WorldConfig, progress: Callable[[int, int], None] | None = None
) -> World:
    """Generate a demo world: events of normal shoppers and fraudsters, plus ground truth.

    Deterministic for a config; ``progress(done, total)`` is called after each stage.
    """
    return _Builder(config, progress).run()
