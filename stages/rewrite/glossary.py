"""Analyst glossary rewrites: synonym expansion and canonical-term replacement from a YAML file.

A glossary file lists groups of terms that mean the same thing to the analyst's users::

    version: 1
    entries:
      - {id: phone-case, terms: [phone case, phone cover], action: expand}
      - {id: metformin, terms: [Glucophage, metformin hydrochloride], canonical: metformin, action: replace}

``expand`` (the default): when one term of the group occurs in the query, the group's other terms
are appended to it (``phone cover`` -> ``phone cover phone case``), so lexical recall finds either
wording. ``replace``: every non-canonical term is replaced by ``canonical``.

Matching works on tokens, not on a regular expression over every term: the text is cut into word
tokens (runs of letters and digits), single punctuation characters and, for Chinese, single Han
characters whose word boundaries jieba gives (dictionary segmentation, no HMM guessing); a term is
the same token sequence, whitespace between tokens where the term has a space (any run of
whitespace matches). At each token the longest term that starts there wins, so the cost is that of
the text times the longest term, whatever the glossary's size. A term matches whole words: it
starts and ends on a word boundary (for Chinese, on a jieba word boundary: 药 does not match inside
药物 or 药房). Case: a term written in capitals (no lower-case letter: ``IT``, ``MS``, ``US``,
``WHO``) matches only as written, any other in any case; ``case_sensitive`` (the file's default, an
entry's override) sets it for every term. Errors are reported all at once, located at
``file:line:col``; what is allowed but probably not meant (a replacement that another entry would
rewrite: the glossary is applied in one pass; a replacement by a pronoun) are warnings.
"""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.cache import LRUCache
from engine.errors import ConfigError, ConfigIssue
from engine.strictness import NoCoercion, matchable
from engine.textform import IN_WORD_DASH, WORD_CHARACTERS, unseen_or_hyphen
from stages.text import HAN, HAN_RANGES, quiet_jieba

_HAN_RUN = re.compile(f"[{HAN_RANGES}]+")
# a character and the combining marks that follow it (the blocks of diacritics, and kana voicing marks)
_CLUSTER = re.compile("(?s).[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f\u3099\u309a]*")
# a Han character, a run of other word characters (letters, digits, '_'), or any other visible character
_TOKEN = re.compile(rf"[{HAN_RANGES}]|[^\W{HAN_RANGES}]+|\S")
_LATIN_WORD = re.compile(rf"[^\W{HAN_RANGES}]")
ENTRY_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"
_ENTRY_ID = re.compile(ENTRY_ID_PATTERN)
# A replacement by one of these loses the term: recall then searches for a pronoun.
PRONOUNS = frozenset(
    "it its they them their theirs this that these those he him his she her hers we us our you your i me my "
    "one ones something someone 它 它们 他 她 他们 她们 其 此 这 那 这个 那个 这些 那些 该".split()
)


def _err(message: str) -> PydanticCustomError:
    """A validation error worded for the analyst (no pydantic ``Value error,`` prefix)."""
    return PydanticCustomError("glossary", message)


