"""recall.dense and the dense index component: real MiniLM embeddings, real faiss.

Parity: the stored vectors equal FlagModel.encode_corpus and sentence-transformers' own encode of
the packaged all-MiniLM-L6-v2, and the stage's ranking equals a brute-force numpy search with a
query vector computed by FlagModel.encode_queries.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ConfigError, ModelLoadError, SieveError, SieveIndexError
from engine.index import Index, build_index
from engine.models import resolve_model
from engine.pipeline import Pipeline
from engine.stage import DocumentMask, StageContext

ROOT = Path(__file__).resolve().parents[2]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine"


def _pipeline(write_config, index: Path, params: str = "top_k: 10", name: str = "dense.yaml") -> Pipeline:
    config = write_config(
        f"version: 1\nindex: {index}\nstages:\n  - {{id: dense, type: recall.dense, params: {{{params}}}}}\n"
        "trace: {log: null}\n",
        name,
    )
    return Pipeline.from_file(config)


def _documents(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "corpus.jsonl").read_text().splitlines() if line.strip()]


def _vectors(index: Path):
    import faiss

    stored = faiss.read_index(str(index / "dense" / "vectors.faiss"))
    return stored.reconstruct_n(0, stored.ntotal)


def _write_corpus(path: Path, docs: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the index


def test_manifest_records_model_index_type_and_lengths(dense_index):
    index = Index.open(dense_index)
    entry = index.manifest["components"]["dense"]
    expected = resolve_model(MINILM)
    assert entry["index_type"] == "IndexFlatIP" and entry["hnsw"] is None
    assert entry["metric"] == "inner_product" and entry["normalized"] is True
    assert entry["dimension"] == 384 and entry["count"] == index.doc_count == 601
    assert entry["model"]["name"] == MINILM
    assert entry["model"]["source"] == "package"
    assert entry["model"]["weights_sha256"] == expected.weights_sha256
    assert entry["pooling"] == "mean"  # read from the model's own 1_Pooling/config.json
    assert entry["query_instruction"] is None
    assert entry["max_length"] == 256 == entry["query_max_length"]  # its sentence_bert_config.json
    assert entry["truncated_documents"] > 0 and entry["max_document_tokens"] > 256
    assert "dense/vectors.faiss" in index.manifest["files"] and "dense/token_counts.npy" in index.manifest["files"]


def test_vectors_match_flagmodel_and_sentence_transformers(dense_index, mini_corpus):
    """Our batching loop gives FlagModel's vectors, and the model's reference implementation's."""
    from FlagEmbedding import FlagModel
    from sentence_transformers import SentenceTransformer

    docs = _documents(mini_corpus)
    picked = [0, 1, 2, 100, 250, 400, 599, 600]
    texts = [f"{docs[i]['title']} {docs[i]['text']}" for i in picked]
    stored = _vectors(dense_index)[picked]
    location = resolve_model(MINILM).location
    flag = FlagModel(location, pooling_method="mean", normalize_embeddings=True, use_fp16=False, devices=["cpu"])
    reference = flag.encode_corpus(texts, batch_size=4, max_length=256)
    np.testing.assert_allclose(stored, reference, atol=1e-5)
    st_model = SentenceTransformer(location, device="cpu")
    np.testing.assert_allclose(stored, st_model.encode(texts, normalize_embeddings=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)


def test_cli_builds_bm25_and_dense_with_progress(tmp_path, mini_corpus):
    from typer.testing import CliRunner

    from engine.cli import app

    corpus = _write_corpus(tmp_path / "corpus", _documents(mini_corpus)[:12])
    out = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", str(corpus), "--out", str(out), "--with", "bm25", "--with", "dense"])
    assert result.exit_code == 0, result.output
    assert "dense embed" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["components"]) == {"bm25", "dense"}
    assert manifest["components"]["dense"]["count"] == 12


# --------------------------------------------------------------------------- the stage


