"""Findings of the rule-type audit, each on a small real corpus through a real pipeline.

1. An ``eq`` / ``in`` / ``ne`` test meeting a document value of another JSON type than the rule's
   (``"true"`` for ``true``, ``"40"`` for ``40``) cannot judge it: a prefilter denies the document
   (fail closed) and traces it as undecidable, an override rule does not fire on it; nothing is
   coerced; ``rules check --index`` and the warm-up warn of the mixed types.
2. A field no document has is an error in every prefilter rule (with a did-you-mean, at the
   test's ``file:line``) and a warning, with a did-you-mean, in an override rule.
3. ``contains`` finds substrings in a string and whole elements in a list: a field that is a list
   on some documents and a string on others is a warning, which names ``in`` (whole values whatever
   the shape).

Each test says what happened before the fix ("before:").
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.compiler import compile_file
from engine.errors import ConfigError
from engine.model import Query, UserContext
from engine.pipeline import Pipeline
from rules.conditions import Condition, Leaf, QueryView, Subject

ROOT = Path(__file__).resolve().parents[2]
AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)
runner = CliRunner()


def build(tmp_path: Path, docs: list[dict]) -> Path:
    """A BM25 index of ``docs`` (each gets the text 'zebra' unless it has one)."""
    from engine.index import build_index

    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({"title": doc["_id"], "text": "zebra", **doc}) + "\n")
    build_index(corpus, tmp_path / "index", {"bm25": {}})
    return tmp_path / "index"


def pipeline(tmp_path: Path, docs: list[dict], *, access: str | None = None, overrides: str | None = None) -> Pipeline:
    """[access prefilter ->] bm25 [-> overrides] over ``docs``; the rule files are given after their version/kind."""
    index = build(tmp_path, docs)
    stages, inputs, last = [], "", "bm25"
    if access is not None:
        (tmp_path / "access.yaml").write_text("version: 1\nkind: prefilter\n" + access, encoding="utf-8")
        stages.append("  - {id: access, type: rules.prefilter, params: {rules: access.yaml}}")
        inputs = "access"
    stages.append(f"  - {{id: bm25, type: recall.bm25, inputs: [{inputs}], params: {{top_k: 50}}}}")
    if overrides is not None:
        (tmp_path / "overrides.yaml").write_text("version: 1\nkind: override\n" + overrides, encoding="utf-8")
        stages.append("  - {id: rules, type: rules.override, inputs: [bm25], params: {rules: overrides.yaml}}")
        last = "rules"
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"version: 1\nindex: {index}\nstages:\n" + "\n".join(stages) +
                      f"\noutput: {last}\ntrace: {{log: null}}\n", encoding="utf-8")
    return Pipeline(compile_file(config))


def search(pipe: Pipeline, **user):
    return pipe.run(pipe.make_query("zebra", user=UserContext(**user), as_of=AS_OF))


def visible(pipe: Pipeline, **user) -> set[str]:
    return {c.doc_id for c in search(pipe, **user).results}


def record(result, stage_id: str) -> dict:
    return next(s for s in result.trace["stages"] if s["id"] == stage_id)


def check(rules: Path, index: Path):
    from rules.cli import rules_app

    result = runner.invoke(rules_app, ["check", str(rules), "--index", str(index)])
    return result, " ".join(result.output.split())


# =========================================================================== 1. type mismatches


TYPED_DOCS = [
    {"_id": "w-true", "withdrawn": True, "page_count": 40},
    {"_id": "w-string", "withdrawn": "true", "page_count": "40"},
    {"_id": "w-false", "withdrawn": False, "page_count": 12},
    {"_id": "w-one", "withdrawn": 1, "page_count": True},
    {"_id": "w-none"},
]
WITHDRAWN = """\
rules:
  - id: withdrawn
    action: exclude
    match: {field: doc.withdrawn, op: eq, value: true}
