"""Why a user looks fraudulent, in words: facts -> prompt -> a backend -> a grounding check.

The facts object carries everything the summary may say (score, percentile, top attributed
events, the counterfactual check, shared entities, peer statistics). A backend writes prose
from it:

- ``template``: deterministic prose, needs nothing (the default);
- ``hf-local``: a local Hugging Face causal LM directory (``transformers``);
- ``openai-compatible``: any ``/chat/completions`` endpoint (vLLM, Ollama, llama.cpp, hosted).

Every number, date, time, event type, user id and entity a text cites is checked against the
facts (``check_grounding``, in core.grounding), and so is each label, threshold side and event
time against what it is said of. Text that cites what is not there is flagged and the template
summary is shown beside it; a backend that fails or times out is replaced by the template.
"""

from __future__ import annotations

import base64
import hashlib
import http.client as http_client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from core.config import Settings
from core.grounding import KIND_WORDS, GroundingReport, check_grounding

__all__ = [
    "BACKENDS",
    "CounterfactualFact",
    "EventFact",
    "Facts",
    "GroundingReport",
    "GroupFact",
    "HFLocalNarrator",
    "LinkedEntity",
    "Narrator",
    "NarratorError",
    "NarratorTimeout",
    "OpenAICompatibleNarrator",
    "AccountSignal",
    "PeerStat",
    "Summary",
    "SummaryCache",
    "TemplateNarrator",
    "build_prompt",
    "behaviour_sentence",
    "build_prompt_text",
    "check_grounding",
    "counterfactual_sentence",
    "facts_digest",
    "facts_text",
    "make_narrator",
    "narrate",
    "narrator_identity",
]

# -- facts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventFact:
    """One top-attributed event."""

    event_id: int
    ts: datetime  # naive UTC
    event_type: str
    weight: float  # share of the positive attribution, 0..1
    fields: dict[str, str]  # human-readable values present on the event; absent ones omitted
    top_field: str  # the field that carried most attribution ("new device", "price", ...)


@dataclass(frozen=True)
class CounterfactualFact:
    k: int
    score_before: float  # displayed score 0..1
    score_without_top: float
    score_without_random: float
    # Events in the explained window when it is not the whole range (long histories), else None.
    window_events: int | None = None
    # The supervised head's fraud probability, when it is what the attributions explain: the
    # combined score mixes in the percentile, which a few events rarely move, so the
    # probability shows how much the top events carry. None for the unsupervised target.
    probability_before: float | None = None
    probability_without_top: float | None = None
    probability_without_random: float | None = None
    # (k, displayed score without the k top-ranked events) for k = 2x, 4x ... the check's
    # k, and the alert threshold to read them against: how much of the window carries the
    # score when k events do not move it.
    ladder: tuple[tuple[int, float], ...] = ()
    threshold: float | None = None


@dataclass(frozen=True)
class GroupFact:
    """A kind of behaviour in the explained window (every event of one type, or one session),
    its share of the positive attribution, and the displayed score without it."""

    kind: str  # "event type" | "session"
    key: str  # the event type, or the session id
    n_events: int
    share: float  # 0..1
    first_ts: datetime
    last_ts: datetime
    score_without: float | None  # None when the group is every explained event


@dataclass(frozen=True)
class LinkedEntity:
    """A device / IP / card this user shares with other users."""

    kind: str  # "device_id" | "ip" | "card_id" (core.schema calls the card "payment_id")
    value: str
    users: tuple[str, ...]  # other users sharing it (the first few when many do)
    labels: dict[str, str]  # other user -> label ("fraud" / "legit" / "unsure"), labelled only
    n_users: int | None = None  # how many other users share it in all; None: len(users)

    @property
    def total_users(self) -> int:
        return len(self.users) if self.n_users is None else max(self.n_users, len(self.users))


@dataclass(frozen=True)
class PeerStat:
    """How this user compares with the population on one statistic."""

    name: str  # "events per active day", "purchase share", "distinct devices"
    user_value: float
    population_median: float
    population_p95: float

    @property
    def out_of_range(self) -> bool:
        return self.user_value > self.population_p95


@dataclass(frozen=True)
class AccountSignal:
    """An aggregate of the user's history that raised the account-level model's probability
    (TreeSHAP contribution > 0), beside the training users' median."""

    label: str  # readable ("share of 'return' events", "distinct payment_id values")
    value: float
    median: float | None  # training users; None when unknown
    event_type: str | None = None  # the event type a per-type count or share is about


