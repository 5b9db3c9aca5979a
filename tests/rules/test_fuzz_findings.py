"""Analyst files a fuzzer found crashing a loader or meaning something else than they say (findings 1, 2, 5, 9, 10, 11
and 12 of the fuzzing audit): each is now a located error, through the loaders and commands analysts use."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import ConfigError
from rules.cli import rules_app
from rules.expressions import MAX_EXPRESSION_DEPTH, ExpressionRuntimeError, compile_expression
from rules.ruleset import load_rule_file
from rules.testing import load_test_file

runner = CliRunner()
DEEP = MAX_EXPRESSION_DEPTH + 1


def _pipeline(tmp_path: Path, when: str, extra_stage: str = "") -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "version: 1\n"
        "stages:\n"
        "  - {id: bm25, type: recall.bm25}\n"
        f"{extra_stage}"
        "  - id: mid\n"
        "    type: select.top_k\n"
        "    inputs: [bm25]\n"
        f"    when: {when}\n"
        "  - {id: final, type: select.top_k, inputs: [mid], params: {k: 3}}\n"
        "output: final\n"
        "trace: {log: null}\n", encoding="utf-8")
    return path


def _validate(path: Path):
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "internal error" not in result.output and "Traceback" not in result.output, result.output
    return result


def _rule_file(tmp_path: Path, kind: str, rule: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"version: 1\nkind: {kind}\nrules:\n  - {rule}\n", encoding="utf-8")
    return path


def _check(path: Path):
    result = runner.invoke(rules_app, ["check", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "internal error" not in result.output, result.output
    return result


def _load_errors(path: Path, kind: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path, kind)  # type: ignore[arg-type]
    return str(caught.value)


# ---------------------------------------------------------------- 1. expressions nested deeper than Jinja can parse

TOO_DEEP = {
    "brackets": "(" * 80 + "query.text" + ")" * 80 + " | length > 3",
    "nots": "not " * 300 + "false",
    "a chain of 400 terms": "+".join(["1"] * 400) + " > 3",
    "signs": "-" * 1500 + "1 < 0",
    "filters": "query.text" + "|lower" * 60 + " == 'x'",
}


@pytest.mark.parametrize("expression", list(TOO_DEEP.values()), ids=list(TOO_DEEP))
def test_a_deeply_nested_expression_in_a_stage_when_is_a_located_error(tmp_path, expression):
    path = _pipeline(tmp_path, f'{{expr: "{expression}"}}')
    result = _validate(path)
    assert result.exit_code == 2, result.output
    assert f"{path}:7:" in result.output and "stages.1.when.expr: the expression is nested too deeply" in result.output
    assert f"{MAX_EXPRESSION_DEPTH} at most" in result.output


@pytest.mark.parametrize(("kind", "rule", "at"), [
    ("override", "{{id: r, action: bury, match: {{expr: '{e}'}}}}", "rules.0.match.expr"),
    ("override", "{{id: r, action: bury, docs: [a], when: {{expr: '{e}'}}}}", "rules.0.when.expr"),
    ("prefilter", "{{id: r, action: exclude, match: {{expr: '{e} and doc.x'}}}}", "rules.0.match.expr"),
])
def test_a_deeply_nested_rule_expression_is_a_located_error(tmp_path, kind, rule, at):
    path = _rule_file(tmp_path, kind, rule.format(e="+".join(["1"] * 400) + " > 3"))
    result = _check(path)
    assert result.exit_code == 2, result.output
    assert f"{path}:4:" in result.output and f"{at}: rule 'r': the expression is nested too deeply" in result.output


AT_THE_LIMIT = {
    "brackets": ("(" * MAX_EXPRESSION_DEPTH + "1" + ")" * MAX_EXPRESSION_DEPTH + " == 1", True),
    "not and brackets": ("not (" * (MAX_EXPRESSION_DEPTH // 2) + "true" + ")" * (MAX_EXPRESSION_DEPTH // 2), True),
    "calls": ("date(" * (MAX_EXPRESSION_DEPTH - 1) + "'2025-01-01'" + ")" * (MAX_EXPRESSION_DEPTH - 1), True),
    "a chain": (" or ".join(["query.text == 'a'"] * (MAX_EXPRESSION_DEPTH - 3) + ["true"]), True),
    "nots": ("not " * (MAX_EXPRESSION_DEPTH - 2) + "true", True),
}


@pytest.mark.parametrize(("expression", "value"), list(AT_THE_LIMIT.values()), ids=list(AT_THE_LIMIT))
def test_an_expression_nested_to_the_limit_compiles_and_evaluates(tmp_path, expression, value):
    compiled = compile_expression(expression, {"query", "user", "as_of"})
    assert compiled.truth({"query": {"text": "b"}, "user": {}, "as_of": None}) is value
    path = _pipeline(tmp_path, f'{{expr: "{expression}"}}')  # the parser fits under the CLI's own stack
    result = _validate(path)
    assert result.exit_code == 0, result.output


def test_one_level_more_is_refused_whatever_makes_it(tmp_path):
    for expression in ("(" * DEEP + "1" + ")" * DEEP, "-" * DEEP + "1", " or ".join(["true"] * (DEEP + 1))):
        path = _rule_file(tmp_path, "override", f"{{id: r, action: bury, match: {{expr: '{expression}'}}}}")
        assert "the expression is nested too deeply" in _load_errors(path, "override"), expression


def test_an_expression_that_recurses_when_evaluated_is_an_evaluation_error():
    """Nothing in an expression recurses by itself (no macros, no loops), but a filter can recurse into the data it is
    given: a document field nested deeper than Python's stack is an error of that document, not a crash."""
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    for expression in ("doc.x | string", "doc.x | tojson"):
        compiled = compile_expression(expression + " == ''", {"doc"})
        with pytest.raises(ExpressionRuntimeError, match="RecursionError"):
            compiled.evaluate({"doc": {"x": deep}})


