"""Entities: the ``entities`` index component and the ``boost.entity_consistency`` stage.

Entities come from two sources run in one spaCy pipeline: the model's NER (``en_core_web_sm`` by
default, resolved to the packaged copy by :func:`engine.models.resolve_spacy`) and an analyst
gazetteer — a YAML file of drug names, tickers, company names, codes — turned into an
``EntityRuler`` placed before the NER, so a gazetteer match wins over the model's guess for the
same span. Each entity is reduced to a ``(label, key)`` pair: the gazetteer entry's ``id`` (so
"Glucophage" and "metformin" are one drug), otherwise the case-folded text.

Documents are processed once, at index time (``sieve index ... --with entities``, ``nlp.pipe`` in
batches); the component stores one line per document row, a copy of the gazetteer, and records
the spaCy model (name, package, version) and the gazetteer's sha256 in the manifest. The stage
extracts the query's entities with the same model and gazetteer (a different one is refused) and
scores each candidate::

    entity(d) = (match_weight * matched(d) - conflict_weight * conflicting(d)) / n

over the ``n`` query entities considered: a query entity is *matched* when the document holds the
same (label, key); *conflicting* when it does not, but holds another entity of the same label and
that label is a conflict label (by default the gazetteer's closed vocabularies: a query about
metformin against a document about insulin, both DRUG). Anything else adds 0. spaCy and the model
are imported in ``build``/``warm_up`` only.

Text holding Han characters (Chinese, Japanese kanji) does not go through the spaCy pipeline: an
English tokenizer makes an unspaced Chinese clause one token, so no gazetteer name matched in it,
and the NER labelled whole Chinese sentences PERSON/ORG/GPE. Such a text is read in Unicode NFKC
and the gazetteer's names are matched on the characters themselves (longest first, no overlaps; a
Han name anywhere, since Chinese has no spaces; a Latin name or number only where it is not part of
a longer Latin word or number: ``TSLA`` not in ``TSLAX``, ``0700`` not in ``10700``); the NER runs
only on its runs of Latin text of at least ``NER_MIN_WORDS`` words (an English sentence in a Chinese
document), never on Han text nor on a lone word in brackets. The manifest records this as
``han_text: phrases``; an index built before records nothing and keeps being read (documents and
queries alike) the old way, ``spacy``, until it is rebuilt.

Every text, document or query, Han or not, is read in NFKC (:func:`nfkc`), and so are the gazetteer's names: a
decomposed "Nestle\u0301" is "Nestlé", a full-width "ＴＳＬＡ" is "TSLA", as BM25 reads them (but ™ and ℠ stay:
"Acme™" is not the word "AcmeTM"). The manifest records ``normalization: nfkc``; an index built before records
none, and its English text (documents and queries alike) keeps being read as written until it is rebuilt.

A gazetteer entry's ``context`` gates its matches, names and regex alike, in English and Han text: a match counts when
one of the entries that give it has no context or finds one of its phrases in the same text (:class:`ContextPhrases`).
What does not count is kept track of: for a query, the stage's details list it (``out_of_context``); for documents, the
manifest counts it (``out_of_context``, recorded only for a gazetteer with a context, so other manifests are as they
were; an index of such a gazetteer that records none was built before the gate held everywhere: warm-up says so).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Sequence, get_args

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.cache import LRUCache
from engine.errors import ConfigError, ConfigIssue, MissingDependencyError, ModelLoadError, SieveIndexError, StageError
from engine.index import (
    BuildCacheSection, ComponentSettings, Document, IndexComponent, Progress, content_defined_batches,
)
from engine.model import Candidate, Decision, Query, ScoreEntry
from engine.models import files_hash, resolve_spacy
from engine.textform import word_form
from engine.registry import register_index_component, register_stage
from engine.stage import (
    Explanation, GraphIssue, GraphView, Port, RecentNotes, Resources, Stage, StageContext, StageNode, StageParams,
    StageResult,
)
from engine.strictness import NoCoercion, matchable
from rules.expressions import PatternError, PatternTimeout, bounded, compile_pattern

ENTITIES_FILE = "entities.jsonl"
GAZETTEER_COPY = "gazetteer.yaml"
TRUNCATED_FILE = "truncated.json"  # {"max_chars": N, "rows": {row: characters}}: documents read only in part
DEFAULT_SPACY_MODEL = "en_core_web_sm"
# spaCy labels for numbers, amounts and times: they say little about what a text is about.
NUMERIC_LABELS = ("CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY", "DATE", "TIME")
LABEL_PATTERN = r"^[A-Z][A-Z0-9_]*$"
REDACTED = "<redacted>"
MAX_OUT_OF_CONTEXT_TRACED = 20  # query names set aside for want of context that a trace lists (the rest counted)
MAX_CONTEXT_TRACED = 10  # the context phrases listed for each
# How text with Han characters is read: "phrases" (gazetteer names on the NFKC text, NER on Latin runs
# only); "spacy" (the whole text through the spaCy pipeline), what indexes built before recorded no mode.
HanText = Literal["spacy", "phrases"]
HAN_TEXT: HanText = "phrases"
LEGACY_HAN_TEXT: HanText = "spacy"
NER_MIN_WORDS = 4  # the NER reads a Latin run inside Han text only from this many words (a sentence, not a name)
# The Unicode form texts without Han characters are read in: "nfkc" (as Han text always was), or "none" (as written),
# what an index built before recorded no form (its documents' entities came from the text as written).
Normalization = Literal["nfkc", "none"]
NORMALIZATION: Normalization = "nfkc"
LEGACY_NORMALIZATION: Normalization = "none"
_HAN = re.compile(r"[\u2e80-\u2fdf\u3005\u3007\u3021-\u3029\u3038-\u303b\u3400-\u4dbf\u4e00-\u9fff"
                  r"\uf900-\ufaff\U00020000-\U0003134f]")
# Scripts written without spaces (Han, kana) or next to Latin without one (Hangul): no boundary against Latin.
_CJK = re.compile(r"[\u2e80-\u2fdf\u3005-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
                  r"\uf900-\ufaff\U00020000-\U0003134f]")
_LATIN_WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)?")
_MARK_SIGNS = frozenset("\u2122\u2120")  # ™ ℠: kept as written by nfkc()
_MARK_SIGN = re.compile("([\u2122\u2120])")


def entity_key(text: str) -> str:
    """The key of an entity found by the NER or a regex: whitespace collapsed, case-folded."""
    return " ".join(text.split()).casefold()


# --------------------------------------------------------------------------- gazetteer files


def _path_as_written(text: str) -> str:
    """A file a setting names, if a path can name it (:func:`engine.yamlsource.path_problem`): said at the setting,
    before anything opens it."""
    from engine.yamlsource import path_problem

    problem = path_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


_APath = Annotated[str, AfterValidator(_path_as_written)]


class GazetteerEntry(NoCoercion):
    """One analyst entity: a label, a canonical id, and the names (or one-token regex) that mean it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str = Field(pattern=LABEL_PATTERN, description="entity type, e.g. DRUG, TICKER, COMPANY, ICD10")
    id: Annotated[str, matchable("id")] | None = Field(
        None, min_length=1, description="canonical id; None: the first name (case-folded)")
    names: tuple[Annotated[str, matchable("name")], ...] = Field(
        (), description="surface forms, matched token by token")
    regex: str | None = Field(None, min_length=1, description="a regular expression one token must match fully")
    case_sensitive: bool = Field(False, description="match names exactly as written (tickers); default: any case")
    context: tuple[Annotated[str, matchable("context phrase")], ...] = Field((), description=(
        "words or phrases of which one must also occur in the same text (any case, whole words; in Chinese text a "
        "Chinese phrase anywhere) for these names or regex matches to count: a ticker that is also a word (ALL, IT, "
        "NOW) counts only beside 'Allstate' or 'NYSE'; a name several entries give counts when one of them has no "
        "context or finds its own; empty: always"))

    @field_validator("context")
    @classmethod
    def _context(cls, context: tuple[str, ...]) -> tuple[str, ...]:
        if any(not phrase.strip() for phrase in context):
            raise ValueError("context phrases must not be empty strings")
        return context

    @field_validator("names")
    @classmethod
    def _names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not name.strip():
                raise ValueError("names must not be empty strings")
        return names

    @field_validator("regex")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                compile_pattern(pattern)
            except PatternError as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern

    @model_validator(mode="after")
    def _one_source(self) -> "GazetteerEntry":
        if not self.names and self.regex is None:
            raise ValueError("give `names` (a list of surface forms) or `regex`")
        if self.names and self.regex is not None:
            raise ValueError("give either `names` or `regex`, not both (make two entries)")
        return self

    @property
    def key(self) -> str | None:
        """The (label-scoped) key every match of this entry gets; None for regex entries without id."""
        if self.id is not None:
            return self.id  # canonical ids are the analyst's, kept as written
        return entity_key(self.names[0]) if self.names else None


