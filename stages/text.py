"""Tokenisation shared by the BM25 index and queries: one settings model, applied identically.

English: lower-casing, a word regex, an English stop-word list and Snowball stemming (PyStemmer).
Chinese: jieba word segmentation (a whitespace/regex tokenizer would make a whole Chinese
sentence one token), with Latin-script words inside Chinese text handled as in English.
Stop words: the language's list, none, or the analyst's own; ``keep`` names words never dropped
as stop words, as written (``IT``, ``ON``: tickers, not the pronoun "it"). ``fold_accents`` (opt-in)
reads "Société Générale" as "societe generale".
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
import unicodedata
from functools import cache, cached_property
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

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
# the combining diacritical marks a decomposed Latin (or Greek, Cyrillic) letter carries: é = e + U+0301; other
# scripts' combining signs (Devanagari vowel signs, Hebrew points) are letters of their words and stay
ACCENTS = re.compile("[\u0300-\u036f]")
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
    # jieba keeps its prefix dictionary in gettempdir()/jieba.cache and loads that file whatever wrote it: in a
    # shared /tmp, another user's file (or one of another jieba's) changed how Chinese was cut, silently, and a
    # second user's runs each logged a traceback and left 9 MB behind. Sieve's copy is this user's, named by the
    # jieba and dictionary it was made from.
    dictionary = Path(jieba.__file__).with_name("dict.txt")
    try:
        made_from = dictionary.stat()
        stamp = hashlib.sha256(f"{made_from.st_size}:{made_from.st_mtime_ns}".encode()).hexdigest()[:12]
    except OSError:
        stamp = "unknown"
    jieba.dt.tmp_dir = str(private_cache_directory("jieba"))
    jieba.dt.cache_file = f"jieba-{getattr(jieba, '__version__', 'x')}-{stamp}.cache"
    return jieba


def private_cache_directory(name: str) -> Path:
    """A directory for ``name``'s cache that only this user can write: ``<tmp>/sieve-<uid>/<name>``, mode 0700 (in a
    sticky /tmp no one else can replace it once made). If that path is someone else's, or open to others, a fresh
    directory for this process alone, removed at exit."""
    base = Path(tempfile.gettempdir()) / f"sieve-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        found = os.lstat(base)
        if stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid() and not found.st_mode & 0o077:
            directory = base / name
            directory.mkdir(mode=0o700, exist_ok=True)
            return directory
    except OSError:
        pass
    fresh = Path(tempfile.mkdtemp(prefix=f"sieve-{name}-"))
    atexit.register(shutil.rmtree, fresh, True)
    return fresh


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
    stopwords: Literal["default", "none"] | tuple[str, ...] = Field(
        "default", description="default: the language's stop-word list; none: no stop words; a list of words: "
        "those words instead (compared after lowercase and Unicode normalisation, as the text is)",
    )
    keep: tuple[str, ...] = Field(
        (), description="words never dropped as stop words, matched as written, case included: keep: [IT, ON] "
        "keeps the tickers IT and ON (then lower-cased and stemmed as any word) but still drops 'it' and 'on'",
    )
    fold_accents: bool = Field(
        False, description="strip accents (combining diacritical marks) before tokenising ('Société Générale' -> "
        "'societe generale'), in documents and queries alike; default false: an accent makes another term",
    )
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

    @field_validator("stopwords", "keep")
    @classmethod
    def _words_only(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        for word in value if isinstance(value, tuple) else ():
            if not word.strip() or len(word.split()) != 1:
                raise ValueError(f"{word!r} is not one word: list single words (a token never holds a space)")
        return value


STEM_CACHE_WORDS = 200_000  # words whose stems a tokenizer keeps (a corpus's vocabulary, mostly), then it starts again


class Tokenizer:
    """Turns text into terms according to :class:`TokenizerSettings`; thread-safe."""

    def __init__(self, settings: TokenizerSettings):
        self.settings = settings
        self._regex = re.compile(settings.pattern)
        self._lock = threading.Lock()
        self._stems: dict[str, str] = {}  # word -> its stem (bounded: STEM_CACHE_WORDS)

    def _form(self, text: str) -> str:
        """``text`` in the settings' Unicode normal form, accents stripped when ``fold_accents`` says so."""
        form = "NFKC" if self.settings.normalization == "nfkc" else "NFC"
        if self.settings.fold_accents:
            decomposed = unicodedata.normalize("NFKD" if form == "NFKC" else "NFD", text)
            return unicodedata.normalize(form, ACCENTS.sub("", decomposed))
        # "café" typed decomposed (e + U+0301) is the same word; under NFKC, so is "ＣＯＶＩＤ－１９" (jieba cut
        # full-width letters one by one and the word pattern then dropped every piece)
        return text if unicodedata.is_normalized(form, text) else unicodedata.normalize(form, text)

    @cached_property
    def _keep(self) -> frozenset[str]:
        """The ``keep`` words as a token of the text would read before lower-casing."""
        return frozenset(self._form(word) for word in self.settings.keep)

    @cached_property
    def _stopwords(self) -> frozenset[str]:
        if self.settings.stopwords == "none":
            return frozenset()
        if isinstance(self.settings.stopwords, tuple):  # the analyst's list, read as the text is
            words = (self._form(word) for word in self.settings.stopwords)
            return frozenset(word.lower() if self.settings.lowercase else word for word in words)
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
        cache = self._stems
        lock = self._lock

        def stem(word: str) -> str:
            stemmed = cache.get(word)
            if stemmed is None:
                with lock:  # a Stemmer keeps state while it stems: one call at a time (PyStemmer's own rule)
                    stemmed = stemmer.stemWord(word)
                    if len(cache) >= STEM_CACHE_WORDS:  # every word a caller ever sent would stay for the process's
                        cache.clear()                   # life (450,000 words, 73 MB after 3,000 queries of new ones)
                    cache[word] = stemmed
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
        text = self._form(text)
        stop = self._stopwords
        stem = self._stem
        lowercase = self.settings.lowercase
        keep = self._keep
        if keep:  # a kept word is recognised as written (IT, not it), then lower-cased as any other
            words = [(w.lower() if lowercase else w, w in keep) for w in self._words(text)]
        else:
            words = [(w, False) for w in self._words(text.lower() if lowercase else text)]
        terms = []
        for word, kept in words:
            if word in stop and not kept:
                continue
            if stem is not None and not HAN.search(word):
                word = stem(word)
            terms.append(word)
        return terms

    def tokenize_many(self, texts: list[str]) -> list[list[str]]:
        return [self.tokenize(t) for t in texts]