def test_ranking_equals_brute_force_cosine(dense_index, write_config):
    from FlagEmbedding import FlagModel

    pipeline = _pipeline(write_config, dense_index)
    result = pipeline.search(QUERY)
    flag = FlagModel(resolve_model(MINILM).location, pooling_method="mean", use_fp16=False, devices=["cpu"])
    query = flag.encode_queries([QUERY], max_length=256)[0]
    scores = _vectors(dense_index) @ query
    doc_ids = Index.open(dense_index).doc_ids()
    expected = sorted(range(len(doc_ids)), key=lambda r: (-scores[r], doc_ids[r]))[:10]
    assert [c.doc_id for c in result.results] == [doc_ids[r] for r in expected]
    assert [c.score for c in result.results] == pytest.approx([float(scores[r]) for r in expected], abs=1e-5)
    assert all(c.ledger[0].signal == "dense" and c.ledger[0].stage == "dense" for c in result.results)
    assert [c.ledger[0].rank for c in result.results] == list(range(1, 11))


def test_trace_carries_identity_and_explanation(dense_index, write_config):
    trace = _pipeline(write_config, dense_index).search(QUERY).trace
    (model,) = trace["models"]
    assert model["stage"] == "dense" and model["model"] == MINILM
    assert model["weights_sha256"] == resolve_model(MINILM).weights_sha256
    assert model["device"] == "cpu" and model["precision"] == "fp32" and model["pooling"] == "mean"
    explanation = trace["results"][0]["explanation"]["details"][0]
    assert "cos(q, d)" in explanation["description"] and MINILM in explanation["description"]
    assert "IndexFlatIP" in explanation["description"]
    truncated = [r for r in trace["results"] if r["explanation"]["details"][0]["details"]]
    assert truncated, "the slice has documents longer than 256 tokens among the top 10"
    assert "truncated" in truncated[0]["explanation"]["details"][0]["details"][0]["description"]
    stage = trace["stages"][0]
    assert stage["timings_ms"]["embed_query"] > 0 and "faiss_search" in stage["timings_ms"]


def test_mask_is_honoured_inside_the_search(dense_index, write_config):
    pipeline = _pipeline(write_config, dense_index)
    resources = pipeline.warm_up()
    stage = pipeline.compiled.stages["dense"]
    query = pipeline.make_query(QUERY)
    unmasked = stage.run(StageContext("dense", query, [], None, resources)).candidates
    allowed = np.ones(resources.index.doc_count, dtype=bool)
    forbidden = [c.row for c in unmasked[:3]]
    allowed[forbidden] = False
    masked = stage.run(StageContext("dense", query, [], DocumentMask(allowed, ("test",)), resources))
    assert not {c.row for c in masked.candidates} & set(forbidden)
    assert len(masked.candidates) == 10  # freed slots went to allowed documents
    assert [c.doc_id for c in masked.candidates[:7]] == [c.doc_id for c in unmasked[3:10]]
    assert masked.details["masked_out"] == 3

    few = np.zeros(resources.index.doc_count, dtype=bool)
    few[[5, 50, 500]] = True
    selective = stage.run(StageContext("dense", query, [], DocumentMask(few, ("test",)), resources))
    assert sorted(c.row for c in selective.candidates) == [5, 50, 500]
    assert [d.code for d in selective.decisions] == ["fewer_allowed"]

    nothing = stage.run(StageContext("dense", query, [], DocumentMask(few & False, ("test",)), resources))
    assert nothing.candidates == [] and [d.code for d in nothing.decisions] == ["all_masked"]


def test_k_larger_than_the_corpus_is_clamped_and_recorded(dense_index, write_config):
    result = _pipeline(write_config, dense_index, "top_k: 5000").search(QUERY)
    assert len(result.results) == 601
    assert len({c.doc_id for c in result.results}) == 601
    scores = [c.score for c in result.results]
    assert scores == sorted(scores, reverse=True)
    decisions = result.trace["stages"][0]["decisions"]
    assert decisions[0]["code"] == "k_clamped" and "601" in decisions[0]["detail"]