class GazetteerFile(NoCoercion):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = Field(description="gazetteer file format version")
    description: str | None = None
    entities: tuple[GazetteerEntry, ...]

    @field_validator("entities")
    @classmethod
    def _not_empty(cls, entries: tuple[GazetteerEntry, ...]) -> tuple[GazetteerEntry, ...]:
        if not entries:  # checked here, not with min_length: that one also fires when entries are invalid
            raise ValueError("list at least one entity")
        return entries


@dataclass(frozen=True)
class Gazetteer:
    """A validated gazetteer file and its identity."""

    path: str
    sha256: str
    text: str
    entries: tuple[GazetteerEntry, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted({e.label for e in self.entries}))

    def describe(self) -> dict[str, Any]:
        return {"file": self.path, "sha256": self.sha256, "entries": len(self.entries), "labels": list(self.labels)}


def _with_field_hint(issue: ConfigIssue) -> ConfigIssue:
    """Add 'did you mean' and the valid fields to an unknown-field issue inside an entry."""
    from difflib import get_close_matches

    if not issue.message.startswith("unknown field '") or "valid fields" in issue.message:
        return issue
    key = issue.message.split("'")[1]
    valid = list(GazetteerEntry.model_fields) if issue.path.startswith("entities.") else list(GazetteerFile.model_fields)
    hint = get_close_matches(key, valid, n=1)
    message = issue.message + (f" (did you mean '{hint[0]}'?)" if hint else "") + f"; valid fields: {', '.join(valid)}"
    return ConfigIssue(issue.location, issue.path, message, issue.severity)


def load_gazetteer(path: str | Path) -> Gazetteer:
    """Load and validate a gazetteer YAML file; every problem at once, located at file:line:col."""
    from engine.config import issues_from_validation
    from engine.yamlsource import load_yaml_file

    path = Path(path)
    loaded = load_yaml_file(path)
    source = loaded.source
    if not isinstance(loaded.data, dict):
        raise ConfigError([ConfigIssue(source.locate(()), "", "a gazetteer is a mapping with version and entities")])
    try:
        parsed = GazetteerFile.model_validate(loaded.data)
    except ValidationError as exc:
        raise ConfigError([_with_field_hint(i) for i in issues_from_validation(exc, source, (), GazetteerFile)]) from None
    issues: list[ConfigIssue] = []
    seen: dict[tuple[bool, str], tuple[int, str, str | None]] = {}  # a surface form -> (entry, label, key)
    for number, entry in enumerate(parsed.entities):
        for position, name in enumerate(entry.names):
            written = nfkc(name)  # a decomposed and a composed "Nestlé" are one name
            surface = written if entry.case_sensitive else entity_key(written)
            found = seen.get((entry.case_sensitive, surface))
            if found is not None and (found[1], found[2]) != (entry.label, entry.key):
                issues.append(ConfigIssue(
                    source.locate(("entities", number, "names", position)), f"entities.{number}.names.{position}",
                    f"'{name}' already names {found[1]} '{found[2]}' (entities.{found[0]}); a name may mean one entity",
                ))
            else:
                seen[(entry.case_sensitive, surface)] = (number, entry.label, entry.key)
    if issues:
        raise ConfigError(issues)
    assert loaded.sha256 is not None and loaded.text is not None
    return Gazetteer(str(path), loaded.sha256, loaded.text, parsed.entities)  # the bytes parsed, read once


# --------------------------------------------------------------------------- extraction


@dataclass(frozen=True, slots=True)
class Mention:
    """One entity of a text: label, key, the first surface form seen, how often it occurs."""

    label: str
    key: str
    text: str
    count: int = 1


def nfkc(text: str) -> str:
    """``text`` in Unicode NFKC, but for the trade and service mark signs: NFKC makes "Acme™" the one word
    "AcmeTM", in which the name Acme is not found (spaCy reads "Acme" "™" as two tokens). A soft hyphen or a
    zero-width character inside a name goes, and a hyphen of another code point, or an en dash between letters,
    is '-' (``engine.textform.word_form``): "Oz\u00adempic" names Ozempic, "co\u2011trimoxazole" and
    "co\u2013trimoxazole" co-trimoxazole, as rules read them."""
    text = word_form(text)
    if unicodedata.is_normalized("NFKC", text):
        return text
    return "".join(part if part in _MARK_SIGNS else unicodedata.normalize("NFKC", part)
                   for part in _MARK_SIGN.split(text))


def _plain_nfkc(text: str) -> str:
    """Plain NFKC, as Han text was read by indexes built before ``normalization: nfkc`` (read the same way)."""
    return unicodedata.normalize("NFKC", text)


def has_han(text: str) -> bool:
    """Whether a text holds Han characters (then its entities are read by :class:`HanTextReader`)."""
    return _HAN.search(text) is not None


def _is_word(char: str) -> bool:
    """A character that continues a Latin word or number (letters, digits, _ of any script but CJK)."""
    return (char.isalnum() or char == "_") and _CJK.match(char) is None


def _fold(char: str) -> str:
    """Case-fold one character to one character (offsets stay those of the text); others kept as written."""
    folded = char.casefold()
    return folded if len(folded) == 1 else char


def _starts_word(text: str, start: int) -> bool:
    """A match may begin at ``start``: not inside a Latin word or number ('0700' not in '10700' nor '1.0700')."""
    if start == 0 or not _is_word(text[start]):
        return True
    before = text[start - 1]
    if _is_word(before):
        return False
    return not (before in ".," and text[start].isdigit() and start >= 2 and text[start - 2].isdigit())


def _ends_word(text: str, end: int) -> bool:
    """A match may end before ``end``: not inside a Latin word or number ('TSLA' not in 'TSLAX', '30' not in '30.8')."""
    if end >= len(text) or not _is_word(text[end - 1]):
        return True
    after = text[end]
    if _is_word(after):
        return False
    return not (after in ".," and text[end - 1].isdigit() and end + 1 < len(text) and text[end + 1].isdigit())


def _bounded(method: Any, pattern: Any, text: str, label: str) -> Any:
    """A gazetteer pattern's ``method`` on ``text`` within the rule patterns' time limit; a SieveIndexError naming the
    entry when it runs over (a pattern that backtracks without end would otherwise stall indexing or every query)."""
    try:
        return bounded(method, pattern, text, subject=f"the gazetteer's {label} regex")
    except PatternTimeout as exc:
        raise SieveIndexError(str(exc)) from None


def _token_extension(pattern: str, case_sensitive: bool, label: str) -> str:
    """The name of a spaCy token attribute that says whether a token matches ``pattern`` as a whole, with the time
    limit (spaCy's own REGEX attribute runs ``re`` with none)."""
    from spacy.tokens import Token

    name = "sieve_gazetteer_" + hashlib.sha256(f"{case_sensitive}\x00{pattern}".encode()).hexdigest()[:16]
    if not Token.has_extension(name):
        compiled = compile_pattern(pattern, not case_sensitive)
        Token.set_extension(name, getter=lambda token: _bounded(compiled.fullmatch, compiled, token.text, label)
                            is not None)
    return name


