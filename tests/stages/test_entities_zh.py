"""Entities in Chinese and mixed Chinese/English text: real en_core_web_sm, a Chinese drug and company
gazetteer, sentences from the Chinese audit corpus. An English tokenizer makes an unspaced Chinese clause
one token (no gazetteer name matched in it) and its NER labelled whole Chinese sentences PERSON/ORG/GPE."""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

from engine.index import Index, build_index
from engine.model import Candidate, Query, ScoreEntry
from engine.pipeline import Pipeline
from engine.stage import StageContext

ROOT = Path(__file__).resolve().parents[2]
MEDICAL = ROOT / "examples" / "medical"
MEDICAL_GAZETTEER = ROOT / "configs" / "medical" / "entities.yaml"
AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)
HAN = re.compile(r"[\u3400-\u9fff]")

GAZETTEER = """\
version: 1
description: 中文药物与公司
entities:
  - {label: DRUG, id: metformin, names: [二甲双胍, 二甲雙胍, metformin, Glucophage]}
  - {label: DRUG, id: insulin, names: [胰岛素, insulin]}
  - {label: DRUG, id: aspirin, names: [阿司匹林, aspirin]}
  - {label: COMPANY, id: "600519", names: [贵州茅台, 茅台]}
  - {label: COMPANY, id: "0700", names: [腾讯控股, 腾讯, 騰訊控股, Tencent]}
  - {label: COMPANY, id: TSLA, names: [特斯拉, Tesla]}
  - {label: TICKER, id: TSLA-t, names: [TSLA], case_sensitive: true}
  - {label: TICKER, id: 0700.HK, names: ["0700"], case_sensitive: true}
"""

CORPUS = [
    ("zh-001", "二甲双胍治疗2型糖尿病", "二甲双胍（metformin）是2型糖尿病的一线治疗药物。起始剂量为每日500毫克，随餐服用。"),
    ("zh-002", "二甲双胍与肾功能", "肾功能不全患者使用二甲双胍需谨慎。当eGFR低于30 mL/min时禁用二甲双胍。"),
    ("zh-004", "胰岛素的使用", "胰岛素（insulin）用于1型糖尿病及血糖控制不佳的2型糖尿病患者。"),
    ("zh-008", "肺癌的早期筛查", "低剂量螺旋CT可用于肺癌高危人群的早期筛查。吸烟者是肺癌的高危人群。"),
    ("fin-002", "腾讯控股业绩", "腾讯控股（0700.HK，Tencent）第四季度收入同比增长11%，游戏业务表现强劲。"),
    ("fin-009", "贵州茅台分红", "贵州茅台宣布每股派发现金红利30.876元，分红率超过75%。"),
]


