"""select.top_k's max_per: at most n results per value of a document field (a cap per source), on a real index."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from engine.compiler import compile_file
from engine.errors import ConfigError
from engine.pipeline import Pipeline

QUERY = "metformin kidney function guidance"


def _pipeline(write_config, index: Path, params: str) -> Pipeline:
    return Pipeline.from_file(write_config(f"""version: 1
index: {index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 30}}}}
  - {{id: final, type: select.top_k, inputs: [bm25], params: {params}}}
output: final
trace: {{log: null}}
"""))


def _sources(pipeline: Pipeline, result) -> list:  # type: ignore[no-untyped-def]
    documents = pipeline.resources.index.documents.get([c.row for c in result.results])
    return [documents[c.row].metadata.get("source") for c in result.results]


def test_at_most_n_per_source_in_rank_order_and_the_next_take_the_places(medical_bm25, write_config):
    plain = _pipeline(write_config, medical_bm25, "{k: 8}")
    capped = _pipeline(write_config, medical_bm25, "{k: 8, max_per: {field: source, n: 1}}")
    before, after = plain.search(QUERY, log=False), capped.search(QUERY, log=False)
    assert max(Counter(_sources(plain, before)).values()) > 1  # the query has a source to cap
    sources = _sources(capped, after)
    assert len(set(sources)) == len(sources)
    # the greedy walk down the ranking: each source's best, in rank order, until k are kept
    everything = _pipeline(write_config, medical_bm25, "{k: 30}")
    ranked = everything.search(QUERY, log=False)
    expected, seen = [], set()
    for candidate, source in zip(ranked.results, _sources(everything, ranked)):
        if source not in seen and len(expected) < 8:
            expected.append(candidate.doc_id)
            seen.add(source)
    assert [c.doc_id for c in after.results] == expected
    stage = next(s for s in after.trace["stages"] if s["id"] == "final")
    dropped = [d for d in stage["drops"] if d["reason"] == "beyond_max_per"]
    assert dropped and all("source" in d["detail"] and "1 kept already" in d["detail"] for d in dropped), dropped
    assert stage["details"]["max_per"]["field"] == "source" and set(stage["details"]["max_per"]["kept"].values()) == {1}


def test_documents_without_the_field_are_kept_or_capped_together(medical_bm25, write_config, tmp_path):
    keep = _pipeline(write_config, medical_bm25, "{k: 30, max_per: {field: no_such_field, n: 1}}")
    assert len(keep.search(QUERY, log=False).results) == len(
        _pipeline(write_config, medical_bm25, "{k: 30}").search(QUERY, log=False).results)
    group = _pipeline(write_config, medical_bm25, "{k: 30, max_per: {field: no_such_field, n: 2, missing: group}}")
    assert len(group.search(QUERY, log=False).results) == 2


@pytest.mark.parametrize(("cap", "says"), [
    ("{field: doc.source, n: 1}", "without 'doc.'"),
    ("{field: source, n: 0}", "greater than or equal to 1"),
    ("{field: source}", "n"),
])
def test_a_bad_cap_is_a_located_config_error(write_config, cap, says):
    config = write_config(f"""version: 1
index: x
stages:
  - {{id: bm25, type: recall.bm25}}
  - {{id: final, type: select.top_k, inputs: [bm25], params: {{k: 5, max_per: {cap}}}}}
""")
    with pytest.raises(ConfigError) as failed:
        compile_file(config)
    assert ":5:" in str(failed.value) and says in str(failed.value)


def test_a_field_no_document_has_is_a_warm_up_warning_with_a_did_you_mean(medical_bm25, write_config):
    """A misspelt field capped nothing without a word (every candidate 'missing', so kept)."""
    typo = _pipeline(write_config, medical_bm25, "{k: 8, max_per: {field: sourc, n: 1}}")
    typo.warm_up()
    (warning,) = typo.warnings
    assert warning.startswith("stage 'final': max_per.field 'sourc': none of the index's first 33 documents has it "
                              "(did you mean 'source'?); every candidate is kept (missing: keep), so nothing is capped")
    assert "source" in warning.split("Fields they have: ")[1]
    assert typo.search(QUERY, log=False).trace["warnings"] == typo.warnings  # kept in each trace
    right = _pipeline(write_config, medical_bm25, "{k: 8, max_per: {field: source, n: 1}}")
    right.warm_up()
    assert right.warnings == [] and "warnings" not in right.search(QUERY, log=False).trace


def test_a_nested_field_through_a_value_that_is_no_mapping_is_named_in_the_trace(tmp_path, write_config):
    """`team.name` where `team` is a list is malformed, not absent: the document is treated as missing, and named."""
    from engine.index import build_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join([
        '{"_id": "a", "title": "vitamin", "text": "vitamin d one", "team": {"name": "x"}}',
        '{"_id": "b", "title": "vitamin", "text": "vitamin d two", "team": {"name": "x"}}',
        '{"_id": "c", "title": "vitamin", "text": "vitamin d three", "team": ["odd"]}',
    ]) + "\n", encoding="utf-8")
    build_index(corpus, tmp_path / "idx", {"bm25": {}})
    result = _pipeline(write_config, tmp_path / "idx", "{k: 5, max_per: {field: team.name, n: 1}}").search(
        "vitamin", log=False)
    assert sorted(c.doc_id for c in result.results) in (["a", "c"], ["b", "c"])
    details = next(s for s in result.trace["stages"] if s["id"] == "final")["details"]["max_per"]
    assert details["unreadable_count"] == 1 and "'team' is a list" in details["unreadable"]["c"]