class HanTextReader:
    """The gazetteer's names matched as phrases on NFKC text (a character trie, one per case rule), and its
    regex entries on the text, both with Latin word boundaries; longest match first, without overlaps."""

    def __init__(self, gazetteer: Gazetteer | None, form: Any = nfkc):
        self.form = form  # the text's and names' Unicode form: nfkc(), or plain NFKC for an index built before
        # case_sensitive names: char -> node; node[""] = (order, label, key, [numbers of the entries giving the name])
        self._exact: dict[str, Any] = {}
        self._folded: dict[str, Any] = {}
        self._regexes: list[tuple[int, Any, str, str | None, int]] = []  # order, pattern, label, key, entry number
        order = 0
        for number, entry in enumerate(gazetteer.entries if gazetteer is not None else ()):
            for name in entry.names:
                phrase = " ".join(form(name).split())
                if not entry.case_sensitive:
                    phrase = "".join(_fold(c) for c in phrase)
                node = self._exact if entry.case_sensitive else self._folded
                for char in phrase:
                    node = node.setdefault(char, {})
                # a name meaning two entities is refused at load; one given by two entries of one entity is theirs
                first = node.setdefault("", (order, entry.label, entry.key, []))
                if (first[1], first[2]) == (entry.label, entry.key) and number not in first[3]:
                    first[3].append(number)
                order += 1
            if entry.regex is not None:
                self._regexes.append((order, compile_pattern(entry.regex, not entry.case_sensitive), entry.label,
                                      entry.key, number))
                order += 1

    @staticmethod
    def _longest(
        trie: dict[str, Any], text: str, start: int, fold: bool
    ) -> tuple[int, tuple[int, str, str | None, list[int]]] | None:
        """The longest name of ``trie`` at ``start`` that ends on a word boundary: (end, entry) or None."""
        node, i, best = trie, start, None
        while i < len(text):
            char = text[i]
            if char.isspace():  # a space in a name matches any run of whitespace
                node = node.get(" ")
                while i < len(text) and text[i].isspace():
                    i += 1
            else:
                node = node.get(_fold(char) if fold else char)
                i += 1
            if node is None:
                break
            if "" in node and not text[i - 1].isspace() and _ends_word(text, i):
                best = (i, node[""])
        return best

    def matches(self, text: str) -> list[tuple[int, int, str, str | None]]:
        """(start, end, label, key) of the gazetteer's matches in ``text`` (NFKC), in text order."""
        return [(start, end, label, key) for start, end, label, key, _ in self.sourced_matches(text)]

    def sourced_matches(self, text: str) -> list[tuple[int, int, str, str | None, tuple[int, ...]]]:
        """(start, end, label, key, sources) of the gazetteer's matches in ``text`` (NFKC), in text order; sources:
        the numbers of the entries that give that span that entity (a name of two entries, a name and a regex)."""
        found: list[tuple[int, int, int, str, str | None, Sequence[int]]] = []  # start, end, order, label, key, entries
        if self._exact or self._folded:
            for start in range(len(text)):
                if text[start].isspace() or not _starts_word(text, start):
                    continue
                for trie, fold in ((self._exact, False), (self._folded, True)):
                    hit = self._longest(trie, text, start, fold) if trie else None
                    if hit is not None:
                        end, (order, label, key, numbers) = hit
                        found.append((start, end, order, label, key, numbers))
        for order, pattern, label, key, number in self._regexes:
            for match in _bounded(pattern.finditer, pattern, text, label):
                start, end = match.span()
                if end > start and _starts_word(text, start) and _ends_word(text, end):
                    found.append((start, end, order, label, key, (number,)))
        sources: dict[tuple[int, int, str, str | None], set[int]] = {}
        for start, end, _, label, key, numbers in found:
            sources.setdefault((start, end, label, key), set()).update(numbers)
        taken: list[tuple[int, int, str, str | None, tuple[int, ...]]] = []
        covered: set[int] = set()
        for start, end, _, label, key, _ in sorted(found, key=lambda f: (f[0] - f[1], f[0], f[2])):
            if covered.isdisjoint(range(start, end)):
                covered.update(range(start, end))
                taken.append((start, end, label, key, tuple(sorted(sources[(start, end, label, key)]))))
        return sorted(taken)


def latin_runs(text: str) -> list[tuple[int, str]]:
    """The runs of a Han text the NER may read: (offset, run) for each stretch between Han characters that
    holds at least NER_MIN_WORDS Latin words."""
    runs = []
    for match in re.finditer(r"[^\u2e80-\u2fdf\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
                             r"\U00020000-\U0003134f\uff00-\uffef]+", text):
        if len(_LATIN_WORD.findall(match.group())) >= NER_MIN_WORDS:
            runs.append((match.start(), match.group()))
    return runs


def _count(found: Sequence[tuple[str, str, str]]) -> tuple[Mention, ...]:
    """Mentions of (label, key, surface) triples in text order: the first surface form, how often each occurs."""
    mentions: dict[tuple[str, str], Mention] = {}
    for label, key, text in found:
        if not key:
            continue
        known = mentions.get((label, key))
        mentions[(label, key)] = Mention(label, key, text, 1) if known is None else Mention(
            known.label, known.key, known.text, known.count + 1
        )
    return tuple(sorted(mentions.values(), key=lambda m: (m.label, m.key)))


@dataclass(frozen=True, slots=True)
class SetAside:
    """A gazetteer entity a text names that does not count: each entry giving the name has a ``context`` of which no
    phrase occurs in the text. ``context``: those entries' phrases (one of them would have made it count)."""

    label: str
    key: str
    text: str
    count: int
    context: tuple[str, ...]


def out_of_context(aside: Sequence[SetAside], trace_text: bool) -> dict[str, Any]:
    """The trace's record of the names a query holds that do not count, none of their entries' context phrases
    being in it: ``out_of_context`` (each name's label, key, text and context phrases; its label only without query
    text) and ``out_of_context_not_listed`` past the first few; nothing when none was set aside."""
    if not aside:
        return {}
    record: dict[str, Any] = {"out_of_context": [
        {"label": m.label, "key": m.key, "text": m.text, "context": list(m.context[:MAX_CONTEXT_TRACED])}
        if trace_text else {"label": m.label} for m in aside[:MAX_OUT_OF_CONTEXT_TRACED]]}
    if len(aside) > MAX_OUT_OF_CONTEXT_TRACED:
        record["out_of_context_not_listed"] = len(aside) - MAX_OUT_OF_CONTEXT_TRACED
    return record


class ContextPhrases:
    """A gazetteer entry's ``context``: whether one of its phrases occurs in a text, any case, whole words.

    In text without Han characters a word ends where ``\\w`` does. Text with Han characters has no spaces: a phrase
    is found there as the gazetteer's names are (:class:`HanTextReader`), a Han phrase anywhere, a Latin word or
    number not inside a longer one ("NYSE" in "在NYSE上市", not in "NYSEG")."""

    def __init__(self, phrases: Sequence[str], form: Any):
        self.phrases = tuple(phrases)
        written = sorted({" ".join(nfkc(p).split()) for p in phrases}, key=len, reverse=True)
        self._words = re.compile(r"(?<!\w)(?:" + "|".join(r"\s+".join(map(re.escape, p.split())) for p in written)
                                 + r")(?!\w)", re.IGNORECASE)
        folded = sorted({"".join(_fold(c) for c in " ".join(form(p).split())) for p in phrases})
        # a lookahead per phrase: every place it starts is tried against the boundaries, overlapping ones too
        self._han = [re.compile("(?=(" + r"\s+".join(map(re.escape, p.split(" "))) + "))") for p in folded]

    def found(self, text: str) -> bool:
        if not has_han(text):
            return self._words.search(text) is not None
        folded = "".join(_fold(c) for c in text)  # one character for one: offsets stay the text's
        return any(_starts_word(text, match.start(1)) and _ends_word(text, match.end(1))
                   for pattern in self._han for match in pattern.finditer(folded))


# A text's entities as found: (label, key, surface, the gazetteer entries that give it), before the context gate;
# no entries: not the gazetteer's (the NER's), or of an entity no entry with a context gives
Found = tuple[str, str, str, Sequence[int]]


