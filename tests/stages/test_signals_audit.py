"""The finance team's audit of entities, recency and BM25 text: decomposed Unicode in English text and the
gazetteer, one date parser for recency and the access rules, a misspelt recency field, the undated-as-newest
default, tickers that are stop words, accent folding. Real en_core_web_sm, real indexes built here."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from engine.errors import SieveIndexError
from engine.index import Index, build_index
from engine.pipeline import Pipeline
from rules.expressions import parse_date as rule_date
from stages.recency import parse_date as recency_date
from stages.text import Tokenizer, TokenizerSettings

ROOT = Path(__file__).resolve().parents[2]
MEDICAL = ROOT / "examples" / "medical"
FINANCE_GAZETTEER = ROOT / "configs" / "finance" / "entities.yaml"
AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)
NFD_NESTLE = "Nestle\u0301"  # "Nestlé" typed decomposed: e + COMBINING ACUTE ACCENT

GAZETTEER = """\
version: 1
entities:
  - {label: COMPANY, id: NESN, names: [Nestlé, Nestlé SA]}
  - {label: COMPANY, id: NESN, names: [NESN], case_sensitive: true}
  - {label: COMPANY, id: GLE, names: [Société Générale]}
  - {label: COMPANY, id: UNA, names: [Unilever]}
"""

CORPUS = [
    {"_id": "f-1", "title": f"{NFD_NESTLE} profit warning", "text": f"{NFD_NESTLE} cut its organic growth guidance.",
     "date": "2025-05-01t10:00:00z"},
    {"_id": "f-2", "title": "Nestlé dividend", "text": "Nestlé raised its dividend for the 29th year.",
     "date": "2025-05-20"},
    {"_id": "f-3", "title": "Unilever results", "text": "Unilever beat estimates on volume growth.",
     "date": "2019-01-02T00:00:00Z"},
    {"_id": "f-4", "title": "Socie\u0301te\u0301 Ge\u0301ne\u0301rale buyback", "text": "The bank starts a buyback."},
    {"_id": "f-5", "title": "IT strategic review", "text": "The bank launches an IT strategic review of its systems."},
    {"_id": "f-6", "title": "Strategic review of the bank", "text": "A strategic review: it is what it is."},
    {"_id": "f-7", "title": "ON earnings preview", "text": "ON Semiconductor reports on Monday; an earnings preview."},
]


def write_corpus(directory: Path, documents: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")
    return directory


@pytest.fixture(scope="module")
def gazetteer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gazetteer") / "entities.yaml"
    path.write_text(GAZETTEER, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finance_index(tmp_path_factory: pytest.TempPathFactory, gazetteer_file: Path) -> Path:
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "finance", CORPUS)
    out = tmp_path_factory.mktemp("indexes") / "finance"
    build_index(corpus, out, {"bm25": {}, "entities": {"gazetteer": str(gazetteer_file)}})
    return out


def make_pipeline(tmp_path: Path, index: Path, stages_yaml: str, output: str) -> Pipeline:
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"version: 1\nindex: {index}\nstages:\n{stages_yaml}\noutput: {output}\n"
                      "trace: {log: null, include_query_text: true}\n", encoding="utf-8")
    return Pipeline.from_file(config)


def record(result, stage_id: str) -> dict:
    return next(s for s in result.trace["stages"] if s["id"] == stage_id)


# =========================================================================== 1. decomposed Unicode, entities


def test_a_decomposed_name_in_english_text_is_the_gazetteers_name(finance_index):
    rows = (finance_index / "entities" / "entities.jsonl").read_text(encoding="utf-8").splitlines()
    by_id = {doc["_id"]: {(label, key): text for label, key, text, _ in json.loads(row)}
             for doc, row in zip(CORPUS, rows)}
    assert by_id["f-1"][("COMPANY", "NESN")] == "Nestlé"  # the evidence is the NFKC text: one composed é
    assert ("COMPANY", "NESN") in by_id["f-2"]
    assert ("COMPANY", "GLE") in by_id["f-4"]
    assert Index.open(finance_index).manifest["components"]["entities"]["normalization"] == "nfkc"


@pytest.mark.parametrize("query", ["Nestlé guidance or dividend", f"{NFD_NESTLE} guidance or dividend",
                                   "ＮＥＳＮ guidance or dividend"])
def test_the_query_is_read_in_nfkc_too_and_matches_both_spellings(tmp_path, finance_index, query):
    pipeline = make_pipeline(tmp_path, finance_index, """\
  - {id: bm25, type: recall.bm25, params: {top_k: 7}}
  - {id: entity, type: boost.entity_consistency, inputs: [bm25]}
