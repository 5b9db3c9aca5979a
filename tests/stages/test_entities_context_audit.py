"""A gazetteer entry's `context` was silently ignored in three cases (audit): a regex entry's matches, any text with a
Han character (read without the spaCy pipeline), and a name given by more than one entry (the last entry's context
won, and a gated ticker shadowed an ungated any-case name of the same id). Real spaCy (en_core_web_sm, no NER), real
indexes built with the entities component; documents at index time and queries alike, and the trace says which query
names were set aside for want of context."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from engine.index import Index, build_index
from engine.pipeline import Pipeline

AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)

GAZETTEER = """\
version: 1
entities:
  - {label: CODE, id: ICD, regex: "[A-Z]\\\\d\\\\d", case_sensitive: true, context: [diagnosis, 诊断]}
  - {label: LOT, regex: "L\\\\d{4}", case_sensitive: true, context: [batch]}
  - {label: COMPANY, id: ALL, names: [ALL], case_sensitive: true, context: [Allstate]}
  - {label: COMPANY, id: ALL, names: [ALL], case_sensitive: true, context: [NYSE, 纽交所]}
  - {label: COMPANY, id: IT, names: [IT], case_sensitive: true, context: [Gartner]}
  - {label: COMPANY, id: ACME, names: [Acme]}
  - {label: COMPANY, id: ACME, names: [ACME], case_sensitive: true, context: [NYSE]}
  - {label: COMPANY, id: AAPL, names: [苹果], context: [股价, iPhone]}
  - {label: COMPANY, id: KEY, names: [KeyCorp]}
"""

# doc_id -> (text, the (label, key) it names)
DOCUMENTS = {
    "regex-out": ("Form A12 was filed; no medical content", set()),
    "regex-in": ("Diagnosis A12 confirmed at the clinic", {("CODE", "ICD")}),
    "regex-no-id-out": ("Part L1234 shipped on time", set()),
    "regex-no-id-in": ("The batch L1234 was recalled", {("LOT", "l1234")}),
    "han-out": ("IT upgrade 公司 / ALL HANDS: IT outage notice", set()),
    "han-fruit": ("苹果富含维生素", set()),
    "han-in": ("苹果股价上涨，ALL在纽交所上市", {("COMPANY", "AAPL"), ("COMPANY", "ALL")}),
    "han-latin-context": ("高德纳Gartner称IT支出增长", {("COMPANY", "IT")}),
    "han-regex-out": ("表格A12已提交", set()),
    "han-regex-in": ("诊断A12已确认", {("CODE", "ICD")}),
    "union": ("Allstate (ALL) rose.", {("COMPANY", "ALL")}),
    "shadow": ("ACME sold robots", {("COMPANY", "ACME")}),
    "plain": ("KeyCorp results beat estimates", {("COMPANY", "KEY")}),
}


@pytest.fixture(scope="module")
def gazetteer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gazetteer") / "entities.yaml"
    path.write_text(GAZETTEER, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("corpus")
    (directory / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": doc_id, "title": "", "text": text}, ensure_ascii=False) + "\n"
                for doc_id, (text, _) in DOCUMENTS.items()), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, corpus: Path, gazetteer_file: Path) -> Path:
    out = tmp_path_factory.mktemp("indexes") / "context"
    build_index(corpus, out, {"bm25": {}, "entities": {"gazetteer": str(gazetteer_file), "ner": False,
                                                       "batch_size": 4}}, cache=False)
    return out


@pytest.fixture(scope="module")
def extractor(gazetteer_file: Path):
    from stages.entities import load_extractor, load_gazetteer

    return load_extractor("en_core_web_sm", load_gazetteer(gazetteer_file), False)


def indexed(index: Path) -> dict[str, set[tuple[str, str]]]:
    opened = Index.open(index)
    lines = (index / "entities" / "entities.jsonl").read_text(encoding="utf-8").splitlines()
    return {opened.documents.get([row])[row].doc_id: {(label, key) for label, key, *_ in json.loads(line)}
            for row, line in enumerate(lines)}


def found(extractor, text: str) -> set[tuple[str, str]]:
    return {(m.label, m.key) for m in extractor.extract_query(text)}


def test_a_regex_entry_counts_only_beside_its_context(index, extractor):
    """A12 in "Form A12 was filed" was a CODE although the entry's context is [diagnosis]: the gate read names only."""
    documents = indexed(index)
    assert documents["regex-out"] == set() and documents["regex-in"] == {("CODE", "ICD")}
    assert found(extractor, "Form A12 was filed; no medical content") == set()
    assert found(extractor, "diagnosis A12 confirmed") == {("CODE", "ICD")}  # any case: Diagnosis, diagnosis
    # a regex entry without id (its matches' key is their text) is gated too
    assert documents["regex-no-id-out"] == set() and documents["regex-no-id-in"] == {("LOT", "l1234")}


def test_text_with_a_han_character_is_gated_too(index, extractor):
    """One Han character sent the whole text down the phrase reader, which never asked for context."""
    documents = indexed(index)
    assert documents["han-out"] == set()
    assert found(extractor, "IT upgrade 公司 / ALL HANDS: IT outage notice") == set()
    assert documents["han-regex-out"] == set()  # a regex match in Han text too
    assert found(extractor, "表格A12已提交") == set()