class EntityExtractor:
    """A spaCy pipeline (tokenizer + optional NER) with the gazetteer's EntityRuler, and for text with Han
    characters (``han_text="phrases"``) the gazetteer's names matched on the text. Thread-safe."""

    def __init__(self, model: str, gazetteer: Gazetteer | None, use_ner: bool, han_text: HanText = HAN_TEXT,
                 normalization: Normalization = NORMALIZATION):
        try:
            import spacy
        except ImportError:
            raise MissingDependencyError("spacy", "spacy", "entity extraction") from None
        package = resolve_spacy(model)
        keep = {"tok2vec", "ner"} if use_ner else set()
        try:
            probe = spacy.load(package, exclude=["tagger", "parser", "attribute_ruler", "lemmatizer", "senter"])
        except (OSError, ValueError, ImportError) as exc:
            raise ModelLoadError(f"cannot load spaCy pipeline '{model}' ({package}): {exc}") from None
        for name in list(probe.pipe_names):
            if name not in keep:
                probe.remove_pipe(name)
        if use_ner and "ner" not in probe.pipe_names:
            raise ModelLoadError(f"spaCy pipeline '{model}' ({package}) has no 'ner' component")
        self.nlp = probe
        self.spacy_version = spacy.__version__
        self.model = model
        self.package = package
        self.model_version = str(probe.meta.get("version"))
        # the pipeline's files: one re-trained or edited in place keeps its name and version (models audit F3)
        self.files_sha256 = _pipeline_sha256(package)
        self.gazetteer = gazetteer
        self.use_ner = use_ner
        self.han_text = han_text
        self.normalization = normalization
        self._han_reader = HanTextReader(gazetteer, nfkc if normalization == "nfkc" else _plain_nfkc) \
            if han_text == "phrases" else None
        # the context gate: entry number -> its context, for entries that have one
        self._contexts: dict[int, ContextPhrases] = {}
        # (label, key) -> numbers of the entries giving that entity (key None: regex entries without id), for the
        # entities some entry with a context gives (a match of another entity counts as found)
        self._sources: dict[tuple[str, str | None], tuple[int, ...]] = {}
        self._name_tokens: dict[int, frozenset[tuple[str, ...]]] = {}  # entry number -> its names as the ruler's tokens
        self._token_attributes: dict[int, str] = {}  # regex entry number -> its token attribute
        if gazetteer is not None:
            self._context_gate(gazetteer)
            ruler = probe.add_pipe("entity_ruler", before="ner" if use_ner else None,
                                   config={"validate": True, "overwrite_ents": True})
            ruler.add_patterns(self._patterns(gazetteer))  # type: ignore[attr-defined]
        self.lock = threading.Lock()
        self._query_cache: LRUCache[str, tuple[tuple[Mention, ...], tuple[SetAside, ...]]] = LRUCache(1024, per_asker=True)

    @property
    def gated(self) -> bool:
        """Whether an entry of the gazetteer has a ``context`` (then some names found may not count)."""
        return bool(self._contexts)

    def _context_gate(self, gazetteer: Gazetteer) -> None:
        """What the context gate reads: each entry's context, and for each entity that an entry with a context gives,
        every entry giving it, with its names as the EntityRuler matches them (a match counts when one of the entries
        that give it has no context or finds its own)."""
        form = nfkc if self.normalization == "nfkc" else _plain_nfkc
        for number, entry in enumerate(gazetteer.entries):
            if entry.context:
                self._contexts[number] = ContextPhrases(entry.context, form)
        if not self._contexts:
            return
        gated = {(gazetteer.entries[n].label, gazetteer.entries[n].key) for n in self._contexts}
        by_entity: dict[tuple[str, str | None], list[int]] = {}
        for number, entry in enumerate(gazetteer.entries):
            if (entry.label, entry.key) not in gated:
                continue
            by_entity.setdefault((entry.label, entry.key), []).append(number)
            if entry.regex is not None:
                self._token_attributes[number] = _token_extension(entry.regex, entry.case_sensitive, entry.label)
            self._name_tokens[number] = frozenset(self._name_words(name, entry.case_sensitive) for name in entry.names)
        self._sources = {entity: tuple(numbers) for entity, numbers in by_entity.items()}

    def _name_words(self, name: str, case_sensitive: bool) -> tuple[str, ...]:
        """A name as the EntityRuler's pattern for it matches: its tokens, as written or lower-cased."""
        if self.normalization == "nfkc":  # the name as the text it is matched in is read
            name = nfkc(name)
        return tuple(t.text if case_sensitive else t.text.lower() for t in self.nlp.make_doc(name))

    def _patterns(self, gazetteer: Gazetteer) -> list[dict[str, Any]]:
        patterns: list[dict[str, Any]] = []
        for entry in gazetteer.entries:
            key = entry.key
            for name in entry.names:
                attr = "ORTH" if entry.case_sensitive else "LOWER"
                pattern: dict[str, Any] = {"label": entry.label,
                                           "pattern": [{attr: t} for t in self._name_words(name, entry.case_sensitive)]}
                if key is not None:
                    pattern["id"] = key
                patterns.append(pattern)
            if entry.regex is not None:  # the whole token matches, within the time limit
                attribute = _token_extension(entry.regex, entry.case_sensitive, entry.label)
                pattern = {"label": entry.label, "pattern": [{"_": {attribute: True}}]}
                if key is not None:
                    pattern["id"] = key
                patterns.append(pattern)
        return patterns

    def identity(self) -> dict[str, Any]:
        identity = {
            "model": self.model,
            "package": self.package,
            "model_version": self.model_version,
            "files_sha256": self.files_sha256,
            "spacy": self.spacy_version,
            "ner": self.use_ner,
            "han_text": self.han_text,
            "gazetteer": self.gazetteer.describe() if self.gazetteer is not None else None,
        }
        if self.normalization != LEGACY_NORMALIZATION:  # a trace of an index built before replays as it was
            identity["normalization"] = self.normalization
        return identity

    def _span_sources(self, ent: Any, label: str, key: str) -> tuple[int, ...]:
        """The entries with a context gate on that give the spaCy entity ``ent`` (label, key): those of its entity
        whose name is its tokens (in their case rule) or whose regex its one token matches; () when no entry of its
        entity has a context."""
        candidates = self._sources.get((label, key), ())
        if not ent.ent_id_:  # a regex entry without id: its matches' key is their text
            candidates += self._sources.get((label, None), ())
        if not candidates:
            return ()
        assert self.gazetteer is not None
        entries = self.gazetteer.entries
        sources = []
        for number in candidates:
            entry = entries[number]
            if entry.regex is not None:
                if len(ent) == 1 and ent[0]._.get(self._token_attributes[number]):
                    sources.append(number)
            elif tuple(t.text if entry.case_sensitive else t.lower_ for t in ent) in self._name_tokens[number]:
                sources.append(number)
        return tuple(sources)

    def _mentions(self, doc: Any) -> tuple[tuple[Mention, ...], tuple[SetAside, ...]]:
        if not self._contexts:
            return _count([(ent.label_, ent.ent_id_ or entity_key(ent.text), ent.text) for ent in doc.ents]), ()
        found: list[Found] = []
        for ent in doc.ents:
            label, key = ent.label_, ent.ent_id_ or entity_key(ent.text)
            found.append((label, key, ent.text, self._span_sources(ent, label, key)))
        return self._gate(found, doc.text)

    def _gate(self, found: Sequence[Found], text: str) -> tuple[tuple[Mention, ...], tuple[SetAside, ...]]:
        """The context gate: the mentions that count (a match counts when one of the entries that give it has no
        context, or has one of whose phrases occurs in ``text``), and the gazetteer's entities set aside (those that
        do not count, by any of their names)."""
        known: dict[int, bool] = {}

        def in_context(number: int) -> bool:
            context = self._contexts.get(number)
            if context is None:
                return True
            if number not in known:
                known[number] = context.found(text)
            return known[number]

        kept: list[tuple[str, str, str]] = []
        aside: dict[tuple[str, str], tuple[str, int, set[int]]] = {}  # (label, key) -> first surface, count, entries
        for label, key, surface, sources in found:
            if not sources or any(in_context(number) for number in sources):
                kept.append((label, key, surface))
            elif key:
                first, count, numbers = aside.get((label, key), (surface, 0, set()))
                aside[(label, key)] = (first, count + 1, numbers | set(sources))
        mentions = _count(kept)
        counted = {(m.label, m.key) for m in mentions}
        set_aside = []
        for (label, key), (surface, count, numbers) in sorted(aside.items()):
            if (label, key) in counted:  # named in context by another name: it counts
                continue
            phrases = dict.fromkeys(p for n in sorted(numbers) for p in self._contexts[n].phrases)
            set_aside.append(SetAside(label, key, surface, count, tuple(phrases)))
        return mentions, tuple(set_aside)

    def _han_mentions(self, text: str, ner_docs: Sequence[tuple[int, Any]]) -> tuple[tuple[Mention, ...],
                                                                                    tuple[SetAside, ...]]:
        """A Han text's entities: the gazetteer's matches, and the NER's (found in its Latin runs, at their
        offsets) where no gazetteer match overlaps them — a gazetteer match wins, as the EntityRuler's does."""
        assert self._han_reader is not None
        spans: list[tuple[int, int, str, str, Sequence[int]]] = [
            (start, end, label, key or entity_key(text[start:end]), sources)
            for start, end, label, key, sources in self._han_reader.sourced_matches(text)]
        covered = {i for start, end, *_ in spans for i in range(start, end)}
        for offset, doc in ner_docs:
            for ent in doc.ents:
                start, end = offset + ent.start_char, offset + ent.end_char
                if covered.isdisjoint(range(start, end)):
                    spans.append((start, end, ent.label_, entity_key(ent.text), ()))
        found = [(label, key, text[start:end], sources) for start, end, label, key, sources
                 in sorted(spans, key=lambda s: s[:4])]
        if not self._contexts:
            return _count([(label, key, surface) for label, key, surface, _ in found]), ()
        return self._gate(found, text)

    def _extract_han(self, texts: Sequence[str], batch_size: int) -> list[tuple[tuple[Mention, ...],
                                                                                  tuple[SetAside, ...]]]:
        """Entities of texts holding Han characters, read in NFKC (the caller holds the lock)."""
        normalised = [self._han_reader.form(t) for t in texts]
        runs = [latin_runs(t) if self.use_ner else [] for t in normalised]
        flat = [run for found in runs for _, run in found]
        skip = [name for name in self.nlp.pipe_names if name == "entity_ruler"]  # the gazetteer is matched above
        docs = iter(list(self.nlp.pipe(flat, batch_size=batch_size, disable=skip)) if flat else [])
        return [self._han_mentions(text, [(offset, next(docs)) for offset, _ in found])
                for text, found in zip(normalised, runs)]

    def _normalised(self, text: str) -> str:
        """A text without Han characters as it is read: NFKC, or as written for an index built before."""
        return nfkc(text) if self.normalization == "nfkc" else text

    def _extract(self, texts: Sequence[str], batch_size: int) -> list[tuple[tuple[Mention, ...], tuple[SetAside, ...]]]:
        """Entities of each text, in order, and those set aside for want of context: Han texts read as phrases (when
        so set), the others by spaCy."""
        han = [i for i, t in enumerate(texts) if self._han_reader is not None and has_han(t)]
        results: list[tuple[tuple[Mention, ...], tuple[SetAside, ...]]] = [((), ())] * len(texts)
        for i, found in zip(han, self._extract_han([texts[i] for i in han], batch_size)):
            results[i] = found
        rest = sorted(set(range(len(texts))) - set(han))
        read = [self._normalised(texts[i]) for i in rest]
        for i, doc in zip(rest, self.nlp.pipe(read, batch_size=batch_size)):
            results[i] = self._mentions(doc)
        return results

    def extract(self, texts: Sequence[str], batch_size: int, progress: Any = None) -> list[tuple[Mention, ...]]:
        """Entities of each text, in order (``nlp.pipe`` in batches; ``progress(n)`` after each batch)."""
        return [mentions for mentions, _ in self.extract_with_set_aside(texts, batch_size, progress)]

    def extract_with_set_aside(self, texts: Sequence[str], batch_size: int,
                               progress: Any = None) -> list[tuple[tuple[Mention, ...], tuple[SetAside, ...]]]:
        """As :meth:`extract`, with each text's gazetteer entities set aside for want of their context."""
        results: list[tuple[tuple[Mention, ...], tuple[SetAside, ...]]] = []
        with self.lock:
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                results.extend(self._extract(batch, batch_size))
                if progress is not None:
                    progress(len(batch))
        return results

    def _read_query(self, text: str) -> tuple[tuple[Mention, ...], tuple[SetAside, ...]]:
        cached = self._query_cache.get(text)
        if cached is not None:
            return cached
        with self.lock:
            # looked up again under the lock: a stage on another thread (a parallel branch of this query's
            # pipeline, or a concurrent query) may have read the same text while this one waited
            cached = self._query_cache.get(text)
            if cached is None:
                (cached,) = self._extract([text], 1)
                self._query_cache.put(text, cached)
        return cached

    def extract_query(self, text: str) -> tuple[Mention, ...]:
        """Entities of one query text (read as a document's would be); recent queries are cached."""
        return self._read_query(text)[0]

    def with_entities(self, query: Query) -> Query:
        """``query`` with its entities as conditions read them (``query.entities``: text, id, label), extracted
        from its effective text; a query that already carries entities (a rule test may give them) is kept."""
        if query.entities:
            return query
        return query.model_copy(update={"entities": tuple(
            {"text": m.text, "id": m.key, "label": m.label} for m in self.extract_query(query.effective_text))})

    def query_set_aside(self, text: str) -> tuple[SetAside, ...]:
        """The gazetteer entities one query text names that do not count for want of their entries' context."""
        return self._read_query(text)[1]


