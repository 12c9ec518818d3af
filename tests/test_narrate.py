"""core.narrate: the grounding check against hand-written hallucinations and paraphrases, the
template on random facts, and the two LLM backends end to end (a tiny random causal LM built
here; a stub OpenAI-compatible HTTP server on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core.narrate as narrate_module
from core.aggregate_model import describe_feature, feature_event_type
from core.config import Settings
from core.narrate import (
    FAILURE_RETRY_S,
    AccountSignal,
    CounterfactualFact,
    EventFact,
    Facts,
    GroupFact,
    HFLocalNarrator,
    LinkedEntity,
    OpenAICompatibleNarrator,
    PeerStat,
    SummaryCache,
    TemplateNarrator,
    behaviour_sentence,
    build_prompt,
    build_prompt_text,
    check_grounding,
    counterfactual_sentence,
    facts_text,
    make_narrator,
    narrate,
    narrator_identity,
)
from core.pseudonym import Pseudonyms
from core.schema import DEMO_EVENT_TYPES


def make_facts(**changes: Any) -> Facts:
    facts = Facts(
        user_id="u0042",
        model_id="tiny-20241122-101500-123456",
        start=datetime(2024, 3, 1),
        end=datetime(2024, 3, 20, 23, 59),
        n_events=212,
        score=0.9372,
        percentile=0.993,
        threshold=0.8,
        top_events=(
            EventFact(
                9001,
                datetime(2024, 3, 5, 14, 22, 5),
                "purchase",
                0.41,
                {
                    "category": "electronics",
                    "price": "1299.00",
                    "device_id": "d0012",
                    "ip": "10.1.2.3",
                    "country": "DE",
                    "card_id": "card_9f3a0b12",
                },
                "price",
            ),
            EventFact(
                9000,
                datetime(2024, 3, 5, 14, 20),
                "login",
                0.22,
                {"device_id": "d0012", "ip": "10.1.2.3", "country": "DE"},
                "new device",
            ),
            EventFact(
                9002,
                datetime(2024, 3, 5, 14, 23, 40),
                "payment_failed",
                0.09,
                {"card_id": "card_77aa0001"},
                "time gap",
            ),
        ),
        counterfactual=CounterfactualFact(3, 0.9372, 0.21, 0.91),
        linked=(
            LinkedEntity(
                "device_id",
                "d0012",
                ("u0007", "u0019", "u0033"),
                {"u0007": "fraud", "u0019": "legit"},
            ),
        ),
        peer_stats=(
            PeerStat("events per active day", 41.333, 4.2, 12.0),
            PeerStat("distinct devices", 7, 1, 2),
            PeerStat("purchase share", 0.1, 0.2, 0.5),
        ),
    )
    return replace(facts, **changes)


FACTS = make_facts()


# -- facts --------------------------------------------------------------------------------------


def test_facts_round_trip_through_json() -> None:
    data = json.loads(json.dumps(FACTS.to_dict()))
    assert data["top_events"][0]["ts"] == "2024-03-05T14:22:05"
    assert Facts.from_dict(data) == FACTS
    assert FACTS.above_threshold
    assert not make_facts(score=0.5).above_threshold


def test_prompt_carries_the_facts_and_the_rules() -> None:
    messages = build_prompt(FACTS)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "4 to 6 sentences" in messages[0]["content"]
    user = messages[1]["content"]
    for token in ("u0042", "0.94", "1299.00", "d0012", "u0007 (fraud)", "2024-03-05 14:22:05"):
        assert token in user
    text = build_prompt_text(FACTS)
    assert messages[0]["content"] in text and text.endswith("Summary:")


# -- grounding check ----------------------------------------------------------------------------

HALLUCINATIONS = {
    "wrong amount": ("The purchase of 1,499.00 drove the score.", "1,499.00"),
    "wrong amount, no decimals": ("A purchase of $1350 stands out.", "1350"),
    "invented device": ("The login came from device d0099, new to the account.", "d0099"),
    "invented device, other shape": ("The login came from dev-123.", "dev-123"),
    "invented card": ("It was paid with card_deadbeef.", "card_deadbeef"),
    "invented ip": ("The IP 10.1.2.4 is shared with u0007.", "10.1.2.4"),
    "wrong time": ("The purchase at 14:27 weighs most.", "14:27"),
    "wrong time, 12-hour": ("The purchase at 3:22 pm weighs most.", "3:22 pm"),
    "wrong timestamp": ("On 2024-03-05 15:22 the user bought electronics.", "2024-03-05 15:22"),
    "wrong date": ("On March 7 the user bought electronics.", "March 7"),
    "wrong weekday": ("On Sunday the user bought electronics.", "Sunday"),
    "invented user": ("Device d0012 is also used by u0999, labelled fraud.", "u0999"),
    "wrong percentile": ("The user scores above 97% of users.", "97%"),
    "wrong percentile, ordinal": ("The user sits at the 90th percentile.", "90"),
    "wrong score": ("The score is 0.87.", "0.87"),
    "wrong counterfactual": ("Without them the score falls to 0.45.", "0.45"),
    "invented count": ("The user logged in 17 times that day.", "17"),
    "invented gap": ("The failed payment came 80 seconds after the purchase.", "80"),
    "invented spelled count": ("There were eleven logins.", "eleven"),
    "invented event id": ("Event 9005 carried the most weight.", "Event 9005"),
    "invented event type": ("A refund_request followed the purchase.", "refund_request"),
    "event type not in the facts": ("Several coupon redeem events came first.", "coupon redeem"),
    "event type word in event context": ("A review event preceded it.", "review"),
    # A label, a threshold side or an event time said of the wrong thing.
    "labels swapped between users": (
        "Device d0012 is shared with u0019, labelled fraud, and u0007, labelled legit.",
        "u0019",
    ),
    "label in parentheses on the wrong user": ("It shares d0012 with u0019 (fraud).", "u0019"),
    "unlabelled user said to be labelled": ("u0033 is labelled legit.", "u0033"),
    "score on the wrong side of the threshold": (
        "The score of 0.94 is below the threshold.",
        "below the threshold",
    ),
    "threshold said not to be exceeded": (
        "The score does not exceed the alert threshold.",
        "exceed the alert threshold",
    ),
    "time of another event": ("The login at 14:22 came from a new device.", "login at 14:22"),
    # Everyday words used as event claims, and common fraud events the facts lack.
    "payment after an article": ("A payment followed the purchase.", "payment"),
    "made a return": ("The user then made a return.", "return"),
    "plural returns": ("There were three returns before it.", "returns"),
    "refund": ("A refund followed the purchase.", "refund"),
    "chargeback": ("A chargeback came next.", "chargeback"),
    "password reset": ("A password reset preceded the login.", "password reset"),
    "gift card purchase": ("The gift card purchase at 14:22 stands out.", "gift card purchase"),
    # Entities beyond ids.
    "country code": ("The login came from RU.", "RU"),
    "country name": ("The purchase was made from Brazil.", "Brazil"),
    "email": ("The account uses jane.doe@example.com.", "jane.doe@example.com"),
    "url": ("See https://evil.example/x for details.", "https://evil.example/x"),
    "id after a kind word": ("It also used device x7f3k.", "x7f3k"),
    "numeric account id": ("It is linked to account 42.", "account 42"),
    "id without digits, capitalised": ("It also used device ABC.", "device ABC"),
    "a name for a user": ("The device is shared with user Mallory.", "user Mallory"),
    "a user named": ("A user named bob shares the card.", "named bob"),
    "quoted id": ("The login came from device 'tablet'.", "tablet"),
    "ip address that is a word": ("It came from IP address unknown-host.", "unknown-host"),
    "category not in the facts": ("It bought in the jewelry category.", "jewelry category"),
    "quoted category": ("Purchases in category 'jewelry' dominate.", "jewelry"),
    # Numbers in other clothes.
    "scaled amount": ("A purchase of $1.5k stands out.", "$1.5k"),
    "millions": ("It spent 2 million on electronics.", "2 million"),
    "compound spelled number": ("There were twenty-one logins.", "twenty-one"),
    "event id without the word event": ("#9001 weighs most.", "9001"),
    "time gap without a unit": ("A gap of 125 separates the login and the purchase.", "125"),
    "amount that is not a price": ("It paid 212 for electronics.", "212"),
    # Dates and times in other formats.
    "slashed date": ("On 2024/03/07 the user bought electronics.", "2024/03/07"),
    "dotted date": ("On 07.03.2024 the user bought electronics.", "07.03.2024"),
    "midnight": ("At midnight the user bought electronics.", "midnight"),
    "yesterday": ("Yesterday the user bought electronics.", "Yesterday"),
    "last night": ("Last night the user bought electronics.", "Last night"),
}


@pytest.mark.parametrize("name", list(HALLUCINATIONS))
def test_each_hallucination_is_caught_and_named(name: str) -> None:
    text, token = HALLUCINATIONS[name]
    report = check_grounding(text, FACTS)
    assert not report.grounded
    assert any(token in problem for problem in report.problems), report.problems


PARAPHRASES = [
    "u0042 scores 0.94 against a threshold of 0.8, above 99.3% of users. The purchase at 14:22 "
    "on March 5 (price 1,299.00, about 41% of the attribution) and the login from new device "
    "d0012 weigh most.",
    "Removing the top 3 events drops the score from 0.94 to 0.21, while removing three random "
    "events leaves it at 0.91, a drop of 0.73 against almost none. Device d0012 is shared with "
    "u0007 (fraud), u0019 (legit) and u0033.",
    "The account averages 41.3 events per active day against a median of 4.2 and a 95th "
    "percentile of 12; it used 7 distinct devices where the median user uses 1.",
    "Over 212 events between 2024-03-01 and 2024-03-20, the payment_failed event at 2:23 pm "
    "and the purchase of $1299 stand out. The case needs review: check IP 10.1.2.3 and "
    "card card_9f3a0b12.",
    "Event 9001, a purchase on Tuesday 5 March 2024 at 14:22:05, is the top event (9% for the "
    "failed payment). Its purchase share is 0.1 (median 0.2), so purchases are not unusual.",
    "The score is 94%, in the 99th percentile; the model tiny-20241122-101500-123456 flags it.",
    "It sits in the top 1% of users; the login came two minutes before the purchase.",
    "Device d0012 is shared with u0019, labelled legit, and u0007, a known fraudster; u0033 is "
    "unlabelled and u0019 is not fraud.",
    "The score of 0.94 is above the alert threshold; without the top 3 events it falls to 0.21, "
    "below the threshold.",
    "The login at 14:20 was followed by the purchase at 14:22 and the failed payment at 14:23.",
    "The login and the purchase came from DE (Germany) on 2024/03/05 (05.03.2024), 125 seconds "
    "apart, over a range of 20 days.",
    "The electronics category dominates; the device ID is new, the user IDs differ and the IP "
    "address 10.1.2.3 is shared, as is user id u0042's card in the same category.",
    "It spent $1.3k on electronics across two hundred and twelve events. The case needs review "
    "before the payment method is blocked; in return the analyst keeps the evidence.",
]


@pytest.mark.parametrize("text", PARAPHRASES)
def test_faithful_paraphrases_pass(text: str) -> None:
    report = check_grounding(text, FACTS)
    assert report.grounded, report.problems
    assert report.cited  # it did look at the tokens


def test_rounding_is_tolerated_but_not_stretched() -> None:
    assert check_grounding("Scores 0.9372, 0.94, 0.9 and 94%.", FACTS).grounded
    # No value among these facts rounds to 1 ("1" for a percentile of 0.993 would be fair).
    facts = make_facts(peer_stats=(), linked=(), percentile=None)
    assert check_grounding("The score is 0.94.", facts).grounded
    report = check_grounding("The score is 1.", facts)
    assert not report.grounded and "'1'" in report.problems[0]


def test_event_types_the_data_lacks_are_claims_too() -> None:
    text = "A chargeback followed the purchase."
    # Neither a demo event type nor in the data's vocabulary: still an event the facts lack.
    for facts in (FACTS, make_facts(vocabulary=("purchase", "chargeback"))):
        report = check_grounding(text, facts)
        assert not report.grounded and "chargeback" in report.problems[0]
    pays = make_facts(vocabulary=("purchase", "payment", "chargeback"))
    assert check_grounding("The payment method is new; it needs review.", pays).grounded


def test_only_whole_event_types_are_whitelisted() -> None:
    failed = replace(FACTS.top_events[1], event_type="login_failed")
    facts = make_facts(top_events=(FACTS.top_events[0], failed))
    assert check_grounding("A failed login came before the purchase.", facts).grounded
    assert check_grounding("The login_failed event came first.", facts).grounded
    report = check_grounding("The login came before the purchase.", facts)
    assert not report.grounded and "'login'" in report.problems[0]
    report = check_grounding("Three logins came first.", facts)
    assert not report.grounded and "'logins'" in report.problems[-1]


def test_logged_free_text_whitelists_whole_tokens_only() -> None:
    odd = "toys refund u0999 at 03:00"  # a category as the logs might carry it
    event = replace(FACTS.top_events[0], fields={**FACTS.top_events[0].fields, "category": odd})
    event = replace(event, top_field="category")
    facts = make_facts(top_events=(event, *FACTS.top_events[1:]))
    report = check_grounding(f"It bought {odd}.", facts)
    assert not report.grounded
    for token in ("refund", "u0999", "03:00"):
        assert any(token in p for p in report.problems), report.problems
    assert check_grounding("It bought electronics with card card_9f3a0b12.", FACTS).grounded
    # The template does not quote such text either, and stays grounded.
    text = TemplateNarrator().generate(facts)
    assert odd not in text and "purchase (41%, driven by category)" in text
    assert check_grounding(text, facts).grounded


# -- template -----------------------------------------------------------------------------------


def test_counterfactual_sentence_says_stays_at_and_keeps_close_scores_apart() -> None:
    assert counterfactual_sentence(CounterfactualFact(3, 0.5, 0.5, 0.5)) == (
        "Without these 3 events the score stays at 0.50; without 3 random events it stays at 0.50."
    )
    assert counterfactual_sentence(CounterfactualFact(2, 0.5001, 0.4998, 0.5)).startswith(
        "Without these 2 events the score stays at 0.50;"
    )
    close = CounterfactualFact(3, 0.504, 0.501, 0.2)
    sentence = counterfactual_sentence(close)
    assert sentence == (
        "Without these 3 events the score falls from 0.504 to 0.501; "
        "without 3 random events it falls to 0.20."
    )
    assert check_grounding(sentence, make_facts(score=0.504, counterfactual=close)).grounded


def test_counterfactual_sentence_shape() -> None:
    assert counterfactual_sentence(CounterfactualFact(3, 0.94, 0.21, 0.91)) == (
        "Without these 3 events the score falls from 0.94 to 0.21; "
        "without 3 random events it stays at 0.91."
    )
    assert counterfactual_sentence(CounterfactualFact(5, 0.94, 0.21, 0.60)).endswith(
        "without 5 random events it falls to 0.60."
    )
    assert counterfactual_sentence(CounterfactualFact(1, 0.5, 0.6, 0.7)) == (
        "Without these 1 event the score rises from 0.50 to 0.60; "
        "without 1 random event it rises to 0.70."
    )


def test_counterfactual_ladder_says_how_many_events_carry_the_score() -> None:
    spread = CounterfactualFact(5, 0.97, 0.95, 0.96, ladder=((10, 0.93), (20, 0.62)), threshold=0.9)
    assert counterfactual_sentence(spread).endswith(
        " Only without the 20 top-ranked events does it fall to 0.62, under the alert"
        " threshold of 0.90: the evidence is spread over many events."
    )
    everywhere = replace(spread, ladder=((10, 0.96), (20, 0.94)))
    assert counterfactual_sentence(everywhere).endswith(
        " Even without the 20 top-ranked events it is 0.94, still above the alert"
        " threshold of 0.90: the evidence is spread over most of the window."
    )
    # Nothing to add when the k events already bring it under, or it was never above.
    for fact in (replace(spread, score_without_top=0.3), replace(spread, score_before=0.5)):
        assert "alert threshold" not in counterfactual_sentence(fact)
    assert "alert threshold" not in counterfactual_sentence(replace(spread, threshold=None))
    facts = make_facts(score=0.97, threshold=0.9, counterfactual=spread)
    text = TemplateNarrator().generate(facts)
    assert "Only without the 20 top-ranked events does it fall to 0.62" in text
    assert check_grounding(text, facts).grounded
    wrong = text.replace("the 20 top-ranked", "the 30 top-ranked")
    assert not check_grounding(wrong, facts).grounded
    assert Facts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts


def test_template_says_what_an_analyst_needs() -> None:
    text = TemplateNarrator().generate(FACTS)
    assert text.startswith("User u0042 scores 0.94, above the alert threshold of 0.80")
    # The percentile ranks the unsupervised score, not the (combined) score beside it.
    assert "Its unsupervised percentile is 99%: more unusual than 99% of training users." in text
    assert "higher than" not in text
    assert "2024-03-05 14:22 purchase (41%, driven by price 1299.00)" in text
    assert "login (22%, driven by new device d0012)" in text
    assert counterfactual_sentence(FACTS.counterfactual) in text
    assert "u0007 (fraud), u0019 (legit), u0033 (unlabelled)" in text
    assert "events per active day is 41.33 (median 4.20, 95th percentile 12)" in text
    assert "purchase share" not in text  # within range: not worth a sentence
    assert check_grounding(text, FACTS).grounded


def test_prompt_names_the_unsupervised_percentile() -> None:
    user = build_prompt(FACTS)[1]["content"]
    assert "unsupervised percentile: 99% (its behaviour is more unusual than 99% of" in user
    assert "of users score lower" not in user
    assert "unsupervised percentile" in build_prompt(FACTS)[0]["content"]


def test_template_keeps_a_score_and_threshold_that_round_alike_apart() -> None:
    text = TemplateNarrator().generate(make_facts(score=0.4996, threshold=0.5))
    assert "scores 0.4996, below the alert threshold of 0.5000" in text


def test_linked_entity_total_users() -> None:
    many = LinkedEntity("ip", "10.1.2.3", ("u0007", "u0019"), {"u0007": "fraud"}, n_users=30)
    facts = make_facts(linked=(many,))
    text = TemplateNarrator().generate(facts)
    assert "IP 10.1.2.3 is shared with 30 other accounts including: u0007 (fraud)" in text
    assert check_grounding(text, facts).grounded
    assert "30 other users in all" in build_prompt(facts)[1]["content"]
    data = json.loads(json.dumps(facts.to_dict()))
    assert data["linked"][0]["n_users"] == 30 and Facts.from_dict(data) == facts
    del data["linked"][0]["n_users"]  # a kept explanation from before the field existed
    old = Facts.from_dict(data).linked[0]
    assert old.n_users is None and old.total_users == 2
    assert "shared with 2 other accounts:" in TemplateNarrator().generate(
        replace(facts, linked=(old,))
    )


ids = st.integers(0, 99_999)
# User ids as real logs write them, not only as the demo does: numeric (RetailRocket's
# visitorid), UUIDs, hashes, prefixed keys and emails.
user_ids = st.one_of(
    ids.map(lambda i: f"u{i:05d}"),
    ids.map(str),
    st.uuids().map(str),
    st.integers(2**36, 2**40).map(lambda i: f"{i:x}"),
    ids.map(lambda i: f"cust_{i}"),
    ids.map(lambda i: f"shopper{i}@example.com"),
)
times = st.datetimes(datetime(2015, 1, 1), datetime(2035, 1, 1)).map(
    lambda t: t.replace(microsecond=0)
)
unit = st.floats(0, 1, allow_nan=False)
amount = st.floats(0, 1e6, allow_nan=False)
FIELD_LABELS = ["event type", "category", "price", "time gap", "hour of day", "new device"]
FIELD_LABELS += ["new IP", "new country", "new card", "device seen before", "card seen before", ""]


@st.composite
def event_fields(draw: st.DrawFn) -> dict[str, str]:
    every = {
        "category": draw(
            st.sampled_from(
                ["electronics", "gift cards", "toys", "home & garden", "Brazil nuts", "refund 7"]
            )
        ),
        "price": f"{draw(amount):.2f}",
        "device_id": f"d{draw(ids):04d}",
        "ip": ".".join(str(draw(st.integers(1, 254))) for _ in range(4)),
        "country": draw(st.sampled_from(["DE", "US", "IN", "GB", "FR"])),
        "card_id": f"card_{draw(st.integers(0, 2**32 - 1)):08x}",
        "session_id": f"s{draw(ids):08d}",
    }
    keep = draw(st.lists(st.sampled_from(sorted(every)), unique=True))
    return {k: every[k] for k in keep}


@st.composite
def random_facts(draw: st.DrawFn) -> Facts:
    top = tuple(
        EventFact(
            draw(st.integers(0, 10**9)),
            draw(times),
            draw(st.sampled_from(DEMO_EVENT_TYPES)),
            draw(unit),
            draw(event_fields()),
            draw(st.sampled_from(FIELD_LABELS)),
        )
        for _ in range(draw(st.integers(0, 6)))
    )
    linked = []
    for _ in range(draw(st.integers(0, 3))):
        names = tuple(draw(st.lists(user_ids, min_size=1, max_size=7, unique=True)))
        labelled = draw(st.lists(st.sampled_from(names), unique=True))
        kind = draw(st.sampled_from(["device_id", "ip", "card_id"]))
        value = {"device_id": f"d{draw(ids):04d}", "ip": f"10.0.{draw(ids) % 250}.7"}.get(
            kind, f"card_{draw(ids):08x}"
        )
        labels = {u: draw(st.sampled_from(["fraud", "legit", "unsure"])) for u in labelled}
        total = draw(st.none() | st.integers(len(names), len(names) + 500))
        linked.append(LinkedEntity(kind, value, names, labels, total))
    peers = tuple(
        PeerStat(name, draw(amount), draw(amount), draw(amount))
        for name in draw(
            st.lists(
                st.sampled_from(["events per active day", "purchase share", "distinct devices"]),
                unique=True,
            )
        )
    )
    features = [
        "price_mean",
        "price_std",
        "rate__payment_failed",
        "count__return",
        "distinct_payment_id",
        "distinct_device_id",
        "return_ratio",
        "gap_share_lt_2s",
        "events_per_active_hour",
    ]
    signals = tuple(
        AccountSignal(
            describe_feature(name),
            draw(amount),
            draw(st.none() | amount),
            feature_event_type(name),
        )
        for name in draw(st.lists(st.sampled_from(features), unique=True, max_size=5))
    )
    start = draw(st.none() | times)
    cf = draw(st.none() | st.builds(CounterfactualFact, st.integers(1, 10), unit, unit, unit))
    threshold = draw(unit)
    if cf is not None and draw(st.booleans()):
        ladder = tuple((cf.k * 2**i, draw(unit)) for i in range(1, draw(st.integers(1, 4)) + 1))
        cf = replace(cf, ladder=ladder, threshold=threshold)
    if cf is not None and draw(st.booleans()):
        cf = replace(cf, window_events=draw(st.integers(2, 512)))
    behaviour = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["event type", "session"]))
        key = (
            draw(st.sampled_from(DEMO_EVENT_TYPES)) if kind == "event type" else f"s{draw(ids):08d}"
        )
        first, last = sorted((draw(times), draw(times)))
        behaviour.append(
            GroupFact(
                kind,
                key,
                draw(st.integers(1, 5000)),
                draw(unit),
                first,
                last,
                draw(st.none() | unit),
            )
        )
    return Facts(
        user_id=draw(user_ids),
        model_id=f"tiny-{draw(ids)}",
        start=start,
        end=None if start is None else draw(times.filter(lambda t: t >= start)),
        n_events=draw(st.integers(0, 2_000_000)),
        score=draw(unit),
        percentile=draw(st.none() | unit),
        threshold=threshold,
        top_events=top,
        counterfactual=cf,
        linked=tuple(linked),
        peer_stats=peers,
        account_probability=draw(st.none() | unit) if signals else None,
        account_signals=signals,
        behaviour=tuple(behaviour),
    )


INVENTIONS = [
    "It also used device d99999999.",
    "The IP 203.0.113.99 appears too.",
    "The amount was 123456.789.",
    "A refund_request came last.",
    "It is shared with u99999999.",
    "User 987654321 used the same card.",
]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(facts=random_facts(), invention=st.sampled_from(INVENTIONS))
def test_template_is_grounded_on_random_facts_and_an_invention_is_not(
    facts: Facts, invention: str
) -> None:
    text = TemplateNarrator().generate(facts)
    report = check_grounding(text, facts)
    assert report.grounded, (text, report.problems)
    assert Facts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
    assert not check_grounding(f"{text} {invention}", facts).grounded


# -- narrate, cache, settings -------------------------------------------------------------------


class FixedNarrator:
    def __init__(self, name: str, answer: str | Exception) -> None:
        self.name = name
        self.answer = answer
        self.calls = 0

    def generate(self, facts: Facts) -> str:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_grounded_backend_text_is_shown_as_is_and_cached() -> None:
    narrator = FixedNarrator("openai-compatible", PARAPHRASES[0])
    cache = SummaryCache(maxsize=2)
    summary = narrate(FACTS, narrator, cache=cache)
    assert (summary.text, summary.backend, summary.flagged) == (
        PARAPHRASES[0],
        narrator.name,
        False,
    )
    assert summary.fallback_text is None and summary.message is None
    assert narrate(FACTS, narrator, cache=cache) is summary
    assert narrator.calls == 1
    # Another user, another range, another backend: separate entries; the oldest is evicted.
    narrate(make_facts(user_id="u0007"), narrator, cache=cache)
    narrate(make_facts(end=datetime(2024, 3, 10)), narrator, cache=cache)
    assert len(cache) == 2 and narrator.calls == 3
    narrate(FACTS, narrator, cache=cache)
    assert narrator.calls == 4


def test_cache_keys_on_the_facts_and_on_which_model_or_endpoint_wrote() -> None:
    cache = SummaryCache()
    template = TemplateNarrator()
    first = narrate(FACTS, template, cache=cache)
    assert narrate(make_facts(), template, cache=cache) is first
    stricter = narrate(make_facts(threshold=0.95), template, cache=cache)
    assert "below the alert threshold of 0.95" in stricter.text
    relabelled = replace(FACTS.linked[0], labels={"u0007": "legit", "u0019": "legit"})
    summary = narrate(make_facts(linked=(relabelled,)), template, cache=cache)
    assert "u0007 (legit)" in summary.text and "u0007 (fraud)" in first.text
    assert len(cache) == 3

    # Two endpoints behind one backend name: separate entries; a secret is no part of a key.
    a = OpenAICompatibleNarrator("http://h:1/v1?api-version=2&api-key=SECRET", "m1", "sk-1")
    b = OpenAICompatibleNarrator("http://h:1/v1?api-version=2&api-key=SECRET", "m2", "sk-1")
    ka, kb = SummaryCache.key(FACTS, a), SummaryCache.key(FACTS, b)
    assert ka != kb and ka == SummaryCache.key(FACTS, replace(a, api_key="sk-2"))
    assert "api-version=2" in repr(ka)
    for secret in ("SECRET", "sk-1"):
        assert secret not in repr(ka)
    hf = SummaryCache.key(FACTS, HFLocalNarrator("/models/a"))
    assert hf != SummaryCache.key(FACTS, HFLocalNarrator("/models/b"))


def test_ungrounded_text_is_flagged_with_the_template_beside_it() -> None:
    text = "u0042 scores 0.97 after a purchase at 14:25 on device d0099."
    summary = narrate(FACTS, FixedNarrator("hf-local", text))
    assert summary.flagged and summary.text == text and summary.backend == "hf-local"
    assert summary.fallback_text == TemplateNarrator().generate(FACTS)
    assert summary.message == (
        "The local model cited 3 values not in the evidence; "
        "the template summary is shown beside it."
    )
    assert summary.to_dict()["flagged"] is True


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (TimeoutError("timed out after 20 s"), "x timed out after 20 s; showing the template"),
        (RuntimeError("boom"), "x failed (boom); showing the template summary."),
        (None, "x failed (returned an empty summary); showing the template summary."),
    ],
)
def test_backend_failure_falls_back_and_is_retried_after_a_minute(
    error: Exception | None, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    narrator = FixedNarrator("x", error if error is not None else "  ")
    cache = SummaryCache()
    summary = narrate(FACTS, narrator, cache=cache)
    template = TemplateNarrator().generate(FACTS)
    assert summary.text == template == summary.fallback_text
    assert summary.backend == "template" and summary.requested_backend == "x"
    assert not summary.flagged and summary.message and summary.message.startswith(message)
    # Remembered: a page rerun (any click) does not wait for a failing backend again ...
    assert narrate(FACTS, narrator, cache=cache) == summary and narrator.calls == 1
    # ... until FAILURE_RETRY_S have passed.
    now = time.monotonic()
    monkeypatch.setattr(narrate_module.time, "monotonic", lambda: now + FAILURE_RETRY_S + 1)
    narrate(FACTS, narrator, cache=cache)
    assert narrator.calls == 2


def test_summary_cache_is_thread_safe() -> None:
    cache = SummaryCache(maxsize=50)
    template = TemplateNarrator()

    def work(i: int) -> None:
        for j in range(40):
            narrate(make_facts(user_id=f"u{(i * 40 + j) % 80:04d}"), template, cache=cache)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 50


def test_settings_reach_the_narrator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert isinstance(make_narrator(Settings()), TemplateNarrator)
    monkeypatch.setenv("FRAUDLENS_LLM_BACKEND", "openai-compatible")
    monkeypatch.setenv("FRAUDLENS_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("FRAUDLENS_LLM_MODEL", "qwen")
    monkeypatch.setenv("FRAUDLENS_LLM_API_KEY", "sk-secret-123")
    monkeypatch.setenv("FRAUDLENS_LLM_TIMEOUT", "2.5")
    settings_ = Settings()
    narrator = make_narrator(settings_)
    assert isinstance(narrator, OpenAICompatibleNarrator)
    assert (narrator.base_url, narrator.model, narrator.api_key, narrator.timeout) == (
        "http://127.0.0.1:9/v1",
        "qwen",
        "sk-secret-123",
        2.5,
    )
    assert "sk-secret" not in repr(settings_) and "sk-secret" not in repr(narrator)
    monkeypatch.setenv("FRAUDLENS_LLM_BACKEND", "hf-local")
    monkeypatch.setenv("FRAUDLENS_LLM_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("FRAUDLENS_DEVICE", "cpu")
    hf = make_narrator(Settings())
    assert isinstance(hf, HFLocalNarrator) and (Path(hf.model_dir), hf.device) == (tmp_path, "cpu")
    # Deterministic, so a page may keep one narrator per settings (st.cache_resource).
    assert narrator_identity(make_narrator(Settings())) == narrator_identity(hf)
    assert narrator_identity(make_narrator(settings_)) == narrator_identity(narrator)
    assert "sk-secret" not in narrator_identity(narrator)
    monkeypatch.setenv("FRAUDLENS_LLM_BACKEND", "gpt-magic")
    with pytest.raises(ValueError, match="unknown LLM backend 'gpt-magic'"):
        make_narrator(Settings())
    monkeypatch.setenv("FRAUDLENS_LLM_BACKEND", "openai-compatible")
    monkeypatch.delenv("FRAUDLENS_LLM_BASE_URL")
    with pytest.raises(ValueError, match="FRAUDLENS_LLM_BASE_URL"):
        make_narrator(Settings())


# -- openai-compatible against a stub server ----------------------------------------------------


class StubServer:
    """An OpenAI-compatible /chat/completions that answers what the test sets."""

    def __init__(self) -> None:
        self.answer = ""
        self.delay = 0.0
        self.status = 200
        self.drip = 0.0  # seconds between single bytes of the body, when set
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, dict(self.headers), body))
                time.sleep(stub.delay)
                reply = {"choices": [{"message": {"role": "assistant", "content": stub.answer}}]}
                data = json.dumps(reply).encode()
                try:
                    self.send_response(stub.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not stub.drip:
                        self.wfile.write(data)
                    for i in range(len(data) if stub.drip else 0):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(stub.drip)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stub() -> Iterator[StubServer]:
    server = StubServer()
    yield server
    server.close()


def test_openai_compatible_good_answer_passes(stub: StubServer) -> None:
    stub.answer = PARAPHRASES[1]
    narrator = OpenAICompatibleNarrator(stub.url + "/", "local-model", api_key="sk-test-key")
    summary = narrate(FACTS, narrator)
    assert summary.backend == "openai-compatible" and not summary.flagged
    assert summary.text == PARAPHRASES[1]
    path, headers, body = stub.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test-key"
    assert body["model"] == "local-model" and body["temperature"] == 0
    # the ids went out as placeholders (core.pseudonym), the rest as the facts say
    assert body["messages"] == build_prompt(Pseudonyms().facts(FACTS), placeholders=True)


def test_openai_compatible_without_key_sends_no_authorization(stub: StubServer) -> None:
    stub.answer = PARAPHRASES[0]
    narrate(FACTS, OpenAICompatibleNarrator(stub.url, "m"))
    assert "Authorization" not in stub.requests[0][1]


def test_openai_compatible_hallucinated_number_is_flagged(stub: StubServer) -> None:
    stub.answer = PARAPHRASES[1].replace("0.21", "0.12")
    summary = narrate(FACTS, OpenAICompatibleNarrator(stub.url, "m"))
    assert summary.flagged and summary.backend == "openai-compatible"
    assert summary.grounding.problems == ["'0.12': number not in the facts"]
    assert summary.fallback_text == TemplateNarrator().generate(FACTS)
    assert summary.message and "cited 1 value not in the evidence" in summary.message


def test_openai_compatible_timeout_and_http_error_fall_back(stub: StubServer) -> None:
    stub.answer, stub.delay = PARAPHRASES[0], 1.0
    started = time.perf_counter()
    summary = narrate(FACTS, OpenAICompatibleNarrator(stub.url, "m", timeout=0.3))
    assert time.perf_counter() - started < 0.9
    assert summary.backend == "template" and summary.text == summary.fallback_text
    assert summary.message == (
        "openai-compatible timed out after 0.3 s; showing the template summary."
    )
    stub.delay, stub.status = 0.0, 500
    summary = narrate(FACTS, OpenAICompatibleNarrator(stub.url, "m", api_key="sk-hidden"))
    assert summary.backend == "template" and summary.message
    assert "HTTP 500" in summary.message and "sk-hidden" not in summary.message


def test_openai_compatible_deadline_holds_against_a_dripping_server(stub: StubServer) -> None:
    stub.answer, stub.drip = PARAPHRASES[0], 0.05  # each read returns within the timeout
    started = time.perf_counter()
    summary = narrate(FACTS, OpenAICompatibleNarrator(stub.url, "m", timeout=0.5))
    assert time.perf_counter() - started < 1.5
    assert summary.backend == "template" and summary.message == (
        "openai-compatible timed out after 0.5 s; showing the template summary."
    )


def test_openai_compatible_caps_the_answer(stub: StubServer) -> None:
    stub.answer = "x" * 300_000
    summary = narrate(FACTS, OpenAICompatibleNarrator(stub.url, "m"))
    assert summary.backend == "template" and summary.message
    assert "answered more than 256 KiB" in summary.message


def test_openai_compatible_messages_carry_no_credentials(stub: StubServer) -> None:
    stub.status = 500
    narrator = OpenAICompatibleNarrator(stub.url + "?api-key=SECRET", "m")
    summary = narrate(FACTS, narrator)
    assert summary.message and f"HTTP 500 from {stub.url}/chat/completions)" in summary.message
    assert "SECRET" not in summary.message and "SECRET" not in repr(narrator)
    assert stub.requests[-1][0] == "/v1/chat/completions?api-key=SECRET"  # still sent

    # user:password@ becomes Basic auth; neither appears in a message.
    host = stub.url.removeprefix("http://")
    narrator = OpenAICompatibleNarrator(f"http://ann:pa55word@{host}", "m")
    summary = narrate(FACTS, narrator)
    assert summary.message and "pa55word" not in summary.message and "ann" not in summary.message
    assert stub.requests[-1][1]["Authorization"] == "Basic YW5uOnBhNTV3b3Jk"
    assert "pa55word" not in repr(narrator)
    unreachable = OpenAICompatibleNarrator("http://127.0.0.1:9/v1?key=SECRET", "m", timeout=2)
    summary = narrate(FACTS, unreachable)
    assert summary.message and "cannot reach http://127.0.0.1:9/v1/chat/completions" in (
        summary.message
    )
    assert "SECRET" not in summary.message


# -- hf-local with a tiny random causal LM ------------------------------------------------------

# Every token of this vocabulary cites something the facts do not hold (an invented user,
# device, IP, card or amount), and none is special: whatever the random model generates,
# the text is non-empty and ungrounded.
INVENTED = ["u99999", "d31337", "10.9.9.9", "card_deadbeef", "8888.88", "4444", "17:17"]


def tiny_lm(path: Path, chat_template: str | None, n_positions: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(INVENTED)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="u99999"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No unk_token here: it would be special, and decoding skips special tokens.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=n_positions,
        n_layer=1,
        n_head=2,
        n_embd=16,
        bos_token_id=None,
        eos_token_id=None,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


CHAT = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}<|assistant|>"


def test_hf_local_runs_end_to_end_and_its_nonsense_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    loads: list[str] = []
    real = AutoModelForCausalLM.from_pretrained

    def counted(*args: Any, **kwargs: Any) -> Any:
        loads.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counted)
    torch.manual_seed(0)
    narrator = HFLocalNarrator(tiny_lm(tmp_path / "chat", CHAT, 1024), max_new_tokens=12)
    prompt = narrator.prompt_for(FACTS)
    assert prompt.startswith("<|system|> ") and prompt.endswith("<|assistant|>")
    assert "u0042" in prompt

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(narrator.generate(FACTS)))]
    threads.append(threading.Thread(target=lambda: results.append(narrator.generate(FACTS))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = results[0]
    assert results == [text, text]  # greedy: the same answer from both threads
    tokens = text.split()
    # Only the new tokens come back, not the prompt (hundreds of tokens).
    assert 1 <= len(tokens) <= 12 and set(tokens) <= set(INVENTED)

    summary = narrate(FACTS, narrator)
    assert summary.backend == "hf-local" and summary.text == text
    assert summary.flagged and summary.grounding.problems
    assert summary.fallback_text == TemplateNarrator().generate(FACTS)
    assert summary.message and summary.message.startswith("The local model cited")
    assert len(loads) == 1  # one load for the prompt, two threads and narrate: reused


def test_hf_local_without_chat_template_uses_plain_prompt_and_truncates(tmp_path: Path) -> None:
    narrator = HFLocalNarrator(tiny_lm(tmp_path / "plain", None, 64), max_new_tokens=8)
    assert narrator.prompt_for(FACTS) == build_prompt_text(FACTS)
    text = narrator.generate(FACTS)  # the prompt is far longer than 64 positions
    assert 1 <= len(text.split()) <= 8


def test_hf_local_missing_model_falls_back(tmp_path: Path) -> None:
    summary = narrate(FACTS, HFLocalNarrator(tmp_path / "absent"))
    assert summary.backend == "template" and summary.requested_backend == "hf-local"
    assert summary.message and "could not load a causal LM" in summary.message


def test_template_names_the_account_signals_and_a_wrong_value_is_caught() -> None:
    signals = (
        AccountSignal(describe_feature("rate__return"), 0.4213, 0.05, "return"),
        AccountSignal(describe_feature("distinct_payment_id"), 6.0, 1.0),
        AccountSignal(describe_feature("price_mean"), 861.2612, 61.64),
    )
    facts = make_facts(account_probability=0.9312, account_signals=signals)
    assert Facts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
    text = TemplateNarrator().generate(facts)
    assert "account-level model gives a fraud probability of 0.93" in text
    assert "share of 'return' events is 0.42 (median 0.05)" in text
    assert "distinct cards is 6 (median 1)" in text
    assert "mean amount is 861.26 (median 61.64)" in text  # an amount, cited as money
    assert check_grounding(text, facts).grounded, check_grounding(text, facts).problems
    assert "account-level model" in build_prompt(facts)[1]["content"]
    # the same sentence about aggregates the facts do not hold is not grounded
    wrong = text.replace("is 6 (median 1)", "is 9 (median 1)")
    assert not check_grounding(wrong, facts).grounded
    assert not check_grounding(text.replace("861.26", "961.26"), facts).grounded
    # a return event claimed without the account signal that names returns is a claim too
    bare = make_facts(account_probability=0.9312)
    assert not check_grounding("Returns: share of 'return' events is high.", bare).grounded


def test_counterfactual_sentence_adds_the_fraud_probability_it_explains() -> None:
    cf = CounterfactualFact(
        5, 0.93, 0.88, 0.92,
        probability_before=0.97, probability_without_top=0.12, probability_without_random=0.95,
    )  # fmt: skip
    sentence = counterfactual_sentence(cf)
    assert sentence == (
        "Without these 5 events the score falls from 0.93 to 0.88; without 5 random events it "
        "stays at 0.92. The fraud probability falls from 0.97 to 0.12 without them "
        "(0.95 without the random ones)."
    )
    facts = make_facts(score=0.93, counterfactual=cf)
    assert check_grounding(sentence, facts).grounded
    # the probabilities are facts: a wrong one is caught, and they survive the JSON round trip
    assert not check_grounding(sentence.replace("0.12", "0.31"), facts).grounded
    assert Facts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
    # an unsupervised explanation (no probabilities) keeps the one-clause sentence
    assert "probability" not in counterfactual_sentence(CounterfactualFact(5, 0.93, 0.88, 0.92))


def test_log_key_event_types_with_digits_are_event_types_not_ids() -> None:
    """Real logs name events by template keys (E125, E5): the template's own summary of such
    a user must pass, while a key the facts' events lack is still caught."""
    keys = tuple(
        replace(e, event_type=k)
        for e, k in zip(FACTS.top_events, ("E125", "E5", "E1020"), strict=True)
    )
    facts = make_facts(top_events=keys, vocabulary=("E125", "E5", "E1020", "E77"))
    template = TemplateNarrator().generate(facts)
    assert "E125" in template
    report = check_grounding(template, facts)
    assert report.grounded, report.problems
    assert check_grounding("The E1020 event at 14:23 closes the burst.", facts).grounded
    for invented in ("E999", "E77"):  # not an event of the facts (E77 is only in the vocabulary)
        report = check_grounding(f"An {invented} event preceded the purchase.", facts)
        assert not report.grounded and any(invented in p for p in report.problems)


