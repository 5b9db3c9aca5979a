"""The rules' document table keeps columns, not documents: one pass over the corpus, the same answers as a
judgement document by document, documents read from the index's store on demand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine.index import Index, build_index
from rules.conditions import MISSING, doc_field, doc_path_problem
from rules.corpus import DocumentTable, DocumentsOnDemand, _to_float, _value_problem

DOCS = [
    {"_id": "d1", "title": "Metformin", "text": "first line therapy", "acl": "public", "date": "2020-01-01",
     "access": {"groups": ["a"]}, "n": 3},
    {"_id": "d2", "title": "Aspirin", "text": "pain", "acl": ["team-1", "team-2"], "date": "01/01/2020",
     "access": ["not", "a", "mapping"], "n": "40"},
    {"_id": "d3", "title": "Statins", "text": "lipids", "acl": {"odd": 1}, "date": None, "access": "team", "n": True},
    {"_id": "d4", "title": "Insulin", "text": "glucose", "acl": ["x", ["nested"]], "date": 1577836800,
     "access": {"groups": None, "owner": {"id": "u1"}}},
    {"_id": "d5", "title": "Warfarin", "text": "clotting", "acl": "public", "date": "2021-06-01T10:00:00Z", "n": 2.5},
]
FIELDS = ["doc.acl", "doc.date", "doc.access.groups", "doc.access.owner.id", "doc.n", "doc.title", "doc.text",
          "doc.nothing", "doc.id"]


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    root = tmp_path_factory.mktemp("corpus-memory")
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    build_index(root, root / "idx", {"bm25": {}})
    return Index.open(root / "idx")


def test_the_table_holds_no_documents_and_reads_the_corpus_once(index, monkeypatch):
    passes = []
    original = type(index.documents).iter_documents

    def counting(store):
        passes.append(1)
        return original(store)

    monkeypatch.setattr(type(index.documents), "iter_documents", counting)
    table = DocumentTable.from_index(index, FIELDS)
    for path in FIELDS:
        table.factorized(path)
        table.undecidable(path, "date")
        table.profile(path)
    assert len(passes) == 1
    assert isinstance(table.documents, DocumentsOnDemand)
    assert table.documents[3] == index.documents.get([3])[3]
    assert [d.doc_id for d in table.documents] == ["d1", "d2", "d3", "d4", "d5"]
    table.release()  # title and text go; asked for again, they are read again (one pass, that field only)
    assert "doc.text" not in table._factorized
    assert table.column("doc.text") == [d["text"] for d in DOCS]
    assert len(passes) == 3  # the iteration over documents above, and the re-read


def test_columns_judge_as_document_by_document(index):
    documents = list(index.documents.iter_documents())
    stored, kept = DocumentTable.from_index(index), DocumentTable(documents)
    for table in (stored, kept):
        for path in FIELDS:
            assert table.column(path) == [doc_field(d, path) for d in documents]
            assert table.has_field(path) == any(doc_field(d, path) not in (MISSING, None) for d in documents)
            for mode in ("path", "date", "number", "values"):
                expected = []
                for row, document in enumerate(documents):
                    problem = doc_path_problem(document, path) if path.count(".") >= 2 else None
                    if problem is None and mode != "path":
                        problem = _value_problem(doc_field(document, path), mode)
                    if problem is not None:
                        expected.append((row, f"{path} of '{document.doc_id}': {problem}"))
                rows, reasons = table.undecidable(path, mode)
                assert reasons == expected
                assert rows.tolist() == [row in dict(expected) for row in range(len(documents))]
            for dates in (True, False):
                values = [doc_field(d, path) for d in documents]
                column = table.numeric(path, dates=dates)
                if any(isinstance(v, (list, dict)) for v in values):
                    assert column is None
                else:
                    want = [math.nan if v in (MISSING, None) else _to_float(v, dates) for v in values]
                    assert column.tolist() == pytest.approx(want, nan_ok=True)
    assert stored.field_names("doc.x") == kept.field_names("doc.x") == [
        "doc.access", "doc.acl", "doc.date", "doc.n"]
    assert stored.field_names("doc.a.b") == kept.field_names("doc.a.b") == [
        "doc.access.groups", "doc.access.owner", "doc.acl.odd"]
    assert stored.field_names("doc.a.b.c") == ["doc.access.owner.id"]
    assert stored.unparsable_dates("doc.date") == (2, ["d2", "d4"])


def test_recency_reads_the_rules_table_as_it_reads_the_documents(index):
    from stages.recency import DateColumn

    own = DateColumn(index, "date")
    shared = DateColumn(index, "date", DocumentTable.from_index(index, ["doc.date"]))
    assert shared.seconds.tolist() == pytest.approx(own.seconds.tolist(), nan_ok=True)
    assert (shared.invalid, shared.invalid_ids, shared.fields, shared.dated) == (
        own.invalid, own.invalid_ids, own.fields, own.dated)
    assert shared.invalid == {1: "01/01/2020"}


def test_a_prefilter_stage_drops_the_text_columns_after_warm_up(index, tmp_path: Path):
    from engine.stage import Resources
    from stages.rules import TABLE_KEY, RulesPrefilter

    (tmp_path / "access.yaml").write_text(
        "version: 1\nkind: prefilter\nrules:\n"
        "  - {id: block, action: exclude, match: {field: doc.text, op: contains_any, value: [pain]}}\n")
    stage = RulesPrefilter("access", RulesPrefilter.Params(rules="access.yaml"))
    resources = Resources(index, tmp_path)
    stage.warm_up(resources)
    table = resources.shared(TABLE_KEY.format(index=index.path), lambda: None)
    assert "doc.text" not in table._factorized and isinstance(table.documents, DocumentsOnDemand)
