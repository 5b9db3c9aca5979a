"""Building an index without holding the corpus: the corpus is read in one streaming pass into the document store,
components read the stored documents back (``StoredDocuments``), BM25 keeps int32 term ids instead of token lists
and id lists, entities are extracted a chunk at a time. The index must not change in any way: every file is
compared byte for byte with what the previous code (kept below as the reference: a list of ``Document`` for every
component, ``bm25s.BM25.index`` on a list of id lists) writes from the same corpus.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from engine import index as index_module
from engine.errors import SieveError
from engine.index import DOCS_DB, Document, StoredDocuments, build_index, check_index_settings, read_corpus

ROOT = Path(__file__).resolve().parents[2]
MEDICAL = ROOT / "examples" / "medical"
MEDICAL_GAZETTEER = ROOT / "configs" / "medical" / "entities.yaml"


# --------------------------------------------------------------------------- the previous code, as the reference


def reference_write_documents(documents: list[Document], db_path: Path) -> None:
    """engine/index.py ``_write_documents`` before streaming (a list, 5000 rows per executemany, one commit)."""
    connection = sqlite3.connect(db_path)
    try:
        connection.execute("CREATE TABLE docs (row INTEGER PRIMARY KEY, doc_id TEXT UNIQUE NOT NULL, body TEXT NOT NULL)")
        batch = []
        for row, doc in enumerate(documents):
            body = json.dumps({"title": doc.title, "text": doc.text, "metadata": doc.metadata}, ensure_ascii=False)
            batch.append((row, doc.doc_id, body))
            if len(batch) == 5000:
                connection.executemany("INSERT INTO docs VALUES (?, ?, ?)", batch)
                batch = []
        if batch:
            connection.executemany("INSERT INTO docs VALUES (?, ?, ?)", batch)
        connection.commit()
    finally:
        connection.close()


def reference_bm25_build(documents: list[Document], out_dir: Path, settings) -> dict:
    """stages/recall/bm25.py ``BM25Component.build`` before this change: every document's tokens, then a list of id
    lists for ``bm25s.BM25.index``."""
    import bm25s

    from stages.recall.bm25 import TOKENIZER_FILE
    from stages.text import Tokenizer

    tokenizer = Tokenizer(settings.tokenizer)
    corpus_tokens = [tokenizer.tokenize(doc.content(settings.fields)) for doc in documents]
    retriever = bm25s.BM25(k1=settings.k1, b=settings.b, method=settings.method)
    words = sorted({t for tokens in corpus_tokens for t in tokens} - {""})
    vocab = {token: column for column, token in enumerate(words)}
    vocab[""] = len(vocab)
    retriever.index(([[vocab[t] for t in tokens] for tokens in corpus_tokens], vocab), show_progress=False)
    retriever.save(str(out_dir), show_progress=False)
    (out_dir / TOKENIZER_FILE).write_text(settings.tokenizer.model_dump_json(indent=2), encoding="utf-8")
    lengths = [len(t) for t in corpus_tokens]
    return {
        "library": f"bm25s {bm25s.__version__}",
        "vocab_size": len(retriever.vocab_dict),
        "avg_doc_terms": round(sum(lengths) / max(1, len(lengths)), 2),
        "empty_documents": sum(1 for n in lengths if n == 0),
    }


def reference_entities_build(documents: list[Document], out_dir: Path, settings) -> dict:
    """stages/entities.py ``EntitiesComponent.build`` before this change (all texts at once), less its timing."""
    from stages.entities import ENTITIES_FILE, GAZETTEER_COPY, TRUNCATED_FILE, load_extractor, load_gazetteer

    gazetteer = load_gazetteer(Path(settings.gazetteer).expanduser().resolve()) if settings.gazetteer else None
    extractor = load_extractor(settings.model, gazetteer, settings.ner)
    texts = [doc.content(settings.fields) for doc in documents]
    truncated = {row: len(t) for row, t in enumerate(texts) if len(t) > settings.max_chars}
    texts = [t[: settings.max_chars] for t in texts]
    mentions = extractor.extract(texts, settings.batch_size)
    labels: Counter[str] = Counter()
    with open(out_dir / ENTITIES_FILE, "w", encoding="utf-8") as handle:
        for found in mentions:
            labels.update(m.label for m in found)
            handle.write(json.dumps([[m.label, m.key, m.text, m.count] for m in found], ensure_ascii=False))
            handle.write("\n")
    if gazetteer is not None:
        (out_dir / GAZETTEER_COPY).write_text(gazetteer.text, encoding="utf-8")
    if truncated:
        (out_dir / TRUNCATED_FILE).write_text(json.dumps(
            {"max_chars": settings.max_chars, "rows": {str(row): n for row, n in truncated.items()}}), encoding="utf-8")
    return {"documents_with_entities": sum(1 for m in mentions if m), "labels": dict(sorted(labels.items())),
            "truncated_documents": len(truncated)}


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def reference_bm25_files(corpus: Path, settings: dict, tmp_path: Path) -> tuple[dict[str, bytes], dict]:
    ((_, validated),) = check_index_settings({"bm25": settings}).values()
    out = tmp_path / "reference-bm25"
    out.mkdir()
    recorded = reference_bm25_build(read_corpus(corpus), out, validated)
    return files_of(out), recorded


# --------------------------------------------------------------------------- corpora


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> Path:
    """A generated corpus: metadata of every JSON kind, repeated terms, documents that tokenise to nothing (stop words
    and punctuation only), Chinese text, integer ids, blank lines; more documents than one BM25 batch."""
    import random

    rng = random.Random(7)
    words = ["aspirin", "heart", "trial", "dose", "renal", "failure", "cancer", "tumour", "cell", "gene", "protein",
             "café", "naïve", "x-ray", "covid-19", "β-blocker", "2019", "mg/kg", "the", "and", "of", "in"]
    chinese = ["阿司匹林可以降低心脏病的风险", "癌症病人需要定期复查", "新型冠状病毒肺炎的临床试验", "肾功能衰竭与剂量"]
    records: list[dict] = []
    for n in range(2600):
        record: dict = {"_id": n if n % 5 == 0 else f"d{n}", "title": " ".join(rng.choices(words, k=rng.randint(0, 6))),
                        "text": " ".join(rng.choices(words, k=rng.randint(1, 60)))}
        if n % 7 == 0:
            record["text"] += " " + rng.choice(chinese)
        if n % 11 == 0:
            record["metadata"] = {"year": 1990 + n % 30, "score": n / 7, "tags": ["a", n, None, True],
                                  "nested": {"x": [1.5e-300, -0.0]}, "note": "überall 中文"}
        if n % 13 == 0:
            record["jurisdiction"] = rng.choice(["US", "EU", "中国"])
        if n % 97 == 0:
            record.update({"title": "", "text": "the and of in , . ;"})  # no terms at all
        records.append(record)
    path = tmp_path_factory.mktemp("mixed") / "corpus.jsonl"
    write_jsonl(path, records)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n   \n")  # blank lines are skipped
    return path


# --------------------------------------------------------------------------- byte-identical builds


def test_the_mini_corpus_builds_the_files_the_previous_code_built(mini_corpus, tmp_path):
    out = tmp_path / "idx"
    manifest = build_index(mini_corpus, out, {"bm25": {}})
    reference, recorded = reference_bm25_files(mini_corpus, {}, tmp_path)
    built = files_of(out / "bm25")
    assert built == reference
    assert {k: manifest["components"]["bm25"][k] for k in recorded} == recorded
    reference_docs = tmp_path / "reference.sqlite"
    reference_write_documents(read_corpus(mini_corpus), reference_docs)
    assert (out / DOCS_DB).read_bytes() == reference_docs.read_bytes()
    assert manifest["corpus"]["doc_count"] == len(read_corpus(mini_corpus))
    assert manifest["corpus"]["sha256"] == index_module.sha256_file(index_module.corpus_path(mini_corpus))


@pytest.mark.parametrize("settings", [
    {},
    {"method": "robertson", "k1": 0.9, "b": 0.4},
    {"method": "atire", "b": 1.0},
    {"method": "bm25l", "k1": 0.0},
    {"method": "bm25+", "b": 0.0},
    {"fields": ["title", "text", "jurisdiction"], "tokenizer": {"stemmer": "none", "stopwords": "none", "fold_accents": True}},
    {"tokenizer": {"language": "zh"}},
    {"tokenizer": {"language": "zh", "segmentation": "search"}},
], ids=["lucene", "robertson", "atire", "bm25l-k1-0", "bm25plus-b-0", "metadata-field-no-stemmer", "zh", "zh-search"])
def test_a_generated_corpus_builds_the_files_the_previous_code_built(mixed_corpus, tmp_path, settings):
    out = tmp_path / "idx"
    manifest = build_index(mixed_corpus, out, {"bm25": settings})
    reference, recorded = reference_bm25_files(mixed_corpus, settings, tmp_path)
    assert files_of(out / "bm25") == reference
    assert {k: manifest["components"]["bm25"][k] for k in recorded} == recorded
    if "stopwords" not in settings.get("tokenizer", {}):  # documents of stop words and punctuation only
        assert manifest["components"]["bm25"]["empty_documents"] > 0
    reference_docs = tmp_path / "reference.sqlite"
    reference_write_documents(read_corpus(mixed_corpus), reference_docs)
    assert (out / DOCS_DB).read_bytes() == reference_docs.read_bytes()


@pytest.mark.parametrize("method", ["lucene", "bm25l"])
def test_numpy_1_style_scoring_one_document_at_a_time_gives_the_same_files(mixed_corpus, tmp_path, monkeypatch,
                                                                            method):
    """The per-document path (taken under NumPy 1's value-based casting) scores as bm25s does, too."""
    from stages.recall import bm25 as bm25_module

    monkeypatch.setattr(bm25_module, "_array_lengths_match_scalar", lambda: False)
    monkeypatch.setattr(bm25_module, "_BATCH", 37)  # batches that split nothing in particular
    out = tmp_path / "idx"
    build_index(mixed_corpus, out, {"bm25": {"method": method}})
    assert files_of(out / "bm25") == reference_bm25_files(mixed_corpus, {"method": method}, tmp_path)[0]


def test_a_single_document_and_a_corpus_of_empty_documents(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"_id": "a", "text": "aspirin aspirin heart"}])
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"_id": "a", "text": "the of"}, {"_id": "b", "title": ", ."}])
    for corpus in (one, empty):
        out = tmp_path / f"idx-{corpus.stem}"
        build_index(corpus, out, {"bm25": {}})
        reference = tmp_path / f"reference-{corpus.stem}"
        reference.mkdir()
        assert files_of(out / "bm25") == reference_bm25_files(corpus, {}, reference)[0]


