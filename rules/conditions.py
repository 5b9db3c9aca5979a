"""Rule conditions: a declarative YAML form and sandboxed expressions, compiled once.

A condition is one of::

    {field: query.text, op: contains, value: metformin}          # a leaf
    {field: doc.acl, op: contains_any, value_from: user.groups}   # operand taken from the query
    {all: [cond, ...]}   {any: [cond, ...]}   {not: cond}
    {expr: "'investigator' in user.roles and doc.phase == 3"}    # sandboxed Jinja2 expression

Fields (``field`` and ``value_from``):

- query side: ``query.text`` (as asked), ``query.rewritten``, ``query.effective`` (the rewrite when
  there is one), ``query.language``, ``query.history``, ``query.entities`` (entity texts and, for
  gazetteer entities, their canonical ids; extracted by the rule stages with the index's entities
  component when a rule reads them), ``query.entity_labels``, ``query.entities.<LABEL>`` (those of one
  label), ``user.id``,
  ``user.roles``, ``user.groups``, ``user.jurisdictions``, ``user.attributes.<name>``, ``as_of``;
- document side: ``doc.id``, ``doc.title``, ``doc.text``, ``doc.<metadata field>[.<key>...]``;
- candidate side (override rules only): ``score.<stage id>`` (that stage's ledger score),
  ``candidate.score`` (the current score), ``candidate.rank`` (1-based rank on arrival).

Operators (a list-valued field matches when any of its elements does):
``eq ne in not_in contains not_contains contains_any contains_all regex exists lt le gt ge
before after``. String comparisons ignore case unless ``case_sensitive: true``. ``lt``..``ge``
compare numbers, or dates when the value is a date; ``before``/``after`` compare dates. A date
value may be relative to the query's time: ``as_of``, ``as_of - 30d``, ``as_of + 2w``,
``as_of - 12h``, ``as_of - 6mo``, ``as_of - 1y``. Years and months are calendar arithmetic
(2025-06-01 - 15y is 2010-06-01; a day the target month lacks becomes its last day, so
2024-02-29 - 1y is 2023-02-28); hours, days and weeks are exact. A shift may move ``as_of`` by at
most 1000 years either way (a further shift is refused when the file is loaded; one that leaves
years 1..9999 for an extreme ``as_of`` is clamped to the first or last representable instant). A
missing field (or null) makes every operator false except the negated ones (``ne``, ``not_in``,
``not_contains``) and ``exists: false``.

Text is compared in one form on both sides (``engine.textform.comparable``): NFKC, soft hyphens and zero-width
characters removed, hyphens and dashes ``-``, quotes straight, white space runs one space, case folded unless
``case_sensitive``; a regex reads the same form but for case and white space. ``contains`` on a text value is a
substring test of that one field in that form (``patient-level data`` does not find ``patient level data``;
it finds a non-breaking hyphen), and ``doc.text`` is not ``doc.title``.
On a list it is whole-element equality (``doc.tags contains x``: an element equal to ``x``).

``eq``, ``in`` and the ``contains`` family compare values of one JSON type: a document's string
is never equal to the rule's number or true/false, nor its number to true/false (``"40"`` is not
``40``, ``"true"`` is not ``true``), and no value is coerced. Whole values whatever the shape:
``in`` (and ``eq``) on a list field match an element, and on a string the whole string. A
query-side field (``query.*``, ``user.id``, ``user.roles``/``groups``/``jurisdictions``,
``user.attributes.<name>``) always holds text, so such a test of one with a number or true/false
(``user.attributes.level eq 1``) could never decide anything: it is refused at load, as is a value
that is not a finite number (``.nan``, ``.inf``) in any test.

A document value a comparison cannot judge -- an ordered comparison (``lt``..``after``) on a
value that is not a date (or not a number), a nested path (``doc.access.groups``) that runs
through a value that is not a mapping, or an ``eq``/``in``/``contains`` test (negated or not)
that finds no match and meets a value of another JSON type than the rule's (``"true"`` for
``true``) -- is *undecidable*: the vector evaluation records it in ``QueryView.errors`` (row,
reason), and ``rules.prefilter`` denies such documents (fail closed) and says so in its trace;
``rules.override`` does not fire on them (for a type mismatch the test is false, ``ne`` too).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as _dataclass_field
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.strictness import NoCoercion
from engine.textform import comparable, comparable_pattern
from rules.expressions import (
    MAX_REGEX_CHARS,
    CompiledExpression,
    ExpressionError,
    ExpressionRuntimeError,
    PatternError,
    bounded_search,
    compile_expression,
    compile_pattern,
    parse_date,
)

if TYPE_CHECKING:
    import numpy as np

    from engine.model import Query
    from rules.corpus import DocumentTable

Op = Literal[
    "eq", "ne", "in", "not_in", "contains", "not_contains", "contains_any", "contains_all",
    "regex", "exists", "lt", "le", "gt", "ge", "before", "after",
]
LIST_OPS = frozenset({"in", "not_in", "contains_any", "contains_all"})
# positive operators that compare the document's values with the rule's, whose types must then agree
TYPED_OPS = frozenset({"eq", "in", "contains", "contains_any", "contains_all"})
CONTAINS_OPS = frozenset({"contains", "contains_any", "contains_all"})
ORDER_OPS = frozenset({"lt", "le", "gt", "ge", "before", "after"})
DATE_ONLY_OPS = frozenset({"before", "after"})
NEGATED = {"ne": "eq", "not_in": "in", "not_contains": "contains"}
FIELD_PATTERN = re.compile(r"^(as_of|(query|user|doc|score|candidate)(\.[A-Za-z0-9_\-]+)+)$")
RELATIVE_DATE = re.compile(
    r"^\s*as_of\s*(?:(?P<sign>[+-])\s*(?P<amount>\d{1,7})\s*(?P<unit>mo|[hdwy]))?\s*$"
)
UNIT_DAYS = {"d": 1, "w": 7, "y": 365}  # exact units in days (y: only for the 1000-year bound below)
# How far a relative date may move as_of: 1000 years either way (365,000 days for the exact units,
# 12,000 months, 1,000 years). Further is almost surely a typo, and would leave the dates Python
# can represent (years 1 to 9999) for any as_of.
MAX_RELATIVE_YEARS = 1000
MAX_RELATIVE_DAYS = MAX_RELATIVE_YEARS * UNIT_DAYS["y"]
_UNIT_LIMIT = {"h": MAX_RELATIVE_DAYS * 24, "d": MAX_RELATIVE_DAYS, "w": MAX_RELATIVE_DAYS // 7,
               "mo": MAX_RELATIVE_YEARS * 12, "y": MAX_RELATIVE_YEARS}
EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
LATEST = datetime.max.replace(tzinfo=timezone.utc)

QUERY_FIELDS = ("text", "rewritten", "effective", "language", "history", "entities", "entity_labels")
USER_FIELDS = ("id", "roles", "groups", "jurisdictions", "attributes")
CANDIDATE_FIELDS = ("score", "rank")

Scope = Literal["query", "document", "candidate"]
QUERY_NAMES = frozenset({"query", "user", "as_of"})
DOCUMENT_NAMES = QUERY_NAMES | {"doc"}
CANDIDATE_NAMES = DOCUMENT_NAMES | {"score", "candidate"}


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()


def _err(message: str, shows_input: bool = False) -> PydanticCustomError:
    return PydanticCustomError("rule_condition", message, {"shows_input": True} if shows_input else None)


def parse_relative(text: str) -> "RelativeDate | None":
    """A relative date (``as_of - 30d``, ``as_of - 6mo``, ``as_of - 1y``) or None when ``text`` is not one."""
    match = RELATIVE_DATE.match(text)
    if not match:
        return None
    if match.group("sign") is None:
        return RelativeDate(0)
    amount = int(match.group("amount")) * (1 if match.group("sign") == "+" else -1)
    unit = match.group("unit")
    if unit == "y":
        return RelativeDate(months=12 * amount, unit="y")
    if unit == "mo":
        return RelativeDate(months=amount, unit="mo")
    if unit == "h":
        return RelativeDate(hours=amount, unit="h")
    return RelativeDate(amount * UNIT_DAYS[unit], unit=unit)


def relative_date_problem(value: Any) -> str | None:
    """Why a relative date cannot be used (it moves as_of too far), or None (fine, or not one)."""
    if not isinstance(value, str):
        return None
    match = RELATIVE_DATE.match(value)
    if not match or match.group("sign") is None:
        return None
    if int(match.group("amount")) <= _UNIT_LIMIT[match.group("unit")]:
        return None
    return (
        f"{' '.join(value.split())} is outside the supported date range: a relative date may move as_of by at "
        f"most {MAX_RELATIVE_YEARS} years ({MAX_RELATIVE_DAYS} days)"
    )


class Condition(NoCoercion):
    """A condition as written in YAML (validated; compile it with :func:`compile_condition`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # keys as written in YAML only (`not`, never `not_`)

    field: Optional[str] = Field(None, description="what to test, e.g. query.text or doc.status")
    op: Optional[Op] = Field(None, description="how to test it (the operators below)")
    value: Any = Field(None, description="what to test it against (a list for in, not_in, contains_any/all)")
    value_from: Optional[str] = Field(None, description="take the operand from the query, e.g. user.groups")
    case_sensitive: bool = Field(False, description="compare text with its case (default: ignore case)")
    all: Optional[list["Condition"]] = Field(None, min_length=1, description="every condition listed holds")
    any: Optional[list["Condition"]] = Field(None, min_length=1, description="at least one condition listed holds")
    not_: Optional["Condition"] = Field(None, alias="not", description="the condition given does not hold")
    expr: Optional[str] = Field(None, description=(
        "a sandboxed Jinja2 expression over the rule's fields (query, user, doc, as_of...); beyond Jinja's own "
        "filters: matches('pattern') (a pattern written in the rule), comparable (text in the form field "
        "conditions compare it), date; functions date(...) and days_between(a, b)"))

    @field_validator("field", "value_from")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not FIELD_PATTERN.match(value):
            raise _err(
                "not a field path; fields look like query.text, user.groups, as_of, doc.<name>, "
                "score.<stage id> or candidate.rank"
            )
        return value

    @field_validator("value")
    @classmethod
    def _value(cls, value: Any, info: ValidationInfo) -> Any:
        op = info.data.get("op")
        if value is None or op is None:
            return value
        not_finite = [v for v in (value if isinstance(value, list) else [value])
                      if isinstance(v, float) and not math.isfinite(v)]
        if not_finite and op not in ("exists", "regex"):  # those two say what they take themselves
            raise _err(f"a value must be a finite number, not {_show(not_finite[0])}", shows_input=True)
        if op in LIST_OPS:
            if not isinstance(value, list) or not value:
                raise _err(f"'{op}' needs a non-empty list of values")
            if any(isinstance(v, (list, dict)) or v is None for v in value):
                raise _err(f"'{op}' needs a list of plain values (strings, numbers, dates)")
        elif op == "exists":
            if not isinstance(value, bool):
                raise _err("'exists' takes true or false")
        elif op == "regex":
            if not isinstance(value, str):
                raise _err("'regex' needs a string pattern")
            if len(value) > MAX_REGEX_CHARS:
                raise _err(f"the pattern is longer than {MAX_REGEX_CHARS} characters")
            try:
                pattern = compile_pattern(comparable_pattern(value))
            except PatternError as exc:
                raise _err(f"invalid regular expression: {exc}") from None
            if value and pattern.search("") is not None:
                raise _err("the pattern matches an empty text, so it is found in every text and the condition would "
                           "always hold (an empty alternative such as 'metformin|', or only optional parts such as "
                           "'x*'); to test for an empty field, use op: eq with value: ''")
        elif op in ORDER_OPS:
            problem = relative_date_problem(value)
            if problem is not None:
                raise _err(problem, shows_input=True)
            if _as_date_operand(value) is None and (op in DATE_ONLY_OPS or not _is_number(value)):
                wanted = "a date" if op in DATE_ONLY_OPS else "a number or a date"
                raise _err(
                    f"'{op}' needs {wanted} (ISO 2025-01-31, or relative: as_of, as_of - 30d, as_of + 2w, as_of - 6mo, "
                    "as_of - 1y)"
                )
        elif isinstance(value, (list, dict)):
            raise _err(f"'{op}' compares with a single value; use 'in' or 'contains_any' for a list")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> "Condition":
        forms = [name for name, set_ in (
            ("field", self.field is not None), ("all", self.all is not None), ("any", self.any is not None),
            ("not", self.not_ is not None), ("expr", self.expr is not None),
        ) if set_]
        if len(forms) != 1:
            found = ", ".join(forms) if forms else "none of them"
            raise _err(f"a condition is exactly one of field/op/value, all, any, not or expr (found: {found})")
        if forms[0] == "field":
            if self.op is None:
                raise _err("a field condition needs an 'op'")
            if self.op == "exists":
                if self.value_from is not None:
                    raise _err("'exists' takes no value_from")
            elif (self.value is None) == (self.value_from is None):
                raise _err(f"'{self.op}' needs exactly one of 'value' or 'value_from'")
            if self.value_from is not None and not self.value_from.startswith(("query.", "user.", "as_of")):
                raise _err("value_from must name a query-side field (query.*, user.*, as_of)")
            if self.value_from is not None and self.op == "regex":
                raise _err("a regex takes its pattern from the rule file only: a pattern from the query or the user "
                           "(value_from) lets a caller run any regular expression, which can take seconds and "
                           "gigabytes to compile; test the query's text against patterns you write, or use contains")
            if self.op in ("contains", "not_contains", "regex") and self.value == "":
                holds = "never hold" if self.op == "not_contains" else "always hold"
                raise _err(f"an empty {'pattern' if self.op == 'regex' else 'text'} is found in every text: the "
                           f"condition would {holds} (a value left out by mistake?)")
            if self.op in ("contains_any", "contains_all") and isinstance(self.value, list) and "" in self.value:
                raise _err("an empty text is found in every text: drop '' from the list (a value left out by mistake?)")
            numeric = self.field is not None and (self.field.startswith("score.")
                                                  or self.field in ("candidate.rank", "candidate.score"))
            if numeric and self.value is not None and not _is_number(self.value) \
                    and _as_date_operand(self.value) is not None:
                raise _err(f"{self.field} is a number: compare it with a number, not a date "
                           f"({self.value!r} could never match)")
        elif self.op is not None or self.value is not None or self.value_from is not None or self.case_sensitive:
            raise _err("op, value, value_from and case_sensitive belong to a field condition only")
        return self


Condition.model_rebuild()


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class RelativeDate:
    """``as_of`` shifted, resolved against each query's time: by calendar months (years are 12
    months; a day the target month lacks becomes its last day), then by exact days and hours."""

    offset_days: int = 0
    months: int = 0
    hours: int = 0
    unit: str = _dataclass_field(default="d", compare=False)  # as written, for messages: y, mo, w, d, h

    def resolve(self, as_of: datetime) -> datetime:
        """``as_of`` shifted; clamped to the first or last representable instant when the shift leaves
        them (a bound before year 1 behaves as "before every date", after 9999 as "after every date")."""
        try:
            shifted = _add_months(as_of, self.months) if self.months else as_of
            return shifted + timedelta(days=self.offset_days, hours=self.hours)
        except OverflowError:
            backwards = (self.months or self.offset_days or self.hours) < 0
            return EARLIEST if backwards else LATEST

    def __str__(self) -> str:
        if not (self.offset_days or self.months or self.hours):
            return "as_of"
        if self.months:
            amount, unit = (self.months // 12, "y") if self.unit == "y" and self.months % 12 == 0 else (self.months, "mo")
        elif self.hours:
            amount, unit = self.hours, "h"
        elif self.unit == "w" and self.offset_days % 7 == 0:
            amount, unit = self.offset_days // 7, "w"
        else:
            amount, unit = self.offset_days, "d"
        return f"as_of {'+' if amount > 0 else '-'} {abs(amount)}{unit}"


def _add_months(moment: datetime, months: int) -> datetime:
    """``moment`` moved by calendar months (Jan 31 + 1 month is Feb 28/29); OverflowError outside years 1..9999."""
    import calendar

    total = moment.year * 12 + (moment.month - 1) + months
    year, month = divmod(total, 12)
    if not 1 <= year <= 9999:
        raise OverflowError("date value out of range")
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def _id(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_date_operand(value: Any) -> datetime | RelativeDate | None:
    if isinstance(value, (date, datetime)):
        return parse_date(value)
    if isinstance(value, str):
        relative = parse_relative(value)
        if relative is not None:
            return relative
        return parse_date(value)
    return None


def _number(value: Any) -> float | None:
    if _is_number(value):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            return None
        return parsed if math.isfinite(parsed) else None
    return None


def _elements(value: Any) -> Sequence[Any]:
    if value is MISSING or value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    return (value,)


def _fold(value: Any, case_sensitive: bool, identifiers: bool = False) -> Any:
    """A text value as rules compare it (``engine.textform.comparable``: NFKC, unseen characters, dashes, quotes and
    spaces as one form, case-folded unless ``case_sensitive``); an identifier of the user's (``identifiers``: a test
    of ``user.*``) as written, case-folded only, as ``acl`` compares (fail closed); any other value as it is."""
    if not isinstance(value, str):
        return value
    if identifiers:
        return value if case_sensitive else value.casefold()
    return comparable(value, case_sensitive=case_sensitive)


def present(value: Any) -> bool:
    """``exists`` semantics: present, not null, not an empty string or list."""
    return not (value is MISSING or value is None or value == "" or value == [] or value == ())


# --------------------------------------------------------------------------- subjects


class QueryView:
    """The query side of every condition, built once per query: plain values, no engine objects."""

    def __init__(self, query: "Query", trace_text: bool = True):
        self.query = query
        self.trace_text = trace_text  # False: errors in ``errors`` quote no value (include_query_text: false)
        entities = []
        for entity in query.entities:
            if isinstance(entity, Mapping):
                text = entity.get("text", entity.get("value", entity.get("name")))
                label = entity.get("label", entity.get("type"))
                label = None if label is None else str(label)
                entities.append((None if text is None else str(text), label))
                ident = entity.get("id")  # a gazetteer's canonical id ("Glucophage" is metformin; "Acme" is ACME)
                if ident is not None and str(ident) != text:
                    entities.append((str(ident), label))
        self.entities = entities
        user = query.user
        self.fields: dict[str, Any] = {
            "as_of": query.as_of,
            "query.text": query.text,
            "query.rewritten": query.rewritten if query.rewritten is not None else MISSING,
            "query.effective": query.effective_text,
            "query.language": query.language if query.language is not None else MISSING,
            "query.history": list(query.history),
            "query.entities": [t for t, _ in entities if t is not None],
            "query.entity_labels": sorted({lbl for _, lbl in entities if lbl is not None}),
            "user.id": user.user_id if user.user_id is not None else MISSING,
            "user.roles": list(user.roles),
            "user.groups": list(user.groups),
            "user.jurisdictions": list(user.jurisdictions),
            "user.attributes": dict(user.attributes),
        }
        self._variables: dict[str, Any] | None = None
        self.errors: list[tuple[int, str]] = []  # (row, message) of documents an expression failed on

    def get(self, path: str) -> Any:
        value = self.fields.get(path, MISSING)
        if value is not MISSING or path in self.fields:
            return value
        if path.startswith("user.attributes."):
            return self.query.user.attributes.get(path[len("user.attributes."):], MISSING)
        if path.startswith("query.entities."):
            label = path[len("query.entities."):]
            return [t for t, lbl in self.entities if lbl is not None and lbl.casefold() == label.casefold() and t]
        return MISSING

    def variables(self) -> dict[str, Any]:
        """The names a Jinja expression sees for the query side (copies; never engine objects)."""
        if self._variables is None:
            q = self.query
            self._variables = {
                "query": {
                    "text": q.text,
                    "rewritten": q.rewritten,
                    "effective": q.effective_text,
                    "language": q.language,
                    "history": list(q.history),
                    "entities": [{"text": t, "label": lbl} for t, lbl in self.entities],
                },
                "user": {
                    "id": q.user.user_id,
                    "roles": list(q.user.roles),
                    "groups": list(q.user.groups),
                    "jurisdictions": list(q.user.jurisdictions),
                    "attributes": dict(q.user.attributes),
                },
                "as_of": q.as_of,
            }
        return self._variables


def redact_query_evidence(evidence: list[dict[str, Any]], trace_text: bool) -> list[dict[str, Any]]:
    """Evidence of a condition, with the values it matched in the query text replaced by ``<redacted>`` unless the
    config allows query text in traces (the user context is recorded with every trace anyway; a condition's own
    expression is not query text): a test on a ``query.*`` field, and what a test on another field matched of an
    operand taken from the query (``value_from: query.*``: `doc.title contains` the query's text, `user.attributes.x
    in` its entities)."""
    if trace_text:
        return evidence
    redacted = []
    for item in evidence:
        field_name, source = item.get("field", ""), item.get("value_from", "")
        hidden = {"matched", "actual"} if isinstance(field_name, str) and field_name.startswith("query.") else set()
        if isinstance(source, str) and source.startswith("query."):
            hidden.add("matched")
        if hidden:
            item = {k: ("<redacted>" if k in hidden else v) for k, v in item.items()}
        redacted.append(item)
    return redacted


def doc_field(document: Any, path: str) -> Any:
    """``doc.<...>`` of a Document (id, title, text, or metadata, nested with dots)."""
    parts = path.split(".")[1:]
    head = parts[0]
    if head == "id" and len(parts) == 1:
        return document.doc_id
    if head in ("title", "text") and len(parts) == 1:
        return getattr(document, head)
    value: Any = document.metadata
    for part in parts:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            return MISSING
    return value


def doc_path_problem(document: Any, path: str) -> str | None:
    """Why ``doc.<a>.<b>...`` cannot be read on this document: the path runs through a value that is
    not a mapping (``access.groups`` where ``access`` is a list or a string). None when the path is
    readable, or simply absent (a missing key, or null on the way)."""
    parts = path.split(".")[1:]
    if len(parts) < 2:
        return None
    value: Any = document.metadata
    for depth, part in enumerate(parts):
        if value is None:
            return None
        if not isinstance(value, Mapping):
            return f"'{'.'.join(parts[:depth])}' is {shape_of(value)}, not a mapping with '{part}'"
        if part not in value:
            return None
        value = value[part]
    return None


def shape_of(value: Any) -> str:
    """``a list``, ``a string``... for messages about a value's shape."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


_SCALAR_KINDS = frozenset({"true/false", "a number", "a string"})


def kind_of(value: Any) -> str | None:
    """The JSON type of a plain value, for type checks (``a string``, ``a number``, ``true/false``); None
    for anything else (a date, a list, a mapping, null)."""
    kind = shape_of(value)
    return kind if kind in _SCALAR_KINDS else None


def brief(value: Any, limit: int = 60) -> str:
    """A value for a message as it reads in the data (``'40'``, ``40``, ``true``, a list in brackets), cut at
    ``limit`` characters."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, (list, tuple, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, frozenset) else value
        shown = "[" + ", ".join(brief(v, limit) for v in items) + "]"
    else:
        shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def doc_variables(document: Any) -> dict[str, Any]:
    return {**document.metadata, "id": document.doc_id, "title": document.title, "text": document.text,
            "metadata": document.metadata}


class Subject:
    """What one evaluation reads: the query view and, for document conditions, one document and
    (override rules) the candidate — its ledger scores and its rank on arrival."""

    __slots__ = ("view", "document", "candidate", "rank")

    def __init__(self, view: QueryView, document: Any = None, candidate: Any = None, rank: int | None = None):
        self.view = view
        self.document = document
        self.candidate = candidate
        self.rank = rank

    def get(self, path: str) -> Any:
        if path.startswith("doc."):
            return MISSING if self.document is None else doc_field(self.document, path)
        if path.startswith("score."):
            if self.candidate is None:
                return MISSING
            value = self.candidate.score_of(path[len("score."):])
            return MISSING if value is None else value
        if path == "candidate.score":
            return self.candidate.score if self.candidate is not None and self.candidate.ledger else MISSING
        if path == "candidate.rank":
            return MISSING if self.rank is None else self.rank
        return self.view.get(path)

    def variables(self) -> dict[str, Any]:
        variables = dict(self.view.variables())
        if self.document is not None:
            variables["doc"] = doc_variables(self.document)
        if self.candidate is not None:
            variables["score"] = {e.stage: e.value for e in self.candidate.ledger}
            score = self.candidate.score if self.candidate.ledger else None
            variables["candidate"] = {"score": score, "rank": self.rank}
        return variables


class NullView(QueryView):
    """A query view for conditions that provably do not read the query (evaluated once, at warm-up)."""

    def __init__(self) -> None:  # noqa: D107 - nothing to read
        self.fields = {}
        self.entities = []
        self._variables = {}
        self.errors = []
        self.trace_text = True  # its errors cannot quote a query it does not read

    def get(self, path: str) -> Any:
        return MISSING


class Frame:
    """A ranked candidate list that override conditions are evaluated over, column by column."""

    def __init__(self, candidates: Sequence[Any], table: "DocumentTable", arrived: bool = True):
        """``arrived``: the candidates came in ranked (False for documents a pin brings in: no rank on arrival)."""
        import numpy as np

        self.candidates = candidates
        self.table = table
        self.arrived = arrived
        self.rows = np.fromiter((c.row for c in candidates), dtype=np.int64, count=len(candidates))
        self._columns: dict[str, list[Any]] = {}

    def __len__(self) -> int:
        return len(self.candidates)

    def column(self, path: str) -> list[Any]:
        """``score.<stage>``, ``candidate.score`` or ``candidate.rank`` of every candidate."""
        cached = self._columns.get(path)
        if cached is None:
            if path.startswith("score."):
                stage = path[len("score."):]
                cached = [_or_missing(c.score_of(stage)) for c in self.candidates]
            elif path == "candidate.score":
                cached = [c.score if c.ledger else MISSING for c in self.candidates]
            elif path == "candidate.rank":
                cached = list(range(1, len(self.candidates) + 1)) if self.arrived else [MISSING] * len(self.candidates)
            else:
                raise AssertionError(f"not a candidate field: {path}")  # pragma: no cover
            self._columns[path] = cached
        return cached

    def subject(self, position: int, view: QueryView) -> Subject:
        candidate = self.candidates[position]
        return Subject(view, self.table.documents[candidate.row], candidate, position + 1 if self.arrived else None)


def _or_missing(value: Any) -> Any:
    return MISSING if value is None else value


# --------------------------------------------------------------------------- compiled nodes


class CompileError(ValueError):
    """A condition cannot be compiled; ``path`` is relative to the condition."""

    def __init__(self, message: str, path: tuple[str | int, ...] = ()):
        super().__init__(message)
        self.message = message
        self.path = path


class Node:
    """A compiled condition.

    :meth:`evaluate` tests one subject in Python (and can record evidence of what matched);
    :meth:`vector` tests many at once with numpy — every document of the table (prefilter), or
    the candidates of a :class:`Frame` (override). Sub-conditions that read neither the query nor
    the candidate are computed once over the whole corpus and reused.
    """

    uses_query: bool = False  # reads the query side (when evaluated over documents)
    uses_document: bool = False
    uses_candidate: bool = False  # reads ledger scores or ranks (override rules only)

    @property
    def static(self) -> bool:
        return not (self.uses_query or self.uses_candidate)

    def evaluate(self, subject: Subject, evidence: list[dict[str, Any]] | None = None) -> bool:
        raise NotImplementedError

    def fields(self) -> set[str]:
        """Every field path this condition reads (for checks against the corpus)."""
        return set()

    def describe(self) -> str:
        raise NotImplementedError

    def vector(self, table: "DocumentTable", view: QueryView, frame: Frame | None = None) -> "np.ndarray":
        """Value for every document of ``table`` (or every candidate of ``frame``)."""
        if self.static:
            full, errors = table.static_vector(self, lambda: self._collect(table))
            view.errors.extend(errors)
            return full if frame is None else full[frame.rows]
        return self._vector(table, view, frame)

    def prepare(self, table: "DocumentTable") -> None:
        """Compute every query-independent part over the corpus now (at warm-up), not on the first query."""
        if self.static:
            self.vector(table, NullView())
            return
        for child in getattr(self, "children", ()):
            child.prepare(table)
        inner = getattr(self, "child", None)
        if inner is not None:
            inner.prepare(table)

    def _collect(self, table: "DocumentTable") -> tuple["np.ndarray", list[tuple[int, str]]]:
        view = NullView()
        return self._vector(table, view, None), list(view.errors)

    def _vector(self, table: "DocumentTable", view: QueryView, frame: Frame | None) -> "np.ndarray":
        raise NotImplementedError


def _size(table: "DocumentTable", frame: Frame | None) -> int:
    return table.size if frame is None else len(frame)


def _show(value: Any) -> str:
    """A condition's value as the rule file writes it (YAML): text single-quoted, backslashes as written
    (``'^\\s*[A-Z]{1,5}$'``, not Python's doubled ones), true/false/null, lists in brackets."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, (list, tuple, frozenset)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, datetime):
        return value.date().isoformat() if value.hour == value.minute == value.second == 0 else value.isoformat()
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return str(value)


class Leaf(Node):
    def __init__(self, spec: Condition):
        assert spec.field is not None and spec.op is not None
        self.field = spec.field
        self.op: str = spec.op
        self.case_sensitive = spec.case_sensitive
        self.value_from = spec.value_from
        # a test of the user's groups, roles, jurisdictions, id or attributes compares identifiers: as written,
        # case-folded only (a group spelt with another hyphen grants nothing), as the acl action does
        self.identifiers = self.field.startswith("user.") or (spec.value_from or "").startswith("user.")
        self.raw_value = spec.value
        self.positive = NEGATED.get(self.op, self.op)
        self.negated = self.op in NEGATED
        self.literal: Any = None
        self.pattern: Any = None
        self.date_operand = False
        operand: Any = True if self.op == "exists" and spec.value is None else spec.value
        if self.field == "doc.id":  # ids are text; YAML reads numeric ones as ints
            operand = [_id(v) for v in operand] if isinstance(operand, list) else _id(operand)
        if self.value_from is None:
            self.literal = self._prepare(operand)
        self.relative = isinstance(self.literal, RelativeDate)
        self._lookups: dict[Any, tuple["np.ndarray", "np.ndarray | None", dict[int, str]]] = {}
        scope_roots = {self.field.split(".")[0]} | ({self.value_from.split(".")[0]} if self.value_from else set())
        self.uses_document = "doc" in scope_roots
        self.uses_candidate = bool(scope_roots & {"score", "candidate"})
        self.uses_query = bool(scope_roots & {"query", "user", "as_of"}) or self.relative

    # ---- operand preparation (compile time for literals, per query for value_from)

    def _prepare(self, operand: Any) -> Any:
        op = self.positive
        if op == "regex":
            self.pattern = compile_pattern(comparable_pattern(str(operand)), not self.case_sensitive)
            return operand
        if op in ORDER_OPS:
            as_date = _as_date_operand(operand)
            if as_date is not None and (op in DATE_ONLY_OPS or not _is_number(operand)):
                self.date_operand = True
                return as_date
            return _number(operand)
        if op in LIST_OPS:
            values = operand if isinstance(operand, (list, tuple)) else [operand]
            return frozenset(self._scalar(v) for v in values)
        if op == "exists":
            return bool(operand)
        return self._scalar(operand)

    def _scalar(self, value: Any) -> Any:
        if isinstance(value, (date, datetime)):
            return parse_date(value)
        return _fold(value, self.case_sensitive, self.identifiers)

    def _runtime_operand(self, view: QueryView) -> Any:
        if self.value_from is None:
            if isinstance(self.literal, RelativeDate):
                return self.literal.resolve(view.query.as_of)
            return self.literal
        raw = view.get(self.value_from)
        op = self.positive
        if raw is MISSING or raw is None:
            return MISSING
        if op in LIST_OPS or op == "contains" and isinstance(raw, (list, tuple)):
            values = raw if isinstance(raw, (list, tuple)) else [raw]
            return frozenset(self._scalar(v) for v in values)
        if op in ORDER_OPS:
            as_date = parse_date(raw) if isinstance(raw, (date, datetime, str)) else None
            if as_date is not None and not _is_number(raw):
                return as_date
            return _number(raw)
        return self._scalar(raw)  # never a regex: its pattern comes from the rule file only (refused at load)

    # ---- the test itself

    def test_value(self, value: Any, operand: Any) -> tuple[bool, Any]:
        """(does ``value`` satisfy the positive operator, what matched) — negation applied by callers."""
        op = self.positive
        if op == "exists":
            return present(value) == operand, value if present(value) else None
        if operand is MISSING or operand is None:
            return False, None
        elements = _elements(value)
        if not elements:
            return False, None
        if op == "eq":
            date_mode = isinstance(operand, datetime)
            for element in elements:
                candidate = parse_date(element) if date_mode else _fold(element, self.case_sensitive, self.identifiers)
                if candidate == operand and not (isinstance(element, bool) != isinstance(operand, bool)):
                    return True, element
            return False, None
        if op == "in":
            for element in elements:
                folded = _fold(element, self.case_sensitive, self.identifiers)
                if _hashable(folded) and folded in operand and (
                        isinstance(folded, str) or any(_same(folded, o) for o in operand)):  # true is not 1
                    return True, element
            return False, None
        if op in ("contains", "contains_any", "contains_all"):
            wanted = operand if isinstance(operand, frozenset) else frozenset([operand])
            found = []
            folded_elements = [_fold(element, self.case_sensitive, self.identifiers)  # once, not per needle
                               for element in elements]
            for needle in sorted(wanted, key=str):
                hit = False
                for folded in folded_elements:
                    if isinstance(value, str) and isinstance(folded, str) and isinstance(needle, str):
                        hit = needle in folded
                    else:
                        hit = _hashable(folded) and _same(folded, needle)
                    if hit:
                        break
                if hit:
                    found.append(needle)
                    if op != "contains_all":
                        break
                elif op == "contains_all":
                    return False, None
            if not found:
                return False, None
            return True, found[0] if op == "contains" else found
        if op == "regex":
            pattern = self.pattern  # a rule file's own (value_from is refused for a regex at load)
            assert pattern is not None
            for element in elements:
                if isinstance(element, str):  # the text as compared (NFKC, dashes...); case is the pattern's flag
                    match = bounded_search(pattern, comparable(element, case_sensitive=True, spaces=False))
                    if match:
                        return True, match.group(0)
            return False, None
        if op in ORDER_OPS:
            for element in elements:
                if isinstance(operand, datetime):
                    left: Any = parse_date(element) if isinstance(element, (str, date, datetime)) else None
                else:
                    left = _number(element)
                if left is None:
                    continue
                if _compare(op, left, operand):
                    return True, element
            return False, None
        raise AssertionError(f"unhandled operator {op}")  # pragma: no cover - Op is a closed Literal

    def type_mismatch(self, value: Any, operand: Any) -> str | None:
        """Why ``value`` cannot be judged by this ``eq``/``in``/``contains`` test: it holds a plain value of
        another JSON type than the rule's (``'40'`` for ``40``, ``'true'`` for ``true``), which is neither
        equal nor certainly different. None otherwise, and for fields that are not a document's. Only
        meaningful when :meth:`test_value` found no match (a match decides)."""
        if self.positive not in TYPED_OPS or not self.field.startswith("doc.") or operand is MISSING or operand is None:
            return None
        values = operand if isinstance(operand, frozenset) else (operand,)
        wanted = {kind for kind in map(kind_of, values) if kind is not None}
        if not wanted:
            return None
        for element in _elements(value):
            kind = kind_of(element)
            if kind is not None and kind not in wanted:
                compared = self.value_from if self.value_from is not None else brief(operand)  # never query text
                return (f"{brief(element)} is {kind}, and the rule compares with {' or '.join(sorted(wanted))} "
                        f"({compared}): no value is coerced")
        return None

    def evaluate(self, subject: Subject, evidence: list[dict[str, Any]] | None = None) -> bool:
        value = subject.get(self.field)
        operand = self._runtime_operand(subject.view)
        hit, matched = self.test_value(value, operand)
        if not hit and self.type_mismatch(value, operand) is not None:
            return False  # undecidable: the test does not hold, negated or not (the vector path notes it)
        result = hit != self.negated
        if result and evidence is not None:
            record: dict[str, Any] = {"field": self.field, "op": self.op}
            if self.negated or self.op == "exists":
                record["actual"] = _plain(value)
            else:
                record["matched"] = _plain(matched)
            if self.value_from is not None:
                record["value_from"] = self.value_from
            evidence.append(record)
        return result

    def fields(self) -> set[str]:
        return {self.field} | ({self.value_from} if self.value_from else set())

    def describe(self) -> str:
        if self.op == "exists":
            return f"{self.field} exists" if self.literal else f"{self.field} does not exist"
        operand = self.value_from if self.value_from is not None else _show(
            self.literal if isinstance(self.literal, RelativeDate) else self.raw_value
        )
        return f"{self.field} {self.op} {operand}"

    def _vector(self, table: "DocumentTable", view: QueryView, frame: Frame | None) -> "np.ndarray":
        import numpy as np

        if not (self.uses_document or self.uses_candidate):  # a query-side test: one value for all
            return np.full(_size(table, frame), self.evaluate(Subject(view)), dtype=bool)
        operand = self._runtime_operand(view)
        ordered = self.positive in ORDER_OPS and operand is not MISSING and operand is not None
        if self.field.startswith(("score.", "candidate.")):
            assert frame is not None, "candidate fields exist only in override rules"
            values = frame.column(self.field)
            if ordered and not isinstance(operand, datetime):
                column = np.fromiter((_nan_unless_number(v) for v in values), dtype=np.float64, count=len(values))
                with np.errstate(invalid="ignore"):
                    result = _VECTOR_COMPARE[self.positive](column, float(operand))
            else:
                result = np.fromiter((self.test_value(v, operand)[0] for v in values), dtype=bool, count=len(values))
            return ~result if self.negated else result
        # documents this test cannot judge (a nested path through a non-mapping; for an ordered
        # comparison, a value that is not a date / number): noted for the stage to deny or skip
        mode = ("date" if isinstance(operand, datetime) else "number") if ordered else "path"
        note_undecidable(table, self.field, mode, view, frame)
        if ordered:
            column = table.numeric(self.field, dates=isinstance(operand, datetime))
            if column is not None:
                if frame is not None:
                    column = column[frame.rows]
                target = operand.timestamp() if isinstance(operand, datetime) else float(operand)
                with np.errstate(invalid="ignore"):
                    result = _VECTOR_COMPARE[self.positive](column, target)
                return ~result if self.negated else result
        codes, uniques = table.factorized(self.field)
        hits, mismatched, why = self._lookup(uniques, operand)
        row_codes = codes if frame is None else codes[frame.rows]
        result = hits[row_codes]
        if self.negated:
            result = ~result
        if mismatched is not None:  # a value of another type than the rule's: undecidable, the test does not hold
            undecided = mismatched[row_codes]
            if undecided.any():
                result &= ~undecided
                positions = np.flatnonzero(undecided)
                rows = positions if frame is None else frame.rows[positions]
                view.errors.extend(
                    (int(row), f"{self.field} of '{table.doc_ids[row]}': {why[int(codes[row])]}") for row in rows
                )
        return result

    def _lookup(self, uniques: list[Any], operand: Any) -> tuple["np.ndarray", "np.ndarray | None", dict[int, str]]:
        """The test on each distinct value of the field; which distinct values it cannot judge (a type
        mismatch; None when none) and why, by code. Cached per operand (users repeat)."""
        import numpy as np

        key = (id(uniques), operand if _hashable(operand) else repr(operand))
        cached = self._lookups.get(key)
        if cached is None:
            hits = np.fromiter((self.test_value(u, operand)[0] for u in uniques), dtype=bool, count=len(uniques))
            why: dict[int, str] = {}
            for code, unique in enumerate(uniques):
                if not hits[code]:
                    problem = self.type_mismatch(unique, operand)
                    if problem is not None:
                        why[code] = problem
            mismatched = None
            if why:
                mismatched = np.zeros(len(uniques), dtype=bool)
                mismatched[list(why)] = True
            cached = (hits, mismatched, why)
            if len(self._lookups) >= 256:
                self._lookups.clear()
            self._lookups[key] = cached
        return cached


def note_undecidable(table: "DocumentTable", path: str, mode: str, view: QueryView, frame: Frame | None) -> None:
    """Add to ``view.errors`` the documents (of ``frame``, or all) whose ``path`` cannot be judged in ``mode``."""
    if not path.startswith("doc.") or (mode == "path" and path.count(".") < 2):
        return
    _, reasons = table.undecidable(path, mode)
    if not reasons:
        return
    if frame is None:
        view.errors.extend(reasons)
    else:
        present_rows = set(frame.rows.tolist())
        view.errors.extend(r for r in reasons if r[0] in present_rows)


def _nan_unless_number(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan


def _same(left: Any, right: Any) -> bool:
    """Equal values of one type: true is not 1 (Python says it is), false is not 0."""
    return left == right and isinstance(left, bool) == isinstance(right, bool)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _compare(op: str, left: Any, right: Any) -> bool:
    try:
        if op in ("lt", "before"):
            return bool(left < right)
        if op == "le":
            return bool(left <= right)
        if op in ("gt", "after"):
            return bool(left > right)
        return bool(left >= right)
    except TypeError:
        return False


_VECTOR_COMPARE = {
    "lt": lambda c, t: c < t,
    "before": lambda c, t: c < t,
    "le": lambda c, t: c <= t,
    "gt": lambda c, t: c > t,
    "after": lambda c, t: c > t,
    "ge": lambda c, t: c >= t,
}


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a matched value for the trace."""
    if value is MISSING:
        return None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (list, tuple, frozenset, set)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class AllOf(Node):
    def __init__(self, children: list[Node]):
        self.children = children
        self.uses_query = any(c.uses_query for c in children)
        self.uses_document = any(c.uses_document for c in children)
        self.uses_candidate = any(c.uses_candidate for c in children)

    def evaluate(self, subject: Subject, evidence: list[dict[str, Any]] | None = None) -> bool:
        local: list[dict[str, Any]] | None = [] if evidence is not None else None
        for child in self.children:
            if not child.evaluate(subject, local):
                return False
        if evidence is not None and local is not None:
            evidence.extend(local)
        return True

    def fields(self) -> set[str]:
        return set().union(*(c.fields() for c in self.children))

    def describe(self) -> str:
        return "(" + " and ".join(c.describe() for c in self.children) + ")"

    def _vector(self, table: "DocumentTable", view: QueryView, frame: Frame | None) -> "np.ndarray":
        result = self.children[0].vector(table, view, frame)
        for child in self.children[1:]:
            if not result.any():
                break
            result = result & child.vector(table, view, frame)
        return result


class Window(AllOf):
    """Bounds on one date field (a ``date_range``), held by one and the same element of it: a document dated
    ``[2010-01-01, 2030-01-01]`` is not inside [2020, 2025), though 2030 is on or after 2020 and 2010 before 2025
    (an :class:`AllOf` of its bounds takes each from any element). A single value is judged as by ``AllOf``."""

    def __init__(self, field: str, bounds: list[Leaf]):
        super().__init__(list(bounds))
        self.field = field
        self.bounds = bounds
        self._listed: dict[int, list[int]] = {}  # id of a table's distinct values -> the codes of list values

    def _inside(self, elements: Sequence[Any], view: QueryView) -> Any:
        """The first element inside every bound, or MISSING."""
        operands = [bound._runtime_operand(view) for bound in self.bounds]
        for element in elements:
            if all(bound.test_value(element, operand)[0] for bound, operand in zip(self.bounds, operands)):
                return element
        return MISSING

    def evaluate(self, subject: Subject, evidence: list[dict[str, Any]] | None = None) -> bool:
        value = subject.get(self.field)
        if not isinstance(value, (list, tuple)):
            return super().evaluate(subject, evidence)
        inside = self._inside(value, subject.view)
        if inside is MISSING:
            return False
        if evidence is not None:
            evidence.append({"field": self.field, "op": "date_range", "matched": _plain(inside)})
        return True

    def _vector(self, table: "DocumentTable", view: QueryView, frame: Frame | None) -> "np.ndarray":
        result = super()._vector(table, view, frame)
        codes, uniques = table.factorized(self.field)
        listed = self._listed.get(id(uniques))
        if listed is None:  # once per table: the scan is as long as the field's distinct values
            listed = self._listed[id(uniques)] = [
                code for code, unique in enumerate(uniques) if isinstance(unique, (list, tuple))]
        if listed:
            import numpy as np

            is_list = np.zeros(len(uniques), dtype=bool)
            inside = np.zeros(len(uniques), dtype=bool)
            is_list[listed] = True
            inside[listed] = [self._inside(uniques[code], view) is not MISSING for code in listed]
            row_codes = codes if frame is None else codes[frame.rows]
            result = np.where(is_list[row_codes], inside[row_codes], result)  # a new array: result may be cached
        return result


class AnyOf(AllOf):
    def evaluate(self, subject: Subject, evidence: list[dict[str, Any]] | None = None) -> bool:
        for child in self.children:
            local: list[dict[str, Any]] | None = [] if evidence is not None else None
            if child.evaluate(subject, local):
                if evidence is not None and local is not None:
                    evidence.extend(local)
                return True
        return False

    def describe(self) -> str:
        return "(" + " or ".join(c.describe() for c in self.children) + ")"

    def _vector(self, table: "DocumentTable", view: QueryView, frame: Frame | None) -> "np.ndarray":
        result = self.children[0].vector(table, view, frame)
        for child in self.children[1:]:
            if result.all():
                break
            result = result | child.vector(table, view, frame)
        return result


class Not(Node):
    def __init__(self, child: Node):
        self.child = child
        self.uses_query = child.uses_query
        self.uses_document = child.uses_document
        self.uses_candidate = child.uses_candidate

    def evaluate(self, subject: Subject, evidence: list[dict[str, Any]] | None = None) -> bool:
        if self.child.evaluate(subject, None):
            return False
        if evidence is not None:
            evidence.append({"not": self.child.describe()})
        return True

    def fields(self) -> set[str]:
        return self.child.fields()

    def describe(self) -> str:
        return f"not {self.child.describe()}"

    def _vector(self, table: "DocumentTable", view: QueryView, frame: Frame | None) -> "np.ndarray":
        return ~self.child.vector(table, view, frame)


class Expr(Node):
    def __init__(self, compiled: CompiledExpression):
        self.compiled = compiled
        self.uses_query = bool(compiled.names & QUERY_NAMES)
        self.uses_document = "doc" in compiled.names
        self.uses_candidate = bool(compiled.names & {"score", "candidate"})

    def evaluate(self, subject: Subject, evidence: list[dict[str, Any]] | None = None) -> bool:
        result = self.compiled.truth(subject.variables())  # ExpressionRuntimeError propagates
        if result and evidence is not None:
            evidence.append({"expr": self.compiled.source})
        return result

    def fields(self) -> set[str]:
        return set()

    def describe(self) -> str:
        return f"expr {_show(self.compiled.source)}"

    def _vector(self, table: "DocumentTable", view: QueryView, frame: Frame | None) -> "np.ndarray":
        """Evaluated one by one; a document the expression fails on is false and noted in ``view.errors``."""
        import numpy as np

        size = _size(table, frame)
        result = np.zeros(size, dtype=bool)
        for position in range(size):
            if frame is None:
                subject, row = Subject(view, table.documents[position]), position
            else:
                subject, row = frame.subject(position, view), int(frame.rows[position])
            try:
                result[position] = self.compiled.truth(subject.variables())
            except ExpressionRuntimeError as exc:
                view.errors.append((row, exc.describe(view.trace_text)))
        return result


class Constant(Node):
    """A condition that always has the same value (an absent ``when`` or ``match``)."""

    def __init__(self, value: bool):
        self.value = value

    def evaluate(self, subject: Subject, evidence: list[dict[str, Any]] | None = None) -> bool:
        return self.value

    def describe(self) -> str:
        return "always" if self.value else "never"

    def _vector(self, table: "DocumentTable", view: QueryView, frame: Frame | None) -> "np.ndarray":
        import numpy as np

        return np.full(_size(table, frame), self.value, dtype=bool)


def compile_condition(spec: Condition, scope: Scope, path: tuple[str | int, ...] = ()) -> Node:
    """Compile a validated condition for ``scope``; raise :class:`CompileError` with a relative path.

    ``query`` scope (a rule's ``when``) may read only the query side; ``document`` scope (a
    prefilter's ``match``) the document plus query-side operands; ``candidate`` scope (an
    override's ``match``) also ledger scores and ranks.
    """
    if spec.all is not None:
        return AllOf([compile_condition(c, scope, path + ("all", i)) for i, c in enumerate(spec.all)])
    if spec.any is not None:
        return AnyOf([compile_condition(c, scope, path + ("any", i)) for i, c in enumerate(spec.any)])
    if spec.not_ is not None:
        return Not(compile_condition(spec.not_, scope, path + ("not",)))
    if spec.expr is not None:
        names = {"query": QUERY_NAMES, "document": DOCUMENT_NAMES, "candidate": CANDIDATE_NAMES}[scope]
        try:
            compiled = compile_expression(spec.expr, names)
        except ExpressionError as exc:
            raise CompileError(f"{exc} in expression {spec.expr!r}", path + ("expr",)) from None
        for field, value, negated in compiled.literal_tests:
            problem = (_as_of_problem("ne" if negated else "eq", value) if field == "as_of"
                       else _text_operand_problem(field, value, negated))
            if problem is not None:
                raise CompileError(f"{problem} (in expression {spec.expr!r})", path + ("expr",))
        return Expr(compiled)
    assert spec.field is not None
    _check_field(spec.field, scope, path + ("field",))
    if spec.value_from is not None:
        _check_field(spec.value_from, "query", path + ("value_from",))
    _check_text_operand(spec, path)
    if spec.field == "as_of" and spec.value_from is None:
        problem = _as_of_problem(spec.op, spec.value)
        if problem is not None:
            raise CompileError(problem, path + ("op",))
    return Leaf(spec)


def _always_text(field: str) -> str | None:
    """Why a query-side field can only ever hold text (or a list of texts), as a message says it; None for a field
    that may hold another type (a document's, a score, ``as_of``, the whole ``user.attributes`` mapping)."""
    root, _, rest = field.partition(".")
    head = rest.split(".")[0]
    if root == "query":
        return "the query's text, rewrite, language, history, entities and entity labels are strings"
    if root == "user" and head == "attributes" and "." in rest:
        return "user attributes are strings"
    if root == "user" and head in ("id", "roles", "groups", "jurisdictions"):
        return "a user's id, roles, groups and jurisdictions are strings"
    return None


def _text_operand_problem(field: str, value: Any, negated: bool) -> str | None:
    """Why testing ``field`` for equality with (or membership of) ``value`` can never decide anything: the field is
    query-side, always text, and ``value`` a number or true/false, which no comparison coerces
    (``user.attributes.level eq 1`` is never true for the attribute "1"). None where the test can decide."""
    why = _always_text(field)
    kind = kind_of(value)
    if why is None or kind is None or kind == "a string":
        return None
    shown = _show(value)
    written = f"the number {shown}" if kind == "a number" else shown
    outcome = "always" if negated else "never"
    return (f"{field} is always text ({why}), never {written}: this condition would {outcome} hold, as no value "
            f"is coerced; write the value quoted: '{shown}'")


def _check_text_operand(spec: Condition, path: tuple[str | int, ...]) -> None:
    """An ``eq``/``in``/``contains`` test (or its negation) of a query-side field with a number or true/false:
    refused, naming the field and the value to quote (:func:`_text_operand_problem`)."""
    assert spec.field is not None and spec.op is not None
    if NEGATED.get(spec.op, spec.op) not in TYPED_OPS or spec.value_from is not None:
        return
    values = spec.value if isinstance(spec.value, list) else [spec.value]
    for index, value in enumerate(values):
        problem = _text_operand_problem(spec.field, value, spec.op in NEGATED)
        if problem is not None:
            raise CompileError(problem, path + (("value", index) if isinstance(spec.value, list) else ("value",)))


AS_OF_HINT = ("compare it with ge, lt, before or after and a date (2025-01-01), a date-time or a relative date "
              "(as_of - 30d); for a rule in force on given days, give the rule from: and until:")


def _as_of_problem(op: str, value: Any) -> str | None:
    """Why a test of ``as_of`` (a moment, in UTC) against a written ``value`` could never decide anything: equality
    with a moment almost never holds (``eq 2025-01-01`` never did: it was compared with text), and text or
    numbers are no moment. None for an ordered comparison with a date or a relative date."""
    positive = NEGATED.get(op, op)
    if positive == "exists":
        return None
    if positive in ORDER_OPS:
        if _as_date_operand(value) is not None:
            return None
        return f"as_of is a moment, and {_show(value)} is no date: this condition would never hold; {AS_OF_HINT}"
    outcome = "always" if op in NEGATED else "never"
    return f"as_of is a moment: `{op}` with {_show(value)} would {outcome} hold; {AS_OF_HINT}"


def relative_tests(node: Node | None) -> tuple["Leaf", ...]:
    """The tests of a condition that compare with a relative date (``doc.date ge as_of - 1mo``), in order."""
    found: list[Leaf] = []
    stack = [node] if node is not None else []
    while stack:
        current = stack.pop()
        if isinstance(current, Leaf) and isinstance(current.literal, RelativeDate):
            found.append(current)
        stack.extend(reversed(getattr(current, "children", ())))
        if getattr(current, "child", None) is not None:
            stack.append(current.child)  # type: ignore[attr-defined]
    return tuple(found)


def _check_field(field: str, scope: Scope, path: tuple[str | int, ...]) -> None:
    root, _, rest = field.partition(".")
    allowed_roots = {"query": ("query", "user", "as_of"), "document": ("query", "user", "as_of", "doc"),
                     "candidate": ("query", "user", "as_of", "doc", "score", "candidate")}[scope]
    if root not in allowed_roots:
        where = {"query": "a rule's `when` (it is checked once per query, before any document is seen)",
                 "document": "a prefilter rule (it runs before any stage has scored anything)",
                 "candidate": "this rule"}[scope]
        raise CompileError(f"'{field}' cannot be used in {where}; usable here: {', '.join(r + '.*' if r != 'as_of' else r for r in allowed_roots)}", path)
    head = rest.split(".")[0] if rest else ""
    if root == "query" and head not in QUERY_FIELDS:
        raise CompileError(f"unknown query field '{field}'; known: {', '.join('query.' + f for f in QUERY_FIELDS)}", path)
    if root == "query" and "." in rest and head != "entities":
        raise CompileError(f"'{field}': only query.entities.<LABEL> takes a sub-field", path)
    if root == "user" and head not in USER_FIELDS:
        raise CompileError(f"unknown user field '{field}'; known: {', '.join('user.' + f for f in USER_FIELDS)}", path)
    if root == "user" and "." in rest and head != "attributes":
        raise CompileError(f"'{field}': only user.attributes.<name> takes a sub-field", path)
    if root == "candidate" and rest not in CANDIDATE_FIELDS:
        raise CompileError(f"unknown candidate field '{field}'; known: candidate.score, candidate.rank", path)
    if root == "score" and "." in rest:
        raise CompileError(f"'{field}': write score.<stage id>", path)


__all__ = [
    "Condition", "Node", "Leaf", "AllOf", "AnyOf", "Not", "Expr", "Constant", "QueryView", "Subject", "Frame",
    "NullView",
    "CompileError", "compile_condition", "MISSING", "RelativeDate", "ExpressionRuntimeError", "present",
    "redact_query_evidence",
]
