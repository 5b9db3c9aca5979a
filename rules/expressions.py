"""Sandboxed Jinja2 expressions for rule conditions (``expr: "..."``).

Expressions are parsed and checked once, when a rule file is loaded, and evaluated many times.
Four layers keep them harmless:

1. Static checks on the parsed expression: only the names the rule's scope offers (``query``,
   ``user``, ``doc``...) may be used, and no attribute or item whose name starts with ``_`` may
   be read — so ``''.__class__.__mro__`` is refused at load time, with the rule's location.
2. Jinja2's ``ImmutableSandboxedEnvironment`` at run time: no imports, no I/O, no mutating
   methods, no internals; an unsafe access raises instead of quietly yielding ``Undefined``.
3. Size guards, checked before anything is built, so that neither ``'x' * 10**10`` nor
   ``'x'|center(10**10)`` nor ``9**64**64`` can exhaust memory or time: every operator, filter
   and method that can make a string or list much larger than its inputs (``*``, ``+``, ``~``,
   ``%``, ``str.format``, ``center``/``ljust``/``rjust``/``zfill``/``expandtabs``/``replace``/
   ``join``/``translate``, the ``indent``, ``wordwrap``, ``batch``, ``slice``, ``urlize``,
   ``tojson`` and ``pprint`` filters...) estimates the size of its result from its arguments
   and refuses one larger than :data:`MAX_SEQUENCE_RESULT`; ``**`` refuses an exponent above
   :data:`MAX_POWER_EXPONENT` or an integer result of more than :data:`MAX_POWER_BITS` bits.
   Nothing is computed when an expression is compiled (Jinja's constant folding is off), so a
   refusal is always an evaluation error, at warm-up or on a query, never a hang at load time.
4. A depth guard, checked before Jinja parses: Jinja's parser and compiler, and Python's own
   compiler, recurse once per level of nesting, so an expression may nest at most
   :data:`MAX_EXPRESSION_DEPTH` levels (each bracket, each ``not`` or sign, and each operator of a
   chain such as ``a or b or c`` or ``1 + 1 + 1``: Jinja nests a chain); a deeper one is a load-time
   error of its rule, never a crash.

Values handed to an expression are plain data (dicts, lists, strings, numbers, datetimes), never
engine objects. Attribute syntax on a mapping reads its key first (``doc.items`` is the metadata
field ``items``, not ``dict.items``).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import date, datetime, timezone
from functools import lru_cache, update_wrapper
from string import Formatter
from typing import Any, Callable

import regex as _regex_engine
from jinja2 import nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator
from jinja2.defaults import DEFAULT_FILTERS
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.filters import make_attrgetter
from jinja2.parser import Parser
from jinja2.runtime import Undefined, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from markupsafe import Markup

from engine.model import iso_moment, utc
from engine.textform import comparable, comparable_pattern

MAX_EXPRESSION_CHARS = 2000
# Deepest nesting an expression may have (see the module's docstring). Jinja's parser takes about 14.5 Python frames
# per bracket, so 40 brackets take under 600 of Python's default recursion limit of 1000, leaving the rest to whatever
# compiles the expression (the CLI, a test runner, a server); and 40 levels of operators stay well inside Python's
# limit of 200 nested parentheses in the code Jinja generates (at most two per level).
MAX_EXPRESSION_DEPTH = 40
# Largest string or list an operator, filter or method may build. A list counts its items plus the
# items and characters of the lists, mappings and strings in it, so `['x' * 1000] * 1000` is
# 1,001,000 and refused: a list of references to one big string would turn huge when joined.
MAX_SEQUENCE_RESULT = 100_000
MAX_POWER_EXPONENT = 64
MAX_POWER_BITS = 4096  # largest integer `**` may build: (2**63)**64 is 4033 bits, (2**64)**64 is refused


class ExpressionError(ValueError):
    """An expression is malformed or uses something the sandbox forbids (raised at load time)."""


class ExpressionRuntimeError(RuntimeError):
    """An expression failed while being evaluated (type error, sandbox violation...). ``withheld``: what failed,
    quoting no value (the message may quote the query: a trace without query text records this instead)."""

    def __init__(self, message: str, withheld: str | None = None):
        super().__init__(message)
        self.withheld = withheld if withheld is not None else "the expression failed"

    def describe(self, trace_text: bool) -> str:
        """The message, or under ``include_query_text: false`` what failed without it."""
        if trace_text:
            return str(self)
        return f"{self.withheld} (the message is withheld: it may quote the query, and include_query_text is false)"


# --------------------------------------------------------------------------- size estimates


def _bulk(value: Any, budget: int = MAX_SEQUENCE_RESULT) -> int:
    """Characters and items in ``value``, counting nested lists, tuples and mappings and the strings
    in them (0 for a number). Stops counting soon after passing ``budget``."""
    total, stack = 0, [value]
    while stack and total <= budget:
        item = stack.pop()
        if isinstance(item, (str, bytes, bytearray)):
            total += len(item)
        elif isinstance(item, (list, tuple)):
            total += len(item)
            stack.extend(item)
        elif isinstance(item, Mapping):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
    return total


def _size(value: Any, budget: int = MAX_SEQUENCE_RESULT) -> int | None:
    """:func:`_bulk` of a string, bytes, list or tuple; None for anything else (a number...)."""
    return _bulk(value, budget) if isinstance(value, (str, bytes, bytearray, list, tuple)) else None


def _text_size(value: Any, budget: int = MAX_SEQUENCE_RESULT, indent: int = 0) -> int:
    """About how long ``str(value)`` is (strings inside containers count their quotes, not their
    escapes). ``indent``: characters put before every item per nesting level, as ``pprint`` and
    ``tojson(indent=...)`` do. Stops counting soon after passing ``budget``."""
    total, stack = 0, [(value, 0, False)]
    while stack and total <= budget:
        item, depth, nested = stack.pop()
        if isinstance(item, str):
            total += len(item) + (2 if nested else 0)
        elif isinstance(item, (bytes, bytearray)):
            total += len(item) + 3
        elif isinstance(item, Undefined):
            pass  # renders as ''
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2  # log10(2) < 1/3
        elif isinstance(item, (list, tuple, set, frozenset, Mapping)):
            per_item = 4 + indent * (depth + 1)  # separator, line break and indentation
            total += 2 + indent * depth + len(item) * per_item
            children = [*item.keys(), *item.values()] if isinstance(item, Mapping) else item
            stack.extend((child, depth + 1, True) for child in children)
        else:
            total += 32  # floats, dates
    return total


def _number_slack(value: Any) -> int:
    """Extra characters a number may take with a format (``%f`` of 1e308, ``{:b}`` of an int)."""
    if isinstance(value, int):
        return value.bit_length() + 8
    return 330 if isinstance(value, float) else 0


def _spec_numbers(spec: str) -> int:
    """Sum of the numbers in a format spec (widths, precisions), huge for an absurdly long one."""
    return sum(int(d) if len(d) < 10 else MAX_SEQUENCE_RESULT + 1 for d in re.findall(r"\d+", spec))


def _refuse_longer(size: int, what: str) -> None:
    if size > MAX_SEQUENCE_RESULT:
        raise SecurityError(f"{what} would build a string or list longer than {MAX_SEQUENCE_RESULT}")


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) else 0  # anything else: the real call raises TypeError


def _printf_size(fmt: str | bytes, values: Any) -> int:
    """About how long ``fmt % values`` is, from each conversion's width, precision and argument."""
    text = fmt.decode("latin-1") if isinstance(fmt, (bytes, bytearray)) else str(fmt)
    positional = list(values) if isinstance(values, tuple) else [values]
    total, position, index = len(text), 0, 0

    def take() -> Any:
        nonlocal position
        position += 1
        return positional[position - 1] if position <= len(positional) else None

    while True:
        index = text.find("%", index)
        if index < 0 or index + 1 >= len(text):
            return total
        index += 1
        value: Any = None
        if text[index] == "(":  # %(key)s, parentheses nest as in CPython
            depth, start = 1, index + 1
            while depth and index + 1 < len(text):
                index += 1
                depth += {"(": 1, ")": -1}.get(text[index], 0)
            key = text[start:index]
            value = values.get(key) if isinstance(values, Mapping) else None
            index += 1
        while index < len(text) and text[index] in "-+ #0":
            index += 1
        numbers = []
        for allow_dot in (False, True):
            if allow_dot:
                if index >= len(text) or text[index] != ".":
                    break
                index += 1
            if index < len(text) and text[index] == "*":
                numbers.append(_int_or_zero(take()))
                index += 1
            else:
                digits = re.match(r"\d*", text[index:]).group()
                numbers.append(_spec_numbers(digits) if digits else 0)
                index += len(digits)
        while index < len(text) and text[index] in "hlL":
            index += 1
        if index < len(text) and text[index] != "%":
            if value is None:
                value = take()
            total += sum(max(n, 0) for n in numbers) + _text_size(value) + _number_slack(value)
        index += 1
        if total > MAX_SEQUENCE_RESULT:
            return total