# ---------------------------------------------------------------- 2. an action written as a list or a mapping

@pytest.mark.parametrize(("action", "hint"), [
    ("[bury]", "got a list, ['bury'] (write action: bury, without brackets)"),
    ("{bury: x}", "got a mapping"),
    ("[[bury]]", "got a list"),
    ("1", "got a number, 1"),
])
def test_an_action_that_is_not_a_name_is_a_located_error(tmp_path, action, hint):
    path = _rule_file(tmp_path, "override", f"{{id: r, action: {action}, docs: [a]}}")
    result = _check(path)
    assert result.exit_code == 2, result.output
    assert (f"{path}:4:21  rules.0.action: rule 'r': action must be one of the override actions, a single name: "
            "exclude, pin, bury, boost, demote; ") in result.output and hint in result.output


def test_a_pipeline_naming_a_rule_file_with_a_list_action_is_a_located_error(tmp_path):
    rules = _rule_file(tmp_path, "override", "{id: r, action: [bury], docs: [a]}", "overrides.yaml")
    path = _pipeline(tmp_path, "{field: query.text, op: contains, value: x}",
                     "  - {id: ov, type: rules.override, inputs: [bm25], params: {rules: overrides.yaml}}\n")
    path.write_text(path.read_text().replace("inputs: [bm25]\n    when", "inputs: [ov]\n    when"), encoding="utf-8")
    result = _validate(path)
    assert result.exit_code == 2, result.output
    assert f"{rules}:4:21" in result.output and "action must be one of the override actions" in result.output


# ---------------------------------------------------------------- 5. a date written as a number

