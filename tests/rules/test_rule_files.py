"""Rule files: bad input gives located errors (file:line:col, rule id, expression), all at once;
validity windows are judged against the query's as_of."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from engine.errors import ConfigError
from rules.ruleset import load_rule_file


def errors_of(path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path)
    return [str(issue) for issue in caught.value.issues]


def test_all_problems_reported_at_once_and_located(write_rules):
    path = write_rules(
        "version: 1\n"                                             # 1
        "kind: override\n"                                         # 2
        "rules:\n"                                                 # 3
        "  - id: pin-a\n"                                          # 4
        "    action: pinn\n"                                       # 5
        "    docs: [d1]\n"                                         # 6
        "  - id: boost-b\n"                                        # 7
        "    action: boost\n"                                      # 8
        "    factor: 0.5\n"                                        # 9
        "    match: {field: doc.x, op: eq, value: 1}\n"            # 10
        "  - id: bad-expr\n"                                       # 11
        "    action: exclude\n"                                    # 12
        "    when: {expr: \"query.text ==\"}\n"                    # 13
        "    docs: [d2]\n"                                         # 14
        "  - id: escape\n"                                         # 15
        "    action: bury\n"                                       # 16
        "    match:\n"                                             # 17
        "      all:\n"                                             # 18
        "        - {field: doc.a, op: eq, value: 1}\n"             # 19
        "        - {expr: \"''.__class__.__mro__\"}\n"             # 20
        "  - id: escape\n"                                         # 21
        "    action: bury\n"                                       # 22
        "    docs: [d3]\n"                                         # 23
        "    prority: 3\n"                                         # 24
    )
    errors = errors_of(path)
    assert len(errors) == 6, errors
    assert errors[0].startswith(f"{path}:5:13  rules.0.action: rule 'pin-a': unknown override action 'pinn' (did you mean 'pin'?)")
    assert errors[1].startswith(f"{path}:7:5  rules.1: rule 'boost-b': a boost raises scores")
    assert errors[2].startswith(f"{path}:13:18  rules.2.when.expr: rule 'bad-expr': syntax error")
    assert "in expression 'query.text =='" in errors[2]
    assert errors[3].startswith(f"{path}:20:18  rules.3.match.all.1.expr: rule 'escape': access to '__mro__' is not allowed")
    # both rules named 'escape' fail validation; their shared id is reported all the same
    assert errors[4] == f"{path}:21:9  rules.4.id: duplicate rule id 'escape' (first used by rules.3)"
    assert errors[5].startswith(f"{path}:24:5  rules.4.prority: rule 'escape': unknown field 'prority' (did you mean 'priority'?)")


def test_duplicate_rule_ids(write_rules):
    path = write_rules(
        "version: 1\nkind: override\nrules:\n"
        "  - {id: a, action: bury, docs: [x]}\n"
        "  - {id: a, action: bury, docs: [y]}\n"
    )
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:5:10  rules.1.id: duplicate rule id 'a' (first used by rules.0)")


def test_header_errors_and_yaml_errors(write_rules):
    path = write_rules("version: 2\nkind: overide\nrules: []\nstrictness: loose\n")
    errors = errors_of(path)
    assert any(e.startswith(f"{path}:1:10  version:") for e in errors)
    assert any(e.startswith(f"{path}:2:7  kind:") for e in errors)
    assert any(e.startswith(f"{path}:4:13  strictness:") for e in errors)
    broken = write_rules("version: 1\nkind: override\nrules:\n  - id: [unclosed\n", "broken.yaml")
    (error,) = errors_of(broken)
    assert error.startswith(f"{broken}:") and "not valid YAML" in error
    assert errors_of(write_rules("", "empty.yaml"))[0].endswith("file is empty")
    assert errors_of(write_rules("- a\n", "list.yaml"))[0].endswith("a rule file is a mapping with version, kind and rules")


def test_action_specific_validation(write_rules):
    path = write_rules(
        "version: 1\nkind: override\nrules:\n"
        "  - {id: p1, action: pin, docs: [a, a], position: 1}\n"         # 4: listed twice
        "  - {id: p2, action: pin, match: {expr: 'true'}, position: 1}\n"  # 5: pin takes docs
        "  - {id: p3, action: pin, docs: [a], position: 0}\n"            # 6: position >= 1
        "  - {id: b1, action: bury}\n"                                   # 7: no target
        "  - {id: d1, action: demote, add: 0.5, docs: [a]}\n"            # 8: demote must lower
        "  - {id: w1, action: bury, docs: [a], from: 2025-02-01, until: 2025-01-01}\n"  # 9: empty window
        "  - {id: w2, action: bury, docs: [a], until: 'next week'}\n"    # 10: not a date
    )
    errors = errors_of(path)
    assert len(errors) == 7, errors
    lines = [int(e.split(":")[1]) for e in errors]
    assert lines == [4, 5, 6, 7, 8, 9, 10]
    assert "listed twice" in errors[0]
    assert "names its documents in 'docs'" in errors[1]
    assert "greater than or equal to 1" in errors[2]
    assert "needs 'docs', 'match' or both" in errors[3]
    assert "a demote lowers scores" in errors[4]
    assert "validity window is empty" in errors[5]
    assert "not an ISO 8601 date" in errors[6]


def test_prefilter_specific_validation(write_rules):
    path = write_rules(
        "version: 1\nkind: prefilter\nrules:\n"
        "  - {id: a, action: exclude, match: {field: score.bm25, op: gt, value: 1}}\n"
        "  - {id: b, action: include, match: {expr: \"doc.x in user.groups\"}}\n"
        "  - {id: c, action: date_range}\n"
        "  - {id: d, action: acl, user_field: teams}\n"
        "  - {id: e, action: pin, docs: [x], position: 1}\n"
    )
    errors = errors_of(path)
    assert len(errors) == 5, errors
    assert "cannot be used in a prefilter rule" in errors[0]
    assert "may read only 'doc'" in errors[1]
    assert "needs 'on_or_after', 'before' or both" in errors[2]
    assert "user_field" in errors[3]
    assert "unknown prefilter action 'pin'" in errors[4] and "prefilter actions: exclude, include, acl" in errors[4]


def test_kind_mismatch_is_reported(write_rules):
    path = write_rules("version: 1\nkind: prefilter\nrules: []\n")
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path, "override")
    assert str(caught.value.issues[0]).startswith(f"{path}:2:7  kind: this stage needs a 'override' rule file")


def test_validity_windows(write_rules):
    path = write_rules(
        "version: 1\nkind: override\nrules:\n"
        "  - {id: by-date, action: bury, docs: [a], from: 2025-03-01, until: 2025-03-31}\n"
        "  - {id: by-time, action: bury, docs: [a], from: '2025-03-01T12:00:00Z', until: '2025-03-31T00:00:00Z'}\n"
        "  - {id: disabled, action: bury, docs: [a], enabled: false}\n"
    )
    ruleset = load_rule_file(path)
    by_date, by_time, off = ruleset.rules

    def at(text: str) -> datetime:
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)

    assert not by_date.active_at(at("2025-02-28T23:59:59"))
    assert by_date.active_at(at("2025-03-01T00:00:00"))  # from is inclusive
    assert by_date.active_at(at("2025-03-31T23:59:59"))  # a date `until` covers its whole day
    assert not by_date.active_at(at("2025-04-01T00:00:00"))
    assert not by_time.active_at(at("2025-03-01T11:59:59"))
    assert by_time.active_at(at("2025-03-01T12:00:00"))
    assert not by_time.active_at(at("2025-03-31T00:00:00"))  # a date-time `until` is exclusive
    assert by_date.inactive_reason(at("2025-05-01")).startswith("expired at 2025-04-01")
    assert off.inactive_reason(at("2025-05-01")) == "disabled"