""", "entity")
    result = pipeline.search(query, as_of=AS_OF)
    stage = record(result, "entity")
    assert stage["details"]["query"] == [{"label": "COMPANY", "key": "NESN", "text": query.split()[0]
                                          .replace(NFD_NESTLE, "Nestlé").replace("ＮＥＳＮ", "NESN")}]
    assert {"f-1", "f-2"} <= set(stage["details"]["documents"])
    assert not any(d["kind"] == "text_read_as_written" for d in stage.get("decisions", []))
    assert pipeline.warnings == []


def test_an_index_built_before_reads_english_text_as_written_and_says_so(tmp_path, finance_index, gazetteer_file):
    from stages.entities import index_extractor, load_gazetteer

    index = Index.open(finance_index)
    entry = dict(index.manifest["components"]["entities"])
    del entry["normalization"]  # what an index built before the setting records
    before = index_extractor(index, entry, load_gazetteer(gazetteer_file))
    now = index_extractor(index, index.manifest["components"]["entities"], load_gazetteer(gazetteer_file))
    assert before.extract_query(f"{NFD_NESTLE} guidance") == ()  # as such an index's documents were read
    assert [m.key for m in now.extract_query(f"{NFD_NESTLE} guidance")] == ["NESN"]
    assert "normalization" not in before.identity()  # a trace of such an index replays with the same identity
    assert now.identity()["normalization"] == "nfkc"
    assert before.extract_query("Nestlé guidance") == now.extract_query("Nestlé guidance")


def test_trade_mark_signs_are_not_folded_into_the_name():
    from stages.entities import load_extractor, load_gazetteer, nfkc

    assert nfkc(f"Acme™ ﬁbrosis ＴＳＬＡ {NFD_NESTLE}") == "Acme™ fibrosis TSLA Nestlé"
    extractor = load_extractor("en_core_web_sm", load_gazetteer(FINANCE_GAZETTEER), True)
    assert ("COMPANY", "ACME") in {(m.label, m.key) for m in extractor.extract_query("Acme™ results beat ＯＲＮ")}
    assert ("COMPANY", "ORN") in {(m.label, m.key) for m in extractor.extract_query("Acme™ results beat ＯＲＮ")}


def test_the_finance_gazetteer_keeps_tickers_case_sensitive():
    from stages.entities import load_extractor, load_gazetteer

    extractor = load_extractor("en_core_web_sm", load_gazetteer(FINANCE_GAZETTEER), False)
    assert extractor.extract_query("a nova, an orn and an hlx in lower case") == ()
    assert {m.key for m in extractor.extract_query("NOVA, ORN and HLX")} == {"NOVA", "ORN", "HLX"}


# =========================================================================== 2. one date parser

DATE_FORMATS = [
    "2025-05-01", "2025-05-01T10:00:00", "2025-05-01T10:00:00Z", "2025-05-01T10:00:00z", "2025-05-01t10:00:00z",
    "2025-05-01 10:00:00", "2025-05-01T10:00:00+02:00", "2025-05-01T10:00:00.123456Z", "2025-05-01T10:00Z",
    "20250501", "2025-W18-4", "  2025-05-01  ", "2025-02-30", "2025-13-01", "01/05/2025", "May 1, 2025", "",
    "2025-05-01T25:00:00", "z", "Z", "2025-05-01T10:00:00 Z", "2025-05-01T10:00:00" + "0" * 40,
]


@pytest.mark.parametrize("value", DATE_FORMATS)
def test_recency_and_the_access_rules_read_the_same_dates(value):
    ruled = rule_date(value)
    assert recency_date(value) == (ruled.timestamp() if ruled is not None else None)


def test_a_lower_case_z_is_utc_to_both_and_numbers_are_recencys_own():
    assert recency_date("2025-05-01t10:00:00z") == datetime(2025, 5, 1, 10, tzinfo=timezone.utc).timestamp()
    # documented: recency also reads Unix seconds; a rule compares dates written as text
    assert recency_date(1714521600) == 1714521600.0 and rule_date(1714521600) is None


def test_a_lower_case_z_date_is_decayed_not_ranked_as_new(tmp_path, finance_index):
    pipeline = make_pipeline(tmp_path, finance_index, """\
  - {id: bm25, type: recall.bm25, params: {top_k: 7}}
  - {id: recent, type: boost.recency, inputs: [bm25], params: {half_life_days: 30}}