@pytest.mark.parametrize(("rule", "key"), [
    ("{id: recent-only, action: date_range, on_or_after: 20240101}", "on_or_after"),
    ("{id: recent-only, action: date_range, before: 20240101}", "before"),
    ("{id: recent-only, action: acl, from: 20240101}", "from"),
    ("{id: recent-only, action: acl, until: 20240101}", "until"),
])
def test_a_date_written_as_a_number_is_a_located_error_not_seconds_since_1970(tmp_path, rule, key):
    path = _rule_file(tmp_path, "prefilter", rule)
    message = _load_errors(path, "prefilter")
    assert f"{path}:4:" in message and f"rules.0.{key}: rule 'recent-only': a date is written as text: 2024-01-01" \
        in message, message
    assert "seconds since 1970" in message


def test_a_number_that_is_no_date_at_all_gets_the_general_message(tmp_path):
    path = _rule_file(tmp_path, "prefilter", "{id: r, action: date_range, on_or_after: 1700000000}")
    assert "a date is written as text, e.g. 2025-06-30 or 2025-06-30T12:00:00Z, not a number" \
        in _load_errors(path, "prefilter")


def test_dates_written_as_dates_still_load(tmp_path):
    path = _rule_file(tmp_path, "prefilter", "{id: r, action: date_range, on_or_after: 2024-01-01, "
                      "before: as_of - 1y, from: 2025-01-01T00:00:00Z, until: 2030-12-31}")
    (rule,) = load_rule_file(path, "prefilter").rules
    assert str(rule.spec.on_or_after) == "2024-01-01" and rule.start is not None and rule.start.year == 2025


def _test_file(tmp_path: Path, head: str, case_as_of: str = "") -> Path:
    path = tmp_path / "rules.tests.yaml"
    path.write_text(
        f"version: 1\npipeline: pipeline.yaml\n{head}cases:\n  - name: c\n    query: q\n{case_as_of}"
        "    expect:\n      - {doc: a, present: true}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("head", "case_as_of", "at"), [
    ("as_of: 20250520\n", "", "as_of"),
    ("as_of: '20250520'\n", "", "as_of"),  # text of a number: pydantic read it as seconds too
    ("", "    as_of: 20250520\n", "cases.0.as_of"),
])
def test_a_rule_tests_as_of_written_as_a_number_is_a_located_error(tmp_path, head, case_as_of, at):
    path = _test_file(tmp_path, head, case_as_of)
    with pytest.raises(ConfigError) as caught:
        load_test_file(path)
    assert f"{at}: a date is written as text: 2025-05-20" in str(caught.value) and f"{path}:" in str(caught.value)


# ---------------------------------------------------------------- 9. a query-side field compared with a number

def test_a_user_attribute_compared_with_an_unquoted_number_is_a_located_error(tmp_path):
    path = _rule_file(tmp_path, "prefilter", "{id: hide-drafts-for-level-1, action: exclude, "
                      "when: {field: user.attributes.level, op: eq, value: 1}, "
                      "match: {field: doc.status, op: eq, value: draft}}")
    result = _check(path)
    assert result.exit_code == 2, result.output
    assert (f"{path}:4:" in result.output and "rules.0.when.value: rule 'hide-drafts-for-level-1': "
            "user.attributes.level is always text (user attributes are strings), never the number 1: this condition "
            "would never hold, as no value is coerced; write the value quoted: '1'") in result.output
    quoted = _rule_file(tmp_path, "prefilter", "{id: hide-drafts-for-level-1, action: exclude, "
                        "when: {field: user.attributes.level, op: eq, value: '1'}, "
                        "match: {field: doc.status, op: eq, value: draft}}", "quoted.yaml")
    assert _check(quoted).exit_code == 0


@pytest.mark.parametrize(("condition", "at", "says"), [
    ("{field: user.groups, op: in, value: [staff, 1]}", "when.value.1", "user.groups is always text"),
    ("{field: user.roles, op: ne, value: true}", "when.value", "never true: this condition would always hold"),
    ("{field: query.text, op: contains, value: 5}", "when.value", "query.text is always text"),
    ("{field: query.entities.DRUG, op: contains_any, value: [2.5]}", "when.value.0", "never the number 2.5"),
    ("{any: [{field: user.id, op: eq, value: 42}]}", "when.any.0.value", "user.id is always text"),
])
def test_every_text_field_of_the_query_side_refuses_an_unquoted_number(tmp_path, condition, at, says):
    path = _rule_file(tmp_path, "override", f"{{id: r, action: bury, docs: [a], when: {condition}}}")
    message = _load_errors(path, "override")
    assert f"rules.0.{at}: rule 'r': " in message and says in message, message


