"""Resource audit F2/F4: ceilings that hold whatever the config says. The server's body limit followed the
pipelines' limits up to 12 GB (max_query_chars 1,000,000 x 1,000 turns, both within their ranges: one 300 MB
request took the server from 91 MB to 2.2 GB and added 300 MB to the trace log); a trace record had no size limit
when written, although readers refuse one over 1 GiB."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import TraceError
from engine.pipeline import Pipeline
from engine.server import MAX_MAX_BODY_BYTES, MIN_MAX_BODY_BYTES, default_max_body_bytes
from engine.trace import TraceLog


def _pipeline(bm25_index: Path, write_config, limits: str) -> Pipeline:
    return Pipeline.from_file(write_config(
        f"version: 1\nname: p\nindex: {bm25_index}\nlimits: {limits}\nstages:\n"
        "  - {id: bm25, type: recall.bm25, params: {top_k: 5}}\noutput: bm25\ntrace: {log: null}\n"))


def test_the_body_limit_follows_the_limits_between_1_and_64_mib(bm25_index, write_config):
    default = default_max_body_bytes({"p": _pipeline(bm25_index, write_config, "{}")})
    assert MIN_MAX_BODY_BYTES < default < 2 * MIN_MAX_BODY_BYTES  # ~1.8 MiB for the default limits
    generous = _pipeline(bm25_index, write_config, "{max_query_chars: 1000000, max_history_turns: 10000}")
    assert default_max_body_bytes({"p": generous}) == MAX_MAX_BODY_BYTES == 64 << 20  # before: ~12 GB


def test_a_trace_over_what_a_reader_takes_is_refused_when_written(tmp_path, monkeypatch):
    import engine.trace as trace_module

    monkeypatch.setattr(trace_module, "MAX_SINGLE_TRACE_BYTES", 1 << 20)  # the same check, at 1 MiB
    log = TraceLog(tmp_path / "log.jsonl")
    log.append({"schema": "sieve.trace/1", "query": {"text": "small"}})
    before = log.path.read_bytes()
    with pytest.raises(TraceError, match="over the 1 MiB a trace may hold"):
        log.append({"schema": "sieve.trace/1", "query": {"text": "x" * (2 << 20)}})
    assert log.path.read_bytes() == before


def test_a_build_says_when_documents_are_very_large(tmp_path):
    """Resource audit F5: a 50 MB document was indexed without a word, then every query recalling it took 25 s and
    1.4 GB in dedup (MinHash signing it per query). The build now says so, naming the largest."""
    import json

    from engine.index import build_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in [
        {"_id": "small", "title": "a", "text": "metformin dose"},
        {"_id": "huge", "title": "b", "text": "metformin " * 120_000},
    ]), encoding="utf-8")
    said: list[str] = []
    build_index(corpus, tmp_path / "idx", {"bm25": {}}, notes=said.append)
    (note,) = [n for n in said if "characters of title and text" in n]
    assert note.startswith("warning: 1 document holds more than 1,000,000") and "'huge', 1,200,001" in note
    said.clear()
    corpus.write_text(json.dumps({"_id": "small", "text": "x"}) + "\n", encoding="utf-8")
    build_index(corpus, tmp_path / "idx2", {"bm25": {}}, notes=said.append)
    assert not [n for n in said if "characters of title and text" in n]