@dataclass(frozen=True)
class Facts:
    user_id: str
    model_id: str
    start: datetime | None
    end: datetime | None
    n_events: int
    score: float  # displayed score 0..1
    percentile: float | None  # 0..1, of the unsupervised score against the training users
    threshold: float
    top_events: tuple[EventFact, ...]
    counterfactual: CounterfactualFact | None
    linked: tuple[LinkedEntity, ...]
    peer_stats: tuple[PeerStat, ...]
    # The event types the data holds (not only the top events'). Never cited as evidence: the
    # grounding check uses it to recognise an event type the text mentions but the facts lack.
    # Empty -> the demo vocabulary.
    vocabulary: tuple[str, ...] = ()
    # The account-level model (gradient boosting on the user's aggregates): its probability
    # over the full history and the aggregates that raised it most. Empty / None without one.
    account_probability: float | None = None
    account_signals: tuple[AccountSignal, ...] = ()
    # The user's first and last event in the range: what the summary calls its span (the
    # range itself is the analyst's choice and may reach far beyond the user's activity).
    first_ts: datetime | None = None
    last_ts: datetime | None = None
    # The kinds of behaviour that carry the score most (core.behaviour), largest share first.
    behaviour: tuple[GroupFact, ...] = ()

    @property
    def above_threshold(self) -> bool:
        return self.score >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO strings, tuples as lists."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Facts:
        cf = data.get("counterfactual")
        return cls(
            user_id=str(data["user_id"]),
            model_id=str(data["model_id"]),
            start=_parse_dt(data.get("start")),
            end=_parse_dt(data.get("end")),
            n_events=int(data["n_events"]),
            score=float(data["score"]),
            percentile=None if data.get("percentile") is None else float(data["percentile"]),
            threshold=float(data["threshold"]),
            top_events=tuple(
                EventFact(
                    event_id=int(e["event_id"]),
                    ts=_parse_dt(e["ts"]) or datetime.min,
                    event_type=str(e["event_type"]),
                    weight=float(e["weight"]),
                    fields={str(k): str(v) for k, v in e.get("fields", {}).items()},
                    top_field=str(e.get("top_field", "")),
                )
                for e in data.get("top_events", [])
            ),
            counterfactual=None
            if cf is None
            else CounterfactualFact(
                k=int(cf["k"]),
                score_before=float(cf["score_before"]),
                score_without_top=float(cf["score_without_top"]),
                score_without_random=float(cf["score_without_random"]),
                window_events=None if cf.get("window_events") is None else int(cf["window_events"]),
                ladder=tuple((int(k), float(v)) for k, v in cf.get("ladder", [])),
                threshold=None if cf.get("threshold") is None else float(cf["threshold"]),
                **{
                    key: None if cf.get(key) is None else float(cf[key])
                    for key in (
                        "probability_before",
                        "probability_without_top",
                        "probability_without_random",
                    )
                },
            ),
            linked=tuple(
                LinkedEntity(
                    kind=str(x["kind"]),
                    value=str(x["value"]),
                    users=tuple(str(u) for u in x.get("users", [])),
                    labels={str(k): str(v) for k, v in x.get("labels", {}).items()},
                    n_users=None if x.get("n_users") is None else int(x["n_users"]),
                )
                for x in data.get("linked", [])
            ),
            peer_stats=tuple(
                PeerStat(
                    name=str(p["name"]),
                    user_value=float(p["user_value"]),
                    population_median=float(p["population_median"]),
                    population_p95=float(p["population_p95"]),
                )
                for p in data.get("peer_stats", [])
            ),
            vocabulary=tuple(str(v) for v in data.get("vocabulary", [])),
            first_ts=_parse_dt(data.get("first_ts")),
            last_ts=_parse_dt(data.get("last_ts")),
            account_probability=(
                None
                if data.get("account_probability") is None
                else float(data["account_probability"])
            ),
            account_signals=tuple(
                AccountSignal(
                    label=str(a["label"]),
                    value=float(a["value"]),
                    median=None if a.get("median") is None else float(a["median"]),
                    event_type=None if a.get("event_type") is None else str(a["event_type"]),
                )
                for a in data.get("account_signals", [])
            ),
            behaviour=tuple(
                GroupFact(
                    kind=str(g["kind"]),
                    key=str(g["key"]),
                    n_events=int(g["n_events"]),
                    share=float(g["share"]),
                    first_ts=_parse_dt(g["first_ts"]) or datetime.min,
                    last_ts=_parse_dt(g["last_ts"]) or datetime.min,
                    score_without=None
                    if g.get("score_without") is None
                    else float(g["score_without"]),
                )
                for g in data.get("behaviour", [])
            ),
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _parse_dt(value: Any) -> datetime | None:
    if value is None:
        return None
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


# -- formatting shared by the template and the prompt ------------------------------------------


def _fmt(value: float, min_decimals: int = 2) -> str:
    """A number as prose shows it: thousands separators, and enough decimals (up to 6) that a
    rounded figure stays within 5% of the value; the grounding check accepts it either way."""
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    for decimals in range(min_decimals, 7):
        text = f"{value:,.{decimals}f}"
        if _close(float(text.replace(",", "")), value, 0.05):
            return text
    return f"{value:,.{min_decimals}f}"


def percent_text(share: float) -> str:
    """0.4137 -> '41%'; a decimal or two where rounding would say 0% or 100% falsely."""
    for decimals in range(0, 3):
        x = round(share * 100, decimals)
        if (x not in (0.0, 100.0) or x == share * 100) and _close(x / 100, share, 0.05):
            break
    return f"{share * 100:.{decimals}f}%"


def _close(x: float, v: float, rel: float) -> bool:
    return abs(x - v) <= rel * abs(v) + 1e-12


def _when(ts: datetime) -> str:
    return f"{ts:%Y-%m-%d %H:%M}"


def _fmt_apart(a: float, b: float) -> tuple[str, str]:
    """Both numbers as _fmt writes them, with more decimals where they would read the same
    although they differ (a score of 0.4999 against a threshold of 0.5)."""
    x, y = _fmt(a), _fmt(b)
    decimals = 3
    while x == y and a != b and decimals <= 6:
        x, y = f"{a:,.{decimals}f}", f"{b:,.{decimals}f}"
        decimals += 1
    return x, y


_KIND_WORDS = KIND_WORDS
# top_field label (core.explain.FIELD_LABELS) -> the event field whose value shows it.
_FIELD_OF_LABEL = {
    "new device": "device_id",
    "new IP": "ip",
    "new country": "country",
    "new card": "card_id",
    "device seen before": "device_id",
    "IP seen before": "ip",
    "country seen before": "country",
    "card seen before": "card_id",
    "device used by other accounts": "device_id",
    "card used by other accounts": "card_id",
    "device used by no other account": "device_id",
    "card used by no other account": "card_id",
    "price": "price",
    "category": "category",
}


def _citable(value: str, facts: Facts) -> bool:
    """Can the template quote this logged value? One token always can; free text only when it
    carries no claim of its own (a category like "gift cards", not "refund from RU")."""
    value = value.strip()
    if not value or len(value) > 80:
        return False
    return not re.search(r"\s", value) or check_grounding(value, facts).grounded


def _top_field_phrase(event: EventFact, facts: Facts) -> str:
    label = event.top_field.strip()
    if not label:
        return ""
    key = _FIELD_OF_LABEL.get(label)
    value = event.fields.get(key) if key else None
    if value is None and key == "card_id":
        value = event.fields.get("payment_id")
    return f"{label} {value}" if value and _citable(value, facts) else label


def _group_name(g: GroupFact, whose: str = "its") -> str:
    if g.kind == "event type":
        return f"{whose} {g.n_events:,} {g.key} {'event' if g.n_events == 1 else 'events'}"
    if g.first_ts.date() == g.last_ts.date():
        span = f"on {g.first_ts:%Y-%m-%d} from {g.first_ts:%H:%M} to {g.last_ts:%H:%M}"
    else:
        span = f"from {_when(g.first_ts)} to {_when(g.last_ts)}"
    # "a", not "one": a spelled count must be a number in the facts, and there may be no 1.
    return f"a session {span} ({g.n_events:,} {'event' if g.n_events == 1 else 'events'})"


def _groups_owner(facts: Facts) -> str:
    """On a long history the groups are the explained window's, not the whole account's."""
    cf = facts.counterfactual
    return "the window's" if cf is not None and cf.window_events else "its"


def behaviour_sentence(facts: Facts) -> str:
    """Of the kinds of behaviour that carry most of the attribution (over half), the one whose
    removal lowers the score most, and the score without it: what the top events cannot say
    when a scripted burst carries the score."""
    cf = facts.counterfactual
    usable = [g for g in facts.behaviour if g.score_without is not None and g.share > 0.5]
    if cf is None or not usable:
        return ""
    g = min(usable, key=lambda x: (x.score_without, -x.share))
    assert g.score_without is not None
    name = _group_name(g, _groups_owner(facts))
    it = "them" if g.kind == "event type" and g.n_events != 1 else "it"
    verb = "carry" if it == "them" else "carries"
    pair = _score_pair(cf.score_before, g.score_without)
    if pair is None:
        then = f"the score stays at {cf.score_before:.2f}"
    else:
        moves = "falls" if g.score_without < cf.score_before else "rises"
        then = f"the score {moves} from {pair[0]} to {pair[1]}"
    share = percent_text(g.share)
    return f"{name[0].upper()}{name[1:]} {verb} {share} of the attribution; without {it} {then}."


def _score_pair(before: float, after: float) -> tuple[str, str] | None:
    """Two scores at 2 decimals, or 3 where 2 would print the same figure for different
    values; None when they read the same even then (the score "stays at")."""
    for decimals in (2, 3):
        x, y = f"{before:.{decimals}f}", f"{after:.{decimals}f}"
        if x != y:
            return x, y
    return None


def counterfactual_sentence(cf: CounterfactualFact) -> str:
    """The deletion check as one line (core.explain.Counterfactual.sentence words it so)."""
    if cf.k == 0:
        return f"Too few events to test: the score is {cf.score_before:.2f}."
    events = "event" if cf.k == 1 else "events"
    # A long history is explained on one window: say that its score is the window's.
    scope = f"On the explained window of {cf.window_events} events: w" if cf.window_events else "W"
    pair = _score_pair(cf.score_before, cf.score_without_top)
    if pair is None:
        top = f"the score stays at {cf.score_before:.2f}"
    else:
        verb = "falls" if cf.score_without_top < cf.score_before else "rises"
        top = f"the score {verb} from {pair[0]} to {pair[1]}"
    # The random control only says whether the score moves: small moves read as staying.
    drop_random = cf.score_before - cf.score_without_random
    if abs(drop_random) < 0.05:
        rest = f"stays at {cf.score_without_random:.2f}"
    else:
        rest = f"{'falls' if drop_random > 0 else 'rises'} to {cf.score_without_random:.2f}"
    sentence = (
        f"{scope}ithout these {cf.k} {events} {top}; without {cf.k} random {events} it {rest}."
    )
    before, without_top = cf.probability_before, cf.probability_without_top
    if before is not None and without_top is not None:
        pair = _score_pair(before, without_top)
        if pair is None:
            change = f"stays at {before:.2f}"
        else:
            change = f"{'falls' if without_top < before else 'rises'} from {pair[0]} to {pair[1]}"
        random_part = (
            ""
            if cf.probability_without_random is None
            else f" ({cf.probability_without_random:.2f} without the random ones)"
        )
        sentence = f"{sentence} The fraud probability {change} without them{random_part}."
    return sentence + _ladder_sentence(cf)


def _ladder_sentence(cf: CounterfactualFact) -> str:
    """When the k events leave the score above the threshold: how many of the most attributed
    events it takes to bring it under, or that even the most tried do not ("" otherwise)."""
    thr = cf.threshold
    if thr is None or not cf.ladder or cf.score_before < thr or cf.score_without_top < thr:
        return ""
    for k, score in cf.ladder:
        if score < thr:
            return (
                f" Only without the {k} top-ranked events does it fall to {score:.2f},"
                f" under the alert threshold of {thr:.2f}: the evidence is spread over many"
                " events."
            )
    k, score = cf.ladder[-1]
    return (
        f" Even without the {k} top-ranked events it is {score:.2f}, still above the alert"
        f" threshold of {thr:.2f}: the evidence is spread over most of the window."
    )


# -- prompt --------------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You write a short evidence summary for a fraud analyst who must decide whether one user "
    "account is fraudulent. Rules:\n"
    "1. Use only the facts given. Do not guess causes or add background knowledge.\n"
    "2. Every number, date, time, event type, user id, device, IP address and card you mention "
    "must appear in the facts, written as there (you may round a number or write a share as a "
    "percentage). Do not compute new numbers. Do not invent ids, times or event types. Do not "
    "write relative days (today, yesterday), URLs or email addresses.\n"
    "3. Write 4 to 6 sentences of plain English prose: no lists, no headings, no markdown.\n"
    "4. Cover: the score against the alert threshold; the unsupervised percentile (how "
    "unusual the behaviour is against the training users: a different measure from the score, "
    "never call it the score's rank); the events that "
    "weighed most, with their time, type and the field that mattered; what the counterfactual "
    "check shows; shared devices, IPs or cards and the linked users' labels; statistics that "
    "are out of range against the population. Say so when the evidence is weak."
)


