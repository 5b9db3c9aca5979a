"""recall.bm25's explanations: the term nodes ``run`` computes for all the returned documents at once are, node
for node and bit for bit, what explaining one document outside the search computes (replay, ``sieve explain``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.index import Index, build_index
from engine.model import Query
from engine.pipeline import Pipeline

REPEATED = "insulin resistance, insulin secretion and insulin sensitivity in type 2 diabetes: diabetes risk"


def _queries(mini_corpus: Path, count: int = 25) -> list[str]:
    lines = (mini_corpus / "queries.jsonl").read_text().splitlines()[:count]
    return [json.loads(line)["text"] for line in lines] + [REPEATED]


def _pipeline(write_config, index: Path, top_k: int = 40, text: bool = True) -> Pipeline:
    return Pipeline.from_file(write_config(
        f"version: 1\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: {top_k}}}}}\n"
        f"trace: {{log: null, include_query_text: {str(text).lower()}}}\n"
    ))


@pytest.fixture(scope="module")
def method_indexes(tmp_path_factory: pytest.TempPathFactory, mini_corpus: Path) -> dict[str, Path]:
    """The SciFact slice indexed under the variants whose explanations differ from lucene's: bm25l and bm25+
    score a term a document lacks, robertson and atire can give a holder 0."""
    out = tmp_path_factory.mktemp("bm25-methods")
    indexes = {}
    for method in ("bm25+", "bm25l", "robertson", "atire"):
        indexes[method] = out / method.replace("+", "plus")
        build_index(mini_corpus, indexes[method], {"bm25": {"method": method}})
    return indexes


def _trees_both_ways(pipeline: Pipeline, text: str) -> tuple[list, list]:
    """Each returned document's bm25 explanation as the trace holds it (the notes of the search) and as
    ``explain`` builds it once the stage has forgotten the search (looked up term by term)."""
    result = pipeline.search(text, log=False)
    stage = pipeline.compiled.stages["bm25"]
    from_search = [entry["explanation"]["details"][0] for entry in result.trace["results"]]
    query = Query.create(text)
    assert all(stage._contributions.details(query, stage._text, c.row) is not None for c in result.results)
    stage._contributions = type(stage._contributions)()  # forget the search
    looked_up = [stage.explain(query, c, c.score_of("bm25"), c.ledger[-1].rank, True).to_dict()
                 for c in result.results]
    assert all(stage._contributions.details(query, stage._text, c.row) is None for c in result.results)
    return from_search, looked_up


def _same(a: list, b: list) -> bool:
    """Equal trees, floats bit for bit (as the trace's JSON writes them)."""
    return a == b and json.dumps(a) == json.dumps(b)


def test_search_notes_and_one_by_one_lookups_give_identical_trees(mini_corpus, bm25_index, write_config):
    pipeline = _pipeline(write_config, bm25_index)
    repeated = 0
    for text in _queries(mini_corpus):
        from_search, looked_up = _trees_both_ways(pipeline, text)
        assert from_search and _same(from_search, looked_up), text
        repeated += sum("(repeated in the query)" in t["description"] for node in from_search for t in node["details"])
    assert repeated  # 'variants ... variants', 'insulin' three times (x3: a product float32 would round), 'diabetes'
    # the description names the rank; nothing but the rank differs from one document to the next
    assert {n["description"].split("; rank ")[0] for n in from_search} == {
        from_search[0]["description"].split("; rank ")[0]}


@pytest.mark.parametrize("method", ["bm25+", "bm25l", "robertson", "atire"])
def test_identical_under_every_method(method, method_indexes, mini_corpus, write_config):
    """Including the terms a document lacks that still score under bm25l and bm25+ (said so in the description)."""
    pipeline = _pipeline(write_config, method_indexes[method])
    lacking = 0
    for text in _queries(mini_corpus, 12):
        from_search, looked_up = _trees_both_ways(pipeline, text)
        assert from_search and _same(from_search, looked_up), (method, text)
        for node in from_search:
            assert sum(t["value"] for t in node["details"]) == pytest.approx(node["value"], rel=1e-5)
            lacking += sum("(not in the document: the method's non-occurrence score)" in t["description"]
                           for t in node["details"])
    assert bool(lacking) == (method in ("bm25+", "bm25l")), method


def test_without_query_text_no_notes_are_kept_and_the_formula_is_the_same(mini_corpus, bm25_index, write_config):
    text = _queries(mini_corpus, 1)[0]
    with_text = _pipeline(write_config, bm25_index).search(text, log=False)
    without = _pipeline(write_config, bm25_index, text=False)
    result = without.search(text, log=False)
    stage = without.compiled.stages["bm25"]
    assert stage._contributions.details(Query.create(text), stage._text, result.results[0].row) is None
    for plain, full in zip(result.trace["results"], with_text.trace["results"]):
        assert plain["explanation"]["details"][0] == {**full["explanation"]["details"][0], "details": []}


@pytest.mark.parametrize("sorted_columns", [True, False])
def test_term_score_matrix_equals_the_lookups_one_term_at_a_time(bm25_index, sorted_columns):
    from stages.recall.bm25 import LoadedBM25

    directory, entry = Index.open(bm25_index).component("bm25", "test")
    loaded = LoadedBM25(directory, entry)
    loaded._columns_sorted = sorted_columns  # False: bm25s's own scoring, and postings read unsorted
    terms = [t for t in sorted(loaded.vocab) if t][::53][:30] + ["no-such-term", ""]
    rows = np.random.default_rng(0).permutation(int(loaded.retriever.scores["num_docs"]))[:150]
    rows = np.concatenate([rows, rows[:5], [0, int(loaded.retriever.scores["num_docs"]) - 1]])  # repeats, both ends
    scores, held = loaded.term_score_matrix(terms, rows)
    assert scores.dtype == np.float32 and scores.shape == held.shape == (len(rows), len(terms))
    for j, term in enumerate(terms):
        assert scores[:, j].tobytes() == loaded.term_scores(term, rows).tobytes(), term
        assert held[:, j].tolist() == [loaded.holds(term, int(row)) for row in rows], term