def test_equal_scores_break_on_doc_id_even_at_the_k_boundary(tmp_path, write_config):
    text = "Homocysteine levels rise when vitamin B12 is deficient."
    docs = [
        {"_id": "zeta", "title": "", "text": text},  # row 0: faiss would return it first among equals
        {"_id": "alpha", "title": "", "text": text},
        {"_id": "mid", "title": "", "text": text},
        {"_id": "other", "title": "", "text": "Stock markets fell on Tuesday."},
    ]
    index = tmp_path / "ties"
    # batch_size 1: each text runs alone, so the three equal texts get bit-identical vectors.
    build_index(_write_corpus(tmp_path / "corpus", docs), index, {"dense": {"batch_size": 1}})
    top1 = _pipeline(write_config, index, "top_k: 1", "k1.yaml").search("vitamin B12 homocysteine")
    assert [c.doc_id for c in top1.results] == ["alpha"]
    top3 = _pipeline(write_config, index, "top_k: 3", "k3.yaml").search("vitamin B12 homocysteine")
    assert [c.doc_id for c in top3.results] == ["alpha", "mid", "zeta"]
    assert top3.results[0].score == top3.results[2].score


def test_documents_with_the_same_text_share_one_vector_and_rank_by_doc_id(tmp_path, write_config):
    """Repeats of a text reuse its vector bit for bit, wherever the length-sorted batches split them.

    Embedded again, the two repeats that share a batch with the longer documents were padded to their
    width and came out a few ulps apart: the top 12 began d02, d07 instead of d00, d01.
    """
    text = "Zebra stripes camouflage in the savanna grassland"
    same = [f"d{i:02d}" for i in range(12)]
    others = [
        {"_id": f"o{n}", "title": "Markets", "text": " ".join(["stock markets fell on tuesday"] * n)} for n in (2, 3, 5)
    ] + [{"_id": "s1", "title": "", "text": "Tides."}, {"_id": "s2", "title": "", "text": "Bread rises."}]
    shuffled = [same[i] for i in (7, 2, 11, 0, 5, 9, 3, 10, 1, 6, 4, 8)]
    docs = others[:2] + [{"_id": d, "title": "", "text": text} for d in shuffled] + others[2:]
    index = tmp_path / "repeats"
    reported: list[tuple[int, int | None]] = []

    def progress(task: str, advance: int, total: int | None) -> None:
        if task == "dense embed":
            reported.append((advance, total))

    # batch_size 5: the 3 longer documents share the first batch with 2 repeats, padded to their width.
    manifest = build_index(_write_corpus(tmp_path / "corpus", docs), index, {"dense": {"batch_size": 5}}, progress)
    assert manifest["components"]["dense"]["duplicate_texts"] == 11
    assert sum(advance for advance, _ in reported) == len(docs)  # the reused vectors are counted too
    assert {total for _, total in reported} == {len(docs)}
    vectors = _vectors(index)
    rows = [Index.open(index).doc_ids().index(d) for d in same]
    assert all(np.array_equal(vectors[row], vectors[rows[0]]) for row in rows)

    result = _pipeline(write_config, index, "top_k: 12").search("zebra stripes camouflage")
    assert [c.doc_id for c in result.results] == same
    assert len({c.score for c in result.results}) == 1


