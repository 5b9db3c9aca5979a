"""The data model: immutable candidates, an append-only ledger, deterministic ordering."""

from __future__ import annotations

import re
from datetime import timezone

import pytest

from engine.errors import QueryError
from engine.model import Candidate, Query, ScoreEntry, ranked


def test_ledger_is_append_only():
    first = Candidate("d1", 0).with_score(ScoreEntry("bm25", "bm25", 3.0, 1))
    second = first.with_score(ScoreEntry("rerank", "rerank", 0.5, 2))
    assert first.ledger == (ScoreEntry("bm25", "bm25", 3.0, 1),)
    assert second.score_of("bm25") == 3.0 and second.score == 0.5
    with pytest.raises(ValueError, match="already scored"):
        second.with_score(ScoreEntry("bm25", "bm25", 9.0, 1))


def test_merge_keeps_both_branches_scores():
    a = Candidate("d1", 0, (ScoreEntry("bm25", "bm25", 3.0, 1),))
    b = Candidate("d1", 0, (ScoreEntry("dense", "dense", 0.7, 4),))
    merged = a.merged(b)
    assert merged.score_of("bm25") == 3.0 and merged.score_of("dense") == 0.7
    assert a.merged(a) is a


def test_ties_break_on_doc_id():
    items = [Candidate(d, i, (ScoreEntry("s", "s", 1.0, 1),)) for i, d in enumerate(["c", "a", "b"])]
    assert [c.doc_id for c in ranked(items)] == ["a", "b", "c"]


def test_query_validation():
    with pytest.raises(QueryError, match="query is empty"):
        Query.create("   ")
    with pytest.raises(QueryError, match="the limit is 10"):
        Query.create("x" * 11, max_chars=10)
    query = Query.create("hello")
    assert query.as_of.tzinfo is not None and query.as_of.tzinfo.utcoffset(None) == timezone.utc.utcoffset(None)
    assert query.effective_text == "hello"


@pytest.mark.parametrize("text, history, message", [
    ("\u200b\u200b \u2060", (), "query is empty"),  # only invisible format characters and spaces
    ("vitamin\x00D", (), "query contains a control character (U+0000 at position 8)"),
    ("vitamin \ud800 D", (), "query contains a lone surrogate (U+D800 at position 9)"),
    ("Is it treatable?", ("What is throat cancer?", "\x07"), "history turn 2 contains a control character (U+0007"),
])
def test_text_no_one_could_have_typed_is_refused(text, history, message):
    with pytest.raises(QueryError, match=re.escape(message)):
        Query.create(text, history=history)


def test_emoji_tabs_and_line_breaks_are_text():
    assert Query.create("🧬\tgene\nediting\r").text == "🧬\tgene\nediting\r"
