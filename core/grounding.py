"""Is every claim a summary makes in its facts? (core.narrate's grounding check.)

A summary may cite numbers, dates, times, event types, user ids, entities and labels; each is
looked up in the facts. Besides single tokens, three relations are checked inside a clause: a
label next to a user id (``u0019 (fraud)``), a side of the alert threshold next to a score, and
a clock time next to an event type (``the login at 14:22``).

The scanner walks the text once per token kind, masking what it has judged so that later,
looser patterns (bare numbers) never see the digits inside an id, an IP or a time.
"""

from __future__ import annotations

import calendar
import math
import re
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from core.schema import DEMO_EVENT_TYPES

if TYPE_CHECKING:
    from core.narrate import Facts

KIND_WORDS = {"device_id": "device", "ip": "IP", "card_id": "card", "payment_id": "card"}


@dataclass(frozen=True)
class GroundingReport:
    grounded: bool
    problems: list[str]  # each names the offending token and why
    cited: list[str]  # what the text cites and the fact it matched

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- vocabularies ----------------------------------------------------------------------------

_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_name) if m}
_MONTHS.update({m.lower(): i for i, m in enumerate(calendar.month_abbr) if m})
_MONTHS["sept"] = 9
_WEEKDAYS = {d.lower(): i for i, d in enumerate(calendar.day_name)}
_MONTH_RE = "|".join(sorted(_MONTHS, key=len, reverse=True))

_UNITS = "one two three four five six seven eight nine".split()
_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORDS = {w: i + 1 for i, w in enumerate(_UNITS)}
_NUMBER_WORDS |= {w: i + 10 for i, w in enumerate(_TEENS)}
_NUMBER_WORDS |= {w: (i + 2) * 10 for i, w in enumerate(_TENS)}
_SPELLED_RE = "|".join(sorted([*_NUMBER_WORDS, "hundred", "thousand", "dozen"], key=len)[::-1])
_SCALES = {"k": 1e3, "thousand": 1e3, "million": 1e6, "mn": 1e6, "bn": 1e9, "billion": 1e9}
_TIME_UNITS = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hr": 3600}
_TIME_UNITS |= {"hour": 3600, "d": 86400, "day": 86400, "week": 604800}
_TIME_UNIT_RE = (
    r"(?P<tu>[\s-]?(?:seconds?|secs?|minutes?|mins?|hours?|hrs?|days?|weeks?)\b|(?:s|h|d)\b)?"
)
_CURRENCY_WORDS = r"USD|EUR|GBP|CHF|JPY|dollars?|euros?|pounds?"
# A figure right after one of these is an amount and must match a price (or their sum).
_AMOUNT_CUE = re.compile(
    r"\b(?:prices?d?|amounts?|spent|spend(?:s|ing)?|paid|pay(?:s|ing)?|worth|costs?|costing"
    r"|total(?:l?ing|l?ed)?|value)\b(?:\s+(?:of|at|was|is|for|about|around|roughly|only))*\s*$",
    re.IGNORECASE,
)