def test_the_summary_spans_the_users_events_not_the_sidebar_range() -> None:
    """The range (2024-03-01 to 03-20) is the analyst's choice; the summary says when this
    user was active, and counts one event as one event."""
    one_day = make_facts(
        n_events=1,
        first_ts=datetime(2024, 3, 5, 14, 20),
        last_ts=datetime(2024, 3, 5, 14, 20),
    )
    text = TemplateNarrator().generate(one_day)
    assert "(1 event on 2024-03-05," in text and "2024-03-20" not in text
    assert check_grounding(text, one_day).grounded
    span = make_facts(first_ts=datetime(2024, 3, 2, 9), last_ts=datetime(2024, 3, 19, 22))
    text = TemplateNarrator().generate(span)
    assert "(212 events from 2024-03-02 to 2024-03-19," in text
    assert check_grounding(text, span).grounded
    assert Facts.from_dict(json.loads(json.dumps(span.to_dict()))) == span
    assert "first and last event: 2024-03-02 09:00" in build_prompt(span)[1]["content"]


VIEWS = GroupFact(
    "event type", "view", 54, 0.8, datetime(2024, 3, 5, 14, 0), datetime(2024, 3, 5, 14, 30), 0.06
)
BURST = GroupFact(
    "session", "s00000042", 61, 0.7, datetime(2024, 3, 5, 13, 58), datetime(2024, 3, 5, 14, 31), 0.4
)


