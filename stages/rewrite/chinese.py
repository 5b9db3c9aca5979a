"""Chinese pronoun resolution with jieba (segmentation + part-of-speech tags; no parser exists here).

Mentions are maximal runs of noun-tagged words (``n``, ``nr`` person, ``ns`` place, ``nt``
organisation, ``nz`` other proper noun, ``vn`` verbal noun, ``eng`` Latin-script words); the first
run of a sentence counts as its subject. The same salience model as English ranks them
(:mod:`stages.rewrite.discourse`). Rewritten:

- 它 / 它们 (things), 他 / 她 / 他们 / 她们 (people first, else any), 此 / 这个 / 那个 standing alone:
  the most salient agreeing antecedent;
- 其 ("its"): ``<antecedent>的``;
- 该 / 这个 / 那个 / 此 / 这 / 那 / 这些 / 那些 followed by a noun ("该药", "这个病", "这些药"), or segmented
  as one word ("该病"): the whole description becomes the antecedent (这些 / 那些: a plural one);
- 它们 / 他们 / 她们 of a symmetric predicate ("它们有什么区别?") with no plural antecedent: the two most
  salient entities, "X和Y".

What a question asks for is not an entity: a noun after a question word ("什么药", "哪种药", "多少钱") is
no mention. The subject of a copula question ("二甲双胍是什么药?", "X是什么?") is the turn's topic: the
words before 是 form one mention even where jieba splits or mis-tags an unknown name (二甲/双/胍).
Coordinated nouns ("阿司匹林和布洛芬", 和 / 与 / 跟 / 及 / 以及 / 、) are also one plural mention, what
它们 / 他们 refer to.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

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
# determiner -> the number of the description it opens ("这些药": plural)
DETERMINER_NUMBER = {"该": "singular", "这个": "singular", "那个": "singular", "此": "singular", "这": "singular",
                     "那": "singular", "这些": "plural", "那些": "plural"}
# Question words: the noun they govern is what is asked for ("什么药", "哪种病", "多少钱"), not an entity.
QUESTION_WORDS = frozenset("什么 啥 哪 哪个 哪些 哪种 哪类 哪样 哪一个 哪一种 多少 几 几个 几种 何 何种".split())
COPULA = "是"
# Words that coordinate nouns into one plural group ("阿司匹林和布洛芬").
COORDINATORS = frozenset("和 与 跟 及 以及 、 同".split())
# Symmetric predicates: 它们 as their subject needs two things ("它们有什么区别?").
SYMMETRIC_WORDS = frozenset("区别 不同 差别 差异 异同 相同 一样 相似 类似 相比 比较 对比 关系 联系 共同点 不同点 哪个好".split())
SENTENCE_ENDS = "。？！?!；;"
# Tags that cannot be part of a copula question's subject: pronouns, particles, punctuation, conjunctions,
# prepositions, adverbs, auxiliaries.
NOT_IN_SUBJECT = frozenset({"r", "u", "uj", "ul", "uz", "ug", "uv", "ud", "y", "x", "c", "p", "d", "e", "o", "zg"})
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
        """Noun runs as mentions, with their word index range; a copula question's subject as one; coordinated
        runs also as one plural group."""
        found: list[tuple[Mention, int, int]] = []
        subjects = self._copula_subjects(words)
        index = 0
        first = True
        while index < len(words):
            subject = subjects.get(index)
            if subject is not None:
                end = subject
                run = words[index:end]
                found.append((self._mention(run, turn, "subject"), index, end))
                first = False
                index = end
                continue
            if words[index].tag not in NOUN_TAGS or not words[index].text.strip():
                if words[index].tag == "x" and words[index].text in SENTENCE_ENDS:
                    first = True
                index += 1
                continue
            end = index
            while end < len(words) and words[end].tag in NOUN_TAGS and words[end].text.strip():
                end += 1
            run = words[index:end]
            text = _joined(run)
            preceded = index > 0 and words[index - 1].text in ZH_DETERMINERS
            if text not in GENERIC_NOUNS and not preceded and not _asked_for(words, index):
                found.append((self._mention(run, turn, "subject" if first else "other"), index, end))
            first = False
            index = end
        return found + self._groups(words, found, turn)

    @staticmethod
    def _mention(run: list[_Word], turn: int, role: str, plural: bool = False) -> Mention:
        text = _joined(run)
        return Mention(
            key=text.casefold(), text=text, bare=text, head=run[-1].text, turn=turn, role=role, plural=plural,
            person=any(w.tag in PERSON_TAGS for w in run),
            entity=run[-1].tag.upper() if run[-1].tag in PROPER_TAGS else None,
            proper=any(w.tag in PROPER_TAGS for w in run),
        )

    @staticmethod
    def _copula_subjects(words: list[_Word]) -> dict[int, int]:
        """{start: end} word ranges of the subjects of copula questions ('X是什么?', 'X是什么药?', 'X是哪种病?'):
        the words from the sentence's start to 是, when none of them is a pronoun, particle, conjunction,
        preposition or adverb and only a question word (and the noun it governs) follows 是."""
        subjects: dict[int, int] = {}
        start = 0
        for index, word in enumerate([*words, _Word("。", "x", -1)]):
            if not (word.tag == "x" and word.text in SENTENCE_ENDS):
                continue
            sentence = words[start:index]
            copula = next((n for n, w in enumerate(sentence) if w.text == COPULA), None)
            if copula:
                subject, rest = sentence[:copula], [w for w in sentence[copula + 1 :] if w.text.strip()]
                asks = bool(rest) and rest[0].text in QUESTION_WORDS and all(w.tag in NOUN_TAGS for w in rest[1:])
                content = all(w.tag not in NOT_IN_SUBJECT and w.text.strip() and w.text not in ZH_PRONOUNS
                              and w.text not in ZH_DETERMINERS and w.text not in QUESTION_WORDS for w in subject)
                if asks and content and subject and any(HAN.search(w.text) for w in subject):
                    subjects[start] = start + copula
            start = index + 1
        return subjects

    def _groups(self, words: list[_Word], found: list[tuple[Mention, int, int]],
                turn: int) -> list[tuple[Mention, int, int]]:
        """Runs joined by coordinators ('阿司匹林和布洛芬', 'A、B及C') as one plural mention, in its first run's role."""
        groups: list[tuple[Mention, int, int]] = []
        index = 0
        while index < len(found):
            last = index
            while last + 1 < len(found) and found[last + 1][1] == found[last][2] + 1 \
                    and words[found[last][2]].text in COORDINATORS:
                last += 1
            if last > index:
                first_mention, start, _ = found[index]
                end = found[last][2]
                mention = self._mention(words[start:end], turn, first_mention.role, plural=True)
                groups.append((replace(mention, person=all(m.person for m, _, _ in found[index : last + 1]),
                                       entity=None, proper=False), start, end))
            index = last + 1
        return groups

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
        symmetric = any(w.text in SYMMETRIC_WORDS for w in words)
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
            span_end = words[end - 1].start + len(words[end - 1].text)
            original = text[word.start : span_end]
            if antecedent is not None and number == "plural" and not antecedent.plural and symmetric \
                    and not possessive and gender != "person":
                others = [a for a in candidates if a.key != antecedent.key and a.key not in named_here
                          and not a.plural and a.salience >= self.weights.min_salience]
                # the same kind first; jieba's person tag is unreliable ('布洛芬': nr), so then any
                second = next((a for a in others if a.person == antecedent.person), others[0] if others else None)
                if second is not None:
                    pair = (antecedent, second)
                    parts = tuple(Replacement(word.start, span_end, original, a.text, "pronoun",
                                              "one of the two terms of the symmetric predicate", a) for a in pair)
                    replacements.append(Replacement(
                        word.start, span_end, original, "和".join(a.text for a in pair), "pronoun",
                        f"'{original}' of a symmetric predicate and no plural antecedent: the two most salient "
                        "entities",
                        antecedent, parts,
                    ))
                    mentions.extend(a.mention(turn, "other") for a in pair)
                    index = end
                    continue
            if antecedent is not None:
                replacement = antecedent.text + ("的" if possessive else "")
                replacements.append(Replacement(word.start, span_end, original, replacement,
                                                "possessive" if possessive else "pronoun", rule, antecedent))
                mentions.append(Mention(antecedent.key, antecedent.text, antecedent.bare, antecedent.key, turn,
                                        "other", antecedent.plural, antecedent.person, None, False, via=original))
            index = end
        return replacements, mentions

    @staticmethod
    def _reference(words: list[_Word], index: int) -> tuple[int, str, str, bool, str] | None:
        """(end word index, gender, number, possessive?, rule) if a referring expression starts here. The rule
        quotes the words of the question it read ('{...}'), so a trace without query text can redact them."""
        word = words[index].text
        following = words[index + 1] if index + 1 < len(words) else None
        if word in NOT_REFERRING:
            return None
        if word == ZH_POSSESSIVE:
            return index + 1, "neuter", "singular", True, f"'{word}' (its): the most salient antecedent + 的"
        if word in DETERMINER_NUMBER and following is not None and following.tag in NOUN_TAGS:
            number = DETERMINER_NUMBER[word]
            rule = f"demonstrative description '{word}{following.text}' ({number}): the most salient antecedent"
            return index + 2, "neuter", number, False, rule
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
        chosen = _choose(candidates, gender, number, self.weights, exclude)
        if chosen is None and gender == "neuter":
            # 它: things; jieba tags many a transliterated name as a person's ('布洛芬': nr), so then anything
            chosen = _choose(candidates, "any", number, self.weights, exclude)
        return chosen


