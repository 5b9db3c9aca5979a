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