def test_context_phrases_are_found_in_chinese_text_as_names_are(index, extractor):
    """Chinese has no spaces: a Han context phrase counts anywhere ('股价' inside '苹果股价上涨'), a Latin one beside
    Han characters ('Gartner' in '高德纳Gartner称'), as the gazetteer's names are matched there."""
    documents = indexed(index)
    assert documents["han-fruit"] == set()  # 苹果 the fruit: no 股价, no iPhone
    assert documents["han-in"] == {("COMPANY", "AAPL"), ("COMPANY", "ALL")}
    assert documents["han-latin-context"] == {("COMPANY", "IT")}
    assert documents["han-regex-in"] == {("CODE", "ICD")}
    assert found(extractor, "苹果富含维生素") == set()
    assert found(extractor, "iPhone销量带动苹果") == {("COMPANY", "AAPL")}
    assert found(extractor, "ALL在NYSEG交易") == set()  # a Latin context word is still whole: not NYSE in NYSEG


def test_entries_giving_one_name_union_their_contexts(index, extractor):
    """ALL with context [Allstate] and ALL with context [NYSE]: the last entry's context won, so
    "Allstate (ALL) rose." named no company."""
    assert indexed(index)["union"] == {("COMPANY", "ALL")}
    assert found(extractor, "Allstate (ALL) rose.") == {("COMPANY", "ALL")}
    assert found(extractor, "ALL rose on the NYSE") == {("COMPANY", "ALL")}
    assert found(extractor, "ALL HANDS meeting") == set()


def test_an_ungated_any_case_name_is_not_shadowed_by_a_gated_ticker(index, extractor):
    """{id: ACME, names: [Acme]} (any case) and {id: ACME, names: [ACME], case_sensitive, context: [NYSE]}, the shape
    configs/finance/entities.yaml uses for an issuer: "ACME sold robots" named nothing, though 'Acme' matches it."""
    assert indexed(index)["shadow"] == {("COMPANY", "ACME")}
    assert found(extractor, "ACME sold robots") == {("COMPANY", "ACME")}
    assert found(extractor, "acme sold robots") == {("COMPANY", "ACME")}


def test_documents_and_queries_are_read_alike(index):
    """Each document's entities, as stored, are those its text gets as a query, with the index's own extractor."""
    from stages.entities import query_entity_source

    opened = Index.open(index)
    reader = query_entity_source(opened, "test")
    documents = indexed(index)
    for doc_id, (text, expected) in DOCUMENTS.items():
        assert documents[doc_id] == expected == found(reader, text), doc_id


def test_the_manifest_counts_the_documents_whose_names_were_set_aside(index):
    entry = Index.open(index).manifest["components"]["entities"]
    # regex-out (CODE), regex-no-id-out (LOT), han-out (ALL, IT), han-fruit (AAPL), han-regex-out (CODE)
    assert entry["out_of_context"] == {"documents": 5, "labels": {"CODE": 2, "COMPANY": 3, "LOT": 1}}


def test_the_set_aside_counts_are_the_same_from_the_build_cache(tmp_path, corpus, gazetteer_file, index):
    """A build whose batches all come from the cache gives the same files, its manifest's count included."""
    settings = {"bm25": {}, "entities": {"gazetteer": str(gazetteer_file), "ner": False, "batch_size": 4}}
    cache = tmp_path / "cache"
    build_index(corpus, tmp_path / "one", settings, cache=cache)
    build_index(corpus, tmp_path / "two", settings, cache=cache)
    report = json.loads((tmp_path / "two" / "build.json").read_text())["build_cache"]["sections"]["entities"]
    assert report["batches_computed"] == 0 and report["items_reused"] == len(DOCUMENTS)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name != "build.json"}

    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert {k: v for k, v in files(tmp_path / "two").items() if k != "manifest.json"} == \
        {k: v for k, v in files(index).items() if k != "manifest.json"}
    assert Index.open(tmp_path / "two").manifest["components"]["entities"]["out_of_context"] == \
        Index.open(index).manifest["components"]["entities"]["out_of_context"]


def pipeline(tmp_path: Path, index: Path, trace_text: bool) -> Pipeline:
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"version: 1\nindex: {index}\nstages:\n"
        "  - {id: bm25, type: recall.bm25, params: {top_k: 20}}\n"
        "  - {id: entity, type: boost.entity_consistency, inputs: [bm25]}\n"
        f"output: entity\ntrace: {{log: null, include_query_text: {str(trace_text).lower()}}}\n",
        encoding="utf-8",
    )
    return Pipeline.from_file(config)


def entity_details(result) -> dict:
    return next(s for s in result.trace["stages"] if s["id"] == "entity")["details"]