def test_the_behaviour_sentence_names_the_group_whose_removal_matters_most() -> None:
    facts = make_facts(behaviour=(BURST, VIEWS))
    sentence = behaviour_sentence(facts)
    assert sentence == (
        "Its 54 view events carry 80% of the attribution; without them the score falls from "
        "0.94 to 0.06."
    )
    assert sentence in TemplateNarrator().generate(facts)
    assert check_grounding(sentence, facts).grounded
    # a session is named by its time span; on a long history the groups are the window's
    session_only = make_facts(behaviour=(BURST,))
    assert behaviour_sentence(session_only).startswith(
        "A session on 2024-03-05 from 13:58 to 14:31 (61 events) carries 70%"
    )
    windowed = make_facts(
        behaviour=(VIEWS,), counterfactual=replace(FACTS.counterfactual, window_events=128)
    )
    assert behaviour_sentence(windowed).startswith("The window's 54 view events carry")
    # nothing over half the attribution, or nothing left to score without it: no sentence
    assert behaviour_sentence(make_facts(behaviour=(replace(VIEWS, share=0.5),))) == ""
    assert behaviour_sentence(make_facts(behaviour=(replace(VIEWS, score_without=None),))) == ""
    assert behaviour_sentence(make_facts(behaviour=(VIEWS,), counterfactual=None)) == ""


