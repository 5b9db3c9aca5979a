"""`sieve index` checks the files its settings name before any component runs (a gazetteer missing or malformed is
said with the other settings problems, not after the embeddings), and `--prune-cache` keeps a build cache of your
own to what the last build used, never while another build uses it.

Real builds: bm25s, the packaged all-MiniLM-L6-v2 and spaCy pipeline, the medical gazetteer, SciFact abstracts.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import engine.index as index_module
from engine.cli import app as cli_app
from engine.errors import ConfigError, SieveError
from engine.index import build_index, load_index_settings
from tests.engine.test_index_resume import _files, _records, _write_corpus

ROOT = Path(__file__).resolve().parents[2]
MEDICAL = ROOT / "examples" / "medical"
MEDICAL_GAZETTEER = ROOT / "configs" / "medical" / "entities.yaml"
DENSE = {"max_length": 64, "batch_size": 4}  # the real model, cut short: a few seconds on 2 cores
ALL = ["--with", "bm25", "--with", "dense", "--with", "entities"]

# a gazetteer with three problems, each at its line
MALFORMED = """\
version: 1
entities:
  - label: DRUG
    names: [metformin]
    colour: red
  - label: drug
    regex: "("
"""


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _entries(cache: Path) -> set[str]:
    return {f"{p.parent.parent.name}/{p.name}" for p in cache.rglob("*")
            if p.is_file() and p.parent.parent.parent == cache and not p.name.startswith(".")}


# --------------------------------------------------------------------------- files named by the settings, checked first


@pytest.mark.parametrize("gazetteer", ["missing", "malformed"])
def test_a_bad_gazetteer_stops_sieve_index_before_any_component_runs(tmp_path, monkeypatch, gazetteer):
    """The audit's F7: the gazetteer was opened when the entities component ran, after the dense embeddings. Now the
    command fails with the settings check: nothing stored, no component run, no cache or output made; the gazetteer's
    problems at their file:line, and with a misspelt bm25 setting beside them, all of them at once."""
    monkeypatch.chdir(tmp_path)
    corpus = _write_corpus(tmp_path / "corpus", _records(12))
    if gazetteer == "malformed":
        (tmp_path / "gazetteer.yaml").write_text(MALFORMED, encoding="utf-8")
    named = "gazetteer.yaml" if gazetteer == "malformed" else "nowhere/entities.yaml"
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"dense: {json.dumps(DENSE)}\nentities: {{gazetteer: {named}}}\n", encoding="utf-8")
    before = _tree(tmp_path)
    ran: list[str] = []  # what the build did, in order (each step still done, only recorded)

    def recorded(name: str, step):
        def run(*args, **kwargs):
            ran.append(name)
            return step(*args, **kwargs)
        return run

    from engine.registry import resolve_component

    for name in ("bm25", "dense", "entities"):
        cls = resolve_component(name)
        monkeypatch.setattr(cls, "build", recorded(name, cls.build))
    monkeypatch.setattr(index_module, "_write_documents", recorded("documents", index_module._write_documents))
    command = ["index", str(corpus), "--out", "idx", *ALL, "--settings", "settings.yaml", "--cache", "cache"]

    result = CliRunner().invoke(cli_app, command)
    assert isinstance(result.exception, ConfigError), result.output
    lines = [str(issue) for issue in result.exception.issues]
    if gazetteer == "missing":
        assert lines == [f"settings.yaml:2:23  entities.gazetteer: {tmp_path}/nowhere/entities.yaml  file not "
                         f"found (a relative gazetteer path is read from the working directory, {tmp_path})"]
    else:
        assert [line.split("  ")[:2] for line in lines] == [
            ["settings.yaml:2:23", f"entities.gazetteer: {tmp_path}/gazetteer.yaml:5:5"],
            ["settings.yaml:2:23", f"entities.gazetteer: {tmp_path}/gazetteer.yaml:6:12"],
            ["settings.yaml:2:23", f"entities.gazetteer: {tmp_path}/gazetteer.yaml:7:12"],
        ]
        assert "entities.0.colour: unknown field 'colour'" in lines[0]
        assert "entities.1.label" in lines[1] and "not a valid regular expression" in lines[2]
    # nothing ran: no document stored, no component built, no progress shown, nothing written (no output, staging
    # directory, lock or cache)
    assert ran == []
    assert "━" not in result.output and not any(task in result.output for task in ("documents", "tokenise", "embed"))
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["corpus", "settings.yaml"] + (["gazetteer.yaml"] if gazetteer == "malformed" else []))

    # with another settings problem: said together
    settings.write_text("bm25: {kl: 1.2}\n" + settings.read_text(encoding="utf-8"), encoding="utf-8")
    again = CliRunner().invoke(cli_app, command)
    assert isinstance(again.exception, ConfigError)
    both = [str(issue) for issue in again.exception.issues]
    assert both[0].startswith("settings.yaml:1:8  bm25.kl: unknown field 'kl' (did you mean 'k1'?)")
    assert [line.replace("settings.yaml:3:23", "settings.yaml:2:23") for line in both[1:]] == lines
    assert ran == [] and sorted(p.name for p in tmp_path.iterdir()) == sorted({k.split('/')[0] for k in before})


def test_build_index_checks_the_gazetteer_before_reading_the_corpus(tmp_path, monkeypatch):
    """Settings given in code (no file) are checked as thoroughly: the problem under 'index settings'."""
    corpus = _write_corpus(tmp_path / "corpus", _records(6))
    monkeypatch.setattr(index_module, "iter_corpus", lambda *a, **k: pytest.fail("the corpus was read"))
    progress: list[tuple] = []
    with pytest.raises(ConfigError) as caught:
        build_index(corpus, tmp_path / "idx", {"bm25": {}, "dense": DENSE,
                                               "entities": {"gazetteer": str(tmp_path / "none.yaml")}},
                    lambda *a: progress.append(a), cache=tmp_path / "cache")
    assert [str(i) for i in caught.value.issues] == [
        f"index settings  entities.gazetteer: {tmp_path / 'none.yaml'}  file not found"]
    assert progress == [] and sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_a_missing_spacy_pipeline_and_other_wrong_settings_are_said_together(tmp_path):
    """The spaCy pipeline is looked for (not loaded); a misspelt key beside the gazetteer does not hide the gazetteer's
    problems."""
    settings = tmp_path / "s.yaml"
    settings.write_text(f"entities:\n  model: ./no-such-pipeline\n  gazetteer: {tmp_path / 'none.yaml'}\n"
                        "  batch_sise: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_index_settings(settings, ["bm25", "entities"])
    lines = [str(i) for i in caught.value.issues]
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"{settings}:2:10  entities.model: spaCy pipeline directory no-such-pipeline does not "
                               "exist")
    assert lines[1] == f"{settings}:3:14  entities.gazetteer: {tmp_path / 'none.yaml'}  file not found"
    assert lines[2].startswith(f"{settings}:4:3  entities.batch_sise: unknown field 'batch_sise' (did you mean "
                               "'batch_size'?)")


def test_a_missing_dense_model_is_said_before_any_component_runs(tmp_path):
    """The dense model is looked for (its directory, not loaded) with the other settings: an entities build listed
    first no longer runs before a wrong model path is found."""
    settings = tmp_path / "s.yaml"
    settings.write_text(f"dense: {{model: {tmp_path / 'no-model'}}}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_index_settings(settings, ["entities", "dense"])
    (line,) = [str(i) for i in caught.value.issues]
    assert line == (f"{settings}:1:16  dense.model: dense index model: model directory {tmp_path / 'no-model'} does "
                    "not exist")


def test_a_good_gazetteer_passes_and_the_build_uses_it(tmp_path):
    settings = tmp_path / "s.yaml"
    settings.write_text(f"entities: {{gazetteer: {MEDICAL_GAZETTEER}, ner: false}}\n", encoding="utf-8")
    loaded = load_index_settings(settings, ["bm25", "entities"])
    assert loaded == {"bm25": {}, "entities": {"gazetteer": str(MEDICAL_GAZETTEER), "ner": False}}
    manifest = build_index(MEDICAL, tmp_path / "idx", loaded, cache=False)
    assert manifest["components"]["entities"]["gazetteer"]["entries"] > 10


# --------------------------------------------------------------------------- --prune-cache


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A corpus and its next version: one document inserted near the start, one edited, one removed."""
    root = tmp_path_factory.mktemp("versions")
    records = _records(40)
    changed = list(records)
    changed.insert(2, {"_id": "new-1", "title": "A new abstract", "text": "Vitamin D and bone density in the elderly."})
    changed[30] = {**changed[30], "title": "Revised: " + changed[30]["title"]}
    del changed[35]
    return _write_corpus(root / "v1", records), _write_corpus(root / "v2", changed)


