"""Findings of the crash-consistency audit (report-only helper), each with what happened before the fix:

M1. `sieve report --html` wrote in place: a full disk left a cut report over a whole one; a FIFO hung it;
M2. a dense build on a full disk ended in faiss's RuntimeError, "internal error ... a bug in Sieve";
M3. a build killed while deleting its default build cache left a cache without its marker that every later build
    of that output refused;
M6. an installed module that failed to import (memory ran out) was reported "not installed";
H2. two batches to one --out: the second replaced the first's finished results without --overwrite.
(H1, the swap and --keep-previous, is in test_index_robustness.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import MissingDependencyError, SieveIndexError
from engine.index import build_index
from tests.engine.test_index_robustness import dead_pid, leftovers, write_corpus

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _sieve(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=300)


def test_report_html_is_written_atomically_and_refuses_a_fifo(bm25_index, tmp_path, monkeypatch):
    config = tmp_path / "p.yaml"
    config.write_text(f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                      "output: bm25\ntrace: {log: null}\n", encoding="utf-8")
    trace = tmp_path / "trace.json"
    assert _sieve("search", config, "vitamin d", "--trace-out", trace).returncode == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = _sieve("report", trace, "--html", fifo)  # before: blocked for ever
    assert done.returncode == 2 and "is a FIFO (named pipe), not a regular file" in done.stderr, done.stderr
    report = tmp_path / "report.html"
    assert _sieve("report", trace, "--html", report).returncode == 0
    whole = report.read_bytes()

    from engine.workbench import report as module

    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("engine.trace.os.fsync", full_disk)
    with pytest.raises(OSError):
        module.write_report(json.loads(trace.read_text(encoding="utf-8")), report)
    monkeypatch.undo()
    assert report.read_bytes() == whole  # before: 16 KB of cut HTML over the whole report


def test_a_dense_build_on_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    import faiss

    def full_disk(index, path):
        raise RuntimeError("Error in void faiss::write_index(...) at index_write.cpp:499: Error: 'ret == (size * 4)' "
                           "failed: write error in vectors.faiss: 45011 != 460800 (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    corpus = write_corpus(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "text": f"zebra {i}"} for i in range(4)])
    with pytest.raises(SieveIndexError) as caught:
        build_index(corpus, tmp_path / "idx", {"dense": {}})
    message = str(caught.value)
    assert "writing vectors.faiss failed: No space left on device" in message
    assert "any previous index there is unchanged" in message


def test_a_build_killed_while_deleting_its_cache_does_not_block_the_next_build(tmp_path, monkeypatch):
    import shutil

    corpus = write_corpus(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "text": f"zebra {i}"} for i in range(4)])
    out = tmp_path / "idx"
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # the marker goes first, then the process is killed
        marker = Path(path) / "sieve-build-cache.json"
        if marker.exists():
            marker.unlink()
            raise SystemExit(143)
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr("engine.index.shutil.rmtree", killed_midway)
    with pytest.raises(SystemExit):
        build_index(corpus, out, {"dense": {}})
    monkeypatch.undo()
    assert not (tmp_path / ".idx.build-cache").exists()  # before: there, its marker gone, refused from then on
    build_index(corpus, out, {"dense": {}})  # before: "cannot use the build cache ...: it holds other files"
    half = tmp_path / f".idx.gone-{dead_pid()}-1700000000000" / "dense"
    half.mkdir(parents=True)
    build_index(corpus, out, {"dense": {}})
    assert not half.parent.exists()  # a dead build's half-deleted cache is swept


def test_a_module_that_fails_to_import_is_not_called_missing():
    try:
        raise ImportError("libfaiss.so: failed to map segment from shared object", name="faiss._swigfaiss")
    except ImportError:
        broken = MissingDependencyError("faiss", "faiss-cpu", "dense recall")
    assert "installed but could not be imported: ImportError: libfaiss.so: failed to map segment" in str(broken)
    try:
        raise ModuleNotFoundError("No module named 'faiss'", name="faiss")
    except ImportError:
        missing = MissingDependencyError("faiss", "faiss-cpu", "dense recall")
    assert "which is not installed; install it with: pip install faiss-cpu" in str(missing)


def test_a_batch_whose_out_appears_while_it_starts_is_refused(bm25_index, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from engine import cli
    from engine.workbench import batch

    config = tmp_path / "p.yaml"
    config.write_text(f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                      "output: bm25\ntrace: {log: null}\n", encoding="utf-8")
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "1", "text": "vitamin d"}\n', encoding="utf-8")
    out = tmp_path / "o.jsonl"
    lock = batch.lock_partial

    def another_batch_finishes_first(partial, *, fresh):
        out.write_text("the other batch's results\n", encoding="utf-8")
        return lock(partial, fresh=fresh)

    monkeypatch.setattr(batch, "lock_partial", another_batch_finishes_first)
    result = CliRunner().invoke(cli.app, ["batch", str(config), str(queries), "--out", str(out)])
    assert "another batch finished it while this one started" in str(result.exception), result.output
    assert out.read_text(encoding="utf-8") == "the other batch's results\n"  # before: replaced
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.jsonl.partial").exists()


def test_a_partial_file_renamed_to_out_between_open_and_lock_is_not_emptied(tmp_path, monkeypatch):
    """The second variant of H2: batch B opened OUT.partial just before batch A renamed it to OUT and let go of its
    lock; B then locked and emptied A's finished results."""
    import fcntl

    from engine.errors import SieveError
    from engine.workbench import batch

    partial, out = tmp_path / "o.jsonl.partial", tmp_path / "o.jsonl"
    partial.write_text("A's finished results\n", encoding="utf-8")
    real_flock = fcntl.flock

    def a_finishes_meanwhile(fd, operation):
        os.rename(partial, out)
        return real_flock(fd, operation)

    monkeypatch.setattr(batch.fcntl, "flock", a_finishes_meanwhile)
    with pytest.raises(SieveError, match="was renamed while this batch opened it"):
        batch.lock_partial(partial, fresh=True)
    assert out.read_text(encoding="utf-8") == "A's finished results\n"  # before: emptied


