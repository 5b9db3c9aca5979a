"""The explanation trees a trace holds, pinned to what the straightforward code makes: the root over each ledger
entry's stage tree (``Pipeline.explain``), every node as ``{value, description, details}`` (``to_dict``).

``Pipeline._explainer`` looks the stages up once per query, the trace makes the root as a dict directly,
``explanation_dicts`` makes the dicts with a call per inner node only and ``Explanation.__init__`` fills the instance
dict itself (bench/explain_build.py): the reference below is the code before that, and the trees and their JSON
(key order included) must be the same, byte for byte, over a pipeline of several stage types, with and without the
query's text in the trace."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from bench.explain_build import PreChangePipeline, same
from engine.model import Candidate, ScoreEntry
from engine.pipeline import Pipeline, StageOutcome
from engine.stage import Explanation, explanation_dicts

AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)
MEDICAL = Path(__file__).resolve().parents[2] / "examples" / "medical"

RULES = """\
version: 1
kind: override
rules:
  - id: pin-kidney-review
    action: pin
    docs: [med-030]
    position: 2
  - id: boost-fda
    action: boost
    factor: 1.5
    match: {field: doc.source, op: eq, value: fda}
  - id: demote-superseded
    action: demote
    factor: 0.5
    match: {field: doc.status, op: eq, value: superseded}
"""

# recall twice (as asked, and top 10 of it), fused by rank, a recency signal, a weighted blend of the two, override
# rules (a pin, a boost, a demotion), a score floor: the root has several stage trees below it, nested ones too
CONFIG = """version: 1
index: {index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: bm25_top, type: recall.bm25, params: {{top_k: 10, query: original}}}}
  - {{id: rrf, type: fuse.rrf, inputs: [bm25, bm25_top], params: {{k: 60}}}}
  - {{id: recent, type: boost.recency, inputs: [rrf], params: {{half_life_days: 730}}}}
  - {{id: blend, type: fuse.weighted, inputs: [recent], params: {{weights: {{rrf: 1.0, recent: 0.25}}}}}}
  - {{id: overrides, type: rules.override, inputs: [blend], params: {{rules: overrides.yaml}}}}
  - {{id: floor, type: select.threshold, inputs: [overrides], params: {{min_score: 0.05, normalize: max}}}}
output: floor
trace: {{log: null, include_query_text: {text}}}
"""

QUERIES = ["metformin kidney function", "metformin in pregnancy", "asthma inhaled corticosteroids children",
           "semaglutide cardiovascular outcomes", "no word of this is in any document"]


# ---------------------------------------------------------------- the reference: the code before the change


def reference_explain(pipeline: Pipeline, candidate: Candidate, outcomes: dict[str, StageOutcome]) -> Explanation:
    """``Pipeline.explain`` before the change: the bench keeps that code, frozen, as its baseline."""
    return PreChangePipeline.explain(pipeline, candidate, outcomes)  # type: ignore[arg-type]


def reference_dict(node: Explanation) -> dict[str, Any]:
    return {"value": node.value, "description": node.description,
            "details": [reference_dict(d) for d in node.details]}


# ---------------------------------------------------------------- the trace's trees


@pytest.fixture(scope="module")
def medical_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.index import build_index

    out = tmp_path_factory.mktemp("indexes") / "medical"
    build_index(MEDICAL, out, {"bm25": {}})
    return out


def _pipeline(index: Path, directory: Path, text: bool) -> Pipeline:
    (directory / "overrides.yaml").write_text(RULES, encoding="utf-8")
    config = directory / f"pipeline-{text}.yaml"
    config.write_text(CONFIG.format(index=index, text=str(text).lower()), encoding="utf-8")
    return Pipeline.from_file(config)


@pytest.mark.parametrize("text", [True, False], ids=["query-text", "no-query-text"])
def test_the_traces_trees_are_the_reference_trees_byte_for_byte(medical_index, tmp_path, text):
    pipeline = _pipeline(medical_index, tmp_path, text)
    seen_types: set[str] = set()
    pinned = nested = 0
    for query_text in QUERIES:
        run = pipeline.run(pipeline.make_query(query_text, as_of=AS_OF), keep_outcomes=True)
        outcomes = run.outcomes
        assert outcomes is not None
        records = run.trace["results"]
        assert len(records) == len(run.results)
        for record, candidate in zip(records, run.results):
            expected = reference_explain(pipeline, candidate, outcomes)
            tree = pipeline.explain(candidate, outcomes)
            assert tree == expected and type(tree.details) is tuple
            assert same(record["explanation"], reference_dict(expected)), (query_text, candidate.doc_id)
            assert same(tree.to_dict(), reference_dict(expected))
            assert list(record) == ["rank", "doc_id", "score", "ledger", "explanation"]
            seen_types.update(pipeline.compiled.stages[e.stage].type_name for e in candidate.ledger)
            pinned += "pin" in json.dumps(record["explanation"])
            nested += any(d["details"] and any(dd["details"] for dd in d["details"])
                          for d in record["explanation"]["details"])
        assert same(explanation_dicts([pipeline.explain(c, outcomes) for c in run.results]),
                    [r["explanation"] for r in records])
    # every stage type that scores scored some document shown (the floor only drops), a pinned one too, and some
    # trees are three levels deep
    assert seen_types == {"recall.bm25", "fuse.rrf", "boost.recency", "fuse.weighted", "rules.override"}
    assert pinned and nested


def test_a_ledger_entry_of_no_stage_or_no_outcome_and_an_empty_ledger(medical_index, tmp_path):
    """Entries whose stage is not in the pipeline, or did not run, add no tree; an unscored candidate's root."""
    pipeline = _pipeline(medical_index, tmp_path, True)
    run = pipeline.run(pipeline.make_query("metformin kidney function", as_of=AS_OF), keep_outcomes=True)
    outcomes = run.outcomes
    assert outcomes is not None
    first = run.results[0]
    stranger = Candidate(first.doc_id, first.row, first.ledger + (ScoreEntry("elsewhere", "x", 0.5, 1),))
    without_rrf = {sid: outcome for sid, outcome in outcomes.items() if sid != "rrf"}
    unscored = Candidate("med-001", 0)
    for candidate, given in ((stranger, outcomes), (first, without_rrf), (unscored, outcomes)):
        expected = reference_explain(pipeline, candidate, given)
        assert pipeline.explain(candidate, given) == expected
        assert same(pipeline.explain(candidate, given).to_dict(), reference_dict(expected))
    assert pipeline.explain(unscored, outcomes) == Explanation(0.0, "'med-001' was never scored")
    assert len(pipeline.explain(stranger, outcomes).details) == len(first.ledger)
    assert len(pipeline.explain(first, without_rrf).details) == len(first.ledger) - 1


