"""Findings of the access-rule audit (prefilter / override), each on a small real corpus.

A. acl / jurisdiction compare whole values: a string is a one-element list, never a substring;
   an empty string matches nothing;
B. a date or number comparison on a value that is not one cannot judge the document: a prefilter
   denies it, says so in the trace, and ``rules check --index`` reports it;
C. a nested access field whose path runs through a non-mapping is malformed, not absent: denied;
D. a prefilter acl / jurisdiction / date_range rule on a field no document has refuses to start;
F. acl / jurisdiction ignore case unless ``case_sensitive: true``;
G. ``default_deny`` is the missing policy of every access action;
H. relative years and months are calendar arithmetic;
I. ``priority`` on a prefilter rule is refused.

(E, an exclude beating an injected pin, is in tests/stages/test_rules_stages.py.) Each test says
what happened before the fix ("before:").
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.compiler import compile_file
from engine.errors import ConfigError
from engine.model import Query, UserContext
from engine.pipeline import Pipeline
from rules.conditions import Condition, Leaf, QueryView
from rules.ruleset import load_rule_file

AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)
runner = CliRunner()


def build(tmp_path: Path, docs: list[dict]) -> Path:
    """A BM25 index of ``docs`` (each gets the text 'zebra' unless it has one)."""
    from engine.index import build_index

    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({"title": doc["_id"], "text": "zebra", **doc}) + "\n")
    build_index(corpus, tmp_path / "index", {"bm25": {}})
    return tmp_path / "index"


def pipeline(tmp_path: Path, docs: list[dict], access: str) -> Pipeline:
    """access prefilter (``access`` is the rule file after its version/kind lines) -> bm25 over ``docs``."""
    index = build(tmp_path, docs)
    (tmp_path / "access.yaml").write_text("version: 1\nkind: prefilter\n" + access, encoding="utf-8")
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"version: 1\nindex: {index}\nstages:\n"
        "  - {id: access, type: rules.prefilter, params: {rules: access.yaml}}\n"
        "  - {id: bm25, type: recall.bm25, inputs: [access], params: {top_k: 50}}\n"
        "output: bm25\ntrace: {log: null}\n", encoding="utf-8")
    return Pipeline(compile_file(config))


def visible(pipe: Pipeline, as_of: datetime = AS_OF, **user) -> set[str]:
    result = pipe.run(pipe.make_query("zebra", user=UserContext(**user), as_of=as_of))
    return {c.doc_id for c in result.results}


def access_record(pipe: Pipeline, as_of: datetime = AS_OF, **user) -> dict:
    result = pipe.run(pipe.make_query("zebra", user=UserContext(**user), as_of=as_of))
    return next(s for s in result.trace["stages"] if s["id"] == "access")


# =========================================================================== A. whole values


ACL_DOCS = [
    {"_id": "a-scalar", "acl": "trial-investigators"},
    {"_id": "a-nonpublic", "acl": "nonpublic"},
    {"_id": "a-public", "acl": ["public"]},
    {"_id": "a-emptystr", "acl": ""},
    {"_id": "a-list", "acl": ["trial-dsmb", "trial-investigators"]},
    {"_id": "a-none"},
]


def test_acl_string_is_one_whole_value_not_a_substring(tmp_path):
    pipe = pipeline(tmp_path, ACL_DOCS, "rules:\n  - {id: acl, action: acl, public: [public]}\n")
    everyone = {"a-public", "a-none"}
    # before: the groups 'trial', 'investigators' and '' all saw a-scalar ("needle in text"), and
    # 'nonpublic' was visible to everyone because 'public' is a substring of it
    assert visible(pipe, groups=("trial",)) == everyone
    assert visible(pipe, groups=("investigators",)) == everyone
    assert visible(pipe, groups=("",)) == everyone  # an empty group matches nothing, not even acl ""
    assert visible(pipe) == everyone
    assert visible(pipe, groups=("trial-investigators",)) == everyone | {"a-scalar", "a-list"}
    assert visible(pipe, groups=("nonpublic",)) == everyone | {"a-nonpublic"}


def test_jurisdiction_string_is_one_whole_value_and_empty_matches_nothing(tmp_path):
    docs = [{"_id": "j-us", "jurisdiction": "US"}, {"_id": "j-csv", "jurisdiction": "US,UK"},
            {"_id": "j-empty", "jurisdiction": ""}, {"_id": "j-list", "jurisdiction": ["US", "UK"]},
            {"_id": "j-global", "jurisdiction": "global"}]
    pipe = pipeline(tmp_path, docs, "rules:\n  - {id: places, action: jurisdiction}\n")
    assert visible(pipe, jurisdictions=("US",)) == {"j-us", "j-list", "j-global"}  # any element of a list
    # before: a user whose jurisdiction is '' saw the document whose jurisdiction is ''
    assert visible(pipe, jurisdictions=("",)) == {"j-global"}


# =========================================================================== B. unparsable dates and numbers


EMBARGO_DOCS = [
    {"_id": "e-future", "embargo_until": "2030-01-01T00:00:00Z", "risk": 1},
    {"_id": "e-garbage", "embargo_until": "2030-01-01 07:00 ET", "risk": 1},
    {"_id": "e-slash", "embargo_until": "01/01/2030", "risk": 1},
    {"_id": "e-epoch", "embargo_until": 1893456000, "risk": 1},
    {"_id": "e-past", "embargo_until": "2020-01-01", "risk": 1},
    {"_id": "e-none", "risk": 1},
    {"_id": "r-text", "risk": "high"},
    {"_id": "r-string-number", "risk": "2"},
]
EMBARGO = """\
rules:
  - id: embargo
    action: exclude
    match: {field: doc.embargo_until, op: after, value: as_of}
  - id: low-risk
    action: include
    match: {field: doc.risk, op: lt, value: 5}