def test_the_entities_component_writes_the_files_it_wrote_with_every_text_at_once(tmp_path):
    """Extraction a batch at a time (content-defined batches, read and written as they go) gives the rows, labels and
    truncation record of one call over every text."""
    settings = {"gazetteer": str(MEDICAL_GAZETTEER), "ner": False, "batch_size": 3, "max_chars": 300}
    out = tmp_path / "idx"
    manifest = build_index(MEDICAL, out, {"entities": settings})
    ((_, validated),) = check_index_settings({"entities": settings}).values()
    reference = tmp_path / "reference"
    reference.mkdir()
    recorded = reference_entities_build(read_corpus(MEDICAL), reference, validated)
    assert files_of(out / "entities") == files_of(reference)
    assert recorded["truncated_documents"] > 0 and recorded["documents_with_entities"] > 0
    assert {k: manifest["components"]["entities"][k] for k in recorded} == recorded


def test_the_entities_component_with_ner_matches_too(tmp_path):
    """With the NER too: its batches of 4 to 8 texts cut by content give what fixed batches of 8 give."""
    pytest.importorskip("spacy")
    settings = {"gazetteer": str(MEDICAL_GAZETTEER), "batch_size": 8}
    out = tmp_path / "idx"
    build_index(MEDICAL, out, {"entities": settings})
    ((_, validated),) = check_index_settings({"entities": settings}).values()
    reference = tmp_path / "reference"
    reference.mkdir()
    reference_entities_build(read_corpus(MEDICAL), reference, validated)
    assert files_of(out / "entities") == files_of(reference)