def test_a_trace_out_that_cannot_be_written_is_named(bm25_index, tmp_path, monkeypatch):
    """M5: a full disk under --trace-out said only "No space left on device (writing the output)"."""
    from typer.testing import CliRunner

    from engine import cli

    config = tmp_path / "p.yaml"
    log = tmp_path / "log.jsonl"
    config.write_text(f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                      f"output: bm25\ntrace: {{log: {log}}}\n", encoding="utf-8")

    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("engine.trace.os.fsync", full_disk)
    monkeypatch.setattr("engine.trace.TraceLog.append", lambda self, trace: {"seq": 7, "hash": "0" * 64})
    result = CliRunner().invoke(cli.app, ["search", str(config), "vitamin d", "--trace-out", str(tmp_path / "t.json")])
    message = str(result.exception)
    assert f"could not write --trace-out {tmp_path / 't.json'}: No space left on device" in message, message
    assert f"the trace is record seq 7 of {log}" in message


def test_an_index_opened_while_it_is_swapped_is_tried_again(tmp_path, monkeypatch):
    """M4: an open reading half the old directory and half the new said "incomplete ... missing" of a healthy index
    (18 of 150,433 opens during rebuilds); a raw sqlite3 error escaped too."""
    from engine.index import Index

    corpus = write_corpus(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "text": f"zebra {i}"} for i in range(4)])
    out = tmp_path / "idx"
    build_index(corpus, out, {"bm25": {}})
    real = Index._open_once.__func__
    calls = []

    def swapped_midway(cls, path, *, verify):
        calls.append(path)
        if len(calls) == 1:
            build_index(write_corpus(tmp_path / "other.jsonl", [{"_id": "x", "text": "zebra"}]), out, {"bm25": {}})
            raise SieveIndexError(f"index {out} is incomplete: bm25/params.index.json is missing")
        return real(cls, path, verify=verify)

    monkeypatch.setattr(Index, "_open_once", classmethod(swapped_midway))
    assert Index.open(out).doc_count == 1 and len(calls) == 2
    calls.clear()

    def broken(cls, path, *, verify):
        calls.append(path)
        raise SieveIndexError("truly incomplete")

    monkeypatch.setattr(Index, "_open_once", classmethod(broken))
    with pytest.raises(SieveIndexError, match="truly incomplete"):
        Index.open(out)
    assert len(calls) == 1  # not swapped: no second try