"""


def test_unparsable_dates_and_numbers_are_denied_and_traced(tmp_path):
    pipe = pipeline(tmp_path, EMBARGO_DOCS, EMBARGO)
    # before: e-garbage, e-slash and e-epoch were returned (their comparison with NaN is false, so the
    # exclude did not fire), and r-text passed nothing but was dropped silently
    assert visible(pipe) == {"e-past", "e-none", "r-string-number"}
    record = access_record(pipe)
    rules = {r["rule"]: r for r in record["details"]["rules"]}
    assert rules["embargo"]["undecidable"] == 3 and rules["embargo"]["excluded"] == 4
    assert rules["low-risk"]["undecidable"] == 1
    decisions = {d["data"]["rule"]: d for d in record["decisions"] if d["code"] == "rule_error"}
    assert decisions["embargo"]["data"]["documents"] == 3
    assert "doc.embargo_until of 'e-garbage': '2030-01-01 07:00 ET' is not an ISO date" in decisions["embargo"]["detail"]
    assert "doc.embargo_until of 'e-epoch': 1893456000 is not an ISO date" in decisions["embargo"]["detail"]
    assert "they are denied (access rules fail closed)" in decisions["embargo"]["detail"]
    assert "doc.risk of 'r-text': 'high' is not a number" in decisions["low-risk"]["detail"]


def test_date_range_reports_the_unparsable_dates_it_hides(tmp_path):
    docs = [{"_id": "d-ok", "date": "2024-01-01"}, {"_id": "d-words", "date": "June 2020"},
            {"_id": "d-year", "date": 2020}, {"_id": "d-none"}]
    pipe = pipeline(tmp_path, docs, "rules:\n  - {id: recent, action: date_range, on_or_after: as_of - 10y}\n")
    assert visible(pipe) == {"d-ok", "d-none"}  # the date_range hid them before too, without a word
    record = access_record(pipe)
    (decision,) = [d for d in record["decisions"] if d["code"] == "rule_error"]
    assert decision["data"] == {"rule": "recent", "documents": 2, "reasons": [
        "doc.date of 'd-words': 'June 2020' is not an ISO date", "doc.date of 'd-year': 2020 is not an ISO date"]}


def test_rules_check_with_an_index_reports_unparsable_values(tmp_path):
    from rules.cli import rules_app

    index = build(tmp_path, EMBARGO_DOCS)
    rules = tmp_path / "access.yaml"
    rules.write_text("version: 1\nkind: prefilter\n" + EMBARGO, encoding="utf-8")
    result = runner.invoke(rules_app, ["check", str(rules), "--index", str(index)])
    output = " ".join(result.output.split())
    # before: "✓ access.yaml: 2 prefilter rules" and nothing else
    assert result.exit_code == 0, output  # a warning: the documents are denied, not let through
    assert (f"{rules}:6:12 warning: rules.0.match: [undecidable_values] rule 'embargo' cannot judge doc.embargo_until on 3 "
            "document(s): doc.embargo_until of 'e-garbage': '2030-01-01 07:00 ET' is not an ISO date; "
            "doc.embargo_until of 'e-slash': '01/01/2030' is not an ISO date; doc.embargo_until of 'e-epoch': "
            "1893456000 is not an ISO date; the prefilter denies them whenever the rule applies") in output
    assert "rule 'low-risk' cannot judge doc.risk on 1 document(s): doc.risk of 'r-text': 'high' is not a number" in output


# =========================================================================== C. malformed nested paths


NESTED_DOCS = [
    {"_id": "n-ok", "access": {"groups": ["secret-team"]}},
    {"_id": "n-listobj", "access": [{"groups": ["secret-team"]}]},
    {"_id": "n-str", "access": "secret-team"},
    {"_id": "n-public", "access": {"groups": ["public"]}},
    {"_id": "n-none"},
    {"_id": "n-null", "access": None},
    {"_id": "n-nested-list", "access": {"groups": [["secret-team"]]}},
]


def test_nested_access_field_of_the_wrong_shape_is_denied_not_absent(tmp_path):
    pipe = pipeline(tmp_path, NESTED_DOCS, "rules:\n  - {id: acl, action: acl, field: access.groups, public: [public]}\n")
    # before: n-listobj, n-str and n-nested-list counted as "no ACL" and were visible to everyone
    assert visible(pipe) == {"n-public", "n-none", "n-null"}
    assert visible(pipe, groups=("secret-team",)) == {"n-ok", "n-public", "n-none", "n-null"}
    record = access_record(pipe)
    (decision,) = [d for d in record["decisions"] if d["code"] == "rule_error"]
    assert decision["data"]["documents"] == 3
    assert decision["data"]["reasons"] == [
        "doc.access.groups of 'n-listobj': 'access' is a list, not a mapping with 'groups'",
        "doc.access.groups of 'n-str': 'access' is a string, not a mapping with 'groups'",
        "doc.access.groups of 'n-nested-list': holds a list inside the list, not a plain value",
    ]


def test_rules_check_with_an_index_reports_malformed_paths(tmp_path):
    from rules.cli import rules_app

    index = build(tmp_path, NESTED_DOCS)
    rules = tmp_path / "access.yaml"
    rules.write_text("version: 1\nkind: prefilter\nrules:\n  - {id: acl, action: acl, field: access.groups}\n")
    result = runner.invoke(rules_app, ["check", str(rules), "--index", str(index)])
    output = " ".join(result.output.split())
    assert (f"{rules}:4:35 warning: rules.0.field: [undecidable_values] rule 'acl' cannot judge doc.access.groups on 3 "
            "document(s): doc.access.groups of 'n-listobj': 'access' is a list, not a mapping with 'groups'") in output


# =========================================================================== D. misspelt access fields


TYPO = """\
strictness: lenient
rules:
  - id: acl
    action: acl
    field: acls
    public: [public]