_extractors: dict[tuple[str, str | None, str | None, bool, str, str], EntityExtractor] = {}
_extractors_lock = threading.Lock()


def _pipeline_files(model: str) -> str | None:
    """The sha256 of the spaCy pipeline's files where ``model`` is a directory (a pipeline changed in place is
    another extractor); None for an installed package (its files change only with its version)."""
    try:
        location = resolve_spacy(model)
    except ModelLoadError:
        return None  # said when it is loaded
    return _pipeline_sha256(location) if Path(location).is_dir() else None


def load_extractor(
    model: str, gazetteer: Gazetteer | None, use_ner: bool, han_text: HanText = HAN_TEXT,
    normalization: Normalization = NORMALIZATION,
) -> EntityExtractor:
    """The process-wide extractor for this model, gazetteer content, NER switch, Han mode and Unicode form
    (loaded once)."""
    key = (model, _pipeline_files(model), gazetteer.sha256 if gazetteer is not None else None, use_ner, han_text,
           normalization)
    with _extractors_lock:
        found = _extractors.get(key)
        if found is None:
            found = EntityExtractor(model, gazetteer, use_ner, han_text, normalization)
            _extractors[key] = found
        return found


# --------------------------------------------------------------------------- index component


class EntitiesIndexSettings(ComponentSettings):
    model: _APath = Field(
        DEFAULT_SPACY_MODEL, description="spaCy pipeline, as users know it (en_core_web_sm) or a path")
    gazetteer: _APath | None = Field(
        None, description="gazetteer YAML (relative to the working directory); None: NER only")
    ner: bool = Field(True, description="run the model's NER; false: gazetteer matches only (fast)")
    fields: tuple[str, ...] = Field(("title", "text"), min_length=1, description="document fields read, joined")
    batch_size: int = Field(64, ge=1, le=10_000, description="texts per nlp.pipe batch")
    max_chars: int = Field(100_000, ge=100, le=10_000_000, description="characters read per document (the rest is cut, counted)")

    @model_validator(mode="after")
    def _something(self) -> "EntitiesIndexSettings":
        if not self.ner and self.gazetteer is None:
            raise ValueError("with ner: false a gazetteer is required, or nothing would be extracted")
        return self


def _source_sha256(*modules: Any) -> str:
    """The sha256 of the modules' source files: what a build cache of their results keys on (new code, new entries)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


# The code extracting entities, as imported (this module, the pattern matching and the text form it uses)
_CODE_SHA256 = _source_sha256(sys.modules[__name__], sys.modules[compile_pattern.__module__],
                              sys.modules[word_form.__module__])  # and how a text is read (engine.textform)


def _pipeline_sha256(package: str) -> str:
    """The sha256 of a spaCy pipeline's files (a package's directory, or the pipeline directory given as a path;
    ``engine.models.files_hash``): its identity beyond name and version, and the build cache's key."""
    import importlib.util

    directory = Path(package)
    if not directory.is_dir():
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            return "unknown"
        directory = Path(locations[0])
    return files_hash(directory)


def _entities_cache_identity(extractor: EntityExtractor, settings: "EntitiesIndexSettings") -> dict[str, Any]:
    """All besides a batch's texts that decides its entities: the build cache's key."""
    from engine import __version__

    return {
        "what": "document entities", "engine": __version__, "code": _CODE_SHA256,
        "spacy": extractor.spacy_version, "pipeline": extractor.package, "pipeline_version": extractor.model_version,
        "pipeline_sha256": extractor.files_sha256, "ner": extractor.use_ner,
        "han_text": extractor.han_text, "normalization": extractor.normalization,
        "gazetteer_sha256": extractor.gazetteer.sha256 if extractor.gazetteer is not None else None,
        "batch_size": settings.batch_size,
    }


def _entity_lines(payload: bytes, rows: int, gated: bool) -> tuple[list[str], dict[str, Any] | None]:
    """A build cache entry's lines of entities.jsonl (one per document of its batch) and, when the gazetteer has a
    ``context``, a last line: what the batch set aside for want of it (``{"documents": n, "labels": {label: n}}``);
    ValueError if it is not that."""
    lines = payload.decode("utf-8").split("\n")
    aside: dict[str, Any] | None = None
    if gated:
        aside = json.loads(lines.pop()) if lines else None
        if not (isinstance(aside, dict) and isinstance(aside.get("documents"), int)
                and isinstance(aside.get("labels"), dict)
                and all(isinstance(n, int) for n in aside["labels"].values())):
            raise ValueError("the batch's names set aside for want of context are not recorded")
    if len(lines) != rows:
        raise ValueError(f"{len(lines)} documents' entities where the batch has {rows}")
    for line in lines:
        if not isinstance(json.loads(line), list):
            raise ValueError("a document's entities are not a list")
    return lines, aside


