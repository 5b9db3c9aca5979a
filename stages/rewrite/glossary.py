"""Analyst glossary rewrites: synonym expansion and canonical-term replacement from a YAML file.

A glossary file lists groups of terms that mean the same thing to the analyst's users::

    version: 1
    entries:
      - {id: phone-case, terms: [phone case, phone cover], action: expand}
      - {id: metformin, terms: [Glucophage, metformin hydrochloride], canonical: metformin, action: replace}

``expand`` (the default): when one term of the group occurs in the query, the group's other terms
are appended to it (``phone cover`` -> ``phone cover phone case``), so lexical recall finds either
wording. ``replace``: every non-canonical term is replaced by ``canonical``. Terms match whole
words, case-insensitively; Chinese terms match anywhere (Chinese has no spaces between words).
Longer terms win over shorter ones that overlap them. Errors are reported all at once, located at
``file:line:col``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.errors import ConfigError, ConfigIssue
from engine.strictness import NoCoercion

_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
ENTRY_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"
_ENTRY_ID = re.compile(ENTRY_ID_PATTERN)


def _err(message: str) -> PydanticCustomError:
    """A validation error worded for the analyst (no pydantic ``Value error,`` prefix)."""
    return PydanticCustomError("glossary", message)


class GlossaryEntry(NoCoercion):
    """One group of equivalent terms and what to do when one of them occurs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(max_length=100, description="names the entry in the trace", json_schema_extra={"pattern": ENTRY_ID_PATTERN})
    terms: tuple[str, ...] = Field(description="the terms of the group, matched whole-word, any case")
    action: Literal["expand", "replace"] = Field(
        "expand", description="expand: append the group's other terms; replace: substitute `canonical`"
    )
    canonical: str | None = Field(None, description="the term a `replace` entry substitutes")
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
    entries: tuple[GlossaryEntry, ...]

    @field_validator("entries")
    @classmethod
    def _not_empty(cls, entries: tuple[GlossaryEntry, ...]) -> tuple[GlossaryEntry, ...]:
        if not entries:
            raise _err("list at least one entry")
        return entries


class _Envelope(BaseModel):
    """A glossary file's top level, its entries not yet validated (each is validated on its own, so one
    bad entry does not hide the problems of the others)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = Field(description="glossary file format version")
    description: str | None = None
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


def _pattern(term: str) -> str:
    """A regex for ``term``: whole words for Latin script, anywhere for Chinese; any whitespace run."""
    body = r"\s+".join(re.escape(part) for part in term.split())
    if _HAN.search(term):
        return body
    return rf"(?<!\w){body}(?!\w)"


@dataclass(frozen=True)
class Glossary:
    """A validated glossary file, its identity, and a matcher over all its terms."""

    path: str
    sha256: str
    entries: tuple[GlossaryEntry, ...]

    def describe(self) -> dict[str, Any]:
        return {"file": self.path, "sha256": self.sha256, "entries": len(self.entries)}

    def _matcher(self) -> tuple[re.Pattern[str], dict[str, GlossaryEntry]]:
        cached = self.__dict__.get("_compiled")
        if cached is not None:
            return cached
        owner: dict[str, GlossaryEntry] = {}
        for entry in self.entries:
            for term in entry.terms:
                owner.setdefault(_key(term), entry)
        terms = sorted(owner, key=lambda t: (-len(t), t))  # longest first: alternation takes the first that fits
        regex = re.compile("|".join(_pattern(t) for t in terms), re.IGNORECASE)
        object.__setattr__(self, "_compiled", (regex, owner))
        return regex, owner

    def apply(self, text: str) -> tuple[str, list[GlossaryHit]]:
        """The text with every glossary rewrite applied, and what was applied (in text order)."""
        regex, owner = self._matcher()
        hits: list[GlossaryHit] = []
        pieces: list[str] = []
        appended: list[str] = []
        present = {_key(m.group(0)) for m in regex.finditer(text)}
        cursor = 0
        for match in regex.finditer(text):
            entry = owner[_key(match.group(0))]
            if entry.action == "replace":
                assert entry.canonical is not None
                if _key(match.group(0)) == _key(entry.canonical):
                    continue
                pieces.append(text[cursor : match.start()])
                pieces.append(entry.canonical)
                cursor = match.end()
                hits.append(GlossaryHit(entry.id, "replace", match.group(0), entry.canonical, match.start(), match.end()))
            else:
                others = [t for t in entry.terms if _key(t) not in present and t not in appended]
                if others:
                    appended.extend(others)
                    hits.append(GlossaryHit(entry.id, "expand", match.group(0), " ".join(others), match.start(), match.end()))
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


def load_glossary(path: str | Path) -> Glossary:
    """Load and validate a glossary YAML file; every problem at once, located at file:line:col.

    Each entry is validated on its own; duplicate ids are found among every entry by the id as
    written, duplicate terms among every entry's text terms, whether or not the entry validated.
    """
    from engine.yamlsource import load_yaml_file
    from rules.messages import analyst_issues

    path = Path(path)
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
    raw_entries = data.get("entries") if isinstance(data.get("entries"), list) else []
    entries: list[GlossaryEntry] = []
    seen_terms: dict[str, tuple[int, str]] = {}
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
        terms = list(enumerate(entry.terms)) if entry is not None else _raw_terms(raw)
        for position, term in terms:
            found = seen_terms.get(_key(term))
            if found is not None and found[0] != number:
                issues.append(ConfigIssue(
                    source.locate(("entries", number, "terms", position)), f"entries.{number}.terms.{position}",
                    f"'{term}' is already a term of entry '{found[1]}' (entries.{found[0]}); a term may belong to one entry",
                ))
            else:
                seen_terms[_key(term)] = (number, named)
        if entry is not None:
            entries.append(entry)
    if issues:
        raise ConfigError(issues)
    raw_bytes = path.read_bytes()
    return Glossary(str(path), hashlib.sha256(raw_bytes).hexdigest(), tuple(entries))
