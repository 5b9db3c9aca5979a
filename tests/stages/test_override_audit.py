"""rules.override: findings of an audit of manual override rules (real BM25 index, real fusion and dedup stages).

- a boost or demote moves a negative score the right way (cross-encoder logits, z-scores are often negative), and
  a factor on a score of 0 is reported rather than silently doing nothing;
- query text a target condition matched stays out of a trace that may not hold query text;
- explain() judges `candidate.rank` at the rank a document arrived at (after a dedup between), and names the pin
  rule that actually placed a document;
- a rule that cannot be evaluated is reported on the candidates only, not on the whole corpus;
- a stage that re-ranks after the override stage is a validation warning.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from engine.compiler import compile_file
from engine.model import UserContext
from engine.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]
AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)
QUERY = "metformin kidney function"


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.index import build_index

    out = tmp_path_factory.mktemp("override-audit") / "medical"
    build_index(ROOT / "examples" / "medical", out, {"bm25": {}})
    return out


def _pipeline(tmp_path: Path, index: Path, rules: str | None, *, between: str = "", after: str = "",
              include_query_text: bool = True) -> Pipeline:
    """bm25 [-> between stages, the last one named 'mid'] [-> override 'rules'] [-> after stages]."""
    stages = ["  - {id: bm25, type: recall.bm25, params: {top_k: 20}}"]
    last = "bm25"
    if between:
        stages.append(between)
        last = "mid"
    if rules is not None:
        (tmp_path / "overrides.yaml").write_text("version: 1\nkind: override\nrules:\n" + rules, encoding="utf-8")
        stages.append(f"  - {{id: rules, type: rules.override, inputs: [{last}], params: {{rules: overrides.yaml}}}}")
        last = "rules"
    if after:
        stages.append(after.replace("INPUT", last))
        last = "end"
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"version: 1\nindex: {index}\nstages:\n" + "\n".join(stages) + f"\noutput: {last}\n"
                      f"trace: {{log: null, include_query_text: {str(include_query_text).lower()}}}\n",
                      encoding="utf-8")
    return Pipeline(compile_file(config))


def _run(pipeline: Pipeline, text: str = QUERY):
    return pipeline.run(pipeline.make_query(text, user=UserContext(roles=["clinician"]), as_of=AS_OF))


def _stage(result, stage_id: str) -> dict:
    return next(s for s in result.trace["stages"] if s["id"] == stage_id)


ZSCORE = "  - {id: mid, type: fuse.weighted, inputs: [bm25], params: {weights: {bm25: 1.0}, normalize: zscore}}"
MINMAX = "  - {id: mid, type: fuse.weighted, inputs: [bm25], params: {weights: {bm25: 1.0}, normalize: minmax}}"


def test_a_boost_raises_and_a_demote_lowers_a_negative_score(tmp_path, index):
    plain = _run(_pipeline(tmp_path, index, None, between=ZSCORE))
    negative = [c.doc_id for c in plain.results if c.score < 0]
    assert len(negative) >= 4, "the fixture query must leave several documents below the mean"
    boosted, demoted = negative[1], negative[0]
    rules = (f"  - {{id: up, action: boost, docs: [{boosted}], factor: 3}}\n"
             f"  - {{id: down, action: demote, docs: [{demoted}], factor: 0.1}}\n")
    result = _run(_pipeline(tmp_path, index, rules, between=ZSCORE))
    firings = {f["rule"]: f for f in _stage(result, "rules")["details"]["firings"]}
    up, down = firings["up"], firings["down"]
    assert up["score_after"] == pytest.approx(up["score_before"] / 3) and up["score_after"] > up["score_before"]
    assert up["rank_after"] <= up["rank_before"]
    assert down["score_after"] == pytest.approx(down["score_before"] / 0.1) and down["score_after"] < down["score_before"]
    assert down["rank_after"] >= down["rank_before"]
    explanation = next(r["explanation"] for r in result.trace["results"] if r["doc_id"] == boosted)
    rules_part = json.dumps(explanation)
    assert "a negative score is divided by the factors, so a boost raises it" in rules_part


def test_a_factor_on_a_score_of_zero_is_reported(tmp_path, index):
    plain = _run(_pipeline(tmp_path, index, None, between=MINMAX))
    bottom = plain.results[-1]
    assert bottom.score == 0.0
    result = _run(_pipeline(tmp_path, index, f"  - {{id: up, action: boost, docs: [{bottom.doc_id}], factor: 2}}\n",
                            between=MINMAX))
    decision = next(d for d in _stage(result, "rules")["decisions"] if d["code"] == "factor_on_zero")
    assert "'up' multiplies 1 candidate score(s) of 0" in decision["detail"] and "`add`" in decision["detail"]
    assert decision["data"]["doc_ids"] == [bottom.doc_id]


def test_query_text_a_target_condition_matched_is_redacted(tmp_path, index):
    rules = "  - {id: named, action: boost, factor: 2, match: {field: query.text, op: regex, value: 'patient \\w+'}}\n"
    text = "metformin kidney function for patient JohnSmith"
    hidden = _run(_pipeline(tmp_path, index, rules, include_query_text=False), text)
    firings = _stage(hidden, "rules")["details"]["firings"]
    assert firings and all(f["match"] == [{"field": "query.text", "op": "regex", "matched": "<redacted>"}]
                           for f in firings), firings[0]
    assert "JohnSmith" not in json.dumps(hidden.trace)
    shown = _run(_pipeline(tmp_path, index, rules, include_query_text=True), text)
    assert _stage(shown, "rules")["details"]["firings"][0]["match"][0]["matched"] == "patient JohnSmith"


@pytest.fixture(scope="module")
def index_with_a_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The medical corpus and a near-copy of med-003 (the fixture query's first hit)."""
    from engine.index import build_index

    folder = tmp_path_factory.mktemp("override-audit-copy")
    lines = (ROOT / "examples" / "medical" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    original = next(json.loads(line) for line in lines if json.loads(line)["_id"] == "med-003")
    lines.append(json.dumps({**original, "_id": "med-003-copy", "text": original["text"] + " Reviewed."}))
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    build_index(folder, folder / "index", {"bm25": {}})
    return folder / "index"


def test_explain_judges_candidate_rank_where_the_document_arrived(tmp_path, index_with_a_copy):
    """A near-duplicate removed between BM25 and the override stage shifts every later document up one rank; the
    rule on `candidate.rank eq 3` fires on the document arriving third, and its explanation must say so."""
    dedup = "  - {id: mid, type: dedup.near_duplicate, inputs: [bm25], params: {method: minhash}}"
    rules = "  - {id: third, action: boost, factor: 2, match: {field: candidate.rank, op: eq, value: 3}}\n"
    result = _run(_pipeline(tmp_path, index_with_a_copy, rules, between=dedup))
    assert _stage(result, "mid").get("drops"), "the fixture must drop a near-duplicate before the override stage"
    arrived = [doc_id for doc_id, _ in _stage(result, "mid")["output"]]
    bm25_ranks = {doc_id: rank for rank, (doc_id, _) in enumerate(_stage(result, "bm25")["output"], start=1)}
    (firing,) = _stage(result, "rules")["details"]["firings"]
    assert firing["doc_id"] == arrived[2]
    assert bm25_ranks[arrived[2]] != 3, "the fixture must move the third document"
    by_id = {r["doc_id"]: r["explanation"] for r in result.trace["results"]}
    rules_node = by_id[arrived[2]]["details"][-1] if by_id[arrived[2]]["details"] else by_id[arrived[2]]
    assert "x2 (boost rule 'third')" in json.dumps(by_id[arrived[2]]), rules_node
    for doc_id, explanation in by_id.items():
        if doc_id != arrived[2]:
            assert "boost rule 'third'" not in json.dumps(explanation), doc_id


def test_explain_names_the_pin_rule_that_placed_the_document(tmp_path, index):
    recalled = {c.doc_id for c in _run(_pipeline(tmp_path, index, None)).results}
    corpus = [json.loads(line)["_id"] for line in (ROOT / "examples" / "medical" / "corpus.jsonl").open()]
    outside = next(d for d in corpus if d not in recalled)
    rules = (f"  - {{id: a-pin, action: pin, docs: [{outside}], position: 1, priority: 5, inject: false}}\n"
             f"  - {{id: b-pin, action: pin, docs: [{outside}], position: 2}}\n")
    result = _run(_pipeline(tmp_path, index, rules))
    assert [c.doc_id for c in result.results][1] == outside
    explanation = next(r["explanation"] for r in result.trace["results"] if r["doc_id"] == outside)
    assert "by override rule 'b-pin'" in json.dumps(explanation) and "'a-pin'" not in json.dumps(explanation)


def test_a_rule_that_cannot_be_evaluated_is_reported_on_the_candidates_only(tmp_path, index):
    rules = "  - {id: dated, action: boost, factor: 2, match: {field: doc.date, op: gt, value: 5}}\n"
    result = _run(_pipeline(tmp_path, index, rules))
    incoming = {doc_id for doc_id, _ in _stage(result, "bm25")["output"]}
    decision = next(d for d in _stage(result, "rules")["decisions"] if d["code"] == "rule_error")
    failed = decision["data"]["doc_ids"]
    assert failed and set(failed) <= incoming
    assert f"failed on {len(failed)} candidate(s)" in decision["detail"]
    assert any(f"'{doc_id}'" in decision["detail"] for doc_id in failed)


@pytest.mark.parametrize(("after", "says"), [
    ("  - {id: end, type: dedup.near_duplicate, inputs: [INPUT], params: {method: minhash}}",
     "may drop a pinned document as a near-duplicate"),
    ("  - {id: end, type: fuse.weighted, inputs: [INPUT], params: {weights: {bm25: 1.0}}}", "re-ranks its output"),
])
def test_a_stage_that_reranks_after_the_override_stage_is_a_warning(tmp_path, index, after, says):
    pipeline = _pipeline(tmp_path, index, "  - {id: p, action: pin, docs: [med-001], position: 1}\n", after=after)
    warnings = [str(w) for w in pipeline.compiled.warnings]
    assert any("comes after this override stage" in w and says in w for w in warnings), warnings
    assert not [w for w in _pipeline(tmp_path, index, "  - {id: p, action: pin, docs: [med-001], position: 1}\n")
                .compiled.warnings if "comes after this override stage" in str(w)]


def test_a_rule_file_edited_while_the_pipeline_runs_is_reported_in_each_trace(tmp_path, index, caplog):
    rules = "  - {id: p, action: pin, docs: [med-001], position: 1}\n"
    pipeline = _pipeline(tmp_path, index, rules)
    assert not [d for d in _stage(_run(pipeline), "rules").get("decisions", []) if d["code"] == "rule_file_changed"]
    path = tmp_path / "overrides.yaml"
    original = path.read_text(encoding="utf-8")
    path.write_text(original + "  - {id: q, action: bury, docs: [med-002]}\n", encoding="utf-8")
    result = _run(pipeline)
    (decision,) = [d for d in _stage(result, "rules")["decisions"] if d["code"] == "rule_file_changed"]
    assert "changed (sha256" in decision["detail"] and "this query ran the rules as loaded" in decision["detail"]
    assert decision["data"]["loaded_sha256"] != decision["data"]["on_disk_sha256"]
    assert "q" not in _stage(result, "rules")["details"]["fired_rules"]  # the loaded rules ran
    assert any("changed (sha256" in r.getMessage() for r in caplog.records if r.name == "sieve.rules")
    path.unlink()
    assert "was removed" in next(d["detail"] for d in _stage(_run(pipeline), "rules")["decisions"]
                                 if d["code"] == "rule_file_changed")
    path.write_text(original, encoding="utf-8")  # the loaded content again: nothing to report
    assert not [d for d in _stage(_run(pipeline), "rules").get("decisions", []) if d["code"] == "rule_file_changed"]


def test_a_boost_re_ranks_within_the_documents_the_same_stage_scored(tmp_path, index):
    """After a reranker with a window, the documents below the window keep their BM25 scores: a boost re-sorted the
    whole list by raw score, mixing BM25 scores with logits. Each group now keeps its place."""
    rerank = "  - {id: mid, type: rerank.cross_encoder, inputs: [bm25], params: {window: 5}}"
    plain = _run(_pipeline(tmp_path, index, None, between=rerank))
    window, tail = [c.doc_id for c in plain.results[:5]], [c.doc_id for c in plain.results[5:]]
    assert len(tail) >= 3
    rules = (f"  - {{id: tail-up, action: boost, docs: [{tail[2]}], add: 100}}\n"
             f"  - {{id: window-up, action: boost, docs: [{window[4]}], add: 100}}\n")
    result = _run(_pipeline(tmp_path, index, rules, between=rerank))
    order = [c.doc_id for c in result.results]
    assert order[0] == window[4]  # first within the window's group
    assert order[5] == tail[2] and set(order[:5]) == set(window)  # first within the tail, still below the window
    decision = next(d for d in _stage(result, "rules")["decisions"] if d["code"] == "boost_within_scored_groups")
    assert "'mid' for 5 (ranks 1-5)" in decision["detail"] and "'bm25' for" in decision["detail"]


def test_why_not_names_a_pin_that_did_not_apply_and_no_score_cut_for_a_rule_drop(tmp_path, index):
    from engine.workbench.inspect import why_not

    recalled = [c.doc_id for c in _run(_pipeline(tmp_path, index, None)).results]
    corpus = [json.loads(line)["_id"] for line in (ROOT / "examples" / "medical" / "corpus.jsonl").open()]
    outside = next(d for d in corpus if d not in recalled)
    rules = (f"  - {{id: a-pin, action: pin, docs: [{outside}], position: 1, inject: false}}\n"
             f"  - {{id: gone, action: exclude, docs: [{recalled[0]}]}}\n")
    pipeline = _pipeline(tmp_path, index, rules)
    result = pipeline.run(pipeline.make_query(QUERY, user=UserContext(roles=["clinician"]), as_of=AS_OF),
                          keep_outcomes=True)
    pinned = why_not(pipeline, result, outside)
    assert pinned.status == "not_recalled"
    assert "rule 'a-pin' of stage 'rules' names it but did not apply (pin_not_recalled)" in pinned.message
    excluded = why_not(pipeline, result, recalled[0])
    assert excluded.status == "dropped" and "override_exclude" in excluded.message
    assert "last candidate kept" not in excluded.message
