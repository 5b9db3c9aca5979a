"""trace.explain_top: explanation trees for the first N results only (hot-path audit: at 200 results the trees were
about half a BM25 query's own CPU). Every result keeps its ledger; replay reproduces what was stored."""

from __future__ import annotations

import pytest

from engine.compiler import compile_file
from engine.pipeline import Pipeline
from engine.replay import replay_trace


def _config(write_config, bm25_index, trace: str) -> object:
    return write_config(f"version: 1\nindex: {bm25_index}\nstages:\n"
                        "  - {id: bm25, type: recall.bm25, params: {top_k: 50}}\n"
                        "  - {id: final, type: select.top_k, inputs: [bm25], params: {k: 20}}\n"
                        f"output: final\ntrace: {{log: null, {trace}}}\n")


def test_only_the_first_results_carry_a_tree_and_the_trace_replays(write_config, bm25_index):
    trace = Pipeline.from_file(_config(write_config, bm25_index, "explain_top: 3")).search("vitamin D bone").trace
    assert len(trace["results"]) == 20
    assert [("explanation" in r) for r in trace["results"]] == [True] * 3 + [False] * 17
    assert all(r["ledger"] for r in trace["results"])  # every score is still there
    everything = Pipeline.from_file(_config(write_config, bm25_index, "explain: true")).search("vitamin D bone").trace
    assert [r["explanation"] for r in everything["results"][:3]] == [r["explanation"] for r in trace["results"][:3]]
    report = replay_trace(trace)
    assert report["identical"], report["differences"]


@pytest.mark.parametrize(("trace", "warned"), [("explain: false, explain_top: 5", True), ("explain_top: 5", False)])
def test_explain_top_without_explain_is_a_warning(write_config, bm25_index, trace, warned):
    warnings = [str(w) for w in compile_file(_config(write_config, bm25_index, trace)).warnings]
    assert any("explain_top is set but not used" in w for w in warnings) == warned, warnings