def _set_aside_counts(read: Sequence[tuple[Any, tuple[SetAside, ...]]]) -> dict[str, Any]:
    """What a batch set aside for want of context: the documents with such a name, and per label the documents'
    entities set aside (as ``labels`` counts the documents' entities)."""
    labels: Counter[str] = Counter(found.label for _, aside in read for found in aside)
    return {"documents": sum(1 for _, aside in read if aside), "labels": dict(sorted(labels.items()))}


@register_index_component
class EntitiesComponent(IndexComponent):
    """Every document's named entities (spaCy NER and an analyst gazetteer), found once when the index is built.

    boost.entity_consistency compares them with the query's, which rules and a stage's ``when`` read too, found with
    this component's model and gazetteer."""

    name = "entities"
    Settings = EntitiesIndexSettings
    uses_build_cache = True  # a batch's entities per entry, keyed by its texts

    @classmethod
    def check_files(cls, settings: ComponentSettings) -> list[tuple[tuple[str, ...], str]]:
        """The spaCy pipeline found (installed, or its directory there: not loaded) and the gazetteer read and checked
        as the build will read it (every problem, at its file:line:col), before any component runs."""
        from engine.models import resolve_spacy

        assert isinstance(settings, EntitiesIndexSettings)
        problems: list[tuple[tuple[str, ...], str]] = []
        try:
            resolve_spacy(settings.model)
        except ModelLoadError as exc:
            problems.append((("model",), str(exc)))
        if settings.gazetteer is not None:
            written = Path(settings.gazetteer).expanduser()
            try:
                load_gazetteer(written.resolve())
            except ConfigError as exc:
                where = ("" if written.is_absolute() else
                         f" (a relative gazetteer path is read from the working directory, {Path.cwd()})")
                problems.extend((("gazetteer",), f"{issue.location}  {issue.detail()}"
                                 + (where if issue.message == "file not found" else "")) for issue in exc.issues)
        return problems

    def build(
        self, documents: Sequence[Document], out_dir: Path, settings: ComponentSettings, progress: Progress,
        cache: BuildCacheSection | None = None,
    ) -> dict[str, Any]:
        assert isinstance(settings, EntitiesIndexSettings)
        gazetteer = load_gazetteer(Path(settings.gazetteer).expanduser().resolve()) if settings.gazetteer else None
        extractor = load_extractor(settings.model, gazetteer, settings.ner)
        identity = _entities_cache_identity(extractor, settings) if cache is not None else None
        total = len(documents)
        truncated: dict[int, int] = {}
        labels: Counter[str] = Counter()
        with_entities = 0
        # a gazetteer with a context: the documents that name one of its entities only out of context, and how many
        aside_documents = 0
        aside_labels: Counter[str] = Counter()

        def texts_read() -> Iterator[tuple[tuple[str, bytes], bytes]]:
            """Each document's text as read (cut to max_chars, the cut counted) and its sha256, in row order."""
            for row, doc in enumerate(documents):
                text = doc.content(settings.fields)
                if len(text) > settings.max_chars:
                    truncated[row] = len(text)
                    text = text[: settings.max_chars]
                digest = hashlib.sha256(text.encode("utf-8")).digest()
                yield (text, digest), digest

        # batches in row order, each one nlp.pipe batch, cut where their texts say (as the dense build's are): a
        # document changed, added or removed re-keys the batch it is in and a few after it, not every batch after it;
        # written as they are read, one batch held at a time
        with open(out_dir / ENTITIES_FILE, "w", encoding="utf-8") as handle:
            for read_texts in content_defined_batches(texts_read(), settings.batch_size):
                batch = [text for text, _ in read_texts]
                key = cached = None
                if cache is not None and identity is not None:
                    key = cache.key(identity, [digest for _, digest in read_texts])
                    cached = cache.get(key, len(batch),
                                       lambda payload: _entity_lines(payload, len(batch), extractor.gated))
                if cached is not None:
                    lines, aside = cached
                else:
                    read = extractor.extract_with_set_aside(batch, settings.batch_size)
                    lines = [json.dumps([[m.label, m.key, m.text, m.count] for m in found], ensure_ascii=False)
                             for found, _ in read]
                    aside = _set_aside_counts(read) if extractor.gated else None
                    if key is not None:
                        trailer = [json.dumps(aside, sort_keys=True)] if aside is not None else []
                        cache.put(key, "\n".join(lines + trailer).encode("utf-8"), len(batch))
                if aside is not None:
                    aside_documents += aside["documents"]
                    aside_labels.update(aside["labels"])
                progress("entities", len(batch), total)
                for line in lines:
                    found = json.loads(line)
                    labels.update(label for label, *_ in found)
                    with_entities += bool(found)
                    handle.write(line)
                    handle.write("\n")
        if gazetteer is not None:
            (out_dir / GAZETTEER_COPY).write_text(gazetteer.text, encoding="utf-8")
        if truncated:  # which documents' entities come from their first max_chars only (explanations say so)
            (out_dir / TRUNCATED_FILE).write_text(json.dumps(
                {"max_chars": settings.max_chars, "rows": {str(row): n for row, n in truncated.items()}}), encoding="utf-8")
        recorded = {
            "library": f"spacy {extractor.spacy_version}",
            "model": {"name": settings.model, "package": extractor.package, "version": extractor.model_version,
                      "files_sha256": extractor.files_sha256},
            "ner": settings.ner,
            "han_text": extractor.han_text,
            "normalization": extractor.normalization,
            "gazetteer": gazetteer.describe() if gazetteer is not None else None,
            "documents_with_entities": with_entities,
            "labels": dict(sorted(labels.items())),
            "truncated_documents": len(truncated),
            # no timing here: the manifest is the same for the same corpus and settings (build.json has the time)
        }
        if extractor.gated:  # recorded only for a gazetteer with a context: other manifests are as they were
            recorded["out_of_context"] = {"documents": aside_documents, "labels": dict(sorted(aside_labels.items()))}
        return recorded


class LoadedEntities:
    """Per-row entity sets of an index, read once and shared by every stage that uses them."""

    def __init__(self, directory: Path, entry: dict[str, Any], expected_rows: int):
        self.entry = entry
        self.rows: list[dict[str, tuple[Mention, ...]]] = []  # row -> label -> mentions
        try:
            with open(directory / ENTITIES_FILE, encoding="utf-8") as handle:
                for line in handle:
                    by_label: dict[str, list[Mention]] = {}
                    for label, key, text, count in json.loads(line):
                        by_label.setdefault(label, []).append(Mention(label, key, text, int(count)))
                    self.rows.append({label: tuple(found) for label, found in by_label.items()})
        except (OSError, ValueError, TypeError) as exc:
            raise SieveIndexError(f"entities component at {directory} cannot be loaded: {exc}") from None
        if len(self.rows) != expected_rows:
            raise SieveIndexError(
                f"the entities component at {directory} has {len(self.rows)} rows but the document store has "
                f"{expected_rows}; rebuild the index"
            )
        copy = directory / GAZETTEER_COPY
        self.gazetteer: Gazetteer | None = load_gazetteer(copy) if copy.is_file() else None
        self.max_chars = 0
        self.truncated: dict[int, int] = {}  # row -> the document's length, for documents read only in part
        cut = directory / TRUNCATED_FILE
        if cut.is_file():
            try:
                recorded = json.loads(cut.read_text(encoding="utf-8"))
                self.max_chars = int(recorded["max_chars"])
                self.truncated = {int(row): int(n) for row, n in recorded["rows"].items()}
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise SieveIndexError(f"entities component at {directory}: {TRUNCATED_FILE} cannot be read: {exc}") from None


