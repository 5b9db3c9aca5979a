"""The one form rules compare text in, and the characters it reads alike.

Recall reads text in Unicode NFKC and splits words on anything that is not a letter or digit, so a full-width
'ｏｖｅｒｄｏｓｅ', a decomposed 'café', a non-breaking hyphen or a soft hyphen inside a word find the same documents
as their plain spellings. A rule that compared the raw text would let such a spelling slip past it (a query-side
exclusion, a document-side block list): rules compare :func:`comparable` forms on both sides instead, and the
glossary and the gazetteer read the same characters alike.
"""

from __future__ import annotations

import re
import threading
import unicodedata

# What rules compare text in (``comparable``): the characters a reader does not see as part of a word (soft
# hyphen, zero-width space and joiners, word joiner, byte-order mark, Mongolian vowel separator) removed, every
# hyphen and dash read as '-' and typographic quotes as straight ones: what NFKC leaves apart although a reader,
# and BM25's word pattern, takes them for the same text.
_UNSEEN_IN_WORDS = "\u00ad\u180e\u200b\u200c\u200d\u2060\ufeff"
# Inside a word (what the glossary and the gazetteer read): the unseen characters go and the two hyphens NFKC keeps
# (U+2010, and the non-breaking U+2011, which it makes U+2010) are '-'; en and em dashes stay, since prose puts
# them between words and spaCy reads them so.
WORD_CHARACTERS = {**dict.fromkeys(map(ord, _UNSEEN_IN_WORDS)), 0x2010: "-", 0x2011: "-"}
_DASHES = "\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"
COMPARABLE_CHARACTERS = {**WORD_CHARACTERS, **{ord(c): "-" for c in _DASHES},
                         **{ord(c): "'" for c in "\u2018\u2019\u201a\u201b\u2032"},
                         **{ord(c): '"' for c in "\u201c\u201d\u201e\u201f\u2033"}}
_COMPARABLE = re.compile("[" + "".join(re.escape(chr(code)) for code in COMPARABLE_CHARACTERS) + "]")
_WORD = re.compile("[" + "".join(re.escape(chr(code)) for code in WORD_CHARACTERS) + "]")


def comparable(text: str, *, case_sensitive: bool = False, spaces: bool = True) -> str:
    """``text`` as rules compare it: in Unicode NFKC as BM25 reads it (full-width 'ｏｖｅｒｄｏｓｅ' is 'overdose', a
    decomposed 'café' the composed one, the ligature 'ﬁ' is 'fi'), unseen characters removed, hyphens, dashes and
    quotes of every kind as their ASCII forms (``COMPARABLE_CHARACTERS``), case-folded unless ``case_sensitive``,
    and each run of white space (a line break, a non-breaking space) one space, unless ``spaces`` is false (a regex
    reads lines).
    So a spelling a user or an author can type, which recall reads as the same words, cannot slip past a rule.
    Kept across calls (``_KEPT``): rules fold every distinct value of a field again for each new operand."""
    key = (text, case_sensitive, spaces)
    found = _KEPT.get(key)
    if found is None:
        found = _comparable(text, case_sensitive, spaces)
        _keep(key, found)
    return found


def _comparable(text: str, case_sensitive: bool, spaces: bool) -> str:
    if text.isascii():
        folded = text if case_sensitive else text.lower()
    else:
        folded = unicodedata.normalize("NFKC", _replaced(text, _COMPARABLE, COMPARABLE_CHARACTERS))
        if not case_sensitive:
            folded = unicodedata.normalize("NFKC", folded.casefold())
        folded = _replaced(folded, _COMPARABLE, COMPARABLE_CHARACTERS)  # NFKC makes U+2011 U+2010, '－' '-'
    return _one_space(folded) if spaces else folded


# Texts as compared, kept across calls: a rule test whose operand comes from the query (``value_from``) is judged
# over every distinct value of its field for each new operand, and folding them again cost a quarter of a second a
# query on 5,000 abstracts. Bounded by what its entries cost, about (then it starts again): both texts and the
# entry's own ~250 bytes (counting characters alone, 2 million short texts took 448 MB before a reset).
_KEPT: dict[tuple[str, bool, bool], str] = {}
_KEPT_MAX_BYTES = 64 << 20
_KEPT_ENTRY_BYTES = 250
_kept_bytes = 0
_kept_lock = threading.Lock()


def _keep(key: tuple[str, bool, bool], folded: str) -> None:
    global _kept_bytes
    cost = len(key[0]) + len(folded) + _KEPT_ENTRY_BYTES
    with _kept_lock:  # the count and the clearing together: threads folding at once lost each other's counts
        if _kept_bytes + cost > _KEPT_MAX_BYTES:
            _KEPT.clear()
            _kept_bytes = 0
        _KEPT[key] = folded
        _kept_bytes += cost


def _replaced(text: str, found: "re.Pattern[str]", table: dict[int, str | None]) -> str:
    """``text.translate(table)``, but reading only the characters ``found`` matches: str.translate with a mapping
    looks every character up in it (1,100 SciFact abstracts: 390 ms, against 25 ms for this)."""
    return found.sub(lambda match: table[ord(match.group())] or "", text)


def _one_space(text: str) -> str:
    """Each run of white space one space, the ends kept as one space (a needle ' IT ' keeps its meaning)."""
    if "  " not in text and text.isprintable():  # no run, and no white space but ' ' (tabs, breaks, NBSP: not printable)
        return text
    inner = " ".join(text.split())
    if not inner:
        return " " if text else text
    return (" " if text[0].isspace() else "") + inner + (" " if text[-1].isspace() else "")


# An en dash (or figure dash) between two letters is a hyphen typed otherwise ("co–trimoxazole"); between words
# or numbers (a range, "1990–2000"; prose, "metformin — a drug") it stays what it is.
IN_WORD_DASH = re.compile(r"(?<=[^\W\d_])[\u2012\u2013](?=[^\W\d_])")


def unseen_or_hyphen(text: str) -> bool:
    """Whether ``text`` holds a character ``WORD_CHARACTERS`` changes (cheap: most text holds none)."""
    return not text.isascii() and (_WORD.search(text) is not None or IN_WORD_DASH.search(text) is not None)


def word_form(text: str) -> str:
    """``text`` with the characters the glossary and the gazetteer read alike made one (``WORD_CHARACTERS``,
    ``IN_WORD_DASH``); not yet in NFKC."""
    return _replaced(IN_WORD_DASH.sub("-", text), _WORD, WORD_CHARACTERS) if unseen_or_hyphen(text) else text


def comparable_pattern(pattern: str) -> str:
    """A rule's regular expression for text in the comparable form (case aside: the pattern's own flag): each of
    its non-ASCII characters, literal in any pattern, written as that form writes it (a composed accent; an em dash,
    a curly quote or a non-breaking space as '-', "'" or ' '; a soft hyphen as nothing), else it could never match."""
    if pattern.isascii():
        return pattern
    return "".join(char if char.isascii() else re.escape(comparable(char, case_sensitive=True, spaces=False))
                   for char in unicodedata.normalize("NFC", pattern))