def test_the_trace_lists_the_query_names_set_aside_for_want_of_context(tmp_path, index):
    """"Why didn't ALL count?": the stage's details name it, with the context phrases that would have made it."""
    result = pipeline(tmp_path, index, True).search("ALL HANDS: IT outage, Acme robots", as_of=AS_OF)
    details = entity_details(result)
    assert details["query"] == [{"label": "COMPANY", "key": "ACME", "text": "Acme"}]
    assert details["out_of_context"] == [
        {"label": "COMPANY", "key": "ALL", "text": "ALL", "context": ["Allstate", "NYSE", "纽交所"]},
        {"label": "COMPANY", "key": "IT", "text": "IT", "context": ["Gartner"]},
    ]
    counted = entity_details(pipeline(tmp_path, index, True).search("Allstate (ALL) rose", as_of=AS_OF))
    assert "out_of_context" not in counted  # nothing set aside: the details are as they were


def test_the_names_set_aside_are_redacted_without_query_text(tmp_path, index):
    result = pipeline(tmp_path, index, False).search("ALL HANDS: IT outage", as_of=AS_OF)
    details = entity_details(result)
    assert details["out_of_context"] == [{"label": "COMPANY"}, {"label": "COMPANY"}]
    assert "Allstate" not in json.dumps(details) and "Gartner" not in json.dumps(details)


def test_an_index_built_before_the_gate_held_everywhere_is_warned_about(tmp_path, index):
    """An index built before holds the entities the old gate let through (A12 beside no 'diagnosis', Han text
    ungated): its manifest records no out_of_context, and warm-up says to rebuild."""
    import shutil

    fresh = pipeline(tmp_path, index, True)
    fresh.warm_up()
    assert fresh.warnings == []
    before = tmp_path / "before"
    shutil.copytree(index, before)
    manifest = json.loads((before / "manifest.json").read_text(encoding="utf-8"))
    del manifest["components"]["entities"]["out_of_context"]  # what such an index records
    (before / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    old = pipeline(tmp_path, before, True)
    old.warm_up()
    (warning,) = old.warnings
    assert "before Sieve held a gazetteer entry's context to its regex matches" in warning
    assert warning.endswith("rebuild the index")


def routed_and_ruled(tmp_path: Path, index: Path, trace_text: bool) -> Pipeline:
    """A stage routed on the query's companies and an override rule reading them: both read the query's entities."""
    (tmp_path / "overrides.yaml").write_text(
        "version: 1\nkind: override\nrules:\n"
        "  - {id: companies-first, action: boost, add: 1.0,\n"
        "     when: {field: query.entity_labels, op: contains, value: COMPANY}, match: {field: doc.id, op: eq, "
        "value: union}}\n", encoding="utf-8")
    config = tmp_path / "routed.yaml"
    config.write_text(
        f"version: 1\nindex: {index}\nstages:\n"
        "  - {id: bm25, type: recall.bm25, params: {top_k: 20}}\n"
        "  - {id: entity, type: boost.entity_consistency, inputs: [bm25],\n"
        "     when: {field: query.entities.COMPANY, op: exists}}\n"
        "  - {id: overrides, type: rules.override, inputs: [entity], params: {rules: overrides.yaml}}\n"
        f"output: overrides\ntrace: {{log: null, include_query_text: {str(trace_text).lower()}}}\n",
        encoding="utf-8",
    )
    return Pipeline.from_file(config)


def stage(result, stage_id: str) -> dict:
    return next(s for s in result.trace["stages"] if s["id"] == stage_id)


def test_a_routed_stage_and_a_rule_stage_list_the_query_names_set_aside(tmp_path, index):
    """"Why was the entity stage bypassed, and why did the company rule not fire?": ALL and IT are in the query but
    count for no company without their context; the `when` record and the rule stage's details say so."""
    result = routed_and_ruled(tmp_path, index, True).search("ALL HANDS: IT outage", as_of=AS_OF)
    set_aside = [{"label": "COMPANY", "key": "ALL", "text": "ALL", "context": ["Allstate", "NYSE", "纽交所"]},
                 {"label": "COMPANY", "key": "IT", "text": "IT", "context": ["Gartner"]}]
    routed = stage(result, "entity")
    assert routed["status"] == "bypassed" and routed["when"]["holds"] is False
    assert routed["when"]["out_of_context"] == set_aside
    rules = stage(result, "overrides")["details"]
    assert rules["fired_rules"] == {} and rules["out_of_context"] == set_aside

    counted = routed_and_ruled(tmp_path, index, True).search("Allstate (ALL) rose", as_of=AS_OF)
    assert stage(counted, "entity")["when"]["holds"] is True
    assert "out_of_context" not in stage(counted, "entity")["when"]  # nothing set aside: as before
    assert "out_of_context" not in stage(counted, "overrides")["details"]

    redacted = routed_and_ruled(tmp_path, index, False).search("ALL HANDS: IT outage", as_of=AS_OF)
    assert stage(redacted, "entity")["when"]["out_of_context"] == [{"label": "COMPANY"}, {"label": "COMPANY"}]
    assert stage(redacted, "overrides")["details"]["out_of_context"] == [{"label": "COMPANY"}, {"label": "COMPANY"}]
    assert "Gartner" not in json.dumps(redacted.trace)
