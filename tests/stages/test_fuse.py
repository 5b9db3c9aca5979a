"""fuse.rrf, fuse.weighted and the normalisation functions: hand-made examples, compile-time checks,
and real BM25 + dense pipelines over the SciFact slice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engine.compiler import compile_file
from engine.errors import ConfigError
from engine.model import Candidate, Query, ScoreEntry
from engine.pipeline import Pipeline
from engine.stage import Resources, StageContext
from stages import normalize as norm
from stages.normalize import SignalStats

QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine"


# --------------------------------------------------------------------------- normalisation


def test_minmax_spreads_values_onto_zero_one():
    assert norm.normalize("minmax", [2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]


def test_minmax_guards_single_element_and_ties():
    assert norm.normalize("minmax", [7.5]) == [norm.TIED_MINMAX] == [1.0]
    assert norm.normalize("minmax", [3.0, 3.0, 3.0]) == [1.0, 1.0, 1.0]
    assert norm.normalize("minmax", [-0.0, 0.0]) == [1.0, 1.0]


def test_every_method_accepts_an_empty_list():
    for method in norm.METHODS:
        assert norm.normalize(method, []) == []
    assert SignalStats.of([]) == SignalStats(0, 0.0, 0.0, 0.0, 0.0, 0)


def test_zscore_and_its_guards():
    values = norm.normalize("zscore", [1.0, 2.0, 3.0, 4.0])
    assert math.fsum(values) == pytest.approx(0.0, abs=1e-12)
    assert math.sqrt(math.fsum(v * v for v in values) / 4) == pytest.approx(1.0)
    assert norm.normalize("zscore", [5.0]) == [norm.FLAT_ZSCORE] == [0.0]
    assert norm.normalize("zscore", [2.0, 2.0]) == [0.0, 0.0]


def test_sigmoid_is_stable_for_large_logits():
    assert norm.normalize("sigmoid", [0.0, 1000.0, -1000.0]) == [0.5, 1.0, 0.0]
    assert norm.sigmoid(2.0) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert norm.sigmoid(-2.0) == pytest.approx(1 / (1 + math.exp(2.0)))


def test_rank_methods_use_the_given_ranks():
    assert norm.normalize("rank", [9.0, 8.0, 1.0], ranks=[1, 2, 4]) == [1.0, 0.5, 0.25]
    assert norm.normalize("rank_linear", [9.0, 8.0, 1.0], ranks=[1, 2, 4]) == [1.0, 0.75, 0.25]
    assert norm.normalize("rank_linear", [3.0]) == [1.0]
    assert norm.normalize("none", [3.0, -1.0]) == [3.0, -1.0]


def test_formulas_show_the_numbers_and_the_guards():
    stats = SignalStats.of([2.0, 4.0])
    assert norm.formula("minmax", 3.0, 1, stats) == "minmax: (x - min) / (max - min) = (3 - 2) / (4 - 2) over 2 values"
    assert "guard value 1" in norm.formula("minmax", 3.0, 1, SignalStats.of([3.0]))
    assert "guard value 0" in norm.formula("zscore", 3.0, 1, SignalStats.of([3.0, 3.0]))
    with pytest.raises(ValueError, match="unknown normalisation"):
        norm.apply("softmax", 1.0, 1, stats)


# --------------------------------------------------------------------------- hand-made lists


def _entry(stage: str, value: float, rank: int) -> ScoreEntry:
    return ScoreEntry(stage, stage, value, rank)


def _candidate(doc_id: str, *entries: ScoreEntry) -> Candidate:
    return Candidate(doc_id, int(doc_id[1:]) if doc_id[1:].isdigit() else 0, tuple(entries))


def _compiled_stage(write_config, stage_yaml: str, stage_id: str):
    config = write_config(
        "version: 1\nindex: /nowhere\nstages:\n"
        "  - {id: bm25, type: recall.bm25}\n"
        "  - {id: dense, type: recall.dense}\n"
        f"{stage_yaml}"
        "trace: {log: null}\n"
    )
    return compile_file(config).stages[stage_id]


def _run(stage, lists, tmp_path: Path, query: Query | None = None):
    query = query if query is not None else Query.create("q")
    return query, stage.run(StageContext(stage.id, query, lists, None, Resources(None, tmp_path)))


def test_rrf_sums_weighted_reciprocal_ranks(write_config, tmp_path):
    stage = _compiled_stage(
        write_config,
        "  - {id: hybrid, type: fuse.rrf, inputs: [bm25, dense], params: {k: 60, weights: {bm25: 2.0}}}\n",
        "hybrid",
    )
    bm25 = [_candidate("d1", _entry("bm25", 12.0, 1)), _candidate("d2", _entry("bm25", 9.0, 2)),
            _candidate("d3", _entry("bm25", 4.0, 3))]
    dense = [_candidate("d3", _entry("dense", 0.9, 1)), _candidate("d1", _entry("dense", 0.8, 2)),
             _candidate("d4", _entry("dense", 0.7, 3))]
    query, result = _run(stage, [bm25, dense], tmp_path)
    expected = {
        "d1": 2.0 / 61 + 1.0 / 62,
        "d2": 2.0 / 62,
        "d3": 2.0 / 63 + 1.0 / 61,
        "d4": 1.0 / 63,
    }
    order = sorted(expected, key=lambda d: (-expected[d], d))
    assert [c.doc_id for c in result.candidates] == order
    assert [c.score for c in result.candidates] == pytest.approx([expected[d] for d in order], rel=1e-12)
    by_id = {c.doc_id: c for c in result.candidates}
    # Every input's own ledger entries are kept; the fused score is appended as this stage's entry.
    assert [(e.stage, e.value) for e in by_id["d1"].ledger] == [("bm25", 12.0), ("dense", 0.8), ("hybrid", expected["d1"])]
    assert [e.stage for e in by_id["d4"].ledger] == ["dense", "hybrid"]
    assert [c.ledger[-1].rank for c in result.candidates] == [1, 2, 3, 4]
    assert result.details == {"inputs": {"bm25": 3, "dense": 3}, "union": 4, "in_every_input": 2}

    tree = stage.explain(query, by_id["d3"], by_id["d3"].score, 1, True)
    assert "w / (k + rank), k=60" in tree.description
    assert [(d.value, d.description) for d in tree.details] == [
        (pytest.approx(2.0 / 63), "input 'bm25': rank 3, 2 / (60 + 3)"),
        (pytest.approx(1.0 / 61), "input 'dense': rank 1, 1 / (60 + 1)"),
    ]
    tree = stage.explain(query, by_id["d4"], by_id["d4"].score, 4, True)
    assert tree.details[0].description == "input 'bm25': not retrieved, adds 0"


def test_rrf_ties_break_on_doc_id_and_top_k_drops_are_reported(write_config, tmp_path):
    stage = _compiled_stage(
        write_config, "  - {id: hybrid, type: fuse.rrf, inputs: [bm25, dense], params: {top_k: 2}}\n", "hybrid"
    )
    bm25 = [_candidate("zz", _entry("bm25", 3.0, 1)), _candidate("b", _entry("bm25", 2.0, 2))]
    dense = [_candidate("aa", _entry("dense", 0.9, 1)), _candidate("c", _entry("dense", 0.1, 2))]
    _, result = _run(stage, [bm25, dense], tmp_path)
    assert [c.doc_id for c in result.candidates] == ["aa", "zz"]  # 1/61 each: doc_id decides
    assert [(d.doc_id, d.reason) for d in result.drops] == [("b", "beyond_top_k"), ("c", "beyond_top_k")]


def test_rrf_of_empty_inputs_is_empty_and_recorded(write_config, tmp_path):
    stage = _compiled_stage(write_config, "  - {id: hybrid, type: fuse.rrf, inputs: [bm25, dense]}\n", "hybrid")
    _, result = _run(stage, [[], []], tmp_path)
    assert result.candidates == [] and [d.code for d in result.decisions] == ["empty_input"]


def test_weighted_fusion_normalises_each_signal_and_explains_each_term(write_config, tmp_path):
    stage = _compiled_stage(
        write_config,
        "  - {id: fused, type: fuse.weighted, inputs: [bm25, dense], params: {weights: {bm25: 0.5, dense: 0.5}}}\n",
        "fused",
    )
    bm25 = [_candidate("d1", _entry("bm25", 10.0, 1)), _candidate("d2", _entry("bm25", 5.0, 2))]
    dense = [_candidate("d2", _entry("dense", 0.9, 1)), _candidate("d1", _entry("dense", 0.8, 2)),
             _candidate("d3", _entry("dense", 0.5, 3))]
    query, result = _run(stage, [bm25, dense], tmp_path)
    # bm25 minmax: d1 1, d2 0, d3 missing -> 0; dense minmax over [0.9, 0.8, 0.5]: d2 1, d1 0.75, d3 0.
    assert [(c.doc_id, round(c.score, 12)) for c in result.candidates] == [("d1", 0.875), ("d2", 0.5), ("d3", 0.0)]
    assert [e.stage for e in result.candidates[0].ledger] == ["bm25", "dense", "fused"]
    assert result.details["signals"]["bm25"] == {"method": "minmax", "present": 2, "missing": 1}

    d1 = result.candidates[0]
    tree = stage.explain(query, d1, d1.score, 1, True)
    assert "0.5*norm(bm25) + 0.5*norm(dense)" in tree.description
    bm25_term, dense_term = tree.details
    assert bm25_term.value == pytest.approx(0.5) and "weight 0.5 x normalised 1 (minmax)" in bm25_term.description
    assert dense_term.value == pytest.approx(0.375)
    normalised = dense_term.details[0]
    assert normalised.value == pytest.approx(0.75)
    assert normalised.description.startswith("minmax: (x - min) / (max - min) = (0.8 - 0.5) / (0.9 - 0.5)")
    assert normalised.details[0].value == 0.8 and "raw 'dense' score (rank 2" in normalised.details[0].description
    d3 = result.candidates[2]
    missing = stage.explain(query, d3, d3.score, 3, True).details[0]
    assert missing.value == 0.0 and "policy 'zero'" in missing.details[0].description


def test_weighted_missing_min_policy_and_per_signal_methods(write_config, tmp_path):
    stage = _compiled_stage(
        write_config,
        "  - id: fused\n    type: fuse.weighted\n    inputs: [bm25, dense]\n"
        "    params: {weights: {bm25: 1.0, dense: 2.0}, normalize: none, normalize_signals: {dense: sigmoid},"
        " missing: min}\n",
        "fused",
    )
    bm25 = [_candidate("d1", _entry("bm25", 10.0, 1)), _candidate("d2", _entry("bm25", 4.0, 2))]
    dense = [_candidate("d3", _entry("dense", 0.0, 1))]
    _, result = _run(stage, [bm25, dense], tmp_path)
    scores = {c.doc_id: c.score for c in result.candidates}
    low_dense = 0.5  # sigmoid(0): the only dense value, so the 'min' for documents lacking it
    assert scores == pytest.approx({"d1": 10.0 + 2 * low_dense, "d2": 4.0 + 2 * low_dense, "d3": 4.0 + 2 * 0.5})
    assert [c.doc_id for c in result.candidates] == ["d1", "d2", "d3"]  # d2 and d3 tie at 5.0: doc_id decides


def test_weighted_guards_are_recorded_as_decisions(write_config, tmp_path):
    stage = _compiled_stage(
        write_config,
        "  - {id: fused, type: fuse.weighted, inputs: [bm25, dense], params: {weights: {bm25: 1, dense: 1}}}\n",
        "fused",
    )
    bm25 = [_candidate("d1", _entry("bm25", 3.0, 1))]
    _, result = _run(stage, [bm25, []], tmp_path)
    assert [d.code for d in result.decisions] == ["minmax_tied", "signal_absent"]
    assert result.candidates[0].score == 1.0

    bad = [_candidate("d1", _entry("bm25", math.nan, 1)), _candidate("d2", _entry("bm25", 2.0, 2))]
    _, result = _run(stage, [bad, []], tmp_path)
    assert result.decisions[0].code == "non_finite_score" and result.decisions[0].data == {"doc_ids": ["d1"]}
    assert all(math.isfinite(c.score) for c in result.candidates)


# --------------------------------------------------------------------------- compile-time checks


WEIGHTED_ERRORS = """\
version: 1
index: /nowhere
stages:
  - {id: bm25, type: recall.bm25}
  - {id: dense, type: recall.dense}
  - id: fused
    type: fuse.weighted
    inputs: [bm25, dense]
    params:
      weights:
        bm25: -0.5
        dense: 0.3
        denze_v2: 0.2
      normalize_signals: {recency: sigmoid}
