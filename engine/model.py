"""The data model every stage speaks: queries, candidates with their score ledger, drops.

Candidates are immutable. A stage that scores a candidate returns a new candidate whose ledger
has one more entry; nobody overwrites another stage's score. Orderings are deterministic: equal
scores break ties on ``doc_id``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.errors import QueryError

DEFAULT_MAX_QUERY_CHARS = 4096
# What Sieve reads as a moment, everywhere (a query's as_of, a document's date, a rule's date): ISO 8601's
# calendar date (2025-06-01 or 20250601), optionally a time after T, t or a space, optionally Z, z or an offset.
# Python's fromisoformat alone takes any character between date and time ("2025-06-01x10:00") and week dates.
_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}|\d{8}")
_ISO_MOMENT = re.compile(
    f"(?:{_DATE_ONLY.pattern})"
    r"(?:[Tt ]\d{2}(?::?\d{2}(?::?\d{2}(?:[.,]\d{1,9})?)?)?(?:[Zz]|[+-]\d{2}(?::?\d{2}(?::?\d{2})?)?)?)?")


def utc(moment: datetime) -> datetime | None:
    """``moment`` in UTC (a naive one is UTC already); None when that falls outside years 1-9999 (year 1 at
    +14:00 is year 0 in UTC). Every moment Sieve compares is in UTC, so that a month back from as_of, or its hour,
    is counted on one clock whatever offset the caller wrote it with."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    if moment.tzinfo is timezone.utc:
        return moment  # the usual case, on the hot path of date tests
    try:
        return moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        return None


def iso_moment(text: str) -> datetime | None:
    """An ISO 8601 date or date-time (``_ISO_MOMENT``; a date alone is its UTC midnight) as an aware UTC
    datetime; None when it is not one, or not one within years 1-9999 in UTC."""
    text = text.strip()
    if len(text) > 40 or not _ISO_MOMENT.fullmatch(text):
        return None
    if text[-1] in "Zz":
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return utc(parsed)


_UNPADDED = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})(?=$|[Tt ])")


def not_a_moment(text: str) -> str:
    """Why ``text`` is not a moment :func:`iso_moment` reads, for a message that quotes it: an impossible date or time
    written in the right form says which part is wrong (not "write ISO 8601" to someone who did)."""
    stripped = text.strip()
    example = "e.g. 2026-01-31 or 2026-01-31T12:00:00Z"
    unpadded = _UNPADDED.match(stripped)
    if unpadded is not None and not _ISO_MOMENT.fullmatch(stripped):
        year, month, day = unpadded.groups()
        padded = f"{year}-{int(month):02d}-{int(day):02d}{stripped[unpadded.end():]}"
        return (f"write the month and day with two digits ({padded})" if iso_moment(padded) is not None
                else not_a_moment(padded))
    if len(stripped) > 40 or not _ISO_MOMENT.fullmatch(stripped):
        return f"not an ISO 8601 date or date-time ({example})"
    try:
        datetime.fromisoformat(stripped[:-1] + "+00:00" if stripped[-1] in "Zz" else stripped)
    except ValueError as exc:  # the form is right, a value is not: "day is out of range for month"
        return f"not a real date or time: {exc}"
    return "outside years 1-9999 in UTC"


def is_date_only(text: str) -> bool:
    """Whether ``text`` is a calendar date alone (2025-06-30, 20250630), not a date-time."""
    return _DATE_ONLY.fullmatch(text.strip()) is not None


LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*")  # BCP 47's shape: en, zh-CN, zh-Hant-TW


