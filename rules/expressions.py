"""Sandboxed Jinja2 expressions for rule conditions (``expr: "..."``).

Expressions are parsed and checked once, when a rule file is loaded, and evaluated many times.
Three layers keep them harmless:

1. Static checks on the parsed expression: only the names the rule's scope offers (``query``,
   ``user``, ``doc``...) may be used, and no attribute or item whose name starts with ``_`` may
   be read — so ``''.__class__.__mro__`` is refused at load time, with the rule's location.
2. Jinja2's ``ImmutableSandboxedEnvironment`` at run time: no imports, no I/O, no mutating
   methods, no internals; an unsafe access raises instead of quietly yielding ``Undefined``.
3. Size guards on ``*``, ``**`` and ``+`` so ``'x' * 10**10`` cannot exhaust memory.

Values handed to an expression are plain data (dicts, lists, strings, numbers, datetimes), never
engine objects. Attribute syntax on a mapping reads its key first (``doc.items`` is the metadata
field ``items``, not ``dict.items``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime, timezone
from functools import lru_cache
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_EXPRESSION_CHARS = 2000
MAX_SEQUENCE_RESULT = 100_000  # longest string/list that `*` or `+` may build
MAX_POWER_EXPONENT = 64


class ExpressionError(ValueError):
    """An expression is malformed or uses something the sandbox forbids (raised at load time)."""


class ExpressionRuntimeError(RuntimeError):
    """An expression failed while being evaluated (type error, sandbox violation...)."""


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


class RuleEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox rule expressions run in."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self) -> None:
        super().__init__(autoescape=False, cache_size=0)
        self.globals.clear()  # no range/dict/lipsum/cycler/joiner/namespace
        self.globals.update({"date": parse_date, "days_between": days_between})
        self.filters["matches"] = regex_search
        self.filters["date"] = parse_date

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                length = _size(seq)
                if length is not None and isinstance(times, int) and length * max(times, 0) > MAX_SEQUENCE_RESULT:
                    raise SecurityError(f"'*' would build a sequence longer than {MAX_SEQUENCE_RESULT}")
        elif operator == "**":
            if isinstance(right, (int, float)) and abs(right) > MAX_POWER_EXPONENT:
                raise SecurityError(f"exponents above {MAX_POWER_EXPONENT} are not allowed")
        elif operator == "+":
            a, b = _size(left), _size(right)
            if a is not None and b is not None and a + b > MAX_SEQUENCE_RESULT:
                raise SecurityError(f"'+' would build a sequence longer than {MAX_SEQUENCE_RESULT}")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if attribute.startswith("_"):
            raise SecurityError(f"access to attribute {attribute!r} is not allowed")
        if isinstance(obj, Mapping):
            if attribute in obj:
                return obj[attribute]
            return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(argument, str) and argument.startswith("_"):
            raise SecurityError(f"access to item {argument!r} is not allowed")
        return super().getitem(obj, argument)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")


_ENV: RuleEnvironment | None = None


def environment() -> RuleEnvironment:
    global _ENV
    if _ENV is None:
        _ENV = RuleEnvironment()
    return _ENV


# --------------------------------------------------------------------------- helpers offered


def parse_date(value: Any) -> datetime | None:
    """ISO date or datetime (string, date or datetime) to an aware UTC datetime; None if it is not one."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    if isinstance(value, str):
        text = value.strip()
        if not text or len(text) > 40:
            return None
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)
    return None


def days_between(start: Any, end: Any) -> float | None:
    """Days from ``start`` to ``end`` (dates or ISO strings); None when either is not a date."""
    a, b = parse_date(start), parse_date(end)
    if a is None or b is None:
        return None
    return (b - a).total_seconds() / 86400.0


@lru_cache(maxsize=512)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def regex_search(value: Any, pattern: str, ignore_case: bool = True) -> bool:
    """``value|matches("pat")``: does the regex occur in the text (case-insensitive by default)?"""
    if not isinstance(value, str) or not isinstance(pattern, str) or len(pattern) > 500:
        return False
    flags = "(?i)" if ignore_case else ""
    try:
        return _regex(flags + pattern).search(value) is not None
    except re.error:
        raise ExpressionRuntimeError(f"invalid regular expression {pattern!r}") from None


# --------------------------------------------------------------------------- compiling


class CompiledExpression:
    """A checked, compiled expression; call :meth:`evaluate` with the scope's variables."""

    def __init__(
        self, source: str, names: frozenset[str], template_expression: Any,
        members: dict[str, frozenset[str]] | None = None,
    ):
        self.source = source
        self.names = names  # the top-level variables it reads
        self.members = members or {}  # name -> constant keys read on it (`score.rerank`, `score['x']`)
        self._expression = template_expression

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        try:
            return self._expression(**variables)
        except SecurityError as exc:
            raise ExpressionRuntimeError(f"refused by the sandbox: {exc}") from None
        except ExpressionRuntimeError:
            raise
        except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError) as exc:
            raise ExpressionRuntimeError(f"{type(exc).__name__}: {exc}") from None

    def truth(self, variables: Mapping[str, Any]) -> bool:
        """The expression's value as a condition (Jinja truthiness; undefined is false)."""
        return bool(self.evaluate(variables))


def compile_expression(source: str, allowed_names: frozenset[str] | set[str]) -> CompiledExpression:
    """Parse, check and compile ``source``; raise :class:`ExpressionError` with a plain message."""
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError("the expression is empty")
    if len(source) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    env = environment()
    try:
        parser = Parser(env, source, state="variable")
        tree = parser.parse_expression()
        if not parser.stream.eos:
            raise TemplateSyntaxError("unexpected text after the expression", parser.stream.current.lineno)
    except TemplateSyntaxError as exc:
        raise ExpressionError(f"syntax error: {exc.message}") from None
    every_node = [tree, *tree.find_all(nodes.Node)]  # find_all skips the root itself
    names = {node.name for node in every_node if isinstance(node, nodes.Name)}
    unknown = sorted(names - set(allowed_names) - set(env.globals))
    if unknown:
        raise ExpressionError(
            f"unknown name{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)}; "
            f"available here: {', '.join(sorted(set(allowed_names) | set(env.globals)))}"
        )
    members: dict[str, set[str]] = {}
    for node in every_node:
        if not isinstance(node, (nodes.Getattr, nodes.Getitem)):
            continue
        attr = node.attr if isinstance(node, nodes.Getattr) else None
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            attr = node.arg.value
        if attr is not None and attr.startswith("_"):
            raise ExpressionError(f"access to {attr!r} is not allowed (names starting with '_' are internals)")
        if attr is not None and isinstance(node.node, nodes.Name):
            members.setdefault(node.node.name, set()).add(attr)
    try:
        compiled = env.compile_expression(source, undefined_to_none=False)
    except TemplateSyntaxError as exc:  # pragma: no cover - parse above already caught these
        raise ExpressionError(f"syntax error: {exc.message}") from None
    return CompiledExpression(source, frozenset(names), compiled, {k: frozenset(v) for k, v in members.items()})