PLACEHOLDER_RULE = (
    "\n5. Identifiers written like USER_1, DEVICE_2, IP_1, CARD_1, ITEM_1 or SESSION_1 stand "
    "for real ones: cite them exactly as written, never invent one."
)


def facts_text(facts: Facts) -> str:
    """The facts as compact lines, numbers written as the summary may cite them."""
    lines = [f"user: {facts.user_id}", f"model: {facts.model_id}"]
    if facts.start is not None or facts.end is not None:
        start = _when(facts.start) if facts.start else "the first event"
        end = _when(facts.end) if facts.end else "the last event"
        lines.append(f"time range: {start} to {end} (UTC)")
    lines.append(f"events in range: {facts.n_events}")
    if facts.first_ts is not None and facts.last_ts is not None:
        lines.append(f"first and last event: {_when(facts.first_ts)} and {_when(facts.last_ts)}")
    side = "above" if facts.above_threshold else "below"
    score, threshold = _fmt_apart(facts.score, facts.threshold)
    lines.append(f"score: {score} ({side} the alert threshold {threshold})")
    if facts.percentile is not None:
        p = percent_text(facts.percentile)
        lines.append(
            f"unsupervised percentile: {p} (its behaviour is more unusual than {p} of the "
            "training users; not a rank of the score above)"
        )
    if facts.top_events:
        lines.append("top attributed events (share of the positive attribution):")
        for e in facts.top_events:
            detail = ", ".join(f"{k}={v}" for k, v in e.fields.items())
            lines.append(
                f"- event {e.event_id} at {e.ts:%Y-%m-%d %H:%M:%S}: {e.event_type}, "
                f"{percent_text(e.weight)}, field that mattered most: {e.top_field or 'n/a'}"
                + (f"; {detail}" if detail else "")
            )
    if facts.counterfactual is not None:
        lines.append(f"counterfactual check: {counterfactual_sentence(facts.counterfactual)}")
    if facts.behaviour:
        lines.append(
            "kinds of behaviour in the explained window (share of the positive attribution; "
            "score of the window without them):"
        )
        whose = _groups_owner(facts)
        for g in facts.behaviour:
            without = "n/a (every event)" if g.score_without is None else _fmt(g.score_without)
            share = percent_text(g.share)
            lines.append(f"- {_group_name(g, whose)}: {share}; score without {without}")
    if facts.linked:
        lines.append("shared with other users:")
        for x in facts.linked:
            users = ", ".join(f"{u} ({x.labels.get(u, 'unlabelled')})" for u in x.users)
            if x.total_users > len(x.users):
                users += f" ({x.total_users} other users in all; the first {len(x.users)} shown)"
            lines.append(f"- {_KIND_WORDS.get(x.kind, x.kind)} {x.value}: {users}")
    else:
        lines.append("shared with other users: nothing")
    if facts.account_probability is not None:
        lines.append(
            f"account-level model (aggregates of the whole history): fraud probability "
            f"{_fmt(facts.account_probability)}"
        )
        if facts.account_signals:
            lines.append("aggregates that raised it most (user value, training median):")
            lines += [f"- {_signal_text(a)}" for a in facts.account_signals]
    if facts.peer_stats:
        lines.append("against the population (median, 95th percentile):")
        for p in facts.peer_stats:
            flag = " OUT OF RANGE" if p.out_of_range else ""
            lines.append(
                f"- {p.name}: user {_fmt(p.user_value)}, median {_fmt(p.population_median)}, "
                f"95th percentile {_fmt(p.population_p95)}{flag}"
            )
    return "\n".join(lines)


