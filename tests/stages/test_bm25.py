"""recall.bm25: parity with bm25s used directly, masks, Chinese tokenisation."""

from __future__ import annotations

import hashlib
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


def test_under_lucene_the_scores_name_exactly_the_documents_holding_a_term(bm25_index, write_config):
    """The Lucene path reads "holds a query term" off the scores (one pass) instead of the postings; both must
    name the same rows, with and without a mask, for queries of common and rare terms."""
    config = write_config(
        f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 10}}}}\n"
        "trace: {log: null}\n")
    pipeline = Pipeline.from_file(config)
    resources = pipeline.warm_up()
    stage = pipeline.compiled.stages["bm25"]
    assert stage._bm25.settings.get("method", "lucene") == "lucene"
    allowed = np.ones(resources.index.doc_count, dtype=bool)
    allowed[::3] = False
    for text in ("vitamin B12 homocysteine", "the cells of the patients", "apoptosis"):
        known = [t for t in stage._split_terms(pipeline.make_query(text))[0] if t in stage._bm25.vocab]
        for mask in (None, DocumentMask(allowed, ("test",))):
            weights = None if mask is None else mask.allowed.astype(np.float32)
            scores = stage._bm25.retriever.get_scores(known, weight_mask=weights)
            postings = stage._bm25.matching(known) & (True if mask is None else mask.allowed)
            assert np.array_equal(stage._holding(known, scores, mask), np.flatnonzero(postings)), text


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


# ---------------------------------------------------------------------- from an audit of recall at run time


def _tiny_index(tmp_path, docs, settings=None, name="idx"):
    corpus = tmp_path / f"{name}.jsonl"
    corpus.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs), encoding="utf-8")
    build_index(corpus, tmp_path / name, {"bm25": settings or {}})
    return tmp_path / name


def _bm25_pipeline(write_config, index, top_k=10):
    return Pipeline.from_file(write_config(
        f"version: 1\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: {top_k}}}}}\n"
        "trace: {log: null}\n"
    ))


def test_compatibility_forms_are_folded():
    """Full-width letters and digits, ligatures: the same terms as their plain forms (jieba cut 'ＨＩＶ' into
    single letters and the word pattern dropped them all; 'ﬁbrosis' never matched 'fibrosis')."""
    zh = Tokenizer(TokenizerSettings(language="zh"))
    assert zh.tokenize("ＨＩＶ感染") == zh.tokenize("HIV感染") == ["hiv", "感染"]
    assert "500mg" in zh.tokenize("每日５００ｍｇ二甲双胍")
    en = Tokenizer(TokenizerSettings())
    assert en.tokenize("pulmonary ﬁbrosis, ５０ mg") == en.tokenize("pulmonary fibrosis, 50 mg")
    # nfc keeps compatibility forms apart (how indexes built before the setting tokenised)
    assert Tokenizer(TokenizerSettings(language="zh", normalization="nfc")).tokenize("ＨＩＶ感染") == ["感染"]


def test_full_width_document_found_by_ascii_query(tmp_path, write_config):
    docs = [{"_id": "z1", "title": "", "text": "ＣＯＶＩＤ－１９ 疫苗接种"},
            {"_id": "z2", "title": "", "text": "流感疫苗"}]
    pipeline = _bm25_pipeline(write_config, _tiny_index(tmp_path, docs, {"tokenizer": {"language": "zh"}}))
    assert [c.doc_id for c in pipeline.search("COVID-19").results] == ["z1"]
    assert [c.doc_id for c in pipeline.search("ＣＯＶＩＤ－１９ 疫苗").results][0] == "z1"


