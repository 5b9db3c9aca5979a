"""Untrusted-artifacts audit: files that come from someone else (a rule file being deployed, an index built by another
team, a trace a customer sends for replay). Each test says what happened before ("before:")."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import engine.yamlsource
from engine.errors import SieveIndexError
from engine.index import Index, build_index
from engine.pipeline import Pipeline
from rules.ruleset import load_rule_file
from stages.entities import load_gazetteer
from stages.rewrite.glossary import load_glossary

ROOT = Path(__file__).resolve().parents[2]

# Audit F4: a rule file (gazetteer, glossary) was parsed from one read and hashed from a second: a file renamed into
# its place between the two (a deploy, an editor's save) left the trace naming the approved file's sha256 while the
# other file's rules were in force, and `rule_file_changed` silent. The race is made certain here: the next version
# is renamed into place just after the file was read, before it is parsed.
LOADERS = {
    "rules": (load_rule_file, ROOT / "configs" / "medical" / "access.yaml", lambda r: [rule.id for rule in r.rules]),
    "gazetteer": (load_gazetteer, ROOT / "configs" / "medical" / "entities.yaml", lambda g: g.text),
    "glossary": (load_glossary, ROOT / "configs" / "glossary.yaml", lambda g: [e.id for e in g.entries]),
}


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_a_file_replaced_as_it_is_loaded_is_hashed_as_the_bytes_that_were_parsed(kind, tmp_path, monkeypatch):
    load, shipped, content = LOADERS[kind]
    approved = shipped.read_bytes()
    path = tmp_path / shipped.name
    path.write_bytes(approved)
    other = tmp_path / "next.yaml"
    other.write_bytes(approved + b"\n# the next version, deployed by a rename\n")
    parse = engine.yamlsource.load_yaml_text

    def parse_then_deploy(*args, **kwargs):
        if other.exists():
            os.replace(other, path)
        return parse(*args, **kwargs)

    monkeypatch.setattr(engine.yamlsource, "load_yaml_text", parse_then_deploy)
    loaded = load(path)
    monkeypatch.undo()
    assert not other.exists()  # the race happened
    assert loaded.sha256 == hashlib.sha256(approved).hexdigest()  # before: the next version's sha256
    assert content(loaded) == content(load(shipped))


def _rehashed(index: Path) -> None:
    """The manifest made to list the index's files as they now are: what anyone editing an index can do (the
    manifest guards against accidents, it is no signature)."""
    manifest = json.loads((index / "manifest.json").read_bytes())
    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256((index / name).read_bytes()).hexdigest()
    (index / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")


@pytest.fixture(scope="module")
def medical_index(tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("untrusted") / "index"
    build_index(ROOT / "examples" / "medical" / "corpus.jsonl", index, {"bm25": {}, "dense": {}})
    return index


def test_a_dense_file_declaring_a_huge_array_is_refused_without_taking_the_memory(medical_index, tmp_path):
    """Audit F5: faiss sized an array by the length written before it and filled it before finding the file
    short: a 50 KB vectors.faiss declaring 2^31 floats took 9 GB, 2^33 an out-of-memory kill. Loaded here under a
    4 GiB address-space limit, where it was a bare MemoryError (std::bad_alloc)."""
    index = tmp_path / "index"
    shutil.copytree(medical_index, index)
    vectors = index / "dense" / "vectors.faiss"
    data = bytearray(vectors.read_bytes())
    offset = 4 + 4 + 8 + 8 + 8 + 1 + 4  # IndexFlatIP: its header, then how many floats its vectors hold
    assert struct.unpack_from("<Q", data, offset)[0] == 33 * 384  # 33 documents, 384 dimensions
    struct.pack_into("<Q", data, offset, 1 << 33)
    vectors.write_bytes(bytes(data))
    _rehashed(index)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
            "from engine.errors import SieveIndexError; from stages.recall.dense import LoadedDenseIndex\n"
            "try:\n    LoadedDenseIndex(__import__('pathlib').Path(sys.argv[1]), {})\n"
            "except SieveIndexError as exc:\n    print(exc)")
    done = subprocess.run([sys.executable, "-c", code, str(index / "dense")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"dense component at {index / 'dense'} cannot be loaded" in done.stdout


def test_a_document_store_holding_a_view_is_refused_when_the_index_opens(medical_index, tmp_path):
    """Audit F8: a store whose `docs` is a view over an endless recursive query (the same columns) opened, and the
    first read of a document never returned: warm-up hung with one core busy, no timeout, no error."""
    index = tmp_path / "index"
    shutil.copytree(medical_index, index)
    with sqlite3.connect(index / "docs.sqlite") as connection:
        connection.executescript(
            "ALTER TABLE docs RENAME TO real_docs;"
            "CREATE VIEW docs AS WITH RECURSIVE spin(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM spin) "
            "SELECT r.row AS row, r.doc_id AS doc_id, r.body AS body FROM real_docs r "
            "WHERE r.row < 0 OR NOT EXISTS (SELECT 1 FROM spin WHERE n < 0);")
    connection.close()
    _rehashed(index)
    with pytest.raises(SieveIndexError, match=r"docs.sqlite: it holds view docs, table real_docs, index "
                                              r"sqlite_autoindex_real_docs_1, not the table a build writes; rebuild it"):
        Index.open(index)
    Index.open(medical_index).close()  # a store as built opens


def test_a_trace_claiming_another_engine_version_cannot_shed_what_every_version_records(write_config, bm25_index):
    """Audit F1: across engine versions, fields one side lacks were notes, and the version is a field of the trace:
    an edited trace claiming 0.10.0, its drops, ledgers and explanation trees deleted, replayed "identical"."""
    from engine.pipeline import Pipeline
    from engine.replay import replay_trace

    pipeline = Pipeline.from_file(write_config(
        f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}\n"
        "  - {id: top, type: select.top_k, inputs: [bm25], params: {k: 3}}\noutput: top\ntrace: {log: null}\n"))
    trace = json.loads(json.dumps(pipeline.search("cells in the immune system", log=False).trace))
    assert replay_trace(json.loads(json.dumps(trace)))["identical"]
    trace["engine_version"] = "0.10.0"
    for stage in trace["stages"]:
        stage.pop("drops", None)
    for result in trace["results"]:
        result.pop("ledger", None)
        result.pop("explanation", None)
    report = replay_trace(trace)
    assert not report["identical"]
    shown = "\n".join(report["differences"])
    assert "stages[top].drops: absent in the trace" in shown and "results[0].ledger: absent in the trace" in shown
    assert "results[0].explanation: absent in the trace" in shown


def test_a_count_anchor_is_not_satisfied_by_a_marker_claiming_the_anchored_records(tmp_path):
    """Audit F3: a log replaced whole by a segment marker claiming the anchored records were rotated out (to an
    archive "not beside the log") and fabricated records passed `--expect-count` alone: "intact, the anchored head is
    present"."""
    from typer.testing import CliRunner

    from engine.cli import app
    from engine.trace import SEGMENT_SCHEMA, TraceLog, _record_line, check_log

    genuine = TraceLog(tmp_path / "genuine.jsonl")
    genuine.append({"trace_id": "t0", "results": []})
    forged = tmp_path / "trace.jsonl"
    marker = {"schema": SEGMENT_SCHEMA, "previous": {"file": "trace.000000-000000.jsonl", "first_seq": 0,
                                                     "last_seq": 0}}
    forged.write_bytes(_record_line("0" * 64, 1, marker)[1])
    TraceLog(forged).append({"trace_id": "fabricated", "results": []})
    [problem] = check_log(forged, expect_count=1).problems
    assert "the anchored record seq 0 is in an earlier segment that is not beside the log" in problem
    shown = CliRunner().invoke(app, ["trace", "verify", str(genuine.path), "--expect-count", "1"])
    assert shown.exit_code == 0 and "at least the anchored 1 (a count alone cannot tell a record replaced" in \
        " ".join(shown.output.split())