def _signal_text(signal: AccountSignal) -> str:
    median = "" if signal.median is None else f" (median {_fmt(signal.median)})"
    return f"{signal.label} is {_fmt(signal.value)}{median}"


def build_prompt(facts: Facts, *, placeholders: bool = False) -> list[dict[str, str]]:
    """Chat messages for an instruction-tuned model (``placeholders``: the facts' ids are
    core.pseudonym placeholders, and the model is told to cite them as written)."""
    user = f"Facts:\n{facts_text(facts)}\n\nWrite the summary."
    system = SYSTEM_PROMPT + (PLACEHOLDER_RULE if placeholders else "")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def build_prompt_text(facts: Facts) -> str:
    """The same prompt as plain text, for models without a chat template."""
    return f"{SYSTEM_PROMPT}\n\nFacts:\n{facts_text(facts)}\n\nSummary:"


# -- backends ------------------------------------------------------------------------------------


@runtime_checkable
class Narrator(Protocol):
    name: str

    def generate(self, facts: Facts) -> str: ...


class NarratorError(RuntimeError):
    """A backend could not produce a summary (unreachable, bad answer, model did not load)."""


class NarratorTimeout(NarratorError, TimeoutError):
    """A backend took longer than its timeout."""


class TemplateNarrator:
    """Deterministic prose from the facts; grounded by construction (and tested to be)."""

    name = "template"
    identity = "template"

    def generate(self, facts: Facts) -> str:
        side = "above" if facts.above_threshold else "below"
        score, threshold = _fmt_apart(facts.score, facts.threshold)
        head = f"User {facts.user_id} scores {score}, {side} the alert threshold of {threshold}"
        scope = f"{facts.n_events:,} {'event' if facts.n_events == 1 else 'events'}"
        first, last = facts.first_ts, facts.last_ts
        if first is not None and last is not None:
            if first.date() == last.date():
                scope += f" on {first:%Y-%m-%d}"
            else:
                scope += f" from {first:%Y-%m-%d} to {last:%Y-%m-%d}"
        sentences = [f"{head} ({scope}, model {facts.model_id})."]
        if facts.percentile is not None:
            # The percentile ranks the unsupervised score alone, not the score shown above.
            p = percent_text(facts.percentile)
            sentences.append(
                f"Its unsupervised percentile is {p}: more unusual than {p} of training users."
            )

        if facts.top_events:
            parts = []
            for e in facts.top_events[:5]:
                what = _top_field_phrase(e, facts)
                why = f", driven by {what}" if what else ""
                parts.append(f"{_when(e.ts)} {e.event_type} ({percent_text(e.weight)}{why})")
            sentences.append("The events that weigh most: " + "; ".join(parts) + ".")
        else:
            sentences.append("No single event stands out in the attribution.")

        if facts.counterfactual is not None:
            sentences.append(counterfactual_sentence(facts.counterfactual))
            carried = behaviour_sentence(facts)
            if carried:
                sentences.append(carried)

        if facts.linked:
            parts = []
            for x in facts.linked:
                # Labelled accounts first: they are what an analyst acts on.
                ranked = sorted(x.users, key=lambda u: (u not in x.labels, u))
                shown = ranked[:4]
                who = ", ".join(f"{u} ({x.labels.get(u, 'unlabelled')})" for u in shown)
                n = x.total_users
                more = " including" if len(shown) < n else ""
                kind = _KIND_WORDS.get(x.kind, x.kind)
                what = f"{kind} {x.value}" if _citable(x.value, facts) else f"a {kind}"
                parts.append(
                    f"{what} is shared with {n:,} other "
                    f"{'account' if n == 1 else 'accounts'}{more}: {who}"
                )
            text = "; ".join(parts)
            sentences.append(text[0].upper() + text[1:] + ".")
        else:
            sentences.append("No device, IP or card is shared with other accounts.")

        if facts.account_probability is not None and facts.account_signals:
            sentences.append(
                "The account-level model gives a fraud probability of "
                f"{_fmt(facts.account_probability)}, raised most by: "
                + "; ".join(_signal_text(a) for a in facts.account_signals[:3])
                + "."
            )

        unusual = [p for p in facts.peer_stats if p.out_of_range]
        if unusual:
            parts = [
                f"{p.name} is {_fmt(p.user_value)} (median {_fmt(p.population_median)}, "
                f"95th percentile {_fmt(p.population_p95)})"
                for p in unusual
            ]
            sentences.append("Out of range against the population: " + "; ".join(parts) + ".")
        elif facts.peer_stats:
            sentences.append("Its activity statistics are within the population's usual range.")
        return " ".join(sentences)


