"""The Chinese resolver (stages.rewrite.chinese) on real text with real jieba: demonstrative descriptions only
for category nouns, "那X呢?" as predicate ellipsis, names the segmenter is taught (glossary, user dictionary),
Traditional Chinese."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.model import Query
from engine.stage import Resources, StageContext
from stages.rewrite.chinese import ChineseResolver
from stages.rewrite.coreference import CoreferenceParams, CoreferenceRewrite
from stages.rewrite.discourse import SalienceWeights
from tests.stages.conftest import REWRITE_AS_OF


@pytest.fixture(scope="module")
def resolver() -> ChineseResolver:
    return ChineseResolver(SalienceWeights())


def resolved(resolver: ChineseResolver, question: str, history: list[str]) -> str:
    return resolver.resolve(question, history).rewritten


@pytest.mark.parametrize(
    ("history", "question", "expected"),
    [
        # before: '二甲双胍呢？' / '阿司匹林呢？' (a new entity after 那 was replaced by the topic)
        (["二甲双胍是什么药？"], "那胰岛素呢？", "胰岛素是什么药？"),
        (["阿司匹林有什么副作用？"], "那布洛芬呢？", "布洛芬有什么副作用？"),
        (["阿司匹林有什么副作用？"], "布洛芬呢？", "布洛芬有什么副作用？"),
        # the previous question as resolved is what is asked again
        (["二甲双胍是什么药？", "它有什么副作用？"], "那胰岛素呢？", "胰岛素有什么副作用？"),
        # a disease is not asked about as a drug: unchanged
        (["二甲双胍是什么药？"], "那肺癌呢？", "那肺癌呢？"),
        # before: '二甲双胍我之前问过吗？' (这个问题 is the conversation, not the drug)
        (["二甲双胍是什么药？"], "这个问题我之前问过吗？", "这个问题我之前问过吗？"),
        # before: '肺癌治好吗？' (jieba's '病能' replaced whole)
        (["肺癌怎么筛查？"], "这个病能治好吗？", "肺癌能治好吗？"),
        # a description of another category does not take the topic: 二甲双胍 is a drug
        (["二甲双胍是什么药？"], "这个病能治好吗？", "这个病能治好吗？"),
        # descriptions that did resolve still do
        (["二甲双胍是什么药？"], "这个药对肾脏有影响吗？", "二甲双胍对肾脏有影响吗？"),
        (["肺癌怎么筛查？"], "该病的早期症状是什么？", "肺癌的早期症状是什么？"),
        (["贵州茅台2024年的营收是多少？"], "该公司的净利润呢？", "贵州茅台的净利润呢？"),
    ],
)
def test_demonstratives_resolve_only_category_nouns(resolver, history, question, expected):
    assert resolved(resolver, question, history) == expected


def test_predicate_ellipsis_is_recorded_as_such(resolver):
    result = resolver.resolve("那胰岛素呢？", ["二甲双胍是什么药？"])
    (change,) = result.replacements
    assert change.kind == "predicate_ellipsis" and change.original == "那胰岛素呢？"
    assert "in place of '二甲双胍'" in change.heuristic


def test_a_person_tagged_company_is_a_thing(resolver):
    # before: '中国的竞争对手有哪些？' (特斯拉: nrt, so 它 skipped it)
    assert resolved(resolver, "它的竞争对手有哪些？", ["特斯拉在中国卖得好吗？"]) == "特斯拉的竞争对手有哪些？"
    # a person stays a person: 它 does not take 张三 while a thing is there
    assert resolved(resolver, "它有什么副作用？", ["张三在吃阿司匹林吗？"]) == "阿司匹林有什么副作用？"


@pytest.mark.parametrize(
    ("history", "question", "expected"),
    [
        # before: '藥有什麼副作用？' (什麼 was no question word)
        (["二甲雙胍是什麼藥？"], "它有什麼副作用？", "二甲雙胍有什麼副作用？"),
        # before: unchanged (這個 was no determiner)
        (["二甲雙胍是什麼藥？"], "這個藥對腎臟有影響嗎？", "二甲雙胍對腎臟有影響嗎？"),
        (["阿司匹林與布洛芬能一起吃嗎？"], "它們有什麼區別？", "阿司匹林與布洛芬有什麼區別？"),
        (["肺癌是什麼？"], "該病的病因是什麼？", "肺癌的病因是什麼？"),
    ],
)
def test_traditional_chinese_resolves_as_simplified(resolver, history, question, expected):
    assert resolved(resolver, question, history) == expected


def test_taught_words_are_whole_names_and_global_jieba_is_untouched():
    import jieba

    taught = ChineseResolver(SalienceWeights(), [("司美格鲁肽", None), ("二甲双胍", None)])
    assert taught.added_words == 2
    # before: '司美格鲁贵不贵？' (jieba cut 司美格鲁 / 肽)
    assert resolved(taught, "它贵不贵？", ["司美格鲁肽能减肥吗？"]) == "司美格鲁肽贵不贵？"
    # before: unchanged (二甲 / 双 / 胍: b / m / g, no noun)
    assert resolved(taught, "它有什么副作用？", ["我在吃二甲双胍。"]) == "二甲双胍有什么副作用？"
    assert "司美格鲁肽" not in jieba.lcut("司美格鲁肽能减肥吗？")  # BM25's tokeniser is not changed


def run(stage: CoreferenceRewrite, text: str, history: list[str]) -> str:
    query = Query.create(text, history=history, as_of=REWRITE_AS_OF)
    result = stage.run(StageContext("rewrite", query, [], None, Resources(None, Path.cwd()), True))
    return result.query.rewritten


def test_stage_teaches_glossary_terms_and_user_dict(tmp_path):
    (tmp_path / "glossary.yaml").write_text(
        "version: 1\nentries:\n  - {id: metformin, action: replace, terms: [格华止], canonical: 二甲双胍}\n",
        encoding="utf-8")
    (tmp_path / "words.txt").write_text("# drugs\n司美格鲁肽 nz\n特斯拉 10 nt\n", encoding="utf-8")
    stage = CoreferenceRewrite("rewrite", CoreferenceParams(language="zh", glossary="glossary.yaml",
                                                            user_dict="words.txt"))
    stage.warm_up(Resources(None, tmp_path))
    assert run(stage, "它有什么副作用？", ["我在吃二甲双胍。"]) == "二甲双胍有什么副作用？"
    assert run(stage, "它贵不贵？", ["司美格鲁肽能减肥吗？"]) == "司美格鲁肽贵不贵？"
    identity = stage.identity()
    assert identity["user_dict"]["words"] == 2 and len(identity["user_dict"]["sha256"]) == 64


def test_bad_user_dict_line_is_located(tmp_path):
    (tmp_path / "words.txt").write_text("司美格鲁肽\n特斯拉 nt extra\n", encoding="utf-8")
    stage = CoreferenceRewrite("rewrite", CoreferenceParams(language="zh", user_dict="words.txt"))
    with pytest.raises(ConfigError, match=r"words.txt:2"):
        stage.warm_up(Resources(None, tmp_path))