# --------------------------------------------------------------------------- what components are given


def test_stored_documents_read_back_equal_to_the_corpus(mixed_corpus, tmp_path):
    expected = read_corpus(mixed_corpus)
    db = tmp_path / DOCS_DB
    assert index_module._write_documents(index_module.iter_corpus(mixed_corpus), db, lambda *a: None) == len(expected)
    stored = StoredDocuments(db, len(expected))
    try:
        assert len(stored) == len(expected)
        assert list(stored) == expected
        assert list(stored) == expected  # iterated again
        assert stored[0] == expected[0] and stored[-1] == expected[-1] and stored[1234] == expected[1234]
        assert stored[1000:2000] == expected[1000:2000]
        assert stored[-5:] == expected[-5:] and stored[10:3] == [] and stored[::500] == expected[::500]
        with pytest.raises(IndexError):
            stored[len(expected)]
        # a component that slices batch by batch, as the built-in ones did with a list
        batched = [doc for start in range(0, len(stored), 1000) for doc in stored[start : start + 1000]]
        assert batched == expected
    finally:
        stored.close()


def test_components_are_given_stored_documents_not_the_corpus_in_memory(mini_corpus, tmp_path, monkeypatch):
    from stages.recall.bm25 import BM25Component

    given = []
    build = BM25Component.build

    def spy(self, documents, out_dir, settings, progress):
        given.append(type(documents))
        return build(self, documents, out_dir, settings, progress)

    def never_read(path, max_errors=20):
        raise AssertionError("the whole corpus was read into a list")

    monkeypatch.setattr(BM25Component, "build", spy)
    monkeypatch.setattr(index_module, "read_corpus", never_read)
    build_index(mini_corpus, tmp_path / "idx", {"bm25": {}})
    assert given == [StoredDocuments]