class _SizedFormatterMixin:
    """``str.format`` that estimates every field before formatting it and keeps a running total."""

    _budget: int

    def format_field(self, value: Any, format_spec: str) -> Any:
        size = _text_size(value) + _number_slack(value) + _spec_numbers(format_spec)
        if isinstance(value, date):
            size += 16 * len(format_spec)  # a strftime pattern: '%c' is 24 characters
        self._budget -= size
        if self._budget < 0:
            raise SecurityError(f"format() would build a string or list longer than {MAX_SEQUENCE_RESULT}")
        return super().format_field(value, format_spec)  # type: ignore[misc]


class _SizedFormatter(_SizedFormatterMixin, SandboxedFormatter):
    pass


class _SizedEscapeFormatter(_SizedFormatterMixin, SandboxedEscapeFormatter):
    pass


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


_GROWING_STR_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join", "translate"})


def _checked_method_args(method: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Refuse a str/bytes/int/date method call whose result would be too large; the arguments to
    call it with (``join``'s iterable read into a list, so that it is measured and used once)."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", None)
    what = f"{type(owner).__name__}.{name}()"
    if isinstance(owner, (str, bytes, bytearray)) and name in _GROWING_STR_METHODS:
        length = len(owner)
        if name in ("center", "ljust", "rjust", "zfill"):
            _refuse_longer(max(length, _int_or_zero(_arg(args, kwargs, 0, "width"))), what)
        elif name == "expandtabs":
            tab = "\t" if isinstance(owner, str) else b"\t"
            _refuse_longer(length + owner.count(tab) * max(_int_or_zero(_arg(args, kwargs, 0, "tabsize", 8)), 0), what)
        elif name == "replace":
            old, new = _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new")
            count = _arg(args, kwargs, 2, "count", -1)
            kind = str if isinstance(owner, str) else (bytes, bytearray)  # Markup's arguments are plain str
            if isinstance(old, kind) and isinstance(new, kind):
                hits = length + 1 if not old else owner.count(old)
                if isinstance(count, int) and count >= 0:
                    hits = min(hits, count)
                _refuse_longer(length + hits * max(len(new) - len(old), 0), what)
        elif name == "join" and args:
            items = list(args[0])
            size = length * max(len(items) - 1, 0)
            for item in items:
                size += len(item) if isinstance(item, (str, bytes, bytearray)) else 0
                _refuse_longer(size, what)
            _refuse_longer(size, what)
            args = (items, *args[1:])
        elif name == "translate" and isinstance(owner, str):
            table = _arg(args, kwargs, 0, "table")
            if isinstance(table, Mapping):
                table = list(table.values())
            replacements = table if isinstance(table, (list, tuple)) else ()  # a str table maps to one character
            longest = max((len(r) for r in replacements if isinstance(r, str)), default=1)
            _refuse_longer(length * max(longest, 1), what)
    elif isinstance(owner, int) and name == "to_bytes":
        _refuse_longer(_int_or_zero(_arg(args, kwargs, 0, "length", 1)), what)
    elif isinstance(owner, date) and name == "strftime":
        pattern = _arg(args, kwargs, 0, "format")
        if isinstance(pattern, str):
            _refuse_longer(16 * len(pattern) + _spec_numbers(pattern), what)
    return args


# --------------------------------------------------------------------------- guarded filters


def _filter_center(value: Any, width: int = 80) -> str:
    _refuse_longer(max(_text_size(value), _int_or_zero(width)), "the 'center' filter")
    return DEFAULT_FILTERS["center"](value, width)


def _filter_indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    indented = (s.count("\n") if isinstance(s, str) else 0) + (1 if first else 0)  # not the first line by default
    step = len(width) if isinstance(width, str) else _int_or_zero(width)
    _refuse_longer(_text_size(s) + indented * max(step, 0), "the 'indent' filter")
    return DEFAULT_FILTERS["indent"](s, width, first, blank)


@pass_environment
def _filter_wordwrap(
    environment: Any, s: Any, width: int = 79, break_long_words: bool = True,
    wrapstring: str | None = None, break_on_hyphens: bool = True,
) -> str:
    length = _text_size(s)
    paragraphs = s.count("\n") + 1 if isinstance(s, str) else 1
    lines = 2 * length // max(_int_or_zero(width), 1) + 2 * paragraphs  # two lines hold more than `width`
    wrap = _text_size(wrapstring) if wrapstring is not None else len(environment.newline_sequence)
    _refuse_longer(length + lines * wrap, "the 'wordwrap' filter")
    return DEFAULT_FILTERS["wordwrap"](environment, s, width, break_long_words, wrapstring, break_on_hyphens)


@pass_eval_context
def _filter_replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    length = _text_size(s)
    if isinstance(s, str) and isinstance(old, str) and old:
        hits = s.count(old)
    else:
        hits = length + 1  # '' matches between every two characters
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    _refuse_longer(length + hits * _text_size(new), "the 'replace' filter")
    return DEFAULT_FILTERS["replace"](eval_ctx, s, old, new, count)


@pass_eval_context
def _filter_join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
    items = list(value)
    if attribute is not None:
        items = list(map(make_attrgetter(eval_ctx.environment, attribute), items))
    size = _text_size(d) * max(len(items) - 1, 0)
    for item in items:
        size += _text_size(item)
        _refuse_longer(size, "the 'join' filter")
    _refuse_longer(size, "the 'join' filter")
    return DEFAULT_FILTERS["join"](eval_ctx, items, d)


def _filter_format(value: Any, *args: Any, **kwargs: Any) -> str:
    _refuse_longer(_text_size(value), "the 'format' filter")
    _refuse_longer(_printf_size(str(value), kwargs or args), "the 'format' filter")
    return DEFAULT_FILTERS["format"](value, *args, **kwargs)


def _filter_batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
    items = list(value)
    count = _int_or_zero(linecount)
    if fill_with is not None and count > 0 and len(items) % count:
        padding = count - len(items) % count
        _refuse_longer(len(items) + padding * (1 + _bulk(fill_with)), "the 'batch' filter")
    return DEFAULT_FILTERS["batch"](items, linecount, fill_with)


@pass_eval_context
def _filter_slice(eval_ctx: Any, value: Any, slices: int, fill_with: Any = None) -> Any:
    items = list(value)
    count = _int_or_zero(slices)
    extra = count * (1 + _bulk(fill_with)) if fill_with is not None else 0
    _refuse_longer(len(items) + count + extra, "the 'slice' filter")
    return DEFAULT_FILTERS["slice"](eval_ctx, items, slices, fill_with)


@pass_eval_context
def _filter_urlize(
    eval_ctx: Any, value: Any, trim_url_limit: int | None = None, nofollow: bool = False,
    target: str | None = None, rel: str | None = None, extra_schemes: Any = None,
) -> str:
    length = _text_size(value)
    words = value.split() if isinstance(value, str) else []
    links = sum(1 for w in words if "." in w or "@" in w or ":" in w) if isinstance(value, str) else length
    per_link = 64 + _text_size(target) + _text_size(rel)  # <a href="..." rel="..." target="...">...</a>
    _refuse_longer(2 * length + links * per_link, "the 'urlize' filter")
    return DEFAULT_FILTERS["urlize"](eval_ctx, value, trim_url_limit, nofollow, target, rel, extra_schemes)


@pass_eval_context
def _filter_tojson(eval_ctx: Any, value: Any, indent: Any = None) -> str:
    step = len(indent) if isinstance(indent, str) else max(_int_or_zero(indent), 0)
    _refuse_longer(_text_size(value, indent=step), "the 'tojson' filter")
    return DEFAULT_FILTERS["tojson"](eval_ctx, value, indent)


def _filter_pprint(value: Any) -> str:
    _refuse_longer(_text_size(value, indent=1), "the 'pprint' filter")
    return DEFAULT_FILTERS["pprint"](value)


_GUARDED_FILTERS: dict[str, Callable[..., Any]] = {
    "center": _filter_center, "indent": _filter_indent, "wordwrap": _filter_wordwrap,
    "replace": _filter_replace, "join": _filter_join, "format": _filter_format, "batch": _filter_batch,
    "slice": _filter_slice, "urlize": _filter_urlize, "tojson": _filter_tojson, "pprint": _filter_pprint,
}


class _RuleCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to a call of :meth:`RuleEnvironment.call_concat`, which measures first."""

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.call_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


# Methods of dates that read the machine's clock (now, today) or its time zone (astimezone() with no zone,
# fromtimestamp without one): a rule using them would judge differently on another machine or day than its replay.
CLOCK_READERS = frozenset({"now", "today", "utcnow", "fromtimestamp", "utcfromtimestamp", "astimezone"})


class RuleEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox rule expressions run in."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _RuleCodeGenerator

    def __init__(self) -> None:
        # optimized=False: no constant folding, so nothing in an expression runs when it is compiled
        super().__init__(autoescape=False, cache_size=0, optimized=False)
        self.globals.clear()  # no range/dict/lipsum/cycler/joiner/namespace
        self.globals.update({"date": parse_date, "days_between": days_between})
        self.filters.update(_GUARDED_FILTERS)
        self.filters["matches"] = regex_search
        self.filters["date"] = parse_date
        # the form `field` conditions compare text in (engine.textform): `query.text | comparable` finds
        # 'overdose' in a full-width 'ｏｖｅｒｄｏｓｅ'; at most a constant factor longer than its input (NFKC)
        self.filters["comparable"] = _comparable_filter

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(times, int) and times > 0:
                    length = _size(seq, MAX_SEQUENCE_RESULT // times)
                    if length is not None and length * times > MAX_SEQUENCE_RESULT:
                        raise SecurityError(f"'*' would build a sequence longer than {MAX_SEQUENCE_RESULT}")
        elif operator == "**":
            if isinstance(right, (int, float)) and abs(right) > MAX_POWER_EXPONENT:
                raise SecurityError(f"exponents above {MAX_POWER_EXPONENT} are not allowed")
            if isinstance(left, int) and isinstance(right, int) and right > 1 and abs(left) > 1:
                if int(right * math.log2(abs(left))) + 1 > MAX_POWER_BITS:  # the bits of left ** right
                    raise SecurityError(f"'**' would build an integer of more than {MAX_POWER_BITS} bits")
        elif operator == "+":
            a, b = _size(left), _size(right)
            if a is not None and b is not None and a + b > MAX_SEQUENCE_RESULT:
                raise SecurityError(f"'+' would build a sequence longer than {MAX_SEQUENCE_RESULT}")
        elif operator == "%" and isinstance(left, (str, bytes, bytearray)):
            _refuse_longer(_printf_size(left, right), "'%'")
        return super().call_binop(context, operator, left, right)

    def call_concat(self, values: tuple[Any, ...]) -> str:
        """``a ~ b ~ ...``: the values as text, joined, if the result is not too long."""
        size = 0
        for value in values:
            size += _text_size(value)
            _refuse_longer(size, "'~'")
        return str_join(values)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        args = _checked_method_args(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format``/``format_map`` through a formatter that measures each field first."""
        if getattr(value, "__name__", None) not in ("format", "format_map"):
            return None
        f_self = getattr(value, "__self__", None)
        if not isinstance(f_self, str):
            return None
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                kwargs, args = args[0], ()
            formatter: Formatter
            if isinstance(f_self, Markup):
                formatter = _SizedEscapeFormatter(self, escape=f_self.escape)
            else:
                formatter = _SizedFormatter(self)
            formatter._budget = MAX_SEQUENCE_RESULT - len(f_self)  # type: ignore[attr-defined]
            if formatter._budget < 0:  # type: ignore[attr-defined]
                raise SecurityError(f"format() would build a string or list longer than {MAX_SEQUENCE_RESULT}")
            return type(f_self)(formatter.vformat(f_self, args, kwargs))

        return update_wrapper(wrapper, value)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if attr in CLOCK_READERS and isinstance(obj, (date, datetime, type)):
            return False  # as_of.now(), as_of.astimezone(): the machine's clock or time zone, which no replay has
        return super().is_safe_attribute(obj, attr, value)

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
    """ISO date or datetime (string, date or datetime) to an aware UTC datetime (``engine.model.iso_moment``'s
    shapes); None if it is not one."""
    if isinstance(value, datetime):
        return utc(value)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    if isinstance(value, str):
        return iso_moment(value)
    return None


def days_between(start: Any, end: Any) -> float | None:
    """Days from ``start`` to ``end`` (dates or ISO strings); None when either is not a date."""
    a, b = parse_date(start), parse_date(end)
    if a is None or b is None:
        return None
    return (b - a).total_seconds() / 86400.0


# An analyst's pattern (the `regex` operator, the `matches` filter) runs on the `regex` engine: Python's `re` syntax
# and Unicode semantics (V0), and a time limit per search, so a pattern that backtracks catastrophically ((a+)+,
# (a|aa)+ on a long run of a's) is an error of that rule, not a hung warm-up or server.
REGEX_TIMEOUT_S = 0.25
# The engine's limit is wall-clock time, and by default it lets go of the GIL while it matches: on a busy process a
# search of a few microseconds can wait longer than the limit to get the GIL back (another thread inside one long C
# call, such as a json.dumps of a big response) and time out. So `bounded` measures its thread's CPU time around each
# attempt: a timeout after which the thread spent under REGEX_MATCHING_SHARE of the limit on the processor was
# waiting, not matching. It is tried again holding the GIL (the regex engine's concurrent=False), so that it cannot
# be kept waiting for it again, at most REGEX_ATTEMPTS attempts in all; only an attempt that spent the limit matching
# is a PatternTimeout.
REGEX_MATCHING_SHARE = 0.5
REGEX_ATTEMPTS = 3
PatternError = _regex_engine.error


# How many parts a pattern may compile to, its counted repetitions written out. The engine compiles
# ``(?:(?:a{20}){20}){20}`` into 8,000 copies (~0.01 s); five such levels take seconds and gigabytes to compile,
# before any time limit on matching applies.
MAX_PATTERN_EXPANSION = 10_000
MAX_REGEX_CHARS = 500  # the longest pattern a rule may write


def _expansion(pattern: str) -> int:
    """How many parts ``pattern`` compiles to, counted repetitions written out: parts side by side add up, a counted
    repetition multiplies its inner parts by its count (an unbounded one by its minimum), alternatives add up
    (``(a{5}b){4}`` is 24). Syntax only the regex engine knows (``\\p{L}``) is read as one character; a pattern
    Python's parser still cannot read is counted at worst: every counted repetition nested in every other."""
    import re._constants as c
    import re._parser as parser

    try:
        parsed = parser.parse(_REGEX_ONLY.sub(".", pattern))
    except Exception:  # noqa: BLE001 - syntax only the regex engine knows: counted at worst
        worst = 1
        for low, high in _COUNTED.findall(pattern):
            worst *= max(1, int(high or low or 1))
        return max(worst, len(pattern))

    def size(items: Any) -> int:
        total = 0
        for op, argument in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
                low, high, inner = argument
                total += max(1, low if high == c.MAXREPEAT else high) * size(inner)
            elif op in (c.SUBPATTERN, c.ATOMIC_GROUP):
                total += size(argument[-1])
            elif op == c.BRANCH:
                total += sum(size(alternative) for alternative in argument[1])
            elif op in (c.ASSERT, c.ASSERT_NOT):
                total += size(argument[1])
            elif op == c.GROUPREF_EXISTS:
                total += sum(size(branch) for branch in argument[1:] if branch is not None)
            else:
                total += 1
        return max(total, 1)

    return size(parsed)


# the regex engine's own escapes with braces (properties, named characters), read as one character by Python's parser
_REGEX_ONLY = re.compile(r"\\[pPN]\{[^}]*\}")
_COUNTED = re.compile(r"\{(\d*),?(\d*)\}")


@lru_cache(maxsize=512)
def compile_pattern(pattern: str, ignore_case: bool = False) -> Any:
    """``pattern`` compiled (``PatternError`` when it is not a valid regular expression, or when its counted
    repetitions written out make more than ``MAX_PATTERN_EXPANSION`` parts, which could take seconds and gigabytes)."""
    expansion = _expansion(pattern)
    if expansion > MAX_PATTERN_EXPANSION:
        raise PatternError(f"its counted repetitions written out make {expansion:,} parts (at most "
                           f"{MAX_PATTERN_EXPANSION:,}): compiling it could take seconds and gigabytes; count less "
                           "inside a counted repetition")
    return _regex_engine.compile(pattern, _regex_engine.V0 | (_regex_engine.IGNORECASE if ignore_case else 0))


class PatternTimeout(ExpressionRuntimeError):
    """An analyst's pattern ran over ``REGEX_TIMEOUT_S`` on a text, matching all the while (it backtracks without
    end)."""

    def __init__(self, pattern: Any, length: int, subject: str = "the pattern"):
        self.pattern, self.length = pattern, length
        over = (f"ran over {REGEX_TIMEOUT_S * 1000:.0f} ms on a text of {length} characters (catastrophic "
                "backtracking: a repetition inside a repetition, such as (a+)+ or (a|aa)+); rewrite it")
        super().__init__(f"{subject} {pattern.pattern!r} {over}", f"{subject} {over}")


class PatternStarved(PatternTimeout):
    """A pattern ran over ``REGEX_TIMEOUT_S`` of wall-clock time in each of ``REGEX_ATTEMPTS`` attempts while its
    thread spent little of it matching: the process was too busy, nothing says the pattern backtracks. Handled as a
    PatternTimeout (the search has no answer), without blaming the pattern."""

    def __init__(self, pattern: Any, length: int, subject: str, cpu_seconds: list[float]):
        self.pattern, self.length, self.cpu_seconds = pattern, length, cpu_seconds
        over = (f"could not finish on a text of {length} characters: {len(cpu_seconds)} attempts each ran over "
                f"{REGEX_TIMEOUT_S * 1000:.0f} ms of wall-clock time with at most {max(cpu_seconds) * 1000:.0f} ms "
                "of it matching (its thread was kept waiting: the process was too busy to judge the pattern)")
        ExpressionRuntimeError.__init__(self, f"{subject} {pattern.pattern!r} {over}", f"{subject} {over}")


def bounded(method: Callable[..., Any], pattern: Any, text: str, subject: str = "the pattern") -> Any:
    """``method(text, timeout=...)`` for one of ``pattern``'s methods (``search``, ``fullmatch``, ``finditer``: an
    iterator is run to its end here), within ``REGEX_TIMEOUT_S`` of matching; PatternTimeout naming ``subject`` when
    it runs over. An attempt that timed out while its thread was mostly off the processor (waiting for the GIL) is
    tried again holding the GIL (see REGEX_ATTEMPTS); PatternStarved when every attempt was kept waiting."""
    cpu_seconds: list[float] = []
    for attempt in range(REGEX_ATTEMPTS):
        # the first attempt lets other threads run while it matches; a retry holds the GIL for at most the limit
        concurrent = None if attempt == 0 else False
        started = time.thread_time()
        try:
            result = method(text, timeout=REGEX_TIMEOUT_S, concurrent=concurrent)
            return list(result) if method.__name__ == "finditer" else result
        except TimeoutError:
            spent = time.thread_time() - started
        if spent >= REGEX_TIMEOUT_S * REGEX_MATCHING_SHARE:
            raise PatternTimeout(pattern, len(text), subject) from None
        cpu_seconds.append(spent)
    raise PatternStarved(pattern, len(text), subject, cpu_seconds)


def bounded_search(pattern: Any, text: str) -> Any:
    """``pattern.search(text)`` within ``REGEX_TIMEOUT_S``; an ExpressionRuntimeError when it runs over."""
    return bounded(pattern.search, pattern, text)


def regex_search(value: Any, pattern: str, ignore_case: bool = True) -> bool:
    """``value|matches("pat")``: does the regex occur in the text (case-insensitive by default)? The text is read
    as ``op: regex`` reads it (``engine.textform.comparable`` but for case and white space): a full-width or
    decomposed spelling matches as its plain one."""
    if not isinstance(value, str) or not isinstance(pattern, str) or len(pattern) > MAX_REGEX_CHARS:
        return False
    try:
        compiled = compile_pattern(comparable_pattern(pattern), bool(ignore_case))
    except PatternError:
        raise ExpressionRuntimeError(f"invalid regular expression {pattern!r}", "invalid regular expression") from None
    return bounded_search(compiled, comparable(value, case_sensitive=True, spaces=False)) is not None


def _comparable_filter(value: Any, case_sensitive: bool = False) -> Any:
    """``text | comparable``: the text in the form rules compare it in; any other value as it is."""
    return comparable(value, case_sensitive=bool(case_sensitive)) if isinstance(value, str) else value


# --------------------------------------------------------------------------- compiling


class CompiledExpression:
    """A checked, compiled expression; call :meth:`evaluate` with the scope's variables."""

    def __init__(
        self, source: str, names: frozenset[str], template_expression: Any,
        members: dict[str, frozenset[str]] | None = None, literal_tests: tuple[tuple[str, Any, bool], ...] = (),
    ):
        self.source = source
        self.names = names  # the top-level variables it reads
        self.members = members or {}  # name -> constant keys read on it (`score.rerank`, `score['x']`)
        self.literal_tests = literal_tests  # (field, constant, negated) of each `field == constant`-like test
        self._expression = template_expression

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        try:
            return self._expression(**variables)
        except SecurityError as exc:
            raise ExpressionRuntimeError(f"refused by the sandbox: {exc}", "refused by the sandbox") from None
        except ExpressionRuntimeError:
            raise
        except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError) as exc:
            raise ExpressionRuntimeError(f"{type(exc).__name__}: {exc}", type(exc).__name__) from None

    def truth(self, variables: Mapping[str, Any]) -> bool:
        """The expression's value as a condition (Jinja truthiness; undefined is false)."""
        return bool(self.evaluate(variables))


_OPEN_BRACKETS = frozenset({"lparen", "lbracket", "lbrace"})
_CLOSE_BRACKETS = frozenset({"rparen", "rbracket", "rbrace"})
_OPERAND_ENDS = frozenset({"name", "string", "integer", "float"}) | _CLOSE_BRACKETS
_KEYWORDS = frozenset({"and", "or", "not", "in", "is", "if", "else"})
_LOOSEST = frozenset({"and", "or", "if", "else"})  # what ends the operand of a `not`


def _too_deep(found: int | None = None) -> ExpressionError:
    levels = f"{found} levels; " if found is not None else ""
    return ExpressionError(
        f"the expression is nested too deeply ({levels}{MAX_EXPRESSION_DEPTH} at most: each bracket, each 'not' or "
        "sign, and each operator of a chain such as a or b or c counts as a level); split it into several conditions "
        "(all/any), or compare with a list (op: in, contains_any)"
    )


def _token_nesting(env: RuleEnvironment, source: str) -> int:
    """How deeply ``source`` nests brackets and prefix operators (``not``, a sign), from its tokens, without parsing
    it: Jinja's parser recurses once per such level (and per bracket, through every precedence level), so this is
    measured first. A prefix operator's level ends with its operand: a ``not`` at ``and``/``or``/``if``/``else``, a
    comma, a colon or a closing bracket; a sign at any binary operator too."""
    stack: list[str] = []  # "bracket", "not" or "sign"
    deepest = 0
    previous: Any = None
    for token in env.lexer.tokenize(source, state="variable"):
        kind, value = token.type, token.value
        if kind in _OPEN_BRACKETS:
            stack.append("bracket")
        elif kind in _CLOSE_BRACKETS:
            while stack and stack[-1] != "bracket":
                stack.pop()
            if stack:
                stack.pop()
        else:
            after_operand = previous is not None and (
                previous.type in _OPERAND_ENDS and not (previous.type == "name" and previous.value in _KEYWORDS))
            if kind == "name" and value == "not" and not after_operand:
                stack.append("not")
            elif kind in ("sub", "add") and not after_operand:
                stack.append("sign")
            elif kind in ("comma", "colon") or (kind == "name" and value in _LOOSEST):
                while stack and stack[-1] != "bracket":
                    stack.pop()
            elif kind != "name" or value in _KEYWORDS:  # a binary operator: a sign's operand ended
                while stack and stack[-1] == "sign":
                    stack.pop()
        deepest = max(deepest, len(stack))
        previous = token
    return deepest


def _tree_depth(tree: nodes.Node) -> int:
    """Depth of a parsed expression (iteratively: it is measured to keep recursion over it bounded)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
    return deepest


def compile_expression(source: str, allowed_names: frozenset[str] | set[str]) -> CompiledExpression:
    """Parse, check and compile ``source``; raise :class:`ExpressionError` with a plain message."""
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError("the expression is empty")
    if len(source) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    env = environment()
    try:
        nesting = _token_nesting(env, source)
        if nesting > MAX_EXPRESSION_DEPTH:
            raise _too_deep(nesting)
        parser = Parser(env, source, state="variable")
        tree = parser.parse_expression()
        if not parser.stream.eos:
            raise TemplateSyntaxError("unexpected text after the expression", parser.stream.current.lineno)
    except TemplateSyntaxError as exc:
        raise ExpressionError(f"syntax error: {exc.message}") from None
    except (RecursionError, MemoryError):  # pragma: no cover - a backstop: the nesting was measured first
        raise _too_deep() from None
    depth = _tree_depth(tree)
    if depth > MAX_EXPRESSION_DEPTH:
        raise _too_deep(depth)
    every_node = [tree, *tree.find_all(nodes.Node)]  # find_all skips the root itself
    names = {node.name for node in every_node if isinstance(node, nodes.Name)}
    unknown = sorted(names - set(allowed_names) - set(env.globals))
    if unknown:
        raise ExpressionError(
            f"unknown name{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)}; "
            f"available here: {', '.join(sorted(set(allowed_names) | set(env.globals)))}"
        )
    for node in every_node:
        if isinstance(node, nodes.Filter) and node.name == "matches":
            _check_literal_pattern(node)
        elif isinstance(node, nodes.Filter) and any(isinstance(arg, nodes.Const) and arg.value == "matches"
                                                    for arg in node.args):  # map('matches', query.text)
            raise ExpressionError(f"{node.name}('matches', ...) would give matches a pattern no check reads: write "
                                  "x | matches('pattern') with the pattern in the rule")
    members: dict[str, set[str]] = {}
    for node in every_node:
        if not isinstance(node, (nodes.Getattr, nodes.Getitem)):
            continue
        attr = node.attr if isinstance(node, nodes.Getattr) else None
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            attr = node.arg.value
        if attr is not None and attr.startswith("_"):
            raise ExpressionError(f"access to {attr!r} is not allowed (names starting with '_' are internals)")
        if attr in CLOCK_READERS and isinstance(node.node, nodes.Name) and node.node.name == "as_of":
            raise ExpressionError(
                f"as_of.{attr} reads the machine's clock or time zone, which a replay on another day or machine does "
                "not share: use as_of itself (the query's time, in UTC; as_of.hour is its UTC hour)")
        if attr is not None and isinstance(node.node, nodes.Name):
            members.setdefault(node.node.name, set()).add(attr)
    try:
        compiled = env.compile_expression(source, undefined_to_none=False)
    except TemplateSyntaxError as exc:  # pragma: no cover - parse above already caught these
        raise ExpressionError(f"syntax error: {exc.message}") from None
    except (RecursionError, MemoryError, SyntaxError):  # pragma: no cover - a backstop: the depth was measured first
        raise _too_deep() from None
    return CompiledExpression(
        source, frozenset(names), compiled, {k: frozenset(v) for k, v in members.items()}, _literal_tests(every_node)
    )


def _check_literal_pattern(node: nodes.Filter) -> None:
    """``x | matches("pattern")``: the pattern is a string written in the rule, checked as ``op: regex``'s is. One
    computed from the query or the user would let a caller run any regular expression (seconds and gigabytes to
    compile) and fill the compiled-pattern cache."""
    pattern = node.args[0] if node.args else next((kw.value for kw in node.kwargs if kw.key == "pattern"), None)
    if not (isinstance(pattern, nodes.Const) and isinstance(pattern.value, str)):
        raise ExpressionError("matches(...) takes its pattern as a string written in the rule (matches('metformin|"
                              "insulin')): a pattern computed from the query or the user would let a caller run any "
                              "regular expression")
    if len(pattern.value) > MAX_REGEX_CHARS:
        raise ExpressionError(f"the pattern of matches(...) is longer than {MAX_REGEX_CHARS} characters")
    try:
        compile_pattern(comparable_pattern(pattern.value))
    except PatternError as exc:
        raise ExpressionError(f"matches(...): invalid regular expression: {exc}") from None


_EQUALITY_OPS = {"eq": False, "ne": True, "in": False, "notin": True}  # op -> negated


def _dotted(node: nodes.Node) -> str | None:
    """``user.attributes.level`` for ``user.attributes.level`` or ``user['attributes']['level']``; None for anything
    that is not a plain name with constant members."""
    parts: list[str] = []
    while True:
        if isinstance(node, nodes.Getattr):
            parts.append(node.attr)
            node = node.node
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            parts.append(node.arg.value)
            node = node.node
        elif isinstance(node, nodes.Name):
            return ".".join([node.name, *reversed(parts)])
        else:
            return None


def _literals(node: nodes.Node) -> list[Any] | None:
    """The constant(s) a comparison operand writes: ``1``, or each item of ``[1, 2]``; None if not constant."""
    if isinstance(node, nodes.Const):
        return [node.value]
    if isinstance(node, (nodes.List, nodes.Tuple)) and all(isinstance(item, nodes.Const) for item in node.items):
        return [item.value for item in node.items]
    return None


def _literal_tests(every_node: list[nodes.Node]) -> tuple[tuple[str, Any, bool], ...]:
    """Each equality or membership test of a dotted field against a written constant, as (field, constant, negated):
    ``user.attributes.level == 1`` gives ``("user.attributes.level", 1, False)``, ``1 not in user.roles``
    ``("user.roles", 1, True)``. The caller decides which fields can never equal which constants."""
    found: list[tuple[str, Any, bool]] = []
    for node in every_node:
        if not isinstance(node, nodes.Compare):
            continue
        left = node.expr
        for operand in node.ops:
            right = operand.expr
            negated = _EQUALITY_OPS.get(operand.op)
            if negated is not None:
                for field_side, value_side in ((left, right), (right, left)):
                    field, values = _dotted(field_side), _literals(value_side)
                    if field is not None and values is not None:
                        found.extend((field, value, negated) for value in values)
            left = right
    return tuple(found)
