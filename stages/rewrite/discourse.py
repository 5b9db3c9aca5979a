"""What the resolvers share: the salience model, mentions, antecedents and replacements.

A conversation is read turn by turn, oldest first. Every turn adds *mentions* (noun phrases, and
pronouns once resolved) to a discourse model; each discourse entity's salience when a new turn is
read is

    salience(e) = sum over its mentions m of weight(m) * recency_decay ** (turns since m)
                  + first_turn        (if e was mentioned in the conversation's first turn: the topic)

    weight(m)   = (1 + role bonus       subject / object / of-complement ("the history of X": X) /
                                         focus (X of "What about X?", in its counterpart's place)
                     + entity bonus      a named entity (spaCy NER, non-numeric)
                     + proper_noun bonus
                     + pronoun_continuation   the mention was a resolved pronoun
                     + new_entity        the entity's first mention (0 by default))
                  * relational_head     for "history" in "the history of X"
                  * adjunct             for a noun in an adverbial phrase ("in a nutshell")

so a recent subject beats an old oblique mention, a topic set in the first turn stays available,
the entity the conversation keeps pronominalising stays in focus, and an entity mentioned over and
over accumulates weight (the recency-weighted salience of Lappin & Leass, 1994, reduced to what a
query-length text supports). Pronouns pick the most salient *agreeing* entity; disagreement in
number costs the factor ``number_mismatch`` rather than ruling the entity out (annotators and users
say "it" of plurals and "they" of organisations).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ConfigDict, Field

from engine.strictness import NoCoercion
from stages.text import HAN_OR_WORD


class SalienceWeights(NoCoercion):
    """The salience model's weights (defaults tuned on CAsT 2019; see bench/cast_rewrite.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    recency_decay: float = Field(0.4, gt=0, le=1, description="a mention's weight is multiplied by this per turn of age")
    subject: float = Field(0.5, ge=0, description="bonus for a mention in subject position")
    object: float = Field(0.3, ge=0, description="bonus for a direct object or predicate noun")
    entity: float = Field(0.5, ge=0, description="bonus for a named entity (spaCy NER, non-numeric)")
    proper_noun: float = Field(0.3, ge=0, description="bonus for a proper noun phrase")
    first_turn: float = Field(0.3, ge=0, description="bonus (not decayed) for entities of the first turn: the topic")
    of_complement: float = Field(
        0.5, ge=0, description="bonus for the complement of a relational noun ('the history of X': X)"
    )
    relational_head: float = Field(
        0.5, ge=0, le=1, description="factor for a noun with an of-complement ('the history of X': history)"
    )
    adjunct: float = Field(0.5, ge=0, le=1, description="factor for a noun in an adverbial phrase ('in a nutshell')")
    focus: float = Field(
        1.0, ge=0,
        description="bonus for X in 'What about X?': it takes its counterpart's place in the conversation",
    )
    new_entity: float = Field(
        0.0, ge=0, description="bonus for the first mention of an entity: a turn that brings one in shifts the focus"
    )
    pronoun_continuation: float = Field(
        0.5, ge=0, description="bonus for a mention made by a pronoun: the entity the conversation is about"
    )
    number_mismatch: float = Field(
        0.5, ge=0, le=1, description="factor for a singular antecedent of they/them/their (or plural of it/its)"
    )
    min_salience: float = Field(0.05, ge=0, description="antecedents below this are not used")


@dataclass(frozen=True)
class Mention:
    """One mention of a discourse entity in a turn."""

    key: str  # the entity it belongs to (case-folded text)
    text: str  # its surface form, determiners normalised: what a pronoun is replaced by
    bare: str  # without any leading determiner (what "one" is replaced by)
    head: str  # lower-cased head word
    turn: int  # 1-based turn number
    role: str  # subject | object | complement | relational | adjunct | other
    plural: bool
    person: bool  # a PERSON entity: he/she/his/her may refer to it, it/its may not
    entity: str | None  # the NER label when the phrase is a named entity
    proper: bool
    via: str | None = None  # the pronoun this mention was resolved from, if any
    new: bool = False  # the entity's first mention in the conversation
    other_number: str | None = None  # ``text`` in the other grammatical number (common nouns only)

    def weight(self, weights: SalienceWeights) -> float:
        bonus = {"subject": weights.subject, "object": weights.object, "complement": weights.of_complement,
                 "focus": weights.focus}.get(
            self.role, 0.0
        )
        if self.entity is not None:
            bonus += weights.entity
        if self.proper:
            bonus += weights.proper_noun
        if self.via is not None:
            bonus += weights.pronoun_continuation
        if self.new:
            bonus += weights.new_entity
        factor = {"relational": weights.relational_head, "adjunct": weights.adjunct}.get(self.role, 1.0)
        return (1.0 + bonus) * factor