@pytest.mark.parametrize(
    "claim",
    [
        "Without its view events the score falls to 0.33.",  # wrong score
        "Its 54 search events carry most of the attribution.",  # event type not in the facts
        "One session from 2024-03-07 09:15 carries it.",  # wrong time
    ],
)
def test_grounding_catches_a_wrong_behaviour_claim(claim: str) -> None:
    facts = make_facts(behaviour=(VIEWS, BURST))
    assert check_grounding(behaviour_sentence(facts), facts).grounded
    assert not check_grounding(claim, facts).grounded


# -- identifiers leave the machine as placeholders -------------------------------------------

REAL_IDS = ["u0042", "d0012", "10.1.2.3", "card_9f3a0b12", "card_77aa0001", "u0007", "u0019"]


def test_pseudonyms_are_stable_and_leave_what_is_not_an_id() -> None:
    aliases = Pseudonyms()
    masked = aliases.facts(FACTS)
    assert masked.user_id == "USER_1"
    purchase = masked.top_events[0].fields
    assert purchase["device_id"] == "DEVICE_1" and purchase["ip"] == "IP_1"
    assert purchase["card_id"] == "CARD_1"
    # the same device on another event and on the linked entity gets the same placeholder
    assert masked.top_events[1].fields["device_id"] == "DEVICE_1"
    assert masked.linked[0].value == "DEVICE_1"
    assert masked.linked[0].users == ("USER_2", "USER_3", "USER_4")
    assert masked.linked[0].labels == {"USER_2": "fraud", "USER_3": "legit"}
    # times, amounts, countries, categories and event types stay
    assert purchase["price"] == "1299.00" and purchase["country"] == "DE"
    assert purchase["category"] == "electronics"
    assert [e.ts for e in masked.top_events] == [e.ts for e in FACTS.top_events]
    text = facts_text(masked)
    assert not any(real in text for real in REAL_IDS)
    assert aliases.restore("user_1 and USER_2 share DEVICE_1; USER_9 too") == (
        "u0042 and u0007 share d0012; USER_9 too"
    )