class GlossaryEntry(NoCoercion):
    """One group of equivalent terms and what to do when one of them occurs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(max_length=100, description="names the entry in the trace", json_schema_extra={"pattern": ENTRY_ID_PATTERN})
    terms: tuple[Annotated[str, matchable("term")], ...] = Field(
        description="the terms of the group, matched whole-word")
    action: Literal["expand", "replace"] = Field(
        "expand", description="expand: append the group's other terms; replace: substitute `canonical`"
    )
    canonical: Annotated[str, matchable("canonical", "write the term the others are replaced by")] | None = Field(
        None, description="the term a `replace` entry substitutes")
    case_sensitive: bool | None = Field(
        None, description="true: terms match only as written; false: in any case; unset: the file's `case_sensitive`"
    )
    description: str | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ENTRY_ID.match(value):
            raise _err(
                "not a valid entry id: start with a letter, digit or '_' and use only letters, digits, '_', '.' "
                "and '-' (no spaces)"
            )
        return value

    @field_validator("terms")
    @classmethod
    def _terms(cls, terms: tuple[str, ...]) -> tuple[str, ...]:
        if not terms:
            raise _err("list at least one term")
        for term in terms:
            if not term.strip():
                raise _err("terms must not be empty strings")
        return tuple(" ".join(t.split()) for t in terms)

    @model_validator(mode="after")
    def _action_fields(self) -> "GlossaryEntry":
        if self.action == "replace":
            if self.canonical is None or not self.canonical.strip():
                raise _err("a `replace` entry needs `canonical`: the term the others are replaced by")
        elif self.canonical is not None:
            raise _err("`canonical` is only used by `action: replace`; an `expand` entry adds every other term")
        if self.action == "expand" and len(self.terms) < 2:
            raise _err("an `expand` entry needs at least two terms (one to find, one to add)")
        return self


class GlossaryFile(NoCoercion):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = Field(description="glossary file format version")
    description: str | None = None
    case_sensitive: bool | None = Field(
        None, description="true: every term matches only as written; false: in any case; unset (default): a term "
        "written in capitals (IT, MS, US) only as written, any other in any case",
    )
    entries: tuple[GlossaryEntry, ...]

    @field_validator("entries")
    @classmethod
    def _not_empty(cls, entries: tuple[GlossaryEntry, ...]) -> tuple[GlossaryEntry, ...]:
        if not entries:
            raise _err("list at least one entry")
        return entries


class _Envelope(NoCoercion):
    """A glossary file's top level, its entries not yet validated (each is validated on its own, so one
    bad entry does not hide the problems of the others)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = Field(description="glossary file format version")
    description: str | None = None
    case_sensitive: bool | None = None
    entries: list[Any]

    @field_validator("entries")
    @classmethod
    def _not_empty(cls, entries: list[Any]) -> list[Any]:
        if not entries:
            raise _err("list at least one entry")
        return entries


@dataclass(frozen=True)
class GlossaryHit:
    """One glossary rewrite applied to a text."""

    entry: str
    action: str
    matched: str  # the text as it occurred
    added: str  # the replacement (replace) or the appended terms (expand)
    start: int  # character offsets of ``matched`` in the text the glossary was applied to
    end: int


def _key(term: str) -> str:
    return " ".join(term.split()).casefold()


def is_acronym(term: str) -> bool:
    """A term written in capitals: at least one upper-case letter and no lower-case one ('IT', 'T2DM', '.NET')."""
    return term.isupper()


def term_case_sensitive(term: str, entry_setting: bool | None, file_setting: bool | None) -> bool:
    """Whether ``term`` matches only as written: the entry's setting, else the file's, else: written in capitals."""
    if entry_setting is not None:
        return entry_setting
    if file_setting is not None:
        return file_setting
    return is_acronym(term)


@dataclass(frozen=True)
class _Token:
    text: str
    start: int
    end: int
    spaced: bool  # whitespace between it and the token before
    han: bool


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    previous_end = 0
    for match in _TOKEN.finditer(text):
        start = match.start()
        word = match.group(0)
        tokens.append(_Token(word, start, match.end(), start > previous_end, HAN.match(word) is not None))
        previous_end = match.end()
    return tokens


def _nfkc(text: str) -> tuple[str, list[int], list[int]]:
    """``text`` in NFKC (full-width 'ＨＩＶ' is 'HIV', the ligature 'ﬁ' is 'fi', as BM25 reads them), with, for
    each of its characters, where it starts and ends in ``text``: matches are found in the normal form and
    rewritten in the text as typed."""
    if unicodedata.is_normalized("NFKC", text) and not unseen_or_hyphen(text):
        return text, list(range(len(text))), list(range(1, len(text) + 1))
    pieces, starts, ends = [], [], []
    # a character with the combining marks after it (a decomposed 'é' is 'e' + U+0301: composed only together),
    # so that each piece knows where it was typed; soft hyphens and zero-width characters go, hyphens are '-'
    # and so is an en dash between letters (engine.textform), as the gazetteer and rules read them
    for cluster in _CLUSTER.finditer(IN_WORD_DASH.sub("-", text)):  # one character for one: offsets hold
        folded = unicodedata.normalize("NFKC", cluster.group(0).translate(WORD_CHARACTERS))
        pieces.append(folded)
        starts.extend([cluster.start()] * len(folded))
        ends.extend([cluster.end()] * len(folded))
    return "".join(pieces), starts, ends


def _term_key(term: str, fold: bool) -> tuple[str, ...]:
    """A term as the token sequence it matches: a token after whitespace carries a leading space."""
    tokens = _tokens(_nfkc(term)[0])
    parts = [(" " if t.spaced and i else "") + (t.text.casefold() if fold else t.text) for i, t in enumerate(tokens)]
    return tuple(parts)