@dataclass(frozen=True)
class Antecedent:
    """A discourse entity chosen for a pronoun, with what made it salient."""

    key: str
    text: str
    bare: str
    turn: int  # the turn of its most recent mention (perhaps by a pronoun)
    named_turn: int  # the turn its replacement text was written in
    salience: float
    factors: dict[str, float]
    plural: bool
    person: bool
    other_number: str | None = None  # ``text`` in the other grammatical number, where it can be formed
    proper: bool = False  # its written form is a proper noun phrase

    @property
    def maybe_person(self) -> bool:
        """A one-word proper noun: NER often misses or mislabels first names ('Ivanka')."""
        return self.proper and len(self.text.split()) == 1

    def bare_in(self, plural: bool) -> str:
        """``bare`` in the given grammatical number, where the other form is known (else as written)."""
        if plural == self.plural or not self.other_number:
            return self.bare
        return self.other_number[4:] if self.other_number.lower().startswith("the ") else self.other_number

    def mention(self, turn: int, role: str, *, via: str | None = None, plural: bool | None = None) -> Mention:
        """A further mention of this entity in ``turn`` (by a pronoun ``via``, or implicitly)."""
        return Mention(
            key=self.key, text=self.text, bare=self.bare, head=self.key.split()[-1], turn=turn, role=role,
            plural=self.plural if plural is None else plural, person=self.person, entity=None, proper=False,
            via=via, other_number=self.other_number,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "turn": self.turn, "named_in_turn": self.named_turn, "salience": round(self.salience, 4),
                "factors": {k: round(v, 4) for k, v in self.factors.items()}}


@dataclass(frozen=True)
class Replacement:
    """One change to the question: which span, by what, and why."""

    start: int  # character offsets in the question as asked
    end: int
    original: str
    replacement: str
    kind: str  # pronoun | possessive | one_anaphora | acronym | definite_description | ellipsis | predicate_ellipsis
    heuristic: str  # the rule that fired, in words
    antecedent: Antecedent | None = None
    # changes folded into this one: those inside a rebuilt question, or the two entities of "they" -> "X and Y"
    parts: tuple["Replacement", ...] = ()

    def texts(self) -> list[str]:
        """Every text this change carries (its span, replacement, antecedent), parts included: where the
        fragments quoted in its ``heuristic`` come from."""
        found = [self.original, self.replacement]
        if self.antecedent is not None:
            found += [self.antecedent.text, self.antecedent.bare]
        for part in self.parts:
            found += part.texts()
        return found

    def to_dict(self, trace_text: bool = True, redactor: "Redactor | None" = None) -> dict[str, Any]:
        """The change for the trace. Without query text (``trace_text`` false) the span's text, the
        replacement and the antecedent's text are left out, and the text quoted in ``heuristic`` is
        redacted (by ``redactor``, which knows the conversation's texts; else by quotes alone)."""
        heuristic = self.heuristic
        if not trace_text:
            heuristic = (redactor or Redactor(self.texts())).redact(heuristic)
        record: dict[str, Any] = {"kind": self.kind, "heuristic": heuristic}
        if trace_text:  # offsets too: with the query's length they narrow down its words
            record.update(start=self.start, end=self.end)
            record["original"] = self.original
            record["replacement"] = self.replacement
        if self.antecedent is not None:
            antecedent = self.antecedent.to_dict()
            if not trace_text:
                antecedent.pop("text")
            record["antecedent"] = antecedent
        if self.parts:
            record["parts"] = [part.to_dict(trace_text, redactor) for part in self.parts]
        return record


REDACTED = "<redacted>"
_REDACTIONS = re.compile(f"(?:{REDACTED})+")
_WORD = HAN_OR_WORD
# Words a rule's own wording shares with almost any question (English function words): left in place outside
# quotes even when the conversation has them too.
FUNCTION_WORDS = frozenset(
    "a an the of to in on at by for from with without into about between and or but not no nor as is are was were "
    "be been being am has have had do does did can could will would shall should may might must its it this that "
    "these those than then there here what which who whom whose how when where why most more less least very so "
    "too also again only own same other others one two some any all each both such".split()
)


