"""Unicode audit: a spelling that recall reads as the same words must not slip past a rule.

BM25 reads text in NFKC and splits words on punctuation, so a full-width 'ｏｖｅｒｄｏｓｅ', a decomposed 'café', a
non-breaking hyphen or a soft hyphen find the same documents as the plain spelling. Rules compared the raw text
(case-folded only), so such a query dodged a query-side exclusion, and such a document a block list; the glossary
missed decomposed terms and the gazetteer names broken by a soft hyphen or typed with another hyphen. Each test
says what happened before ("before:")."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from engine.index import build_index
from engine.pipeline import Pipeline
from engine.textform import comparable

AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)
DOCS = [
    {"_id": "restricted", "title": "Case file", "text": "overdose methods reviewed", "status": "restricted"},
    {"_id": "open", "title": "Guidance", "text": "overdose prevention methods", "status": "open"},
    {"_id": "cafe-1", "title": "Café notes", "text": "café au lait recipes"},
    {"_id": "cafe-2", "title": "Cafe\u0301 menu", "text": "café au lait prices"},
    {"_id": "pld-nbh", "title": "Export A", "text": "holds patient\u2011level data from the trial"},
    {"_id": "pld-wide", "title": "Export B", "text": "holds ｐａｔｉｅｎｔ-level data from the trial"},
    {"_id": "pld-soft", "title": "Export C", "text": "holds pa\u00adtient-level  data from the trial"},
    {"_id": "pld-plain", "title": "Export D", "text": "holds patient level data from the trial"},
    {"_id": "acme-wide", "title": "Acme quarterly", "text": "Acme trial results", "tickers": ["ＡＣＭＥ"]},
    {"_id": "dose", "title": "Dose note", "text": "co-trimoxazole dose for the trial"},
    {"_id": "supply", "title": "Ozempic supply", "text": "semaglutide supply for the trial"},
]
GAZETTEER = """version: 1
entities:
  - {label: DRUG, id: co-trimoxazole, names: [co-trimoxazole, Bactrim]}
  - {label: DRUG, id: semaglutide, names: [semaglutide, Ozempic]}
"""
PREFILTER = """version: 1
kind: prefilter
rules:
  - {id: no-overdose-files, action: exclude, when: {field: query.text, op: contains, value: overdose},
     match: {field: doc.status, op: eq, value: restricted}}
  - {id: block-pld, action: exclude, match: {field: doc.text, op: contains_any, value: [patient-level data]}}
  - {id: restricted-list, action: exclude, match: {field: doc.tickers, op: contains_any, value: [ACME]}}
"""
OVERRIDES = """version: 1
kind: override
rules:
  - {id: never-show-cafe, action: exclude, when: {field: query.effective, op: contains, value: café},
     match: {field: doc.title, op: contains, value: Café}}
  - {id: hide-cotrim-notes, action: exclude, when: {field: query.entities.DRUG, op: contains, value: co-trimoxazole},
     match: {field: doc.title, op: eq, value: Dose note}}
  - {id: hide-ozempic-supply, action: exclude, when: {field: query.entities.DRUG, op: contains, value: semaglutide},
     match: {field: doc.title, op: contains, value: Ozempic}}
"""
GLOSSARY = """version: 1
entries:
  - {id: cafe, terms: [café, coffee shop]}
  - {id: pld, terms: [patient-level data, individual participant data]}
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    root = tmp_path_factory.mktemp("spellings")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8")
    (root / "gazetteer.yaml").write_text(GAZETTEER, encoding="utf-8")
    build_index(corpus, root / "index", {"bm25": {}, "entities": {"gazetteer": str(root / "gazetteer.yaml")}})
    for name, text in (("prefilter.yaml", PREFILTER), ("overrides.yaml", OVERRIDES), ("glossary.yaml", GLOSSARY)):
        (root / name).write_text(text, encoding="utf-8")
    config = root / "pipeline.yaml"
    config.write_text(
        "version: 1\nname: spellings\nindex: index\nstages:\n"
        "  - {id: rewrite, type: rewrite.coreference, params: {glossary: glossary.yaml}}\n"
        "  - {id: access, type: rules.prefilter, inputs: [rewrite], params: {rules: prefilter.yaml}}\n"
        "  - {id: bm25, type: recall.bm25, inputs: [access], params: {top_k: 20}}\n"
        "  - {id: overrides, type: rules.override, inputs: [bm25], params: {rules: overrides.yaml}}\n"
        "output: overrides\ntrace: {log: null}\n", encoding="utf-8")
    return Pipeline.from_file(config)


def _ids(pipeline: Pipeline, query: str) -> set[str]:
    return {r.doc_id for r in pipeline.search(query, as_of=AS_OF, log=False).results}


@pytest.mark.parametrize("query", ["overdose methods", "OVERDOSE methods", "ｏｖｅｒｄｏｓｅ methods",
                                   "over\u00addose methods", "overdose\u00a0methods"])
def test_a_query_side_exclusion_holds_for_every_spelling_recall_reads_alike(pipeline, query):
    found = _ids(pipeline, query)
    assert "open" in found and "restricted" not in found  # before: the full-width query got the restricted file


@pytest.mark.parametrize("query", ["café au lait", "CAFÉ au lait", "cafe\u0301 au lait", "ｃａｆé au lait"])
def test_an_override_on_the_query_and_a_title_holds_for_decomposed_and_full_width_text(pipeline, query):
    assert not _ids(pipeline, query) & {"cafe-1", "cafe-2"}  # before: both shown for the last two spellings