def test_index_built_before_normalization_setting_reads_as_nfc(tmp_path):
    """An index whose tokenizer.json predates the setting keeps tokenising queries as its documents were."""
    from stages.recall.bm25 import TOKENIZER_FILE, LoadedBM25

    index = _tiny_index(tmp_path, [{"_id": "a", "title": "", "text": "fibrosis"}])
    directory, entry = Index.open(index).component("bm25", "test")
    recorded = json.loads((directory / TOKENIZER_FILE).read_text())
    assert recorded["normalization"] == "nfkc"  # new indexes record it
    assert recorded["segmentation"] == "search"
    del recorded["normalization"], recorded["segmentation"]
    (directory / TOKENIZER_FILE).write_text(json.dumps(recorded))
    settings = LoadedBM25(directory, entry).tokenizer.settings
    assert (settings.normalization, settings.segmentation) == ("nfc", "precise")
    # and warm-up says so, once per search stage (an upgrade audit: nothing told the operator a rebuild changes
    # full-width and ligature matching; the entities component warned of its own older form)
    manifest = json.loads((index / "manifest.json").read_text())  # the manifest of such an index names that file
    manifest["files"][f"bm25/{TOKENIZER_FILE}"] = hashlib.sha256((directory / TOKENIZER_FILE).read_bytes()).hexdigest()
    (index / "manifest.json").write_text(json.dumps(manifest))
    config = tmp_path / "p.yaml"
    config.write_text(f"version: 1\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                      "trace: {log: null}\n", encoding="utf-8")
    pipeline = Pipeline.from_file(config)
    pipeline.warm_up()
    (warning,) = pipeline.warnings
    assert warning.startswith("stage 'bm25': the index's 'bm25' component was built before Sieve read text in "
                              "Unicode NFKC") and warning.endswith("rebuild the index")


def test_a_chinese_word_inside_a_compound_is_found(tmp_path, write_config):
    """jieba's precise mode makes '癌症病人' and '糖尿病人' one term each: a search for 癌症 or 糖尿病 found nothing
    (an audit for a Chinese team). Search-mode segmentation also indexes the words inside a compound."""
    docs = [{"_id": "a", "title": "", "text": "癌症病人的疼痛应按照三阶梯原则处理。"},
            {"_id": "b", "title": "", "text": "糖尿病人应定期监测血糖。"},
            {"_id": "c", "title": "", "text": "高血压患者应限制食盐。"}]
    zh = {"tokenizer": {"language": "zh"}}
    pipeline = _bm25_pipeline(write_config, _tiny_index(tmp_path, docs, zh))
    assert [c.doc_id for c in pipeline.search("癌症").results] == ["a"]
    assert [c.doc_id for c in pipeline.search("糖尿病").results] == ["b"]
    precise = {"tokenizer": {"language": "zh", "segmentation": "precise"}}
    old = _bm25_pipeline(write_config, _tiny_index(tmp_path, docs, precise, name="precise"))
    assert old.search("癌症").results == []  # what precise mode does


def _lucene(docs_terms, query_terms, row, k1=1.5, b=0.75):
    """The explanation's stated Lucene formula, computed by hand."""
    import math

    n = len(docs_terms)
    avgdl = sum(len(d) for d in docs_terms) / n
    total = 0.0
    for term in query_terms:
        df = sum(term in d for d in docs_terms)
        tf = docs_terms[row].count(term)
        if tf:
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            total += idf * tf / (tf + k1 * (1 - b + b * len(docs_terms[row]) / avgdl))
    return total


def test_explanation_formula_is_what_is_computed(tmp_path, write_config):
    """The formula the explanation states gives the score (it said tf*(k1+1), 2.5 times the score)."""
    docs = [{"_id": f"d{i}", "title": "", "text": text} for i, text in enumerate([
        "metformin lowers glucose", "insulin lowers glucose quickly and insulin is injected",
        "metformin metformin tablets", "exercise helps", "diet and exercise lower glucose"])]
    index = _tiny_index(tmp_path, docs)
    pipeline = _bm25_pipeline(write_config, index)
    tokenizer = Tokenizer(TokenizerSettings())
    docs_terms = [tokenizer.tokenize(d["text"]) for d in docs]
    result = pipeline.search("metformin glucose")
    assert result.results
    for candidate, entry in zip(result.results, result.trace["results"]):
        row = int(candidate.doc_id[1:])
        assert candidate.score_of("bm25") == pytest.approx(_lucene(docs_terms, tokenizer.tokenize("metformin glucose"),
                                                                   row), rel=1e-5)
        description = entry["explanation"]["details"][0]["description"]
        assert "tf / (tf + k1*(1-b+b*dl/avgdl))" in description and "ln(1 + (N-df+0.5)/(df+0.5))" in description


@pytest.mark.parametrize("method", ["robertson", "atire", "bm25l", "bm25+", "lucene"])
def test_the_access_mask_holds_under_every_bm25_method(tmp_path, write_config, method):
    """Mutation audit, mutant 37 (the mask left out of the rows holding a query term): under every method but
    Lucene, documents the access rules forbid were recalled, score 0, whenever fewer allowed ones matched; the mask
    test used Lucene only."""
    docs = [{"_id": d, "title": "", "text": f"aspirin {word}"} for d, word in
            (("a", "relieves pain"), ("b", "thins blood"), ("c", "and ibuprofen"))]
    index = _tiny_index(tmp_path, docs, {"method": method})
    pipeline = _bm25_pipeline(write_config, index)
    resources = pipeline.warm_up()
    allowed = np.ones(resources.index.doc_count, dtype=bool)
    allowed[resources.index.row_of("b")] = False
    stage = pipeline.compiled.stages["bm25"]
    query = pipeline.make_query("aspirin")
    result = stage.run(StageContext("bm25", query, [], DocumentMask(allowed, ("access",)), resources))
    assert sorted(c.doc_id for c in result.candidates) == ["a", "c"]


def test_documents_holding_a_term_are_recalled_under_every_method(tmp_path, write_config):
    """robertson gives a term in most documents idf 0: its documents were dropped and the trace said none
    matched; bm25l and bm25+ score every document for a term it lacks: documents with no query term were
    recalled. Recall is the documents holding a query term, under every method, and the explanation's
    terms add up to the score."""
    docs = [{"_id": "a", "title": "", "text": "aspirin relieves pain"},
            {"_id": "b", "title": "", "text": "aspirin thins blood"},
            {"_id": "c", "title": "", "text": "aspirin and ibuprofen"},
            {"_id": "d", "title": "", "text": "paracetamol for fever"}]
    for method in ("robertson", "atire", "bm25l", "bm25+", "lucene"):
        index = _tiny_index(tmp_path, docs, {"method": method}, name=f"idx-{method}")
        result = _bm25_pipeline(write_config, index).search("aspirin")
        assert sorted(c.doc_id for c in result.results) == ["a", "b", "c"], method
        codes = {d["code"] for stage in result.trace["stages"] for d in stage.get("decisions", [])}
        assert ("zero_scores" in codes) == (method == "robertson"), method
        for entry in result.trace["results"]:
            node = entry["explanation"]["details"][0]
            assert sum(t["value"] for t in node["details"]) == pytest.approx(node["value"], rel=1e-5), method
        both = _bm25_pipeline(write_config, index).search("aspirin fever")
        assert sorted(c.doc_id for c in both.results) == ["a", "b", "c", "d"], method
        if method in ("bm25l", "bm25+"):  # 'd' lacks 'aspirin' and still scores for it: said so
            entry = next(e for e in both.trace["results"] if e["doc_id"] == "a")
            node = entry["explanation"]["details"][0]
            assert any("not in the document" in t["description"] for t in node["details"])
            assert sum(t["value"] for t in node["details"]) == pytest.approx(node["value"], rel=1e-5)