def test_progress_counts_every_document_once(mixed_corpus, tmp_path):
    counted: Counter[str] = Counter()
    totals: dict[str, set] = {}

    def progress(task, advance, total):
        counted[task] += advance
        totals.setdefault(task, set()).add(total)

    build_index(mixed_corpus, tmp_path / "idx", {"bm25": {}}, progress)
    n = len(read_corpus(mixed_corpus))
    assert counted["documents"] == n and counted["bm25 tokenise"] == n
    assert totals["documents"] == {None} and totals["bm25 tokenise"] == {n}  # the stream's length is not known


# --------------------------------------------------------------------------- errors, as before


def test_errors_after_many_good_documents_are_reported_as_before(tmp_path):
    records = [{"_id": f"d{n}", "text": f"word{n}"} for n in range(6000)]
    records[5500] = {"_id": "d10", "text": "again"}
    records[5800] = {"_id": "d5801", "title": "", "text": ""}
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    with pytest.raises(SieveError) as caught:
        build_index(corpus, tmp_path / "idx", {"bm25": {}})
    assert str(caught.value) == (
        "the corpus has errors:\n"
        f"{corpus}:5501: duplicate _id 'd10' (first on line 11)\n"
        f"{corpus}:5801: the document has neither title nor text"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]  # no index, no staging, no lock


def test_a_corpus_of_blank_lines_holds_no_documents(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n  \n")
    with pytest.raises(SieveError, match=f"the corpus {corpus} holds no documents"):
        build_index(corpus, tmp_path / "idx", {"bm25": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_too_many_errors_stop_the_read_as_before(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"_id": "a", "text": "x{n}"}}\n' for n in range(30)))
    with pytest.raises(SieveError) as caught:
        read_corpus(corpus)
    lines = str(caught.value).splitlines()
    assert lines[1] == f"{corpus}:2: duplicate _id 'a' (first on line 1)"
    assert lines[-1] == "(stopped after too many errors)" and len(lines) == 1 + 20 + 1
