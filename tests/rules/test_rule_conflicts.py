"""Conflict checks: pins fighting over a slot, pin vs exclude, expired rules, unknown fields —
graded by strictness, located in the rule file, run at compile time and at warm-up."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from engine.compiler import compile_file
from engine.errors import ConfigError
from engine.index import Index
from engine.pipeline import Pipeline
from engine.stage import GraphView, StageNode
from rules.conflicts import check_against_corpus, check_rules
from rules.corpus import DocumentTable
from rules.ruleset import load_rule_file
from stages.rules import RulesOverride

TODAY = datetime(2025, 6, 1, tzinfo=timezone.utc)
HEADER = "version: 1\nkind: override\n{extra}rules:\n"


def findings(write_rules, rules: str, extra: str = "") -> list:
    return check_rules(load_rule_file(write_rules(HEADER.format(extra=extra) + rules)), TODAY)


def test_two_pins_on_one_slot_with_equal_priority_is_an_error(write_rules):
    (issue,) = findings(write_rules,
        "  - {id: a, action: pin, docs: [d1], position: 1, when: {field: query.text, op: contains, value: x}}\n"
        "  - {id: b, action: pin, docs: [d2], position: 1, when: {field: query.text, op: contains, value: y}}\n")
    assert issue.severity == "error"
    assert str(issue).startswith(f"{issue.location.file}:5:48  rules.1.position: [pin_slot_conflict]")
    assert "both claim position 1 ('d1' vs 'd2')" in issue.message and "same priority" in issue.message


def test_priorities_make_it_a_warning_naming_the_winner(write_rules):
    (issue,) = findings(write_rules,
        "  - {id: a, action: pin, docs: [d1], position: 1, priority: 5}\n"
        "  - {id: b, action: pin, docs: [d2, d3], position: 0, priority: 1}\n".replace("position: 0", "position: 1"))
    assert issue.severity == "warning" and "'a' wins (higher priority)" in issue.message


def test_multi_document_pins_occupy_consecutive_slots(write_rules):
    (issue,) = findings(write_rules,
        "  - {id: a, action: pin, docs: [d1, d2], position: 1}\n"
        "  - {id: b, action: pin, docs: [d3], position: 2}\n")
    assert "position 2 ('d2' vs 'd3')" in issue.message


@pytest.mark.parametrize(
    "when_a, when_b",
    [
        ("{field: query.language, op: eq, value: en}", "{field: query.language, op: eq, value: fr}"),
        ("{field: user.roles, op: contains, value: x}", "{field: user.roles, op: not_contains, value: x}"),
        ("{field: user.roles, op: contains, value: x}", "{not: {field: user.roles, op: contains, value: x}}"),
        ("{field: as_of, op: before, value: 2025-01-01}", "{field: as_of, op: after, value: 2025-02-01}"),
        ("{field: user.attributes.desk, op: in, value: [a, b]}", "{field: user.attributes.desk, op: eq, value: c}"),
        ("{all: [{field: query.text, op: contains, value: q}, {field: user.id, op: eq, value: u1}]}",
         "{field: user.id, op: eq, value: u2}"),
    ],
)
def test_provably_exclusive_conditions_do_not_conflict(write_rules, when_a, when_b):
    assert findings(write_rules,
        f"  - {{id: a, action: pin, docs: [d1], position: 1, when: {when_a}}}\n"
        f"  - {{id: b, action: pin, docs: [d2], position: 1, when: {when_b}}}\n") == []


def test_disjoint_windows_and_disabled_rules_do_not_conflict(write_rules):
    assert findings(write_rules,
        "  - {id: a, action: pin, docs: [d1], position: 1, from: 2030-01-01, until: 2030-03-31}\n"
        "  - {id: b, action: pin, docs: [d2], position: 1, from: 2030-04-01}\n"
        "  - {id: c, action: pin, docs: [d3], position: 1, from: 2030-01-01, until: 2030-03-31, enabled: false}\n") == []


def test_overlapping_windows_conflict(write_rules):
    (issue,) = findings(write_rules,
        "  - {id: a, action: pin, docs: [d1], position: 1, from: 2030-01-01, until: 2030-04-01}\n"
        "  - {id: b, action: pin, docs: [d2], position: 1, from: 2030-04-01}\n")
    assert issue.severity == "error"  # until 2025-04-01 covers that whole day


def test_pin_and_exclude_of_one_document(write_rules):
    issues = findings(write_rules,
        "  - {id: keep, action: pin, docs: [d1], position: 1}\n"
        "  - {id: drop, action: exclude, docs: [d1, d9]}\n"
        "  - {id: sink, action: bury, docs: [d1]}\n")
    assert [(i.severity, i.message.split("]")[0]) for i in issues] == [
        ("error", "[pin_exclude_conflict"), ("warning", "[pin_bury_conflict")]
    assert "exclude wins" in issues[0].message


def test_same_document_pinned_to_two_places(write_rules):
    (issue,) = findings(write_rules,
        "  - {id: a, action: pin, docs: [d1], position: 1}\n"
        "  - {id: b, action: pin, docs: [d1], position: 3}\n")
    assert issue.message.startswith("[pin_doc_conflict]")


def test_expired_rule_is_a_warning_and_strictness_grades_findings(write_rules):
    rules = "  - {id: old, action: bury, docs: [d1], until: 2025-05-31}\n"
    (issue,) = findings(write_rules, rules)
    assert issue.severity == "warning" and "has expired (until 2025-05-31; now is " in issue.message
    # not "no longer fires": a query as of before then (the demo's --as-of 2025-06-01) sees it fire, and is told so
    assert "it fires only for queries whose as_of is before then" in issue.message
    # expiry depends on the clock, not the file: under strict it stays a warning, so that the file still loads
    # the day after (replays, rule tests and queries with an earlier as_of still see the rule fire)
    (strict,) = findings(write_rules, rules, "strictness: strict\n")
    assert strict.severity == "warning"
    conflict = "  - {id: a, action: pin, docs: [d1], position: 1}\n  - {id: b, action: exclude, docs: [d1]}\n"
    assert [i.severity for i in findings(write_rules, conflict, "strictness: strict\n")] == ["error"]
    assert [i.severity for i in findings(write_rules, conflict, "strictness: lenient\n")] == ["warning"]


def test_a_rule_whose_until_passed_earlier_today_is_expired(write_rules):
    """Expiry is judged against the moment, not today's midnight: a date-time until of this morning has passed."""
    path = write_rules(HEADER.format(extra="") + "  - {id: old, action: bury, docs: [d1], until: '2025-06-01T06:00:00Z'}\n")
    ruleset = load_rule_file(path)
    assert check_rules(ruleset, datetime(2025, 6, 1, 5, 59, tzinfo=timezone.utc)) == []
    (issue,) = check_rules(ruleset, datetime(2025, 6, 1, 6, 0, tzinfo=timezone.utc))
    assert "has expired" in issue.message


