"""Identifiers out of a summary prompt that leaves the machine, and back into its answer.

An OpenAI-compatible endpoint may be a hosted API: the facts it is sent would carry the
account's id, its devices, IP addresses and cards, and the ids of the accounts it shares them
with. The writer sees placeholders instead (``USER_1``, ``DEVICE_2``, ``IP_1``, ``CARD_1``,
``ITEM_3``, ``SESSION_1``), the same value always getting the same one, and may cite them as
written; the answer gets the real values back before the grounding check, which then judges it
against the real facts. A placeholder the facts never had (the model invented ``USER_9``) stays
in the text, and the grounding check flags it (core.grounding).

Times, amounts, countries, categories and event types stay: the summary is about them, and
none identifies a person on its own.
"""

from __future__ import annotations

import dataclasses

from core.grounding import PLACEHOLDER_RE as PLACEHOLDER
from core.narrate import Facts, LinkedEntity

# Event fields (EventFact.fields) and linked entity kinds that identify something.
_KIND_OF_FIELD: dict[str, str] = {
    "device_id": "DEVICE",
    "ip": "IP",
    "card_id": "CARD",
    "payment_id": "CARD",
    "item_id": "ITEM",
    "session_id": "SESSION",
}


@dataclasses.dataclass
class Pseudonyms:
    """One prompt's placeholders: build with :meth:`facts`, undo with :meth:`restore`."""

    real_of: dict[str, str] = dataclasses.field(default_factory=dict)
    _alias_of: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)

    def alias(self, kind: str, value: str) -> str:
        key = (kind, value)
        if key not in self._alias_of:
            n = sum(1 for k, _ in self._alias_of if k == kind) + 1
            placeholder = f"{kind}_{n}"
            self._alias_of[key] = placeholder
            self.real_of[placeholder] = value
        return self._alias_of[key]

    def facts(self, facts: Facts) -> Facts:
        """The facts with every identifier replaced by its placeholder."""

        def user(u: str) -> str:
            return self.alias("USER", u)

        def fields(values: dict[str, str]) -> dict[str, str]:
            return {
                k: self.alias(_KIND_OF_FIELD[k], v) if k in _KIND_OF_FIELD else v
                for k, v in values.items()
            }

        main = user(facts.user_id)  # the account explained is USER_1
        return dataclasses.replace(
            facts,
            user_id=main,
            top_events=tuple(
                dataclasses.replace(e, fields=fields(e.fields)) for e in facts.top_events
            ),
            linked=tuple(
                LinkedEntity(
                    kind=x.kind,
                    value=self.alias(_KIND_OF_FIELD.get(x.kind, "DEVICE"), x.value),
                    users=tuple(user(u) for u in x.users),
                    labels={user(u): label for u, label in x.labels.items()},
                    n_users=x.n_users,
                )
                for x in facts.linked
            ),
            behaviour=tuple(
                dataclasses.replace(g, key=self.alias("SESSION", g.key))
                if g.kind == "session"
                else g
                for g in facts.behaviour
            ),
        )

    def restore(self, text: str, sent: str | None = None) -> str:
        """The real values back in place of the placeholders this prompt used (with ``sent``,
        only those the sent text shows: the writer cannot have learnt the others); any other
        placeholder is left as written, and the grounding check flags it."""
        known = self.real_of
        if sent is not None:
            shown = {m.group(0).upper() for m in PLACEHOLDER.finditer(sent)}
            known = {k: v for k, v in known.items() if k in shown}
        return PLACEHOLDER.sub(lambda m: known.get(m.group(0).upper(), m.group(0)), text)


__all__ = ["PLACEHOLDER", "Pseudonyms"]
