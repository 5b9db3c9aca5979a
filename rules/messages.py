"""Validation errors of analysts' files (rule files, glossaries) in the analyst's terms.

The engine's :func:`engine.config.issues_from_validation` locates each pydantic error; this module
rewrites what pydantic says into words an analyst can act on:

- an unknown key is compared with the keys as they are written in YAML (``from``, ``not``), never
  with the Python names behind them (``valid_from``, ``not_``), in nested conditions too;
- a message raised by our own validators is shown as written (no ``Value error,`` prefix), and
  the offending value is not repeated when the message already quotes it;
- a value that does not fit a pattern says what is allowed instead of showing the raw regex.
"""

from __future__ import annotations

from difflib import get_close_matches
from typing import Any

from pydantic import BaseModel, ValidationError

from engine.config import fields_at, issues_from_validation, models_in, yaml_key
from engine.errors import ConfigIssue
from engine.yamlsource import PathKey, SourceMap

# error types our validators raise (PydanticCustomError) and the built-in "value_error"
_OWN_TYPES = frozenset({"rule", "rule_condition", "glossary", "value_error", "assertion_error"})


def yaml_keys(model: type[BaseModel]) -> list[str]:
    return [yaml_key(name, field) for name, field in model.model_fields.items()]


def _field_by_key(model: type[BaseModel], key: str) -> Any:
    for name, field in model.model_fields.items():
        if yaml_key(name, field) == key or name == key:
            return field
    return None


def model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that validates the mapping at ``loc`` inside ``model`` (None when it cannot be told)."""
    current: list[type[BaseModel]] = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        following: list[type[BaseModel]] = []
        for candidate in current:
            field = _field_by_key(candidate, str(part))
            if field is not None:
                following.extend(m for m in models_in(field.annotation) if m not in following)
        if not following:
            return None
        current = following
    return current[0] if len(current) == 1 else None


def _quoted(error: Any) -> bool:
    """Whether our validator's message already shows the value (raised with context ``{"shows_input": True}``)."""
    context = error.get("ctx") or {}
    return bool(context.get("shows_input"))


def analyst_issues(
    exc: ValidationError, source: SourceMap, prefix: PathKey, model: type[BaseModel]
) -> list[ConfigIssue]:
    """Located issues for ``exc`` (raised validating ``model`` at ``prefix``), in the analyst's terms."""
    errors = exc.errors(include_url=False)
    located = issues_from_validation(exc, source, prefix, model)
    if len(located) != len(errors):  # not one issue per error: keep the engine's wording
        return located
    issues = []
    for error, issue in zip(errors, located):
        message = _message(error, model)
        issues.append(issue if message is None else ConfigIssue(issue.location, issue.path, message, issue.severity))
    return issues


def _message(error: Any, model: type[BaseModel]) -> str | None:
    """A better message for one pydantic error, or None to keep the engine's."""
    kind = error["type"]
    loc = tuple(error["loc"])
    given = error.get("input")
    plain = "input" in error and not isinstance(given, (dict, list))
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        owner = model_at(model, loc[:-1])
        valid = yaml_keys(owner) if owner is not None else (fields_at(model, loc[:-1]) or [])  # a union: every arm's
        message = f"unknown field '{key}'"
        field = owner.model_fields.get(key) if owner is not None else None
        # a Python name behind a YAML key (valid_from for `from`): point at the key
        hint = [yaml_key(key, field)] if field is not None else get_close_matches(key, valid, n=1)
        if hint:
            message += f" (did you mean '{hint[0]}'?)"
        if valid:
            message += f"; valid fields: {', '.join(valid)}"
        return message
    if kind in _OWN_TYPES:
        message = str(error["msg"])
        for noise in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(noise)
        if plain and not _quoted(error):
            message += f" (got {given!r})"
        return message
    if kind == "string_pattern_mismatch":
        message = "contains characters that are not allowed here"
        return message + (f" (got {given!r})" if plain else "")
    return None

