"""The index's ``minhash`` component: every document's MinHash signature signed once at build time, read by
``dedup.near_duplicate`` (``method: minhash``) instead of signing candidates per query when the settings match.

The signatures read from a real index must be bit-identical to the ones the stage computes, so results and traces
are the same except the recorded source (``details.signatures``); an index with other settings is not used (a
warm-up warning says so), and a missing or damaged array file is an error when the index is opened."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash
from typer.testing import CliRunner

from engine.cli import app
from engine.compiler import compile_data
from engine.errors import ConfigError, SieveIndexError
from engine.index import Index, build_index, check_index_settings
from engine.model import Candidate, ScoreEntry
from engine.pipeline import Pipeline
from engine.replay import _content_differences
from engine.stage import StageContext
from stages import dedup
from stages.dedup import (EMPTY_FILE, SIGNATURES_FILE, LoadedMinHashSignatures, MinHashIndexSettings,
                          minhash_signatures, shingles)

OTHER = {"fields": ["text", "note"], "shingle_size": 2, "num_perm": 64, "seed": 7}
CHINESE = [
    "二甲双胍可能引起乳酸性酸中毒，肾功能不全者慎用。", "二甲双胍可能引起乳酸酸中毒，肾功能不全者慎用。",
    "特斯拉（TSLA）发布财报 and an English sentence inside a Chinese document.", "𠀀𠀁𠀂 supplementary-plane Han",
    "胰岛素", "二甲双胍",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, mini_corpus: Path) -> Path:
    """The SciFact slice (601 abstracts, some with a ``note``), Chinese documents, and documents with no shingle
    under some fields: whitespace-only text, a title only (nothing in ``text``/``note``), punctuation."""
    records = [json.loads(line) for line in (mini_corpus / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    for position, record in enumerate(records[:200]):
        if position % 3 == 0:
            record["note"] = f"reviewed note {position % 7} café cafe\u0301"
    records += [{"_id": f"zh{i}", "title": "", "text": text} for i, text in enumerate(CHINESE)]
    records += [{"_id": f"zh-dup{i}", "title": "中文", "text": text} for i, text in enumerate(CHINESE[:3])]
    records += [{"_id": "blank", "title": "", "text": " "}, {"_id": "title-only", "title": "A title alone", "text": ""},
                {"_id": "dots", "title": "...", "text": "—"},
                {"_id": "copy", "title": records[0]["title"], "text": records[0]["text"]}]
    path = tmp_path_factory.mktemp("minhash-corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Path]:
    """bm25 + minhash (default settings, signed 97 documents at a time so batches cut through the corpus), bm25 +
    minhash with ``OTHER`` settings, and bm25 alone, all of the same corpus (the same rows)."""
    root = tmp_path_factory.mktemp("minhash-indexes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dedup, "_SIGN_BATCH", 97)
        build_index(corpus, root / "minhash", {"bm25": {}, "minhash": {}})
    build_index(corpus, root / "other", {"bm25": {}, "minhash": OTHER})
    build_index(corpus, root / "plain", {"bm25": {}})
    return {"minhash": root / "minhash", "other": root / "other", "plain": root / "plain"}


def pipeline_on(index: Path, params: dict, *, verify: bool = True) -> Pipeline:
    config = {"version": 1, "index": str(index), "trace": {"log": None}, "output": "dedup",
              "stages": [{"id": "bm25", "type": "recall.bm25", "params": {"top_k": 200}},
                         {"id": "dedup", "type": "dedup.near_duplicate", "inputs": ["bm25"], "params": params}]}
    pipeline = Pipeline(compile_data(config, label="<dedup-index>", base_dir=index.parent), verify_index=verify)
    pipeline.warm_up()
    return pipeline


def datasketch_values(text: str, settings: MinHashIndexSettings) -> list[int] | None:
    grams = sorted(shingles(text, settings.shingle_size))
    if not grams:
        return None
    sketch = MinHash(num_perm=settings.num_perm, seed=settings.seed, scheme=dedup.MINHASH_SCHEME)
    sketch.update_batch([g.encode("utf-8") for g in grams])
    return [int(v) for v in sketch.hashvalues]


@pytest.mark.parametrize("name, settings", [("minhash", {}), ("other", OTHER)])
def test_index_signatures_are_bit_identical_to_the_computed_ones(indexes, name, settings):
    settings = MinHashIndexSettings.model_validate(settings)
    index = Index.open(indexes[name])
    entry = index.manifest["components"]["minhash"]
    assert entry["settings"] == settings.model_dump(mode="json")
    assert entry["scheme"] == "affine32" and entry["shingling"] == dedup.shingling()
    loaded = LoadedMinHashSignatures(indexes[name] / "minhash", settings, index.doc_count)
    assert loaded.signatures.dtype == np.dtype("<u4")
    assert loaded.signatures.shape == (index.doc_count, settings.num_perm)
    documents = index.documents.get(range(index.doc_count))
    texts = [documents[row].content(settings.fields) for row in range(index.doc_count)]
    computed, empty = minhash_signatures(texts, settings.shingle_size, settings.num_perm, settings.seed)
    assert np.asarray(loaded.signatures).tobytes() == computed.tobytes()
    assert np.array_equal(loaded.empty, empty)
    assert entry["empty_documents"] == int(empty.sum()) >= 2  # "blank" and "dots"; "title-only" too without title
    ids = index.doc_ids()
    for doc_id in ("blank", "dots", "title-only"):
        assert empty[ids.index(doc_id)] == (doc_id != "title-only" or "title" not in settings.fields)
    # the Chinese rows (and a sample of the rest) are datasketch's values
    for row in [ids.index(f"zh{i}") for i in range(len(CHINESE))] + list(range(0, index.doc_count, 50)):
        expected = datasketch_values(texts[row], settings)
        assert (expected is None) == bool(loaded.empty[row])
        if expected is not None:
            assert loaded.signatures[row].tolist() == expected, ids[row]


def test_rebuilding_gives_the_same_files(indexes, corpus, tmp_path):
    again = build_index(corpus, tmp_path / "again", {"bm25": {}, "minhash": {}})
    first = Index.open(indexes["minhash"]).manifest
    assert {f: h for f, h in again["files"].items() if f.startswith("minhash/")} == {
        f: h for f, h in first["files"].items() if f.startswith("minhash/")}
    assert again["components"]["minhash"] == first["components"]["minhash"]


AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)  # a query's as_of is in its trace: the same for both runs
PARAMS = {"method": "minhash", "threshold": 0.05, "mmr_lambda": 0.7}
QUERIES = ["likelihood ratios diagnostic accuracy", "metformin diabetes insulin glucose treatment",
           "cancer cells tumour growth", "protein expression", "二甲双胍 乳酸 酸中毒", "café note reviewed"]


def test_results_and_traces_are_the_same_as_with_computed_signatures(indexes, monkeypatch):
    """Every query's trace compared as a replay compares one (``engine.replay``): the only difference is the
    recorded source. The index's pipeline never signs a document."""
    computed = pipeline_on(indexes["plain"], PARAMS)
    from_index = pipeline_on(indexes["minhash"], PARAMS)
    assert from_index.warnings == [] and computed.warnings == []
    traces = {query: computed.search(query, log=False, as_of=AS_OF).trace for query in QUERIES}

    def refuse(*args, **kwargs):
        raise AssertionError("the index's signatures should have been used")

    monkeypatch.setattr(dedup, "minhash_signatures", refuse)
    dropped = 0
    for query in QUERIES:
        now = from_index.search(query, log=False, as_of=AS_OF).trace
        record = next(s for s in now["stages"] if s["id"] == "dedup")
        dropped += record["details"]["dropped"]
        assert record["details"]["signatures"] == "index"
        assert next(s for s in traces[query]["stages"] if s["id"] == "dedup")["details"]["signatures"] == "computed"
        assert _content_differences(traces[query], now) == [
            "stages[dedup].details.signatures: 'computed' in the trace, 'index' in the replay"], query
    assert dropped, "the threshold should make drops"