class UserContext(BaseModel):
    """Who is asking: used by access rules and recorded in the trace."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_id: str | None = None
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    jurisdictions: tuple[str, ...] = ()
    attributes: dict[str, str] = Field(default_factory=dict)

    def asker(self) -> tuple[Any, ...]:
        """Who this is, as a cache partition (``engine.cache.asked_by``): every field, so no two users share one."""
        return (self.user_id, self.roles, self.groups, self.jurisdictions, tuple(sorted(self.attributes.items())))


class Query(BaseModel):
    """A query as the pipeline sees it. ``as_of`` is fixed once so a replay sees the same time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    rewritten: str | None = None
    history: tuple[str, ...] = ()
    user: UserContext = Field(default_factory=UserContext)
    as_of: datetime
    language: str | None = None
    entities: tuple[dict[str, Any], ...] = ()

    @field_validator("as_of")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        """In UTC (naive is UTC): rules count months and read hours on one clock, whatever the offset given."""
        moment = utc(value)
        if moment is None:
            raise ValueError(f"as_of {value.isoformat()} is outside years 1-9999 in UTC")
        return moment

    @property
    def effective_text(self) -> str:
        """The text recall should use: the rewrite when there is one."""
        return self.rewritten if self.rewritten is not None else self.text

    @classmethod
    def create(
        cls,
        text: str,
        *,
        history: Sequence[str] = (),
        user: UserContext | None = None,
        as_of: datetime | None = None,
        language: str | None = None,
        max_chars: int = DEFAULT_MAX_QUERY_CHARS,
        max_history_turns: int | None = None,
    ) -> "Query":
        """Validate user input into a Query; empty or oversized text is a QueryError."""
        if not isinstance(text, str):
            raise QueryError(f"query text must be a string, got {type(text).__name__}")
        if not _visible(text):
            raise QueryError("query is empty: give some text to search for")
        _check_text(text, "query")
        if len(text) > max_chars:
            raise QueryError(
                f"query is {len(text)} characters long; the limit is {max_chars} "
                "(raise `limits.max_query_chars` in the config if this is intended)"
            )
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            # a string is a sequence too: "Is it safe?" became eleven one-character turns
            raise QueryError(f"history must be a list of the earlier turns (strings), not a {type(history).__name__}")
        if max_history_turns is not None and len(history) > max_history_turns:
            raise QueryError(f"conversation history has {len(history)} turns; the limit is {max_history_turns}")
        user = _user(user)
        if as_of is not None and not isinstance(as_of, datetime):
            # a number would be read as Unix seconds, a string not at all: the caller converts, knowingly
            raise QueryError(f"as_of must be a datetime (e.g. datetime.fromisoformat('2025-06-01T00:00:00+00:00')), "
                             f"not a {type(as_of).__name__}")
        if as_of is not None:
            moment = utc(as_of)
            if moment is None:
                raise QueryError(f"as_of {as_of.isoformat()} is outside years 1-9999 in UTC")
            as_of = moment
        if language is not None and not (isinstance(language, str) and LANGUAGE_TAG.fullmatch(language)):
            raise QueryError(f"language must be a language tag such as en or zh-CN, not {language!r}")
        for i, turn in enumerate(history):
            if not isinstance(turn, str):
                raise QueryError(f"history turn {i + 1} must be a string")
            if len(turn) > max_chars:
                raise QueryError(f"history turn {i + 1} is longer than {max_chars} characters")
            _check_text(turn, f"history turn {i + 1}")
        return cls(
            text=text,
            history=tuple(history),
            user=user if user is not None else UserContext(),
            as_of=as_of if as_of is not None else datetime.now(timezone.utc),
            language=language,
        )

    def text_sha256(self) -> str:
        return text_digest(self.text, None)


QUERY_KEY_MIN_BYTES = 16
KEY_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")  # what trace.hash_key_env may name
_KEY_ID_MESSAGE = b"sieve query key id"


def text_digest(text: str, key: bytes | None) -> str:
    """What a trace records of a text it does not store: its sha256, or, with a key (``trace.hash_key_env``), its
    HMAC-SHA256 under that key, which no word list reverses without the key."""
    if key is None:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def query_key(env_name: str) -> bytes:
    """The key named by ``trace.hash_key_env``: the environment variable's value (UTF-8), at least 16 bytes."""
    value = os.environ.get(env_name)
    if not value:
        raise QueryKeyError(f"trace.hash_key_env names the environment variable {env_name}, which is not set (or "
                            f"empty): set it to a secret of at least {QUERY_KEY_MIN_BYTES} bytes (e.g. `openssl rand "
                            "-hex 32`), the same wherever the trace log's queries are replayed")
    key = value.encode("utf-8")
    if len(key) < QUERY_KEY_MIN_BYTES:
        raise QueryKeyError(f"the key in {env_name} is {len(key)} bytes: a query key needs at least "
                            f"{QUERY_KEY_MIN_BYTES} (e.g. `openssl rand -hex 32`)")
    return key


def key_id(key: bytes) -> str:
    """A public name of a query key (recorded in each trace), from which the key cannot be found: which key a
    replay needs, and whether the one it has is that one."""
    return hmac.new(key, _KEY_ID_MESSAGE, hashlib.sha256).hexdigest()[:16]


class QueryKeyError(ValueError):
    """The query key cannot be read (``trace.hash_key_env``); wrapped in a SieveError by its callers."""


def _visible(text: str) -> bool:
    """Whether ``text`` has anything but whitespace and invisible format characters (zero-width space...)."""
    return any(not ch.isspace() and unicodedata.category(ch) != "Cf" for ch in text)


