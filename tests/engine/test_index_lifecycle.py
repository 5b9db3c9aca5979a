"""An index's life in production (operations audit): rebuilt in place under a running server or long-lived
Pipeline, rebuilt from an unchanged corpus, kept for replay, built twice at once, and a server whose trace
log's disk fills up. Each test fails on the engine before these findings were fixed."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import engine.server as server_module
from engine.cli import app as cli_app
from engine.errors import SieveIndexError, TraceError
from engine.index import Index, build_index, kept_copy, manifest_sha256_of
from engine.pipeline import Pipeline
from engine.replay import replay_trace
from engine.server import create_app, serve_in_subprocess

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "examples" / "scifact-mini"


def corpus_a(count: int = 40) -> list[dict]:
    return [{"_id": f"d{i:02d}", "title": f"Document {i}", "text": f"common words about topic {i} version a",
             "acl": "public" if i % 2 else "confidential"} for i in range(count)]


def corpus_b(count: int = 40) -> list[dict]:
    """Version b: the same ids in the reverse order (other rows), other text and metadata."""
    return [{"_id": f"d{i:02d}", "title": f"Rebuilt {i}", "text": f"common words REBUILT {i} version b",
             "acl": "changed"} for i in reversed(range(count))]


def write_corpus(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


PIPELINE = """version: 1
name: {name}
index: {index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 40}}}}
  - {{id: final, type: select.top_k, inputs: [bm25], params: {{k: 10}}}}
