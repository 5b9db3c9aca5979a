"""Concurrency audit F3: a BM25 tokenizer kept the stem of every word it ever saw, for the process's life: a server's
memory grew with whatever words callers sent (450,000 words, 73 MB after 3,000 queries of new ones). Its stems are
now kept up to STEM_CACHE_WORDS. (Its one Stemmer is now called under the tokenizer's lock, as PyStemmer asks; no test
can see the difference under the GIL, which serialises the call anyway.)"""

from __future__ import annotations

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
