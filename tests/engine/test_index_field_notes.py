"""A component's `fields` setting naming a field no document has (`minhash: {fields: [txt]}` for `text`) built an
index of empty documents without a word. The build counts, as it stores the documents, which fields they give a
value, and warns before the component runs, with a did-you-mean; build.json keeps the warning. Real corpora (the
medical example, SciFact abstracts), real components."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app as cli_app
from engine.index import Index, build_index

ROOT = Path(__file__).resolve().parents[2]
MEDICAL = ROOT / "examples" / "medical"  # 33 documents with metadata: source, date, jurisdiction, ...
MINI = ROOT / "examples" / "scifact-mini"


def _build_info(index: Path) -> dict:
    return json.loads((index / "build.json").read_text(encoding="utf-8"))


def _corpus(directory: Path, records: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return directory


def _scifact(count: int) -> list[dict]:
    lines = (MINI / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][:count]


def test_a_misspelt_minhash_field_is_said_and_kept_in_build_json(tmp_path):
    notes: list[str] = []
    out = tmp_path / "index"
    build_index(MEDICAL, out, {"minhash": {"fields": ["txt"]}}, notes=notes.append)
    (note,) = notes
    assert note.startswith("warning: minhash: fields: 'txt' is in none of the 33 documents (did you mean 'text'?)")
    assert "every document is read as empty text" in note
    assert "fields the documents have: acl, audience, date, doc_type, drugs, jurisdiction, restricted, source" in note
    recorded = _build_info(out)["components"]["minhash"]
    assert recorded["absent_fields"] == ["txt"] and recorded["notes"] == [note]
    # what the warning is about: every document signed as empty text
    assert Index.open(out).manifest["components"]["minhash"]["empty_documents"] == 33


def test_one_misspelt_field_among_others_adds_nothing_and_is_said(tmp_path):
    notes: list[str] = []
    out = tmp_path / "index"
    build_index(MEDICAL, out, {"bm25": {"fields": ["title", "text", "sourc"]}}, notes=notes.append)
    (note,) = notes
    assert "bm25: fields: 'sourc' is in none of the 33 documents (did you mean 'source'?)" in note
    assert "so it adds nothing to the text read" in note
    assert _build_info(out)["components"]["bm25"]["absent_fields"] == ["sourc"]


def test_fields_the_documents_have_say_nothing(tmp_path):
    notes: list[str] = []
    out = tmp_path / "index"
    build_index(MEDICAL, out, {"bm25": {"fields": ["title", "text", "source"]}, "minhash": {}}, notes=notes.append)
    assert notes == []
    assert all("notes" not in entry and "absent_fields" not in entry
               for entry in _build_info(out)["components"].values())
    manifest = Index.open(out).manifest
    assert "absent_fields" not in json.dumps(manifest)  # the manifest is as it was


def test_a_corpus_without_titles_read_as_title_and_text_is_no_mistake(tmp_path):
    """BEIR corpora often have empty titles: the default fields (title, text) must not warn about them; a
    component reading only the title of such a corpus reads nothing, which is said."""
    corpus = _corpus(tmp_path / "corpus", [{**r, "title": ""} for r in _scifact(6)])
    notes: list[str] = []
    build_index(corpus, tmp_path / "a", {"bm25": {}, "minhash": {}}, notes=notes.append)
    assert notes == []
    build_index(corpus, tmp_path / "b", {"minhash": {"fields": ["title"]}}, notes=notes.append)
    (note,) = notes
    assert note.startswith("warning: minhash: fields: 'title' has no value in any of the 6 documents")
    assert "every document is read as empty text" in note


def test_a_field_every_document_leaves_empty_is_said_as_such(tmp_path):
    corpus = _corpus(tmp_path / "corpus", [{**r, "summary": None} for r in _scifact(4)])
    notes: list[str] = []
    build_index(corpus, tmp_path / "index", {"minhash": {"fields": ["text", "summary"]}}, notes=notes.append)
    (note,) = notes
    assert "minhash: fields: 'summary' has no value in any of the 4 documents" in note
    assert "did you mean 'summary'" not in note  # not itself


def test_the_dense_component_warns_before_it_embeds(tmp_path):
    corpus = _corpus(tmp_path / "corpus", _scifact(3))
    events: list[str] = []

    def progress(task: str, advance: int, total: int | None) -> None:
        if not events or events[-1] != task:
            events.append(task)

    out = tmp_path / "index"
    build_index(corpus, out, {"dense": {"fields": ["title", "abstract"], "max_length": 32}}, progress,
                notes=lambda note: events.append(note), cache=False)
    note = next(e for e in events if e.startswith("warning:"))
    assert note.startswith("warning: dense: fields: 'abstract' is in none of the 3 documents")
    assert events.index(note) < events.index("dense embed")  # said before hours of embedding, not after
    assert _build_info(out)["components"]["dense"]["absent_fields"] == ["abstract"]


@pytest.mark.parametrize("component", ["minhash", "entities"])
def test_the_cli_prints_the_warning(tmp_path, component):
    settings = tmp_path / "settings.yaml"
    extra = ", ner: true" if component == "entities" else ""
    settings.write_text(f"{component}: {{fields: [txt]{extra}}}\n", encoding="utf-8")
    corpus = _corpus(tmp_path / "corpus", _scifact(5))
    result = CliRunner().invoke(cli_app, ["index", str(corpus), "--out", str(tmp_path / "index"), "--with", component,
                                          "--settings", str(settings)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console may wrap the line
    assert f"warning: {component}: fields: 'txt' is in none of the 5 documents (did you mean 'text'?)" in said
    assert _build_info(tmp_path / "index")["components"][component]["absent_fields"] == ["txt"]