def test_every_document_as_candidates_gives_the_same_result(indexes):
    """The whole corpus (Chinese and empty texts included) as one candidate list: the same survivors, drops,
    MMR order and details either way."""
    results = {}
    for name in ("plain", "minhash"):
        pipeline = pipeline_on(indexes[name], {**PARAMS, "threshold": 0.5})
        resources = pipeline.resources
        index = resources.index
        incoming = [Candidate(doc_id, row, (ScoreEntry("bm25", "bm25", 1.0 / (row + 1), row + 1),))
                    for row, doc_id in enumerate(index.doc_ids())]
        query = pipeline.make_query("all documents")
        out = pipeline.compiled.stages["dedup"].run(StageContext("dedup", query, [incoming], None, resources))
        details = dict(out.details)
        results[name] = ([(c.doc_id, c.score) for c in out.candidates], out.drops, out.decisions,
                         details.pop("signatures"), details)
    assert results["plain"][3] == "computed" and results["minhash"][3] == "index"
    assert results["plain"][:3] + results["plain"][4:] == results["minhash"][:3] + results["minhash"][4:]
    drops = {d.doc_id: d.detail.split()[0] for d in results["minhash"][1]}
    first = Index.open(indexes["plain"]).doc_ids()[0]
    assert drops == {"zh1": "duplicate_of=zh0", "zh-dup0": "duplicate_of=zh0", "zh-dup1": "duplicate_of=zh0",
                     "zh-dup2": "duplicate_of=zh2", "copy": f"duplicate_of={first}"}


