"""Findings of the library-embedding audit (report-only helper), Sieve used from Python in a long-running service.
Before the fix:

F2.  pickling a Pipeline (for a 'spawn' worker) failed with "TypeError: cannot pickle '_thread.lock' object";
F4.  replaying a trace file with a field of the wrong kind (index.path 5, query.as_of 1.5, results null) was an
     internal error (exit 70), and replay_trace(None) an AttributeError;
F5.  arguments of the wrong kind to from_file, run, explain and log_trace were TypeErrors and AttributeErrors from
     deep inside (README: every error Sieve raises is a SieveError);
F6.  search(log="other.jsonl") logged to the config's log (any true value meant "log");
F10. a relative trace.log was resolved against the working directory at each append: after os.chdir the
     pipeline started a second chain elsewhere, silently.
(F1, a fork() after a model ran, is in tests/stages/test_fork_guard.py.)
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import QueryError, SieveError, TraceError
from engine.pipeline import Pipeline
from engine.replay import replay_trace
from engine.trace import check_log

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(bm25_index: Path, tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                    "output: bm25\ntrace: {log: traces/rel.jsonl}\n", encoding="utf-8")
    return path


def test_a_pipeline_refuses_pickling_saying_what_to_do(config):
    pipeline = Pipeline.from_file(config)
    with pytest.raises(SieveError, match="cannot be pickled.*Pipeline.from_file there"):
        pickle.dumps(pipeline)


@pytest.mark.parametrize("edit", [
    lambda t: t["index"].__setitem__("path", 5),
    lambda t: t["query"].__setitem__("as_of", 1.5),
    lambda t: t["query"].__setitem__("user", "alice"),
    lambda t: t.__setitem__("results", [1, 2]),
    lambda t: t.__setitem__("stages", {"bm25": {}}),
    lambda t: t["config"].__setitem__("resolved", ["stages"]),
])
def test_replaying_a_trace_with_a_field_of_the_wrong_kind_is_a_trace_error(config, tmp_path, edit):
    pipeline = Pipeline.from_file(config)
    trace = pipeline.search("vitamin d", log=False).trace
    edit(trace)
    with pytest.raises(TraceError, match="not a trace that can be replayed: its "):
        replay_trace(trace)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "engine.cli", "replay", str(path)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                          timeout=300)
    assert done.returncode == 2 and "internal error" not in done.stderr, done.stderr  # before: 70


@pytest.mark.parametrize("edit", [lambda t: t["config"].__setitem__("dir", None), lambda t: t.__setitem__("results", None)])
def test_a_null_config_dir_or_result_list_is_replayed(config, edit):
    pipeline = Pipeline.from_file(config)
    trace = pipeline.search("vitamin d", log=False).trace
    edit(trace)
    report = replay_trace(trace)  # before: TypeError
    assert isinstance(report["identical"], bool)


@pytest.mark.parametrize("trace", [None, [], "trace"])
def test_replay_trace_of_something_that_is_no_trace(trace):
    with pytest.raises(TraceError, match="a trace is a JSON object"):
        replay_trace(trace)  # type: ignore[arg-type]


def test_arguments_of_the_wrong_kind_are_sieve_errors(config, tmp_path):
    for path in (None, 123, b"p.yaml"):
        with pytest.raises(QueryError, match="the config path must be a str or a pathlib.Path"):
            Pipeline.from_file(path)  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="index_path must be"):
        Pipeline.from_file(config, index_path=123)  # type: ignore[arg-type]
    for settings in ([None], "trace.log=x", [b"x=1"]):
        with pytest.raises(SieveError, match="settings are a list of PATH=VALUE texts"):
            Pipeline.from_file(config, settings=settings)  # type: ignore[arg-type]
    pipeline = Pipeline.from_file(config)
    with pytest.raises(QueryError, match="run's query must be an engine.model.Query"):
        pipeline.run("vitamin d")  # type: ignore[arg-type]
    result = pipeline.run(pipeline.make_query("vitamin d"), keep_outcomes=True)
    with pytest.raises(QueryError, match="explain's candidate must be"):
        pipeline.explain("doc-id", result.outcomes)  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="explain's outcomes must be"):
        pipeline.explain(result.results[0], None)  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="the trace must be a dict"):
        pipeline.log_trace(None)  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="the log path must be"):
        pipeline.log_trace(result.trace, 123)  # type: ignore[arg-type]
    with pytest.raises(TraceError, match="holds a value JSON cannot hold"):
        pipeline.log_trace({"schema": "sieve.trace/1", "x": {1, 2}}, tmp_path / "log.jsonl")
    from engine.trace import TraceLog, load_trace

    with pytest.raises(TraceError, match="a trace log's path is a str or a pathlib.Path"):
        TraceLog(None)  # type: ignore[arg-type]
    with pytest.raises(TraceError, match="a trace's path is a str or a pathlib.Path"):
        load_trace(None)  # type: ignore[arg-type]
    with pytest.raises(TraceError, match="seq is a record number"):
        load_trace(tmp_path / "log.jsonl", seq="0")  # type: ignore[arg-type]  (before: "holds no trace with seq 0")


def test_search_takes_log_as_true_or_false_only(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipeline = Pipeline.from_file(config)
    with pytest.raises(QueryError, match="log is True or False.*log_trace"):
        pipeline.search("vitamin d", log="other.jsonl")  # type: ignore[arg-type]
    assert not (tmp_path / "traces").exists() and not (tmp_path / "other.jsonl").exists()  # before: config's log


def test_a_relative_trace_log_stays_where_the_pipeline_was_made(config, tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)
    pipeline = Pipeline.from_file(config)
    pipeline.search("vitamin d")
    monkeypatch.chdir(second)
    result = pipeline.search("vitamin d")
    assert result.trace["log"]["path"] == str(first / "traces" / "rel.jsonl") and result.trace["log"]["seq"] == 1
    assert not (second / "traces").exists()  # before: a second chain, at seq 0, under b/
    assert check_log(first / "traces" / "rel.jsonl").records == 2


def _held(path: Path) -> int:
    """How many of this process's descriptors name a file under ``path`` (the index's directory and sqlite file)."""
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        held += target.startswith(str(path))
    return held


def test_a_pipeline_closes_what_it_opened_and_refuses_queries_after(config, bm25_index):
    """F7: no close() or context manager: a dropped pipeline held its index's files until the cyclic GC ran."""
    import gc

    gc.disable()
    try:
        before = _held(bm25_index)
        with Pipeline.from_file(config) as pipeline:
            pipeline.search("vitamin d", log=False)
            assert _held(bm25_index) > before
        assert _held(bm25_index) == before  # at the end of the block, not at the next garbage collection
        with pytest.raises(SieveError, match="this Pipeline was closed"):
            pipeline.search("vitamin d", log=False)
        pipeline.close()  # again: nothing to do
    finally:
        gc.enable()


