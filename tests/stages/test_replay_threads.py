"""From the library-embedding audit (F12): a trace replayed in a process whose torch ran on another number of CPU
threads could come out "different" (bf16 scores move in their last digits with the thread count) with no cause
named. The model identity records the thread count; replay notes a change (a note: it is not a difference)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.pipeline import Pipeline
from engine.replay import replay_trace


def test_replay_names_a_change_in_torchs_thread_count(tmp_path: Path, dense_index: Path):
    config = tmp_path / "dense.yaml"
    config.write_text(f"version: 1\nindex: {dense_index}\nstages:\n  - {{id: dense, type: recall.dense}}\n"
                      "output: dense\ntrace: {log: null}\n", encoding="utf-8")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        trace = Pipeline.from_file(config).search("vitamin D and bone density", log=False).trace
        [model] = trace["models"]
        assert model["threads"] == 2 and model["device"] == "cpu"
        same = replay_trace(trace)
        assert not any("CPU threads" in note for note in same["notes"])
        torch.set_num_threads(1)
        other = replay_trace(trace)
        assert "stage 'dense' ran its model on 2 CPU threads when traced, 1 now" in other["notes"]
        assert not any("threads" in difference for difference in other["differences"])  # a note, not a difference
    finally:
        torch.set_num_threads(before)