def index_extractor(index: Any, entry: dict[str, Any], gazetteer: Gazetteer | None) -> EntityExtractor:
    """The extractor a query's entities must come from to be compared with the documents' of the index's
    entities component ``entry``: the spaCy pipeline (same version), NER switch, Han mode and Unicode form it was
    built with (an index that records no Han mode or form was built before there was one: ``spacy`` and ``none``,
    until it is rebuilt)."""
    model = entry.get("model") or {}
    name = str(model.get("name", DEFAULT_SPACY_MODEL))
    han_text = entry.get("han_text", LEGACY_HAN_TEXT)
    if han_text not in get_args(HanText):
        raise SieveIndexError(f"the index at {index.path} read Han text as '{han_text}', which this version of Sieve "
                              f"does not know (it knows {', '.join(get_args(HanText))}); rebuild the index")
    normalization = entry.get("normalization", LEGACY_NORMALIZATION)
    if normalization not in get_args(Normalization):
        raise SieveIndexError(f"the index at {index.path} read its texts in Unicode form '{normalization}', which this "
                              f"version of Sieve does not know (it knows {', '.join(get_args(Normalization))}); "
                              "rebuild the index")
    try:
        extractor = load_extractor(name, gazetteer, bool(entry.get("ner", True)), han_text, normalization)
    except ModelLoadError as exc:  # the name is not in the config: say where it came from
        raise ModelLoadError(
            f"the index at {index.path} extracted its documents' entities with spaCy pipeline "
            f"'{name}' (its manifest says so), and queries need the same one: {exc}"
        ) from None
    if str(model.get("version")) != extractor.model_version:
        raise ModelLoadError(
            f"the index's entities were extracted with spaCy pipeline '{name}' version {model.get('version')}, but "
            f"version {extractor.model_version} is installed; rebuild the index"
        )
    recorded = model.get("files_sha256")  # recorded since 0.11.0
    if recorded is not None and extractor.files_sha256 is not None and recorded != extractor.files_sha256:
        raise ModelLoadError(
            f"the index's entities were extracted with spaCy pipeline '{name}' version {extractor.model_version} "
            f"whose files (sha256 {recorded[:12]}) are not the ones installed now (sha256 "
            f"{extractor.files_sha256[:12]}), under the same name and version: the query's entities would be read by "
            "another model than the documents'; reinstall the pipeline the index was built with, or rebuild the index"
        )
    return extractor


def query_entity_source(index: Any, stage_id: str, component: str = "entities") -> EntityExtractor:
    """For stages that read the query's entities (rules on ``query.entities``): the extractor of the index's
    entities component, with the gazetteer the index was built with."""
    directory, entry = index.component(component, stage_id)
    copy = Path(directory) / GAZETTEER_COPY
    return index_extractor(index, entry, load_gazetteer(copy) if copy.is_file() else None)


# --------------------------------------------------------------------------- the stage


class EntityParams(StageParams):
    component: str = Field("entities", description="which entities component of the index to read")
    gazetteer: _APath | None = Field(
        None, description="None: the gazetteer the index was built with; a file named here must be identical to it"
    )
    labels: tuple[str, ...] | None = Field(None, description="labels considered; None: every label but ignore_labels")
    ignore_labels: tuple[str, ...] = Field(NUMERIC_LABELS, description="labels never considered (numbers, dates)")
    conflict_labels: tuple[str, ...] | None = Field(
        None, description="labels whose other entities conflict; None: the gazetteer's labels (closed vocabularies)"
    )
    match_weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="credit per matched query entity (÷ n)")
    conflict_weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="penalty per conflicting query entity (÷ n)")
    combine: Literal["signal", "add"] = Field(
        "signal",
        description="signal: the ledger value is the entity score and the input order is kept (feed it to "
        "fuse.weighted); add: the value is the current score + the entity score, and the list is re-ordered",
    )
    query: Literal["effective", "original"] = Field(
        "effective", description="effective: the rewritten query when a rewrite ran; original: as asked"
    )
    max_traced: int = Field(200, ge=0, le=100_000, description="documents whose matches/conflicts the trace lists")

    @model_validator(mode="after")
    def _weights(self) -> "EntityParams":
        if self.labels is not None and not self.labels:
            raise ValueError("labels: [] considers no label, so the stage would score nothing; leave labels out "
                             "(every label but ignore_labels) or name the labels to consider")
        if self.match_weight == 0 and self.conflict_weight == 0:
            raise ValueError("match_weight and conflict_weight are both 0: the stage would score nothing")
        return self


@dataclass(frozen=True)
class EntityVerdict:
    """How one document stands against the query's entities."""

    score: float
    matched: tuple[Mention, ...]
    conflicting: tuple[tuple[Mention, tuple[Mention, ...]], ...]  # query entity, the document's of that label


