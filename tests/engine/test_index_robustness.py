"""Building and opening indexes when things go wrong: foreign --out directories, bad output paths,
full disks, SIGTERM, stale staging directories, corrupt manifests and document stores, hostile
corpus lines. Every failure is a SieveError with a clear message, never a Python exception, and a
failed build leaves the previous index (and anything else at --out) exactly as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine.index as index_module
from engine.errors import SieveError, SieveIndexError
from engine.index import Index, build_index, manifest_sha256_of
from engine.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    {"_id": "a", "title": "Cats", "text": "Cats purr and sleep in the sun."},
    {"_id": "b", "title": "Dogs", "text": "Dogs bark at the postman.", "metadata": {"year": 2020}},
    {"_id": 3, "text": "Numbers are fine as ids."},
]


def write_corpus(path: Path, records: list | None = None, lines: list[str] | None = None) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in (records or [])) + "".join(line + "\n" for line in (lines or []))
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl", TINY)


@pytest.fixture
def previous(bm25_index: Path, tmp_path: Path) -> Path:
    """An existing index at --out (a copy of the session's index)."""
    target = tmp_path / "out" / "idx"
    target.parent.mkdir()
    shutil.copytree(bm25_index, target)
    return target


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def never_read(path: Path, max_errors: int = 20):
    raise AssertionError("the corpus was read: the output should have been refused before building")


# --------------------------------------------------------------------------- 1. never replace a foreign directory


@pytest.mark.parametrize(
    "manifest",
    ['{"name": "my-web-app", "start_url": "/"}', '["sieve.index/1"]', "not json at all", '{"format": "sieve.index/2"}'],
    ids=["web-app-manifest", "json-list", "not-json", "other-format"],
)
def test_a_directory_with_a_foreign_manifest_is_refused_before_building(tmp_path, tiny, monkeypatch, manifest):
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text(manifest)
    (app / "index.html").write_text("<html>my app</html>")
    before = snapshot(app)
    monkeypatch.setattr(index_module, "read_corpus", never_read)
    with pytest.raises(SieveIndexError) as caught:
        build_index(tiny, app, {"bm25": {}})
    assert f"{app} exists and is not a Sieve index; choose another --out or remove it yourself" in str(caught.value)
    assert snapshot(app) == before
    assert leftovers(tmp_path) == []


def test_a_directory_without_a_manifest_is_refused_and_an_empty_one_is_used(tmp_path, tiny):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(SieveIndexError, match="exists and is not a Sieve index.*no manifest.json"):
        build_index(tiny, notes, {"bm25": {}})
    assert (notes / "todo.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    build_index(tiny, empty, {"bm25": {}})
    assert Index.open(empty).doc_count == 3


def test_an_existing_index_is_replaced(previous, tiny):
    assert Index.open(previous).doc_count > 3
    build_index(tiny, previous, {"bm25": {}})
    assert Index.open(previous).doc_count == 3
    assert leftovers(previous.parent) == []


def test_the_target_is_checked_again_at_swap_time(tmp_path, tiny):
    target = tmp_path / "later"

    def someone_creates_a_folder(task, advance, total):
        if not target.exists():
            target.mkdir()
            (target / "manifest.json").write_text('{"name": "app"}')

    with pytest.raises(SieveIndexError, match="exists and is not a Sieve index"):
        build_index(tiny, target, {"bm25": {}}, someone_creates_a_folder)
    assert (target / "manifest.json").read_text() == '{"name": "app"}'
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- 2. output paths and I/O failures


def test_out_is_an_existing_file(tmp_path, tiny, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("data")
    monkeypatch.setattr(index_module, "read_corpus", never_read)
    with pytest.raises(SieveIndexError, match=r"afile exists and is not a Sieve index.*\(it is a file\)"):
        build_index(tiny, afile, {"bm25": {}})
    assert afile.read_text() == "data"


@pytest.mark.parametrize("below", ["sub", "sub/deeper/idx"])
def test_out_is_under_a_file(tmp_path, tiny, monkeypatch, below):
    afile = tmp_path / "afile"
    afile.write_text("data")
    monkeypatch.setattr(index_module, "read_corpus", never_read)
    with pytest.raises(SieveIndexError, match=f"{afile} is a file, not a directory"):
        build_index(tiny, afile / below, {"bm25": {}})
    assert afile.read_text() == "data"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_where_nothing_can_be_created(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(index_module, "read_corpus", never_read)
    for out in (Path("/proc/x"), Path("/proc/x/y/idx")):
        with pytest.raises(SieveIndexError, match=f"cannot build the index at {out}: cannot create /proc/"):
            build_index(tiny, out, {"bm25": {}})


def test_parents_created_for_a_failed_build_are_removed(tmp_path):
    bad = write_corpus(tmp_path / "bad.jsonl", lines=["not json"])
    with pytest.raises(SieveError, match="bad.jsonl:1: not a JSON object"):
        build_index(bad, tmp_path / "new" / "deeper" / "idx", {"bm25": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_a_full_disk_while_writing_the_document_store(previous, tiny, monkeypatch):
    before = snapshot(previous)

    def disk_full(documents, db_path, progress):
        db_path.write_bytes(b"partial")
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(index_module, "_write_documents", disk_full)
    with pytest.raises(SieveIndexError) as caught:
        build_index(tiny, previous, {"bm25": {}})
    message = str(caught.value)
    assert message.startswith(f"cannot build the index at {previous}: ")
    assert "docs.sqlite failed: database or disk is full" in message
    assert snapshot(previous) == before
    assert leftovers(previous.parent) == []


def test_a_full_disk_while_writing_a_component(previous, tiny, monkeypatch):
    from stages.recall.bm25 import BM25Component

    before = snapshot(previous)

    def no_space(self, documents, out_dir, settings, progress):
        (out_dir / "big.npy").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir / "big.npy"))

    monkeypatch.setattr(BM25Component, "build", no_space)
    with pytest.raises(SieveIndexError, match=f"cannot build the index at {previous}: .*big.npy: No space left on device"):
        build_index(tiny, previous, {"bm25": {}})
    assert snapshot(previous) == before
    assert leftovers(previous.parent) == []


def test_a_real_write_limit_is_a_clear_error(previous, tiny):
    """A process whose files may not grow past 16 KiB (RLIMIT_FSIZE): real failing writes."""
    before = snapshot(previous)
    script = f"""
import resource, signal, sys
from pathlib import Path
from engine.errors import SieveIndexError
from engine.index import build_index
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
try:
    build_index(Path({str(ROOT / "examples" / "scifact-mini")!r}), Path({str(previous)!r}), {{"bm25": {{}}}})
except SieveIndexError as exc:
    print("SieveIndexError:", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"SieveIndexError: cannot build the index at {previous}: "), done.stdout
    assert snapshot(previous) == before
    assert leftovers(previous.parent) == []


def test_a_failing_swap_puts_the_previous_index_back(previous, tiny, monkeypatch):
    before = snapshot(previous)
    rename = os.rename

    def failing_rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    monkeypatch.setattr("engine.index._exchange", lambda first, second: False)  # a system that renames twice
    with pytest.raises(SieveIndexError, match="Invalid cross-device link"):
        build_index(tiny, previous, {"bm25": {}})
    monkeypatch.undo()
    assert snapshot(previous) == before
    assert leftovers(previous.parent) == []


# --------------------------------------------------------------------------- 3. SIGTERM and stale staging directories


def test_sigterm_during_a_build_removes_the_staging_directory(previous, tmp_path):
    before = snapshot(previous)
    ready = tmp_path / "ready"
    script = f"""
import time
from pathlib import Path
from engine.index import build_index

def slow(task, advance, total):
    Path({str(ready)!r}).write_text("building")
    time.sleep(60)

build_index(Path({str(ROOT / "examples" / "scifact-mini")!r}), Path({str(previous)!r}), {{"bm25": {{}}}}, slow)
"""
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        assert [n for n in leftovers(previous.parent) if ".tmp-" in n]  # the staging directory exists
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 128 + signal.SIGTERM
    assert leftovers(previous.parent) == []
    assert snapshot(previous) == before


def test_the_sigterm_handler_is_installed_only_during_the_build(tiny, tmp_path):
    seen = []
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("this test runner handles SIGTERM itself (the build then leaves it alone)")
    build_index(tiny, tmp_path / "idx", {"bm25": {}}, lambda *a: seen.append(signal.getsignal(signal.SIGTERM)))
    assert seen and all(h != signal.SIG_DFL for h in seen)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_directories_of_dead_builds_are_removed(previous, tiny):
    parent = previous.parent
    dead, alive = dead_pid(), os.getppid()
    now = int(time.time() * 1000)
    made = {}
    for name in (
        f".idx.tmp-{dead}-1700000000000",  # a killed build of this --out: removed
        f".idx.old-{dead}-1700000000000",  # a retired copy left by a killed build, the index exists: removed
        f".idx.tmp-{alive}-{now}",  # a build still running (its process started before the directory): kept
        f".idx.tmp-{alive}-1000000000000",  # made in 2001 by a process whose pid a newer one reuses: removed
        f".other.tmp-{dead}-1700000000000",  # another --out's: kept
        f".idx.tmp-{dead}-x",  # not a name a build makes: kept
    ):
        (parent / name).mkdir()
        (parent / name / "docs.sqlite").write_bytes(b"\0" * 1024)
        made[name] = parent / name
    build_index(tiny, previous, {"bm25": {}})
    remaining = sorted(p.name for p in parent.iterdir() if p.name != "idx")
    assert remaining == sorted([f".idx.tmp-{alive}-{now}", f".other.tmp-{dead}-1700000000000", f".idx.tmp-{dead}-x"])


def test_a_retired_index_is_put_back_while_the_target_is_missing(tmp_path, tiny):
    """A build killed between its two renames (where they are two) leaves the previous index only in
    .NAME.old-…: the next build puts it back first, so that --keep-previous keeps it. Before, it was left hidden, and
    the build after deleted it."""
    dead = dead_pid()
    first = tmp_path / "first"
    build_index(tiny, first, {"bm25": {}})
    previous_sha = manifest_sha256_of(first)
    os.rename(first, tmp_path / f".idx.old-{dead}-1700000000000")
    from engine.index import _remove_stale_builds

    _remove_stale_builds(tmp_path / "idx")
    assert manifest_sha256_of(tmp_path / "idx") == previous_sha and leftovers(tmp_path) == []


def test_the_swap_trades_names_in_one_step_and_keeps_the_previous_index_when_asked(previous, tiny):
    """renameat2(RENAME_EXCHANGE) where there is one: no moment without an index at the path; the copy asked for
    with --keep-previous is made before an interrupt held back during the swap is let through."""
    from engine.index import _renameat2, kept_copy

    before = manifest_sha256_of(previous)
    build_index(tiny, previous, {"bm25": {}}, keep_previous=True)  # another corpus: another index
    assert manifest_sha256_of(previous) != before and kept_copy(previous, before) is not None
    assert leftovers(previous.parent) == []
    assert _renameat2() is not None or sys.platform != "linux"


# --------------------------------------------------------------------------- 4. corrupt manifests and document stores


def rewrite_manifest(index: Path, change) -> None:
    manifest = json.loads((index / "manifest.json").read_text())
    manifest = change(manifest)
    (index / "manifest.json").write_text(json.dumps(manifest))


def set_path(manifest: dict, dotted: str, value) -> dict:
    """Set manifest[a][b]... for "a/b/..." (the last part may hold slashes after "files/": a file name)."""
    if dotted.startswith("files/"):
        parents, last = ["files"], dotted[len("files/"):]
    else:
        *parents, last = dotted.split("/")
    node = manifest
    for key in parents:
        node = node[key]
    node[last] = value
    return manifest


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("files", None, "'files' must be an object, got null"),
        ("files", ["docs.sqlite"], "'files' must be an object, got an array"),
        ("components", "bm25", "'components' must be an object, got a string"),
        ("corpus", None, "'corpus' must be an object, got null"),
        ("corpus/doc_count", "600", "'corpus.doc_count' must be a non-negative integer, got a string"),
        ("corpus/doc_count", True, "'corpus.doc_count' must be a non-negative integer, got a boolean"),
        ("components/bm25", 5, "'components.bm25' must be an object, got a number"),
        ("components/bm25/settings", "oops", "'components.bm25.settings' must be an object, got a string"),
        ("components/bm25/settings/k1", "high", "'components.bm25.settings' are not valid bm25 settings: k1"),
        ("components/bm25/settings/fields", 5, "'components.bm25.settings' are not valid bm25 settings: fields"),
        ("files/docs.sqlite", 5, "'files.docs.sqlite' must be a sha256 hex digest, got a number"),
        ("files/../../etc/passwd", "0" * 64, "'files' names '../../etc/passwd', which is not a path inside the index"),
        ("files//etc/passwd", "0" * 64, "'files' names '/etc/passwd', which is not a path inside the index"),
    ],
)
def test_a_manifest_with_a_broken_structure_is_corrupt(previous, dotted, value, expected):
    rewrite_manifest(previous, lambda m: set_path(m, dotted, value))
    with pytest.raises(SieveIndexError) as caught:
        Index.open(previous)
    assert str(caught.value).startswith(f"index at {previous} is corrupt: manifest.json: {expected}")


def test_a_corrupt_or_incomplete_index_says_to_rebuild_it(previous):
    """Error-message audit: 'manifest.json is corrupt: not valid JSON (...)' and 'is incomplete: bm25/... is missing'
    did not say what to do, where the other corrupt-index messages said 'rebuild it'."""
    manifest = json.loads((previous / "manifest.json").read_text())
    some_file = next(name for name in manifest["files"] if name.startswith("bm25/"))
    (previous / some_file).unlink()
    with pytest.raises(SieveIndexError, match=f"is incomplete: {some_file} is missing; rebuild it$"):
        Index.open(previous)
    (previous / "manifest.json").write_text("{not json")
    with pytest.raises(SieveIndexError, match="manifest.json is corrupt: not valid JSON .*; rebuild the index$"):
        Index.open(previous)


def test_a_manifest_that_is_not_an_object_or_lacks_the_document_store(previous):
    (previous / "manifest.json").write_text('["sieve.index/1"]')
    with pytest.raises(SieveIndexError, match="is corrupt: manifest.json must hold a JSON object, got an array"):
        Index.open(previous)
    (previous / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SieveIndexError, match="manifest.json is corrupt"):
        Index.open(previous)
    (previous / "manifest.json").write_text(json.dumps({"format": "sieve.index/1", "corpus": {"doc_count": 1},
                                                        "components": {}, "files": {}}))
    with pytest.raises(SieveIndexError, match="is corrupt: manifest.json: 'files' does not list docs.sqlite"):
        Index.open(previous)


def test_a_corrupt_manifest_is_an_index_error_for_a_pipeline(previous, write_config):
    rewrite_manifest(previous, lambda m: set_path(m, "components/bm25/settings", "oops"))
    config = write_config(
        f"version: 1\nindex: {previous}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 5}}}}\n"
        "trace: {log: null}\n"
    )
    with pytest.raises(SieveIndexError, match="is corrupt: manifest.json"):
        Pipeline.from_file(config).search("cats")


def damage_documents(index: Path, sql: str | None = None, raw: bytes | None = None) -> None:
    """Change docs.sqlite and record its new hash, as if the damage happened before the manifest was written."""
    db = index / "docs.sqlite"
    if raw is not None:
        db.write_bytes(raw)
    else:
        connection = sqlite3.connect(db)
        connection.execute(sql)
        connection.commit()
        connection.close()
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    rewrite_manifest(index, lambda m: set_path(m, "files/docs.sqlite", digest))


@pytest.fixture
def small_index(tiny, tmp_path) -> Path:
    out = tmp_path / "small"
    build_index(tiny, out, {"bm25": {}})
    return out


def test_a_document_body_that_is_not_utf8(small_index):
    damage_documents(small_index, "UPDATE docs SET body = CAST(X'7B22FF' AS TEXT) WHERE row = 1")
    index = Index.open(small_index)  # the hash matches
    assert index.documents.get([0])[0].doc_id == "a"
    prefix = f"index at {small_index} is corrupt: docs.sqlite: "
    with pytest.raises(SieveIndexError) as caught:
        index.documents.get([0, 1])
    assert str(caught.value).startswith(prefix) and "Could not decode to UTF-8 column 'body'" in str(caught.value)
    with pytest.raises(SieveIndexError, match="Could not decode to UTF-8"):
        list(index.documents.iter_documents())


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("UPDATE docs SET body = '{not json' WHERE row = 1", "row 1: the document body is not valid JSON"),
        ("UPDATE docs SET body = '[1, 2]' WHERE row = 1", "row 1: the document body lacks its title, text or metadata"),
        ("UPDATE docs SET doc_id = X'62' WHERE row = 1", "row 1: doc_id is not text"),
        ("UPDATE docs SET doc_id = CAST(X'FF' AS TEXT) WHERE row = 1", "Could not decode to UTF-8 column 'doc_id'"),
    ],
)
def test_damaged_document_rows(small_index, sql, expected):
    damage_documents(small_index, sql)
    index = Index.open(small_index)
    with pytest.raises(SieveIndexError, match=f"index at {small_index} is corrupt: docs.sqlite: .*{expected}"):
        index.documents.get([1])
    with pytest.raises(SieveIndexError, match="is corrupt: docs.sqlite"):
        list(index.documents.iter_documents())
    if "doc_id" in sql:
        with pytest.raises(SieveIndexError, match="is corrupt: docs.sqlite"):
            index.doc_ids()


def test_a_document_store_without_its_table_is_refused_when_the_index_opens(small_index):
    damage_documents(small_index, "DROP TABLE docs")
    with pytest.raises(SieveIndexError, match=f"index at {small_index} is corrupt: docs.sqlite: it holds nothing, "
                                              "not the table a build writes"):
        Index.open(small_index)


def test_a_document_store_that_is_not_a_database(small_index):
    damage_documents(small_index, raw=b"this is not an SQLite database" * 200)
    with pytest.raises(SieveIndexError, match="is corrupt: docs.sqlite: file is not a database"):
        Index.open(small_index)
    unverified = small_index.parent / "unverified"
    shutil.copytree(small_index, unverified)
    (unverified / "docs.sqlite").write_bytes(b"\0" * 100)
    with pytest.raises(SieveIndexError, match="is corrupt: docs.sqlite"):
        Index.open(unverified, verify=False).documents.get([0])


# --------------------------------------------------------------------------- 5. hostile corpus lines


def test_hostile_lines_are_located_corpus_errors(previous, tmp_path):
    before = snapshot(previous)
    deep_array = "[" * 100_000 + "]" * 100_000
    corpus = write_corpus(
        tmp_path / "hostile.jsonl",
        lines=[
            json.dumps({"_id": "ok", "text": "fine"}),
            deep_array,
            '{"_id": "d", "text": "x", "nested": ' + deep_array + "}",
            '{"_id": "e", "text": "x", "nested": ' + "[" * 150 + "]" * 150 + "}",
            '{"_id": "bad\\ud800", "text": "lone surrogate in the id"}',
            '{"_id": "f", "text": "lone \\udc00 surrogate in the text"}',
            '{"_id": "g", "text": "x", "tags": ["ok", "\\ud83d"]}',
            '{"_id": "h", "text": "x", "k\\ud800": 1}',
            '{"_id": "i", "text": "a valid pair \\ud83d\\ude00 is fine"}',
            '{"_id": ' + "1" * 5000 + ', "text": "x"}',
        ],
    )
    with pytest.raises(SieveError) as caught:
        build_index(corpus, previous, {"bm25": {}})
    message = str(caught.value)
    message.encode("utf-8")  # printable: no lone surrogate copied into the message
    expected = [
        f"{corpus}:2: the JSON is nested too deeply",
        f"{corpus}:3: the JSON is nested too deeply",
        f"{corpus}:4: 'nested' is nested too deeply (more than 100 levels)",
        f"{corpus}:5: '_id' is not valid Unicode: it holds a lone surrogate (\\ud800)",
        f"{corpus}:6: 'text' is not valid Unicode: it holds a lone surrogate (\\udc00)",
        f"{corpus}:7: 'tags' is not valid Unicode: it holds a lone surrogate (\\ud83d)",
        f"{corpus}:8: 'k\\ud800' is not valid Unicode",
        f"{corpus}:10: not a JSON object (Exceeds the limit",
    ]
    for line in expected:
        assert line in message, message
    assert f"{corpus}:1:" not in message and f"{corpus}:9:" not in message
    assert snapshot(previous) == before
    assert leftovers(previous.parent) == []


# --------------------------------------------------------------------------- 6. _id types


def test_id_must_be_a_string_or_an_integer(tmp_path):
    corpus = write_corpus(
        tmp_path / "ids.jsonl",
        lines=[
            '{"_id": true, "text": "x"}',
            '{"_id": 1.5, "text": "x"}',
            '{"_id": {"a": 1}, "text": "x"}',
            '{"_id": ["a"], "text": "x"}',
            '{"_id": null, "text": "x"}',
            '{"text": "x"}',
            '{"_id": "  ", "text": "x"}',
            '{"_id": 7, "text": "x"}',
            '{"_id": "7", "text": "x"}',
        ],
    )
    with pytest.raises(SieveError) as caught:
        build_index(corpus, tmp_path / "idx", {"bm25": {}})
    message = str(caught.value)
    for number, problem in [
        (1, "'_id' must be a string or an integer, got a boolean"),
        (2, "'_id' must be a string or an integer, got a number (1.5)"),
        (3, "'_id' must be a string or an integer, got an object"),
        (4, "'_id' must be a string or an integer, got an array"),
        (5, "'_id' must be a string or an integer, got null"),
        (6, "missing '_id'"),
        (7, "empty '_id'"),
        (9, "duplicate _id '7' (first on line 8)"),
    ]:
        assert f"{corpus}:{number}: {problem}\n" in message + "\n", message
    assert f"{corpus}:8:" not in message


def test_integer_ids_are_stored_as_text(tiny, tmp_path):
    build_index(tiny, tmp_path / "idx", {"bm25": {}})
    assert Index.open(tmp_path / "idx").doc_ids() == ["a", "b", "3"]
