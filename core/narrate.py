"""Why a user looks fraudulent, in words: facts -> prompt -> a backend -> a grounding check.

The facts object carries everything the summary may say (score, percentile, top attributed
events, the counterfactual check, shared entities, peer statistics). A backend writes prose
from it:

- ``template``: deterministic prose, needs nothing (the default);
- ``hf-local``: a local Hugging Face causal LM directory (``transformers``);
- ``openai-compatible``: any ``/chat/completions`` endpoint (vLLM, Ollama, llama.cpp, hosted).

Every number, date, time, event type, user id and entity a text cites is checked against the
facts (``check_grounding``). Text that cites what is not there is flagged and the template
summary is shown beside it; a backend that fails or times out is replaced by the template.
"""

from __future__ import annotations

import calendar
import json
import math
import re
import socket
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from core.config import Settings
from core.schema import DEMO_EVENT_TYPES

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


@dataclass(frozen=True)
class LinkedEntity:
    """A device / IP / card this user shares with other users."""

    kind: str  # "device_id" | "ip" | "card_id" (core.schema calls the card "payment_id")
    value: str
    users: tuple[str, ...]  # other users sharing it
    labels: dict[str, str]  # other user -> label ("fraud" / "legit" / "unsure"), labelled only


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
class Facts:
    user_id: str
    model_id: str
    start: datetime | None
    end: datetime | None
    n_events: int
    score: float  # displayed score 0..1
    percentile: float | None  # 0..1
    threshold: float
    top_events: tuple[EventFact, ...]
    counterfactual: CounterfactualFact | None
    linked: tuple[LinkedEntity, ...]
    peer_stats: tuple[PeerStat, ...]
    # The event types the data holds (not only the top events'). Never cited as evidence: the
    # grounding check uses it to recognise an event type the text mentions but the facts lack.
    # Empty -> the demo vocabulary.
    vocabulary: tuple[str, ...] = ()

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
            ),
            linked=tuple(
                LinkedEntity(
                    kind=str(x["kind"]),
                    value=str(x["value"]),
                    users=tuple(str(u) for u in x.get("users", [])),
                    labels={str(k): str(v) for k, v in x.get("labels", {}).items()},
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


def _pct(share: float) -> str:
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


_KIND_WORDS = {"device_id": "device", "ip": "IP", "card_id": "card", "payment_id": "card"}
# top_field label (core.explain.FIELD_LABELS) -> the event field whose value shows it.
_FIELD_OF_LABEL = {
    "new device": "device_id",
    "new IP": "ip",
    "new country": "country",
    "new card": "card_id",
    "price": "price",
    "category": "category",
}


def _top_field_phrase(event: EventFact) -> str:
    label = event.top_field.strip()
    if not label:
        return ""
    key = _FIELD_OF_LABEL.get(label)
    value = event.fields.get(key) if key else None
    if value is None and key == "card_id":
        value = event.fields.get("payment_id")
    return f"{label} {value}" if value else label


def counterfactual_sentence(cf: CounterfactualFact) -> str:
    """The deletion check as one line (same wording as core.explain.Counterfactual)."""
    if cf.k == 0:
        return f"Too few events to test: the score is {cf.score_before:.2f}."
    drop_random = cf.score_before - cf.score_without_random
    verb = "falls" if cf.score_without_top < cf.score_before else "rises"
    random_verb = (
        "stays at" if abs(drop_random) < 0.05 else ("falls to" if drop_random > 0 else "rises to")
    )
    events = "event" if cf.k == 1 else "events"
    # A long history is explained on one window: say that its score is the window's.
    scope = f"On the explained window of {cf.window_events} events: w" if cf.window_events else "W"
    return (
        f"{scope}ithout these {cf.k} {events} the score {verb} from {cf.score_before:.2f} "
        f"to {cf.score_without_top:.2f}; without {cf.k} random {events} it "
        f"{random_verb} {cf.score_without_random:.2f}."
    )


# -- prompt --------------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You write a short evidence summary for a fraud analyst who must decide whether one user "
    "account is fraudulent. Rules:\n"
    "1. Use only the facts given. Do not guess causes or add background knowledge.\n"
    "2. Every number, date, time, event type, user id, device, IP address and card you mention "
    "must appear in the facts, written as there (you may round a number or write a share as a "
    "percentage). Do not compute new numbers. Do not invent ids, times or event types.\n"
    "3. Write 4 to 6 sentences of plain English prose: no lists, no headings, no markdown.\n"
    "4. Cover: the score against the alert threshold and the percentile; the events that "
    "weighed most, with their time, type and the field that mattered; what the counterfactual "
    "check shows; shared devices, IPs or cards and the linked users' labels; statistics that "
    "are out of range against the population. Say so when the evidence is weak."
)


def facts_text(facts: Facts) -> str:
    """The facts as compact lines, numbers written as the summary may cite them."""
    lines = [f"user: {facts.user_id}", f"model: {facts.model_id}"]
    if facts.start is not None or facts.end is not None:
        start = _when(facts.start) if facts.start else "the first event"
        end = _when(facts.end) if facts.end else "the last event"
        lines.append(f"time range: {start} to {end} (UTC)")
    lines.append(f"events in range: {facts.n_events}")
    side = "above" if facts.above_threshold else "below"
    lines.append(f"score: {_fmt(facts.score)} ({side} the alert threshold {_fmt(facts.threshold)})")
    if facts.percentile is not None:
        lines.append(f"percentile: {_pct(facts.percentile)} of users score lower")
    if facts.top_events:
        lines.append("top attributed events (share of the positive attribution):")
        for e in facts.top_events:
            detail = ", ".join(f"{k}={v}" for k, v in e.fields.items())
            lines.append(
                f"- event {e.event_id} at {e.ts:%Y-%m-%d %H:%M:%S}: {e.event_type}, "
                f"{_pct(e.weight)}, field that mattered most: {e.top_field or 'n/a'}"
                + (f"; {detail}" if detail else "")
            )
    if facts.counterfactual is not None:
        lines.append(f"counterfactual check: {counterfactual_sentence(facts.counterfactual)}")
    if facts.linked:
        lines.append("shared with other users:")
        for x in facts.linked:
            users = ", ".join(f"{u} ({x.labels.get(u, 'unlabelled')})" for u in x.users)
            lines.append(f"- {_KIND_WORDS.get(x.kind, x.kind)} {x.value}: {users}")
    else:
        lines.append("shared with other users: nothing")
    if facts.peer_stats:
        lines.append("against the population (median, 95th percentile):")
        for p in facts.peer_stats:
            flag = " OUT OF RANGE" if p.out_of_range else ""
            lines.append(
                f"- {p.name}: user {_fmt(p.user_value)}, median {_fmt(p.population_median)}, "
                f"95th percentile {_fmt(p.population_p95)}{flag}"
            )
    return "\n".join(lines)


def build_prompt(facts: Facts) -> list[dict[str, str]]:
    """Chat messages for an instruction-tuned model."""
    user = f"Facts:\n{facts_text(facts)}\n\nWrite the summary."
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


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

    def generate(self, facts: Facts) -> str:
        side = "above" if facts.above_threshold else "below"
        head = (
            f"User {facts.user_id} scores {_fmt(facts.score)}, {side} the alert threshold of "
            f"{_fmt(facts.threshold)}"
        )
        if facts.percentile is not None:
            head += f", higher than {_pct(facts.percentile)} of users"
        scope = f"{facts.n_events:,} events"
        if facts.start is not None and facts.end is not None:
            scope += f" from {facts.start:%Y-%m-%d} to {facts.end:%Y-%m-%d}"
        sentences = [f"{head} ({scope}, model {facts.model_id})."]

        if facts.top_events:
            parts = []
            for e in facts.top_events[:5]:
                what = _top_field_phrase(e)
                why = f", driven by {what}" if what else ""
                parts.append(f"{_when(e.ts)} {e.event_type} ({_pct(e.weight)}{why})")
            sentences.append("The events that weigh most: " + "; ".join(parts) + ".")
        else:
            sentences.append("No single event stands out in the attribution.")

        if facts.counterfactual is not None:
            sentences.append(counterfactual_sentence(facts.counterfactual))

        if facts.linked:
            parts = []
            for x in facts.linked:
                # Labelled accounts first: they are what an analyst acts on.
                ranked = sorted(x.users, key=lambda u: (u not in x.labels, u))
                shown = ranked[:4]
                who = ", ".join(f"{u} ({x.labels.get(u, 'unlabelled')})" for u in shown)
                more = " including" if len(shown) < len(x.users) else ""
                n = len(x.users)
                parts.append(
                    f"{_KIND_WORDS.get(x.kind, x.kind)} {x.value} is shared with {n} other "
                    f"{'account' if n == 1 else 'accounts'}{more}: {who}"
                )
            text = "; ".join(parts)
            sentences.append(text[0].upper() + text[1:] + ".")
        else:
            sentences.append("No device, IP or card is shared with other accounts.")

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
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _loaded: tuple[Any, Any, Any] | None = field(default=None, init=False, repr=False)

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


@dataclass(eq=False)
class OpenAICompatibleNarrator:
    """POST {base_url}/chat/completions, temperature 0. stdlib urllib: no client dependency."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never logged, never in repr
    timeout: float = 20.0
    max_tokens: int = 300
    name: str = field(default="openai-compatible", init=False)

    def generate(self, facts: Facts) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": build_prompt(facts),
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                payload = json.loads(response.read().decode("utf-8"))
        except TimeoutError as exc:  # socket.timeout is TimeoutError since 3.10
            raise NarratorTimeout(f"timed out after {self.timeout:g} s") from exc
        except urllib.error.HTTPError as exc:
            raise NarratorError(f"HTTP {exc.code} from {url}") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError | socket.timeout):
                raise NarratorTimeout(f"timed out after {self.timeout:g} s") from exc
            raise NarratorError(f"cannot reach {url}: {exc.reason}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise NarratorError(f"{url} did not answer with JSON") from exc
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise NarratorError("the answer has no choices[0].message.content") from exc
        return str(content or "").strip()


BACKENDS: tuple[str, ...] = ("template", "hf-local", "openai-compatible")


def make_narrator(settings: Settings) -> Narrator:
    """The backend the settings name (FRAUDLENS_LLM_BACKEND and friends)."""
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
        )
    raise ValueError(
        f"unknown LLM backend {settings.llm_backend!r}; choose one of {', '.join(BACKENDS)}"
    )


# -- grounding -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundingReport:
    grounded: bool
    problems: list[str]  # each names the offending token and why
    cited: list[str]  # what the text cites and the fact it matched

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_name) if m}
_MONTHS.update({m.lower(): i for i, m in enumerate(calendar.month_abbr) if m})
_MONTHS["sept"] = 9
_WEEKDAYS = {d.lower(): i for i, d in enumerate(calendar.day_name)}
_MONTH_RE = "|".join(sorted(_MONTHS, key=len, reverse=True))
_SPELLED = {
    "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20,
}  # fmt: skip
# Event-type words that are also everyday English ("needs review", "in return"): they count as
# an event-type claim only in an event context (quoted, or followed by "event(s)").
_AMBIGUOUS_TYPES = {"view", "review", "return", "search", "payment"}
# Prefixes that name an identifier in prose ("dev-12", "card_9f"), whatever the data's shapes.
_ID_PREFIXES = "dev|device|card|user|usr|acct|account|sess|session|item|order|cust|customer|ip"
_ID_FIELDS = {"device_id", "ip", "card_id", "payment_id", "session_id", "item_id"}

_KEY = "field name"
_B = r"(?<![\w.\-])"  # token start: not glued to a word, a decimal point or a hyphen
_E = r"(?![\w\-]|\.\w)"  # token end


@dataclass(frozen=True)
class _Number:
    value: float
    source: str


@dataclass
class _Evidence:
    strings: dict[str, str]  # lower-cased allowed string -> where it is in the facts
    numbers: list[_Number]
    times: list[datetime]
    event_ids: set[int]
    event_words: dict[str, str]  # allowed event-type word -> source
    vocabulary: list[str]
    shapes: list[tuple[re.Pattern[str], str]]  # id patterns seen in the facts -> what they name


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


def _evidence(facts: Facts) -> _Evidence:
    data = facts.to_dict()
    data.pop("vocabulary", None)
    strings: dict[str, str] = {}
    numbers: list[_Number] = []
    for path, value in _walk(data, ""):
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            if math.isfinite(value):
                numbers.append(_Number(float(value), path))
        elif isinstance(value, str):
            parsed = _parse_number(value)
            if parsed is not None:
                numbers.append(_Number(parsed, path))
            elif value.strip():
                strings.setdefault(value.strip().lower(), path)
    strings.update({w.lower(): _KEY for w in _KIND_WORDS.values()})

    times = [t for t in (facts.start, facts.end) if t is not None]
    times += [e.ts for e in facts.top_events]
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
        derived.append((len(x.labels), f"labelled users sharing {x.value}"))
        for lab in set(x.labels.values()):
            derived.append((list(x.labels.values()).count(lab), f"{lab} users on {x.value}"))
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
    if facts.start is not None and facts.end is not None:
        derived.append(((facts.end - facts.start).total_seconds() / 86400, "days in the range"))
    # "two minutes apart", "within an hour": gaps between the top events as the text may say.
    stamps = sorted(e.ts for e in facts.top_events)
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]
    if stamps:
        gaps.append((stamps[-1] - stamps[0]).total_seconds())
    for gap in gaps:
        derived += [(gap, "seconds between top events"), (gap / 60, "minutes between top events")]
        derived.append((gap / 3600, "hours between top events"))
    numbers += [_Number(float(v), s) for v, s in derived if math.isfinite(v)]

    vocabulary = list(facts.vocabulary or DEMO_EVENT_TYPES)
    event_words: dict[str, str] = {}
    for e in facts.top_events:
        event_words.setdefault(e.event_type.lower(), f"event {e.event_id}")
        for part in re.split(r"[_\-\s]+", e.event_type.lower()):
            event_words.setdefault(part, f"part of {e.event_type}")
        vocabulary.append(e.event_type)
    for name in [p.name for p in facts.peer_stats] + [e.top_field for e in facts.top_events]:
        for part in re.split(r"[_\-\s]+", name.lower()):
            event_words.setdefault(part, f"in {name!r}")

    shapes: list[tuple[re.Pattern[str], str]] = []
    id_values: list[tuple[str, str]] = [(facts.user_id, "user id")]
    id_values += [(u, "user id") for u in all_linked]
    id_values += [(x.value, _KIND_WORDS.get(x.kind, x.kind)) for x in facts.linked]
    for e in facts.top_events:
        id_values += [(v, k) for k, v in e.fields.items() if k in _ID_FIELDS]
    for value, what in id_values:
        shape = _id_shape(value)
        if shape is not None and shape.pattern not in {s.pattern for s, _ in shapes}:
            shapes.append((shape, what))
    return _Evidence(
        strings=strings,
        numbers=numbers,
        times=times,
        event_ids={e.event_id for e in facts.top_events},
        event_words=event_words,
        vocabulary=sorted(set(vocabulary), key=len, reverse=True),
        shapes=shapes,
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


class _Scanner:
    """Walks the text once per token kind, masking what it has judged so later, looser
    patterns (bare numbers) never see the digits inside an id, an IP or a time."""

    def __init__(self, text: str, ev: _Evidence) -> None:
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

    # -- numbers --

    def number(
        self, token: str, value: float, unit: float, sig: int, decimals: int, scale: str
    ) -> None:
        """scale: "" for a bare figure, "%" for a percentage, "th" for an ordinal ("99th
        percentile"). Only the last two may read a share (0.94) as a hundredth (94): a bare
        94 against any share would let most small integers through."""
        exact = [n for n in self.ev.numbers if abs(n.value - value) < 1e-9]
        for n in exact + self.ev.numbers:
            if scale and _matches(value / 100, unit / 100, sig, decimals + 2, n.value):
                self.ok(token, n.source)
                return
            # A percentage may also be a statistic already kept in percent (above 1.5).
            direct = scale != "%" or abs(n.value) > 1.5
            if direct and _matches(value, unit, sig, decimals, n.value):
                self.ok(token, n.source)
                return
        self.bad(token, "number not in the facts")


def _in_facts_time(ev: _Evidence, **parts: int) -> datetime | None:
    for t in ev.times:
        if all(getattr(t, k) == v for k, v in parts.items()):
            return t
    return None


def check_grounding(text: str, facts: Facts) -> GroundingReport:
    """Is every number, date, time, event type, user id and entity in ``text`` in the facts?"""
    ev = _evidence(facts)
    s = _Scanner(text, ev)

    # 1. Literal strings of the facts (ids, entity values, labels, field values, model id).
    for value in sorted(ev.strings, key=len, reverse=True):
        if len(value) < 2:
            continue
        pattern = r"(?<![\w.])" + re.escape(value) + r"(?![\w]|\.\d)"
        s.take(pattern, lambda m, v=value: s.ok(m.group(0), ev.strings[v]), re.IGNORECASE)

    # 2. Event references: "event 123456", "event id 123456", "#123456" (not "event 2024-03-05").
    def event_ref(m: re.Match[str]) -> None:
        if int(m.group(1)) in ev.event_ids:
            s.ok(m.group(0), "event id")
        else:
            s.bad(m.group(0), "event id not among the facts' events")

    not_a_date = r"\b(?![-:./]\d)"
    event_word = r"\bevent(?:[ _-]?id)?\s*(?:#|no\.|number)?\s*(\d+)"
    s.take(event_word + not_a_date, event_ref, re.IGNORECASE)
    s.take(r"(?<![\w&])#(\d+)" + not_a_date, event_ref)

    # 3. Identifiers: IP addresses, the id shapes present in the facts, generic id shapes.
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

    # 4. Event types: the data's vocabulary, and anything snake_case.
    for etype in ev.vocabulary:
        words = [re.escape(w) for w in re.split(r"[_\-\s]+", etype.lower()) if w]
        if not words:
            continue
        pattern = r"(?<![\w])['\"`]?" + r"[_\-\s]?".join(words) + r"(?:s|es|d|ed|ing)?['\"`]?"
        pattern += r"(?![\w])(\s+events?\b)?"
        s.take(pattern, _event_type_judge(s, ev, etype), re.IGNORECASE)
    s.take(
        r"(?<![\w])[a-z]+(?:_[a-z0-9]+)+(?![\w])",
        lambda m: s.bad(m.group(0), "looks like an event type or field not in the facts"),
    )

    # 5. Dates and times.
    def iso(m: re.Match[str]) -> None:
        y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
        parts = {"year": y, "month": mo, "day": d}
        if m.group(4) is not None:
            parts |= {"hour": int(m.group(4)), "minute": int(m.group(5))}
            if m.group(6) is not None:
                parts["second"] = int(m.group(6))
        hit = _in_facts_time(ev, **parts)
        if hit:
            s.ok(m.group(0), f"time {hit.isoformat()}")
        else:
            s.bad(m.group(0), "date/time matches no time in the facts")

    s.take(r"\b(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?\b", iso)

    def named_date(m: re.Match[str]) -> None:
        g = m.groupdict()
        parts = {"month": _MONTHS[(g["m1"] or g["m2"]).lower().rstrip(".")]}
        day = g["d1"] or g["d2"]
        if day:
            parts["day"] = int(day)
        if g["y"]:
            parts["year"] = int(g["y"])
        hit = _in_facts_time(ev, **parts)
        if hit:
            s.ok(m.group(0), f"date {hit:%Y-%m-%d}")
        else:
            s.bad(m.group(0), "date matches no time in the facts")

    month = rf"(?:{_MONTH_RE})\.?"
    s.take(
        rf"\b(?:(?P<m1>{month})\s+(?P<d1>\d{{1,2}})(?:st|nd|rd|th)?\b"
        rf"|(?P<d2>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<m2>{month}))"
        r"(?:,?\s+(?P<y>\d{4})\b)?",
        named_date,
        re.IGNORECASE,
    )
    s.take(
        rf"\b(?P<m1>(?:{_MONTH_RE})\.?)\s+(?P<y>\d{{4}})\b(?P<m2>)(?P<d1>)(?P<d2>)",
        named_date,
        re.IGNORECASE,
    )
    # A capitalised month name alone ("in April"); "May" and "March" are also English words.
    s.take(
        r"\b(?P<m1>January|February|April|June|July|August|September|October|November|"
        r"December)\b(?P<m2>)(?P<d1>)(?P<d2>)(?P<y>)",
        named_date,
    )

    def slash_date(m: re.Match[str]) -> None:
        a, b = int(m.group(1)), int(m.group(2))
        year = {"year": int(m.group(3))} if m.group(3) and len(m.group(3)) == 4 else {}
        hit = _in_facts_time(ev, month=a, day=b, **year) or _in_facts_time(
            ev, month=b, day=a, **year
        )
        if hit:
            s.ok(m.group(0), f"date {hit:%Y-%m-%d}")
        else:
            s.bad(m.group(0), "date matches no time in the facts")

    s.take(r"(?<![\w/.])(\d{1,2})/(\d{1,2})(?:/(\d{4}|\d{2}))?(?![\w/])", slash_date)

    def weekday(m: re.Match[str]) -> None:
        day = _WEEKDAYS[m.group(0).lower().rstrip("s")]
        hit = next((t for t in ev.times if t.weekday() == day), None)
        if hit:
            s.ok(m.group(0), f"weekday of {hit:%Y-%m-%d}")
        else:
            s.bad(m.group(0), "weekday matches no date in the facts")

    s.take(r"\b(?:" + "|".join(_WEEKDAYS) + r")s?\b", weekday, re.IGNORECASE)

    def clock(m: re.Match[str]) -> None:
        hour, minute = int(m.group(1)), m.group(2)
        ampm = (m.group(4) or "").lower().replace(".", "")
        if ampm == "pm" and hour < 12:
            hour += 12
        if ampm == "am" and hour == 12:
            hour = 0
        parts = {"hour": hour}
        if minute:
            parts["minute"] = int(minute)
            if m.group(3):
                parts["second"] = int(m.group(3))
        hit = _in_facts_time(ev, **parts)
        if hit:
            s.ok(m.group(0), f"time {hit.isoformat()}")
        else:
            s.bad(m.group(0), "time of day matches no time in the facts")

    s.take(
        r"(?<![\w:.])(\d{1,2}):(\d{2})(?::(\d{2}))?(?:\s*([ap]\.?m\.?)(?![\w]))?(?![\w:])",
        clock,
        re.IGNORECASE,
    )
    s.take(r"(?<![\w:.])(\d{1,2})()()\s*([ap]\.?m\.?)(?![\w])", clock, re.IGNORECASE)

    # 6. Numbers: digits (with separators, decimals, %, ordinals) and spelled-out counts.
    def digits(m: re.Match[str]) -> None:
        raw, suffix = m.group(1), (m.group(2) or "").strip().lower()
        unit, sig = _number_unit(raw)
        decimals = len(raw.split(".")[1]) if "." in raw else 0
        value = float(raw.replace(",", ""))
        scale = "%" if suffix in ("%", "percent") else ("th" if suffix else "")
        s.number(m.group(0).strip(), value, unit, sig, decimals, scale)

    s.take(
        r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
        r"(\s?%|\s?percent\b|(?:st|nd|rd|th)\b)?",
        digits,
        re.IGNORECASE,
    )
    s.take(
        r"\b(" + "|".join(_SPELLED) + r")\b",
        lambda m: s.number(m.group(0), float(_SPELLED[m.group(1).lower()]), 1.0, 1, 0, ""),
        re.IGNORECASE,
    )
    return GroundingReport(grounded=not s.problems, problems=s.problems, cited=s.cited)


def _event_type_judge(s: _Scanner, ev: _Evidence, etype: str) -> Any:
    key = etype.lower()

    def judge(m: re.Match[str]) -> None:
        token = m.group(0).strip()
        words = [w for w in re.split(r"[_\-\s]+", key) if w]
        if key in ev.event_words or (len(words) == 1 and words[0] in ev.event_words):
            s.ok(token, ev.event_words.get(key) or ev.event_words[words[0]])
            return
        quoted = token[:1] in "'\"`"
        if key in _AMBIGUOUS_TYPES and not (quoted or m.group(1)):
            return  # everyday English ("needs review"), not a claim about an event
        s.bad(token, "event type not among the facts' events")

    return judge


# -- narrate -------------------------------------------------------------------------------------

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


CacheKey = tuple[str, str, datetime | None, datetime | None, str]


class SummaryCache:
    """Thread-safe bounded LRU of summaries, keyed by (model, user, range, backend)."""

    def __init__(self, maxsize: int = 256) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self._data: OrderedDict[CacheKey, Summary] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(facts: Facts, backend: str) -> CacheKey:
        return (facts.model_id, facts.user_id, facts.start, facts.end, backend)

    def get(self, key: CacheKey) -> Summary | None:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: CacheKey, summary: Summary) -> None:
        with self._lock:
            self._data[key] = summary
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
    key = SummaryCache.key(facts, narrator.name)
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
            return summary  # a failure: not cached, so the next request tries again
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