def test_hnsw_above_a_size_gives_an_hnsw_index_with_the_same_answers(tmp_path, mini_corpus, dense_index, write_config):
    docs = _documents(mini_corpus)[:120]
    index = tmp_path / "hnsw"
    settings = {"hnsw_above": 50, "hnsw_m": 16, "hnsw_ef_construction": 64, "hnsw_ef_search": 64}
    manifest = build_index(_write_corpus(tmp_path / "corpus", docs), index, {"dense": settings})
    entry = manifest["components"]["dense"]
    assert entry["index_type"] == "IndexHNSWFlat"
    assert entry["hnsw"] == {"m": 16, "ef_construction": 64, "ef_search": 64}

    pipeline = _pipeline(write_config, index, "top_k: 10, ef_search: 200")
    result = pipeline.search(QUERY)
    assert pipeline.warnings == []  # ef_search applies here
    assert "HNSW" in result.trace["results"][0]["explanation"]["details"][0]["description"]
    assert result.trace["models"][0]["index_type"] == "IndexHNSWFlat"
    # On 120 vectors with efSearch 200 the graph search is exact: compare with brute force.
    vectors = _vectors(index)
    query = pipeline.compiled.stages["dense"]._embedder.embed_query(QUERY, instruction=None, max_length=256)[0]
    scores = vectors @ query
    ids = [d["_id"] for d in docs]
    expected = sorted(range(len(ids)), key=lambda r: (-scores[r], ids[r]))[:10]
    assert [c.doc_id for c in result.results] == [ids[r] for r in expected]

    resources = pipeline.warm_up()
    stage = pipeline.compiled.stages["dense"]
    allowed = np.zeros(len(docs), dtype=bool)
    allowed[::9] = True  # 14 of 120
    masked = stage.run(StageContext("dense", pipeline.make_query(QUERY), [], DocumentMask(allowed, ("t",)), resources))
    assert len(masked.candidates) == 10
    assert all(allowed[c.row] for c in masked.candidates)
    exact_allowed = sorted(np.flatnonzero(allowed), key=lambda r: (-scores[r], ids[r]))[:10]
    assert [c.row for c in masked.candidates] == [int(r) for r in exact_allowed]


def test_a_different_model_than_the_index_was_built_with_is_refused(dense_index, tiny_encoder, write_config):
    pipeline = _pipeline(write_config, dense_index, f"top_k: 10, model: {tiny_encoder}")
    with pytest.raises(ModelLoadError) as caught:
        pipeline.warm_up()
    message = str(caught.value)
    assert "different space" in message and MINILM in message and resolve_model(MINILM).weights_sha256[:12] in message


def test_naming_the_same_model_explicitly_is_accepted(dense_index, write_config):
    pipeline = _pipeline(write_config, dense_index, f"top_k: 3, model: {MINILM}")
    assert len(pipeline.search(QUERY).results) == 3


def test_a_missing_query_model_names_the_stage_once(dense_index, write_config):
    """Error-message audit: 'stage 'dense' (recall.dense@1): recall.dense stage 'dense': model directory ...'."""
    pipeline = _pipeline(write_config, dense_index, "top_k: 10, model: ./no/such/embedder")
    with pytest.raises(ModelLoadError) as caught:
        pipeline.warm_up()
    said = str(caught.value)
    assert said.startswith("stage 'dense' (recall.dense@1): query model: model directory ./no/such/embedder does "
                           "not exist"), said
    assert said.count("'dense'") == 1


def test_an_index_without_a_dense_component_is_a_clear_error(bm25_index, write_config):
    with pytest.raises(SieveIndexError, match="--with dense"):
        _pipeline(write_config, bm25_index).warm_up()


# --------------------------------------------------------------------------- any HF model by path


def test_any_encoder_by_path_with_explicit_pooling_and_instruction(tmp_path, mini_corpus, tiny_encoder, write_config):
    docs = _documents(mini_corpus)[:20]
    index = tmp_path / "tiny"
    settings = {"model": str(tiny_encoder), "pooling": "cls", "query_instruction": "query: ",
                "max_length": 64, "query_max_length": 8, "batch_size": 4}
    manifest = build_index(_write_corpus(tmp_path / "corpus", docs), index, {"dense": settings})
    entry = manifest["components"]["dense"]
    assert entry["model"]["source"] == "path" and entry["pooling"] == "cls" and entry["dimension"] == 32
    assert entry["query_instruction"] == "query: " and entry["max_length"] == 64

    result = _pipeline(write_config, index, "top_k: 5").search("one two three four five six seven eight nine ten")
    assert len(result.results) == 5
    stage = result.trace["stages"][0]
    assert [d["code"] for d in stage["decisions"]] == ["query_truncated"]
    assert "(query prefixed" in result.trace["results"][0]["explanation"]["details"][0]["description"]