def test_other_settings_are_not_used_and_warm_up_says_so(indexes):
    plain = pipeline_on(indexes["plain"], PARAMS)
    other = pipeline_on(indexes["other"], PARAMS)
    (warning,) = other.warnings
    assert warning.startswith("stage 'dedup': the index's minhash component was built with fields [text, note], "
                              "shingle_size 2, num_perm 64, seed 7, and this stage has fields [title, text], "
                              "shingle_size 3, num_perm 128, seed 1: its signatures are not used")
    for query in QUERIES[:3]:
        before = plain.search(query, log=False, as_of=AS_OF).trace
        now = other.search(query, log=False, as_of=AS_OF).trace
        assert next(s for s in now["stages"] if s["id"] == "dedup")["details"]["signatures"] == "computed"
        assert _content_differences(before, now) == []
    # the stage given the index's settings reads them, without a warning
    matching = pipeline_on(indexes["other"], {**PARAMS, **OTHER})
    assert matching.warnings == []
    trace = matching.search(QUERIES[0], log=False, as_of=AS_OF).trace
    assert next(s for s in trace["stages"] if s["id"] == "dedup")["details"]["signatures"] == "index"
    # one setting off: named alone
    (warning,) = pipeline_on(indexes["other"], {**PARAMS, **OTHER, "seed": 8}).warnings
    assert "built with seed 7, and this stage has seed 8:" in warning


def copy_index(indexes, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(indexes["minhash"], target)
    return target


def test_signatures_of_another_shingling_are_not_used(indexes, tmp_path):
    """An index signed by a version that read text into shingles otherwise (another Unicode database here) is
    computed over, with a warning."""
    copied = copy_index(indexes, tmp_path)
    manifest = json.loads((copied / "manifest.json").read_text(encoding="utf-8"))
    manifest["components"]["minhash"]["shingling"]["unicode"] = "9.0.0"
    (copied / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    pipeline = pipeline_on(copied, PARAMS)
    (warning,) = pipeline.warnings
    assert "'unicode': '9.0.0'" in warning and "another word pattern or Unicode database" in warning
    trace = pipeline.search(QUERIES[0], log=False, as_of=AS_OF).trace
    assert next(s for s in trace["stages"] if s["id"] == "dedup")["details"]["signatures"] == "computed"


@pytest.mark.parametrize("file", [SIGNATURES_FILE, EMPTY_FILE])
def test_a_missing_or_altered_array_is_an_error_at_open(indexes, tmp_path, file):
    copied = copy_index(indexes, tmp_path)
    path = copied / "minhash" / file
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SieveIndexError, match=f"corrupt: minhash/{file} does not match the hash"):
        Index.open(copied)
    path.unlink()
    with pytest.raises(SieveIndexError, match=f"incomplete: minhash/{file} is missing"):
        Index.open(copied)


def test_unverified_open_still_checks_the_arrays(indexes, tmp_path):
    """Opened without hashing the files (``verify=False``), a truncated array or one of another shape is an error
    at warm-up, naming the component, never a wrong signature at query time."""
    copied = copy_index(indexes, tmp_path)
    signatures = copied / "minhash" / SIGNATURES_FILE
    whole = signatures.read_bytes()
    signatures.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SieveIndexError, match="the minhash component at .* cannot be loaded: .*rebuild the index"):
        pipeline_on(copied, PARAMS, verify=False)
    rows = Index.open(indexes["minhash"]).doc_count
    np.save(signatures, np.zeros((rows, 64), dtype=np.uint32))
    with pytest.raises(SieveIndexError, match=rf"holds {SIGNATURES_FILE} of uint32 \({rows}, 64\) .* signed with 128 "
                                              "permutations .*rebuild the index"):
        pipeline_on(copied, PARAMS, verify=False)
    signatures.write_bytes(whole)
    (copied / "minhash" / EMPTY_FILE).write_bytes(b"not an npy file")
    with pytest.raises(SieveIndexError, match="cannot be loaded"):
        pipeline_on(copied, PARAMS, verify=False)