# ISO 3166-1 alpha-2. A compact constant instead of a dependency: the set changes once a decade.
_ISO2 = set(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
    BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO
    DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU
    GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW
    KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU
    MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW
    PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF
    TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA
    ZM ZW""".split()
)
# Codes that are far more often an English abbreviation in prose ("device ID", "3 PM").
_ISO2_PROSE = {"AI", "AM", "PM", "ID", "IT", "TV", "PR", "PS", "CC", "CV", "BS"}
_COUNTRY_NAMES = {
    "afghanistan": "AF", "albania": "AL", "algeria": "DZ", "angola": "AO", "argentina": "AR",
    "armenia": "AM", "australia": "AU", "austria": "AT", "azerbaijan": "AZ", "bahrain": "BH",
    "bangladesh": "BD", "belarus": "BY", "belgium": "BE", "bolivia": "BO", "brazil": "BR",
    "britain": "GB", "great britain": "GB", "bulgaria": "BG", "cambodia": "KH",
    "cameroon": "CM", "canada": "CA", "chile": "CL", "china": "CN", "colombia": "CO",
    "costa rica": "CR", "croatia": "HR", "cuba": "CU", "cyprus": "CY", "czechia": "CZ",
    "czech republic": "CZ", "denmark": "DK", "dominican republic": "DO", "ecuador": "EC",
    "egypt": "EG", "estonia": "EE", "ethiopia": "ET", "finland": "FI", "france": "FR",
    "germany": "DE", "ghana": "GH", "greece": "GR", "guatemala": "GT", "honduras": "HN",
    "hong kong": "HK", "hungary": "HU", "iceland": "IS", "india": "IN", "indonesia": "ID",
    "iran": "IR", "iraq": "IQ", "ireland": "IE", "israel": "IL", "italy": "IT", "jamaica": "JM",
    "japan": "JP", "kazakhstan": "KZ", "kenya": "KE", "kuwait": "KW", "latvia": "LV",
    "lebanon": "LB", "libya": "LY", "lithuania": "LT", "luxembourg": "LU", "malaysia": "MY",
    "malta": "MT", "mexico": "MX", "moldova": "MD", "mongolia": "MN", "morocco": "MA",
    "mozambique": "MZ", "myanmar": "MM", "nepal": "NP", "netherlands": "NL", "holland": "NL",
    "new zealand": "NZ", "nigeria": "NG", "north korea": "KP", "norway": "NO", "oman": "OM",
    "pakistan": "PK", "panama": "PA", "paraguay": "PY", "peru": "PE", "philippines": "PH",
    "poland": "PL", "portugal": "PT", "qatar": "QA", "romania": "RO", "russia": "RU",
    "saudi arabia": "SA", "senegal": "SN", "serbia": "RS", "singapore": "SG", "slovakia": "SK",
    "slovenia": "SI", "south africa": "ZA", "south korea": "KR", "spain": "ES",
    "sri lanka": "LK", "sudan": "SD", "sweden": "SE", "switzerland": "CH", "syria": "SY",
    "taiwan": "TW", "tanzania": "TZ", "thailand": "TH", "tunisia": "TN", "turkey": "TR",
    "türkiye": "TR", "uganda": "UG", "ukraine": "UA", "united arab emirates": "AE", "uae": "AE",
    "united kingdom": "GB", "uk": "GB", "united states": "US", "usa": "US", "uruguay": "UY",
    "uzbekistan": "UZ", "venezuela": "VE", "vietnam": "VN", "viet nam": "VN", "yemen": "YE",
    "zambia": "ZM", "zimbabwe": "ZW",
}  # fmt: skip

# Event words of e-commerce fraud that a model may invent although the data has no such event.
_COMMON_EVENT_TYPES = (
    "refund", "chargeback", "password_reset", "transfer", "wire_transfer", "wire", "withdrawal",
    "gift_card_purchase", "account_creation", "account_opening", "address_change",
    "email_change", "phone_change", "cash_out", "payout", "deposit", "dispute",
)  # fmt: skip
# Event-type words that are also everyday English ("needs review", "in return"): a claim only
# after an article or a count, in the plural, quoted, or followed by "event(s)".
_AMBIGUOUS_TYPES = {
    "view", "review", "return", "search", "payment", "login", "logout", "cart", "wishlist",
    "transfer", "wire", "deposit",
}  # fmt: skip
_DETERMINER = (
    r"a|an|the|this|that|these|those|another|each|every|one|several|many|multiple|some|"
    r"first|last|second|third|final|\d+|" + "|".join(_NUMBER_WORDS)
)
_ADJECTIVE = (
    r"single|large|small|big|new|recent|later|earlier|quick|suspicious|separate|subsequent|"
    r"further|failed|successful|unusual"
)
_NOT_AN_EVENT_AFTER = {
    "view": r"of\b",
    "review": r"of\b",
    "search": r"of\b|for\s+(?:evidence|patterns?)\b",
    "payment": r"(?:card|method|details|instrument|id|data|info(?:rmation)?)\b",
}
_LABEL_NAMES = {"fraud": "fraud", "fraudulent": "fraud", "fraudster": "fraud"}
_LABEL_NAMES |= {"fraudsters": "fraud", "legit": "legit", "legitimate": "legit"}
_LABEL_NAMES |= {"unsure": "unsure", "unlabelled": "", "unlabeled": "", "not labelled": ""}
_LABEL_NAMES |= {"not labeled": ""}
_LABEL_RE = re.compile(
    r"(?P<neg>(?:\bnot|\bnever|n't)\s+(?:(?:labell?ed|marked|flagged)\s+(?:as\s+)?|an?\s+)?)?"
    r"\b(?P<w>fraudulent|fraudsters?|fraud|legitimate|legit|unsure|unlabell?ed|not\s+labell?ed)"
    r"\b(?!\s+(?:scores?|probability|risk|model|analysts?|checks?|signals?|patterns?|rings?|"
    r"team|rate|typolog(?:y|ies)|labels?|alerts?|cases?|detection|prevention|indicators?)\b)",
    re.IGNORECASE,
)
_LABEL_AFTER_USER = re.compile(
    r"(?:\blabell?ed|\bmarked|\bflagged|\btagged|\bis|\bare|\bwas|\bwere|\bas|\()\s*"
    r"(?:as\s+)?(?:an?\s+)?(?:known\s+|confirmed\s+)?$",
    re.IGNORECASE,
)
_ABOVE = (
    r"above|over|exceed(?:s|ed|ing)?|higher\s+than|greater\s+than|beyond|cross(?:es|ed|ing)?|"
    r"clear(?:s|ed|ing)?|surpass(?:es|ed|ing)?|reach(?:es|ed|ing)?|meets?|met|hits?"
)
_BELOW = r"below|under|beneath|lower\s+than|less\s+than|short\s+of"
_NEGATION = r"(?P<neg>(?:\bnot|\bnever|n't|\bfail(?:s|ed)?\s+to)\s+)?"
_THRESHOLD_RE = re.compile(
    _NEGATION + rf"\b(?P<dir>{_ABOVE}|{_BELOW})\s+"
    r"(?:(?:the|its|this|our|an?|alert|alerting|decision|set|chosen|current|configured|"
    r"\d+(?:\.\d+)?%?)\s+){0,3}thresholds?\b"
    r"|\bthresholds?\s+(?:of\s+\d+(?:\.\d+)?%?\s+)?(?:is|was|has\s+been)\s+"
    r"(?P<neg2>not\s+)?(?P<dir2>exceeded|crossed|met|reached|cleared|surpassed)\b",
    re.IGNORECASE,
)
_RELATIVE_DAY = re.compile(
    r"\b(?:yesterday|today|tonight|tomorrow|last\s+night|this\s+(?:morning|afternoon|evening))\b",
    re.IGNORECASE,
)

# Prefixes that name an identifier in prose ("dev-12", "card_9f"), whatever the data's shapes.
_ID_PREFIXES = "dev|device|card|user|usr|acct|account|sess|session|item|order|cust|customer|ip"
# The placeholders core.pseudonym sends instead of ids (USER_1, DEVICE_2 ...).
PLACEHOLDER_RE = re.compile(r"\b(?:USER|DEVICE|IP|CARD|ITEM|SESSION)_\d+\b", re.IGNORECASE)

_ID_FIELDS = {"device_id", "ip", "card_id", "payment_id", "session_id", "item_id"}

_KINDS = r"(?i:device|card|ip|account|user|customer)"
_NAMED_ID_RE = re.compile(
    rf"\b{_KINDS}(?:\s+(?P<nm>(?i:named|called|id|address))|\s+(?i:name))?\s+"
    r"(?:['\"`\u2018\u201c](?P<q>[^'\"`\u2019\u201d\s]{1,64})['\"`\u2019\u201d]"
    r"|(?(nm)(?P<n>[\w\-@]+(?:\.[\w\-@]+)*)|(?P<cap>[A-Z][A-Za-z]{1,40})\b))"
)
# Capitalised words after a kind word that are not names ("user IDs", "IP Address").
_NOT_NAMES = frozenset(
    "ID IDs Id Ids IP IPs Address Addresses Number Numbers Fingerprint Name Names Agent UTC VPN "
    "OS API URL BIN PIN CVV Account Accounts Device Devices Card Cards User Users Session "
    "Sessions Login Logins History Level Behaviour Behavior Activity Profile Type Types".split()
)
_CATEGORY_RE = re.compile(
    r"\b(?P<before>['\"`]?[a-z][a-z&\-]{2,30}['\"`]?)\s+categor(?:y|ies)\b"
    r"|\bcategor(?:y|ies)\s*:?\s+(?P<after>['\"`][^'\"`\s]{1,40}['\"`])",
    re.IGNORECASE,
)
# Words after "id" / "address" that are prose, not an id ("the device ID is new").
_FUNCTION_WORDS = frozenset(
    """is was are were be been has had have of and or for with from in on at to by as that
    which the a an this its it not also shows shown appears seems matches differs changed
    changes used seen""".split()
)
# Words that sit before "category" in plain English without naming one.
_NOT_CATEGORIES = frozenset(
    """a an the this that these those its their his her our your one each every any another
    same different other new single only whole entire first second last top main most least
    rare rarer rarest unusual usual common popular favourite favorite preferred dominant
    primary secondary typical atypical particular specific given certain several many
    multiple few various distinct which what product item price event events high low
    expensive cheap unknown absent missing known such no some all both either neither
    per by in of for from to with within across into than and or not own narrow wide broad
    single-category multi-category""".split()
)

_KEY = "field name"
_B = r"(?<![\w.\-])"  # token start: not glued to a word, a decimal point or a hyphen
_E = r"(?![\w\-]|\.\w)"  # token end


# -- evidence --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Number:
    value: float
    source: str
    # "": any figure; "price": a price (also any figure); "time": seconds, cited only with a time
    # unit; "exact": an ingested id that happens to be numeric, cited only verbatim.
    kind: str = ""


@dataclass
class _Evidence:
    strings: dict[str, str]  # lower-cased allowed string -> where it is in the facts
    numbers: list[_Number]
    times: list[datetime]  # range ends and top events
    event_times: list[tuple[datetime, str]]  # top events: (ts, normalised type)
    event_ids: set[int]
    event_words: dict[str, str]  # normalised event type the text may claim -> source
    type_patterns: list[tuple[str, re.Pattern[str]]]  # normalised type -> its pattern in prose
    shapes: list[tuple[re.Pattern[str], str]]  # id patterns seen in the facts -> what they name
    users: set[str]  # lower-cased user ids in the facts
    ids: set[str]  # lower-cased identifiers of every kind in the facts (users, entities)
    main_user: str
    labels: dict[str, set[str]]  # linked user -> labels ("" for listed but unlabelled)
    countries: set[str]  # ISO codes of the facts' countries
    scores: list[tuple[float, str]]  # values a "score" may be: shown score and the check's
    threshold: float
    above: bool


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield _KEY, k  # a JSON key the text may echo ("score_without_top")
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, value


def _id_shape(value: str) -> re.Pattern[str] | None:
    """'u000123' -> u\\d+, 'card_9f3a' -> card_[0-9a-f]+, 'dev-17' -> dev-\\d+."""
    m = re.fullmatch(r"([A-Za-z]+[-_]?)([0-9A-Za-z]*\d[0-9A-Za-z]*)", value)
    if m is None:
        return None
    prefix, body = m.groups()
    if body.isdigit():
        cls = r"\d+"
    elif re.fullmatch(r"[0-9a-f]+", body):
        cls = r"[0-9a-f]+"
    else:
        cls = r"[0-9A-Za-z]*\d[0-9A-Za-z]*"
    return re.compile(_B + re.escape(prefix) + cls + _E, re.IGNORECASE)


def _norm_type(event_type: str) -> str:
    return " ".join(w for w in re.split(r"[_\-\s]+", event_type.lower()) if w)


def _word_pattern(word: str) -> str:
    """A word of an event type with its inflections: failed -> failure, change -> changed."""
    if len(word) > 4 and word.endswith("ed"):
        return re.escape(word[:-2]) + r"(?:ed|ure|ures|ing|s)"
    if len(word) > 3 and word.endswith("e"):
        return re.escape(word[:-1]) + r"(?:e|es|ed|ing)"
    return re.escape(word) + r"(?:s|es|ed|ing)?"


def _type_pattern(key: str) -> re.Pattern[str]:
    words = [_word_pattern(w) for w in key.split()]
    body = r"[_\-\s]?".join(words)
    if len(words) == 2:  # "payment_failed" is also "failed payment"
        body = f"(?:{body}|{words[1]}[_\\-\\s]?{words[0]})"
    return re.compile(
        r"(?<![\w])(?P<q>['\"`])?" + body + r"['\"`]?(?![\w])(?P<ev>\s+events?\b)?",
        re.IGNORECASE,
    )


def _ingested(path: str) -> bool:
    """Values that came from the logs (not computed here): whitelisted as whole tokens only."""
    return bool(
        re.fullmatch(r"user_id|top_events\[\d+\]\.(?:fields\..*|event_type)", path)
        or re.fullmatch(r"linked\[\d+\]\.(?:value|users\[\d+\])", path)
    )


def _evidence(facts: Facts) -> _Evidence:
    data = facts.to_dict()
    data.pop("vocabulary", None)
    strings: dict[str, str] = {}
    numbers: list[_Number] = []
    for path, value in _walk(data, ""):
        if isinstance(value, bool) or value is None:
            continue
        if path.endswith(".event_id"):
            continue  # cited only as "event 123" (see check_grounding)
        if isinstance(value, int | float):
            if math.isfinite(value):
                numbers.append(_Number(float(value), path))
            continue
        if not isinstance(value, str) or not value.strip():
            continue
        text = value.strip()
        parsed = _parse_number(text)
        if parsed is not None:
            kind = ""
            if ".fields." in path:
                kind = "price" if path.endswith(".price") else "exact"
            elif _ingested(path):
                kind = "exact"
            numbers.append(_Number(parsed, path, kind))
        elif re.fullmatch(r"top_events\[\d+\]\.event_type|behaviour\[\d+\]\.(?:key|kind)", path):
            # Event types are judged as such (step 4), with the types they are part of; a
            # session's key is an id (judged with the ids), its kind a word of ours.
            continue
        elif not _ingested(path) or not re.search(r"\s", text):
            # Free text from the logs could carry any claim: only single tokens whitelist.
            strings.setdefault(text.lower(), path)

    times = [t for t in (facts.start, facts.end, facts.first_ts, facts.last_ts) if t is not None]
    times += [e.ts for e in facts.top_events]
    times += [t for g in facts.behaviour for t in (g.first_ts, g.last_ts)]
    for t in times:
        numbers.append(_Number(float(t.year), f"year of {t:%Y-%m-%d}"))

    # Small counts and simple differences the facts imply (an analyst would say them too).
    derived: list[tuple[float, str]] = [
        (len(facts.top_events), "number of top events"),
        (len(facts.linked), "number of shared entities"),
        (len(facts.peer_stats), "number of peer statistics"),
        (facts.score - facts.threshold, "score minus threshold"),
    ]
    all_linked = {u for x in facts.linked for u in x.users}
    derived.append((len(all_linked), "number of linked users"))
    labels = [lab for x in facts.linked for lab in x.labels.values()]
    for lab in set(labels):
        derived.append((labels.count(lab), f"linked users labelled {lab}"))
    for x in facts.linked:
        derived.append((len(x.users), f"users sharing {x.value}"))
        derived.append((x.total_users, f"users sharing {x.value} in total"))
        derived.append((len(x.labels), f"labelled users sharing {x.value}"))
        for lab in set(x.labels.values()):
            derived.append((list(x.labels.values()).count(lab), f"{lab} users on {x.value}"))
    derived.append((sum(x.total_users for x in facts.linked), "users sharing, in total"))
    cf = facts.counterfactual
    if cf is not None:
        derived.append((cf.score_before - cf.score_without_top, "score drop without top events"))
        derived.append((cf.score_before - cf.score_without_random, "score drop, random events"))
        if cf.score_before > 0:
            derived.append(
                ((cf.score_before - cf.score_without_top) / cf.score_before, "relative drop")
            )
            derived.append(
                (
                    (cf.score_before - cf.score_without_random) / cf.score_before,
                    "relative drop, random events",
                )
            )
    if facts.peer_stats:
        derived.append((95.0, "the population's 95th percentile"))
    for p in facts.peer_stats:
        if p.population_median > 0:
            derived.append((p.user_value / p.population_median, f"{p.name} vs median"))
    if facts.percentile is not None:
        derived.append((1 - facts.percentile, "share of users above (top x%)"))
    numbers += [_Number(float(v), s) for v, s in derived if math.isfinite(v)]

    # Durations: cited only with a time unit ("two minutes before", "over 20 days").
    durations: list[tuple[float, str]] = []
    if facts.start is not None and facts.end is not None:
        durations.append(((facts.end - facts.start).total_seconds(), "length of the range"))
    if facts.first_ts is not None and facts.last_ts is not None:
        span = (facts.last_ts - facts.first_ts).total_seconds()
        durations.append((span, "time from the first to the last event"))
    stamps = sorted(e.ts for e in facts.top_events)
    durations += [
        ((b - a).total_seconds(), "time between top events")
        for a, b in zip(stamps, stamps[1:], strict=False)
    ]
    if stamps:
        durations.append(((stamps[-1] - stamps[0]).total_seconds(), "time between top events"))
    durations += [
        ((g.last_ts - g.first_ts).total_seconds(), f"length of {g.kind} {g.key}")
        for g in facts.behaviour
    ]
    numbers += [_Number(v, s, "time") for v, s in durations]

    # An aggregate of amounts ("mean amount is 861.26") is cited as money: it may stand where
    # the text names an amount, as a top event's price does.
    for i, a in enumerate(facts.account_signals):
        if re.search(r"\b(?:amounts?|prices?)\b", a.label, re.IGNORECASE):
            for v, what in ((a.value, "value"), (a.median, "median")):
                if v is not None and math.isfinite(v):
                    numbers.append(_Number(float(v), f"account_signals[{i}].{what}", "price"))

    prices = {e.event_id: _parse_number(e.fields.get("price", "")) for e in facts.top_events}
    known = [p for p in prices.values() if p is not None]
    if len(known) > 1:
        numbers.append(_Number(sum(known), "sum of the top events' prices", "price"))

    event_words: dict[str, str] = {}
    for e in facts.top_events:
        key = _norm_type(e.event_type)
        event_words.setdefault(key, f"event {e.event_id}")
        category = _norm_type(e.fields.get("category", ""))
        if category:  # a purchase of gift cards is also a "gift card purchase"
            event_words.setdefault(f"{category.rstrip('s')} {key}", f"event {e.event_id}")
    for a in facts.account_signals:  # "share of 'return' events" is about return events
        if a.event_type:
            event_words.setdefault(_norm_type(a.event_type), f"account signal {a.label}")
    for g in facts.behaviour:  # "its 54 view events carry 80% of the attribution"
        if g.kind == "event type":
            event_words.setdefault(_norm_type(g.key), f"behaviour group {g.key}")
    vocabulary = {_norm_type(t) for t in (facts.vocabulary or DEMO_EVENT_TYPES)}
    vocabulary |= {_norm_type(t) for t in _COMMON_EVENT_TYPES} | set(event_words)
    vocabulary.discard("")

    shapes: list[tuple[re.Pattern[str], str]] = []
    id_values: list[tuple[str, str]] = [(facts.user_id, "user id")]
    id_values += [(u, "user id") for u in all_linked]
    id_values += [(x.value, KIND_WORDS.get(x.kind, x.kind)) for x in facts.linked]
    for e in facts.top_events:
        id_values += [(v, k) for k, v in e.fields.items() if k in _ID_FIELDS]
    id_values += [(g.key, "session") for g in facts.behaviour if g.kind == "session"]
    for value, what in id_values:
        shape = _id_shape(value)
        if shape is not None and shape.pattern not in {s.pattern for s, _ in shapes}:
            shapes.append((shape, what))

    linked_labels: dict[str, set[str]] = {}
    for x in facts.linked:
        for u in x.users:
            linked_labels.setdefault(u.lower(), set()).add(x.labels.get(u, ""))
    countries = set()
    for e in facts.top_events:
        c = e.fields.get("country", "").strip()
        countries.add(_COUNTRY_NAMES.get(c.lower(), c.upper()))
    scores = [(facts.score, "score")]
    if cf is not None:
        scores += [(cf.score_before, "score before the check")]
        scores += [(cf.score_without_top, "score without the top events")]
        scores += [(cf.score_without_random, "score without random events")]
        scores += [(v, f"score without the top {k} events") for k, v in cf.ladder]
    scores += [
        (g.score_without, f"score without {g.kind} {g.key}")
        for g in facts.behaviour
        if g.score_without is not None
    ]
    return _Evidence(
        strings=strings,
        numbers=numbers,
        times=times,
        event_times=[(e.ts, _norm_type(e.event_type)) for e in facts.top_events],
        event_ids={e.event_id for e in facts.top_events},
        event_words=event_words,
        type_patterns=[
            (t, _type_pattern(t)) for t in sorted(vocabulary, key=lambda t: (-len(t), t))
        ],
        shapes=shapes,
        users={facts.user_id.lower()} | {u.lower() for u in all_linked},
        ids={value.strip().lower() for value, _ in id_values},
        main_user=facts.user_id.lower(),
        labels=linked_labels,
        countries=countries,
        scores=scores,
        threshold=facts.threshold,
        above=facts.above_threshold,
    )


def _parse_number(text: str) -> float | None:
    t = text.strip().replace(",", "")
    if not re.fullmatch(r"[-+]?\d+(\.\d+)?", t):
        return None
    return float(t)


def _number_unit(digits: str) -> tuple[float, int]:
    """The rounding unit a written number implies, and its count of significant digits:
    '0.94' -> (0.01, 2); '1299.00' -> (0.01, 6); '90' -> (1, 2); '1,300' -> (100, 2).
    Trailing zeros of a whole number count as rounding only from 1,000 up ("90" means 90)."""
    digits = digits.replace(",", "")
    if "." in digits:
        whole, frac = digits.split(".")
        return 10.0 ** -len(frac), max(len((whole + frac).lstrip("0")), 1)
    stripped = digits.lstrip("0") or "0"
    zeros = len(stripped) - len(stripped.rstrip("0")) if len(stripped) >= 4 else 0
    return 10.0**zeros, max(len(stripped) - zeros, 1)


def _matches(x: float, unit: float, sig: int, decimals: int, v: float) -> bool:
    """x as written (with its rounding unit) is v rounded. A one-digit figure must also be
    within 5%: '1' is not 0.94, though '0.9' is."""
    diff = abs(abs(x) - abs(v))
    if diff <= 1e-9 * max(1.0, abs(v)):
        return True
    if diff > unit / 2 + 1e-9 * max(1.0, abs(v)):
        return False
    return sig >= 2 or decimals >= 2 or diff <= 0.05 * abs(v)


def _written(raw: str) -> tuple[float, float, int, int]:
    """'0.94' -> (value, rounding unit, significant digits, decimals)."""
    unit, sig = _number_unit(raw)
    decimals = len(raw.split(".")[1]) if "." in raw else 0
    return float(raw.replace(",", "")), unit, sig, decimals


def _spelled_value(words: list[str]) -> int | None:
    """'two hundred and twelve' -> 212, 'a dozen' -> 12, 'twenty-one' -> 21; None when the
    words do not form one number ("two three")."""
    total, current, last = 0, 0, ""
    for w in words:
        if w in ("a", "an"):
            if last:
                return None
            current, last = 1, "unit"
        elif w == "and":
            if last not in ("hundred", "thousand"):
                return None
            last = last + "-and"
        elif w in _UNITS:
            if last not in ("", "tens", "hundred", "thousand", "hundred-and", "thousand-and"):
                return None
            current, last = current + _NUMBER_WORDS[w], "unit"
        elif w in _TEENS or w in _TENS:
            if last not in ("", "hundred", "thousand", "hundred-and", "thousand-and"):
                return None
            current += _NUMBER_WORDS[w]
            last = "tens" if w in _TENS else "teen"
        elif w == "hundred":
            if last != "unit" or current % 100 >= 10:
                return None
            current, last = current * 100, "hundred"
        elif w == "thousand":
            if last in ("", "thousand", "dozen") or last.endswith("-and"):
                return None
            total, current, last = total + current * 1000, 0, "thousand"
        elif w == "dozen":
            if last != "unit":
                return None
            current, last = current * 12, "dozen"
        else:
            return None
    if last.endswith("-and"):
        return None
    return total + current


# -- the scanner -----------------------------------------------------------------------------


class _Scanner:
    def __init__(self, text: str, ev: _Evidence) -> None:
        self.original = text  # for context words ("price of", "a"), which masking may hide
        self.text = text
        self.ev = ev
        self.problems: list[str] = []
        self.cited: list[str] = []

    def take(self, pattern: str | re.Pattern[str], judge: Any, flags: int = 0) -> None:
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)
        for m in list(regex.finditer(self.text)):
            judge(m)
            # Same length, no word characters: later patterns neither see nor straddle it.
            self.text = (
                self.text[: m.start()] + "\x00" * (m.end() - m.start()) + self.text[m.end() :]
            )

    def ok(self, token: str, source: str) -> None:
        if source == _KEY:
            return
        entry = f"{token} = {source}"
        if entry not in self.cited:
            self.cited.append(entry)

    def bad(self, token: str, why: str) -> None:
        entry = f"{token!r}: {why}"
        if entry not in self.problems:
            self.problems.append(entry)

    def number(
        self,
        token: str,
        written: tuple[float, float, int, int],
        scale: str = "",
        kind: str = "",
    ) -> None:
        """scale: "" for a bare figure, "%" for a percentage, "th" for an ordinal ("99th
        percentile"). Only the last two may read a share (0.94) as a hundredth (94): a bare
        94 against any share would let most small integers through. kind: "time" (seconds,
        the text named a unit), "amount" (the text named money), "" otherwise."""
        value, unit, sig, decimals = written
        if kind == "time":
            pool = [n for n in self.ev.numbers if n.kind == "time"]
        elif kind == "amount":
            pool = [n for n in self.ev.numbers if n.kind == "price"]
        else:
            pool = [n for n in self.ev.numbers if n.kind != "time"]
        exact = [n for n in pool if abs(n.value - value) < 1e-9]
        if exact:
            self.ok(token, exact[0].source)
            return
        for n in pool:
            if n.kind == "exact":
                continue
            if scale and _matches(value / 100, unit / 100, sig, decimals + 2, n.value):
                self.ok(token, n.source)
                return
            # A percentage may also be a statistic already kept in percent (above 1.5).
            direct = scale != "%" or abs(n.value) > 1.5
            if direct and _matches(value, unit, sig, decimals, n.value):
                self.ok(token, n.source)
                return
        what = {"time": "time span", "amount": "amount"}.get(kind, "number")
        self.bad(token, f"{what} not in the facts")


def _time_hit(ev: _Evidence, **parts: int) -> datetime | None:
    for t in ev.times:
        if all(getattr(t, k) == v for k, v in parts.items()):
            return t
    return None


# -- relations inside a clause -----------------------------------------------------------------

_CLAUSE_SPLIT = re.compile(r"(?<=[.!?;])\s+|:\s+|\s+(?:but|while|whereas)\s+", re.IGNORECASE)
_CONJUNCTION = re.compile(r"\b(?:and|then|but|before|after|followed|preceded|while)\b")
_BRIDGE = re.compile(_CONJUNCTION.pattern + "|,")
_CLOCKS = (
    re.compile(
        r"\b(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})[T ](?P<h>\d{1,2}):(?P<mi>\d{2})"
        r"(?::(?P<s>\d{2}))?"
    ),
    re.compile(
        r"(?<![\w:.\-])(?P<h>\d{1,2}):(?P<mi>\d{2})(?::(?P<s>\d{2}))?"
        r"(?:\s*(?P<ap>[ap]\.?m\.?)(?![\w]))?(?![\w:])",
        re.IGNORECASE,
    ),
    re.compile(r"(?<![\w:.])(?P<h>\d{1,2})\s*(?P<ap>[ap]\.?m\.?)(?![\w])", re.IGNORECASE),
)


def _clock_parts(g: dict[str, str | None]) -> dict[str, int]:
    hour = int(g["h"] or 0)
    ampm = (g.get("ap") or "").lower().replace(".", "")
    if ampm == "pm" and hour < 12:
        hour += 12
    if ampm == "am" and hour == 12:
        hour = 0
    parts = {"hour": hour}
    if g.get("mi"):
        parts["minute"] = int(g["mi"] or 0)
    if g.get("s"):
        parts["second"] = int(g["s"] or 0)
    if g.get("y"):
        parts |= {"year": int(g["y"] or 0), "month": int(g["mo"] or 0), "day": int(g["d"] or 0)}
    return parts


class _Clause:
    """One clause with word positions, so that "nearest" can be measured in words."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.starts = [m.start() for m in re.finditer(r"\S+", text)]

    def word(self, pos: int) -> int:
        return max(bisect_right(self.starts, pos) - 1, 0)

    def gap(self, a: tuple[int, int], b: tuple[int, int]) -> int:
        """Words strictly between two spans, a before b."""
        return max(self.word(b[0]) - self.word(max(a[1] - 1, a[0])) - 1, 0)

    def nearest(
        self,
        span: tuple[int, int],
        others: list[tuple[int, int, str]],
        prefer: str = "prev",
        window: int = 5,
        bridge: re.Pattern[str] = _BRIDGE,
        only: str | None = None,
    ) -> str | None:
        """The other mention nearest to span; words like "and" or a comma between them count
        as distance, and a tie goes to the preferred side."""
        best: tuple[float, str] | None = None
        for start, end, what in others:
            if end <= span[0]:
                side, between = "prev", (end, span[0])
                dist = self.gap((start, end), span)
            elif start >= span[1]:
                side, between = "next", (span[1], start)
                dist = self.gap(span, (start, end))
            else:
                continue
            if only is not None and side != only:
                continue
            if bridge.search(self.text[between[0] : between[1]]):
                dist += 4
            if dist > window:
                continue
            score = dist + (0 if side == prefer else 0.5)
            if best is None or score < best[0]:
                best = (score, what)
        return None if best is None else best[1]


def _type_claim(text: str, m: re.Match[str], key: str) -> bool:
    """Does this mention of an event type claim an event happened (not "needs review")?"""
    if key not in _AMBIGUOUS_TYPES or m.group("q") or m.group("ev"):
        return True
    after = text[m.end() :]
    rule = _NOT_AN_EVENT_AFTER.get(key)
    if rule and re.match(r"\s+(?:" + rule + ")", after, re.IGNORECASE):
        return False
    if m.group(0).lower().rstrip("'\"`").endswith("s") and not key.endswith("s"):
        return True  # plural: "three returns", "payments"
    before = text[: m.start()]
    cue = rf"\b(?:{_DETERMINER})\s+(?:(?:{_ADJECTIVE})\s+)?$"
    return re.search(cue, before, re.IGNORECASE) is not None


def _type_mentions(text: str, ev: _Evidence) -> list[tuple[int, int, str]]:
    """Event-type claims in text, longest types first, without overlaps."""
    found: list[tuple[int, int, str]] = []
    masked = text
    for key, pattern in ev.type_patterns:
        for m in list(pattern.finditer(masked)):
            if _type_claim(masked, m, key):
                found.append((m.start(), m.end(), key))
            masked = masked[: m.start()] + "\x00" * (m.end() - m.start()) + masked[m.end() :]
    return sorted(found)


def _check_labels(s: _Scanner, clause: _Clause, users: list[tuple[int, int, str]]) -> None:
    ev = s.ev
    for m in _LABEL_RE.finditer(clause.text):
        word = re.sub(r"\s+", " ", m.group("w").lower())
        claim = _LABEL_NAMES[word]
        negated = bool(m.group("neg"))
        # "u0007 (fraud)", "u0007, which is labelled fraud": said of the user before it;
        # "a fraud account u0007": of the one after; otherwise whichever is nearer.
        only = None
        if _LABEL_AFTER_USER.search(clause.text[: m.start()]):
            only = "prev"
        elif re.match(r"\s+(?:users?|accounts?|customers?)\b", clause.text[m.end() :], re.I):
            only = "next"
        span = (m.start("w"), m.end("w"))
        # "u0019, labelled fraud, and u0007": commas belong to the label, "and" separates.
        user = clause.nearest(span, users, only or "prev", 5, _CONJUNCTION, only)
        if user is None or user not in ev.labels:
            continue  # about no linked user (the account itself, or an id flagged elsewhere)
        held = ev.labels[user]
        token = m.group(0).strip()
        if (claim in held) != negated:
            s.ok(f"{user} {token}", "label of a linked user")
        else:
            said = " or ".join(sorted(h or "unlabelled" for h in held))
            s.bad(f"{user} {token}", f"{user} is {said} in the facts")


def _check_threshold(s: _Scanner, clause: _Clause) -> None:
    ev = s.ev
    for m in _THRESHOLD_RE.finditer(clause.text):
        if m.group("dir"):
            above = re.match(_BELOW, m.group("dir"), re.IGNORECASE) is None
            negated = bool(m.group("neg"))
        else:
            above, negated = True, bool(m.group("neg2"))
        if negated:
            above = not above
        # The score the clause talks about: the last figure before the claim, when it is one.
        values = [v for v, _ in ev.scores[:1]]
        figures = list(
            re.finditer(r"(?<![\w.:\-])(\d+(?:\.\d+)?)(\s?%)?(?![\w:]|\.\d)", clause.text)
        )
        for f in reversed([f for f in figures if f.end() <= m.start()]):
            written = _written(f.group(1))
            if f.group(2):
                written = (written[0] / 100, written[1] / 100, written[2], written[3] + 2)
            if written[0] > 1:
                continue
            hits = [v for v, _ in ev.scores if _matches(*written, v)]
            values = hits or values
            break
        if any((v >= ev.threshold) == above for v in values):
            s.ok(m.group(0), "side of the alert threshold")
        else:
            side = "above" if ev.above else "below"
            s.bad(m.group(0), f"the score is {side} the alert threshold in the facts")


def _check_event_times(s: _Scanner, clause: _Clause) -> None:
    ev = s.ev
    text = clause.text
    stamps: list[tuple[int, int, dict[str, int]]] = []
    for regex in _CLOCKS:
        for m in regex.finditer(text):
            if not any(a < m.end() and m.start() < b for a, b, _ in stamps):
                stamps.append((m.start(), m.end(), _clock_parts(m.groupdict())))
    if not stamps:
        return
    types = _type_mentions(text, ev)
    for start, end, parts in stamps:
        key = clause.nearest((start, end), types, "prev", window=8)
        if key is None:
            continue
        at = [
            (t, k) for t, k in ev.event_times if all(getattr(t, p) == v for p, v in parts.items())
        ]
        if not at or key not in {k for _, k in ev.event_times}:
            continue  # a time or a type the facts lack is flagged on its own
        token = f"{key} at {text[start:end]}"
        if any(k == key for _, k in at):
            s.ok(token, "time of a top event")
        else:
            s.bad(token, f"at that time the facts have {', '.join(sorted({k for _, k in at}))}")


def _check_relations(s: _Scanner, text: str) -> None:
    ev = s.ev
    user_re = re.compile(
        r"(?<![\w.\-])(" + "|".join(map(re.escape, sorted(ev.users, key=len)[::-1])) + r")"
        r"(?![\w\-]|\.\w)",
        re.IGNORECASE,
    )
    for part in _CLAUSE_SPLIT.split(text):
        clause = _Clause(part)
        if ev.labels:
            users = [(m.start(), m.end(), m.group(1).lower()) for m in user_re.finditer(part)]
            if users:
                _check_labels(s, clause, users)
        _check_threshold(s, clause)
        _check_event_times(s, clause)


# -- the check ---------------------------------------------------------------------------------


def check_grounding(text: str, facts: Facts) -> GroundingReport:
    """Is every number, date, time, event type, user id, label and entity in ``text`` in the
    facts, and does each label, threshold side and event time go with what it is said of?"""
    ev = _evidence(facts)
    s = _Scanner(text, ev)
    _check_relations(s, text)

    # 0. Contact details and links are never evidence.
    s.take(
        r"\b(?:https?://|www\.)[^\s<>\"')]*[^\s<>\"').,;:!?]",
        lambda m: s.bad(m.group(0), "a URL is never in the facts"),
        re.IGNORECASE,
    )
    s.take(
        r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
        lambda m: (
            s.ok(m.group(0), "an identifier in the facts")  # logs that key users by email
            if m.group(0).lower() in ev.ids
            else s.bad(m.group(0), "an email address is never in the facts")
        ),
    )

    # 0. A pseudonym placeholder left in the text: the writer cited one its prompt did not
    # have (those it had were put back before this check), unless the data's ids look so.
    s.take(
        PLACEHOLDER_RE,
        lambda m: (
            s.ok(m.group(0), "an identifier in the facts")
            if m.group(0).lower() in ev.ids | ev.users
            else s.bad(m.group(0), "a placeholder for an identifier the facts do not have")
        ),
    )

    # 0. Ids without digits a model may invent after a kind word: a name ("user Mallory"), a
    # quoted value ("device 'ABC'"), anything after "named"/"called"/"id" ("a user named bob").
    # Before step 1, which masks the facts' field names ("ip", "category") with the values.
    def named_id(m: re.Match[str]) -> None:
        token = m.group("q") or m.group("n") or m.group("cap")
        if m.group("cap") and m.group("cap") in _NOT_NAMES:
            return
        if m.group("n") and m.group("n").lower() in _FUNCTION_WORDS:
            return  # "the device ID is new"
        if token.lower() in ev.ids or token.lower() in ev.strings:
            s.ok(m.group(0), "an identifier in the facts")
        else:
            s.bad(m.group(0), "identifier not in the facts")

    s.take(_NAMED_ID_RE, named_id)

    # Categories: "the jewelry category", "category 'jewelry'" must be a category of the facts.
    def category(m: re.Match[str]) -> None:
        word = (m.group("before") or m.group("after") or "").strip("'\"`").lower()
        if not word or word in _NOT_CATEGORIES:
            return
        if word in ev.strings or word.rstrip("s") in ev.strings:
            s.ok(m.group(0), ev.strings.get(word) or ev.strings[word.rstrip("s")])
        else:
            s.bad(m.group(0), "category not in the facts")

    s.take(_CATEGORY_RE, category)

    # 1. Literal strings of the facts (ids, entity values, labels, field values, model id).
    for value in sorted(ev.strings, key=len, reverse=True):
        if len(value) < 2:
            continue
        pattern = r"(?<![\w.])" + re.escape(value) + r"(?![\w]|\.\d)"
        s.take(pattern, lambda m, v=value: s.ok(m.group(0), ev.strings[v]), re.IGNORECASE)

    # 1b. Event types with digits (log keys such as E125, HTTP 503) that the facts' events
    # have: named as they are, not ids (step 3 would take them for one). Others wait for 4.
    for key, pattern in ev.type_patterns:
        if key in ev.event_words and re.search(r"\d", key):
            s.take(pattern, lambda m, k=key: s.ok(m.group(0).strip(), ev.event_words[k]))

    # 2. Event references: "event 123456", "event id 123456" (not "event 2024-03-05").
    def event_ref(m: re.Match[str]) -> None:
        if int(m.group(1)) in ev.event_ids:
            s.ok(m.group(0), "event id")
        else:
            s.bad(m.group(0), "event id not among the facts' events")

    not_a_date = r"\b(?![-:./]\d)"
    event_word = r"\bevent(?:[ _-]?id)?\s*(?:#|no\.|number)?\s*(\d+)"
    s.take(event_word + not_a_date, event_ref, re.IGNORECASE)

    # 3. Identifiers: IP addresses, the id shapes present in the facts, generic id shapes, and
    # whatever follows "device", "card", "IP", "account" or "user" when it looks like an id.
    s.take(
        _B + r"(?:\d{1,3}\.){3}\d{1,3}" + _E,
        lambda m: s.bad(m.group(0), "IP address not in the facts"),
    )
    s.take(
        r"(?<![\w:])(?=[0-9a-f:]*[a-f][0-9a-f:]*|[0-9a-f:]*::)(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{1,4}"
        r"(?![\w:])",
        lambda m: s.bad(m.group(0), "IP address not in the facts"),
        re.IGNORECASE,
    )
    for shape, what in ev.shapes:
        s.take(shape, lambda m, w=what: s.bad(m.group(0), f"{w} not in the facts"))
    s.take(
        _B + rf"(?:{_ID_PREFIXES})[-_#]?[0-9a-f]*\d[0-9a-f]*" + _E,
        lambda m: s.bad(m.group(0), "identifier not in the facts"),
        re.IGNORECASE,
    )
    s.take(
        _B + r"(?!(?:top|last|first|next|past|over|under|p)[-_]?\d)[A-Za-z]{1,12}[-_]?\d{3,}" + _E,
        lambda m: s.bad(m.group(0), "identifier not in the facts"),
    )
    # Numeric ids ("user 160", as many real logs key users) are numbers in the evidence, not
    # strings, so step 1 leaves them: the named id is looked up here.
    s.take(
        r"\b(?:device|card|ip|account|user)(?:\s+(?:id|#|no\.|number|fingerprint|address))?\s+#?"
        r"(?P<id>[\w\-./#]*[\d_\-][\w\-./#]*?)(?=[.,;:!?)]*(?:\s|$))",
        lambda m: (
            s.ok(m.group(0), "an identifier in the facts")
            if m.group("id").lower() in ev.ids
            else s.bad(m.group(0), "identifier not in the facts")
        ),
        re.IGNORECASE,
    )

    # 3b. Countries: ISO codes and common names (the facts' own spelling is whitelisted above).
    def country(m: re.Match[str]) -> None:
        token = m.group(0)
        if not token[0].isupper():
            return  # "turkey", "china" as common nouns
        code = _COUNTRY_NAMES.get(token.lower(), token.upper())
        if code in ev.countries:
            s.ok(token, f"country {code}")
        else:
            s.bad(token, "country not in the facts")

    codes = "|".join(sorted(_ISO2 - _ISO2_PROSE))
    s.take(rf"(?<![\w.\-])(?:{codes}|UK)(?![\w\-])", country)
    names = "|".join(map(re.escape, sorted(_COUNTRY_NAMES, key=len, reverse=True)))
    s.take(rf"\b(?:{names})\b", country, re.IGNORECASE)

    # 4. Event types: the data's vocabulary, common fraud events, and anything snake_case.
    def event_type(m: re.Match[str], key: str) -> None:
        if not _type_claim(s.original, m, key):
            return  # everyday English ("needs review"), not a claim about an event
        token = m.group(0).strip()
        if key in ev.event_words:
            s.ok(token, ev.event_words[key])
        else:
            s.bad(token, "event type not among the facts' events")

    for key, pattern in ev.type_patterns:
        s.take(pattern, lambda m, k=key: event_type(m, k))
    s.take(
        r"(?<![\w])[a-z]+(?:_[a-z0-9]+)+(?![\w])",
        lambda m: s.bad(m.group(0), "looks like an event type or field not in the facts"),
    )

    _take_dates_and_times(s)
    _take_numbers(s)
    return GroundingReport(grounded=not s.problems, problems=s.problems, cited=s.cited)


def _date_judge(s: _Scanner, what: str, parts_of: Callable[[re.Match[str]], list[dict]]) -> Any:
    def judge(m: re.Match[str]) -> None:
        for parts in parts_of(m):
            hit = _time_hit(s.ev, **parts)
            if hit:
                s.ok(m.group(0), f"{what} {hit:%Y-%m-%d %H:%M:%S}")
                return
        s.bad(m.group(0), f"{what} matches no time in the facts")

    return judge


def _take_dates_and_times(s: _Scanner) -> None:
    ev = s.ev

    def iso(m: re.Match[str]) -> list[dict]:
        parts = {"year": int(m.group(1)), "month": int(m.group(2)), "day": int(m.group(3))}
        if m.group(4) is not None:
            parts |= {"hour": int(m.group(4)), "minute": int(m.group(5))}
            if m.group(6) is not None:
                parts["second"] = int(m.group(6))
        return [parts]

    s.take(
        r"\b(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?\b",
        _date_judge(s, "date/time", iso),
    )
    s.take(
        r"\b(\d{4})/(\d{1,2})/(\d{1,2})\b",
        _date_judge(s, "date", lambda m: [_parts(m, "year", "month", "day")]),
    )
    s.take(
        r"(?<![\w.])(\d{1,2})\.(\d{1,2})\.(\d{4})\b",
        _date_judge(s, "date", lambda m: [_parts(m, "day", "month", "year")]),
    )

    def named(m: re.Match[str]) -> list[dict]:
        g = m.groupdict()
        parts = {"month": _MONTHS[(g["m1"] or g["m2"]).lower().rstrip(".")]}
        if g["d1"] or g["d2"]:
            parts["day"] = int(g["d1"] or g["d2"])
        if g["y"]:
            parts["year"] = int(g["y"])
        return [parts]

    month = rf"(?:{_MONTH_RE})\.?"
    s.take(
        rf"\b(?:(?P<m1>{month})\s+(?P<d1>\d{{1,2}})(?:st|nd|rd|th)?\b"
        rf"|(?P<d2>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<m2>{month}))"
        r"(?:,?\s+(?P<y>\d{4})\b)?",
        _date_judge(s, "date", named),
        re.IGNORECASE,
    )
    s.take(
        rf"\b(?P<m1>(?:{_MONTH_RE})\.?)\s+(?P<y>\d{{4}})\b(?P<m2>)(?P<d1>)(?P<d2>)",
        _date_judge(s, "date", named),
        re.IGNORECASE,
    )
    # A capitalised month name alone ("in April"); "May" and "March" are also English words.
    s.take(
        r"\b(?P<m1>January|February|April|June|July|August|September|October|November|"
        r"December)\b(?P<m2>)(?P<d1>)(?P<d2>)(?P<y>)",
        _date_judge(s, "date", named),
    )

    def slash(m: re.Match[str]) -> list[dict]:
        a, b = int(m.group(1)), int(m.group(2))
        year = {"year": int(m.group(3))} if m.group(3) and len(m.group(3)) == 4 else {}
        return [{"month": a, "day": b, **year}, {"month": b, "day": a, **year}]

    s.take(
        r"(?<![\w/.])(\d{1,2})/(\d{1,2})(?:/(\d{4}|\d{2}))?(?![\w/])", _date_judge(s, "date", slash)
    )

    def weekday(m: re.Match[str]) -> None:
        day = _WEEKDAYS[m.group(0).lower().rstrip("s")]
        hit = next((t for t in ev.times if t.weekday() == day), None)
        if hit:
            s.ok(m.group(0), f"weekday of {hit:%Y-%m-%d}")
        else:
            s.bad(m.group(0), "weekday matches no date in the facts")

    s.take(r"\b(?:" + "|".join(_WEEKDAYS) + r")s?\b", weekday, re.IGNORECASE)
    s.take(_RELATIVE_DAY, lambda m: s.bad(m.group(0), "relative day: the facts hold no 'now'"))

    def midnight(m: re.Match[str]) -> None:
        hour = 0 if m.group(0).lower() == "midnight" else 12
        hit = next((t for t, _ in ev.event_times if t.hour == hour), None)
        if hit:
            s.ok(m.group(0), f"time {hit.isoformat()}")
        else:
            s.bad(m.group(0), "no event of the facts is at that hour")

    s.take(r"\b(?:midnight|noon|midday)\b", midnight, re.IGNORECASE)

    def clock(m: re.Match[str]) -> None:
        parts = _clock_parts(m.groupdict())
        hit = _time_hit(ev, **parts)
        if hit:
            s.ok(m.group(0), f"time {hit.isoformat()}")
        else:
            s.bad(m.group(0), "time of day matches no time in the facts")

    for regex in _CLOCKS[1:]:
        s.take(regex, clock)


def _parts(m: re.Match[str], *names: str) -> dict[str, int]:
    return {name: int(g) for name, g in zip(names, m.groups(), strict=True)}


def _take_numbers(s: _Scanner) -> None:
    """Digits (separators, decimals, %, ordinals, k/million, time units, currencies) and
    spelled-out numbers."""

    def kind_of(m: re.Match[str], scale: str) -> str:
        if m.group("tu"):
            return "time"
        if scale != "%" and (
            m.group("cur") or m.group("cur2") or _AMOUNT_CUE.search(s.original[: m.start()])
        ):
            return "amount"
        return ""

    def time_unit(m: re.Match[str]) -> float:
        unit = m.group("tu").strip(" -").lower()
        unit = {"mins": "min", "secs": "sec", "hrs": "hr"}.get(unit, unit)
        return _TIME_UNITS.get(unit, _TIME_UNITS.get(unit.rstrip("s"), 1))

    def digits(m: re.Match[str]) -> None:
        value, unit, sig, decimals = _written(m.group("num"))
        if m.group("scale"):
            factor = _SCALES[m.group("scale").strip().lower()]
            value, unit = value * factor, unit * factor
        suffix = (m.group("suffix") or "").strip().lower()
        scale = "%" if suffix in ("%", "percent") else ("th" if suffix else "")
        kind = kind_of(m, scale)
        if kind == "time":  # a span is said rounded to its unit: "2 minutes" for 95 s
            factor = time_unit(m)
            value, unit, sig = value * factor, unit * factor, max(sig, 2)
        s.number(m.group(0).strip(), (value, unit, sig, decimals), scale, kind)

    s.take(
        rf"(?P<cur>[$€£¥]\s?|\b(?:{_CURRENCY_WORDS})\s?)?"
        r"(?<![\w.])(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
        r"(?P<scale>\s?[kK]\b|\s(?:thousand|million|mn|bn|billion)\b|(?:mn|bn)\b)?"
        r"(?P<suffix>\s?%|\s?percent\b|(?:st|nd|rd|th)\b)?" + _TIME_UNIT_RE + r""
        rf"(?P<cur2>\s?(?:{_CURRENCY_WORDS})\b)?",
        digits,
    )

    def spelled(m: re.Match[str]) -> None:
        words = re.findall(r"[a-z]+", m.group("run").lower())
        if words == ["one"] and _loose_one(s.original, m):
            return
        value = _spelled_value(words)
        runs = [words] if value is not None else [[w] for w in words if w not in ("a", "an", "and")]
        for run in runs:
            n = _spelled_value(run) if value is None else value
            if n is None:
                n = {"hundred": 100, "thousand": 1000, "dozen": 12}.get(run[0], 0)
            kind = ""
            written = (float(n), 1.0, max(len(str(n).rstrip("0")), 1), 0)
            if m.group("tu"):
                factor = time_unit(m)
                written, kind = (n * factor, factor, 2, 0), "time"
            s.number(m.group(0).strip(), written, "", kind)

    s.take(
        rf"(?P<run>\b(?:an?\s+(?=(?:hundred|thousand|dozen)\b))?(?:{_SPELLED_RE})"
        rf"(?:(?:\s+and\s+|[\s-]+)(?:{_SPELLED_RE}))*\b)" + _TIME_UNIT_RE,
        spelled,
        re.IGNORECASE,
    )


def _loose_one(text: str, m: re.Match[str]) -> bool:
    """'one of them', 'the one that', 'no one': a pronoun, not a count."""
    before, after = text[: m.start()], text[m.end() :]
    if re.search(r"\b(?:the|this|that|no|any|every|each|which|some)\s+$", before, re.I):
        return True
    return re.match(r"\s*(?:of|another|or|and|that|which|who|,|\.|;|$)", after, re.I) is not None