@dataclass(eq=False)
class HFLocalNarrator:
    """A local Hugging Face causal LM directory; greedy decoding, GPU when present."""

    model_dir: Path | str
    device: str = "auto"
    max_new_tokens: int = 200
    name: str = field(default="hf-local", init=False)
    # One instance serves every thread (the page keeps it in st.cache_resource): the weights
    # load once, on first use, and generation runs one call at a time under this lock.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _loaded: tuple[Any, Any, Any] | None = field(default=None, init=False, repr=False)

    @property
    def identity(self) -> str:
        """What decides the text it writes (the summary cache keys on it)."""
        return f"hf-local|{Path(self.model_dir).resolve()}|{self.device}|{self.max_new_tokens}"

    def _load(self) -> tuple[Any, Any, Any]:
        # transformers is imported here, not at module level: ~7 s that the template backend
        # and the grounding check never need.
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._loaded is None:
            device = self.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            path = str(self.model_dir)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                # fp32 on CPU (bf16 is ~16x slower there); the checkpoint's own dtype on GPU.
                dtype = "auto" if device.startswith("cuda") else torch.float32
                model = AutoModelForCausalLM.from_pretrained(
                    path, local_files_only=True, dtype=dtype
                )
            except (OSError, ValueError) as exc:
                raise NarratorError(f"could not load a causal LM from {path}: {exc}") from exc
            model.to(device).eval()
            self._loaded = (tokenizer, model, torch.device(device))
        return self._loaded

    def prompt_for(self, facts: Facts) -> str:
        """The exact text fed to the tokenizer: the chat template when the model has one."""
        with self._lock:
            tokenizer, _, _ = self._load()
        return self._prompt(tokenizer, facts)[0]

    @staticmethod
    def _prompt(tokenizer: Any, facts: Facts) -> tuple[str, bool]:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                build_prompt(facts), tokenize=False, add_generation_prompt=True
            )
            return str(text), True
        return build_prompt_text(facts), False

    def generate(self, facts: Facts) -> str:
        import torch

        with self._lock:  # one generation at a time on the shared model
            tokenizer, model, device = self._load()
            prompt, chat = self._prompt(tokenizer, facts)
            # A chat template writes its own BOS and role markers; a plain prompt needs them.
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat)["input_ids"]
            limit = _max_positions(model.config)
            if limit is not None and ids.shape[1] + self.max_new_tokens > limit:
                keep = max(1, limit - self.max_new_tokens)
                ids = ids[:, -keep:]  # the facts and the cue to answer sit at the end
            ids = ids.to(device)
            pad = tokenizer.pad_token_id
            if pad is None:
                pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            new = out[0, ids.shape[1] :]
            return str(tokenizer.decode(new, skip_special_tokens=True)).strip()