output: final
trace: {{log: {log}}}
"""


@pytest.fixture
def served_index(tmp_path: Path) -> tuple[Path, dict[str, dict], Path]:
    """(index dir built from version a, version a by id, version b's corpus file)."""
    a = write_corpus(tmp_path / "a.jsonl", corpus_a())
    b = write_corpus(tmp_path / "b.jsonl", corpus_b())
    index = tmp_path / "idx"
    build_index(a, index, {"bm25": {}})
    return index, {r["_id"]: r for r in corpus_a()}, b


# --------------------------------------------------------------------------- 1. rebuilt under a long-lived reader


def _check_documents(pipeline: Pipeline, expected: dict[str, dict], query: str) -> list[str]:
    """Run a query and read its documents as the server's response does; the mismatches found."""
    result = pipeline.search(query, log=False)
    index = pipeline.resources.index
    documents = index.documents.get([c.row for c in result.results])
    wrong = []
    for candidate in result.results:
        document = documents[candidate.row]
        want = expected[candidate.doc_id]
        if (document.doc_id, document.text, document.metadata.get("acl")) != (candidate.doc_id, want["text"],
                                                                              want["acl"]):
            wrong.append(f"{candidate.doc_id}: got {document.doc_id} {document.text!r} {document.metadata}")
    assert result.results
    return wrong


def test_a_rebuild_in_place_is_never_mixed_into_a_long_lived_pipeline(served_index, tmp_path):
    index_dir, version_a, corpus_b_file = served_index
    config = tmp_path / "p.yaml"
    config.write_text(PIPELINE.format(name="p", index=index_dir, log="null"), encoding="utf-8")
    pipeline = Pipeline.from_file(config)
    with ThreadPoolExecutor(2) as pool:  # threads that open their connections before the rebuild
        assert list(pool.map(lambda q: _check_documents(pipeline, version_a, q), ["common words"] * 4)) == [[]] * 4
    serving = pipeline.resources.index.manifest_sha256

    build_index(corpus_b_file, index_dir, {"bm25": {}})  # swapped in; the old directory is deleted

    # new threads (and the main thread, which never read a document) read the version the pipeline opened
    for _ in range(2):
        found: list[list[str]] = []
        threads = [threading.Thread(target=lambda: found.append(_check_documents(pipeline, version_a, "common words")))
                   for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert found == [[]] * 6
    assert _check_documents(pipeline, version_a, "topic version") == []
    state = pipeline.resources.index.disk_state()
    assert state["replaced_on_disk"] is True and state["serving_manifest_sha256"] == serving
    assert state["on_disk_manifest_sha256"] == manifest_sha256_of(index_dir) != state["serving_manifest_sha256"]
    # a new pipeline serves the new version
    fresh = Pipeline.from_file(config)
    assert _check_documents(fresh, {r["_id"]: r for r in corpus_b()}, "common words") == []


def test_a_component_is_not_handed_out_from_a_replaced_index(served_index):
    index_dir, _, corpus_b_file = served_index
    index = Index.open(index_dir)
    assert index.component("bm25")[0] == index_dir / "bm25"
    assert index.disk_state() == {"path": str(index_dir), "replaced_on_disk": False, "rebuilt_identically": False,
                                  "serving_manifest_sha256": index.manifest_sha256,
                                  "on_disk_manifest_sha256": index.manifest_sha256}
    build_index(corpus_b_file, index_dir, {"bm25": {}})
    with pytest.raises(SieveIndexError, match="was replaced on disk"):
        index.component("bm25")


def test_a_server_keeps_serving_the_version_it_opened_and_says_the_index_was_replaced(served_index, tmp_path):
    index_dir, version_a, corpus_b_file = served_index
    config = tmp_path / "srv.yaml"
    config.write_text(PIPELINE.format(name="srv", index=index_dir, log=tmp_path / "trace.jsonl"), encoding="utf-8")
    serving = manifest_sha256_of(index_dir)

    def mismatches(response: httpx.Response) -> list[str]:
        assert response.status_code == 200, response.text
        return [r["doc_id"] for r in response.json()["results"]
                if (r["document"]["text"], r["document"]["metadata"].get("acl"))
                != (version_a[r["doc_id"]]["text"], version_a[r["doc_id"]]["acl"])]

    def ask(base: str, number: int) -> httpx.Response:
        return httpx.post(f"{base}/v1/pipelines/srv/search", json={"query": f"common words {number}"}, timeout=60)

    with serve_in_subprocess([config], cwd=tmp_path) as base:
        assert mismatches(ask(base, 0)) == []  # one worker thread has opened its connection
        assert httpx.get(f"{base}/readyz").json() == {"status": "ready", "pipelines": ["srv"]}
        build_index(corpus_b_file, index_dir, {"bm25": {}})
        with ThreadPoolExecutor(16) as pool:  # concurrent requests: worker threads that start after the rebuild
            answers = list(pool.map(lambda n: ask(base, n), range(48)))
        assert [mismatches(a) for a in answers] == [[]] * 48
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 200  # it still answers consistently, from the version it opened
        assert ready.json() == {
            "status": "ready", "pipelines": ["srv"], "index_replaced_on_disk": True,
            "indexes": {"srv": {"path": str(index_dir), "serving_manifest_sha256": serving,
                                "on_disk_manifest_sha256": manifest_sha256_of(index_dir)}}}
        [listed] = httpx.get(f"{base}/v1/pipelines").json()["pipelines"]
        assert listed["index"]["replaced_on_disk"] is True and listed["index"]["serving_manifest_sha256"] == serving


def test_the_replaced_index_is_logged_once_per_change(served_index, tmp_path, caplog):
    from starlette.testclient import TestClient

    index_dir, _, corpus_b_file = served_index
    config = tmp_path / "p.yaml"
    config.write_text(PIPELINE.format(name="p", index=index_dir, log="null"), encoding="utf-8")
    pipelines = server_module.load_pipelines([config])
    client = TestClient(create_app(pipelines))
    assert "index_replaced_on_disk" not in client.get("/readyz").json()
    build_index(corpus_b_file, index_dir, {"bm25": {}})
    with caplog.at_level(logging.WARNING, logger="sieve.server"):
        for _ in range(3):
            assert client.get("/readyz").json()["index_replaced_on_disk"] is True
            assert client.post("/v1/pipelines/p/search", json={"query": "common"}).status_code == 200
    warned = [r for r in caplog.records if "was replaced on disk" in r.getMessage()]
    assert len(warned) == 1 and "restart" in warned[0].getMessage()


def test_an_index_rebuilt_identically_is_not_reported_as_replaced(served_index, tmp_path, caplog):
    """Builds are deterministic: the same corpus and settings give the very manifest served. /readyz said
    index_replaced_on_disk (and the log said to restart) with the serving and on-disk sha256 equal; an identical
    rebuild is now shown as such, with nothing to restart for, and another corpus is still reported."""
    from starlette.testclient import TestClient

    index_dir, _, corpus_b_file = served_index
    corpus_a_file = tmp_path / "a.jsonl"  # what served_index built from
    config = tmp_path / "p.yaml"
    config.write_text(PIPELINE.format(name="p", index=index_dir, log="null"), encoding="utf-8")
    pipelines = server_module.load_pipelines([config])
    client = TestClient(create_app(pipelines))
    serving = pipelines["p"].resources.index.manifest_sha256

    def rebuilt_identically() -> None:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready", "pipelines": ["p"]}
        [listed] = client.get("/v1/pipelines").json()["pipelines"]
        assert listed["index"] == {"path": str(index_dir), "replaced_on_disk": False, "rebuilt_identically": True,
                                   "serving_manifest_sha256": serving, "on_disk_manifest_sha256": serving}
        assert client.post("/v1/pipelines/p/search", json={"query": "common"}).status_code == 200

    with caplog.at_level(logging.INFO, logger="sieve.server"):
        build_index(corpus_a_file, index_dir, {"bm25": {}})  # the same corpus and settings: a new directory
        assert manifest_sha256_of(index_dir) == serving and pipelines["p"].resources.index.replaced_on_disk()
        for _ in range(2):
            rebuilt_identically()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        [said] = [r.getMessage() for r in caplog.records if "rebuilt identically" in r.getMessage()]
        assert "no restart needed" in said and "restart it" not in said
        # another corpus is still a replacement: reported, with the advice to restart, once
        build_index(corpus_b_file, index_dir, {"bm25": {}})
        for _ in range(2):
            ready = client.get("/readyz").json()
            assert ready["index_replaced_on_disk"] is True
            assert ready["indexes"]["p"]["on_disk_manifest_sha256"] == manifest_sha256_of(index_dir) != serving
        [listed] = client.get("/v1/pipelines").json()["pipelines"]
        assert listed["index"]["replaced_on_disk"] is True and listed["index"]["rebuilt_identically"] is False
        # and built back to the version served: identical again, then replaced again (each said once more)
        build_index(corpus_a_file, index_dir, {"bm25": {}})
        rebuilt_identically()
        build_index(corpus_b_file, index_dir, {"bm25": {}})
        assert client.get("/readyz").json()["index_replaced_on_disk"] is True
    warned = [r.getMessage() for r in caplog.records if "was replaced on disk" in r.getMessage()]
    assert len(warned) == 2 and all("restart" in w for w in warned)
    assert len([r for r in caplog.records if "rebuilt identically" in r.getMessage()]) == 2


# --------------------------------------------------------------------------- 2. deterministic builds, replay notes


def _build_in_subprocess(corpus: Path, out: Path, seed: str) -> None:
    script = ("import sys; from pathlib import Path; from engine.index import build_index; "
              "build_index(Path(sys.argv[1]), Path(sys.argv[2]), {'bm25': {}})")
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run([sys.executable, "-c", script, str(corpus), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("determinism")
    _build_in_subprocess(MINI, root / "one", "1")
    _build_in_subprocess(MINI, root / "two", "2")
    return root / "one", root / "two"


def test_builds_under_other_hash_seeds_give_the_same_manifest_and_document_store(two_builds):
    one, two = two_builds

    def without_bm25_hashes(directory: Path) -> dict:  # the bm25 files' bytes: see the next test
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("bm25/")}
        return manifest

    assert without_bm25_hashes(one) == without_bm25_hashes(two)
    assert (one / "docs.sqlite").read_bytes() == (two / "docs.sqlite").read_bytes()
    assert "created_at" not in json.loads((one / "manifest.json").read_text())
    assert "created_at" in json.loads((one / "build.json").read_text())  # the build time, outside the manifest


def test_builds_under_other_hash_seeds_give_byte_identical_component_files(two_builds):
    one, two = two_builds
    assert (one / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()
    assert _files(one) == {**_files(two), "build.json": _files(one)["build.json"]}


def _bm25_config(tmp_path: Path, index: Path) -> Path:
    config = tmp_path / "replay.yaml"
    config.write_text(PIPELINE.format(name="r", index=index, log="null"), encoding="utf-8")
    return config


def test_a_rebuild_of_an_unchanged_corpus_that_differs_in_bytes_only_is_a_note(tmp_path):
    index = tmp_path / "idx"
    build_index(MINI, index, {"bm25": {}})
    trace = Pipeline.from_file(_bm25_config(tmp_path, index)).search("vitamin D and bone density", log=False).trace
    assert trace["index"]["component_settings"]["bm25"]["k1"] == 1.5
    # as after a rebuild whose bm25 files differ in their bytes (another vocabulary order): another manifest
    trace["index"]["manifest_sha256"] = "f" * 64
    trace["index"]["component_sha256"]["bm25"] = "e" * 64
    report = replay_trace(trace)
    assert report["identical"], report["differences"]
    [note] = [n for n in report["notes"] if n.startswith("index manifest differs")]
    assert "the files of bm25 differ" in note and "same components and settings" in note and "not counted" in note
    # a trace that does not record the settings cannot be shown to be alike: still a difference
    del trace["index"]["component_settings"]
    report = replay_trace(trace)
    [named] = report["differences"]
    assert "does not record the components' settings" in named and "--index" in named


def test_a_rebuild_with_the_gazetteer_elsewhere_is_a_note_not_a_difference(tmp_path):
    """Older-trace audit F3: the manifest records where the gazetteer lay, and replay compared the settings with that
    path in them, so the same corpus, gazetteer bytes and settings rebuilt on an auditor's machine (another checkout)
    was 'another index' though every component's file was identical."""
    medical = ROOT / "examples" / "medical" / "corpus.jsonl"
    first, second = tmp_path / "here" / "entities.yaml", tmp_path / "there" / "entities.yaml"
    for place in (first, second):
        place.parent.mkdir()
        place.write_bytes((ROOT / "configs" / "medical" / "entities.yaml").read_bytes())
    index = tmp_path / "idx"
    build_index(medical, index, {"bm25": {}, "entities": {"gazetteer": str(first)}})
    trace = Pipeline.from_file(_bm25_config(tmp_path, index)).search("metformin kidney", log=False).trace
    build_index(medical, index, {"bm25": {}, "entities": {"gazetteer": str(second)}})
    assert trace["index"]["manifest_sha256"] != manifest_sha256_of(index)  # the path is in the manifest
    report = replay_trace(trace)
    assert report["identical"], report["differences"]
    [note] = [n for n in report["notes"] if n.startswith("index manifest differs")]
    assert "every component's files are identical (only the manifest differs: where the corpus or a gazetteer" in note


def test_other_settings_or_other_results_are_still_a_difference(tmp_path):
    index = tmp_path / "idx"
    build_index(MINI, index, {"bm25": {}})
    trace = Pipeline.from_file(_bm25_config(tmp_path, index)).search("vitamin D and bone density", log=False).trace
    build_index(MINI, index, {"bm25": {"k1": 1.2}})
    report = replay_trace(trace)
    assert not report["identical"]
    [named] = [d for d in report["differences"] if d.startswith("index manifest differs")]
    assert "the settings differ: bm25 k1 1.5 -> 1.2" in named and "--keep-previous" in named  # which, and how
    assert any("score" in d for d in report["differences"] if d is not named)
    # a setting a newer engine records, which the traced index's older engine did not: said as such
    trace["index"]["component_settings"]["bm25"]["tokenizer"].pop("normalization")
    [named] = [d for d in replay_trace(trace)["differences"] if d.startswith("index manifest differs")]
    assert 'tokenizer.normalization (not recorded) -> "nfkc"' in named, named


def test_a_component_added_or_removed_by_a_rebuild_is_said_so_in_replay(served_index, tmp_path):
    """A trace made on a bm25-only index replayed against the index rebuilt with bm25 + dense said "the files of
    dense differ; the settings of dense differ": dense was added (and, the other way, removed)."""
    index_dir, _, _ = served_index  # bm25 only, from corpus a
    corpus_a_file = tmp_path / "a.jsonl"
    config = _bm25_config(tmp_path, index_dir)
    bm25_only = Pipeline.from_file(config).search("common words", log=False).trace
    assert bm25_only["index"]["components"] == ["bm25"]

    build_index(corpus_a_file, index_dir, {"bm25": {}, "dense": {}})
    [named] = [d for d in replay_trace(bm25_only)["differences"] if d.startswith("index manifest differs")]
    assert "the corpus is the same" in named and "the component dense was added" in named, named
    assert "dense differ" not in named and "files of bm25" not in named and "settings differ" not in named
    assert "removed" not in named and "--keep-previous" in named

    with_dense = Pipeline.from_file(config).search("common words", log=False).trace
    assert with_dense["index"]["components"] == ["bm25", "dense"]
    build_index(corpus_a_file, index_dir, {"bm25": {"k1": 1.2}})
    [named] = [d for d in replay_trace(with_dense)["differences"] if d.startswith("index manifest differs")]
    assert "the component dense was removed" in named, named
    assert "dense differ" not in named and "the settings differ: bm25 k1" in named and "added" not in named


# --------------------------------------------------------------------------- 3. keeping the replaced index for replay


def test_keep_previous_moves_the_replaced_index_aside_and_replay_names_it(tmp_path, served_index):
    index_dir, _, corpus_b_file = served_index
    config = _bm25_config(tmp_path, index_dir)
    trace = Pipeline.from_file(config).search("common words", log=False).trace
    traced = manifest_sha256_of(index_dir)
    assert trace["index"]["manifest_sha256"] == traced
    built = CliRunner().invoke(cli_app, ["index", str(corpus_b_file), "--out", str(index_dir), "--keep-previous"])
    assert built.exit_code == 0, built.output
    kept = index_dir.parent / f"idx.{traced[:12]}"
    assert kept_copy(index_dir, traced) == kept and f"kept in {kept}" in built.output.replace("\n", "")
    assert Index.open(kept).manifest_sha256 == traced and manifest_sha256_of(index_dir) != traced
    report = replay_trace(trace)
    [named] = [d for d in report["differences"] if d.startswith("index manifest differs")]
    assert f"replay with --index {kept}" in named
    assert replay_trace(trace, index_path=kept)["identical"]
    # without --keep-previous the replaced index is deleted, and replay says what to do
    build_index(write_corpus(tmp_path / "c.jsonl", corpus_a(12)), index_dir, {"bm25": {}})
    assert sorted(p.name for p in index_dir.parent.iterdir() if p.name.startswith("idx")) == ["idx", kept.name]
    trace_b = dict(trace, index={**trace["index"], "manifest_sha256": "a" * 64})
    [named] = [d for d in replay_trace(trace_b)["differences"] if d.startswith("index manifest differs")]
    assert "replay with --index DIR" in named and "--keep-previous" in named


# --------------------------------------------------------------------------- 4. concurrent builds, corpus path


def test_a_second_concurrent_build_of_one_out_fails_at_once(tmp_path):
    out = tmp_path / "idx"
    ready = tmp_path / "ready"
    script = f"""
import time
from pathlib import Path
from engine.index import build_index

def slow(task, advance, total):
    Path({str(ready)!r}).write_text("building")
    time.sleep(60)

build_index(Path({str(MINI)!r}), Path({str(out)!r}), {{"bm25": {{}}}}, slow)
"""
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(SieveIndexError, match=rf"another build of {out} is running \(pid {child.pid}, started"):
            build_index(MINI, out, {"bm25": {}})
        assert time.monotonic() - started < 10
        assert not out.exists()
        refused = CliRunner().invoke(cli_app, ["index", str(MINI), "--out", str(out)])
        assert refused.exit_code != 0 and "another build" in str(refused.exception)  # main() prints it, exit 2
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
    build_index(MINI, out, {"bm25": {}})  # the lock went with the killed build
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "ready"]


def test_the_manifest_records_the_corpus_by_its_absolute_path(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus.jsonl", corpus_a(3))
    monkeypatch.chdir(tmp_path)
    manifest = build_index(Path("corpus.jsonl"), Path("idx"), {"bm25": {}})
    assert manifest["corpus"]["source"] == str(tmp_path / "corpus.jsonl")
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["corpus"]["source"] == str(tmp_path / "corpus.jsonl")


# --------------------------------------------------------------------------- 5. readiness follows the trace log


def test_readyz_is_503_while_the_trace_log_cannot_be_appended_and_recovers_without_a_query(tmp_path, bm25_index):
    log = tmp_path / "logs" / "trace.jsonl"
    log.parent.mkdir()
    config = tmp_path / "srv.yaml"
    config.write_text(PIPELINE.format(name="srv", index=bm25_index, log=log), encoding="utf-8")
    with serve_in_subprocess([config], cwd=tmp_path) as base:
        def search() -> httpx.Response:
            return httpx.post(f"{base}/v1/pipelines/srv/search", json={"query": "vitamin D"}, timeout=60)

        assert search().status_code == 200
        log.rename(log.with_name("aside"))
        log.mkdir()  # the log's path is a directory: every append fails (even for root)
        failed = search()
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "trace_not_logged"
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503, ready.text
        error = ready.json()["error"]
        assert error["type"] == "trace_log_failing" and error["pipelines"] == ["srv"]
        assert "the last trace append failed" in error["message"] and f"{log} is not a file" in error["message"]
        assert httpx.get(f"{base}/readyz").status_code == 503  # still: no append has succeeded
        log.rmdir()
        log.with_name("aside").rename(log)
        assert httpx.get(f"{base}/readyz").status_code == 200  # no query needed to recover
        assert search().status_code == 200


def test_readyz_reports_a_full_disk_until_space_is_free(tmp_path, bm25_index, monkeypatch):
    from starlette.testclient import TestClient

    config = tmp_path / "p.yaml"
    config.write_text(PIPELINE.format(name="p", index=bm25_index, log=tmp_path / "trace.jsonl"), encoding="utf-8")
    pipelines = server_module.load_pipelines([config])
    client = TestClient(create_app(pipelines))
    Stats = namedtuple("Stats", "f_bavail f_bfree f_frsize")
    free = {"blocks": 0}
    monkeypatch.setattr(server_module.os, "statvfs", lambda path: Stats(free["blocks"], free["blocks"], 4096))
    real_log = pipelines["p"].log_trace

    def disk_full(trace, log_path=None):
        raise TraceError("cannot append to the trace log: No space left on device") from OSError(
            errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipelines["p"], "log_trace", disk_full)
    assert client.get("/readyz").status_code == 200  # nothing failed yet: no check, whatever the disk
    assert client.post("/v1/pipelines/p/search", json={"query": "vitamin D"}).status_code == 500
    for _ in range(2):
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "No space left on device" in ready.json()["error"]["message"]
        assert "0 bytes free" in ready.json()["error"]["message"]
    free["blocks"] = 10_000  # space freed: ready again at the next probe
    assert client.get("/readyz").status_code == 200
    # a failure about one trace (not the log's storage) does not take the server out of rotation
    monkeypatch.setattr(pipelines["p"], "log_trace", lambda trace, log_path=None: (_ for _ in ()).throw(
        TraceError("cannot append to the trace log: text that is not valid Unicode")))
    assert client.post("/v1/pipelines/p/search", json={"query": "vitamin D"}).status_code == 500
    assert client.get("/readyz").status_code == 200
    # and an append that succeeds clears a failure at once
    monkeypatch.setattr(pipelines["p"], "log_trace", disk_full)
    free["blocks"] = 0
    assert client.post("/v1/pipelines/p/search", json={"query": "vitamin D"}).status_code == 500
    assert client.get("/readyz").status_code == 503
    monkeypatch.setattr(pipelines["p"], "log_trace", real_log)
    assert client.post("/v1/pipelines/p/search", json={"query": "vitamin D"}).status_code == 200
    assert client.get("/readyz").status_code == 200


def test_a_pipeline_whose_index_is_rebuilt_while_it_warms_up_opens_it_again(served_index, tmp_path):
    """A stage may read the new version's files while the document store is the old one's: a Pipeline (not only the
    server) opens the index again when it was replaced during warm-up, and serves the new version consistently."""
    from engine import registry
    from engine.stage import Stage, StageParams, StageResult

    index, _, corpus_b_file = served_index
    rebuilds = []

    class RebuildsOnce(Stage):
        type_name = "test.rebuild_once"
        version = 1
        Params = StageParams
        summary = "test only: rebuilds the index (once) while the pipeline warms up"

        def warm_up(self, resources):
            if not rebuilds:
                rebuilds.append(True)
                build_index(corpus_b_file, index, {"bm25": {}})

        def run(self, ctx):
            (incoming,) = ctx.inputs
            return StageResult(candidates=list(incoming))

    registry.register_stage(RebuildsOnce)
    try:
        config = tmp_path / "p.yaml"
        config.write_text(PIPELINE.format(name="p", index=index, log="null").replace(
            "  - {id: final, type: select.top_k, inputs: [bm25]",
            "  - {id: rebuild, type: test.rebuild_once, inputs: [bm25]}\n"
            "  - {id: final, type: select.top_k, inputs: [rebuild]"), encoding="utf-8")
        pipeline = Pipeline.from_file(config)
        pipeline.warm_up()
        assert rebuilds == [True] and not pipeline.resources.index.replaced_on_disk()
        expected = {r["_id"]: r for r in corpus_b()}
        assert _check_documents(pipeline, expected, "common words REBUILT") == []
    finally:
        registry._stages.pop(RebuildsOnce.type_name)


def test_an_identical_rebuild_by_another_engine_version_is_not_reported_as_replaced(served_index, tmp_path):
    """From an upgrade audit: an index rebuilt by a newer Sieve, every file byte-identical, was reported replaced
    (restart it) because its manifest records the engine's version; replay already called the same case a note.
    A manifest that differs only in that is an identical rebuild; any other difference is still a replacement."""
    index_dir, _, _ = served_index
    index = Index.open(index_dir)
    build_index(tmp_path / "a.jsonl", index_dir, {"bm25": {}})  # what served_index built from: the same index
    manifest = json.loads((index_dir / "manifest.json").read_text(encoding="utf-8"))
    (index_dir / "manifest.json").write_text(json.dumps({**manifest, "engine_version": "99.0.0"}), encoding="utf-8")
    state = index.disk_state()
    assert state["on_disk_manifest_sha256"] != state["serving_manifest_sha256"]
    assert (state["replaced_on_disk"], state["rebuilt_identically"]) == (False, True)
    name = next(iter(manifest["files"]))
    changed = {**manifest, "engine_version": "99.0.0", "files": {**manifest["files"], name: "0" * 64}}
    (index_dir / "manifest.json").write_text(json.dumps(changed), encoding="utf-8")
    assert (index.disk_state()["replaced_on_disk"], index.disk_state()["rebuilt_identically"]) == (True, False)


def test_a_read_racing_close_of_a_replaced_index_is_an_index_error(served_index, monkeypatch):
    """Review leftover: a thread that found the index replaced (no connection of its own: it reads the version
    opened) while another thread closed the index met ``assert self._pinned is not None``. The interleaving is
    forced: the close lands between the thread's check and its read of the pinned connection."""
    import engine.index as index_module

    index_dir, _, corpus_b_file = served_index
    index = Index.open(index_dir)
    index.documents.get([0])  # this thread's connection, then dropped as a thread started after the rebuild has none
    index.documents._local.connection = None
    build_index(corpus_b_file, index_dir, {"bm25": {}})
    checked = index_module.DocumentStore._connection

    def closed_meanwhile(store):
        connection = checked(store)
        store.close()  # what Pipeline.close() in another thread does, in this window
        return connection

    monkeypatch.setattr(index_module.DocumentStore, "_connection", closed_meanwhile)
    with pytest.raises(SieveIndexError, match="closed while a query read it"):
        index.documents.get([0])
