"""An expression that fails quotes what it failed on, and that may be the query: a lookup table keyed by the query
(`{'aapl': 1}[query.text | lower]`) fails with the text in its message. Under `include_query_text: false` no such
message reaches the trace or the hash-chained log: a stage's `when`, a rule's `when`, a rule's match on documents
(audit F1). Real pipelines over the SciFact-slice BM25 index."""

from __future__ import annotations

import json

from engine.pipeline import Pipeline
from rules.conditions import Condition, compile_condition

SECRET = "is metformin safe for Jane Doe SSN 123-45-6789"
LOOKUP = "{'aapl': 1}[query.text | lower]"  # fails on every query but aapl: the text is the missing key

PIPELINE = """\
version: 1
index: {index}
stages:
  - id: access
    type: rules.prefilter
    params: {{rules: access.yaml}}
  - id: bm25
    type: recall.bm25
    inputs: [access]
    params: {{top_k: 20}}
  - id: short
    type: select.top_k
    inputs: [bm25]
    params: {{k: 5}}
    when: {{expr: "{lookup} > 0"}}
  - id: overrides
    type: rules.override
    inputs: [short]
    params: {{rules: overrides.yaml}}
output: overrides
trace: {{log: null, include_query_text: {text}}}
"""


def run(bm25_index, write_config, tmp_path, text: bool):
    (tmp_path / "access.yaml").write_text(
        "version: 1\nkind: prefilter\nrules:\n"
        f"  - {{id: keyed, action: exclude, when: {{expr: \"{LOOKUP} > 0\"}}, "
        "match: {field: doc.id, op: eq, value: nothing}}\n", encoding="utf-8")
    (tmp_path / "overrides.yaml").write_text(
        "version: 1\nkind: override\nrules:\n"
        f"  - {{id: per-document, action: bury, match: {{expr: \"{{'a': 1}}[query.text ~ doc.id] > 0\"}}}}\n"
        f"  - {{id: keyed, action: bury, when: {{expr: \"{LOOKUP} > 0\"}}, match: {{field: doc.id, op: eq, "
        "value: x}}\n", encoding="utf-8")
    path = write_config(PIPELINE.format(index=bm25_index, lookup=LOOKUP, text=str(text).lower()))
    return Pipeline.from_file(path).search(SECRET, log=False)


def test_a_failing_expression_quotes_no_query_text_in_a_trace_without_it(bm25_index, write_config, tmp_path):
    result = run(bm25_index, write_config, tmp_path, text=False)
    stages = {s["id"]: s for s in result.trace["stages"]}
    assert stages["short"]["when"]["holds"] is None  # could not be judged: the stage ran
    assert stages["short"]["when"]["error"].startswith("UndefinedError (the message is withheld: it may quote the "
                                                       "query, and include_query_text is false)")
    decisions = [d["detail"] for s in ("access", "overrides") for d in stages[s]["decisions"]
                 if d["code"] == "rule_error"]
    assert len(decisions) == 3  # the prefilter's `when`, the override's `when`, the override's match per document
    assert all("UndefinedError (the message is withheld" in reason for reason in decisions), decisions
    written = json.dumps(result.trace, ensure_ascii=False).lower()
    assert "metformin" not in written and "123-45-6789" not in written and "jane" not in written


def test_with_query_text_the_message_says_what_failed(bm25_index, write_config, tmp_path):
    result = run(bm25_index, write_config, tmp_path, text=True)
    error = next(s for s in result.trace["stages"] if s["id"] == "short")["when"]["error"]
    assert error.startswith("UndefinedError: ") and SECRET.lower() in error


def test_a_type_mismatch_names_the_query_field_it_compared_with_not_its_value():
    """`{field: doc.n, op: eq, value_from: query.text}` on a document whose n is a number: the reason names
    query.text rather than quoting it (the trace has the query where it may)."""
    node = compile_condition(Condition.model_validate({"field": "doc.n", "op": "eq", "value_from": "query.text"}),
                             "document")
    reason = node.type_mismatch(5, SECRET)
    assert reason == "5 is a number, and the rule compares with a string (query.text): no value is coerced"
