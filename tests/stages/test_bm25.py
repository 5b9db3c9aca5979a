"""recall.bm25: parity with bm25s used directly, masks, Chinese tokenisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.index import Index, build_index
from engine.pipeline import Pipeline
from engine.stage import DocumentMask, StageContext
from stages.text import Tokenizer, TokenizerSettings


def _queries(mini_corpus, count=20):
    lines = (mini_corpus / "queries.jsonl").read_text().splitlines()[:count]
    return [json.loads(line)["text"] for line in lines]


def test_parity_with_bm25s_defaults(mini_corpus, bm25_index, write_config):
    """Our stage returns what bm25s itself returns with its documented defaults (stemmed, en stop words)."""
    import bm25s
    import Stemmer

    docs = [json.loads(line) for line in (mini_corpus / "corpus.jsonl").read_text().splitlines()]
    stemmer = Stemmer.Stemmer("english")
    reference = bm25s.BM25()
    corpus_tokens = bm25s.tokenize(
        [f"{d['title']} {d['text']}" for d in docs], stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False
    )
    reference.index(corpus_tokens, show_progress=False)

    config = write_config(
        f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 10}}}}\ntrace: {{log: null}}\n"
    )
    pipeline = Pipeline.from_file(config)
    for query in _queries(mini_corpus):
        tokens = bm25s.tokenize(query, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
        ids, scores = reference.retrieve(tokens, k=10, show_progress=False)
        expected = sorted(
            ((docs[i]["_id"], float(s)) for i, s in zip(ids[0], scores[0]) if s > 0), key=lambda p: (-p[1], p[0])
        )
        ours = [(c.doc_id, c.score) for c in pipeline.search(query).results]
        assert [d for d, _ in ours] == [d for d, _ in expected] or _same_up_to_boundary_ties(ours, expected)
        assert [s for _, s in ours] == pytest.approx([s for _, s in expected], rel=1e-6)


def _same_up_to_boundary_ties(ours, expected):
    """bm25s breaks ties at the k-th place arbitrarily; we break them on doc_id."""
    return sorted(s for _, s in ours) == sorted(s for _, s in expected)


def test_mask_keeps_forbidden_documents_out_of_recall(bm25_index, write_config):
    config = write_config(
        f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 10}}}}\ntrace: {{log: null}}\n"
    )
    pipeline = Pipeline.from_file(config)
    resources = pipeline.warm_up()
    stage = pipeline.compiled.stages["bm25"]
    query = pipeline.make_query("vitamin B12 homocysteine")
    unmasked = stage.run(StageContext("bm25", query, [], None, resources)).candidates
    allowed = np.ones(resources.index.doc_count, dtype=bool)
    forbidden = [c.row for c in unmasked[:3]]
    allowed[forbidden] = False
    masked = stage.run(StageContext("bm25", query, [], DocumentMask(allowed, ("test",)), resources))
    assert not {c.row for c in masked.candidates} & set(forbidden)
    assert len(masked.candidates) == 10  # the freed slots went to allowed documents
    assert masked.details["masked_out"] == 3


def test_chinese_is_segmented_not_one_token():
    tokenizer = Tokenizer(TokenizerSettings(language="zh"))
    sentence = "二甲双胍是治疗2型糖尿病的一线药物, metformin works"
    terms = tokenizer.tokenize(sentence)
    assert "糖尿病" in terms and "治疗" in terms  # words, not the whole sentence nor single characters only
    assert sentence.split(",")[0] not in terms
    assert "的" not in terms and "是" not in terms
    assert "metformin" in terms and "work" in terms


def test_chinese_index_end_to_end(tmp_path, write_config):
    corpus = tmp_path / "corpus.jsonl"
    docs = [
        {"_id": "a", "title": "二甲双胍", "text": "二甲双胍是治疗2型糖尿病的一线药物。"},
        {"_id": "b", "title": "胰岛素", "text": "胰岛素用于治疗1型糖尿病。"},
        {"_id": "c", "title": "高血压", "text": "降压药用于控制血压。"},
    ]
    corpus.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs))
    build_index(corpus, tmp_path / "zh", {"bm25": {"tokenizer": {"language": "zh"}}})
    config = write_config(
        f"version: 1\nindex: {tmp_path / 'zh'}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 3}}}}\ntrace: {{log: null}}\n"
    )
    results = Pipeline.from_file(config).search("二甲双胍治疗糖尿病").results
    assert [c.doc_id for c in results][:2] == ["a", "b"]


def test_term_score_lookup_equals_scoring_the_term(bm25_index):
    """The explanation's per-term lookup gives exactly what bm25s scores for that term alone."""
    from stages.recall.bm25 import LoadedBM25

    directory, entry = Index.open(bm25_index).component("bm25", "test")
    loaded = LoadedBM25(directory, entry)
    terms = [t for t in sorted(loaded.vocab) if t][::97][:25]
    for term in terms:
        full = loaded.retriever.get_scores([term])
        rows = np.arange(0, len(full), 7)
        assert loaded.term_scores(term, rows).tolist() == full[rows].tolist()
    assert loaded.term_scores("no-such-term", [0, 1]).tolist() == [0.0, 0.0]


def test_explanation_terms_add_up_to_the_bm25_score(bm25_index, write_config):
    """Each returned document's explanation lists its matching query terms; they sum to its score,
    whether the explanation is built during the search or afterwards (replay, sieve explain)."""
    config = write_config(
        f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}\n"
        "trace: {log: null}\n"
    )
    pipeline = Pipeline.from_file(config)
    result = pipeline.search("metformin lowers blood glucose in type 2 diabetes")
    entries = result.trace["results"]
    assert len(entries) == 20
    for entry in entries:
        tree = entry["explanation"]
        bm25_node = tree["details"][0]
        terms = bm25_node["details"]
        assert terms and all(t["description"].startswith("term '") for t in terms)
        assert sum(t["value"] for t in terms) == pytest.approx(bm25_node["value"], rel=1e-5)
    stage = pipeline.compiled.stages["bm25"]
    stage._contributions = type(stage._contributions)()  # forget the search: recompute from the index
    first = result.results[0]
    from engine.model import Query

    again = stage.explain(Query.create("metformin lowers blood glucose in type 2 diabetes"), first,
                          first.score_of("bm25"), 1, True)
    assert [d.to_dict() for d in again.details] == entries[0]["explanation"]["details"][0]["details"]
