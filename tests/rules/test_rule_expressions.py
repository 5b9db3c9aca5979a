"""The expression sandbox: escapes are refused at load time or by the sandbox, never executed."""

from __future__ import annotations

import pytest

from rules.expressions import ExpressionError, ExpressionRuntimeError, compile_expression

NAMES = {"doc", "query", "user", "as_of"}
VARIABLES = {"doc": {"title": "Metformin", "items": 3, "tags": ["a"]}, "query": {"text": "hello {0}"}, "user": {"roles": ["x"]}}


@pytest.mark.parametrize(
    "source",
    [
        "''.__class__",
        "''.__class__.__mro__[1].__subclasses__()",
        "doc['__class__']",
        "doc.title.__len__()",
        "query._private",
        "doc.tags.__getitem__(0)",
    ],
)
def test_dunder_and_private_access_is_refused_at_load_time(source):
    with pytest.raises(ExpressionError, match="not allowed"):
        compile_expression(source, NAMES)


@pytest.mark.parametrize(
    "source",
    ["range(10)", "lipsum", "cycler", "joiner", "namespace", "config", "self", "os", "__import__('os')"],
)
def test_only_the_scope_names_exist(source):
    with pytest.raises(ExpressionError, match="unknown name"):
        compile_expression(source, NAMES)


@pytest.mark.parametrize(
    "source",
    [
        "doc.title | attr('__class__')",
        "doc.tags | map(attribute='__class__') | list",
        "'x' * 10**10",
        "[1] * 100000000",
        "2 ** 100000",
        "query.text * 1000000",
    ],
)
def test_runtime_escapes_and_bombs_are_stopped_by_the_sandbox(source):
    compiled = compile_expression(source, NAMES)
    with pytest.raises(ExpressionRuntimeError):
        compiled.evaluate(VARIABLES)


def test_statements_and_template_injection_are_syntax_errors():
    for source in ["1 }}{% for x in doc %}{{ x", "{% import 'os' %}", "doc.title; 1", ""]:
        with pytest.raises(ExpressionError):
            compile_expression(source, NAMES)


def test_ordinary_expressions_work_and_mapping_keys_win_over_methods():
    assert compile_expression("doc.title|lower == 'metformin'", NAMES).truth(VARIABLES)
    assert compile_expression("doc.items == 3", NAMES).truth(VARIABLES)  # the field, not dict.items
    assert compile_expression("'x' in user.roles and doc.tags|length == 1", NAMES).truth(VARIABLES)
    assert not compile_expression("doc.missing == 'a'", NAMES).truth(VARIABLES)
    assert compile_expression("doc.title|matches('^met')", NAMES).truth(VARIABLES)
    assert compile_expression("days_between('2025-01-01', '2025-01-31') == 30", NAMES).truth(VARIABLES)


def test_str_format_is_sandboxed():
    compiled = compile_expression("query.text.format(doc)", NAMES)
    assert compiled.evaluate(VARIABLES).startswith("hello {")
    attack = compile_expression("'{0.__class__}'.format(doc)", NAMES)
    with pytest.raises(ExpressionRuntimeError):
        attack.evaluate(VARIABLES)


def test_overlong_expression_is_refused():
    with pytest.raises(ExpressionError, match="longer than"):
        compile_expression("1 + " * 1000 + "1", NAMES)
