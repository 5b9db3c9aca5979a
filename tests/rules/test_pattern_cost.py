"""Resource audit F1: a regex pattern taken from the query (``op: regex`` with ``value_from``, or ``matches`` of
a computed text) was compiled with no bound and kept in the compiled-pattern cache: a 47-character query took a
server to gigabytes it never gave back. A pattern now comes from the rule file only, and one whose nested counted
repetitions would take seconds and gigabytes to compile is refused when the file is loaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from engine.errors import ConfigError
from rules.expressions import ExpressionError, PatternError, compile_expression, compile_pattern
from rules.ruleset import load_rule_file

BOMB = "metformin|(?:(?:(?:(?:a{30}){30}){30}){30}){30}"


def _rules(tmp_path, condition: str):
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        kind: override
        rules:
          - id: r
            action: exclude
            match: {condition}
        """), encoding="utf-8")
    return path


def test_a_pattern_from_the_query_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match="a regex takes its pattern from the rule file only") as caught:
        load_rule_file(_rules(tmp_path, "{field: doc.title, op: regex, value_from: query.text}"))
    assert "rules.yaml:6:12" in str(caught.value)  # located


@pytest.mark.parametrize("expression", ["doc.title | matches(query.text)", "doc.title | matches(user.id ~ 'x')",
                                        "doc.title | matches(pattern=query.text)",
                                        "[doc.title] | map('matches', query.text) | first"])
def test_an_expression_matching_a_computed_pattern_is_refused(expression):
    with pytest.raises(ExpressionError, match="takes its pattern as a string written in the rule|map\\('matches'"):
        compile_expression(expression, ["doc", "query", "user"])


def test_a_written_pattern_in_an_expression_is_checked_when_loaded():
    assert compile_expression("doc.title | matches('metformin|insulin')", ["doc"])
    with pytest.raises(ExpressionError, match="counted repetitions written out make"):
        compile_expression(f"doc.title | matches('{BOMB}')", ["doc"])


def test_a_pattern_that_would_take_gigabytes_to_compile_is_refused_at_once(tmp_path):
    with pytest.raises(ConfigError, match="make 24,300,009 parts"):
        load_rule_file(_rules(tmp_path, f"{{field: doc.title, op: regex, value: '{BOMB}'}}"))
    for fine in (r"\d{4}-\d{2}-\d{2}", r"(\w{1,20}\s){1,10}", "(?:a{100}){100}", r"\p{L}{3,}"):
        assert compile_pattern(fine)
    # review of this change: the regex engine's own syntax switched the count off, and parts side by side inside a
    # repetition were counted as one
    for bomb in ("(?:(?:a{50}){50}){40}", "(?:(?:(?:(?:(?:a{20}){20}){20}){20}){20})\\p{L}", "(?:" + "a{99}" * 20 + "){99}"):
        with pytest.raises(PatternError, match="counted repetitions written out"):
            compile_pattern(bomb)


def test_the_refusal_costs_no_memory():
    """In a child capped at 1 GiB of address space (the bomb needed ~4.5 GB before: a MemoryError there): refused.
    (Its peak RSS is no measure: Linux keeps the parent's across the fork and exec.)"""
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from rules.expressions import PatternError, compile_pattern
        try:
            compile_pattern({BOMB!r})
        except PatternError:
            print("refused")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("refused"), done.stderr[-2000:]
