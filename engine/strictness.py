"""No silent coercion of configuration values.

pydantic's default ("lax") mode turns ``top_k: "10"`` into 10, ``top_k: true`` into 1 and
``explain: "off"`` into false. In a file an analyst wrote, each of those is more likely a
mistake than an intention, and a config that means something other than it says is exactly what
an auditor must not be handed. :class:`NoCoercion` rejects them, located at the field:

- a number field (int, float) takes a number: not true/false, not text ("10");
- an integer field does not take 2.0 written as a float (pydantic refuses 2.5 itself);
- a true/false field takes true or false: not 1/0, not text ("yes", "off");
- a literal (``version: Literal[1]``) takes a value of its own type: ``version: true`` and ``version: 1.0`` are
  not 1 (a literal of numbers is checked as a number field, one of true/false as a true/false field);
- a date field (datetime, date, or a union holding one) takes a date written as text: not a number, nor text
  that is only a number (``20240101``, ``"1700000000"``), which pydantic would read as seconds since 1970, so
  that ``on_or_after: 20240101`` became 1970-08-23 (a union that also takes text leaves text to its own check).

Values pydantic refuses anyway ("many" for a number) keep pydantic's own message.

The same holds inside lists, tuples and dict values of those types (``weights: {bm25: "1"}``).
Everything else (strings, paths, literals of text) validates as before.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from datetime import date, datetime
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from engine.model import iso_moment, not_a_moment

_NUMBER = (int, float)
# the strings pydantic's lax mode would turn into a boolean
_BOOLEAN_WORDS = frozenset("true false t f yes no y n on off 1 0".split())


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _arms(annotation: Any) -> tuple[Any, ...]:
    """The non-None alternatives of an Optional/Union annotation (the annotation itself otherwise); a literal stands
    for the types of its values (``Literal[1]`` for int, ``Literal[True]`` for bool, ``Literal["a", "b"]`` for str),
    so that its values are taken as written like those of a field of that type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # a type with validators of its own (Annotated[str, AfterValidator(...)])
        return _arms(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        arms: list[Any] = []
        for arm in typing.get_args(annotation):
            arms.extend(a for a in _arms(arm) if a is not type(None) and a not in arms)
        return tuple(arms)
    if origin is typing.Literal:
        return tuple(dict.fromkeys(type(value) for value in typing.get_args(annotation)))
    return (annotation,)


_DATES = (datetime, date)


def _date_problem(value: Any, takes_text: bool) -> str | None:
    """Why ``value`` is no date as written for a date field (None: it is one, or is not ours to judge). ``takes_text``:
    the field also takes text of its own (a relative date), which it checks itself."""
    if isinstance(value, bool):
        return None  # pydantic refuses true/false for a date itself
    if isinstance(value, (int, float)):
        written = repr(value)
    elif isinstance(value, str) and not takes_text and _numeric(value):
        written = value.strip()
    else:
        return None
    digits = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", written)
    if digits is not None:
        try:
            as_iso = date(*map(int, digits.groups())).isoformat()
        except ValueError:
            as_iso = None
        if as_iso is not None:
            return f"a date is written as text: {as_iso} (a number would be read as seconds since 1970)"
    return ("a date is written as text, e.g. 2025-06-30 or 2025-06-30T12:00:00Z, not a number (a number would be "
            "read as seconds since 1970)")  # the message's "(got ...)" shows the number as written


def coercion_problem(value: Any, annotation: Any) -> str | None:
    """Why ``value`` would only fit ``annotation`` by coercion (None: it fits as it is, or is not ours to judge)."""
    arms = _arms(annotation)
    if value is None:
        return None
    if any(a in _DATES for a in arms) and not any(a in _NUMBER for a in arms):
        return _date_problem(value, takes_text=str in arms)
    if len(arms) != 1:
        scalar = [a for a in arms if a in (int, float, bool)]
        if scalar and len(scalar) == len(arms):  # e.g. int | float
            arms = (float,) if float in scalar else (scalar[0],)
        else:
            return None
    (annotation,) = arms
    if annotation is bool:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return "expected true or false, not a number"
        if isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS:
            return "expected true or false, not text (write true or false without quotes)"
        return None  # anything else pydantic refuses with its own message
    if annotation in _NUMBER:
        if isinstance(value, bool):
            return "expected a number, not true/false"
        if isinstance(value, str) and _numeric(value):
            try:  # the fix is to unquote it, unless it would then be a number of the wrong kind ("1.0" for an int)
                unquoted = float(value)
            except ValueError:
                unquoted = None
            if (annotation is int and unquoted is not None and unquoted.is_integer()
                    and any(mark in value.lower() for mark in (".", "e"))):  # unquoted, a float: 1.0, 1e1
                return f"expected a whole number, not text (write {int(unquoted)}, without quotes)"
            return "expected a number, not text (write it without quotes)"
        with_unit = _NUMBER_WITH_UNIT.fullmatch(value) if isinstance(value, str) else None
        if with_unit is not None:  # deadline_ms: 800ms, top_k: 10 docs
            return (f"expected a number, not text: write {with_unit.group(1)} alone (a setting's unit is fixed by its "
                    "name or description, see `sieve schema`, not written with the value)")
        if annotation is int and isinstance(value, float) and value.is_integer():
            return f"expected a whole number (write {int(value)}, not {value})"
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, set, frozenset, tuple) and isinstance(value, (list, tuple)) and args:
        item = args[0] if origin is not tuple or (len(args) == 2 and args[1] is Ellipsis) else None
        for index, element in enumerate(value):
            element_type = item if item is not None else (args[index] if index < len(args) else None)
            if element_type is None:
                continue
            problem = coercion_problem(element, element_type)
            if problem is not None:
                return f"item {index}: {problem} (got {element!r})"
        return None
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        for key, element in value.items():
            problem = coercion_problem(element, args[1])
            if problem is not None:
                return f"'{key}': {problem} (got {element!r})"
    return None


