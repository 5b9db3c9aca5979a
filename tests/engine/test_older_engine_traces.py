"""Genuine traces of older engines, replayed by this one. Each was written by the engine of its version (0.4.0:
commit 0a8d3bc; 0.12.0: commit 8854fc5, its `make demo` query) in another checkout, with the index and rule files
it read, which lie beside it here (tests/data/older_engines/<version>/<pipeline>/). The README's promise for an
upgrade: what ran (ids, scores, drops, decisions, rules fired, explanations) is reproduced, and what only wording or
a newer engine's fields change is a note. Hand-edited traces (test_replay.py) cannot show that an older engine's
genuine output still replays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.replay import replay_trace

OLDER = Path(__file__).resolve().parents[1] / "data" / "older_engines"


def _replayed(tmp_path: Path, version: str, pipeline: str) -> dict:
    """Replay the trace from a copy of its directory (the index is opened, never written; a copy keeps the
    checkout's files as they are whatever a replay did)."""
    here = shutil.copytree(OLDER / version / pipeline, tmp_path / pipeline)
    trace = json.loads((here / "trace.json").read_text(encoding="utf-8"))
    assert trace["engine_version"] == version
    return replay_trace(trace, index_path=here / "index", config_dir=here / "rules")


@pytest.mark.parametrize("pipeline", ["finance", "medical"])
def test_a_trace_of_0_4_0_replays_identical_with_its_index_and_rules(tmp_path, pipeline):
    """Access rules, BM25, overrides and a score floor, written by 0.4.0; the finance query was asked with a
    +02:00 as_of, which 0.9.0 on reads in UTC."""
    report = _replayed(tmp_path, "0.4.0", pipeline)
    assert report["identical"], report["differences"]
    assert report["compared"] > 0 and report["ranking_identical"]
    notes = " | ".join(report["notes"])
    assert "engine version 0.4.0 in the trace" in notes and "settings added at their defaults" in notes
    if pipeline == "finance":
        assert "as_of was recorded as 2025-06-01T10:00:00+02:00" in notes, notes


def test_the_demo_trace_of_0_12_0_replays_identical_from_another_checkout(tmp_path):
    """`make demo`'s query under 0.12.0 (access rules in hybrid recall, the shipped cross-encoder, a blend, overrides,
    a floor), traced in a checkout elsewhere: 0.12.0 named the shipped reranker by that checkout's absolute path, so
    before 0.13.0 it replayed 'different' anywhere but there."""
    report = _replayed(tmp_path, "0.12.0", "demo")
    assert report["identical"], report["differences"]
    notes = " | ".join(report["notes"])
    assert "the model is named 'models/sieve-reranker-scifact-minilm (shipped)' now" in notes, notes
    assert "differences in wording or in fields only one of them records" in notes  # the explanations' model name