trace: {log: null}
"""


def test_weight_errors_are_located_at_their_keys(write_config):
    path = write_config(WEIGHTED_ERRORS)
    with pytest.raises(ConfigError) as caught:
        compile_file(path)
    issues = {(issue.path, issue.location.line): issue.message for issue in caught.value.issues}
    assert set(issues) == {
        ("stages.2.params.weights.bm25", 11),
        ("stages.2.params.weights.denze_v2", 13),
        ("stages.2.params.normalize_signals.recency", 14),
    }
    assert "negative (-0.5)" in issues[("stages.2.params.weights.bm25", 11)]
    unknown = issues[("stages.2.params.weights.denze_v2", 13)]
    assert "not a signal written by an upstream stage" in unknown
    assert "did you mean 'dense'" in unknown and "bm25 (bm25), dense (dense)" in unknown
    assert str(caught.value).count(str(path)) == 3  # every issue printed as file:line:col


def test_all_zero_weights_and_rrf_weights_for_a_non_input_are_errors(write_config):
    path = write_config(
        "version: 1\nindex: /nowhere\nstages:\n"
        "  - {id: bm25, type: recall.bm25}\n"
        "  - {id: dense, type: recall.dense}\n"
        "  - {id: hybrid, type: fuse.rrf, inputs: [bm25, dense], params: {weights: {bm25: 1, rerank: 2}}}\n"
        "  - {id: fused, type: fuse.weighted, inputs: [hybrid], params: {weights: {bm25: 0, dense: 0.0}}}\n"
        "trace: {log: null}\n"
    )
    with pytest.raises(ConfigError) as caught:
        compile_file(path)
    issues = {issue.path: (issue.location.line, issue.message) for issue in caught.value.issues}
    assert issues["stages.2.params.weights.rerank"][0] == 6
    assert "not a candidate input of this stage" in issues["stages.2.params.weights.rerank"][1]
    assert issues["stages.3.params.weights"] == (
        7, "no weight is positive, so every document would score 0; give at least one input a weight above 0")


def test_rrf_needs_two_inputs(write_config):
    path = write_config(
        "version: 1\nindex: /nowhere\nstages:\n"
        "  - {id: bm25, type: recall.bm25}\n"
        "  - {id: hybrid, type: fuse.rrf, inputs: [bm25]}\n"
        "trace: {log: null}\n"
    )
    with pytest.raises(ConfigError, match="fuse.rrf takes at least 2 candidate input"):
        compile_file(path)


def test_the_shipped_configs_validate():
    root = Path(__file__).resolve().parents[2]
    for name in ("dense.yaml", "hybrid.yaml"):
        compiled = compile_file(root / "configs" / name)
        assert compiled.index_path == (root / "indexes" / "scifact").resolve()


# --------------------------------------------------------------------------- real pipelines


def _stage_outputs(trace) -> dict[str, list[str]]:
    return {stage["id"]: [doc_id for doc_id, _ in stage.get("output", [])] for stage in trace["stages"]}


def test_hybrid_pipeline_scores_are_rrf_of_the_recall_lists(dense_index, write_config):
    config = write_config(
        f"version: 1\nindex: {dense_index}\nstages:\n"
        "  - {id: bm25, type: recall.bm25, params: {top_k: 50}}\n"
        "  - {id: dense, type: recall.dense, params: {top_k: 50}}\n"
        "  - {id: hybrid, type: fuse.rrf, inputs: [bm25, dense], params: {k: 60, top_k: 20}}\n"
        "trace: {log: null}\n"
    )
    result = Pipeline.from_file(config).search(QUERY)
    outputs = _stage_outputs(result.trace)
    positions = {name: {d: i for i, d in enumerate(outputs[name], start=1)} for name in ("bm25", "dense")}
    assert len(result.results) == 20
    for candidate in result.results:
        expected = math.fsum(1.0 / (60 + p[candidate.doc_id]) for p in positions.values() if candidate.doc_id in p)
        assert candidate.score == pytest.approx(expected, rel=1e-12)
        stages_in_ledger = [e.stage for e in candidate.ledger]
        assert stages_in_ledger[-1] == "hybrid"
        assert set(stages_in_ledger[:-1]) == {n for n, p in positions.items() if candidate.doc_id in p}
    explanation = result.trace["results"][0]["explanation"]["details"][-1]
    assert [d["description"].split(":")[0] for d in explanation["details"]] == ["input 'bm25'", "input 'dense'"]


def test_weighted_pipeline_over_real_signals(dense_index, write_config):
    config = write_config(
        f"version: 1\nindex: {dense_index}\nstages:\n"
        "  - {id: bm25, type: recall.bm25, params: {top_k: 30}}\n"
        "  - {id: dense, type: recall.dense, params: {top_k: 30}}\n"
        "  - {id: fused, type: fuse.weighted, inputs: [bm25, dense],"
        " params: {weights: {bm25: 0.4, dense: 0.6}, normalize: minmax, top_k: 10}}\n"
        "trace: {log: null}\n"
    )
    result = Pipeline.from_file(config).search(QUERY)
    fused = next(s for s in result.trace["stages"] if s["id"] == "fused")
    assert fused["details"]["union"] >= 30 and len(fused["drops"]) == fused["details"]["union"] - 10
    raw = {name: dict(s["output"]) for s in result.trace["stages"] for name in [s["id"]] if name != "fused"}
    spans = {name: (min(v.values()), max(v.values())) for name, v in raw.items()}

    def term(name: str, doc_id: str) -> float:
        if doc_id not in raw[name]:
            return 0.0
        low, high = spans[name]
        return (raw[name][doc_id] - low) / (high - low)

    for candidate in result.results:
        expected = 0.4 * term("bm25", candidate.doc_id) + 0.6 * term("dense", candidate.doc_id)
        assert candidate.score == pytest.approx(expected, rel=1e-9)
    scores = [c.score for c in result.results]
    assert scores == sorted(scores, reverse=True)


def test_zscore_of_exactly_tied_values_is_flat():
    """fsum / n of [0.1] * 3 is 0.10000000000000002: the spread came out 5.6e-17, not 0, and every value got a
    z-score of -1 or +1 (12% of random tied lists), with no `zscore_flat` decision."""
    stats = norm.SignalStats.of([0.1] * 3)
    assert stats.flat and stats.std == 0.0 and stats.mean == 0.1
    assert norm.normalize("zscore", [0.3746360517252655] * 3) == [norm.FLAT_ZSCORE] * 3


def test_weighted_missing_zero_is_zero_where_the_lowest_value_is_not(write_config, tmp_path):
    """Mutation audit, mutant 27 (`min` applied whatever `missing` said): the only test of `zero` normalised by
    min-max, where the lowest normalised value is 0 anyway."""
    stage = _compiled_stage(
        write_config,
        "  - id: fused\n    type: fuse.weighted\n    inputs: [bm25, dense]\n"
        "    params: {weights: {bm25: 1.0, dense: 1.0}, normalize: none, missing: zero}\n",
        "fused",
    )
    bm25 = [_candidate("d1", _entry("bm25", 10.0, 1)), _candidate("d2", _entry("bm25", 4.0, 2))]
    dense = [_candidate("d3", _entry("dense", 3.0, 1))]
    _, result = _run(stage, [bm25, dense], tmp_path)
    assert {c.doc_id: c.score for c in result.candidates} == pytest.approx({"d1": 10.0, "d2": 4.0, "d3": 3.0})