""", "recent")
    documents = record(pipeline.search("Nestlé guidance", as_of=AS_OF), "recent")["details"]["documents"]
    assert documents["f-1"]["how"] == "decayed" and documents["f-1"]["date"] == "2025-05-01T10:00:00+00:00"
    assert documents["f-1"]["factor"] < 0.5


# =========================================================================== 3 and 5. the recency field at warm-up


def test_a_field_no_document_has_is_an_error_with_a_did_you_mean(tmp_path):
    index = tmp_path / "medical"
    build_index(MEDICAL, index, {"bm25": {}})
    pipeline = make_pipeline(tmp_path, index, """\
  - {id: bm25, type: recall.bm25, params: {top_k: 5}}
  - {id: recent, type: boost.recency, inputs: [bm25], params: {half_life_days: 365, field: dat}}
""", "recent")
    with pytest.raises(SieveIndexError) as caught:
        pipeline.warm_up()
    message = str(caught.value)
    assert message.startswith("stage 'recent' (boost.recency@1): params.field 'dat': no document of the index")
    assert "(did you mean 'date'?)" in message and "jurisdiction" in message


def test_a_corpus_without_metadata_is_a_warning(tmp_path, bm25_index):
    pipeline = make_pipeline(tmp_path, bm25_index, """\
  - {id: bm25, type: recall.bm25, params: {top_k: 5}}
  - {id: recent, type: boost.recency, inputs: [bm25], params: {half_life_days: 365}}
""", "recent")
    pipeline.warm_up()  # nothing to misspell (a BEIR corpus): the stage runs, constant, and says so
    assert pipeline.warnings == ["stage 'recent': the index's documents have no metadata fields (only id, title, "
                                 "text), so none has 'date': every document is undated (missing policy 'neutral') "
                                 "and the recency signal is constant"]


def test_many_undated_documents_and_undated_as_newest_are_warnings(tmp_path, finance_index):
    stages = """\
  - {id: bm25, type: recall.bm25, params: {top_k: 7}}
  - {id: recent, type: boost.recency, inputs: [bm25], params: {half_life_days: 30%s}}
"""
    neutral = make_pipeline(tmp_path, finance_index, stages % "", "recent")
    neutral.warm_up()
    warnings = "\n".join(neutral.warnings)
    assert "stage 'recent': 4 of 7 documents have no valid 'date' (4 without the field)" in warnings
    assert "gives the 4 undated documents factor 1" in warnings and "use missing: oldest" in warnings
    oldest = make_pipeline(tmp_path, finance_index, stages % ", missing: oldest", "recent")
    oldest.warm_up()
    assert len(oldest.warnings) == 1 and "4 of 7 documents" in oldest.warnings[0]


def test_values_that_are_not_dates_are_a_warning_with_examples(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", [
        {"_id": "a", "title": "one", "text": "growth", "date": "2025-05-01"},
        {"_id": "b", "title": "two", "text": "growth", "date": "2025-13-01"},
        {"_id": "c", "title": "three", "text": "growth", "date": "2024-01-01"},
    ])
    build_index(corpus, tmp_path / "index", {"bm25": {}})
    pipeline = make_pipeline(tmp_path, tmp_path / "index", """\
  - {id: bm25, type: recall.bm25, params: {top_k: 3}}
  - {id: recent, type: boost.recency, inputs: [bm25], params: {half_life_days: 30, missing: drop}}