SETTINGS = {"dense": DENSE, "entities": {"batch_size": 8}}


def test_prune_cache_keeps_only_what_the_build_used_and_says_how_much(tmp_path, versions):
    v1, v2 = versions
    cache = tmp_path / "cache"
    build_index(v1, tmp_path / "a", SETTINGS, cache=cache)
    after_first = _entries(cache)
    notes: list[str] = []
    build_index(v2, tmp_path / "b", SETTINGS, cache=cache, notes=notes.append)  # not pruned: it only grows
    grown = _entries(cache)
    assert after_first < grown
    assert any(f"build cache {cache} kept ({len(grown)} entries, " in n and "--prune-cache" in n for n in notes)

    notes.clear()
    build_index(v2, tmp_path / "c", SETTINGS, cache=cache, prune_cache=True, notes=notes.append)
    alone = tmp_path / "alone"
    build_index(v2, tmp_path / "d", SETTINGS, cache=alone)  # what a build of v2 uses: its entries, no other
    assert _entries(cache) == _entries(alone)
    removed = len(grown) - len(_entries(alone))
    said = [n for n in notes if n.startswith(f"build cache {cache} pruned: ")]
    assert len(said) == 1 and said[0].startswith(f"build cache {cache} pruned: {removed} entries (") and \
        f"this build did not use removed, {len(_entries(alone))} (" in said[0], notes
    assert not [d for d in cache.rglob("*") if d.is_dir() and not any(d.iterdir())]  # no empty shard left
    assert _files(tmp_path / "c") == _files(tmp_path / "b")
    # what is left serves the next build of v2 whole
    notes.clear()
    build_index(v2, tmp_path / "e", SETTINGS, cache=cache, notes=notes.append)
    report = json.loads((tmp_path / "e" / "build.json").read_text())["build_cache"]["sections"]
    assert all(section["batches_computed"] == 0 for section in report.values()), report