_JIEBA_LOCK = threading.Lock()


def _han_boundaries(text: str) -> set[int]:
    """Character offsets where a Chinese word starts or ends (jieba, dictionary only), for every run of Han
    characters in ``text``."""
    jieba = quiet_jieba()
    boundaries: set[int] = set()
    for run in _HAN_RUN.finditer(text):
        offset = run.start()
        boundaries.add(offset)
        with _JIEBA_LOCK:
            words = jieba.lcut(run.group(0), HMM=False)
        for word in words:
            offset += len(word)
            boundaries.add(offset)
    return boundaries


@dataclass(frozen=True)
class _Index:
    """Term token sequences -> (entry, term), split by case sensitivity; the lengths (in tokens) of the terms
    that start with each (case-folded) first token, longest first."""

    exact: dict[tuple[str, ...], GlossaryEntry]
    folded: dict[tuple[str, ...], GlossaryEntry]
    lengths: dict[str, tuple[int, ...]]
    han: bool  # some term has Han characters: Chinese word boundaries are needed


def build_index(entries: tuple[GlossaryEntry, ...], file_case_sensitive: bool | None) -> _Index:
    exact: dict[tuple[str, ...], GlossaryEntry] = {}
    folded: dict[tuple[str, ...], GlossaryEntry] = {}
    lengths: dict[str, set[int]] = {}
    han = False
    for entry in entries:
        for term in entry.terms:
            sensitive = term_case_sensitive(term, entry.case_sensitive, file_case_sensitive)
            key = _term_key(term, fold=not sensitive)
            if not key:
                continue
            (exact if sensitive else folded).setdefault(key, entry)
            lengths.setdefault(key[0].casefold(), set()).add(len(key))
            han = han or HAN.search(term) is not None
    return _Index(exact, folded, {k: tuple(sorted(v, reverse=True)) for k, v in lengths.items()}, han)


@dataclass(frozen=True)
class Glossary:
    """A validated glossary file, its identity, and a token index over all its terms."""

    path: str
    sha256: str
    entries: tuple[GlossaryEntry, ...]
    case_sensitive: bool | None = None
    # problems that do not stop the glossary from loading (chains, pronoun replacements), located
    warnings: tuple[ConfigIssue, ...] = field(default=(), compare=False)

    def describe(self) -> dict[str, Any]:
        return {"file": self.path, "sha256": self.sha256, "entries": len(self.entries)}

    def prepare(self) -> None:
        """Build the term index (and load jieba when a term is Chinese): at warm-up, not on the first query."""
        index = self._index()
        if index.han:
            with _JIEBA_LOCK:
                quiet_jieba().initialize()

    def _index(self) -> _Index:
        index = self.__dict__.get("_built")
        if index is None:
            index = build_index(self.entries, self.case_sensitive)
            object.__setattr__(self, "_built", index)
        return index

    def matches(self, text: str) -> list[tuple[int, int, GlossaryEntry]]:
        """(start, end, entry) of every term occurrence in ``text``, left to right, the longest at each place."""
        index = self._index()
        text, starts, ends = _nfkc(text)
        tokens = _tokens(text)
        boundaries = _han_boundaries(text) if index.han and HAN.search(text) else set()
        found: list[tuple[int, int, GlossaryEntry]] = []
        count = len(tokens)
        i = 0
        while i < count:
            first = tokens[i]
            lengths = index.lengths.get(first.text.casefold())
            if lengths and self._starts_word(text, first, boundaries):
                hit = self._longest(text, tokens, i, lengths, index, boundaries)
                if hit is not None:
                    length, entry = hit
                    end = tokens[i + length - 1].end
                    found.append((starts[first.start], ends[end - 1], entry))
                    i += length
                    continue
            i += 1
        return found

    @staticmethod
    def _starts_word(text: str, token: _Token, boundaries: set[int]) -> bool:
        if token.han:
            return token.start in boundaries
        return token.start == 0 or not _LATIN_WORD.match(text[token.start - 1])

    @staticmethod
    def _ends_word(text: str, token: _Token, boundaries: set[int]) -> bool:
        if token.han:
            return token.end in boundaries
        return token.end == len(text) or not _LATIN_WORD.match(text[token.end])

    def _longest(self, text: str, tokens: list[_Token], i: int, lengths: tuple[int, ...], index: _Index,
                 boundaries: set[int]) -> tuple[int, GlossaryEntry] | None:
        for length in lengths:
            last = i + length - 1
            if last >= len(tokens) or not self._ends_word(text, tokens[last], boundaries):
                continue
            span = tokens[i : last + 1]
            if index.exact:
                entry = index.exact.get(tuple((" " if t.spaced and n else "") + t.text for n, t in enumerate(span)))
                if entry is not None:
                    return length, entry
            if index.folded:
                entry = index.folded.get(
                    tuple((" " if t.spaced and n else "") + t.text.casefold() for n, t in enumerate(span))
                )
                if entry is not None:
                    return length, entry
        return None

    def apply(self, text: str) -> tuple[str, list[GlossaryHit]]:
        """The text with every glossary rewrite applied, and what was applied (in text order)."""
        found = self.matches(text)
        hits: list[GlossaryHit] = []
        pieces: list[str] = []
        appended: list[str] = []
        present = {_key(text[start:end]) for start, end, _ in found}
        cursor = 0
        for start, end, entry in found:
            matched = text[start:end]
            if entry.action == "replace":
                assert entry.canonical is not None
                if _key(matched) == _key(entry.canonical):
                    continue
                pieces.append(text[cursor:start])
                pieces.append(entry.canonical)
                cursor = end
                hits.append(GlossaryHit(entry.id, "replace", matched, entry.canonical, start, end))
            else:
                others = [t for t in entry.terms if _key(t) not in present and t not in appended]
                if others:
                    appended.extend(others)
                    hits.append(GlossaryHit(entry.id, "expand", matched, " ".join(others), start, end))
        pieces.append(text[cursor:])
        rewritten = "".join(pieces)
        if appended:
            rewritten = rewritten.rstrip() + " " + " ".join(appended)
        return rewritten, hits