"""


def test_misspelt_access_field_refuses_to_start(tmp_path):
    pipe = pipeline(tmp_path, ACL_DOCS, TYPO)
    with pytest.raises(ConfigError) as caught:  # before: started, with a warning in the trace's rule_warnings
        pipe.warm_up()
    (issue,) = caught.value.issues
    assert str(issue).startswith(
        f"{tmp_path / 'access.yaml'}:7:12  rules.0.field: [unknown_access_field] rule 'acl' (acl) reads the field "
        "'acls', which no document of the index has (did you mean 'acl'?); fields of the index: acl. An access rule "
    )
    assert issue.severity == "error"  # whatever the strictness (this file is lenient)


@pytest.mark.parametrize("rule", [
    "{id: places, action: jurisdiction, field: jurisdicton}",
    "{id: window, action: date_range, field: dates, on_or_after: as_of - 1y}",
])
def test_misspelt_jurisdiction_and_date_fields_refuse_to_start(tmp_path, rule):
    docs = [{"_id": "x", "jurisdiction": "US", "date": "2024-01-01"}]
    pipe = pipeline(tmp_path, docs, f"rules:\n  - {rule}\n")
    with pytest.raises(ConfigError) as caught:
        pipe.warm_up()
    assert "[unknown_access_field]" in str(caught.value) and "did you mean" in str(caught.value)


def test_rules_check_fails_on_a_misspelt_access_field_but_not_on_an_override_field(tmp_path):
    from rules.cli import rules_app

    index = build(tmp_path, ACL_DOCS)
    access = tmp_path / "access.yaml"
    access.write_text("version: 1\nkind: prefilter\n" + TYPO, encoding="utf-8")
    result = runner.invoke(rules_app, ["check", str(access), "--index", str(index)])
    assert result.exit_code == 2  # before: 0, with a warning
    assert "did you mean 'acl'?" in result.output
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("version: 1\nkind: override\nrules:\n"
                         "  - {id: b, action: bury, match: {field: doc.acls, op: eq, value: x}}\n", encoding="utf-8")
    result = runner.invoke(rules_app, ["check", str(overrides), "--index", str(index)])
    assert result.exit_code == 0 and "[unknown_field]" in result.output  # still a warning for override rules


# =========================================================================== F. case


def test_access_values_ignore_case_unless_case_sensitive(tmp_path):
    docs = [{"_id": "c-acl", "acl": ["Trial-Investigators"], "jurisdiction": "global"},
            {"_id": "c-us", "acl": ["public"], "jurisdiction": "us"},
            {"_id": "c-global", "acl": ["PUBLIC"], "jurisdiction": "Global"}]
    rules = ("rules:\n  - {id: acl, action: acl, public: [public]%s}\n"
             "  - {id: places, action: jurisdiction%s}\n")
    pipe = pipeline(tmp_path, docs, rules % ("", ""))
    # before: none of them (the access actions compared with case, unlike every other condition)
    assert visible(pipe, groups=("trial-investigators",), jurisdictions=("US",)) == {"c-acl", "c-us", "c-global"}
    (tmp_path / "strict").mkdir()
    exact = pipeline(tmp_path / "strict", docs, rules % (", case_sensitive: true", ", case_sensitive: true"))
    assert visible(exact, groups=("trial-investigators",), jurisdictions=("US",)) == set()
    assert visible(exact, groups=("Trial-Investigators",), jurisdictions=("us",)) == {"c-acl", "c-us"}  # PUBLIC: no


# =========================================================================== G. default_deny


def test_default_deny_is_the_missing_policy_of_every_access_action(tmp_path):
    docs = [{"_id": "g-full", "acl": ["public"], "jurisdiction": "UK", "date": "2024-01-01"},
            {"_id": "g-no-place", "acl": ["public"], "date": "2024-01-01"},
            {"_id": "g-no-date", "acl": ["public"], "jurisdiction": "UK"}]
    rules = ("default_deny: true\nrules:\n  - {id: acl, action: acl, public: [public]}\n"
             "  - {id: places, action: jurisdiction%s}\n  - {id: recent, action: date_range, on_or_after: as_of - 5y%s}\n")
    pipe = pipeline(tmp_path, docs, rules % ("", ""))
    # before: g-no-place and g-no-date were visible (jurisdiction and date_range allowed missing values)
    assert visible(pipe, jurisdictions=("UK",)) == {"g-full"}
    (tmp_path / "own").mkdir()
    own = pipeline(tmp_path / "own", docs, rules % (", missing: allow", ", missing: allow"))
    assert visible(own, jurisdictions=("UK",)) == {"g-full", "g-no-place", "g-no-date"}  # a rule's own word wins


# =========================================================================== H. calendar years and months


@pytest.mark.parametrize("as_of, text, expected", [
    ((2025, 6, 1), "as_of - 15y", (2010, 6, 1)),  # before: 2010-06-05 (15 x 365 days)
    ((2024, 2, 29), "as_of - 1y", (2023, 2, 28)),
    ((2024, 2, 29), "as_of + 4y", (2028, 2, 29)),
    ((2025, 8, 31), "as_of - 6mo", (2025, 2, 28)),
    ((2025, 1, 31), "as_of + 1mo", (2025, 2, 28)),
    ((2025, 6, 1), "as_of - 2w", (2025, 5, 18)),
    ((2025, 6, 1), "as_of - 30d", (2025, 5, 2)),
])
def test_relative_years_and_months_are_calendar_arithmetic(as_of, text, expected):
    leaf = Leaf(Condition(field="doc.date", op="ge", value=text))
    view = QueryView(Query(text="x", as_of=datetime(*as_of, tzinfo=timezone.utc)))
    assert leaf._runtime_operand(view) == datetime(*expected, tzinfo=timezone.utc)


def test_relative_hours_are_exact():
    leaf = Leaf(Condition(field="doc.date", op="ge", value="as_of - 36h"))
    view = QueryView(Query(text="x", as_of=datetime(2025, 6, 1, 12, tzinfo=timezone.utc)))
    assert leaf._runtime_operand(view) == datetime(2025, 5, 31, tzinfo=timezone.utc)


def test_a_retention_window_in_years_keeps_the_anniversary(tmp_path):
    docs = [{"_id": "d-2010-05-31", "date": "2010-05-31"}, {"_id": "d-2010-06-01", "date": "2010-06-01"},
            {"_id": "d-2010-06-04", "date": "2010-06-04"}]
    pipe = pipeline(tmp_path, docs, "rules:\n  - {id: retention, action: date_range, on_or_after: as_of - 15y}\n")
    assert visible(pipe) == {"d-2010-06-01", "d-2010-06-04"}  # before: only d-2010-06-05 and later


def test_the_thousand_year_bound_holds_for_every_unit(write_rules):
    path = write_rules(
        "version: 1\nkind: prefilter\nrules:\n"
        "  - {id: a, action: date_range, on_or_after: as_of - 1000y}\n"        # 4: fine
        "  - {id: b, action: date_range, on_or_after: as_of - 12000mo}\n"      # 5: fine
        "  - {id: c, action: date_range, on_or_after: as_of - 12001mo}\n"      # 6
        "  - {id: d, action: date_range, on_or_after: as_of - 1001y}\n"        # 7
        "  - {id: e, action: date_range, on_or_after: as_of - 8760001h}\n"     # 8
    )
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path)
    assert [str(i).split("  ")[1].split(":")[0] for i in caught.value.issues] == [
        "rules.2.on_or_after", "rules.3.on_or_after", "rules.4.on_or_after"]
    assert "as_of - 12001mo is outside the supported date range" in str(caught.value.issues[0])


# =========================================================================== I. priority in a prefilter


def test_priority_on_a_prefilter_rule_is_refused_with_its_location(write_rules):
    path = write_rules(
        "version: 1\nkind: prefilter\nrules:\n"
        "  - id: restricted\n"                                                 # 4
        "    action: exclude\n"                                                # 5
        "    priority: 100\n"                                                  # 6
        "    match: {field: doc.tickers, op: contains_any, value: [ACME]}\n"   # 7
    )
    with pytest.raises(ConfigError) as caught:  # before: loaded; the priority did nothing
        load_rule_file(path)
    assert [str(i) for i in caught.value.issues] == [
        f"{path}:6:5  rules.0.priority: rule 'restricted': 'priority' has no effect in a prefilter file: a document "
        "must pass every prefilter rule, so no rule outranks another; remove it (priority orders override rules only)"
    ]


def test_bm25_under_access_rules_says_it_counts_what_they_leave(tmp_path):
    """Error-message audit C5: with every document holding the term masked, bm25 said 'only 0 documents hold any
    query term', which sends an analyst debugging access rules looking for a vocabulary problem. It now says it
    counts the documents the rules leave (not how many masked ones hold a term: that would tell the user of
    documents they may not see)."""
    docs = [{"_id": "open", "acl": ["public"], "text": "zebra"},
            {"_id": "staff-1", "acl": ["staff"], "text": "zebra"},
            {"_id": "staff-2", "acl": ["staff"], "text": "zebra"},
            {"_id": "other-1", "text": "giraffe"}, {"_id": "other-2", "text": "okapi"}]
    searching = pipeline(tmp_path, docs, "rules:\n  - {id: acl, action: acl, field: acl, user_field: groups, "
                         "public: [public]}\n")

    def said(groups: list[str]) -> str:
        trace = searching.run(searching.make_query("zebra", user=UserContext(groups=groups), as_of=AS_OF)).trace
        [decision] = [d for d in next(s for s in trace["stages"] if s["id"] == "bm25")["decisions"]
                      if d["code"] == "fewer_matches"]
        return decision["detail"]

    assert said([]) == "only 1 document the access rules leave holds a query term (top_k 5)"
    assert said(["staff"]) == "only 3 documents the access rules leave hold a query term (top_k 5)"


def test_a_mistyped_group_or_jurisdiction_is_said_on_the_command_line(tmp_path):
    """Error-message audit C6: `--jurisdiction usa` where the documents say US hid every US document, with no word
    (a clinician saw 8 documents instead of 15). search and explain now warn of each value of the user's that an
    acl or jurisdiction rule compares and no document holds, with the closest one that is held."""
    from engine.cli import app

    docs = [{"_id": "us-staff", "acl": ["staff"], "jurisdiction": "US"},
            {"_id": "uk-public", "acl": ["public"], "jurisdiction": "UK"}]
    pipeline(tmp_path, docs, "rules:\n"
             "  - {id: acl, action: acl, field: acl, user_field: groups, public: [public]}\n"
             "  - {id: where, action: jurisdiction, field: jurisdiction}\n")
    config = tmp_path / "pipeline.yaml"
    for command in (["search", str(config), "zebra"], ["explain", str(config), "zebra"]):
        mistyped = runner.invoke(app, [*command, "--group", "staf", "--jurisdiction", "usa", "--as-of", "2025-06-01"])
        assert mistyped.exit_code == 0, mistyped.output
        said = " ".join(mistyped.output.split())
        assert ("rule 'acl' (acl): no document's acl holds the user's 'staf' (user.groups), so it grants nothing "
                "(did you mean 'staff'?)") in said, said
        assert "no document's jurisdiction holds the user's 'usa' (user.jurisdictions)" in said
        assert "(did you mean 'US'?)" in said
        right = runner.invoke(app, [*command, "--group", "STAFF", "--jurisdiction", "us", "--as-of", "2025-06-01"])
        assert right.exit_code == 0 and "grants nothing" not in right.output  # compared as the rules compare