_NUMBER_WITH_UNIT = re.compile(r"\s*([+-]?\d+(?:\.\d+)?)\s*([A-Za-z%µ]+\.?)\s*")


def iso_text_moment(value: Any) -> Any:
    """A ``BeforeValidator`` for a field holding a moment: text read by Sieve's one parser
    (``engine.model.iso_moment``: the shapes a query's ``as_of`` and documents' dates take), so that the field reads
    ``2025-06-01t10:00:00z`` as they do and refuses ``2025-06-01x10:00``, once; text that is only a number is left to
    :class:`NoCoercion`, which refuses it."""
    if not isinstance(value, str) or _numeric(value):
        return value
    moment = iso_moment(value)
    if moment is None:
        raise PydanticCustomError("iso_8601", "{reason}", {"reason": not_a_moment(value)})
    return moment


IsoMoment = Annotated[Union[datetime, date], BeforeValidator(iso_text_moment)]


class NoCoercion(BaseModel):
    """Mixin for configuration models: numbers, booleans (and lists / dicts of them) are taken as written."""

    @field_validator("*", mode="before")
    @classmethod
    def _as_written(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is None:
            return value
        problem = coercion_problem(value, field.annotation)
        if problem is not None:
            raise PydanticCustomError("as_written", problem)
        return value


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words: null, boolean, number, string, array, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def a_json_kind(value: Any) -> str:
    """:func:`json_kind` as a message says it: "null", "a boolean", "a number", "an array", "an object"."""
    kind = json_kind(value)
    return kind if kind == "null" else ("an " if kind[0] in "aeiou" else "a ") + kind


# ---------------------------------------------------------------------------- JSON objects a key given twice

LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # json.loads joins escaped pairs: any left is a lone one


class FlawedObject(dict):  # type: ignore[type-arg]
    """A JSON object with keys Sieve refuses (the server's bodies, sieve batch's query lines): given more than once
    (``duplicated``), or holding a lone surrogate (``unreadable``)."""

    duplicated: list[str]
    unreadable: list[str]


def strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s object_pairs_hook: the object, marked when it gives a key twice (json would keep the last,
    silently) or a key that is not valid Unicode text; ``refused_keys`` lists them. Shared by the server's bodies and
    ``sieve batch``'s query lines, which refuse the same keys."""
    obj = dict(pairs)
    unreadable = [key for key in obj if LONE_SURROGATE.search(key)]
    if len(obj) == len(pairs) and not unreadable:
        return obj
    marked = FlawedObject(obj)
    marked.unreadable = unreadable
    marked.duplicated = []
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen and key not in marked.duplicated:
            marked.duplicated.append(key)
        seen.add(key)
    return marked


def walk_json(document: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every value of parsed JSON (or YAML) data with its path from the root (an object's keys, a list's positions as
    text), in document order, the containers before what they hold; iterative, so any depth is walked."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        yield path, value
        if isinstance(value, dict):
            stack.extend((item, (*path, key)) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((item, (*path, str(i))) for i, item in reversed(list(enumerate(value))))


def refused_keys(document: Any) -> list[tuple[tuple[str, ...], str]]:
    """Each refused key in the objects of a ``document`` parsed with ``strict_object``, in document order: (the
    key's path from the document's root, its last part the key; "duplicated" or "unreadable")."""
    found: list[tuple[tuple[str, ...], str]] = []
    for path, value in walk_json(document):
        if isinstance(value, dict):
            found.extend(((*path, key), "unreadable") for key in getattr(value, "unreadable", ()))
            found.extend(((*path, key), "duplicated") for key in getattr(value, "duplicated", ()))
    return found


def matchable(what: str, consequence: str = "it can never match") -> AfterValidator:
    """The check of a name, term or id that is matched against text (a gazetteer's names, a glossary's terms): no
    control character, something visible (``engine.yamlsource.unmatchable_problem``; an empty one is left to the
    model's own checks), located at the item: ``the term has no visible character ...: it can never match``."""

    def check(text: str) -> str:
        from engine.yamlsource import unmatchable_problem

        problem = unmatchable_problem(text) if text.strip() else None
        if problem is not None:
            raise PydanticCustomError("unmatchable", "the {what} {problem}: {consequence}",
                                      {"what": what, "problem": problem, "consequence": consequence})
        return text

    return AfterValidator(check)