def _raw_terms(raw: Any) -> list[tuple[int, str]]:
    """(position, term) of the text terms of an entry that failed validation (for duplicate checks)."""
    terms = raw.get("terms") if isinstance(raw, dict) else None
    if not isinstance(terms, list):
        return []
    return [(position, " ".join(t.split())) for position, t in enumerate(terms) if isinstance(t, str) and t.strip()]


def _optional_bool(value: Any) -> bool | None:
    """The file's ``case_sensitive`` to check the entries' terms with while its problems are collected; anything but
    true or false is reported by ``_Envelope`` (strict: ``"true"`` and ``1`` are errors, never ignored)."""
    return value if isinstance(value, bool) else None


def _warnings(entries: list[tuple[int, GlossaryEntry]], probe: Glossary, source: Any) -> list[ConfigIssue]:
    """Replacements the analyst probably did not mean: one that another entry's term would match (the glossary
    is applied in one pass, so that entry does not rewrite it), and one that is a pronoun."""
    issues: list[ConfigIssue] = []
    numbers = {entry.id: number for number, entry in entries}
    for number, entry in entries:
        if entry.action != "replace" or entry.canonical is None:
            continue
        canonical = entry.canonical
        where = source.locate(("entries", number, "canonical"))
        dotted = f"entries.{number}.canonical"
        if " ".join(canonical.split()).casefold() in PRONOUNS:
            issues.append(ConfigIssue(where, dotted, (
                f"entry '{entry.id}' replaces its terms by the pronoun '{canonical}': the rewritten query then "
                "searches for a pronoun and loses the term; name the thing instead"), "warning"))
        for start, end, other in probe.matches(canonical):
            if other.id == entry.id:
                continue
            whole = start == 0 and end == len(canonical)
            found = "is" if whole else f"contains '{canonical[start:end]}',"
            issues.append(ConfigIssue(where, dotted, (
                f"the replacement '{canonical}' of entry '{entry.id}' {found} a term of entry "
                f"'{other.id}' (entries.{numbers[other.id]}): the glossary is applied in one pass, so '{other.id}' "
                f"does not rewrite what '{entry.id}' put in (no chain); write the final term as the canonical"),
                "warning"))
    return issues


_CACHE: LRUCache[tuple[str, str], Glossary] = LRUCache(16)


