"""`sieve validate` loads nothing, but says what it can see without loading: a model directory that does not
exist, and settings accepted but not used where they stand (an analyst who sets them expects an effect)."""

from __future__ import annotations

from engine.compiler import compile_file
from engine.errors import ConfigError, ConfigIssue, Location


def _warnings(write_config, text: str) -> list[str]:
    return [str(w) for w in compile_file(write_config(text)).warnings]


def test_a_missing_local_model_directory_is_a_located_warning(write_config, tmp_path):
    (found,) = _warnings(write_config, """version: 1
index: x
stages:
  - {id: bm25, type: recall.bm25, params: {top_k: 10}}
  - {id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {window: 10, model: ./no/such/model}}
""")
    assert ":5:" in found and "params.model" in found and "./no/such/model does not exist" in found
    (tmp_path / "here").mkdir()  # what a model directory holds, at least (an empty one is warned of: models audit F6)
    (tmp_path / "here" / "config.json").write_text("{}")
    (tmp_path / "here" / "tokenizer.json").write_text("{}")
    assert _warnings(write_config, """version: 1
index: x
stages:
  - {id: bm25, type: recall.bm25, params: {top_k: 10}}
  - {id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {window: 10, model: ./here}}
""") == []  # relative to the config's directory; a hub id (BAAI/bge-reranker-v2-m3) is never checked here


def test_a_dense_model_path_that_does_not_exist_is_a_warning_too(write_config):
    """Error-message audit: validate warned of a missing reranker directory but said nothing of recall.dense's, which
    then failed at the first search."""
    (found,) = _warnings(write_config, """version: 1
index: x
stages:
  - {id: dense, type: recall.dense, params: {top_k: 10, model: ./no/such/embedder}}
""")
    assert ":4:" in found and "params.model" in found and "./no/such/embedder does not exist" in found
    assert _warnings(write_config, """version: 1
index: x
stages:
  - {id: dense, type: recall.dense, params: {top_k: 10}}
""") == []  # the index's own model (by its packaged name)


def test_chunk_and_cascade_settings_that_cannot_apply_are_warnings(write_config):
    found = _warnings(write_config, """version: 1
index: x
stages:
  - {id: bm25, type: recall.bm25, params: {top_k: 10}}
  - {id: rerank, type: rerank.cross_encoder, inputs: [bm25],
     params: {window: 10, max_chunks: 4, cascade: {full_top: 5, light_batch_size: 8}}}
""")
    assert any("params.max_chunks" in w and "long_documents: chunks" in w for w in found), found
    assert any("cascade.light_batch_size" in w and "cascade.light_model" in w for w in found), found
    assert not _warnings(write_config, """version: 1
index: x
stages:
  - {id: bm25, type: recall.bm25, params: {top_k: 10}}
  - {id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {window: 10, long_documents: chunks, max_chunks: 4}}
""")


def test_minhash_settings_under_embedding_dedup_are_warnings(write_config):
    (found,) = _warnings(write_config, """version: 1
index: x
stages:
  - {id: bm25, type: recall.bm25, params: {top_k: 10}}
  - {id: dedup, type: dedup.near_duplicate, inputs: [bm25], params: {num_perm: 64}}
""")
    assert ":5:" in found and "num_perm is set but not used" in found and "method: minhash" in found


def test_errors_are_listed_before_warnings():
    """Error-message audit: '1 configuration error:' was followed by a warning on an earlier line, the one error
    second; the errors come first now, then the warnings, each in file order."""
    issues = [ConfigIssue(Location("p.yaml", 9, 3), "output", "not a stage"),
              ConfigIssue(Location("p.yaml", 5, 1), "stages.1.params.num_perm", "set but not used", "warning"),
              ConfigIssue(Location("p.yaml", 7, 1), "stages.2.params.k", "must be positive"),
              ConfigIssue(Location("p.yaml", 2, 1), "stages.0.params.x", "set but not used", "warning")]
    assert str(ConfigError(issues)).splitlines() == [
        "2 configuration errors:",
        "p.yaml:7:1  stages.2.params.k: must be positive",
        "p.yaml:9:3  output: not a stage",
        "p.yaml:2:1  warning: stages.0.params.x: set but not used",
        "p.yaml:5:1  warning: stages.1.params.num_perm: set but not used",
    ]