# control characters (Unicode category Cc) but tab and line breaks, and lone surrogates (category Cs)
_UNTYPABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _locale_misread(text: str) -> bool:
    """Whether ``text`` is a command-line argument Python decoded in an ASCII locale (``LC_ALL=C``, UTF-8 mode off):
    its bytes escaped as lone surrogates, though they are UTF-8."""
    try:
        os.fsencode(text).decode("utf-8")
    except (UnicodeError, ValueError):
        return False
    return True


def _check_text(text: str, what: str) -> None:
    """Text a person could have typed: no control characters but tab and line breaks, no lone surrogates
    (which are not Unicode text and could not be written to the trace). One regex scan: it runs per query."""
    found = _UNTYPABLE.search(text)
    if found is None:
        return
    ch, position = found.group(), found.start() + 1
    if "\udc80" <= ch <= "\udcff" and _locale_misread(text):
        raise QueryError(f"{what} is UTF-8 text read in a locale whose encoding is not UTF-8 (a byte escaped as "
                         f"U+{ord(ch):04X} at position {position}): run with a UTF-8 locale, e.g. LANG=C.UTF-8")
    if unicodedata.category(ch) == "Cs":
        raise QueryError(f"{what} contains a lone surrogate (U+{ord(ch):04X} at position {position}), "
                         "which is not valid Unicode text")
    raise QueryError(f"{what} contains a control character (U+{ord(ch):04X} at position {position})")


@dataclass(frozen=True, slots=True)
class ScoreEntry:
    """One score a stage gave a candidate. ``stage`` is the stage id; ``signal`` its kind."""

    stage: str
    signal: str
    value: float
    rank: int


@dataclass(frozen=True, slots=True)
class Candidate:
    """A document on its way through the pipeline: its id, its row in the index, its ledger."""

    doc_id: str
    row: int
    ledger: tuple[ScoreEntry, ...] = ()

    def with_score(self, entry: ScoreEntry) -> "Candidate":
        """A copy with one more ledger entry; a stage may score a candidate only once."""
        if any(existing.stage == entry.stage for existing in self.ledger):
            raise ValueError(f"stage '{entry.stage}' already scored document '{self.doc_id}'")
        return Candidate(self.doc_id, self.row, self.ledger + (entry,))

    def score_of(self, stage: str) -> float | None:
        """The score stage ``stage`` gave, or None if it never scored this candidate."""
        for entry in self.ledger:
            if entry.stage == stage:
                return entry.value
        return None

    @property
    def score(self) -> float:
        """The most recent score (the one the current order is based on); 0.0 if unscored."""
        return self.ledger[-1].value if self.ledger else 0.0

    def merged(self, other: "Candidate") -> "Candidate":
        """Union of two ledgers for the same document (from two branches of the DAG)."""
        if other.doc_id != self.doc_id:
            raise ValueError("cannot merge candidates of different documents")
        known = {e.stage for e in self.ledger}
        extra = tuple(e for e in other.ledger if e.stage not in known)
        return Candidate(self.doc_id, self.row, self.ledger + extra) if extra else self


@dataclass(frozen=True, slots=True)
class Drop:
    """A candidate a stage removed, and why (a fixed reason code plus free detail)."""

    doc_id: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Decision:
    """An edge-case decision a stage made and records in the trace (e.g. k clamped to corpus size)."""

    code: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def sort_key(score: float, doc_id: str) -> tuple[float, str]:
    """Descending score, then ascending doc_id: the one ordering every stage uses."""
    return (-score, doc_id)


def ranked(candidates: Iterable[Candidate], scores: dict[str, float] | None = None) -> list[Candidate]:
    """Candidates sorted by score (``scores[doc_id]`` or their latest score), ties on doc_id."""
    if scores is None:
        return sorted(candidates, key=lambda c: sort_key(c.score, c.doc_id))
    return sorted(candidates, key=lambda c: sort_key(scores[c.doc_id], c.doc_id))


def _user(user: Any) -> UserContext:
    """The caller's user as a UserContext: one, None (anonymous), or a mapping of its fields."""
    if user is None:
        return UserContext()
    if isinstance(user, UserContext):
        return user
    if isinstance(user, dict):
        from pydantic import ValidationError

        try:
            return UserContext.model_validate(user)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'user'}: {e['msg']}" for e in exc.errors())
            raise QueryError(f"user: {problems}") from None
    raise QueryError(f"user must be a UserContext or a mapping of its fields, not a {type(user).__name__}")
