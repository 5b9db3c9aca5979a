"""Findings of the rule/glossary file audit, each pinned by its located message.

1. ``score.<stage>`` naming no scoring stage upstream of the override stage is a compile-time error;
2. a relative date that leaves the representable range is refused at load time, located, and no
   query time can make one crash at run time;
3. messages speak the analyst's terms: YAML keys (``from``, ``not``), no raw regexes, no
   pydantic ``Value error,`` prefix;
4. one problem does not hide others: duplicate ids among failing rules/entries, conflict checks
   next to rule errors.

Each test says what was reported before the fix ("before:").
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.compiler import compile_file
from engine.errors import ConfigError
from engine.model import Query
from rules.conditions import Condition, Leaf, QueryView, RelativeDate
from rules.ruleset import load_rule_file
from stages.rewrite.glossary import load_glossary

runner = CliRunner()


def errors_of(path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path)
    return [str(issue) for issue in caught.value.issues]


def compile_errors(config: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        compile_file(config)  # what `sieve validate` runs: no index, no model
    return [str(issue) for issue in caught.value.issues]


def override_pipeline(tmp_path: Path, rules: str, *, before: str = "", after: str = "") -> Path:
    """bm25 -> [before] -> ov (rules.override on R.yaml) -> [after]; no index needed to compile."""
    (tmp_path / "R.yaml").write_text(rules, encoding="utf-8")
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        "version: 1\nstages:\n"
        "  - {id: bm25, type: recall.bm25, params: {top_k: 50}}\n"
        + before
        + "  - {id: ov, type: rules.override, inputs: [" + ("top" if before else "bm25") + "], params: {rules: R.yaml}}\n"
        + after
        + "trace: {log: null}\n",
        encoding="utf-8",
    )
    return config


# =========================================================================== 1. score.<stage> upstream


SCORE_RERANK = (
    "version: 1\n"                                                       # 1
    "kind: override\n"                                                   # 2
    "rules:\n"                                                           # 3
    "  - id: s\n"                                                        # 4
    "    match: {field: score.rerank, op: gt, value: 1}\n"               # 5
    "    action: bury\n"                                                 # 6
)


def test_score_field_naming_no_upstream_scoring_stage_is_a_compile_error(tmp_path):
    # before: `sieve validate` said "✓ pipeline.yaml: 2 stages" and the rule could never fire
    config = override_pipeline(tmp_path, SCORE_RERANK)
    (error,) = compile_errors(config)
    assert error == (
        f"{config}:4:68  stages.1.params.rules: {tmp_path / 'R.yaml'}:5:20  rules.0.match.field: rule 's': "
        "'score.rerank' names no scoring stage upstream of 'ov' (upstream: bm25); the condition can never hold"
    )


def test_score_field_of_an_upstream_scoring_stage_compiles(tmp_path):
    compile_file(override_pipeline(tmp_path, SCORE_RERANK.replace("score.rerank", "score.bm25")))


def test_score_fields_in_nested_conditions_and_expressions_are_checked(tmp_path):
    config = override_pipeline(
        tmp_path,
        "version: 1\nkind: override\nrules:\n"
        "  - id: nested\n"                                                               # 4
        "    action: bury\n"                                                             # 5
        "    match:\n"                                                                   # 6
        "      all:\n"                                                                   # 7
        "        - {field: score.bm25, op: gt, value: 1}\n"                              # 8 fine
        "        - not: {field: score.bm26, op: lt, value: 2}\n"                         # 9 typo
        "  - {id: in-expr, action: exclude, match: {expr: \"score['ov'] > 1 and score.top > 0\"}}\n"  # 10
        "  - {id: later, action: bury, match: {field: score.final, op: gt, value: 0}}\n",  # 11
        before="  - {id: top, type: select.top_k, inputs: [bm25], params: {k: 10}}\n",
        after="  - {id: final, type: select.threshold, inputs: [ov], params: {min_score: 0.1}}\n",
    )
    errors = [e.split(f"{tmp_path / 'R.yaml'}:", 1)[1] for e in compile_errors(config)]
    assert errors == [
        "9:24  rules.0.match.all.1.not.field: rule 'nested': 'score.bm26' names no scoring stage upstream of 'ov' "
        "(upstream: bm25; did you mean 'score.bm25'?); the condition can never hold",
        "10:50  rules.1.match.expr: rule 'in-expr': the expression reads 'score.ov', which names no scoring stage "
        "upstream of 'ov' ('ov' is this stage: it writes its score after its rules have run; upstream: bm25); "
        "the condition can never hold",
        "10:50  rules.1.match.expr: rule 'in-expr': the expression reads 'score.top', which names no scoring stage "
        "upstream of 'ov' ('top' (select.top_k) is upstream but writes no score; upstream: bm25); "
        "the condition can never hold",
        "11:46  rules.2.match.field: rule 'later': 'score.final' names no scoring stage upstream of 'ov' "
        "('final' is not upstream of 'ov'; upstream: bm25); the condition can never hold",
    ]


def test_validate_command_reports_the_score_field(tmp_path):
    from engine.cli import app

    config = override_pipeline(tmp_path, SCORE_RERANK)
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 2
    assert f"{tmp_path / 'R.yaml'}:5:20 rules.0.match.field: rule 's': 'score.rerank' names no scoring stage" in (
        " ".join(result.output.split())
    )
    assert "Traceback" not in result.output


def test_mmr_dedup_writes_a_score_override_rules_may_read(tmp_path):
    compile_file(override_pipeline(
        tmp_path, SCORE_RERANK.replace("score.rerank", "score.top"),
        before="  - {id: top, type: dedup.near_duplicate, inputs: [bm25], params: {method: minhash, mmr_lambda: 0.7}}\n",
    ))


# =========================================================================== 2. relative dates out of range


def test_relative_date_beyond_the_date_range_is_refused_at_load_time(write_rules):
    path = write_rules(
        "version: 1\n"                                                       # 1
        "kind: prefilter\n"                                                  # 2
        "rules:\n"                                                           # 3
        "  - id: recent\n"                                                   # 4
        "    action: date_range\n"                                           # 5
        "    field: date\n"                                                  # 6
        "    on_or_after: as_of - 99999y\n"                                  # 7
        "  - {id: m, action: exclude, match: {field: doc.date, op: before, value: as_of + 52143w}}\n"  # 8
        "  - {id: ok, action: exclude, match: {field: doc.date, op: before, value: as_of - 1000y}}\n"  # 9
    )
    # before: loaded fine, then every query failed with "OverflowError: date value out of range"
    assert errors_of(path) == [
        f"{path}:7:18  rules.0.on_or_after: rule 'recent': as_of - 99999y is outside the supported date range: "
        "a relative date may move as_of by at most 1000 years (365000 days)",
        f"{path}:8:74  rules.1.match.value: rule 'm': as_of + 52143w is outside the supported date range: "
        "a relative date may move as_of by at most 1000 years (365000 days)",
    ]


def test_relative_date_out_of_range_fails_validate_with_its_location(tmp_path):
    (tmp_path / "P.yaml").write_text(
        "version: 1\nkind: prefilter\nrules:\n"
        "  - {id: recent, action: date_range, on_or_after: as_of - 99999y}\n", encoding="utf-8")
    config = tmp_path / "pipeline.yaml"
    config.write_text("version: 1\nstages:\n  - {id: access, type: rules.prefilter, params: {rules: P.yaml}}\n"
                      "  - {id: bm25, type: recall.bm25, inputs: [access]}\n", encoding="utf-8")
    (error,) = compile_errors(config)
    assert f"{tmp_path / 'P.yaml'}:4:51  rules.0.on_or_after: rule 'recent': as_of - 99999y is outside" in error


def test_until_the_last_representable_day_loads(write_rules):
    # before: OverflowError with a stack trace while loading (the day after 9999-12-31)
    ruleset = load_rule_file(write_rules(
        "version: 1\nkind: override\nrules:\n  - {id: a, action: bury, docs: [x], until: 9999-12-31}\n"))
    assert ruleset.rules[0].active_at(datetime(9999, 12, 31, 23, tzinfo=timezone.utc))


@pytest.mark.parametrize("year", [1, 5, 999, 2025, 9000, 9999])
def test_no_query_time_makes_a_relative_date_overflow(year):
    as_of = datetime(year, 1, 1, tzinfo=timezone.utc)
    view = QueryView(Query(text="x", as_of=as_of))
    for text in ("as_of - 1000y", "as_of + 1000y", "as_of - 52142w", "as_of + 99999d"):
        leaf = Leaf(Condition(field="doc.date", op="ge", value=text))
        bound = leaf._runtime_operand(view)  # before: OverflowError for years < 1001 or > 8999
        assert isinstance(bound, datetime)
    assert RelativeDate(-365_000).resolve(datetime(5, 1, 1, tzinfo=timezone.utc)) == datetime.min.replace(tzinfo=timezone.utc)
    assert RelativeDate(365_000).resolve(datetime(9990, 1, 1, tzinfo=timezone.utc)) == datetime.max.replace(tzinfo=timezone.utc)


def test_extreme_query_times_run_through_a_date_range_prefilter(tmp_path, medical_index):
    from engine.pipeline import Pipeline

    (tmp_path / "P.yaml").write_text(
        "version: 1\nkind: prefilter\nrules:\n"
        "  - {id: window, action: date_range, field: date, on_or_after: as_of - 1000y, before: as_of + 1000y,"
        " missing: deny}\n", encoding="utf-8")
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"version: 1\nindex: {medical_index}\nstages:\n"
                      "  - {id: access, type: rules.prefilter, params: {rules: P.yaml}}\n"
                      "  - {id: bm25, type: recall.bm25, inputs: [access], params: {top_k: 5}}\n"
                      "trace: {log: null}\n", encoding="utf-8")
    pipeline = Pipeline(compile_file(config))
    ancient = pipeline.run(pipeline.make_query("metformin", as_of=datetime(5, 1, 1, tzinfo=timezone.utc)))
    assert ancient.results == []  # the window ends in 1005: every dated document is after it
    future = pipeline.run(pipeline.make_query("metformin", as_of=datetime(9990, 1, 1, tzinfo=timezone.utc)))
    assert future.results == []  # the window starts in 8991
    today = pipeline.run(pipeline.make_query("metformin", as_of=datetime(2025, 6, 1, tzinfo=timezone.utc)))
    assert today.results


# =========================================================================== 3. the analyst's terms


def test_hints_name_yaml_keys_not_python_names(write_rules):
    path = write_rules(
        "version: 1\nkind: override\nrules:\n"
        "  - {id: a, action: bury, docs: [x], froom: 2025-01-01}\n"                   # 4
        "  - {id: b, action: bury, match: {nott: {field: doc.x, op: eq, value: 1}}}\n"  # 5
        "  - {id: c, action: bury, docs: [x], valid_from: 2025-01-01}\n"              # 6
        "  - {id: d, action: bury, match: {not_: {field: doc.x, op: eq, value: 1}}}\n"  # 7
    )
    rule_keys = "id, description, action, priority, enabled, from, until, when, docs, match"
    condition_keys = "field, op, value, value_from, case_sensitive, all, any, not, expr"
    # before: "(did you mean 'valid_from'?); valid fields: ..., valid_from, ..." ; `nott` had no hint at all;
    # `valid_from:` and `not_:` were silently accepted as `from` and `not`
    assert errors_of(path) == [
        f"{path}:4:38  rules.0.froom: rule 'a': unknown field 'froom' (did you mean 'from'?); valid fields: {rule_keys}",
        f"{path}:5:35  rules.1.match.nott: rule 'b': unknown field 'nott' (did you mean 'not'?); "
        f"valid fields: {condition_keys}",
        f"{path}:6:38  rules.2.valid_from: rule 'c': unknown field 'valid_from' (did you mean 'from'?); "
        f"valid fields: {rule_keys}",
        f"{path}:7:35  rules.3.match.not_: rule 'd': unknown field 'not_' (did you mean 'not'?); "
        f"valid fields: {condition_keys}",
    ]


def test_no_raw_patterns_in_rule_file_messages(write_rules):
    path = write_rules(
        "version: 1\nkind: prefilter\nrules:\n"
        "  - {id: 'hide drafts', action: exclude, match: {field: doc.status, op: eq, value: draft}}\n"  # 4
        "  - {id: acl, action: acl, field: doc acl}\n"                                                # 5
    )
    # before: "String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.\\-]*$'" and "...'^[A-Za-z0-9_\\-]+(...)*$'"
    assert errors_of(path) == [
        f"{path}:4:10  rules.0.id: rule 'hide drafts': not a valid rule id: start with an ASCII letter or digit and "
        "use only ASCII letters, digits, '_', '.' and '-' (no spaces; ids appear in URLs, logs and file names) (got "
        "'hide drafts')",
        f"{path}:5:35  rules.1.field: rule 'acl': not a metadata field name: write the field's key, e.g. acl or "
        "access.groups (without 'doc.'; letters, digits, '_' and '-', with '.' between nested keys) (got 'doc acl')",
    ]


def test_rule_file_that_is_not_yaml_says_so(tmp_path):
    (tmp_path / "access.json").write_text("{}", encoding="utf-8")
    config = tmp_path / "pipeline.yaml"
    config.write_text("version: 1\nstages:\n  - {id: access, type: rules.prefilter, params: {rules: access.json}}\n"
                      "  - {id: bm25, type: recall.bm25, inputs: [access]}\n", encoding="utf-8")
    (error,) = compile_errors(config)
    # before: "String should match pattern '^[^\\x00]+\\.(ya?ml)$' (got 'access.json')"
    assert error == (f"{config}:3:57  stages.0.params.rules: a rule file is a YAML file: its name must end in "
                     ".yaml or .yml (got 'access.json')")


def glossary_errors(tmp_path: Path, text: str) -> tuple[Path, list[str]]:
    path = tmp_path / "glossary.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_glossary(path)
    return path, [str(issue) for issue in caught.value.issues]


def test_glossary_messages_have_no_pydantic_prefix_or_pattern(tmp_path):
    path, errors = glossary_errors(
        tmp_path,
        "version: 1\nentries:\n"
        "  - {id: a, terms: [only-one]}\n"                              # 3
        "  - {id: b, terms: [x, y], canonical: x}\n"                    # 4
        "  - {id: 'c d', terms: [p, q]}\n"                              # 5
        "  - {id: e, term: [r, s]}\n",                                  # 6
    )
    # before: "entries.0: Value error, an `expand` entry needs ...", "String should match pattern '^[A-Za-z0-9_]...'",
    # and `term` got no hint
    assert errors == [
        f"{path}:3:5  entries.0: an `expand` entry needs at least two terms (one to find, one to add)",
        f"{path}:4:5  entries.1: `canonical` is only used by `action: replace`; an `expand` entry adds every other term",
        f"{path}:5:10  entries.2.id: not a valid entry id: start with a letter, digit or '_' and use only letters, "
        "digits, '_', '.' and '-' (no spaces) (got 'c d')",
        f"{path}:6:5  entries.3.terms: required field is missing",
        f"{path}:6:13  entries.3.term: unknown field 'term' (did you mean 'terms'?); "
        "valid fields: id, terms, action, canonical, case_sensitive, description",
    ]


# =========================================================================== 4. one problem hides no other


def test_duplicate_id_is_reported_although_the_first_rule_is_invalid(write_rules):
    path = write_rules(
        "version: 1\nkind: override\nrules:\n"
        "  - {id: a, action: bury, docs: [x], prority: 1}\n"     # 4: invalid
        "  - {id: a, action: bury, docs: [y]}\n"                  # 5: valid, same id
        "  - {id: b, action: zap}\n"                             # 6: unknown action
        "  - {id: b, action: bury}\n"                            # 7: invalid too, same id
    )
    errors = errors_of(path)
    # before: only the problems of rules 0, 2 and 3; neither duplicate
    assert f"{path}:5:10  rules.1.id: duplicate rule id 'a' (first used by rules.0)" in errors
    assert f"{path}:7:10  rules.3.id: duplicate rule id 'b' (first used by rules.2)" in errors
    assert len(errors) == 5, errors


def test_glossary_duplicates_are_reported_next_to_an_invalid_entry(tmp_path):
    path, errors = glossary_errors(
        tmp_path,
        "version: 1\nentries:\n"
        "  - {id: a, terms: [phone case, phone cover]}\n"                    # 3
        "  - {id: b, action: replace, terms: [mobile case]}\n"              # 4: invalid (no canonical)
        "  - {id: a, terms: [cell cover, mobile case]}\n"                   # 5: duplicate id and term
        "  - {id: c, terms: [Phone Cover, handset cover]}\n"                # 6: duplicate term
    )
    # before: only "entries.1: Value error, a `replace` entry needs `canonical`..."
    assert errors == [
        f"{path}:4:5  entries.1: a `replace` entry needs `canonical`: the term the others are replaced by",
        f"{path}:5:10  entries.2.id: id 'a' is already used by entries.0",
        f"{path}:5:33  entries.2.terms.1: 'mobile case' is already a term of entry 'b' (entries.1); "
        "a term may belong to one entry",
        f"{path}:6:21  entries.3.terms.0: 'Phone Cover' is already a term of entry 'a' (entries.0); "
        "a term may belong to one entry",
    ]


CONFLICT_AND_ERROR = (
    "version: 1\nkind: override\nrules:\n"
    "  - {id: a, action: pin, docs: [med-001], position: 1}\n"   # 4
    "  - {id: b, action: pin, docs: [med-002], position: 1}\n"   # 5: slot conflict with a
    "  - {id: c, action: boost, factor: 0.5, docs: [med-003]}\n"  # 6: a boost must raise
)


def test_conflict_checks_run_next_to_rule_errors(tmp_path):
    config = override_pipeline(tmp_path, CONFLICT_AND_ERROR)
    errors = [e.split(f"{tmp_path / 'R.yaml'}:", 1)[1] for e in compile_errors(config)]
    # before: only the boost error; the pin conflict showed up once it was fixed
    assert [e.split(": ", 1)[0] for e in errors] == ["5:53  rules.1.position", "6:5  rules.2"]
    assert "[pin_slot_conflict] pins 'a' and 'b' both claim position 1" in errors[0]
    assert "a boost raises scores" in errors[1]


def test_rules_check_command_reports_conflicts_next_to_rule_errors(tmp_path):
    from rules.cli import rules_app

    path = tmp_path / "R.yaml"
    path.write_text(CONFLICT_AND_ERROR, encoding="utf-8")
    result = runner.invoke(rules_app, ["check", str(path)])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "2 configuration errors" in output
    assert f"{path}:5:53 rules.1.position: [pin_slot_conflict]" in output
    assert f"{path}:6:5 rules.2: rule 'c': a boost raises scores" in output


def test_a_failing_when_does_not_hide_the_match(write_rules):
    path = write_rules(
        "version: 1\nkind: override\nrules:\n"
        "  - {id: a, action: bury, when: {field: query.txt, op: eq, value: x}, match: {expr: 'nope == 1'}}\n"
    )
    errors = errors_of(path)  # before: only the `when`; the expression was checked once the `when` was fixed
    assert [e.split("  ")[1].split(": ")[0] for e in errors] == ["rules.0.when.field", "rules.0.match.expr"]
    assert "unknown query field 'query.txt'" in errors[0] and "unknown name 'nope'" in errors[1]