def test_openai_compatible_sends_placeholders_and_puts_the_ids_back(stub: StubServer) -> None:
    stub.answer = (
        "USER_1 scores 0.94, above the alert threshold of 0.80. Its purchase at 2024-03-05 "
        "14:22 used device DEVICE_1 and card CARD_1; DEVICE_1 is shared with USER_2 (fraud)."
    )
    summary = narrate(FACTS, OpenAICompatibleNarrator(stub.url, "m"))
    sent = json.dumps(stub.requests[0][2])
    assert not any(real in sent for real in REAL_IDS)
    assert "USER_1" in sent and "cite them exactly as written" in sent
    assert summary.text == (
        "u0042 scores 0.94, above the alert threshold of 0.80. Its purchase at 2024-03-05 "
        "14:22 used device d0012 and card card_9f3a0b12; d0012 is shared with u0007 (fraud)."
    )
    assert not summary.flagged, summary.grounding.problems


def test_a_placeholder_the_prompt_did_not_have_is_flagged(stub: StubServer) -> None:
    stub.answer = "USER_1 scores 0.94, and USER_9 shares its device."
    summary = narrate(FACTS, OpenAICompatibleNarrator(stub.url, "m"))
    assert summary.flagged
    assert any("USER_9" in p and "placeholder" in p for p in summary.grounding.problems)