def test_a_stage_when_on_a_user_attribute_refuses_an_unquoted_number(tmp_path):
    path = _pipeline(tmp_path, "{field: user.attributes.tier, op: eq, value: 2}")
    result = _validate(path)
    assert result.exit_code == 2, result.output
    assert f"{path}:7:" in result.output and "stages.1.when.value: user.attributes.tier is always text" in result.output


def test_ordered_comparisons_of_a_user_attribute_with_a_number_still_load(tmp_path):
    """lt..ge read a numeric attribute as a number ("5" > 3), so a number there is meant."""
    path = _rule_file(tmp_path, "override", "{id: r, action: bury, docs: [a], "
                      "when: {field: user.attributes.level, op: gt, value: 3}}")
    assert len(load_rule_file(path, "override").rules) == 1


# ---------------------------------------------------------------- 10. NaN and infinity in a condition

@pytest.mark.parametrize(("condition", "shown"), [
    ("{field: doc.year, op: eq, value: .nan}", ".nan"),
    ("{field: doc.year, op: in, value: [2020, .inf]}", ".inf"),
    ("{field: doc.year, op: ne, value: -.inf}", "-.inf"),
    ("{field: doc.year, op: lt, value: .nan}", ".nan"),
    ("{field: doc.year, op: ge, value: .inf}", ".inf"),
    ("{field: doc.tags, op: contains_any, value: [.nan]}", ".nan"),
])
def test_a_value_that_is_not_a_finite_number_is_a_located_error(tmp_path, condition, shown):
    path = _rule_file(tmp_path, "prefilter", f"{{id: r, action: exclude, match: {condition}}}")
    message = _load_errors(path, "prefilter")
    assert f"{path}:4:" in message and f"rules.0.match.value: rule 'r': a value must be a finite number, not {shown}" \
        in message, message
    assert "needs a number" not in message


def test_a_stage_when_refuses_nan_too(tmp_path):
    path = _pipeline(tmp_path, "{field: user.attributes.level, op: lt, value: .nan}")
    result = _validate(path)
    assert result.exit_code == 2 and "stages.1.when.value: a value must be a finite number, not .nan" in result.output


# ---------------------------------------------------------------- 11. `version: true` is not version 1

VERSIONS = [("true", "expected a number, not true/false"), ("1.0", "expected a whole number (write 1, not 1.0)"),
            ("'1'", "expected a number, not text")]


@pytest.mark.parametrize(("version", "says"), VERSIONS)
def test_a_pipeline_version_of_another_type_is_refused(tmp_path, version, says):
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"version: {version}\nstages:\n  - {{id: bm25, type: recall.bm25}}\ntrace: {{log: null}}\n",
                    encoding="utf-8")
    result = _validate(path)
    assert result.exit_code == 2 and f"{path}:1:10  version: {says}" in result.output, result.output


@pytest.mark.parametrize(("version", "says"), VERSIONS)
def test_a_rule_file_version_of_another_type_is_refused(tmp_path, version, says):
    path = tmp_path / "rules.yaml"
    path.write_text(f"version: {version}\nkind: override\nrules: []\n", encoding="utf-8")
    result = _check(path)
    assert result.exit_code == 2 and f"{path}:1:10  version: {says}" in result.output, result.output


def _gazetteer(path: Path) -> None:
    from stages.entities import load_gazetteer

    load_gazetteer(path)


def _glossary(path: Path) -> None:
    from stages.rewrite.glossary import load_glossary

    load_glossary(path)


