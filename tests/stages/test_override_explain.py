"""An override stage's explanation names the boosts its run applied, not the rules judged again per document.

A rule that cannot judge a document (a string date compared with a number, under `not:`) does not fire on it in
the run; judged again alone for the explanation, it had been listed as "x2 (boost rule ...)" in the trace of a
score it never moved."""

from __future__ import annotations

from engine.pipeline import Pipeline

RULES = """\
version: 1
kind: override
rules:
  - id: boost-not-2022
    action: boost
    factor: 2
    match:
      not: {field: doc.date, op: eq, value: 2022}
  - id: boost-fda
    action: boost
    factor: 1.5
    match: {field: doc.source, op: eq, value: fda}
"""


def test_the_explanation_lists_only_the_boosts_the_run_applied(medical_bm25, write_config, tmp_path):
    (tmp_path / "overrides.yaml").write_text(RULES, encoding="utf-8")
    pipeline = Pipeline.from_file(write_config(f"""version: 1
index: {medical_bm25}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 10}}}}
  - {{id: overrides, type: rules.override, inputs: [bm25], params: {{rules: overrides.yaml}}}}
output: overrides
trace: {{log: null}}
"""))
    result = pipeline.search("metformin kidney", log=False)
    stage = next(s for s in result.trace["stages"] if s["id"] == "overrides")
    assert "boost-not-2022" not in stage["details"]["fired_rules"]  # it could judge no document: it never fired
    documents = pipeline.resources.index.documents.get([c.row for c in result.results])
    sources = {c.doc_id: documents[c.row].metadata.get("source") for c in result.results}
    assert "fda" in sources.values()  # the query reaches a document the other rule does boost
    for record in result.trace["results"]:
        named = " ".join(d["description"] for d in record["explanation"]["details"][-1]["details"])
        assert "boost-not-2022" not in named, record["doc_id"]
        assert ("boost-fda" in named) == (sources[record["doc_id"]] == "fda"), record["doc_id"]
