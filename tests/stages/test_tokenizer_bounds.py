"""Concurrency audit F3: a BM25 tokenizer kept the stem of every word it ever saw, for the process's life: a server's
memory grew with whatever words callers sent (450,000 words, 73 MB after 3,000 queries of new ones). Its stems are
now kept up to STEM_CACHE_WORDS, and its one Stemmer is called by one thread at a time."""

from __future__ import annotations

import threading

import stages.text
from stages.text import Tokenizer, TokenizerSettings


def test_the_stem_cache_is_bounded_and_stems_stay_right(monkeypatch):
    monkeypatch.setattr(stages.text, "STEM_CACHE_WORDS", 1000)
    tokenizer = Tokenizer(TokenizerSettings())
    words = [f"zq{n}running" for n in range(5000)]
    for start in range(0, len(words), 100):
        tokenizer.tokenize(" ".join(words[start:start + 100]))
        assert len(tokenizer._stems) <= 1000
    assert tokenizer.tokenize("running cells") == tokenizer.tokenize("runs cell")  # stems as before


def test_threads_stemming_at_once_get_the_stems_one_thread_gets():
    tokenizer = Tokenizer(TokenizerSettings())
    texts = [" ".join(f"w{n}{suffix}" for suffix in ("ing", "ed", "ies", "ation")) for n in range(400)]
    alone = [Tokenizer(TokenizerSettings()).tokenize(text) for text in texts]
    found: dict[int, list[str]] = {}

    def work(part: int) -> None:
        for position in range(part, len(texts), 8):
            found[position] = tokenizer.tokenize(texts[position])

    threads = [threading.Thread(target=work, args=(part,)) for part in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [found[position] for position in range(len(texts))] == alone