# ---------------------------------------------------------------- Explanation itself (its __init__ and to_dict)


def test_an_explanation_is_still_the_frozen_dataclass_it_was():
    leaf = Explanation(0.25, "leaf")
    tree = Explanation(1.5, "root", (leaf, Explanation(value=2.0, description="inner", details=(leaf,))))
    assert leaf.details == () and vars(leaf) == {"value": 0.25, "description": "leaf", "details": ()}
    assert list(vars(tree)) == ["value", "description", "details"]
    assert [f.name for f in dataclasses.fields(Explanation)] == ["value", "description", "details"]
    assert Explanation.__match_args__ == ("value", "description", "details")
    with pytest.raises(dataclasses.FrozenInstanceError):
        leaf.value = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        Explanation(1.0)  # type: ignore[call-arg]
    assert tree == Explanation(1.5, "root", (Explanation(0.25, "leaf"), Explanation(2.0, "inner", (leaf,))))
    assert hash(tree) == hash(copy.deepcopy(tree)) and pickle.loads(pickle.dumps(tree)) == tree
    assert dataclasses.replace(leaf, value=3.0) == Explanation(3.0, "leaf")
    assert repr(leaf) == "Explanation(value=0.25, description='leaf', details=())"
    assert dataclasses.asdict(tree)["details"][1]["details"][0] == {"value": 0.25, "description": "leaf",
                                                                     "details": ()}
    assert same(tree.to_dict(), reference_dict(tree))
    for again in (pickle.loads(pickle.dumps(tree)), copy.deepcopy(tree), dataclasses.replace(tree)):
        assert same(again.to_dict(), reference_dict(tree)) and same(explanation_dicts([again]), [reference_dict(tree)])
    dicts = tree.to_dict()
    assert dicts["details"][0]["details"] is not dicts["details"][1]["details"][0]["details"]  # no list shared


def test_a_subclass_keeps_its_own_to_dict_at_any_depth():
    @dataclasses.dataclass(frozen=True)
    class Tagged(Explanation):
        tag: str = ""

        def to_dict(self) -> dict[str, Any]:
            return {**super().to_dict(), "tag": self.tag}

    tagged = Tagged(1.0, "tagged leaf", (), "t")
    assert (tagged.value, tagged.description, tagged.details, tagged.tag) == (1.0, "tagged leaf", (), "t")
    tree = Explanation(2.0, "root", (Explanation(1.0, "inner", (tagged,)), tagged))
    expected = {"value": 1.0, "description": "tagged leaf", "details": [], "tag": "t"}
    assert tree.to_dict()["details"][1] == expected
    assert tree.to_dict()["details"][0]["details"] == [expected]
    assert explanation_dicts([tagged]) == [expected]