"""


def test_an_exclude_on_a_value_of_another_type_denies_it_and_traces_it(tmp_path):
    pipe = pipeline(tmp_path, TYPED_DOCS, access=WITHDRAWN)
    # before: w-string ("true") and w-one (1) were returned, and the trace said the rule applied, nothing more
    assert visible(pipe) == {"w-false", "w-none"}
    access = record(search(pipe), "access")
    (rule,) = access["details"]["rules"]
    assert rule["status"] == "applied" and rule["excluded"] == 3 and rule["undecidable"] == 2
    (decision,) = [d for d in access["decisions"] if d["code"] == "rule_error"]
    assert decision["data"]["documents"] == 2
    assert decision["data"]["reasons"] == [
        "doc.withdrawn of 'w-string': 'true' is a string, and the rule compares with true/false (true): no value is "
        "coerced",
        "doc.withdrawn of 'w-one': 1 is a number, and the rule compares with true/false (true): no value is coerced",
    ]
    assert "they are denied (access rules fail closed)" in decision["detail"]


@pytest.mark.parametrize("match, shown", [
    ("{field: doc.page_count, op: eq, value: 40}", {"w-false", "w-none"}),
    ("{field: doc.page_count, op: in, value: [40, 41]}", {"w-false", "w-none"}),
    # ne: '40' is not certainly different from 40 either; the same documents go (w-none too: a missing value is
    # not 40), but as undecidable, not as "not 40" (before: no undecidable count, no rule_error)
    ("{field: doc.page_count, op: ne, value: 40}", {"w-true"}),
    ("{field: doc.page_count, op: not_in, value: [40]}", {"w-true"}),
])
def test_eq_in_ne_and_not_in_deny_what_they_cannot_judge(tmp_path, match, shown):
    pipe = pipeline(tmp_path, TYPED_DOCS, access=f"rules:\n  - {{id: pages, action: exclude, match: {match}}}\n")
    assert visible(pipe) == shown  # before (eq, in): w-string ('40') and w-one (true) were returned
    (rule,) = record(search(pipe), "access")["details"]["rules"]
    assert rule["undecidable"] == 2


def test_nothing_is_coerced_for_an_include_either(tmp_path):
    pipe = pipeline(tmp_path, TYPED_DOCS, access="rules:\n  - {id: long, action: include, "
                                                  "match: {field: doc.page_count, op: eq, value: 40}}\n")
    assert visible(pipe) == {"w-true"}  # '40' is not 40: not let in, and counted as undecidable
    (rule,) = record(search(pipe), "access")["details"]["rules"]
    assert rule["undecidable"] == 2


CLEARANCE_DOCS = [{"_id": "c-3", "clearance": 3}, {"_id": "c-str", "clearance": "3"}, {"_id": "c-1", "clearance": "1"}]
CLEARED = ("rules:\n  - {id: cleared, action: include, match: "
           "{field: doc.clearance, op: eq, value_from: user.attributes.level}}\n")


def test_a_value_from_of_another_type_is_undecidable(tmp_path):
    pipe = pipeline(tmp_path, CLEARANCE_DOCS, access=CLEARED)
    assert visible(pipe, attributes={"level": "3"}) == {"c-str"}  # a user's attributes are text: 3 is not '3'
    (rule,) = record(search(pipe, attributes={"level": "3"}), "access")["details"]["rules"]
    assert rule["undecidable"] == 1  # c-3 (before: not counted); c-1 is a string: decided, not '3'


def test_the_leaf_does_not_hold_on_a_value_of_another_type_negated_or_not():
    subject = Subject(QueryView(Query(text="x", as_of=AS_OF)), _Doc({"withdrawn": "true"}))
    for op in ("eq", "ne"):
        leaf = Leaf(Condition(field="doc.withdrawn", op=op, value=True))
        assert leaf.evaluate(subject) is False  # before: ne held ('true' != true)
    same = Subject(QueryView(Query(text="x", as_of=AS_OF)), _Doc({"withdrawn": True}))
    assert Leaf(Condition(field="doc.withdrawn", op="eq", value=True)).evaluate(same) is True
    listed = Subject(QueryView(Query(text="x", as_of=AS_OF)), _Doc({"withdrawn": ["true", True]}))
    assert Leaf(Condition(field="doc.withdrawn", op="eq", value=True)).evaluate(listed) is True  # a match decides


class _Doc:
    doc_id, title, text = "d", "", ""

    def __init__(self, metadata: dict):
        self.metadata = metadata


OVERRIDE_DOCS = [{"_id": "o-bool", "featured": True}, {"_id": "o-string", "featured": "true"},
                 {"_id": "o-false", "featured": False}]


@pytest.mark.parametrize("match, fired", [
    ("{field: doc.featured, op: eq, value: true}", {"o-bool"}),
    ("{field: doc.featured, op: ne, value: true}", {"o-false"}),  # before: o-string too ('true' != true)
    ("{not: {field: doc.featured, op: eq, value: true}}", {"o-false"}),  # before: o-string too
])
def test_an_override_rule_does_not_fire_on_a_value_of_another_type(tmp_path, match, fired):
    pipe = pipeline(tmp_path, OVERRIDE_DOCS, overrides=f"rules:\n  - {{id: lift, action: boost, factor: 2, "
                                                       f"match: {match}}}\n")
    rules = record(search(pipe), "rules")
    assert {f["doc_id"] for f in rules["details"]["firings"]} == fired
    (decision,) = [d for d in rules["decisions"] if d["code"] == "rule_error"]
    assert decision["data"]["doc_ids"] == ["o-string"]
    assert "'true' is a string, and the rule compares with true/false (true)" in decision["detail"]
    assert "it does not fire on them" in decision["detail"]


def test_rules_check_and_warm_up_warn_of_mixed_types(tmp_path):
    index = build(tmp_path, TYPED_DOCS)
    rules = tmp_path / "access.yaml"
    rules.write_text("version: 1\nkind: prefilter\n" + WITHDRAWN, encoding="utf-8")
    result, output = check(rules, index)
    # before: "✓ access.yaml: 1 prefilter rules" and nothing else
    assert result.exit_code == 0, output
    assert (f"{rules}:6:20 warning: rules.0.match.field: [mixed_types] rule 'withdrawn' compares doc.withdrawn (eq) "
            "with true (true/false), but documents hold other types there: 1 a number (e.g. 'w-one': 1), 1 a string "
            "(e.g. 'w-string': 'true'); 2 hold true/false. Values are not coerced ('40' is not 40, 'true' is not "
            "true): a document whose value has another type than the rule's cannot be judged: the prefilter denies "
            "such a document whenever the rule applies; write doc.withdrawn as true/false on every document (or "
            "compare with the type the documents hold)") in output
    pipe = pipeline(tmp_path / "run", TYPED_DOCS, access=WITHDRAWN)
    pipe.warm_up()
    (warning,) = pipe.warnings
    assert warning.startswith(f"stage 'access': {tmp_path / 'run' / 'access.yaml'}:6:20  warning: ")
    assert "[mixed_types] rule 'withdrawn' compares doc.withdrawn" in warning
    strict = pipeline(tmp_path / "strict", TYPED_DOCS, access="strictness: strict\n" + WITHDRAWN)
    with pytest.raises(ConfigError, match=r"\[mixed_types\]"):
        strict.warm_up()


def test_a_value_from_on_numbers_is_a_warning_too(tmp_path):
    index = build(tmp_path, CLEARANCE_DOCS)
    rules = tmp_path / "access.yaml"
    rules.write_text("version: 1\nkind: prefilter\n" + CLEARED, encoding="utf-8")
    result, output = check(rules, index)
    assert result.exit_code == 0
    assert ("[mixed_types] rule 'cleared' compares doc.clearance (eq) with the query's user.attributes.level "
            "(a string: the query's and the user's values are text), but documents hold other types there: 1 a number (e.g. "
            "'c-3': 3); 2 hold a string.") in output


# =========================================================================== 2. unknown fields


def test_a_misspelt_field_in_an_exclude_refuses_to_start_whatever_the_strictness(tmp_path):
    typo = ("strictness: lenient\nrules:\n  - id: withdrawn\n    action: exclude\n"
            "    match: {field: doc.withdrawm, op: eq, value: true}\n")
    pipe = pipeline(tmp_path, TYPED_DOCS, access=typo)
    with pytest.raises(ConfigError) as caught:  # before: started; the exclude hid nothing, with a warning
        pipe.warm_up()
    (issue,) = caught.value.issues
    assert issue.severity == "error"
    assert str(issue).startswith(
        f"{tmp_path / 'access.yaml'}:7:20  rules.0.match.field: [unknown_access_field] rule 'withdrawn' (exclude) "
        "reads 'doc.withdrawm', which no document of the index has (did you mean 'doc.withdrawn'?); metadata fields: "
        "page_count, withdrawn. An access rule on a field no document has judges every document as lacking it"
    )


def test_a_misspelt_field_in_the_shipped_restricted_list_fails_rules_check(tmp_path):
    index = build(tmp_path, [json.loads(line) for line in
                             (ROOT / "examples" / "finance" / "corpus.jsonl").read_text().splitlines()])
    shipped = ROOT / "configs" / "finance" / "access.yaml"
    result, output = check(shipped, index)
    assert result.exit_code == 0, output  # the file as shipped passes, under its strictness: strict
    typo = tmp_path / "access.yaml"
    shutil.copy(shipped, typo)
    text = typo.read_text(encoding="utf-8")
    assert text.count("doc.tickers") == 1
    typo.write_text(text.replace("doc.tickers", "doc.tikcers"), encoding="utf-8")
    result, output = check(typo, index)
    assert result.exit_code == 2  # before: 2 as well, but only because the file is strict (lenient: 0)
    assert "[unknown_access_field] rule 'restricted-list' (exclude) reads 'doc.tikcers'" in output
    assert "(did you mean 'doc.tickers'?)" in output
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text(typo.read_text(encoding="utf-8").replace("strictness: strict", "strictness: lenient"),
                       encoding="utf-8")
    result, output = check(lenient, index)
    assert result.exit_code == 2, output  # before: 0, with a warning


def test_a_misspelt_field_in_an_override_rule_is_a_warning_with_a_did_you_mean(tmp_path):
    docs = [{"_id": "s-1", "source": "sec"}, {"_id": "s-2", "source": "fca"}]
    bury = "rules:\n  - id: bury-fca\n    action: bury\n    match: {field: doc.sorce, op: eq, value: fca}\n"
    pipe = pipeline(tmp_path, docs, overrides=bury)
    pipe.warm_up()  # overrides fail open by design: it starts
    (warning,) = pipe.warnings
    # before: "... rules.0.match: [unknown_field] rule 'bury-fca' reads 'doc.sorce', which no document in the index
    # has (metadata fields: source); ..." at the line of `match`, with no hint
    assert warning.startswith(
        f"stage 'rules': {tmp_path / 'overrides.yaml'}:6:20  warning: rules.0.match.field: [unknown_field] rule "
        "'bury-fca' reads 'doc.sorce', which no document in the index has (did you mean 'doc.source'?)"
    )
    index = build(tmp_path / "check", docs)
    result, output = check(tmp_path / "overrides.yaml", index)
    assert result.exit_code == 0 and "(did you mean 'doc.source'?)" in output


def test_a_misspelt_nested_field_in_a_prefilter_rule_is_an_error(tmp_path):
    docs = [{"_id": "n-1", "access": {"level": "internal"}}]
    pipe = pipeline(tmp_path, docs, access="rules:\n  - {id: internal, action: include, match: "
                                           "{any: [{field: doc.title, op: eq, value: x}, "
                                           "{field: doc.access.levle, op: eq, value: internal}]}}\n")
    with pytest.raises(ConfigError) as caught:
        pipe.warm_up()
    (issue,) = [i for i in caught.value.issues if i.severity == "error"]
    assert issue.path == "rules.0.match.any.1.field"
    assert ("reads 'doc.access.levle', which no document of the index has (did you mean 'doc.access.level'?)"
            in str(issue))


# =========================================================================== 3. mixed shapes under contains


TICKER_DOCS = [
    {"_id": "t-acme", "tickers": ["ACME"]},
    {"_id": "t-all", "tickers": ["ALL", "NOVA"]},
    {"_id": "t-ball", "tickers": "BALL"},
    {"_id": "t-none", "tickers": []},
]


def test_contains_on_a_field_both_list_and_string_is_a_warning(tmp_path):
    restricted = "rules:\n  - id: restricted\n    action: exclude\n" \
                 "    match: {field: doc.tickers, op: contains_any, value: [ALL]}\n"
    pipe = pipeline(tmp_path, TICKER_DOCS, access=restricted)
    pipe.warm_up()
    (warning,) = pipe.warnings  # before: none, and Ball Corp was hidden by the restricted-list rule on Allstate
    assert "[mixed_shapes] rule 'restricted' tests doc.tickers with contains_any" in warning
    assert ("the documents mix the two: 3 hold a list (e.g. 't-acme'), 1 a string (e.g. 't-ball': 'BALL')"
            in warning)
    assert "on a string a value is also found inside a longer one ('all' is found in 'BALL')" in warning
    assert "use op: in (a string is one value, a list matches by any element)" in warning
    assert warning.startswith(f"stage 'access': {tmp_path / 'access.yaml'}:6:20  warning: rules.0.match.field: ")
    assert visible(pipe) == {"t-acme", "t-none"}  # what it warns of: t-ball is hidden ('ALL' in 'BALL')


def test_in_compares_whole_values_whatever_the_shape(tmp_path):
    restricted = "rules:\n  - {id: restricted, action: exclude, match: {field: doc.tickers, op: in, value: [ALL]}}\n"
    pipe = pipeline(tmp_path, TICKER_DOCS, access=restricted)
    pipe.warm_up()
    assert pipe.warnings == []
    assert visible(pipe) == {"t-acme", "t-ball", "t-none"}
    index = build(tmp_path / "check", TICKER_DOCS)
    result, output = check(tmp_path / "access.yaml", index)
    assert result.exit_code == 0 and "warning" not in output


@pytest.mark.parametrize("op, value", [("in", [1]), ("contains", 1), ("contains_any", [1, 2])])
def test_true_is_not_one_for_in_and_contains_either(op, value):
    subject = Subject(QueryView(Query(text="x", as_of=AS_OF)), _Doc({"flags": [True]}))
    leaf = Leaf(Condition(field="doc.flags", op=op, value=value))
    # before: true was found in [1] (Python's True == 1), unlike eq, which already told them apart
    assert leaf.test_value([True], leaf.literal)[0] is False
    assert leaf.evaluate(subject) is False
    assert leaf.type_mismatch([True], leaf.literal) is not None
    assert Leaf(Condition(field="doc.flags", op=op, value=value)).test_value([1], leaf.literal)[0] is True


def test_an_exclude_that_cannot_judge_a_pinned_document_is_reported_as_such(tmp_path):
    """At run time the stage keeps a pinned document out when an exclude cannot judge it; the check says so."""
    from engine.index import Index
    from rules.conflicts import check_against_corpus
    from rules.corpus import DocumentTable
    from rules.ruleset import load_rule_file

    index = build(tmp_path, OVERRIDE_DOCS)
    rules = tmp_path / "overrides.yaml"
    rules.write_text("version: 1\nkind: override\nrules:\n"
                     "  - {id: pin-it, action: pin, docs: [o-string], position: 1}\n"
                     "  - {id: drop-featured, action: exclude, match: {field: doc.featured, op: ne, value: false}}\n",
                     encoding="utf-8")
    issues = check_against_corpus(load_rule_file(rules), DocumentTable.from_index(Index.open(index)))
    # before: an error, "'drop-featured' matches 'o-string' ... exclude wins" ('true' != false held)
    assert any("[pin_exclude_conflict] 'drop-featured' cannot be evaluated on 'o-string', which 'pin-it' pins "
               "(doc.featured of 'o-string': 'true' is a string, and the rule compares with true/false (false)"
               in i.message for i in issues)
    assert all(i.severity == "warning" for i in issues)