def test_prune_cache_leaves_a_cache_another_build_is_using(tmp_path, versions):
    v1, v2 = versions
    cache = tmp_path / "cache"
    build_index(v1, tmp_path / "a", {"entities": {"batch_size": 8}}, cache=cache)
    held = _entries(cache)
    lock = os.open(cache / ".lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)  # as another build using the cache holds it
        notes: list[str] = []
        build_index(v2, tmp_path / "b", {"entities": {"batch_size": 8}}, cache=cache, prune_cache=True,
                    notes=notes.append)
        assert any(n.startswith(f"build cache {cache} left as it is: another build is using it; not pruned (")
                   and "--prune-cache when no other build uses it" in n for n in notes), notes
        assert held < _entries(cache)  # the other build's entries are all there, and this build's too
    finally:
        os.close(lock)


def test_prune_cache_needs_a_cache_of_your_own(tmp_path, versions):
    v1, _ = versions
    for cache, why in ((None, "the default one is deleted after a successful build"),
                       (False, "there is none without a cache")):
        with pytest.raises(SieveError, match=why):
            build_index(v1, tmp_path / "idx", {"bm25": {}}, cache=cache, prune_cache=True)
    runner = CliRunner()
    for options, message in ((["--prune-cache"], "--prune-cache applies to a cache named with --cache DIR"),
                             (["--no-cache", "--prune-cache"], "--no-cache cannot be given with --prune-cache")):
        result = runner.invoke(cli_app, ["index", str(v1), "--out", str(tmp_path / "idx"), *options])
        assert isinstance(result.exception, SieveError) and message in str(result.exception)
    assert not (tmp_path / "idx").exists()


def test_sieve_index_prune_cache_on_the_command_line(tmp_path, versions):
    v1, v2 = versions
    cache = tmp_path / "cache"
    runner = CliRunner()
    base = ["--with", "entities", "--cache", str(cache)]
    assert runner.invoke(cli_app, ["index", str(v1), "--out", str(tmp_path / "a"), *base]).exit_code == 0
    first = _entries(cache)
    result = runner.invoke(cli_app, ["index", str(v2), "--out", str(tmp_path / "b"), *base, "--prune-cache"])
    assert result.exit_code == 0, result.output
    gone = len(first - _entries(cache))
    assert gone >= 1 and f"build cache {cache} pruned: {gone} entries (" in result.output
    help_text = runner.invoke(cli_app, ["index", "--help"], terminal_width=200).output
    assert "--prune-cache" in help_text
    shutil.rmtree(cache)