def test_a_trace_file_with_a_key_twice_is_refused(write_config, bm25_index, tmp_path):
    """Audit F9: a trace file took the last of two `results` keys (what its hash covers) and was "verified" while
    its first one, what an editor or grep shows, listed a fabricated document."""
    from engine.errors import TraceError
    from engine.pipeline import Pipeline
    from engine.trace import load_trace_checked

    log = tmp_path / "log.jsonl"
    pipeline = Pipeline.from_file(write_config(
        f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 3}}}}\n"
        f"output: bm25\ntrace: {{log: {log}}}\n"))
    trace = pipeline.search("cells", log=True).trace
    genuine = json.dumps(trace)
    edited = tmp_path / "trace.json"
    edited.write_text('{"results": [{"doc_id": "fabricated", "score": 9.9}], ' + genuine[1:], encoding="utf-8")
    with pytest.raises(TraceError, match="the key 'results' appears twice in one object"):
        load_trace_checked(edited, None, None, None)
    (tmp_path / "plain.json").write_text(genuine, encoding="utf-8")
    load_trace_checked(tmp_path / "plain.json", None, None, None)


def test_replay_reads_no_key_variable_a_trace_without_keyed_hashes_names(write_config, bm25_index):
    """Audit F6: a trace leaving out query.hashed_with but naming, say, AWS_SECRET_ACCESS_KEY as its config's
    trace.hash_key_env had the replay key its hashes with that secret and print the result."""
    from engine.errors import TraceError
    from engine.pipeline import Pipeline
    from engine.replay import replay_trace

    pipeline = Pipeline.from_file(write_config(
        f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 3}}}}\n"
        "output: bm25\ntrace: {log: null, include_query_text: false}\n"))
    trace = pipeline.search("cells", log=False).trace
    trace["config"]["resolved"]["trace"]["hash_key_env"] = "AWS_SECRET_ACCESS_KEY"
    with pytest.raises(TraceError, match="names trace.hash_key_env 'AWS_SECRET_ACCESS_KEY', but its query hashes are "
                                         "not keyed"):
        replay_trace(trace, query_text="cells")