def test_pseudonyms_can_be_turned_off_for_a_server_on_this_machine(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRAUDLENS_LLM_BACKEND", "openai-compatible")
    monkeypatch.setenv("FRAUDLENS_LLM_BASE_URL", stub.url)
    monkeypatch.setenv("FRAUDLENS_LLM_MODEL", "m")
    assert make_narrator(Settings()).pseudonymise is True  # the default
    monkeypatch.setenv("FRAUDLENS_LLM_PSEUDONYMISE", "0")
    narrator = make_narrator(Settings())
    assert narrator.pseudonymise is False
    stub.answer = PARAPHRASES[0]
    narrate(FACTS, narrator)
    assert stub.requests[0][2]["messages"] == build_prompt(FACTS)


def test_a_behaviour_group_whitelists_no_event_type_it_is_part_of() -> None:
    purchase_only = make_facts(
        top_events=FACTS.top_events[:1],
        behaviour=(replace(VIEWS, key="login"),),
    )
    assert check_grounding(
        "Its 54 login events carry 80% of the attribution.", purchase_only
    ).grounded
    for claim in ("It has many failed login events.", "Its login_failed events stand out."):
        assert not check_grounding(claim, purchase_only).grounded, claim


def test_a_session_group_may_be_cited_by_its_length() -> None:
    facts = make_facts(behaviour=(BURST,))  # 13:58 to 14:31
    assert check_grounding("One session lasted 33 minutes.", facts).grounded
    assert not check_grounding("One session lasted 47 minutes.", facts).grounded


def test_only_placeholders_the_prompt_showed_come_back() -> None:
    aliases = Pseudonyms()
    masked = aliases.facts(make_facts(behaviour=(BURST,)))
    shown = facts_text(masked)
    assert "SESSION_1" not in shown  # a session is shown by its time span, not its id
    assert aliases.restore("USER_1 and SESSION_1", sent=shown) == "u0042 and SESSION_1"
