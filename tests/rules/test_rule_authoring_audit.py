"""Rule files a careless analyst writes (audit findings): a condition that silently always or never holds is refused
at load, with its file:line."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from rules.ruleset import load_rule_file

HEAD = "version: 1\nkind: override\nrules:\n"


def _errors(tmp_path, body: str) -> str:
    path = tmp_path / "overrides.yaml"
    path.write_text(HEAD + body, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path, "override")
    return str(caught.value)


def test_a_when_with_its_lines_commented_out_is_refused_not_made_unconditional(tmp_path):
    body = ("  - id: hide-for-patients\n    action: exclude\n    docs: [med-001]\n    when:\n"
            "      # {field: user.roles, op: contains, value: patient}\n")
    message = _errors(tmp_path, body)
    assert "overrides.yaml:7:10" in message and "'when' is empty (are its lines commented out?)" in message
    assert "every query" in message
    body = "  - id: m\n    action: bury\n    match:\n"
    assert "'match' is empty" in _errors(tmp_path, body) and "every document" in _errors(tmp_path, body)


@pytest.mark.parametrize(("condition", "says"), [
    ("{field: doc.text, op: contains, value: ''}", "the condition would always hold"),
    ("{field: doc.text, op: not_contains, value: ''}", "the condition would never hold"),
    ("{field: doc.title, op: regex, value: ''}", "an empty pattern is found in every text"),
    ("{field: doc.title, op: regex, value: 'metformin|'}", "the pattern matches an empty text"),
    ("{field: doc.title, op: regex, value: '(?:)'}", "the pattern matches an empty text"),
    ("{field: doc.title, op: regex, value: 'x*'}", "the pattern matches an empty text"),
    ("{field: doc.tags, op: contains_any, value: [drug, '']}", "drop '' from the list"),
    ("{field: score.bm25, op: gt, value: as_of}", "score.bm25 is a number: compare it with a number, not a date"),
    ("{field: candidate.rank, op: lt, value: '2025-01-01'}", "candidate.rank is a number"),
])
def test_a_condition_that_always_or_never_holds_is_refused(tmp_path, condition, says):
    message = _errors(tmp_path, f"  - {{id: r, action: bury, match: {condition}}}\n")
    assert "overrides.yaml:4:" in message and says in message, message


def test_the_same_conditions_written_sensibly_load(tmp_path):
    path = tmp_path / "overrides.yaml"
    path.write_text(HEAD + "  - {id: r, action: bury, when: {field: user.roles, op: contains, value: patient}, "
                    "match: {field: score.bm25, op: gt, value: 2.5}}\n"
                    "  - {id: s, action: bury, match: {field: doc.date, op: before, value: as_of - 1y}}\n",
                    encoding="utf-8")
    assert [rule.id for rule in load_rule_file(path, "override").rules] == ["r", "s"]


# Patterns run with a time limit: one that backtracks without end is an error of its rule, not a hung process.

EVIL = "(a|aa)+$"  # on 'a' * 40 + 'b' Python's re would take longer than the age of the universe


@pytest.fixture(scope="module")
def evil_index(tmp_path_factory):
    import json

    from engine.index import build_index

    folder = tmp_path_factory.mktemp("evil")
    docs = [{"_id": "d1", "title": "plain", "text": "metformin kidney dose"},
            {"_id": "d2", "title": "runs", "text": "metformin " + "a" * 40 + "b"}]
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n", encoding="utf-8")
    build_index(folder, folder / "index", {"bm25": {}})
    return folder / "index"


def _rules_pipeline(tmp_path, index, kind: str, rule: str):
    from engine.pipeline import Pipeline

    (tmp_path / "rules.yaml").write_text(f"version: 1\nkind: {kind}\nrules:\n  - {rule}\n", encoding="utf-8")
    stage_type = "rules.prefilter" if kind == "prefilter" else "rules.override"
    stages = (f"  - {{id: rules, type: {stage_type}, params: {{rules: rules.yaml}}}}\n"
              "  - {id: bm25, type: recall.bm25, inputs: [rules], params: {top_k: 5}}\noutput: bm25\n"
              if kind == "prefilter" else
              "  - {id: bm25, type: recall.bm25, params: {top_k: 5}}\n"
              f"  - {{id: rules, type: {stage_type}, inputs: [bm25], params: {{rules: rules.yaml}}}}\noutput: rules\n")
    (tmp_path / "p.yaml").write_text(f"version: 1\nindex: {index}\nstages:\n{stages}trace: {{log: null}}\n",
                                     encoding="utf-8")
    return Pipeline.from_file(tmp_path / "p.yaml")


@pytest.mark.parametrize("kind", ["prefilter", "override"])
def test_a_pattern_that_backtracks_without_end_on_a_document_stops_the_pipeline_with_its_rule(tmp_path, evil_index,
                                                                                             kind):
    action = "exclude" if kind == "prefilter" else "bury"
    pipeline = _rules_pipeline(tmp_path, evil_index, kind,
                               f"{{id: evil, action: {action}, match: {{field: doc.text, op: regex, value: '{EVIL}'}}}}")
    with pytest.raises(ConfigError) as caught:
        pipeline.warm_up()
    message = str(caught.value)
    assert "rules.yaml:4:" in message and "[cannot_evaluate] rule 'evil' cannot be evaluated on the corpus" in message
    assert "ran over 250 ms" in message and "catastrophic backtracking" in message


def test_a_pattern_that_backtracks_without_end_on_the_query_is_that_rules_error(tmp_path, evil_index):
    pipeline = _rules_pipeline(tmp_path, evil_index, "override",
                               f"{{id: q, action: boost, factor: 2, docs: [d1], "
                               f"when: {{field: query.text, op: regex, value: '{EVIL}'}}}}")
    result = pipeline.search("metformin " + "a" * 40 + "b", log=False)
    stage = next(s for s in result.trace["stages"] if s["id"] == "rules")
    (decision,) = [d for d in stage["decisions"] if d["code"] == "rule_error"]
    assert "rule 'q': its `when` failed" in decision["detail"] and "ran over 250 ms" in decision["detail"]
    assert "q" not in stage["details"]["fired_rules"]


def test_the_matches_filter_has_the_same_time_limit():
    from rules.expressions import ExpressionRuntimeError, regex_search

    assert regex_search("Metformin 500 mg", r"\d+ mg")
    with pytest.raises(ExpressionRuntimeError, match="ran over 250 ms"):
        regex_search("a" * 40 + "b", EVIL)


def test_a_pin_pushed_off_its_position_by_a_displaced_pin_is_a_warning(tmp_path):
    """p2 (priority 5) takes 1, so p1 takes 2, which p5 asked for; p4 holds 3: p5 lands at 4. No two pins claim one
    position, so only the chain shows it."""
    from rules.conflicts import check_rules

    path = tmp_path / "overrides.yaml"
    path.write_text(HEAD + "  - {id: p1, action: pin, docs: [d1], position: 1}\n"
                    "  - {id: p2, action: pin, docs: [d2], position: 1, priority: 5}\n"
                    "  - {id: p4, action: pin, docs: [d4], position: 3}\n"
                    "  - {id: p5, action: pin, docs: [d5], position: 2}\n", encoding="utf-8")
    issues = [str(i) for i in check_rules(load_rule_file(path, "override"))]
    chain = [i for i in issues if "[pin_displaced_chain]" in i]
    assert chain == [next(i for i in issues if "overrides.yaml:7:" in i and "pin_displaced_chain" in i)]
    assert "pin 'p5' asks for position 2 ('d5'), which 'p1' takes after being displaced from 1" in chain[0]
    assert "lands at 4" in chain[0]
    # pins that never fire together do not push each other
    path.write_text(HEAD + "  - {id: p1, action: pin, docs: [d1], position: 1, when: {field: user.roles, op: contains, "
                    "value: a}}\n  - {id: p2, action: pin, docs: [d2], position: 1, priority: 5, when: {field: "
                    "user.roles, op: not_contains, value: a}}\n  - {id: p5, action: pin, docs: [d5], position: 2}\n",
                    encoding="utf-8")
    assert not [i for i in check_rules(load_rule_file(path, "override")) if "pin_displaced_chain" in str(i)]


@pytest.mark.parametrize(("rule", "says"), [
    ("{id: r, action: boost, docs: [d1], factor: 1}", "this boost changes no score (factor 1, add 0)"),
    ("{id: r, action: demote, docs: [d1], add: 0}", "this demote changes no score"),
    ("{id: r, action: boost, docs: [d1, d2, d1], factor: 2}", "'d1' is listed twice in docs"),
    ("{id: r, action: exclude, docs: [d1, d1]}", "'d1' is listed twice in docs"),
])
def test_a_rule_that_does_nothing_or_lists_a_document_twice_is_refused(tmp_path, rule, says):
    assert says in _errors(tmp_path, f"  - {rule}\n")


def test_a_winning_pin_that_does_not_bring_documents_in_is_said_to_win_only_when_recalled(tmp_path):
    from rules.conflicts import check_rules

    path = tmp_path / "overrides.yaml"
    path.write_text(HEAD + "  - {id: a-pin, action: pin, docs: [d1], position: 1, priority: 5, inject: false}\n"
                    "  - {id: b-pin, action: pin, docs: [d1], position: 2}\n", encoding="utf-8")
    (issue,) = [str(i) for i in check_rules(load_rule_file(path, "override")) if "pin_doc_conflict" in str(i)]
    assert "'a-pin' wins (higher priority) when recall returns the document: 'a-pin' has inject: false" in issue