def test_pooling_auto_without_a_declaration_asks_for_one(tmp_path, mini_corpus, tiny_encoder):
    corpus = _write_corpus(tmp_path / "corpus", _documents(mini_corpus)[:3])
    with pytest.raises(ModelLoadError, match="does not declare its pooling .* `pooling: cls` for bge models, `mean` for"):
        build_index(corpus, tmp_path / "index", {"dense": {"model": str(tiny_encoder)}})
    assert not (tmp_path / "index").exists()


def test_bad_settings_are_precise_errors(tmp_path, mini_corpus):
    corpus = _write_corpus(tmp_path / "corpus", _documents(mini_corpus)[:3])
    with pytest.raises(ModelLoadError, match="exceeds what .* can read \\(512 tokens\\)"):
        build_index(corpus, tmp_path / "a", {"dense": {"max_length": 1024}})
    with pytest.raises(SieveError, match="pooling"):
        build_index(corpus, tmp_path / "b", {"dense": {"pooling": "max"}})
    with pytest.raises(ConfigError, match="dense.model: dense index model: model directory ./no/such/model does not "
                       "exist"):  # checked with the settings, before any component runs
        build_index(corpus, tmp_path / "c", {"dense": {"model": "./no/such/model"}})


def test_importing_and_compiling_the_hybrid_config_stays_light():
    script = (
        "import json, sys\n"
        "import stages, stages.recall.dense, stages.fuse, stages.embedding, stages.normalize\n"
        "from engine.compiler import compile_file\n"
        "compile_file(sys.argv[1])\n"
        "print(json.dumps(sorted(m for m in ['torch', 'faiss', 'FlagEmbedding', 'transformers', "
        "'sentence_transformers'] if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "configs" / "hybrid.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_text_the_model_does_not_know_is_said(tmp_path, write_config):
    """All-MiniLM knows few Chinese characters: '腾讯控股股息' and '特斯拉交付量' were six [UNK] each, embedded
    alike, and returned the same list with the same scores without a word (an audit for a Chinese team). The
    index records the share of unknown tokens; a query that is mostly unknown tokens gets a decision."""
    import json as _json

    from engine.index import build_index

    corpus = tmp_path / "corpus.jsonl"
    docs = [{"_id": "a", "title": "", "text": "腾讯控股宣布派发股息。"},
            {"_id": "b", "title": "", "text": "Metformin lowers blood glucose."}]
    corpus.write_text("\n".join(_json.dumps(d, ensure_ascii=False) for d in docs), encoding="utf-8")
    build_index(corpus, tmp_path / "idx", {"dense": {}})
    recorded = _json.loads((tmp_path / "idx" / "manifest.json").read_text())["components"]["dense"]
    assert recorded["unknown_token_share"] > 0.3
    pipeline = Pipeline.from_file(write_config(
        f"version: 1\nindex: {tmp_path / 'idx'}\nstages:\n  - {{id: dense, type: recall.dense, params: {{top_k: 2}}}}\n"
        "trace: {log: null}\n"))
    chinese = pipeline.search("腾讯控股股息").trace["stages"][0]
    assert [d["code"] for d in chinese["decisions"]] == ["unknown_query_tokens"]
    assert chinese["details"]["unknown_query_tokens"] >= 3
    english = pipeline.search("metformin glucose").trace["stages"][0]
    assert "decisions" not in english and "unknown_query_tokens" not in english["details"]


def test_ef_search_on_an_exact_index_is_a_warm_up_warning(dense_index, write_config):
    """Accepted and silently ignored before: the index is searched exactly, whatever ef_search says."""
    pipeline = _pipeline(write_config, dense_index, "top_k: 10, ef_search: 10")
    pipeline.warm_up()
    (warning,) = pipeline.warnings
    assert warning.startswith("stage 'dense': ef_search: 10 is set") and "IndexFlatIP" in warning
    plain = _pipeline(write_config, dense_index, name="plain.yaml")
    plain.warm_up()
    assert plain.warnings == []