""", "recent")
    pipeline.warm_up()
    assert pipeline.warnings == ["stage 'recent': 1 of 3 documents have a 'date' that is not a date "
                                 "(e.g. 'b': '2025-13-01'); they are undated (missing policy 'drop')"]


# =========================================================================== 4. tickers and accents in BM25


@pytest.fixture(scope="module")
def bm25_indexes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "bm25", CORPUS)
    base = tmp_path_factory.mktemp("indexes")
    built = {}
    for name, tokenizer in {"default": {}, "keep": {"keep": ["IT", "ON", "ALL"]},
                            "folded": {"fold_accents": True}}.items():
        build_index(corpus, base / name, {"bm25": {"tokenizer": tokenizer}})
        built[name] = base / name
    return built


def bm25_terms_and_ids(tmp_path: Path, index: Path, query: str) -> tuple[list[str], list[str]]:
    pipeline = make_pipeline(tmp_path, index, "  - {id: bm25, type: recall.bm25, params: {top_k: 7}}\n", "bm25")
    result = pipeline.search(query, as_of=AS_OF)
    return record(result, "bm25")["details"]["terms"], [r["doc_id"] for r in result.trace["results"]]


def test_kept_tickers_are_searched_and_recorded_in_the_index(tmp_path, bm25_indexes):
    terms, _ = bm25_terms_and_ids(tmp_path, bm25_indexes["default"], "IT strategic review")
    assert "it" not in str(terms)
    terms, found = bm25_terms_and_ids(tmp_path, bm25_indexes["keep"], "IT strategic review")
    assert "it" in str(terms) and found[0] == "f-5"
    terms, found = bm25_terms_and_ids(tmp_path, bm25_indexes["keep"], "ON earnings preview")
    assert "on" in str(terms) and found[0] == "f-7"
    recorded = json.loads((bm25_indexes["keep"] / "bm25" / "tokenizer.json").read_text(encoding="utf-8"))
    assert recorded["keep"] == ["IT", "ON", "ALL"] and recorded["fold_accents"] is False


def test_keep_is_case_sensitive_so_the_pronoun_is_still_a_stop_word():
    tokenizer = Tokenizer(TokenizerSettings(keep=("IT", "ON")))
    assert tokenizer.tokenize("IT review: it is on ON") == ["it", "review", "on"]
    assert Tokenizer(TokenizerSettings()).tokenize("IT review: it is on ON") == ["review"]
    own = Tokenizer(TokenizerSettings(stopwords=("review", "Strategic")))
    assert own.tokenize("IT strategic review of the bank") == ["it", "of", "the", "bank"]


def test_folded_accents_find_the_accented_name(tmp_path, bm25_indexes):
    _, found = bm25_terms_and_ids(tmp_path, bm25_indexes["default"], "societe generale")
    assert "f-4" not in found
    _, found = bm25_terms_and_ids(tmp_path, bm25_indexes["folded"], "societe generale")
    assert found[0] == "f-4"
    _, found = bm25_terms_and_ids(tmp_path, bm25_indexes["folded"], "Société Générale")
    assert found[0] == "f-4"


def test_an_index_built_before_these_settings_reads_as_it_was_built():
    recorded = TokenizerSettings().model_dump()
    del recorded["keep"], recorded["fold_accents"]
    assert TokenizerSettings.model_validate(recorded) == TokenizerSettings()
