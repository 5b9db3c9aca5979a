"""Chinese pronoun resolution with jieba (segmentation + part-of-speech tags; no parser exists here).

Mentions are maximal runs of noun-tagged words (``n``, ``nr`` person, ``ns`` place, ``nt``
organisation, ``nz`` other proper noun, ``vn`` verbal noun, ``eng`` Latin-script words); the first
run of a sentence counts as its subject. The same salience model as English ranks them
(:mod:`stages.rewrite.discourse`). Rewritten:

- 它 / 它们 (things), 他 / 她 / 他们 / 她们 (people first, else any), 此 / 这个 / 那个 standing alone:
  the most salient agreeing antecedent;
- 其 ("its"): ``<antecedent>的``;
- 该 / 这个 / 那个 / 此 / 这 / 那 / 这些 / 那些 followed by a category noun ("该药", "这个病", "这些药"), or
  segmented as one word ("该病"): the description (only its characters, not what jieba glued on: "这个病能")
  becomes the most salient antecedent of that category or of none known (这些 / 那些: a plural one); a
  demonstrative before any other noun ("这个问题", "那胰岛素") refers to nothing;
- "那X呢?" / "X呢?", X a name: the previous question, as resolved, asked again with X in place of the name
  it opens with ("二甲双胍是什么药?" / "那胰岛素呢?" -> "胰岛素是什么药?");
- 它们 / 他们 / 她们 of a symmetric predicate ("它们有什么区别?") with no plural antecedent: the two most
  salient entities, "X和Y".

What a question asks for is not an entity: a noun after a question word ("什么药", "哪种药", "多少钱") is
no mention. The subject of a copula question ("二甲双胍是什么药?", "X是什么?") is the turn's topic: the
words before 是 form one mention even where jieba splits or mis-tags an unknown name (二甲/双/胍).
Coordinated nouns ("阿司匹林和布洛芬", 和 / 与 / 跟 / 及 / 以及 / 、) are also one plural mention, what
它们 / 他们 refer to. A name jieba tags as a person's is a thing when its turn gives it a category or
company/product words follow it ("特斯拉在中国卖得好吗?"). Every word list holds Simplified and Traditional
forms.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

from stages.rewrite.discourse import Antecedent, DiscourseModel, Mention, Replacement, SalienceWeights
from stages.rewrite.english import Resolution
from stages.text import HAN, quiet_jieba

NOUN_TAGS = frozenset({"n", "nr", "nrt", "nrfg", "ns", "nt", "nz", "vn", "eng", "nw", "an"})
PERSON_TAGS = frozenset({"nr", "nrt", "nrfg"})
PROPER_TAGS = frozenset({"nr", "nrt", "nrfg", "ns", "nt", "nz"})
# Every word list holds the Simplified and the Traditional form of each word (它们 / 它們), so a Traditional
# conversation resolves as a Simplified one does.
# pronoun -> (gender class, number)
ZH_PRONOUNS: dict[str, tuple[str, str]] = {
    "它": ("neuter", "singular"), "它们": ("neuter", "plural"), "它們": ("neuter", "plural"),
    "他": ("person", "singular"), "她": ("person", "singular"),
    "他们": ("any", "plural"), "她们": ("any", "plural"), "他們": ("any", "plural"), "她們": ("any", "plural"),
    "此": ("neuter", "singular"), "这个": ("neuter", "singular"), "那个": ("neuter", "singular"),
    "這個": ("neuter", "singular"), "那個": ("neuter", "singular"),
    "这些": ("neuter", "plural"), "那些": ("neuter", "plural"), "這些": ("neuter", "plural"),
}
ZH_POSSESSIVE = "其"
# determiner -> the number of the description it opens ("这些药": plural)
DETERMINER_NUMBER = {"该": "singular", "該": "singular", "这个": "singular", "這個": "singular",
                     "那个": "singular", "那個": "singular", "此": "singular", "这": "singular", "這": "singular",
                     "那": "singular", "这些": "plural", "這些": "plural", "那些": "plural"}
ZH_DETERMINERS = tuple(DETERMINER_NUMBER)
# Question words: the noun they govern is what is asked for ("什么药", "哪种病", "多少钱"), not an entity.
QUESTION_WORDS = frozenset(
    "什么 甚么 啥 哪 哪个 哪些 哪种 哪类 哪样 哪一个 哪一种 多少 几 几个 几种 何 何种 "
    "什麼 甚麼 哪個 哪種 哪類 哪樣 哪一個 哪一種 幾 幾個 幾種 何種".split()
)
COPULA = "是"
# Words that coordinate nouns into one plural group ("阿司匹林和布洛芬").
COORDINATORS = frozenset("和 与 與 跟 及 以及 、 同".split())
# Symmetric predicates: 它们 as their subject needs two things ("它们有什么区别?").
SYMMETRIC_WORDS = frozenset(
    "区别 不同 差别 差异 异同 相同 一样 相似 类似 相比 比较 对比 关系 联系 共同点 不同点 哪个好 "
    "區別 差別 差異 異同 一樣 類似 相比 比較 對比 關係 聯繫 聯系 共同點 不同點 哪個好".split()
)
SENTENCE_ENDS = "。？！?!；;"
QUESTION_MARKS = "？?"
# Tags that cannot be part of a copula question's subject: pronouns, particles, punctuation, conjunctions,
# prepositions, adverbs, auxiliaries.
NOT_IN_SUBJECT = frozenset({"r", "u", "uj", "ul", "uz", "ug", "uv", "ud", "y", "x", "c", "p", "d", "e", "o", "zg"})
# Demonstrative words that are not references to an entity ("this kind", "here", "so").
NOT_REFERRING = frozenset(
    "这种 那种 这样 那样 这么 那么 这里 那里 这儿 那儿 此外 因此 如此 这时 那时 这次 那次 "
    "這種 那種 這樣 那樣 這麼 那麼 這裡 這裏 那裡 那裏 這兒 那兒 這時 那時 這次 那次".split()
)
GENERIC_NOUNS = frozenset(
    "东西 问题 方面 情况 时候 事情 区别 类型 种类 部分 时间 方式 原因 信息 "
    "東西 問題 情況 時候 區別 類型 種類 時間 資訊".split()
)
# Category nouns -> their category. Only a demonstrative description whose head is one of these refers back
# ("这个药", "该公司"), and only to an antecedent of that category or of none known: "这个问题" is the
# conversation, "那胰岛素" a new entity.
CATEGORY_NOUNS: dict[str, str] = {
    **dict.fromkeys("药 药物 药品 药剂 药片 藥 藥物 藥品 藥劑 藥片 疫苗".split(), "drug"),
    **dict.fromkeys("病 疾病 病症 症 癌 癌症 肿瘤 腫瘤".split(), "disease"),
    **dict.fromkeys("公司 企业 企業 集团 集團 厂商 廠商 车企 車企 品牌 机构 機構 银行 銀行".split(), "company"),
    **dict.fromkeys("产品 產品 车型 車型 手机 手機 软件 軟件 汽车 汽車".split(), "product"),
    **dict.fromkeys("疗法 療法 手术 手術".split(), "treatment"),
    **dict.fromkeys("城市 国家 國家 省份".split(), "place"),
}
# What a name ends in that says its category (肺癌: a disease; 胰岛素: a drug; 腾讯控股: a company).
CATEGORY_SUFFIXES: dict[str, str] = {
    **dict.fromkeys("药 藥 素 胍 芬 肽 剂 劑 胶囊 膠囊 注射液 疫苗".split(), "drug"),
    **dict.fromkeys("病 症 癌 瘤 炎 综合征 綜合征".split(), "disease"),
    **dict.fromkeys("公司 集团 集團 银行 銀行 控股 股份".split(), "company"),
}
# A verb before a name that says its category (吃二甲双胍: a drug; 患肺癌: a disease).
CATEGORY_VERBS: dict[str, str] = {
    **dict.fromkeys("吃 服 服用 注射 开了 開了".split(), "drug"),
    **dict.fromkeys("患 患有 得了 确诊 確診".split(), "disease"),
}
# Words after a name that make it a company or a product, not a person, whatever jieba's tag (特斯拉: nrt).
THING_CONTEXT = frozenset(
    "卖 卖得 销量 销售 售价 价格 股价 市值 营收 收入 利润 净利润 产品 上市 发布 推出 生产 市场 份额 品牌 "
    "车型 副作用 剂量 疗效 竞争对手 财报 "
    "賣 賣得 銷量 銷售 售價 價格 股價 營收 利潤 淨利潤 產品 發布 發佈 生產 市場 份額 車型 劑量 療效 競爭對手 財報".split()
)
# What may follow a category noun inside one jieba word ('病能': 病 + 能): a verb, an auxiliary or an adverb
# that starts the predicate. The description is 这个病; 能 stays.
GLUED_AFTER = frozenset("能会會可是的有要在对對都也还還就不没沒该該应應需怎")
# Openers of "那X呢?" ('what about X?'): the previous question again with X in place of its counterpart.
ELLIPSIS_OPENERS = frozenset("那 那么 那麼 还有 還有 那还有 那還有".split())
ELLIPSIS_PARTICLE = "呢"
CATEGORY_HEADS = tuple(sorted(CATEGORY_NOUNS, key=len, reverse=True))  # longest first
CATEGORY_SUFFIX_ORDER = tuple(sorted(CATEGORY_SUFFIXES, key=len, reverse=True))
USER_WORD_TAG = "nz"  # a glossary term or user-dictionary word jieba does not know: a proper noun


@dataclass(frozen=True)
class _Word:
    text: str
    tag: str
    start: int  # character offset


class ChineseResolver:
    """Resolves Chinese pronouns in a question against its conversation. Thread-safe.

    ``words``: (word, tag or None) pairs the segmenter must know (the stage's glossary terms, a user dictionary);
    they go into a jieba tokenizer of the resolver's own, so the global jieba dictionary (BM25 tokenisation) is
    not changed. A word without a tag keeps jieba's noun tag; an unknown one, or one jieba takes for a person's
    name, is tagged ``nz`` (a glossary term is a term, not a person)."""

    def __init__(self, weights: SalienceWeights, words: Sequence[tuple[str, str | None]] = ()):
        jieba = quiet_jieba()
        from jieba import posseg

        tokenizer = jieba.Tokenizer()
        tokenizer.initialize()
        self._posseg = posseg.POSTokenizer(tokenizer)
        added = 0
        for word, tag in words:
            word = word.strip()
            if not HAN.search(word) or any(c.isspace() for c in word):
                continue  # Latin-script and multi-word terms: jieba cuts on spaces and letters anyway
            known = self._posseg.word_tag_tab.get(word)
            if tag is None:
                tag = known if known in NOUN_TAGS and known not in PERSON_TAGS else USER_WORD_TAG
            tokenizer.add_word(word, None, tag)  # frequency: what keeps the word whole
            added += 1
        self.added_words = added
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
        runs also as one plural group. A person-tagged run with a category (吃X, X是什么药) or company/product
        words after it in its sentence (特斯拉在中国卖得好吗) is a thing."""
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
            # a demonstrative description ('这个药') refers back; a determiner before anything else ('那胰岛素')
            # does not make it less of a new entity
            described = index > 0 and words[index - 1].text in DETERMINER_NUMBER and \
                _category_head(words[index].text) is not None
            if text not in GENERIC_NOUNS and not described and not _asked_for(words, index):
                found.append((self._mention(run, turn, "subject" if first else "other"), index, end))
            first = False
            index = end
        found = [(replace(m, person=False) if m.person and _is_thing(words, start, end) else m, start, end)
                 for m, start, end in found]
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
        kinds: dict[str, str] = {}  # entity key -> its category, where a turn said it (drug, disease, company...)
        # the last question, as resolved, and the name it opens with where a pronoun put it there: what "那X呢?"
        # asks again
        previous: tuple[str, Opening | None] | None = None
        from stages.rewrite.english import _apply

        for turn, text in enumerate([*history, question], start=1):
            replacements, mentions = self._analyse(text, turn, model, kinds, previous)
            model.mentions.extend(mentions)
            resolved = _apply(text, replacements).strip()
            previous = (resolved, _opening(text, replacements)) if resolved[-1:] in QUESTION_MARKS else None
        turn = len(history) + 1
        candidates = DiscourseModel(self.weights, [m for m in model.mentions if m.turn < turn]).candidates(turn)
        return Resolution(_apply(question, replacements), tuple(replacements), tuple(candidates), turn)

    def _analyse(self, text: str, turn: int, model: DiscourseModel, kinds: dict[str, str],
                 previous: tuple[str, Opening | None] | None) -> tuple[list[Replacement], list[Mention]]:
        words = self._words(text)
        spans = self._mentions(words, turn)
        mentions = [m for m, _, _ in spans]
        candidates = model.candidates(turn)
        for mention, start, end in spans:
            kind = _kind(words, start, end)
            if kind is not None:
                kinds[mention.key] = kind
        if not candidates:
            return [], mentions
        rebuilt = self._predicate_ellipsis(text, words, spans, previous, kinds, turn)
        if rebuilt is not None:
            replacement, repeated = rebuilt
            return [replacement], mentions + repeated
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
            end, span_end, gender, number, possessive, rule, category = found
            pool = candidates if category is None else [a for a in candidates if kinds.get(a.key) in (None, category)]
            antecedent = self._choose(pool, gender, number, named_here, described=category is not None)
            original = text[word.start : span_end]
            if antecedent is not None and number == "plural" and not antecedent.plural and symmetric \
                    and not possessive and gender != "person":
                others = [a for a in pool if a.key != antecedent.key and a.key not in named_here
                          and not a.plural and a.salience >= self.weights.min_salience]
                # the same kind first; jieba's person tag is unreliable ('布洛芬': nr), so then any
                second = next((a for a in others if a.person == antecedent.person), others[0] if others else None)
                if second is not None:
                    # in the order the conversation named them ('阿司匹林是什么?' / '布洛芬呢?': 阿司匹林和布洛芬)
                    pair = tuple(sorted((antecedent, second), key=lambda a: a.named_turn))
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

    def _predicate_ellipsis(self, text: str, words: list[_Word], spans: list[tuple[Mention, int, int]],
                            asked: tuple[str, Opening | None] | None, kinds: dict[str, str],
                            turn: int) -> tuple[Replacement, list[Mention]] | None:
        """'那X呢?' / 'X呢?' ('what about X?'), X a name and nothing else: the previous question, as resolved,
        asked again with X in place of the name it opens with ('二甲双胍是什么药?' / '那胰岛素呢?' ->
        '胰岛素是什么药?'). Only when that question is one sentence that opens with a name, and X and that name
        are not of two different known categories; else None (the question stays as asked). Returns the
        change and the mentions the rebuilt question repeats."""
        if asked is None:
            return None
        previous, opening = asked
        content = [i for i, w in enumerate(words) if w.text.strip()]
        while content and words[content[-1]].tag == "x" and words[content[-1]].text in SENTENCE_ENDS:
            content.pop()
        if len(content) < 2 or words[content[-1]].text != ELLIPSIS_PARTICLE:
            return None
        body = content[:-1]
        if len(body) > 1 and words[body[0]].text in ELLIPSIS_OPENERS:
            body = body[1:]
        if body != list(range(body[0], body[-1] + 1)):
            return None
        x = max((s for s in spans if s[1] == body[0] and s[2] == body[-1] + 1), key=lambda s: s[2] - s[1],
                default=None)
        if x is None or x[0].text in CATEGORY_NOUNS or x[0].text in ZH_PRONOUNS:
            return None
        before = self._words(previous)
        said = [i for i, w in enumerate(before) if w.text.strip()]
        if not said or any(before[i].tag == "x" and before[i].text in SENTENCE_ENDS for i in said[:-1]):
            return None  # one sentence only: which of two questions would be asked again?
        earlier = self._mentions(before, turn)
        counterpart = max((s for s in earlier if s[1] == said[0]), key=lambda s: s[2] - s[1], default=None)
        if opening is not None:  # a pronoun resolved there: its antecedent, whatever jieba makes of it now
            c_start, c_end, key = opening
            counterpart = None
        elif counterpart is not None:
            c_start, c_end = before[counterpart[1]].start, _end(before[counterpart[2] - 1])
            key = counterpart[0].key
        else:
            return None
        if key == x[0].key:
            return None
        kind_x = _kind(words, x[1], x[2])
        kind_counterpart = kinds.get(key) or (_kind(before, counterpart[1], counterpart[2]) if counterpart else None)
        if kind_x is not None and kind_counterpart is not None and kind_x != kind_counterpart:
            return None  # '二甲双胍是什么药?' / '那肺癌呢?': a disease is not asked about as a drug
        x_text = text[words[x[1]].start : _end(words[x[2] - 1])]
        rebuilt = previous[:c_start] + x_text + previous[c_end:]
        start, end = words[content[0]].start, len(text.rstrip())
        original = text[start:end]
        replacement = Replacement(
            start, end, original, rebuilt, "predicate_ellipsis",
            f"'{original}' has no predicate of its own: the previous question ('{previous}') asked again with "
            f"'{x_text}' in place of '{previous[c_start:c_end]}'",
        )
        repeated = [replace(m, role="other") for m, s, e in earlier
                    if before[s].start >= c_end or _end(before[e - 1]) <= c_start]
        return replacement, repeated

    @staticmethod
    def _reference(words: list[_Word], index: int) -> tuple[int, int, str, str, bool, str, str | None] | None:
        """(end word index, end character, gender, number, possessive?, rule, category of a description) if a
        referring expression starts here. The rule quotes the words of the question it read ('{...}'), so a trace
        without query text can redact them. A demonstrative is a reference only before a category noun ('这个药',
        not '这个问题' nor '那胰岛素'), and only the determiner and that noun are replaced, not what jieba glued on
        ('这个病能' -> 这个病)."""
        current = words[index]
        word = current.text
        following = words[index + 1] if index + 1 < len(words) else None
        if word in NOT_REFERRING:
            return None
        if word == ZH_POSSESSIVE:
            return index + 1, _end(current), "neuter", "singular", True, \
                f"'{word}' (its): the most salient antecedent + 的", None
        if word in DETERMINER_NUMBER and following is not None and following.text.strip():
            head = _category_head(following.text)
            if head is not None:
                number, category = DETERMINER_NUMBER[word], CATEGORY_NOUNS[head]
                rule = (f"demonstrative description '{word}{head}' ({number}, a {category}): the most salient "
                        f"antecedent of that category or of none known")
                return index + 2, following.start + len(head), "neuter", number, False, rule, category
            if following.tag in NOUN_TAGS:
                return None  # a determiner before a new entity or a noun that names no category
        if word in ZH_PRONOUNS:
            gender, number = ZH_PRONOUNS[word]
            return index + 1, _end(current), gender, number, False, \
                f"pronoun '{word}' ({gender}, {number}): the most salient agreeing antecedent", None
        if len(word) > 1 and word[0] in "该該此" and current.tag == "r":
            head = _category_head(word[1:])
            if head is not None:  # '该病' as one word
                category = CATEGORY_NOUNS[head]
                return index + 1, current.start + 1 + len(head), "neuter", "singular", False, \
                    (f"demonstrative description '{word[0]}{head}' (a {category}): the most salient antecedent of "
                     "that category or of none known"), category
        return None

    def _choose(self, candidates: list[Antecedent], gender: str, number: str, exclude: set[str],
                described: bool = False) -> Antecedent | None:
        from stages.rewrite.english import _choose

        if gender == "any":  # 他们: people if any are salient, else things
            people = _choose(candidates, "person", number, self.weights, exclude)
            return people if people is not None else _choose(candidates, "neuter", number, self.weights, exclude)
        chosen = _choose(candidates, gender, number, self.weights, exclude)
        if chosen is None and gender == "neuter" and not described:
            # 它: things; jieba tags many a transliterated name as a person's ('布洛芬': nr), so then anything
            chosen = _choose(candidates, "any", number, self.weights, exclude)
        return chosen


Opening = tuple[int, int, str]  # (start, end, entity key) of the name a resolved question opens with


def _opening(text: str, replacements: Sequence[Replacement]) -> Opening | None:
    """Where a pronoun opening ``text`` ('它有什么副作用?') stands, once resolved, in the resolved text (leading
    whitespace stripped), and its antecedent's key; None when the question opens otherwise."""
    first = min(replacements, key=lambda r: r.start, default=None)
    lead = len(text) - len(text.lstrip())
    if first is None or first.start != lead or first.kind != "pronoun" or first.antecedent is None \
            or first.parts:
        return None
    return 0, len(first.replacement), first.antecedent.key


def _end(word: _Word) -> int:
    return word.start + len(word.text)


def _category_head(text: str) -> str | None:
    """The category noun ``text`` is, or opens with only a predicate word glued on ('病能' -> 病); else None."""
    for noun in CATEGORY_HEADS:
        if text == noun or (text.startswith(noun) and text[len(noun)] in GLUED_AFTER):
            return noun
    return None


def _kind(words: list[_Word], start: int, end: int) -> str | None:
    """The category of the mention ``words[start:end]`` where its turn says it: the noun a copula question asks
    for ('X是什么药'), a verb before it ('吃X'), what it ends in ('肺癌', '胰岛素'), its tag (a place, an
    organisation); else None."""
    if end + 2 < len(words) and words[end].text == COPULA and words[end + 1].text in QUESTION_WORDS:
        asked = CATEGORY_NOUNS.get(words[end + 2].text)
        if asked is not None:
            return asked
    if start > 0 and words[start - 1].text in CATEGORY_VERBS:
        return CATEGORY_VERBS[words[start - 1].text]
    text = _joined(words[start:end])
    if text in CATEGORY_NOUNS:
        return CATEGORY_NOUNS[text]
    suffix = next((s for s in CATEGORY_SUFFIX_ORDER if text.endswith(s) and len(text) > len(s)), None)
    if suffix is not None:
        return CATEGORY_SUFFIXES[suffix]
    return {"ns": "place", "nt": "company"}.get(words[end - 1].tag)


def _is_thing(words: list[_Word], start: int, end: int) -> bool:
    """A mention jieba tags as a person's is a thing: it has a thing's category, or company/product words follow
    it in its sentence."""
    if _kind(words, start, end) not in (None, "place"):
        return True
    for word in words[end:]:
        if word.tag == "x" and word.text in SENTENCE_ENDS:
            return False
        if word.text in THING_CONTEXT:
            return True
    return False


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
