"""Chinese pronoun resolution with jieba (segmentation + part-of-speech tags; no parser exists here).

Mentions are maximal runs of noun-tagged words (``n``, ``nr`` person, ``ns`` place, ``nt``
organisation, ``nz`` other proper noun, ``vn`` verbal noun, ``eng`` Latin-script words); the first
run of a sentence counts as its subject. The same salience model as English ranks them
(:mod:`stages.rewrite.discourse`). Rewritten:

- 它 / 它们 (things), 他 / 她 / 他们 / 她们 (people first, else any), 此 / 这个 / 那个 standing alone:
  the most salient agreeing antecedent;
- 其 ("its"): ``<antecedent>的``;
- 该 / 这个 / 那个 / 此 followed by a noun ("该药", "这个病"), or segmented as one word ("该病"):
  the whole description becomes the antecedent.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from stages.rewrite.discourse import Antecedent, DiscourseModel, Mention, Replacement, SalienceWeights
from stages.rewrite.english import Resolution

HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
NOUN_TAGS = frozenset({"n", "nr", "nrt", "nrfg", "ns", "nt", "nz", "vn", "eng", "nw", "an"})
PERSON_TAGS = frozenset({"nr", "nrt", "nrfg"})
PROPER_TAGS = frozenset({"nr", "nrt", "nrfg", "ns", "nt", "nz"})
# pronoun -> (gender class, number)
ZH_PRONOUNS: dict[str, tuple[str, str]] = {
    "它": ("neuter", "singular"), "它们": ("neuter", "plural"),
    "他": ("person", "singular"), "她": ("person", "singular"),
    "他们": ("any", "plural"), "她们": ("any", "plural"),
    "此": ("neuter", "singular"), "这个": ("neuter", "singular"), "那个": ("neuter", "singular"),
    "这些": ("neuter", "plural"), "那些": ("neuter", "plural"),
}
ZH_POSSESSIVE = "其"
ZH_DETERMINERS = ("该", "这个", "那个", "此", "这", "那", "这些", "那些")
# Demonstrative words that are not references to an entity ("this kind", "here", "so").
NOT_REFERRING = frozenset("这种 那种 这样 那样 这么 那么 这里 那里 这儿 那儿 此外 因此 如此 这时 那时 这次 那次".split())
GENERIC_NOUNS = frozenset("东西 问题 方面 情况 时候 事情 区别 类型 种类 部分 时间 方式 原因 信息".split())


@dataclass(frozen=True)
class _Word:
    text: str
    tag: str
    start: int  # character offset


class ChineseResolver:
    """Resolves Chinese pronouns in a question against its conversation. Thread-safe."""

    def __init__(self, weights: SalienceWeights):
        import logging

        import jieba
        import jieba.posseg

        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        self._posseg = jieba.posseg
        self.weights = weights
        self._lock = threading.Lock()

    def _words(self, text: str) -> list[_Word]:
        with self._lock:
            pairs = [(p.word, p.flag) for p in self._posseg.cut(text)]
        words, offset = [], 0
        for word, tag in pairs:
            words.append(_Word(word, tag, offset))
            offset += len(word)
        return words

    def _mentions(self, words: list[_Word], turn: int) -> list[tuple[Mention, int, int]]:
        """Noun runs as mentions, with their word index range."""
        found: list[tuple[Mention, int, int]] = []
        index = 0
        first = True
        while index < len(words):
            if words[index].tag not in NOUN_TAGS or not words[index].text.strip():
                if words[index].tag == "x" and words[index].text in "。？！?!；;":
                    first = True
                index += 1
                continue
            end = index
            while end < len(words) and words[end].tag in NOUN_TAGS and words[end].text.strip():
                end += 1
            run = words[index:end]
            text = "".join(w.text for w in run) if all(HAN.search(w.text) for w in run) else " ".join(w.text for w in run)
            preceded = index > 0 and words[index - 1].text in ZH_DETERMINERS
            if text not in GENERIC_NOUNS and not preceded:
                found.append((Mention(
                    key=text.casefold(), text=text, bare=text, head=run[-1].text, turn=turn,
                    role="subject" if first else "other", plural=False,
                    person=any(w.tag in PERSON_TAGS for w in run),
                    entity=run[-1].tag.upper() if run[-1].tag in PROPER_TAGS else None,
                    proper=any(w.tag in PROPER_TAGS for w in run),
                ), index, end))
            first = False
            index = end
        return found

    def resolve(self, question: str, history: Sequence[str]) -> Resolution:
        model = DiscourseModel(self.weights)
        replacements: list[Replacement] = []
        for turn, text in enumerate([*history, question], start=1):
            replacements, mentions = self._analyse(text, turn, model)
            model.mentions.extend(mentions)
        turn = len(history) + 1
        candidates = DiscourseModel(self.weights, [m for m in model.mentions if m.turn < turn]).candidates(turn)
        from stages.rewrite.english import _apply

        return Resolution(_apply(question, replacements), tuple(replacements), tuple(candidates), turn)

    def _analyse(self, text: str, turn: int, model: DiscourseModel) -> tuple[list[Replacement], list[Mention]]:
        words = self._words(text)
        spans = self._mentions(words, turn)
        mentions = [m for m, _, _ in spans]
        candidates = model.candidates(turn)
        if not candidates:
            return [], mentions
        named_here = {m.key for m in mentions}
        replacements: list[Replacement] = []
        index = 0
        while index < len(words):
            word = words[index]
            found = self._reference(words, index)
            if found is None:
                index += 1
                continue
            end, gender, number, possessive, rule = found
            antecedent = self._choose(candidates, gender, number, named_here)
            if antecedent is not None:
                replacement = antecedent.text + ("的" if possessive else "")
                span_end = words[end - 1].start + len(words[end - 1].text)
                original = text[word.start : span_end]
                replacements.append(Replacement(word.start, span_end, original, replacement,
                                                "possessive" if possessive else "pronoun", rule, antecedent))
                mentions.append(Mention(antecedent.key, antecedent.text, antecedent.bare, antecedent.key, turn,
                                        "other", antecedent.plural, antecedent.person, None, False, via=original))
            index = end
        return replacements, mentions

    @staticmethod
    def _reference(words: list[_Word], index: int) -> tuple[int, str, str, bool, str] | None:
        """(end word index, gender, number, possessive?, rule) if a referring expression starts here."""
        word = words[index].text
        following = words[index + 1] if index + 1 < len(words) else None
        if word in NOT_REFERRING:
            return None
        if word == ZH_POSSESSIVE:
            return index + 1, "neuter", "singular", True, "'其' (its): the most salient antecedent + 的"
        if word in ("该", "这个", "那个", "此", "这", "那") and following is not None and following.tag in NOUN_TAGS:
            rule = f"demonstrative description '{word}{following.text}': the most salient antecedent"
            return index + 2, "neuter", "singular", False, rule
        if word in ZH_PRONOUNS:
            gender, number = ZH_PRONOUNS[word]
            return index + 1, gender, number, False, f"pronoun '{word}' ({gender}, {number}): the most salient agreeing antecedent"
        if len(word) > 1 and word[0] in "该此" and words[index].tag == "r":
            return index + 1, "neuter", "singular", False, f"demonstrative description '{word}': the most salient antecedent"
        return None

    def _choose(self, candidates: list[Antecedent], gender: str, number: str, exclude: set[str]) -> Antecedent | None:
        from stages.rewrite.english import _choose

        if gender == "any":  # 他们: people if any are salient, else things
            people = _choose(candidates, "person", number, self.weights, exclude)
            return people if people is not None else _choose(candidates, "neuter", number, self.weights, exclude)
        return _choose(candidates, gender, number, self.weights, exclude)


def is_chinese(text: str) -> bool:
    """Whether ``text`` contains Han characters."""
    return HAN.search(text) is not None