@register_stage
class EntityConsistency(Stage):
    """Entity agreement between the query and each candidate: matches boost, same-label conflicts penalise."""

    type_name = "boost.entity_consistency"
    version = 1
    Params = EntityParams
    produces = Port.CANDIDATES
    accepts = frozenset({Port.CANDIDATES, Port.QUERY, Port.MASK})
    signal = "entity"
    summary = "entity consistency: spaCy NER + analyst gazetteer, query vs document"
    params: EntityParams

    @classmethod
    def check_graph(cls, node: StageNode, graph: GraphView) -> Sequence[GraphIssue]:
        """A gazetteer named in the config is read and checked at compile time (``sieve validate``), when
        the compiler says where the config lives; whether it equals the index's is checked at warm-up."""
        base_dir = getattr(graph, "base_dir", None)
        params = node.params
        if base_dir is None or not isinstance(params, EntityParams) or params.gazetteer is None:
            return []
        path = Path(params.gazetteer).expanduser()
        try:
            load_gazetteer(path if path.is_absolute() else Path(base_dir) / path)
        except ConfigError as exc:
            return [GraphIssue(f"{issue.location}  {issue.detail()}", ("params", "gazetteer"), issue.severity)
                    for issue in exc.issues]
        return []

    def __init__(self, stage_id: str, params: StageParams):
        super().__init__(stage_id, params)
        self._extractor: EntityExtractor | None = None
        self._entities: LoadedEntities | None = None
        self._notes = RecentNotes()  # query -> (its entities, doc_id -> verdict)

    def warm_up(self, resources: Resources) -> None:
        index = resources.require_index(self.id)
        directory, entry = index.component(self.params.component, self.id)
        loaded: LoadedEntities = resources.shared(
            f"entities:{directory}", lambda: LoadedEntities(directory, entry, index.doc_count)
        )
        gazetteer = loaded.gazetteer
        if self.params.gazetteer is not None:
            named = load_gazetteer(resources.resolve_path(self.params.gazetteer))
            recorded = (entry.get("gazetteer") or {}).get("sha256")
            if named.sha256 != recorded:
                raise SieveIndexError(
                    f"stage '{self.id}': gazetteer {named.path} (sha256 {named.sha256[:12]}) differs from the one the "
                    f"index at {index.path} was built with (sha256 {str(recorded)[:12]}); queries and documents "
                    "would be matched against different lists. Rebuild the index with this gazetteer, or drop "
                    "`gazetteer:` from the stage to use the index's copy"
                )
            gazetteer = named
        self._extractor = index_extractor(index, entry, gazetteer)
        self._entities = loaded
        labels = gazetteer.labels if gazetteer is not None else ()
        self._conflict_labels = frozenset(self.params.conflict_labels if self.params.conflict_labels is not None else labels)

    def warm_up_warnings(self) -> list[str]:
        if self._extractor is None:
            return []
        warnings = []
        if self._extractor.normalization == LEGACY_NORMALIZATION:
            warnings.append("the index's entities were extracted from its English text as written, before Sieve read "
                            "text in Unicode NFKC (its manifest records no normalization): a decomposed 'Nestle\u0301' "
                            "is not the gazetteer's 'Nestlé', and queries are read the same way to match; rebuild the "
                            "index")
        if self._extractor.gated and self._entities is not None and "out_of_context" not in self._entities.entry:
            warnings.append("the index's entities were extracted before Sieve held a gazetteer entry's context to "
                            "its regex matches, to text with Han characters and to names several entries give (its "
                            "manifest records no out_of_context): its documents may hold entities a query no longer "
                            "gets (a code beside none of its context words), or lack some it gets; rebuild the index")
        return warnings

    def identity(self) -> dict[str, Any] | None:
        if self._extractor is None:
            return {"model": None, "loaded": False}
        return self._extractor.identity()

    def _considered(self, label: str) -> bool:
        if self.params.labels is not None:
            return label in self.params.labels
        return label not in self.params.ignore_labels

    def query_entities(self, query: Query) -> tuple[Mention, ...]:
        """The query's entities considered by this stage: extracted, plus any set on the Query."""
        assert self._extractor is not None
        text = query.text if self.params.query == "original" else query.effective_text
        found = {(m.label, m.key): m for m in self._extractor.extract_query(text)}
        for given in query.entities:  # set by an upstream stage (e.g. a rewrite): {label, id or text}
            label, given_id, given_text = given.get("label"), given.get("id"), given.get("text")
            if not isinstance(label, str):
                continue
            if isinstance(given_id, str) and given_id.strip():
                key = given_id
            elif isinstance(given_text, str) and given_text.strip():
                key = entity_key(given_text)
            else:
                continue
            found.setdefault((label, key), Mention(label, key, str(given_text if given_text is not None else key)))
        return tuple(m for _, m in sorted(found.items()) if self._considered(m.label))

    def verdict(self, query_entities: tuple[Mention, ...], row: int) -> EntityVerdict:
        """Matched and conflicting query entities for one document row, and the resulting score."""
        assert self._entities is not None
        document = self._entities.rows[row]
        matched: list[Mention] = []
        conflicting: list[tuple[Mention, tuple[Mention, ...]]] = []
        for mention in query_entities:
            same_label = document.get(mention.label, ())
            if any(m.key == mention.key for m in same_label):
                matched.append(mention)
            elif same_label and mention.label in self._conflict_labels:
                conflicting.append((mention, same_label))
        n = len(query_entities)
        score = 0.0
        if n:
            score = (self.params.match_weight * len(matched) - self.params.conflict_weight * len(conflicting)) / n
        return EntityVerdict(score, tuple(matched), tuple(conflicting))

    def run(self, ctx: StageContext) -> StageResult:
        if self._extractor is None or self._entities is None:
            raise StageError(self.id, self.qualified_name(), "the stage was not warmed up")
        (incoming,) = ctx.inputs
        began = time.perf_counter()
        query_entities = self.query_entities(ctx.query)
        extract_ms = (time.perf_counter() - began) * 1000.0
        decisions: list[Decision] = []
        details: dict[str, Any] = {"query_entities": len(query_entities), "combine": self.params.combine}
        if ctx.trace_text:
            details["query"] = [{"label": m.label, "key": m.key, "text": m.text} for m in query_entities]
        else:
            details["query"] = [{"label": m.label} for m in query_entities]
        read = ctx.query.text if self.params.query == "original" else ctx.query.effective_text
        counted = {(m.label, m.key) for m in query_entities}
        aside = [m for m in self._extractor.query_set_aside(read)
                 if self._considered(m.label) and (m.label, m.key) not in counted]
        details.update(out_of_context(aside, ctx.trace_text))
        if self._extractor.han_text == LEGACY_HAN_TEXT and has_han(read):
            decisions.append(Decision("han_text_read_by_spacy", "the index's entities were extracted before Sieve "
                                      "matched gazetteer names in Han text (its manifest records no han_text), so "
                                      "the query is read the same old way and Chinese names are mostly missed; "
                                      "rebuild the index"))
        if (self._extractor.normalization == LEGACY_NORMALIZATION and not has_han(read)
                and not unicodedata.is_normalized("NFKC", read)):
            decisions.append(Decision("text_read_as_written", "the query is not in Unicode NFKC (a decomposed accent, "
                                      "a full-width letter), and the index's entities were extracted before Sieve "
                                      "read text in NFKC (its manifest records no normalization), so the query is "
                                      "read as written too and a name may be missed; rebuild the index"))
        if not query_entities:
            decisions.append(Decision("no_query_entities", "the query names no entity this stage considers; "
                                      "every candidate scores 0"))
        verdicts = {c.doc_id: self.verdict(query_entities, c.row) for c in incoming}
        scores = {doc_id: v.score for doc_id, v in verdicts.items()}
        assert self._entities is not None
        cut = sorted(c.doc_id for c in incoming if c.row in self._entities.truncated)
        if cut:  # their entities come from the first max_chars characters only
            details["read_in_part"] = {"max_chars": self._entities.max_chars, "doc_ids": cut}
        if self.params.combine == "add":
            values = {c.doc_id: c.score + scores[c.doc_id] for c in incoming}
            order = sorted(incoming, key=lambda c: (-values[c.doc_id], c.doc_id))
            output = [c.with_score(ScoreEntry(self.id, "entity", values[c.doc_id], rank))
                      for rank, c in enumerate(order, start=1)]
        else:
            ranks = {doc_id: rank for rank, doc_id in enumerate(sorted(scores, key=lambda d: (-scores[d], d)), start=1)}
            output = [c.with_score(ScoreEntry(self.id, "entity", scores[c.doc_id], ranks[c.doc_id])) for c in incoming]
        traced: dict[str, Any] = {}
        for candidate in incoming:
            v = verdicts[candidate.doc_id]
            if (v.matched or v.conflicting) and len(traced) < self.params.max_traced:
                traced[candidate.doc_id] = self._describe(v, ctx.trace_text)
        details.update({
            "matched_documents": sum(1 for v in verdicts.values() if v.matched),
            "conflicting_documents": sum(1 for v in verdicts.values() if v.conflicting),
            "documents": traced,
        })
        self._remember(ctx.query, query_entities, verdicts)
        return StageResult(candidates=output, decisions=decisions, details=details,
                           timings_ms={"query_entities": extract_ms})

    @staticmethod
    def _describe(verdict: EntityVerdict, trace_text: bool) -> dict[str, Any]:
        """A document's matches and conflicts. Without the query's text in the trace, counts only: the labels a
        document matched, or the entities it conflicts with, intersected over documents with the index's
        entities, gave the query's entities back (a diagnosis named only in the history, in an audit)."""
        if not trace_text:
            return {"score": verdict.score, "matched": len(verdict.matched), "conflicting": len(verdict.conflicting)}
        return {
            "score": verdict.score,
            "matched": [f"{m.label}:{m.key}" for m in verdict.matched],
            "conflicting": [{"query": f"{q.label}:{q.key}", "document": [f"{d.label}:{d.key}" for d in found]}
                            for q, found in verdict.conflicting],
        }

    def _remember(self, query: Query, entities: tuple[Mention, ...], verdicts: dict[str, EntityVerdict]) -> None:
        self._notes.put_for(query, (entities, verdicts))

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        p = self.params
        description = (
            f"entity consistency: ({p.match_weight:g} x matched - {p.conflict_weight:g} x conflicting) / query "
            f"entities; conflict labels {sorted(self._conflict_labels) if self._extractor else '?'}"
            + ("; added to the current score" if p.combine == "add" else "")
            + f"; rank {rank} in stage '{self.id}'"
        )
        found = self._notes.get_for(query)
        if found is not None:
            entities, verdict = found[0], found[1].get(candidate.doc_id)
        elif self._extractor is not None:
            entities = self.query_entities(query)
            verdict = self.verdict(entities, candidate.row)
        else:
            return Explanation(value, description)
        if verdict is None:
            verdict = self.verdict(entities, candidate.row)
        n = len(entities)
        matched = {(m.label, m.key) for m in verdict.matched}
        conflicts = {(q.label, q.key): found_docs for q, found_docs in verdict.conflicting}
        details = []
        for mention in entities:
            name = f"{mention.label} '{mention.key}'" if trace_text else f"{mention.label} {REDACTED}"
            if (mention.label, mention.key) in matched:
                details.append(Explanation(p.match_weight / n, f"matched: the document names {name}; +{p.match_weight:g}/{n}"))
            elif (mention.label, mention.key) in conflicts:
                others = (" (" + ", ".join(f"'{d.key}'" for d in conflicts[(mention.label, mention.key)]) + ")"
                          if trace_text else "")  # which ones would name the query's by exclusion
                details.append(Explanation(
                    -p.conflict_weight / n,
                    f"conflict: the query names {name}, the document names other {mention.label}{others}; "
                    f"-{p.conflict_weight:g}/{n}",
                ))
            else:
                details.append(Explanation(0.0, f"absent: the document does not name {name} nor another {mention.label}"
                                           if mention.label in self._conflict_labels else
                                           f"absent: the document does not name {name}; adds 0"))
        length = self._entities.truncated.get(candidate.row) if self._entities is not None else None
        if length is not None:  # a name beyond the cut is not seen: a conflict may be an artefact of it
            details.append(Explanation(0.0, f"the document's entities were read from its first "
                                       f"{self._entities.max_chars} characters of {length} (the index's max_chars)"))
        if p.combine == "add":
            details.append(Explanation(value - verdict.score, "current score before this stage"))
        return Explanation(value, description, tuple(details))