def test_closing_a_pipeline_that_shares_anothers_index_leaves_it_open(config):
    first = Pipeline.from_file(config)
    first.search("vitamin d", log=False)
    second = Pipeline.from_file(config)
    second.warm_up(reuse=first.resources)  # as sieve sweep's variants share one index and its models
    second.close()
    assert first.search("vitamin d", log=False).results  # still open
    first.close()


def test_a_pipeline_says_when_its_index_was_rebuilt_under_it(tmp_path, mini_corpus):
    """F8: a running pipeline kept serving the index it opened after a rebuild (by design) with no library call to
    see it; index_state() says so, as the server's /readyz does."""
    from engine.index import build_index

    build_index(mini_corpus, tmp_path / "idx", {"bm25": {}})
    config = tmp_path / "p.yaml"
    config.write_text(f"version: 1\nindex: {tmp_path / 'idx'}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                      "output: bm25\ntrace: {log: null}\n", encoding="utf-8")
    with Pipeline.from_file(config) as pipeline:
        assert pipeline.index_state() is None  # not opened yet
        pipeline.search("vitamin d", log=False)
        assert pipeline.index_state()["replaced_on_disk"] is False
        build_index(mini_corpus, tmp_path / "idx", {"bm25": {"k1": 1.2}})  # another index at the same path
        state = pipeline.index_state()
        assert state["replaced_on_disk"] is True and state["on_disk_manifest_sha256"] != state["serving_manifest_sha256"]


def test_review_findings_on_this_change(config, tmp_path, monkeypatch):
    """Review of this change: settings given as a generator were consumed by the new check and dropped; a removed
    working directory made every Pipeline fail to be made; a trace's models, stage ids or query text of the wrong
    kind still reached replay as internal errors."""
    one = Pipeline.from_file(config, settings=(s for s in ["stages.bm25.params.top_k=3"]))
    assert len(one.search("vitamin d", log=False).results) == 3
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    Pipeline.from_file(config)  # before: FileNotFoundError from Path.cwd()
    monkeypatch.chdir(tmp_path)
    trace = one.search("vitamin d", log=False).trace
    for edit in (lambda t: t.__setitem__("models", ["x"]), lambda t: t["stages"][0].__setitem__("id", 3),
                 lambda t: t["query"].__setitem__("text", 5)):
        broken = json.loads(json.dumps(trace))
        edit(broken)
        with pytest.raises(TraceError, match="not a trace that can be replayed"):
            replay_trace(broken)


def test_a_trace_holding_nan_is_refused_and_the_log_keeps_valid_json(config, tmp_path):
    """Library audit leftover: ``log_trace`` wrote a bare ``NaN`` into the log (no JSON; jq and other readers fail
    on the line). A pipeline's own traces hold finite numbers only (each stage's output is checked), so only a
    trace built or edited by hand is refused; the log is left as it was."""
    from engine.trace import TraceLog

    pipeline = Pipeline.from_file(config)
    result = pipeline.search("metformin", log=False)
    log = tmp_path / "log.jsonl"
    pipeline.log_trace(result.trace, log)
    before = log.read_bytes()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(TraceError, match="NaN or Infinity"):
            pipeline.log_trace({**result.trace, "extra": {"score": bad}}, log)
        with pytest.raises(TraceError, match="NaN or Infinity"):
            TraceLog(log).append({"schema": "sieve.trace/1", "x": [bad]})
    assert log.read_bytes() == before
    assert all(json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in before.splitlines())
