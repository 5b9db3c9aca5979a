"""The rule-file format as an analyst reads it (``sieve rules reference``): every key of a rule file, of every rule
and of each action, with its type, default and meaning, and the condition operators, read from the models that
validate the files, so the reference cannot drift from what is accepted."""

from __future__ import annotations

import types
import typing
from datetime import date, datetime
from typing import Any

from pydantic import BaseModel

from rules.conditions import Condition, Op
from rules.ruleset import OVERRIDE_ACTIONS, PREFILTER_ACTIONS, OverrideRule, RuleBase, RuleFileSchema

OPERATORS: dict[str, str] = {
    "eq": "equals the value (a list field: one of its elements does)",
    "ne": "equals no such value (a missing field holds)",
    "in": "is one of the listed values",
    "not_in": "is none of the listed values",
    "contains": "text: contains the value as a substring; list: has it as an element",
    "not_contains": "the negation of contains",
    "contains_any": "contains at least one of the listed values",
    "contains_all": "contains every listed value",
    "regex": "text matches the regular expression (searched, not anchored; time-limited)",
    "exists": "value true: the field is present and not null; false: it is absent or null",
    "lt": "less than (numbers, dates)", "le": "at most", "gt": "greater than", "ge": "at least",
    "before": "a date before the value (relative values such as as_of - 1y allowed)",
    "after": "a date after the value",
}
assert set(OPERATORS) == set(typing.get_args(Op)), "every operator is described"


def _type_name(annotation: Any) -> str:
    """A type as an analyst writes a value of it: text, integer, date, 'a' | 'b', list of text, ... or null."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        parts = dict.fromkeys(_type_name(arg) for arg in args if arg is not type(None))
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if isinstance(annotation, typing.ForwardRef):
        return annotation.__forward_arg__
    names = {datetime: "date-time", date: "date", str: "text", int: "integer", float: "number", bool: "true/false",
             typing.Any: "any"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _keys(model: type[BaseModel], leave_out: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    rows = []
    for name, info in model.model_fields.items():
        if name in leave_out:
            continue
        required = info.is_required()
        default = None if required else info.get_default(call_default_factory=True)
        shown_type = {"op": "operator", "rules": "list of rules"}.get(info.alias or name) or _type_name(info.annotation)
        rows.append({"key": info.alias or name, "type": shown_type, "required": required,
                     "default": default if isinstance(default, (str, int, float, bool, list, type(None))) else str(default),
                     "description": info.description or ""})
    return rows


def rule_reference() -> dict[str, Any]:
    """The reference as data: the file's keys, every rule's keys, each action's own keys (per kind), the condition's
    keys and its operators."""
    every_rule = frozenset(RuleBase.model_fields)
    every_override = frozenset(OverrideRule.model_fields)

    def actions(table: dict[str, type[RuleBase]], shared: frozenset[str]) -> dict[str, Any]:
        """Per action (actions one model validates, such as exclude and include, share an entry: "exclude, include")."""
        grouped: dict[type[RuleBase], list[str]] = {}
        for action, model in table.items():
            grouped.setdefault(model, []).append(action)
        return {", ".join(names): {"summary": " ".join((model.__doc__ or "").split()).replace("``", "`"),
                                   "keys": _keys(model, shared)}
                for model, names in grouped.items()}

    return {
        "file": _keys(RuleFileSchema),
        "every_rule": _keys(RuleBase, frozenset({"action"})),
        "prefilter": actions(PREFILTER_ACTIONS, every_rule),
        "override_targets": _keys(OverrideRule, every_rule),
        "override": actions(OVERRIDE_ACTIONS, every_override),
        "condition": _keys(Condition),
        "operators": OPERATORS,
    }