def _joined(run: Sequence[_Word]) -> str:
    """Words as one phrase: run together in Chinese, spaced between Latin-script words."""
    return "".join(w.text for w in run) if all(HAN.search(w.text) for w in run) else " ".join(w.text for w in run)


def _asked_for(words: list[_Word], index: int) -> bool:
    """The noun at ``index`` is governed by a question word ('什么药', '哪种病', '几种药'): what is asked for."""
    if index > 0 and words[index - 1].text in QUESTION_WORDS:
        return True
    return index > 1 and words[index - 1].tag in ("q", "m") and words[index - 2].text in QUESTION_WORDS


def letter_counts(text: str) -> tuple[int, int]:
    """(Han characters, other letters) in ``text``: digits, punctuation, spaces and symbols are not counted."""
    han = len(HAN.findall(text))
    letters = sum(1 for c in text if c.isalpha()) - han
    return han, letters


def language_of(text: str) -> str | None:
    """'zh' when Han characters count for at least half of the letters, a Han character counting twice (a
    Chinese word is about two characters, an English word about five letters): 'zh' when 2 x Han >= other
    letters; 'en' when there are other letters and fewer Han characters; None for a text with no letter
    (numbers, punctuation)."""
    han, letters = letter_counts(text)
    if han and 2 * han >= letters:
        return "zh"
    return "en" if letters else None


def is_chinese(text: str) -> bool:
    """Whether ``text`` is Chinese by :func:`language_of`."""
    return language_of(text) == "zh"