def test_a_dotted_spacy_name_from_an_index_is_not_imported(tmp_path, monkeypatch):
    """Audit F11: resolve_spacy('evil.pipeline') had importlib import (run) the package 'evil' from anywhere on
    sys.path, the working directory included, to look for a pipeline it could never be."""
    from engine.errors import ModelLoadError
    from engine.models import resolve_spacy

    package = tmp_path / "evil"
    package.mkdir()
    (package / "__init__.py").write_text("open(__file__ + '.ran', 'w').close()\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match="spaCy pipeline 'evil.pipeline' is not installed"):
        resolve_spacy("evil.pipeline")
    assert not (package / "__init__.py.ran").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="making another user's link needs root")
def test_an_output_is_not_written_through_another_users_link_in_a_shared_directory(tmp_path):
    """Audit F10: outputs follow a symlink at their path and replace its target (documented), by realpath and
    rename, which the kernel's protected_symlinks never sees: another user's link in /tmp pointing at one of this
    user's files had that file replaced by the report."""
    from engine.errors import SieveError
    from engine.trace import write_json_atomic

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp: sticky, anyone may write
    victim = tmp_path / "victim.txt"
    victim.write_text("mine", encoding="utf-8")
    planted = shared / "report.json"
    planted.symlink_to(victim)
    os.lchown(planted, 65534, 65534)  # nobody's link
    with pytest.raises(SieveError, match=r"is a symlink another user \(uid 65534\) made in the shared directory"):
        write_json_atomic(planted, {"a": 1})
    assert victim.read_text(encoding="utf-8") == "mine"
    chained = tmp_path / "chain.json"
    chained.symlink_to(planted)  # one's own link leading to the planted one: refused too (review of this change)
    with pytest.raises(SieveError, match=r"is a symlink another user \(uid 65534\) made in the shared directory"):
        write_json_atomic(chained, {"a": 1})
    assert victim.read_text(encoding="utf-8") == "mine"
    own = shared / "mine.json"
    own.symlink_to(victim)  # this user's own link: written through, as documented
    write_json_atomic(own, {"a": 1})
    assert json.loads(victim.read_text(encoding="utf-8")) == {"a": 1}


def test_a_manifest_larger_than_any_sieve_writes_is_refused_unread(tmp_path, monkeypatch):
    """Audit, not covered in its time box: an index's manifest.json was read whole, whatever its size."""
    import engine.index

    index = tmp_path / "index"
    build_index(ROOT / "examples" / "medical" / "corpus.jsonl", index, {"bm25": {}})
    monkeypatch.setattr(engine.index, "_MAX_MANIFEST_BYTES", 1024)  # the medical manifest is larger
    with pytest.raises(SieveIndexError, match=r"manifest.json is over 0 MiB: not a manifest Sieve wrote"):
        Index.open(index)


def test_an_index_file_replaced_after_it_was_hashed_is_not_loaded_unseen(tmp_path, write_config, monkeypatch):
    """Audit F7: an index's files were hashed when it opened and loaded by name later, after the models (seconds):
    one replaced in place meanwhile was searched while the trace named the verified hashes. The pipeline now checks,
    once its stages have loaded, that each file is still the one hashed, and opens the index again if not."""
    import engine.index

    index = tmp_path / "index"
    build_index(ROOT / "examples" / "medical" / "corpus.jsonl", index, {"bm25": {}})
    config = write_config(f"version: 1\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\noutput: bm25\n"
                          "trace: {log: null}\n")
    name = min(n for n in json.loads((index / "manifest.json").read_bytes())["files"] if n.startswith("bm25/"))
    target = index / name
    genuine = target.read_bytes()
    opened = engine.index.Index.open.__func__
    opens: list[int] = []

    def open_then_replace(cls, path, *, verify=True, content=genuine):
        found = opened(cls, path, verify=verify)
        opens.append(1)
        if len(opens) == 1:  # once, right after the hashes were checked: a new file (inode) in its place
            replacement = target.with_name(target.name + ".new")
            replacement.write_bytes(content)
            os.replace(replacement, target)
        return found

    monkeypatch.setattr(engine.index.Index, "open", classmethod(open_then_replace))
    Pipeline.from_file(config).warm_up()  # the same bytes under a new inode: opened again, and the hashes hold
    assert len(opens) == 2
    opens.clear()
    monkeypatch.setattr(engine.index.Index, "open", classmethod(
        lambda cls, path, *, verify=True: open_then_replace(cls, path, verify=verify, content=genuine + b" ")))
    with pytest.raises(SieveIndexError, match=f"{name} does not match the hash in manifest.json"):
        Pipeline.from_file(config).warm_up()  # other bytes: before, loaded while the trace named the verified ones
