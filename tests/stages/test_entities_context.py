"""Gazetteer entries with a `context`: a ticker that is also a word (ALL, IT) counts only beside one of its context
phrases in the same text, at index time and at query time alike (the real spaCy model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigError
from stages.entities import load_extractor, load_gazetteer

GAZETTEER = """\
version: 1
entities:
  - {label: COMPANY, id: ALL, names: [Allstate]}
  - {label: COMPANY, id: ALL, names: [ALL], case_sensitive: true, context: [Allstate, NYSE, insurer]}
  - {label: COMPANY, id: IT, names: [IT], case_sensitive: true, context: [Gartner]}
  - {label: COMPANY, id: KEY, names: [KeyCorp, KEY], case_sensitive: true}
"""


@pytest.fixture(scope="module")
def extractor(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("gazetteer") / "tickers.yaml"
    path.write_text(GAZETTEER, encoding="utf-8")
    return load_extractor("en_core_web_sm", load_gazetteer(path), False)


def _found(extractor, text: str) -> set[tuple[str, str]]:
    return {(m.label, m.key) for m in extractor.extract_query(text)}


def test_a_gated_ticker_counts_only_beside_its_context(extractor):
    assert ("COMPANY", "ALL") not in _found(extractor, "ALL HANDS: IT systems outage this weekend")
    assert ("COMPANY", "IT") not in _found(extractor, "ALL HANDS: IT systems outage this weekend")
    assert ("COMPANY", "ALL") in _found(extractor, "ALL shares rose after the nyse open")  # any case, whole word
    assert ("COMPANY", "IT") in _found(extractor, "Gartner (IT) cut its outlook")
    assert ("COMPANY", "ALL") in _found(extractor, "Allstate raised its dividend")  # the name needs no context
    assert ("COMPANY", "ALL") not in _found(extractor, "ALL of the NYSEG board")  # whole words only


def test_documents_are_read_as_queries_are(extractor):
    texts = ["ALL HANDS: IT outage", "The insurer ALL beat estimates", "KEY risks for banks"]
    mentions = extractor.extract(texts, batch_size=2)
    assert [{(m.label, m.key) for m in found} for found in mentions] == [_found(extractor, t) for t in texts]
    assert ("COMPANY", "KEY") in _found(extractor, "KEY risks for banks")  # an entry without context: as before


def test_an_empty_context_phrase_is_a_gazetteer_error(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nentities:\n  - {label: COMPANY, id: ALL, names: [ALL], context: ['  ']}\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError, match="context phrases must not be empty"):
        load_gazetteer(path)
