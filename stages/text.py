"""Tokenisation shared by the BM25 index and queries: one settings model, applied identically.

English: lower-casing, a word regex, an English stop-word list and Snowball stemming (PyStemmer).
Chinese: jieba word segmentation (a whitespace/regex tokenizer would make a whole Chinese
sentence one token), with Latin-script words inside Chinese text handled as in English.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from functools import cache, cached_property
from typing import Literal

from pydantic import ConfigDict, Field

from engine.errors import MissingDependencyError
from engine.strictness import NoCoercion

# A compact Chinese function-word list (particles, pronouns, conjunctions): enough to keep
# BM25 from rewarding "的" and "是"; analysts with a domain list can disable it.
CHINESE_STOPWORDS = frozenset(
    "的 了 和 是 在 也 有 就 不 都 而 及 与 着 或 一个 没有 我们 你们 他们 她们 它们 这 那 这个 那个 "
    "之 被 把 让 给 从 对 向 为 以 于 其 此 该 吗 呢 吧 啊 呀 么 什么 怎么 如何 哪 哪些 还 又 很 更 最".split()
)
HAN_RANGES = "\u3400-\u9fff\uf900-\ufaff"  # CJK unified ideographs (with extension A) and compatibility ideographs
HAN = re.compile(f"[{HAN_RANGES}]")
# a Han character (Chinese has no spaces: each is a word of its own), or a run of other word characters
HAN_OR_WORD = re.compile(f"[{HAN_RANGES}]|[^\\W{HAN_RANGES}]+")


@cache
def quiet_jieba():  # type: ignore[no-untyped-def]
    """The jieba module, its dictionary-loading chatter on stderr turned off (once per process)."""
    try:
        import jieba
    except ImportError:
        raise MissingDependencyError("jieba", "jieba", "Chinese tokenisation") from None
    import logging

    jieba.setLogLevel(logging.WARNING)
    return jieba


class TokenizerSettings(NoCoercion):
    """How text becomes index terms. Recorded in the index manifest; queries reuse it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    language: Literal["en", "zh"] = Field(
        "en", description="zh: Han text is segmented into words with jieba and Chinese stop words are added; "
        "other text is read by pattern either way (sieve index --language zh sets it)",
    )
    lowercase: bool = Field(True, description="fold case before matching")
    stemmer: Literal["english", "none"] = Field(
        "english", description="english: Snowball stems (PyStemmer), so 'trials' matches 'trial'; none: words as written"
    )
    stopwords: Literal["default", "none"] = Field("default", description="the language's stop-word list, or none")
    pattern: str = Field(r"(?u)\b\w\w+\b", description="regex of a token (for non-Chinese text)")
    segmentation: Literal["search", "precise"] = Field(
        "search",
        description="Chinese word segmentation (jieba): search also emits the words inside a compound ('癌症病人' "
        "-> 癌症, 病人, 癌症病人), so a query for 癌症 finds it; precise gives the compound alone. An index "
        "built before this setting existed reads as precise",
    )
    normalization: Literal["nfkc", "nfc"] = Field(
        "nfkc",
        description="Unicode normal form applied before tokenising: nfkc also folds compatibility forms "
        "(full-width 'ＨＩＶ' -> 'HIV', the ligature 'ﬁ' -> 'fi', '５０' -> '50', superscripts); nfc only composes "
        "accents. An index built before this setting existed reads as nfc",
    )


class Tokenizer:
    """Turns text into terms according to :class:`TokenizerSettings`; thread-safe."""

    def __init__(self, settings: TokenizerSettings):
        self.settings = settings
        self._regex = re.compile(settings.pattern)
        self._lock = threading.Lock()

    @cached_property
    def _stopwords(self) -> frozenset[str]:
        if self.settings.stopwords == "none":
            return frozenset()
        from bm25s.stopwords import STOPWORDS_EN

        english = frozenset(STOPWORDS_EN)
        return english | CHINESE_STOPWORDS if self.settings.language == "zh" else english

    @cached_property
    def _stem(self):  # type: ignore[no-untyped-def]
        if self.settings.stemmer == "none":
            return None
        try:
            import Stemmer
        except ImportError:
            raise MissingDependencyError("Stemmer", "PyStemmer", "English stemming") from None
        stemmer = Stemmer.Stemmer("english")
        cache: dict[str, str] = {}

        def stem(word: str) -> str:
            stemmed = cache.get(word)
            if stemmed is None:
                stemmed = cache[word] = stemmer.stemWord(word)
            return stemmed

        return stem

    @cached_property
    def _jieba(self):  # type: ignore[no-untyped-def]
        jieba = quiet_jieba()
        jieba.initialize()
        return jieba

    def _words(self, text: str) -> list[str]:
        if self.settings.language == "zh" and HAN.search(text):
            words = []
            cut = self._jieba.lcut_for_search if self.settings.segmentation == "search" else self._jieba.lcut
            for piece in cut(text):
                piece = piece.strip()
                if not piece:
                    continue
                if HAN.search(piece):
                    words.append(piece)
                else:
                    words.extend(self._regex.findall(piece))
            return words
        return self._regex.findall(text)

    def tokenize(self, text: str) -> list[str]:
        # "café" typed decomposed (e + U+0301) is the same word; under NFKC, so is "ＣＯＶＩＤ－１９" (jieba cut
        # full-width letters one by one and the word pattern then dropped every piece)
        form = "NFKC" if self.settings.normalization == "nfkc" else "NFC"
        if not unicodedata.is_normalized(form, text):
            text = unicodedata.normalize(form, text)
        if self.settings.lowercase:
            text = text.lower()
        stop = self._stopwords
        stem = self._stem
        terms = []
        for word in self._words(text):
            if word in stop:
                continue
            if stem is not None and not HAN.search(word):
                word = stem(word)
            terms.append(word)
        return terms

    def tokenize_many(self, texts: list[str]) -> list[list[str]]:
        return [self.tokenize(t) for t in texts]
