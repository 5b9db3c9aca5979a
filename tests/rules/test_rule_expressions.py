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


# Each of these would build a string or list just over MAX_SEQUENCE_RESULT (100,000) from tiny inputs; the
# sizes stay small so that an unguarded build costs little and the test fails rather than hangs.
@pytest.mark.parametrize(
    "source",
    [
        "'x' | center(200001)",
        "'%200001s' % 'x'",
        "'%*s' % (200001, 'x')",
        "'%.200001f' % 1.0",
        "'%(a(b)c)200001s' % {'a(b)c': 'x'}",  # nested parentheses in a mapping key, as CPython reads them
        "'%200001s' | format('x')",
        "'{:>200001}'.format('x')",
        "'{:>{}}'.format('x', 200001)",  # the width from a nested field
        "'{:.200001f}'.format(1.0)",
        "'{a:>200001}'.format_map({'a': 1})",
        "('{:>200001}' | safe).format('x')",
        "('%200001s' | safe) % 'x'",
        "doc.title | replace('', 'x' * 20000)",  # 10 insertions into 'Metformin'
        "doc.title.replace('', 'x' * 20000)",
        "(doc.title | safe).replace('', 'x' * 20000)",
        "doc.title | indent(200001, true)",
        "'a\\nb' | indent(200001)",
        "doc.title | wordwrap(1, wrapstring='x' * 30000)",
        "'x'.ljust(200001)",
        "'x'.rjust(200001)",
        "'x'.center(200001)",
        "('x' | safe).center(200001)",
        "'x'.zfill(200001)",
        "'a\\tb'.expandtabs(200001)",
        "'x'.join(['y' * 60000, 'z' * 60000])",
        "doc.title.translate({77: 'x' * 100000})",
        "'aa'.translate(['y'] * 97 + ['x' * 60000])",
        "(5).to_bytes(200001, 'big')",
        "'x'.encode() * 200001",
        "('x' * 60000) ~ ('y' * 60000)",
        "['x' * 1000] * 200",  # 200 references to one string: 200,200 counted
        "['a', 'b'] | join('x' * 100000)",
        "[1] | batch(200001, 'x') | list",
        "[] | slice(200001) | list",
        "([1] * 1000) | tojson(indent=200)",
        "'x a.b' | urlize(target='x' * 100000)",
        "doc.tags | map('center', 200001) | list",
    ],
)
def test_string_and_list_growth_is_refused_before_it_is_built(source):
    compiled = compile_expression(source, NAMES)
    with pytest.raises(ExpressionRuntimeError, match="longer than 100000"):
        compiled.evaluate(VARIABLES)


@pytest.mark.parametrize(
    "source",
    ["(9 ** 64) ** 64", "((9 ** 64) ** 64) ** 64 > 0", "(2 ** 64) ** 64", "(0 - 3 ** 41) ** 64 > 0"],
)
def test_power_refuses_a_huge_integer_from_its_estimated_size(source):
    # Refused from exponent * log2(base) before computing: one more '** 64' on the second would take
    # seconds and a gigabyte unguarded (not tried here, so that a regression cannot stall the suite).
    compiled = compile_expression(source, NAMES)
    with pytest.raises(ExpressionRuntimeError, match="more than 4096 bits"):
        compiled.evaluate(VARIABLES)


@pytest.mark.parametrize(
    "source",
    [
        "'x' | center(10) == '    x     '",
        "'%5s|%-3d|%.2f' % ('x', 7, 3.14159) == '    x|7  |3.14'",
        "'%(k)s' % {'k': 'v'} == 'v' and '100%%' % () == '100%' and 10 % 3 == 1",
        "'%s, %s!' | format('Hello', 'World') == 'Hello, World!'",
        "'{:>5}|{:.2f}|{}'.format('x', 3.14159, doc.items) == '    x|3.14|3'",
        "'{a}'.format_map({'a': 1}) == '1'",
        "doc.title | replace('met', 'Met') | lower == 'metformin'",
        "doc.title.replace('in', 'IN') == 'MetformIN'",
        "'a\\nb' | indent(2) == 'a\\n  b'",
        "doc.title | wordwrap(5) | length > 0",
        "'x'.zfill(3) == '00x' and 'x'.ljust(2) == 'x ' and 'a\\tb'.expandtabs(2) == 'a b'",
        "'-'.join(doc.tags) == 'a' and doc.tags | join(',') == 'a' and ('ab' | list) | join('-') == 'a-b'",
        "'ab'.translate({97: 'xy'}) == 'xyb'",
        "doc.title ~ '/' ~ doc.items ~ doc.missing == 'Metformin/3'",
        "2 ** 10 == 1024 and 2 ** -1 == 0.5 and 1.05 ** 30 > 4 and (10 ** 18) ** 64 > 0 and (2 ** 63) ** 64 > 0",
        "'x' * 100000 != '' and ([1] * 100000) | length == 100000 and ['ab'] * 3 == ['ab', 'ab', 'ab']",
        "('x' * 50000) + ('y' * 50000) != ''",
        "[1, 2, 3] | batch(2, 0) | list == [[1, 2], [3, 0]] and [1, 2, 3] | slice(2) | list == [[1, 2], [3]]",
        "doc.tags | tojson == '[\"a\"]' and doc.tags | pprint == \"['a']\"",
        "date('2025-01-31').strftime('%Y-%m') == '2025-01' and (1).to_bytes(2, 'big') | length == 2",
    ],
)
def test_ordinary_formatting_padding_and_powers_still_work(source):
    assert compile_expression(source, NAMES).evaluate(VARIABLES) is True


def test_nothing_in_an_expression_runs_when_it_is_compiled():
    # Jinja's constant folding would build both 300,001-character strings while the rule file loads
    import tracemalloc

    compile_expression("1", NAMES)  # warm the environment up first
    tracemalloc.start()
    try:
        compiled = compile_expression("('%300001s' % 'x') ~ ('x' | center(300001))", NAMES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    with pytest.raises(ExpressionRuntimeError, match="longer than 100000"):
        compiled.evaluate(VARIABLES)


def test_a_refused_expression_is_an_error_per_document_at_warm_up():
    from engine.index import Document
    from rules.conditions import Condition, NullView, compile_condition
    from rules.corpus import DocumentTable

    table = DocumentTable([Document("d1", "Metformin", "text", {}), Document("d2", "Aspirin", "text", {})])
    node = compile_condition(Condition.model_validate({"expr": "doc.title | center(200001) | length > 0"}), "document")
    node.prepare(table)  # query-independent: evaluated over the corpus now
    view = NullView()
    assert node.vector(table, view).tolist() == [False, False]
    assert [row for row, _ in view.errors] == [0, 1]
    assert all("the 'center' filter would build a string or list longer than 100000" in e for _, e in view.errors)