@pytest.mark.parametrize(("load", "body"), [
    (_gazetteer, "entities:\n  - {label: DRUG, id: metformin, names: [metformin]}\n"),
    (_glossary, "entries:\n  - {id: ms, terms: [multiple sclerosis, MS]}\n"),
], ids=["gazetteer", "glossary"])
@pytest.mark.parametrize(("version", "says"), VERSIONS)
def test_a_gazetteer_or_glossary_version_of_another_type_is_refused(tmp_path, load, body, version, says):
    path = tmp_path / "file.yaml"
    path.write_text(f"version: {version}\n{body}", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert f"{path}:1:10  version: {says}" in str(caught.value)


# ---------------------------------------------------------------- 12. a rule test's index settings, checked at load

@pytest.mark.parametrize(("settings", "at", "says"), [
    ("{bm25: {k1: .nan}}", "index_settings.bm25.k1", "Input should be a finite number"),
    ("{bm25: {kl: 1.2}}", "index_settings.bm25.kl", "unknown field 'kl' (did you mean 'k1'?)"),
    ("{bm25: {tokenizer: {language: xx}}}", "index_settings.bm25.tokenizer.language", ""),
    ("{entities: {ner: 'no'}}", "index_settings.entities.ner", "expected true or false, not text"),
    ("{entities: {gazetteer: other.yaml}}", "index_settings.entities.gazetteer",
     "the gazetteer of the index built for the run is the file's own 'gazetteer:'"),
])
def test_bad_index_settings_of_a_rule_test_are_located_at_load(tmp_path, settings, at, says):
    head = f"corpus: corpus\ngazetteer: entities.yaml\nindex_settings: {settings}\nas_of: 2025-06-01\n"
    path = _test_file(tmp_path, head)
    with pytest.raises(ConfigError) as caught:
        load_test_file(path)
    message = str(caught.value)
    assert f"{path}:5:" in message and f"{at}: {says}" in message, message
    result = runner.invoke(rules_app, ["test", str(path)])
    assert result.exit_code == 2 and f"{path}:5:" in result.output and at in result.output, result.output


def test_good_index_settings_of_a_rule_test_load(tmp_path):
    head = ("corpus: corpus\ngazetteer: entities.yaml\nindex_settings: {bm25: {k1: 1.2, tokenizer: {language: zh}}, "
            "entities: {ner: false}}\nas_of: 2025-06-01\n")
    spec, _ = load_test_file(_test_file(tmp_path, head))
    assert spec.index_settings == {"bm25": {"k1": 1.2, "tokenizer": {"language": "zh"}}, "entities": {"ner": False}}


@pytest.mark.parametrize(("expression", "says"), [
    ("user.attributes.level == 1", "user.attributes.level is always text (user attributes are strings), never the "
     "number 1: this condition would never hold"),
    ("user['attributes']['level'] != 2", "user.attributes.level is always text"),
    ("1 in user.roles", "user.roles is always text"),
    ("user.attributes.tier not in [1, 'gold']", "never the number 1: this condition would always hold"),
    ("query.text | length > 3 and query.language == true", "query.language is always text"),
])
def test_an_expression_comparing_a_query_side_field_with_an_unquoted_number_is_a_located_error(
        tmp_path, expression, says):
    path = _rule_file(tmp_path, "override", f'{{id: r, action: bury, docs: [a], when: {{expr: "{expression}"}}}}')
    message = _load_errors(path, "override")
    assert "rules.0.when.expr: rule 'r': " in message and says in message and expression in message, message


@pytest.mark.parametrize("expression", [
    "user.attributes.level == '1'", "user.attributes.level | int == 1", "as_of.year == 2025",
    "user.roles | length == 1", "'1' in user.roles", "user.attributes == 1",
])
def test_expressions_that_can_decide_are_still_accepted(tmp_path, expression):
    path = _rule_file(tmp_path, "override", f'{{id: r, action: bury, docs: [a], when: {{expr: "{expression}"}}}}')
    assert len(load_rule_file(path, "override").rules) == 1