class Redactor:
    """Takes the conversation's text out of a rule's description (``Replacement.heuristic``, an explanation),
    for traces without query text.

    The rules quote every piece of question or history text they name in single quotes ("pronoun 'it'",
    "'VMs' spells the initials of 'a virtual machine'"): each quoted fragment becomes ``<redacted>``. A
    fragment may hold an apostrophe of its own ("'What about St. John's wort?'"): a quote closes a fragment
    only where no letter or digit follows, and of such quotes the furthest whose fragment is text of the
    conversation is taken (else the nearest). Then, as a safety net for a rule that forgets its quotes, any
    word (a Han character for Chinese) left outside quotes that the conversation's texts contain, bar English
    function words, is redacted too; a quote left unpaired redacts the rest of the description."""

    def __init__(self, texts: Iterable[str], vocabulary_texts: Iterable[str] | None = None):
        """``texts``: what a quoted fragment may be taken from (the question, the history, the changes' texts);
        ``vocabulary_texts``: the texts whose words are redacted outside quotes too (default: ``texts``)."""
        known = [t for t in texts if t]
        self._known = "\x00".join(known)
        vocabulary: set[str] = set()
        for text in (known if vocabulary_texts is None else vocabulary_texts):
            vocabulary.update(w.casefold() for w in _WORD.findall(text))
        self._vocabulary = vocabulary - FUNCTION_WORDS

    def _is_known(self, fragment: str) -> bool:
        fragment = fragment[:-4] if fragment.endswith(" ...") else fragment
        return bool(fragment) and fragment in self._known

    def redact(self, description: str) -> str:
        pieces: list[str] = []
        cursor = 0
        index = 0
        length = len(description)
        while index < length:
            if description[index] != "'" or (index and description[index - 1].isalnum()):
                index += 1
                continue
            closers = [j for j in range(index + 1, length) if description[j] == "'"
                       and (j + 1 == length or not description[j + 1].isalnum())]
            pieces.append(self.words(description[cursor:index]))
            pieces.append(REDACTED)
            if not closers:  # an unpaired quote: nothing after it can be told apart from the text
                return _REDACTIONS.sub(REDACTED, "".join(pieces))
            known = [j for j in closers if self._is_known(description[index + 1 : j])]
            close = known[-1] if known else closers[0]
            cursor = index = close + 1
        pieces.append(self.words(description[cursor:]))
        return _REDACTIONS.sub(REDACTED, "".join(pieces))

    def quotes_escaped(self, text: str) -> bool:
        """Whether ``text`` holds a word of the conversation (bar function words) escaped as a library's message
        may quote it (``\\xeb``, ``\\u00eb``, ``b'\\xc3\\xab'``, ``%C3%AB``), where :meth:`words` cannot see it."""
        import json
        from urllib.parse import quote, quote_plus

        folded = text.casefold()
        for word in self._vocabulary:
            forms = {ascii(word)[1:-1], json.dumps(word)[1:-1], quote(word), quote_plus(word), repr(word.encode())[2:-1]}
            if any(form != word and form.casefold() in folded for form in forms):
                return True
        return False

    def words(self, text: str) -> str:
        """``text`` with any word of the conversation (bar function words) and any Han character of it redacted:
        what a description holds outside quotes, or a message that quotes in no known way (an exception's)."""
        def word(match: "re.Match[str]") -> str:
            found = match.group(0)
            return REDACTED if found.casefold() in self._vocabulary else found

        return _REDACTIONS.sub(REDACTED, _WORD.sub(word, text))


@dataclass
class DiscourseModel:
    """The mentions of the turns read so far (turn numbers are 1-based)."""

    weights: SalienceWeights
    mentions: list[Mention] = field(default_factory=list)
    previous: str | None = None  # the latest turn as resolved (what "What about X?" asks again)

    def copy(self) -> "DiscourseModel":
        return DiscourseModel(self.weights, list(self.mentions), self.previous)

    def candidates(self, current_turn: int) -> list[Antecedent]:
        """Every entity mentioned before ``current_turn``, most salient first (ties: most recent)."""
        weights = self.weights
        by_key: dict[str, list[Mention]] = {}
        for mention in self.mentions:
            if mention.turn < current_turn:
                by_key.setdefault(mention.key, []).append(mention)
        ranked: list[Antecedent] = []
        for key, mentions in by_key.items():
            recency = sum(m.weight(weights) * weights.recency_decay ** (current_turn - m.turn) for m in mentions)
            first = weights.first_turn if any(m.turn == 1 for m in mentions) else 0.0
            latest = max(mentions, key=lambda m: (m.turn, m.via is None))
            named = next((m for m in reversed(mentions) if m.via is None), latest)  # a written form, not a pronoun's
            ranked.append(Antecedent(
                key=key, text=named.text, bare=named.bare, turn=latest.turn, named_turn=named.turn, salience=recency + first,
                factors={"recency_weighted_mentions": recency, "first_turn_topic": first, "mentions": float(len(mentions))},
                plural=named.plural, person=any(m.person for m in mentions), other_number=named.other_number,
                proper=named.proper,
            ))
        ranked.sort(key=lambda a: (-a.salience, -a.turn, a.key))
        return ranked