def load_glossary(path: str | Path) -> Glossary:
    """Load and validate a glossary YAML file; every problem at once, located at file:line:col.

    Each entry is validated on its own; duplicate ids are found among every entry by the id as
    written, duplicate terms among every entry's text terms, whether or not the entry validated.
    A file already loaded with the same content (the compile-time check, then warm-up) is not parsed again.
    """
    from engine.yamlsource import check_path

    path = Path(path)
    check_path(path)  # a NUL, a lone surrogate or an over-long name: said, before the system is asked
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        digest = None
    cached = _CACHE.get((str(path), digest)) if digest is not None else None
    if cached is not None:
        return cached
    glossary = _load(path)
    _CACHE.put((glossary.path, glossary.sha256), glossary)
    return glossary


def _load(path: Path) -> Glossary:
    from engine.yamlsource import load_yaml_file
    from rules.messages import analyst_issues

    loaded = load_yaml_file(path)
    source = loaded.source
    data = loaded.data
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(source.locate(()), "", "a glossary is a mapping with `version` and `entries`")])
    issues: list[ConfigIssue] = []
    try:
        _Envelope.model_validate(data)
    except ValidationError as exc:
        issues.extend(analyst_issues(exc, source, (), _Envelope))
    file_case_sensitive = _optional_bool(data.get("case_sensitive"))
    raw_entries = data.get("entries") if isinstance(data.get("entries"), list) else []
    entries: list[tuple[int, GlossaryEntry]] = []
    # a term's case-folded form -> (entry number, entry name, the term as written, matched only as written?, its
    # position in the entry's terms)
    seen_terms: dict[str, list[tuple[int, str, str, bool, int]]] = {}
    seen_ids: dict[str, int] = {}
    for number, raw in enumerate(raw_entries):
        entry: GlossaryEntry | None = None
        if not isinstance(raw, dict):
            issues.append(ConfigIssue(source.locate(("entries", number)), f"entries.{number}",
                                      "each entry is a mapping with `id` and `terms`"))
            continue
        try:
            entry = GlossaryEntry.model_validate(raw)
        except ValidationError as exc:
            issues.extend(analyst_issues(exc, source, ("entries", number), GlossaryEntry))
        entry_id = entry.id if entry is not None else raw.get("id")
        if isinstance(entry_id, str):
            if entry_id in seen_ids:
                issues.append(ConfigIssue(source.locate(("entries", number, "id")), f"entries.{number}.id",
                                          f"id '{entry_id}' is already used by entries.{seen_ids[entry_id]}"))
            else:
                seen_ids[entry_id] = number
        named = entry_id if isinstance(entry_id, str) else f"entries.{number}"
        entry_setting = entry.case_sensitive if entry is not None else _optional_bool(raw.get("case_sensitive"))
        terms = list(enumerate(entry.terms)) if entry is not None else _raw_terms(raw)
        for position, term in terms:
            sensitive = term_case_sensitive(term, entry_setting, file_case_sensitive)
            # two terms clash when one could match what the other matches: same letters in another case
            # clash unless both match only as written ('MS' and 'Ms')
            clashes = [seen for seen in seen_terms.get(_key(term), ())
                       if not (sensitive and seen[3] and seen[2] != term)]
            clash = next((seen for seen in clashes if seen[0] != number), None)
            # within one entry, a term listed again matches nothing the first did not (and an `expand` entry of one
            # term listed twice has nothing to add)
            repeat = next((seen for seen in clashes if seen[0] == number), None)
            where = source.locate(("entries", number, "terms", position)), f"entries.{number}.terms.{position}"
            if clash is not None:
                issues.append(ConfigIssue(*where, f"'{term}' is already a term of entry '{clash[1]}' "
                                          f"(entries.{clash[0]}); a term may belong to one entry"))
            elif repeat is not None:
                issues.append(ConfigIssue(*where, (
                    f"'{term}' is listed twice in this entry (terms.{repeat[4]})" if repeat[2] == term else
                    f"'{term}' differs from terms.{repeat[4]} '{repeat[2]}' only in case, and one of them matches in "
                    "any case (a term does unless it is written in capitals or case_sensitive is true)")
                    + "; list each term once"))
            else:
                seen_terms.setdefault(_key(term), []).append((number, named, term, sensitive, position))
        if entry is not None:
            entries.append((number, entry))
    if issues:
        raise ConfigError(issues)
    assert loaded.sha256 is not None
    glossary = Glossary(str(path), loaded.sha256, tuple(e for _, e in entries),  # the bytes parsed, read once
                        file_case_sensitive)
    # the warnings look the replacements up in the glossary's own index (built once, kept for warm-up)
    object.__setattr__(glossary, "warnings", tuple(_warnings(entries, glossary, source)))
    return glossary