def test_sieve_index_with_minhash_and_its_settings(corpus, tmp_path):
    settings = tmp_path / "index-settings.yaml"
    settings.write_text("minhash: {num_perm: 64, seed: 3}\n", encoding="utf-8")
    out = tmp_path / "idx"
    result = CliRunner().invoke(app, ["index", str(corpus), "--out", str(out), "--with", "bm25", "--with", "minhash",
                                      "--settings", str(settings)])
    assert result.exit_code == 0, result.output
    entry = Index.open(out).manifest["components"]["minhash"]
    assert entry["settings"] == {"fields": ["title", "text"], "shingle_size": 3, "num_perm": 64, "seed": 3}
    assert np.load(out / "minhash" / SIGNATURES_FILE).shape == (entry["documents"], 64)
    with pytest.raises(ConfigError, match="did you mean 'num_perm'"):
        check_index_settings({"minhash": {"num_prem": 64}})
    with pytest.raises(ConfigError, match="num_perm"):
        check_index_settings({"minhash": {"num_perm": 8}})


def test_a_seed_numpy_cannot_take_is_a_settings_error_not_a_crash(write_config, bm25_index):
    """A seed of 2**32 passed validation, then crashed the build ('internal error: ValueError') or skipped dedup on
    every query."""
    from engine.compiler import compile_file

    with pytest.raises(ConfigError, match="less than or equal to 4294967295"):
        check_index_settings({"minhash": {"seed": 2**32}})
    check_index_settings({"minhash": {"seed": 2**32 - 1}})
    config = write_config(f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                          "  - {id: dedup, type: dedup.near_duplicate, inputs: [bm25], params: {method: minhash, "
                          "seed: 4294967296}}\noutput: dedup\n")
    with pytest.raises(ConfigError, match="stages.1.params.seed"):
        compile_file(config)


def test_a_field_no_document_has_is_a_warm_up_warning(write_config, bm25_index):
    """`fields: [txt]` made every document's text empty: nothing compared, nothing dropped, not a word."""
    from engine.pipeline import Pipeline

    config = write_config(f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                          "  - {id: dedup, type: dedup.near_duplicate, inputs: [bm25], params: {method: minhash, "
                          "fields: [title, txt]}}\noutput: dedup\ntrace: {log: null}\n")
    pipeline = Pipeline.from_file(config)
    pipeline.warm_up()
    (warning,) = pipeline.warnings
    assert warning.startswith("stage 'dedup': fields: 'txt' is in none of the index's first ")
    assert "(did you mean 'text'?), so it adds nothing to the text compared" in warning
    only = Pipeline.from_file(write_config(config.read_text().replace("[title, txt]", "[txt]"), "only.yaml"))
    only.warm_up()
    assert "so every document's text is empty: nothing is compared and nothing dropped" in only.warnings[0]