def test_corpus_checks(write_rules, medical_index):
    table = DocumentTable.from_index(Index.open(medical_index))
    ruleset = load_rule_file(write_rules(HEADER.format(extra="") +
        "  - {id: f, action: bury, match: {field: doc.colour, op: eq, value: red}}\n"
        "  - {id: g, action: bury, docs: [med-001, med-999]}\n"
        "  - {id: keep, action: pin, docs: [med-002], position: 1}\n"
        "  - {id: hide, action: exclude, match: {field: doc.status, op: eq, value: superseded}}\n"
        "  - {id: ok, action: bury, match: {field: doc.status, op: eq, value: superseded}}\n"))
    issues = check_against_corpus(ruleset, table)
    codes = sorted(i.message.split("]")[0][1:] for i in issues)
    assert codes == ["pin_bury_conflict", "pin_exclude_conflict", "unknown_document", "unknown_field"]
    unknown_field = next(i for i in issues if "unknown_field" in i.message)
    assert "reads 'doc.colour', which no document in the index has" in unknown_field.message
    assert "metadata fields: acl, audience, date" in unknown_field.message
    unknown_doc = next(i for i in issues if "unknown_document" in i.message)
    assert unknown_doc.path == "rules.1.docs.1"


def test_prefilter_rule_that_excludes_everything_is_flagged(write_rules, medical_index):
    table = DocumentTable.from_index(Index.open(medical_index))
    ruleset = load_rule_file(write_rules(
        "version: 1\nkind: prefilter\nrules:\n"
        "  - {id: all-gone, action: include, match: {field: doc.source, op: eq, value: nobody}}\n"))
    (issue,) = check_against_corpus(ruleset, table)
    assert "excludes all 33 documents" in issue.message


CONFLICTING = (
    "version: 1\nkind: override\nrules:\n"
    "  - {id: a, action: pin, docs: [med-001], position: 1}\n"
    "  - {id: b, action: pin, docs: [med-002], position: 1}\n"
)


def _pipeline(tmp_path: Path, index: Path) -> Path:
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"version: 1\nindex: {index}\nstages:\n"
        "  - {id: bm25, type: recall.bm25, params: {top_k: 20}}\n"
        "  - {id: rules, type: rules.override, inputs: [bm25], params: {rules: overrides.yaml}}\n"
        "trace: {log: null}\n", encoding="utf-8")
    return config


def test_conflicts_fail_compilation_with_the_rule_file_location(tmp_path, medical_index):
    (tmp_path / "overrides.yaml").write_text(CONFLICTING, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        compile_file(_pipeline(tmp_path, medical_index))  # what `sieve validate` runs: no index, no model
    assert f"{tmp_path / 'overrides.yaml'}:5:" in str(caught.value.issues[0])
    assert "[pin_slot_conflict]" in str(caught.value)


def test_warnings_do_not_fail_and_reach_the_trace(tmp_path, medical_index):
    (tmp_path / "overrides.yaml").write_text(CONFLICTING.replace("position: 1}\n", "position: 1, priority: 2}\n", 1),
                                             encoding="utf-8")
    pipeline = Pipeline(compile_file(_pipeline(tmp_path, medical_index)))
    result = pipeline.search("metformin")
    details = next(s for s in result.trace["stages"] if s["id"] == "rules")["details"]
    assert any("[pin_slot_conflict]" in w for w in details["rule_warnings"])


def test_compile_time_check_through_check_graph(tmp_path):
    (tmp_path / "overrides.yaml").write_text(CONFLICTING, encoding="utf-8")
    params = RulesOverride.Params.model_validate({"rules": "overrides.yaml"})
    node = StageNode("rules", RulesOverride, params, ("bm25",))
    issues = RulesOverride.check_graph(node, GraphView({"rules": node}, tmp_path))
    (issue,) = issues
    assert issue.severity == "error" and issue.path == ("params", "rules")
    assert issue.message.startswith(f"{tmp_path / 'overrides.yaml'}:5:") and "[pin_slot_conflict]" in issue.message
    # without the directory (today's GraphView) the check waits for warm-up
    assert list(RulesOverride.check_graph(node, GraphView({"rules": node}))) == []
    # a broken rule file is reported through the same path
    (tmp_path / "overrides.yaml").write_text("version: 1\nkind: override\nrules:\n  - {id: x, action: zap}\n")
    (broken,) = RulesOverride.check_graph(node, GraphView({"rules": node}, tmp_path))
    assert "unknown override action 'zap'" in broken.message