def test_a_document_block_list_holds_for_hyphens_full_width_soft_hyphens_and_spaces(pipeline):
    found = _ids(pipeline, "patient level data trial")
    assert "pld-plain" in found  # another phrase ("patient level"): not the listed one
    assert not found & {"pld-nbh", "pld-wide", "pld-soft"}  # before: all three were returned
    assert not _ids(pipeline, "Acme trial results") & {"acme-wide"}  # before: the full-width ticker was shown


@pytest.mark.parametrize("query", ["co-trimoxazole dose", "co\u2011trimoxazole dose", "co\u2010trimoxazole dose",
                                   "co\u2013trimoxazole dose", "Bactrim dose"])
def test_a_rule_on_query_entities_sees_a_name_typed_with_another_hyphen(pipeline, query):
    assert "dose" not in _ids(pipeline, query)  # before: shown for the three other hyphens


def test_a_soft_hyphen_inside_a_name_does_not_hide_it_from_the_gazetteer(pipeline):
    assert "supply" not in _ids(pipeline, "Oz\u00adempic supply")  # before: shown


@pytest.mark.parametrize("query", ["cafe\u0301 workers", "patient\u2011level data", "patient\u2013level data"])
def test_the_glossary_reads_decomposed_accents_and_other_hyphens(pipeline, query):
    result = pipeline.search(query, as_of=AS_OF, log=False)
    rewritten = result.trace["query"]["rewritten"]
    assert "coffee shop" in rewritten or "individual participant data" in rewritten, rewritten  # before: unchanged


def test_the_comparable_form():
    assert comparable("ｏｖｅｒｄｏｓｅ") == comparable("OVERDOSE") == "overdose"
    assert comparable("cafe\u0301") == comparable("CAFÉ") == "café"
    assert comparable("patient\u2011level\u00a0 data") == comparable("pa\u00adtient\u2013level data") == "patient-level data"
    assert comparable("patient’s “notes”") == "patient's \"notes\""
    assert comparable("ＡＣＭＥ", case_sensitive=True) == "ACME" != comparable("acme", case_sensitive=True)
    assert comparable(" IT ") == " it "  # the ends are kept: a needle padded with spaces keeps its meaning


def test_expressions_read_text_as_given_and_offer_the_comparable_form():
    """An expression sees the text as given (``'overdose' in query.text | lower`` misses a full-width query); the
    ``comparable`` filter gives the form field conditions compare in, and ``matches`` reads it as ``op: regex``."""
    from rules.expressions import compile_expression

    def truth(source: str, text: str) -> bool:
        return compile_expression(source, ["query"]).truth({"query": {"text": text}})

    wide = "ｏｖｅｒｄｏｓｅ methods"
    assert not truth("'overdose' in query.text | lower", wide)
    assert truth("'overdose' in query.text | comparable", wide)
    assert truth("query.text | matches('overdose')", wide)  # before: the pattern missed the full-width text
    assert truth("query.text | matches('co-trimoxazole')", "co\u2011trimoxazole")


@pytest.mark.parametrize("rule", ["{id: acl, action: acl, field: acl}",
                                  "{id: team, action: include, match: {field: doc.team, op: in, value_from: user.groups}}"])
def test_access_identifiers_compare_as_written(tmp_path, rule):
    """Review of this change: with the one form, user groups 'finance‑team' (non-breaking hyphen), full-width or
    with a soft hyphen granted the documents of 'finance-team', in the acl action and in a condition on user.groups.
    Identifiers granting access compare as written, case-folded only (fail closed)."""
    from engine.compiler import compile_file
    from engine.model import UserContext

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "d1", "text": "zebra", "acl": ["finance-team"], "team": "finance-team"}) + "\n",
                      encoding="utf-8")
    build_index(corpus, tmp_path / "index", {"bm25": {}})
    (tmp_path / "access.yaml").write_text(f"version: 1\nkind: prefilter\nrules:\n  - {rule}\n", encoding="utf-8")
    (tmp_path / "p.yaml").write_text(
        f"version: 1\nindex: {tmp_path / 'index'}\nstages:\n  - {{id: access, type: rules.prefilter, params: "
        "{rules: access.yaml}}\n  - {id: bm25, type: recall.bm25, inputs: [access]}\noutput: bm25\ntrace: {log: null}\n",
        encoding="utf-8")
    pipeline = Pipeline(compile_file(tmp_path / "p.yaml"))

    def sees(group: str) -> bool:
        return bool(pipeline.run(pipeline.make_query("zebra", user=UserContext(groups=[group]), as_of=AS_OF)).results)

    assert sees("finance-team") and sees("FINANCE-TEAM")
    for spelt in ("finance\u2011team", "ｆinance-team", "fin\u00adance-team", "finance-te\u200bam"):
        assert not sees(spelt), spelt


@pytest.mark.parametrize("pattern, text", [("co—trimoxazole", "co-trimoxazole"), ("patient’s", "patient's notes"),
                                           ("ｍｅｔｆｏｒｍｉｎ", "metformin"), ("cafe\u0301", "café"),
                                           ("Oz\u00adempic", "Ozempic"), ("a\u00a0b", "a b")])
def test_a_pattern_written_with_such_characters_still_matches(pattern, text):
    """Review of this change: the text a regex searches is read in the comparable form, and a pattern written with
    an em dash, a curly quote, full-width letters, a decomposed accent, a soft hyphen or a non-breaking space could
    never match it."""
    from rules.expressions import compile_expression

    assert compile_expression(f"query.text | matches('{pattern}')", ["query"]).truth({"query": {"text": text}})
    leaf = load_rule_leaf(pattern)
    assert leaf.test_value(text, leaf.literal)[0]


def load_rule_leaf(pattern: str):
    from rules.conditions import Condition, Leaf

    return Leaf(Condition.model_validate({"field": "doc.title", "op": "regex", "value": pattern}))