@pytest.fixture(scope="module")
def gazetteer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gazetteer") / "entities.yaml"
    path.write_text(GAZETTEER, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def extractor(gazetteer_file: Path):
    from stages.entities import load_extractor, load_gazetteer

    return load_extractor("en_core_web_sm", load_gazetteer(gazetteer_file), True)


@pytest.fixture(scope="module")
def chinese_index(tmp_path_factory: pytest.TempPathFactory, gazetteer_file: Path) -> Path:
    corpus = tmp_path_factory.mktemp("corpus-zh")
    with open(corpus / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for doc_id, title, text in CORPUS:
            handle.write(json.dumps({"_id": doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n")
    out = tmp_path_factory.mktemp("indexes") / "zh"
    build_index(corpus, out, {"bm25": {}, "entities": {"gazetteer": str(gazetteer_file)}})
    return out


def found(extractor, text: str) -> set[tuple[str, str]]:
    return {(m.label, m.key) for m in extractor.extract_query(text)}


# =========================================================================== extraction


@pytest.mark.parametrize(("text", "expected"), [
    ("二甲双胍对肾功能有什么影响？", {("DRUG", "metformin")}),
    ("肾功能不全患者使用二甲双胍需谨慎", {("DRUG", "metformin")}),
    ("二甲雙胍最常見的副作用是腸胃不適", {("DRUG", "metformin")}),
    ("贵州茅台分红", {("COMPANY", "600519")}),
    ("騰訊控股宣派末期股息每股4.5港元。", {("COMPANY", "0700")}),
    ("特斯拉（TSLA）交付量", {("COMPANY", "TSLA"), ("TICKER", "TSLA-t")}),
    ("腾讯（0700）收入增长", {("COMPANY", "0700"), ("TICKER", "0700.HK")}),
    ("使用metformin的患者", {("DRUG", "metformin")}),  # a Latin name between Han characters, no spaces
    ("ＴＳＬＡ交付量", {("TICKER", "TSLA-t")}),  # full-width letters are read in NFKC
])
def test_gazetteer_names_match_in_running_chinese_text(extractor, text, expected):
    assert found(extractor, text) == expected


def test_one_entity_named_in_chinese_and_english_is_one_mention(extractor):
    company, ticker = extractor.extract_query("腾讯控股（0700.HK，Tencent）收入增长")
    assert (company.label, company.key, company.text, company.count) == ("COMPANY", "0700", "腾讯控股", 2)
    assert (ticker.label, ticker.key, ticker.text) == ("TICKER", "0700.HK", "0700")  # '.HK' ends no number


@pytest.mark.parametrize("text", [
    "基金TSLAX今日上涨，特斯拉股价",  # the ticker TSLA inside a longer Latin word
    "代码10700的基金与特斯拉",  # the ticker 0700 inside a longer number
    "股价为1.0700元，特斯拉",  # ... or inside a decimal
    "glucophagex与特斯拉",  # a case-insensitive Latin name inside a longer word
])
def test_a_latin_name_does_not_match_inside_a_longer_latin_word_or_number(extractor, text):
    assert found(extractor, text) == {("COMPANY", "TSLA")}


def test_the_longest_name_wins(extractor):
    (mention,) = extractor.extract_query("贵州茅台分红")  # 茅台 is a name too, inside 贵州茅台
    assert mention.text == "贵州茅台" and mention.count == 1


def test_no_whole_sentence_entities_from_the_ner_on_chinese_text(extractor):
    """The NER labelled '二甲双胍治疗2型糖尿病 二甲双胍（metformin）是…' PERSON; it reads no Han text now."""
    texts = [f"{title} {text}" for _, title, text in CORPUS] + ["美联储（Fed）宣布维持联邦基金利率不变"]
    for text, mentions in zip(texts, extractor.extract(texts, 8)):
        assert not [m for m in mentions if m.label not in ("DRUG", "COMPANY", "TICKER")], text
    assert {(m.label, m.key, m.count) for m in extractor.extract(texts[:1], 1)[0]} == {("DRUG", "metformin", 3)}


def test_the_ner_reads_an_english_sentence_inside_chinese_text(extractor):
    text = "Metformin is safe for most elderly patients in London if renal function is monitored. 老年人使用二甲双胍需监测肾功能。"
    mentions = extractor.extract_query(text)
    assert {(m.label, m.key) for m in mentions} == {("DRUG", "metformin"), ("GPE", "london")}
    assert not [m for m in mentions if m.label == "GPE" and HAN.search(m.text)]


def test_english_text_reads_as_it_did(gazetteer_file):
    """Text without Han characters goes through the spaCy pipeline exactly as before ('spacy' for every text)."""
    from stages.entities import load_extractor, load_gazetteer

    texts = [json.loads(line)["text"] for line in (MEDICAL / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    gazetteer = load_gazetteer(MEDICAL_GAZETTEER)
    now = load_extractor("en_core_web_sm", gazetteer, True)
    before = load_extractor("en_core_web_sm", gazetteer, True, "spacy")
    assert now.extract(texts, 16) == before.extract(texts, 16)
    assert sum(len(m) for m in now.extract(texts, 16)) > 50


# =========================================================================== index component + stage


def make_pipeline(tmp_path: Path, index: Path) -> Pipeline:
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"version: 1\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
        "  - {id: entity, type: boost.entity_consistency, inputs: [bm25]}\noutput: entity\n"
        "trace: {log: null, include_query_text: true}\n",
        encoding="utf-8",
    )
    return Pipeline.from_file(config)


def run_entity_stage(tmp_path: Path, index: Path, query: str):
    pipeline = make_pipeline(tmp_path, index)
    resources = pipeline.warm_up()
    opened = Index.open(index)
    incoming = [Candidate(doc_id, opened.row_of(doc_id), (ScoreEntry("bm25", "bm25", 1.0, rank),))
                for rank, (doc_id, _, _) in enumerate(CORPUS, start=1)]
    context = StageContext("entity", Query.create(query, as_of=AS_OF), [incoming], None, resources)
    return pipeline.compiled.stages["entity"].run(context)


def test_the_index_stores_chinese_gazetteer_entities_and_no_sentence_entities(chinese_index):
    entry = Index.open(chinese_index).manifest["components"]["entities"]
    assert entry["han_text"] == "phrases"
    stored_file = chinese_index / "entities" / "entities.jsonl"
    rows = [json.loads(line) for line in stored_file.read_text(encoding="utf-8").splitlines()]
    stored = {doc_id: {(label, key) for label, key, _, _ in row} for (doc_id, _, _), row in zip(CORPUS, rows)}
    assert stored == {
        "zh-001": {("DRUG", "metformin")}, "zh-002": {("DRUG", "metformin")}, "zh-004": {("DRUG", "insulin")},
        "zh-008": set(), "fin-002": {("COMPANY", "0700"), ("TICKER", "0700.HK")}, "fin-009": {("COMPANY", "600519")},
    }


def test_a_chinese_query_matches_and_conflicts_like_an_english_one(tmp_path, chinese_index):
    result = run_entity_stage(tmp_path, chinese_index, "二甲双胍对肾功能有什么影响？")
    scores = {c.doc_id: c.score_of("entity") for c in result.candidates}
    assert scores == {"zh-001": 1.0, "zh-002": 1.0, "zh-004": -1.0, "zh-008": 0.0, "fin-002": 0.0, "fin-009": 0.0}
    assert result.details["query"] == [{"label": "DRUG", "key": "metformin", "text": "二甲双胍"}]


def test_rules_read_a_chinese_querys_entities_as_the_index_does(chinese_index):
    from stages.entities import query_entity_source

    reader = query_entity_source(Index.open(chinese_index), "rules")
    assert found(reader, "特斯拉（TSLA）交付量") == {("COMPANY", "TSLA"), ("TICKER", "TSLA-t")}


def test_an_index_built_before_reads_queries_the_old_way_and_says_to_rebuild(tmp_path, chinese_index):
    """Its stored entities came from the spaCy pipeline: the query must be read the same way, not silently
    differently, and the trace says why Chinese names go unmatched."""
    old = tmp_path / "old"
    shutil.copytree(chinese_index, old)
    manifest = json.loads((old / "manifest.json").read_text(encoding="utf-8"))
    del manifest["components"]["entities"]["han_text"]
    (old / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    result = run_entity_stage(tmp_path, old, "二甲双胍对肾功能有什么影响？")
    assert [d.code for d in result.decisions] == ["han_text_read_by_spacy", "no_query_entities"]
    assert "rebuild the index" in result.decisions[0].detail
