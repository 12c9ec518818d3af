"""The canonical event schema: columns, types and roles, declared once.

Ingest, featurisation, queries and pages all read these declarations; nothing else in the
code base spells out the event columns by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import pandas as pd

Role = Literal["key", "time", "type", "entity", "item", "amount", "text", "meta"]


@dataclass(frozen=True)
class Column:
    name: str
    duckdb_type: str
    required: bool
    role: Role
    doc: str


EVENT_COLUMNS: tuple[Column, ...] = (
    Column("event_id", "BIGINT", False, "meta", "unique id; assigned on ingest when absent"),
    Column("ts", "TIMESTAMP", True, "time", "event time, UTC (ISO string, epoch s or epoch ms)"),
    Column("user_id", "VARCHAR", True, "key", "the account the event belongs to"),
    Column("session_id", "VARCHAR", False, "meta", "derived by 30 min of inactivity when absent"),
    Column("event_type", "VARCHAR", True, "type", "any vocabulary: clickstream verbs, log keys"),
    Column("item_id", "VARCHAR", False, "item", "product / object id"),
    Column("category", "VARCHAR", False, "item", "product category"),
    Column("price", "DOUBLE", False, "amount", "unit price or payment amount, >= 0"),
    Column("quantity", "INTEGER", False, "amount", "units, >= 0"),
    Column("device_id", "VARCHAR", False, "entity", "device fingerprint"),
    Column("ip", "VARCHAR", False, "entity", "client IP address"),
    Column("country", "VARCHAR", False, "entity", "country code of the request"),
    Column("payment_id", "VARCHAR", False, "entity", "card / payment instrument fingerprint"),
    Column("text", "VARCHAR", False, "text", "search query, review text, coupon code"),
    Column("batch_id", "BIGINT", False, "meta", "ingest batch the row came from (set by ingest)"),
)

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in EVENT_COLUMNS)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(c.name for c in EVENT_COLUMNS if c.required)
OPTIONAL_COLUMNS: tuple[str, ...] = tuple(c.name for c in EVENT_COLUMNS if not c.required)
COLUMN_TYPES: dict[str, str] = {c.name: c.duckdb_type for c in EVENT_COLUMNS}
# Shared identifiers that link accounts (device, network, card) — the entity graph's nodes.
ENTITY_COLUMNS: tuple[str, ...] = ("device_id", "ip", "payment_id")

# Validation limits. Timestamps outside this window are "absurd" (typos, epoch unit mix-ups).
MIN_TS = datetime(1995, 1, 1, tzinfo=UTC)
MAX_TS = datetime(2100, 1, 1, tzinfo=UTC)
MAX_TEXT_LEN = 4096
MAX_ID_LEN = 256
SESSION_GAP_MINUTES = 30

# The vocabulary of the demo world. Real data brings its own: nothing depends on this list
# except the simulator and the demo's documentation.
DEMO_EVENT_TYPES: tuple[str, ...] = (
    "signup",
    "login",
    "login_failed",
    "logout",
    "search",
    "view",
    "ad_click",
    "wishlist",
    "cart",
    "remove_cart",
    "coupon_redeem",
    "payment",
    "payment_failed",
    "purchase",
    "return",
    "review",
    "password_change",
    "address_change",
)

FRAUD_TYPOLOGIES: tuple[str, ...] = (
    "order_brushing",
    "click_fraud",
    "return_abuse",
    "account_takeover",
    "card_testing",
    "coupon_ring",
    "fake_reviews",
    "scraping_bot",
)


def naive_utc(value: datetime | pd.Timestamp | str) -> datetime:
    """A time bound as `events.ts` stores it: naive UTC. An aware value is converted (never
    cast through a session time zone); a naive one is taken as UTC already."""
    ts = pd.Timestamp(value)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts.to_pydatetime()


# Names public logs and exports give the canonical columns (RetailRocket, Taobao, loghub,
# payment exports). Only suggestions for the upload form, which the analyst confirms.
COLUMN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "ts": ("timestamp", "time", "datetime", "event_time", "eventtime", "created_at", "date_time"),
    "user_id": ("user", "userid", "visitorid", "visitor_id", "customer_id", "account_id", "uid"),
    "event_type": ("event", "action", "behavior", "behavior_type", "behaviour", "eventid"),
    "session_id": ("session", "sessionid", "user_session", "session_key"),
    "item_id": ("item", "itemid", "product_id", "productid", "sku"),
    "category": ("category_id", "categoryid", "category_name", "category_code"),
    "price": ("amount", "unit_price"),
    "device_id": ("device", "deviceid", "device_fingerprint"),
    "ip": ("ip_address", "ipaddress", "client_ip"),
    "country": ("country_code", "countrycode"),
    "payment_id": ("card_id", "card", "card_fingerprint", "payment_method_id"),
    "text": ("query", "search_query", "content", "review_text"),
}