def _max_positions(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_MAX_ANSWER_BYTES = 256 * 1024
_SECRET_PARAM = re.compile(r"key|token|secret|pass|auth|sig|credential", re.IGNORECASE)


def _safe_url(url: str) -> str:
    """The URL without user:password@, query string or fragment: fit for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(eq=False)
class OpenAICompatibleNarrator:
    """POST {base_url}/chat/completions, temperature 0. stdlib urllib: no client dependency.

    ``timeout`` is a deadline for the whole request (connect, wait, read): the request runs in
    a worker thread that the caller stops waiting for, and the worker reads the answer in
    chunks, giving up past the deadline or past 256 KiB. The API key goes in the
    Authorization header (user:password in the URL becomes Basic auth); messages carry the URL
    without credentials or query string."""

    base_url: str = field(repr=False)  # may hold credentials: __repr__ shows _safe_url
    model: str
    api_key: str | None = field(default=None, repr=False)  # never logged, never in repr
    timeout: float = 20.0
    max_tokens: int = 300
    # The endpoint may be a hosted API: send placeholders for account, device, IP, card, item
    # and session ids, and put the real ones back into the answer (core.pseudonym).
    pseudonymise: bool = True
    name: str = field(default="openai-compatible", init=False)

    def __repr__(self) -> str:
        return (
            f"OpenAICompatibleNarrator(base_url={_safe_url(self.base_url)!r}, "
            f"model={self.model!r}, timeout={self.timeout!r}, max_tokens={self.max_tokens!r}, "
            f"pseudonymise={self.pseudonymise!r})"
        )

    @property
    def identity(self) -> str:
        """What decides the text it writes (the summary cache keys on it); never a secret."""
        query = urllib.parse.parse_qsl(urllib.parse.urlsplit(self.base_url).query)
        public = sorted((k, v) for k, v in query if not _SECRET_PARAM.search(k))
        return (
            f"openai-compatible|{_safe_url(self.base_url)}|{urllib.parse.urlencode(public)}|"
            f"{self.model}|{self.max_tokens}|{'pseudonyms' if self.pseudonymise else 'real ids'}"
        )

    def _endpoint(self) -> tuple[str, str | None]:
        """The request URL (query kept: some servers take api-version there) and Basic auth
        from user:password@, which urllib would otherwise read as a malformed port."""
        parts = urllib.parse.urlsplit(self.base_url)
        basic = None
        if parts.username is not None:
            pair = f"{urllib.parse.unquote(parts.username)}:"
            pair += urllib.parse.unquote(parts.password or "")
            basic = base64.b64encode(pair.encode()).decode("ascii")
        netloc = parts.netloc.rpartition("@")[2]
        path = parts.path.rstrip("/") + "/chat/completions"
        return urllib.parse.urlunsplit((parts.scheme, netloc, path, parts.query, "")), basic

    def _scrub(self, text: str) -> str:
        """Whatever a lower layer put in a message, without the key, password or query."""
        parts = urllib.parse.urlsplit(self.base_url)
        secrets = [self.api_key, parts.password, parts.username, parts.query]
        secrets += [v for _, v in urllib.parse.parse_qsl(parts.query)]
        for secret in sorted({x for x in secrets if x and len(x) >= 3}, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def generate(self, facts: Facts) -> str:
        try:
            return self._generate(facts)
        except NarratorError as exc:
            scrubbed = self._scrub(str(exc))
            if scrubbed == str(exc):
                raise
            raise type(exc)(scrubbed) from None

    def _generate(self, facts: Facts) -> str:
        if not self.pseudonymise:
            return self._ask(build_prompt(facts))
        from core.pseudonym import Pseudonyms  # it builds on the facts classes above

        aliases = Pseudonyms()
        messages = build_prompt(aliases.facts(facts), placeholders=True)
        # Only the placeholders the facts' text showed come back (the rule's examples do not).
        return aliases.restore(self._ask(messages), sent=messages[-1]["content"])

    def _ask(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        url, basic = self._endpoint()
        shown = _safe_url(url)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        elif basic:
            headers["Authorization"] = f"Basic {basic}"
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
        except ValueError:
            raise NarratorError(f"invalid URL {shown}") from None
        deadline = time.monotonic() + self.timeout
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                outcome["raw"] = self._fetch(request, deadline, shown)
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc
            finally:
                done.set()

        # A daemon worker: a server that drips bytes cannot hold the caller past the deadline;
        # the worker itself stops at its next chunk or socket timeout.
        threading.Thread(target=work, name="openai-compatible", daemon=True).start()
        if not done.wait(self.timeout):
            raise NarratorTimeout(f"timed out after {self.timeout:g} s")
        if "error" in outcome:
            raise outcome["error"]
        try:
            payload = json.loads(outcome["raw"].decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise NarratorError(f"{shown} did not answer with JSON") from exc
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise NarratorError("the answer has no choices[0].message.content") from exc
        return str(content or "").strip()

    def _fetch(self, request: urllib.request.Request, deadline: float, shown: str) -> bytes:
        timed_out = NarratorTimeout(f"timed out after {self.timeout:g} s")
        try:
            remaining = max(deadline - time.monotonic(), 0.001)
            with urllib.request.urlopen(request, timeout=remaining) as response:  # noqa: S310
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > _MAX_ANSWER_BYTES:
                    raise NarratorError(f"{shown} answered more than 256 KiB")
                read = getattr(response, "read1", response.read)
                chunks: list[bytes] = []
                size = 0
                while chunk := read(64 * 1024):
                    size += len(chunk)
                    if size > _MAX_ANSWER_BYTES:
                        raise NarratorError(f"{shown} answered more than 256 KiB")
                    if time.monotonic() > deadline:
                        raise timed_out
                    chunks.append(chunk)
                return b"".join(chunks)
        except TimeoutError as exc:  # socket.timeout is TimeoutError since 3.10
            raise timed_out from exc
        except urllib.error.HTTPError as exc:
            exc.close()
            raise NarratorError(f"HTTP {exc.code} from {shown}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError | socket.timeout):
                raise timed_out from exc
            raise NarratorError(f"cannot reach {shown}: {exc.reason}") from None
        except (OSError, ValueError, http_client.HTTPException) as exc:
            raise NarratorError(f"connection to {shown} failed ({type(exc).__name__})") from None


BACKENDS: tuple[str, ...] = ("template", "hf-local", "openai-compatible")


def make_narrator(settings: Settings) -> Narrator:
    """The backend the settings name (FRAUDLENS_LLM_BACKEND and friends).

    Deterministic: equal settings give narrators with equal ``narrator_identity``. Each is
    reusable and thread-safe, so a caller may keep one per settings (st.cache_resource); the
    hf-local one loads its weights once, on first use."""
    backend = settings.llm_backend.strip().lower()
    if backend == "template":
        return TemplateNarrator()
    if backend == "hf-local":
        if not settings.llm_model_dir:
            raise ValueError("llm_backend 'hf-local' needs FRAUDLENS_LLM_MODEL_DIR")
        return HFLocalNarrator(settings.llm_model_dir, device=settings.device)
    if backend == "openai-compatible":
        if not settings.llm_base_url or not settings.llm_model:
            raise ValueError(
                "llm_backend 'openai-compatible' needs FRAUDLENS_LLM_BASE_URL and "
                "FRAUDLENS_LLM_MODEL"
            )
        return OpenAICompatibleNarrator(
            settings.llm_base_url,
            settings.llm_model,
            api_key=settings.llm_api_key,
            timeout=settings.llm_timeout_s,
            pseudonymise=settings.llm_pseudonymise,
        )
    raise ValueError(
        f"unknown LLM backend {settings.llm_backend!r}; choose one of {', '.join(BACKENDS)}"
    )


# -- narrate -------------------------------------------------------------------------------------

# How long a backend failure (timeout, refused connection) is remembered before a retry.
FAILURE_RETRY_S = 60.0
_WHO = {"hf-local": "The local model", "openai-compatible": "The OpenAI-compatible endpoint"}


@dataclass(frozen=True)
class Summary:
    text: str  # what to show
    backend: str  # who wrote `text`
    grounding: GroundingReport  # of `text`
    fallback_text: str | None  # the template summary when the backend's was ungrounded or failed
    message: str | None  # a note for the page; None when all is well
    requested_backend: str = ""  # the backend asked for (differs from `backend` on failure)

    @property
    def flagged(self) -> bool:
        """True when `text` cites something the facts do not hold: never show it as fine."""
        return not self.grounding.grounded

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["flagged"] = self.flagged
        return out


def narrator_identity(narrator: Narrator | str) -> str:
    """The backend and what decides its text (model directory, endpoint and model name), never
    a credential. A backend without an ``identity`` attribute is known by its name."""
    if isinstance(narrator, str):
        return narrator
    return str(getattr(narrator, "identity", None) or narrator.name)


def facts_digest(facts: Facts) -> str:
    """A stable hash of everything the facts say (threshold, labels, events...)."""
    text = json.dumps(facts.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# (model, user, start, end, narrator identity, facts digest)
CacheKey = tuple[str, str, datetime | None, datetime | None, str, str]


class SummaryCache:
    """Thread-safe bounded LRU of summaries, keyed by (model, user, range, narrator identity,
    facts digest): a changed threshold or label, or another model or endpoint behind the same
    backend name, is a new summary."""

    def __init__(self, maxsize: int = 256) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        # key -> (summary, monotonic expiry or None for "until evicted")
        self._data: OrderedDict[CacheKey, tuple[Summary, float | None]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(facts: Facts, narrator: Narrator | str) -> CacheKey:
        return (
            facts.model_id,
            facts.user_id,
            facts.start,
            facts.end,
            narrator_identity(narrator),
            facts_digest(facts),
        )

    def get(self, key: CacheKey) -> Summary | None:
        with self._lock:
            if key not in self._data:
                return None
            summary, expires = self._data[key]
            if expires is not None and time.monotonic() >= expires:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return summary

    def put(self, key: CacheKey, summary: Summary, *, ttl_s: float | None = None) -> None:
        with self._lock:
            expires = None if ttl_s is None else time.monotonic() + ttl_s
            self._data[key] = (summary, expires)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def narrate(facts: Facts, narrator: Narrator, *, cache: SummaryCache | None = None) -> Summary:
    """A summary the page can show as is: the backend's text when grounded; flagged with the
    template beside it when not; the template with a message when the backend fails."""
    key = SummaryCache.key(facts, narrator)
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    template = TemplateNarrator()
    if narrator.name == template.name:
        text = template.generate(facts)
        report = check_grounding(text, facts)
        message = None
        if not report.grounded:  # a bug in the template: say so rather than hide it
            message = "The template summary cites values not in the evidence; check the facts."
        summary = Summary(text, template.name, report, None, message, template.name)
    else:
        summary = _narrate_backend(facts, narrator, template)
        if summary.backend != narrator.name:
            # A failure is remembered briefly: an endpoint that times out would otherwise stall
            # every rerun of the page (each click) for the whole timeout. Then it is retried.
            if cache is not None:
                cache.put(key, summary, ttl_s=FAILURE_RETRY_S)
            return summary
    if cache is not None:
        cache.put(key, summary)
    return summary


def _narrate_backend(facts: Facts, narrator: Narrator, template: TemplateNarrator) -> Summary:
    fallback = template.generate(facts)
    try:
        text = narrator.generate(facts).strip()
        if not text:
            raise NarratorError("returned an empty summary")
    except Exception as exc:  # any backend failure falls back to the template, with its reason
        reason = _reason(exc) if isinstance(exc, TimeoutError) else f"failed ({_reason(exc)})"
        return Summary(
            text=fallback,
            backend=template.name,
            grounding=check_grounding(fallback, facts),
            fallback_text=fallback,
            message=f"{narrator.name} {reason}; showing the template summary.",
            requested_backend=narrator.name,
        )
    report = check_grounding(text, facts)
    if report.grounded:
        return Summary(text, narrator.name, report, None, None, narrator.name)
    n = len(report.problems)
    who = _WHO.get(narrator.name, f"The {narrator.name} backend")
    message = (
        f"{who} cited {n} {'value' if n == 1 else 'values'} not in the evidence; "
        "the template summary is shown beside it."
    )
    return Summary(text, narrator.name, report, fallback, message, narrator.name)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, TimeoutError) and not text.startswith("timed out"):
        return f"timed out ({text})" if text else "timed out"
    return text or type(exc).__name__
