"""What the server's open endpoints tell a caller the pipeline does not trust.

`GET /v1/pipelines` needs no permission. It listed the config's and warm-up's warnings whole, which name restricted
documents and the rules about them ("pins ... both claim position 1 ('med-003' vs 'med-029')") and files on the
server, also for a pipeline that allows nothing beyond results. They are now whole only where the pipeline allows
include_trace (whose traces carry the same); elsewhere each is listed by where it arose and its code. The explain
endpoint's "not in the index" no longer gives the index's path and its size (hidden documents included), nor does a
"never recalled" verdict give the corpus size; `sieve explain`, run by the operator, still does.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

from engine.model import UserContext
from engine.server import WARNINGS_WITHHELD, create_app, load_pipelines

ROOT = Path(__file__).resolve().parents[2]
RESTRICTED = "med-029"  # the investigators-only brochure

OVERRIDES = """version: 1
kind: override
rules:
  - id: pin-fda-alert
    action: pin
    docs: [med-003]
    position: 1
    priority: 10
    when: {field: query.effective, op: contains, value: metformin}
  - id: pin-sema-brochure
    action: pin
    docs: [med-029]
    position: 1
    when: {field: query.effective, op: contains, value: SEMA-CARD-205}
  - id: boost-by-sorce
    action: boost
    factor: 2
    match: {field: doc.sorce, op: eq, value: fda}
"""

PIPELINE = """version: 1
name: {name}
index: {index}
stages:
  - {{id: access, type: rules.prefilter, params: {{rules: access.yaml}}}}
  - {{id: bm25, type: recall.bm25, inputs: [access], params: {{top_k: 5}}}}
  - {{id: overrides, type: rules.override, inputs: [bm25], params: {{rules: overrides.yaml}}}}
output: overrides
trace: {{log: null}}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(test client, its pipelines) over the medical corpus: 'closed' allows nothing beyond results, 'open' allows
    include_trace and explain."""
    from starlette.testclient import TestClient

    from engine.index import build_index

    directory = tmp_path_factory.mktemp("disclosure")
    index = directory / "medical-index"
    build_index(ROOT / "examples" / "medical", index, {"bm25": {}})
    shutil.copy(ROOT / "configs" / "medical" / "access.yaml", directory / "access.yaml")
    (directory / "overrides.yaml").write_text(OVERRIDES, encoding="utf-8")
    closed = directory / "closed.yaml"
    closed.write_text(PIPELINE.format(name="closed", index=index), encoding="utf-8")
    opened = directory / "open.yaml"
    opened.write_text(PIPELINE.format(name="open", index=index) + "server: {include_trace: true, explain: true}\n",
                      encoding="utf-8")
    pipelines = load_pipelines([closed, opened])
    return TestClient(create_app(pipelines)), pipelines, directory


def _listed(client) -> dict[str, dict]:
    response = client.get("/v1/pipelines")
    assert response.status_code == 200, response.text
    return {p["name"]: p for p in response.json()["pipelines"]}


def test_a_pipeline_that_allows_nothing_lists_its_warnings_by_kind_naming_no_document_rule_or_file(served):
    client, pipelines, directory = served
    closed = _listed(client)["closed"]
    whole = pipelines["closed"]
    # the fixture has what the audit saw: a pin conflict naming the restricted document, a rule reading no field
    assert any(RESTRICTED in w and "pin_slot_conflict" in w for w in whole.warnings), whole.warnings
    assert any("doc.sorce" in w for w in whole.warnings) and whole.compiled.warnings
    listed = closed["warnings"] + closed["config_warnings"]
    said = json.dumps(listed)
    for secret in (RESTRICTED, "med-003", "pin-sema-brochure", "pin-fda-alert", "boost-by-sorce", "doc.sorce",
                   str(directory), "overrides.yaml", "closed.yaml"):
        assert secret not in said, (secret, listed)
    # as many as there are, each by where it arose and its code
    assert len(closed["warnings"]) == len(whole.warnings) and len(closed["config_warnings"]) == len(
        whole.compiled.warnings)
    assert "stage 'overrides': [pin_slot_conflict]" in closed["warnings"]
    assert all(w.startswith("stage 'overrides'") for w in closed["warnings"])
    assert all(w.startswith("stages.2.params.rules") for w in closed["config_warnings"])
    assert closed["warnings_withheld"] == WARNINGS_WITHHELD and "include_trace" in WARNINGS_WITHHELD


def test_a_pipeline_whose_traces_carry_them_lists_its_warnings_whole(served):
    client, pipelines, _ = served
    opened = _listed(client)["open"]
    assert opened["warnings"] == pipelines["open"].warnings
    assert opened["config_warnings"] == [str(issue) for issue in pipelines["open"].compiled.warnings]
    assert any(RESTRICTED in w for w in opened["warnings"]) and "warnings_withheld" not in opened
    # what a trace of this pipeline returns anyway
    traced = client.post("/v1/pipelines/open/search", json={"query": "metformin", "include_trace": True}).json()
    assert traced["trace"]["warnings"] == opened["warnings"]


def test_explain_over_http_gives_neither_the_index_path_nor_the_corpus_size(served):
    client, pipelines, directory = served
    index = pipelines["open"].resources.index
    response = client.post("/v1/pipelines/open/explain", json={
        "query": "metformin kidney function", "doc_ids": ["no-such-doc", "med-012"], "top": 0})
    assert response.status_code == 200, response.text
    verdicts = {v["doc_id"]: v for v in response.json()["why_not"]}
    assert verdicts["no-such-doc"]["status"] == "not_in_index"
    assert verdicts["no-such-doc"]["message"] == "'no-such-doc' is not in the index"
    said = json.dumps(response.json())
    assert str(index.path) not in said and str(directory) not in said
    assert verdicts["med-012"]["status"] == "not_recalled", verdicts["med-012"]
    assert all("corpus" not in (probe or {}) for probe in verdicts["med-012"]["details"]["probes"].values())


def test_the_operators_own_explain_still_names_the_index_and_its_size(served):
    from engine.workbench.inspect import why_not

    _, pipelines, _ = served
    pipeline = pipelines["open"]
    query = pipeline.make_query("metformin kidney function", user=UserContext(),
                                as_of=datetime(2025, 6, 1, tzinfo=timezone.utc))
    result = pipeline.run(query, keep_outcomes=True)
    index = pipeline.resources.index
    missing = why_not(pipeline, result, "no-such-doc")
    assert missing.message == f"'no-such-doc' is not in the index ({index.path}, {index.doc_count} documents)"
    unrecalled = why_not(pipeline, result, "med-012")
    assert unrecalled.status == "not_recalled"
    assert [probe["corpus"] for probe in unrecalled.details["probes"].values()] == [index.doc_count]
