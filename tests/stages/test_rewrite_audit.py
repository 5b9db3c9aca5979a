"""Findings of the conversational-rewrite audit, each pinned with the real spaCy pipeline and jieba.

1. without query text in the trace, no word of the question or history reaches it (rule descriptions quoted it);
2. Chinese: a noun a question word governs ("什么药") is no antecedent; a copula question's subject is the topic;
3. Chinese: 这些 / 那些 + noun are descriptions; 它们 means a coordinated pair, or the two entities of a
   symmetric predicate;
4. a Chinese glossary term matches on jieba word boundaries only (药 is not replaced inside 药物 or 药房);
5. mixed languages: the question's language by its letters, and a resolver reads only turns of its own language;
6. glossary case: a term written in capitals matches only as written; `case_sensitive` per file and per entry;
7. the glossary index is built at warm-up, applying it costs what the text costs, the file is parsed once;
8. replacements that another entry would rewrite (no chains) or that are pronouns are located warnings;
9. the trace says what the character offsets of replacements and glossary hits count in.

Each test says what happened before the fix ("before:").
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from engine.compiler import compile_file
from engine.errors import ConfigError
from engine.pipeline import Pipeline
from stages.rewrite.coreference import CoreferenceRewrite
from stages.rewrite.glossary import load_glossary
from tests.stages.conftest import REWRITE_AS_OF as AS_OF
from tests.stages.conftest import rewrite_stage, run_rewrite

ROOT = Path(__file__).resolve().parents[2]
# ids name the analyst's rules and stay in the trace; these do not spell any word of the questions below
GLOSSARY = """\
version: 1
entries:
  - {id: g-001, action: replace, terms: [Glucophage, Fortamet], canonical: metformin}
  - {id: g-002, terms: [癌症, 恶性肿瘤]}
  - {id: g-003, action: replace, terms: [药], canonical: 药物}
  - {id: g-004, action: replace, terms: [MS], canonical: multiple sclerosis}
  - {id: g-005, terms: [US, United States]}
  - {id: g-006, terms: [St. John's wort, hypericum]}
  - {id: g-007, terms: [C++, cplusplus]}
  - {id: g-008, terms: [.NET, dotnet]}
  - {id: g-009, terms: [type 2 diabetes, T2DM]}
  - {id: g-010, terms: [HbA1c, glycated haemoglobin]}
"""


@pytest.fixture(scope="module")
def glossary_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's glossary, written here (tests that read only the file need not wait for the stage fixture)."""
    directory = tmp_path_factory.mktemp("rewrite-audit")
    (directory / "glossary.yaml").write_text(GLOSSARY, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def stage(glossary_dir: Path) -> CoreferenceRewrite:
    """The stage with spaCy and jieba loaded once for the module, and the module's glossary."""
    return rewrite_stage(glossary_dir, GLOSSARY)


rewrite = run_rewrite


def rewritten(stage: CoreferenceRewrite, text: str, history: list[str]) -> str:
    return rewrite(stage, text, history).query.rewritten


# --------------------------------------------------------------------------- 1. no text in a redacted trace

STOP_WORDS = frozenset(
    "a an the of to in on at by for from with about and or is are was be do does did can how what which who when "
    "where why it its they them their this that these those he she his her one ones me tell".split()
)
ZH_STOP_WORDS = frozenset("的 是 什么 有 吗 哪些 呢 和 可以 它 它们 其 该 这些 这 那 个".split())


def conversation_words(texts: list[str]) -> set[str]:
    """Every word of the texts bar stop words: Latin words of two letters or more, and jieba's words of the
    Chinese."""
    import jieba

    words = {w.lower() for t in texts for w in re.findall(r"[A-Za-z]{2,}", t)} - STOP_WORDS
    han = {w for t in texts for w in jieba.lcut(t) if re.fullmatch(r"[\u4e00-\u9fff]+", w)} - ZH_STOP_WORDS
    return words | han


def leaked(blob: str, words: set[str]) -> set[str]:
    lowered = blob.lower()
    return {w for w in words
            if (re.search(rf"(?<![a-z]){re.escape(w)}(?![a-z])", lowered) if w.isascii() else w in blob)}


# (history, question, a kind of change that must fire): every heuristic family of both resolvers
FAMILIES = [
    (["What is throat cancer?"], "Is it treatable?", "pronoun"),
    (["What was the Hittite empire?"], "What caused its decline?", "possessive"),
    (["What is the keto diet?", "What is the paleo diet?"], "What do they have in common?", "pronoun"),  # split
    (["I want to buy a garage door opener."], "Should I get a smart one?", "one_anaphora"),
    (["What is a virtual machine?"], "How do VMs scale?", "acronym"),
    (["Tell me about mammals."], "What is the largest?", "ellipsis"),  # superlative
    (["Who directed the Neverending Story film?"], "When was the film released?", "definite_description"),
    (["Tell me about metformin for zanzibarian diabetes."], "What are the main side effects?", "ellipsis"),
    (["What is mortadella?"], "What is the difference with bologna?", "ellipsis"),  # second term, noun
    (["What is a virtual machine?"], "How is a container different?", "ellipsis"),  # second term, adjective
    (["Is metformin safe in pregnancy?"], "What about Glucophage?", "predicate_ellipsis"),
    # a fragment holding an apostrophe of its own
    (["Is melatonin safe during pregnancy?"], "What about St. John's wort?", "predicate_ellipsis"),
    (["二甲双胍是什么药?"], "它有什么副作用?", "pronoun"),
    (["肺癌是什么？"], "其症状有哪些？", "possessive"),
    (["二甲双胍是什么药?"], "该药的副作用是什么?", "pronoun"),
    (["阿司匹林和布洛芬有什么副作用?"], "这些药贵吗?", "pronoun"),
    (["阿司匹林是什么？", "布洛芬呢？"], "它们有什么区别?", "pronoun"),  # split
]


@pytest.mark.parametrize(("history", "question", "kind"), FAMILIES)
def test_no_word_of_the_conversation_reaches_a_trace_without_query_text(stage, history, question, kind):
    """before: rule descriptions quoted the text ("'VMs' spells the initials of 'a virtual machine'",
    "superlative 'largest' ... ('mammals')", "demonstrative description '该药'", "personal pronoun 'it'")."""
    result = rewrite(stage, question, history, trace_text=False)
    assert kind in {r["kind"] for r in result.details["replacements"]}, result.details["replacements"]
    blob = json.dumps([result.details, [d.__dict__ for d in result.decisions]], ensure_ascii=False)
    assert not leaked(blob, conversation_words([question, *history])), blob
    assert "<redacted>" in json.dumps(result.details["replacements"], ensure_ascii=False)
    # the rule is still named in words, the text is not
    traced = rewrite(stage, question, history)
    assert {r["kind"] for r in traced.details["replacements"]} == {r["kind"] for r in result.details["replacements"]}


def test_no_word_of_the_conversation_reaches_the_whole_trace(bm25_index, glossary_dir, write_config, tmp_path):
    """The same through a pipeline, its whole trace (recall on both texts) serialised."""
    (tmp_path / "glossary.yaml").write_text(GLOSSARY, encoding="utf-8")
    config = write_config(
        f"version: 1\nindex: {bm25_index}\nstages:\n"
        "  - {id: rewrite, type: rewrite.coreference, params: {glossary: glossary.yaml}}\n"
        "  - {id: bm25, type: recall.bm25, inputs: [rewrite], params: {top_k: 5, query: both}}\n"
        "output: bm25\ntrace: {log: null, include_query_text: false, explain: true}\n"
    )
    pipeline = Pipeline(compile_file(config))
    for history, question, _ in FAMILIES[4:6] + FAMILIES[10:13]:
        trace = pipeline.search(question, history=history, as_of=AS_OF).trace
        blob = json.dumps(trace, ensure_ascii=False)
        assert not leaked(blob, conversation_words([question, *history])), (question, blob)


def test_the_redactor_pairs_quotes_around_apostrophes_and_catches_unquoted_text():
    from stages.rewrite.discourse import Redactor

    redactor = Redactor(["What about the Smiths' house?", "Is rock 'n' roll loud?", "blorp"])
    assert redactor.redact("'What about the Smiths' house?' has no predicate of its own") == \
        "<redacted> has no predicate of its own"
    assert redactor.redact("'Is rock 'n' roll loud?' asked again") == "<redacted> asked again"
    # a rule that forgot its quotes: the conversation's words are redacted anyway, the rule's own are kept
    assert redactor.redact("definite blorp names an earlier entity") == "definite <redacted> names an earlier entity"
    # an unpaired quote: the rest cannot be told apart from text
    assert redactor.redact("pronoun 'it (neuter)") == "pronoun <redacted>"


# --------------------------------------------------------------------------- 2, 3. Chinese antecedents


@pytest.mark.parametrize(
    ("history", "question", "expected"),
    [
        # before: '药有什么副作用?' (jieba splits 二甲/双/胍; 药 of 什么药 was the only noun)
        (["二甲双胍是什么药?"], "它有什么副作用?", "二甲双胍有什么副作用?"),
        (["二甲双胍是什么?"], "它有什么副作用?", "二甲双胍有什么副作用?"),
        (["妊娠糖尿病是什么病?"], "它怎么治疗?", "妊娠糖尿病怎么治疗?"),
        # before: '药治疗糖尿病...' -> 药; what is asked for is no antecedent
        (["哪种药治疗糖尿病最好?"], "它有副作用吗?", "糖尿病有副作用吗?"),
    ],
)
def test_chinese_question_words_govern_no_antecedent_and_a_copula_subject_is_the_topic(stage, history, question,
                                                                                       expected):
    assert rewritten(stage, question, history) == expected


def test_chinese_plural_descriptions_and_pairs(stage):
    # before: '药药贵吗?' / '阿司匹林药贵吗?': 这些 read as a pronoun standing alone
    assert rewritten(stage, "这些药贵吗?", ["阿司匹林和布洛芬有什么副作用?"]) == "阿司匹林和布洛芬贵吗?"
    assert rewritten(stage, "那些药贵吗?", ["阿司匹林和布洛芬有什么副作用?"]) == "阿司匹林和布洛芬贵吗?"
    # before: '阿司匹林有什么区别?': 它们 took one of the two
    assert rewritten(stage, "它们有什么区别?", ["阿司匹林与布洛芬能一起吃吗?"]) == "阿司匹林与布洛芬有什么区别?"
    result = rewrite(stage, "它们有什么区别?", ["阿司匹林是什么？", "布洛芬呢？"])
    assert result.query.rewritten == "阿司匹林和布洛芬有什么区别?"
    (pair,) = result.details["replacements"]
    assert [p["replacement"] for p in pair["parts"]] == ["阿司匹林", "布洛芬"]
    # 它 after a name jieba tags as a person's (布洛芬: nr)
    assert rewritten(stage, "它有什么副作用?", ["布洛芬是什么?"]) == "布洛芬有什么副作用?"


# --------------------------------------------------------------------------- 4, 6, 7. glossary matching


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # before: '这种药物物安全吗?', '药物房在哪里?'
        ("这种药物安全吗?", "这种药物安全吗?"),
        ("药房在哪里?", "药房在哪里?"),
        ("这药贵吗?", "这药物贵吗?"),
        ("恶性肿瘤能治愈吗？", "恶性肿瘤能治愈吗？ 癌症"),  # a term jieba may cut in two still matches whole
        # before: 'Send 5 multiple sclerosis': an acronym term matched any case
        ("Send 5 ms of signal", "Send 5 ms of signal"),
        ("Does MS affect memory?", "Does multiple sclerosis affect memory?"),
        ("Can us citizens vote?", "Can us citizens vote?"),
        ("Is it cheaper in the US?", "Is it cheaper in the US? United States"),
        # what the regex did, kept: whole words, punctuation inside terms, whitespace variants, both directions
        ("Is St. John's wort safe?", "Is St. John's wort safe? hypericum"),
        ("Is St John's wort safe?", "Is St John's wort safe?"),
        ("Do you know C++?", "Do you know C++? cplusplus"),
        ("Is ASP.NET free?", "Is ASP.NET free?"),
        ("Is .NET free?", "Is .NET free? dotnet"),
        ("What about dotnet?", "What about dotnet? .NET"),
        ("What is type  2\ndiabetes?", "What is type  2\ndiabetes? T2DM"),
        ("Casement and showcase", "Casement and showcase"),
        ("Does glucophage cause nausea?", "Does metformin cause nausea?"),
        ("HbA1c高怎么办", "HbA1c高怎么办 glycated haemoglobin"),  # no space before Chinese
    ],
)
def test_glossary_matches_whole_words_and_chinese_words(glossary_dir, text, expected):
    assert load_glossary(glossary_dir / "glossary.yaml").apply(text)[0] == expected


def test_glossary_case_sensitivity_per_file_and_per_entry(tmp_path):
    path = tmp_path / "case.yaml"
    path.write_text(
        "version: 1\ncase_sensitive: false\nentries:\n"
        "  - {id: ms, action: replace, terms: [MS], canonical: multiple sclerosis}\n"
        "  - {id: who, action: replace, terms: [who], canonical: World Health Organization, case_sensitive: true}\n",
        encoding="utf-8",
    )
    glossary = load_glossary(path)
    assert glossary.apply("does ms hurt")[0] == "does multiple sclerosis hurt"  # the file says any case
    assert glossary.apply("what does WHO say")[0] == "what does WHO say"  # the entry says as written
    assert glossary.apply("what does who say")[0] == "what does World Health Organization say"
    # two terms that differ only in case may belong to two entries when both match only as written
    path.write_text("version: 1\nentries:\n  - {id: a, terms: [MS, multiple sclerosis]}\n"
                    "  - {id: b, terms: [Ms, Miss], case_sensitive: true}\n", encoding="utf-8")
    assert load_glossary(path).apply("Ms Smith")[0] == "Ms Smith Miss"
    path.write_text("version: 1\nentries:\n  - {id: a, terms: [MS, multiple sclerosis]}\n"
                    "  - {id: b, terms: [ms, millisecond]}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'ms' is already a term of entry 'a'"):
        load_glossary(path)


def test_a_large_glossary_is_indexed_at_warm_up_and_costs_what_the_text_costs(tmp_path):
    """before: 5,000 entries compiled one regex on the first query (1.3-2.6 s) and applied it at ~1 ms a
    character (4 s for 4,096 characters), scanning the text twice."""
    import random

    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word() -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(4, 9)))

    lines = ["version: 1", "entries:"]
    for n in range(5000):
        terms = ", ".join(" ".join(word() for _ in range(rng.randint(1, 3))) for _ in range(3))
        lines.append(f"  - {{id: e{n}, terms: [{terms}]}}")
    lines.append("  - {id: metformin, action: replace, terms: [Glucophage], canonical: metformin}")
    path = tmp_path / "big.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    glossary = load_glossary(path)
    assert load_glossary(path) is glossary  # parsed once: the compile-time check and warm-up share it
    began = time.perf_counter()
    glossary.prepare()
    assert glossary.apply("Is Glucophage safe?")[0] == "Is metformin safe?"
    text = ("What is the dose of Glucophage for a child with type 1 diabetes and kidney failure? " * 60)[:4096]
    for _ in range(5):
        glossary.apply(text)
    assert time.perf_counter() - began < 2.0  # before: over 20 s on two cores
    path.write_text(path.read_text(encoding="utf-8").replace("canonical: metformin", "canonical: metformina"),
                    encoding="utf-8")
    assert load_glossary(path).apply("Is Glucophage safe?")[0] == "Is metformina safe?"  # an edit is read


# --------------------------------------------------------------------------- 5. mixed languages


def test_the_question_language_goes_by_its_letters():
    from stages.rewrite.chinese import language_of

    assert language_of("Is it safe for 老人?") == "en"  # before: Chinese (one Han word)
    assert language_of("What are 二甲双胍's side effects?") == "en"
    assert language_of("二甲双胍的 side effects 是什么?") == "zh"
    assert language_of("HbA1c高怎么办") == "zh"
    assert language_of("它有什么副作用?") == "zh"
    assert language_of("12 + 3?") is None


def test_a_resolver_reads_only_turns_of_its_own_language(stage):
    # before: 'What有什么副作用?' (the Chinese resolver took 'What' from the English turn)
    result = rewrite(stage, "它有什么副作用?", ["What is metformin?"])
    assert result.query.rewritten == "它有什么副作用?"
    (decision,) = [d for d in result.decisions if d.code == "history_other_language"]
    assert decision.data == {"skipped": 1, "turns": [1], "language": "zh"}
    assert "Chinese resolver takes antecedents only from Chinese turns" in decision.detail
    assert result.details["history_other_language"] == 1
    # before: "What are 二甲双胍是什么药's side effects?"
    result = rewrite(stage, "What are its side effects?", ["二甲双胍是什么药?"])
    assert result.query.rewritten == "What are its side effects?"
    # turn numbers stay the conversation's: the Chinese turn is turn 2
    result = rewrite(stage, "它有什么副作用?", ["What is metformin?", "二甲双胍是什么药?"])
    assert result.query.rewritten == "二甲双胍有什么副作用?"
    assert result.details["replacements"][0]["antecedent"]["named_in_turn"] == 2
    # before: routed to Chinese by one Han word
    result = rewrite(stage, "Is it safe for 老人?", ["What is metformin?"])
    assert result.details["language"] == "en" and result.query.rewritten == "Is metformin safe for 老人?"


# --------------------------------------------------------------------------- 8. warnings


def test_chains_and_pronoun_replacements_are_located_warnings(tmp_path, write_config):
    """before: loaded silently; 'aspirine' -> 'aspirin' was never rewritten on to 'acetylsalicylic acid'."""
    (tmp_path / "glossary.yaml").write_text(
        "version: 1\nentries:\n"
        "  - {id: chain-a, action: replace, terms: [aspirine], canonical: aspirin}\n"
        "  - {id: chain-b, action: replace, terms: [aspirin], canonical: acetylsalicylic acid}\n"
        "  - {id: pron, action: replace, terms: [the drug], canonical: it}\n",
        encoding="utf-8",
    )
    config = write_config(
        "version: 1\nstages:\n"
        "  - {id: rewrite, type: rewrite.coreference, params: {glossary: glossary.yaml}}\n"
        "  - {id: bm25, type: recall.bm25, inputs: [rewrite]}\n"
    )
    warnings = [str(w) for w in compile_file(config).warnings]
    glossary = tmp_path / "glossary.yaml"
    chain = next(w for w in warnings if "chain-a" in w)
    assert f"{glossary}:3:" in chain and "is a term of entry 'chain-b'" in chain and "one pass" in chain
    pronoun = next(w for w in warnings if "'pron'" in w)
    assert f"{glossary}:5:" in pronoun and "pronoun 'it'" in pronoun
    assert all("warning" in w for w in warnings)
    # an empty replacement is an error, as before
    glossary.write_text("version: 1\nentries:\n  - {id: e, action: replace, terms: [x], canonical: ' '}\n",
                        encoding="utf-8")
    with pytest.raises(ConfigError, match="needs `canonical`"):
        load_glossary(glossary)


# --------------------------------------------------------------------------- 9. offsets


def test_the_trace_says_what_offsets_count_in(stage):
    """before: glossary offsets (in the resolved text) and replacement offsets (in the question) side by side,
    unlabelled, and the resolved text was not in the trace."""
    result = rewrite(stage, "Is it safe with Glucophage?", ["What is throat cancer?"])
    details = result.details
    assert details["offsets"] == {"replacements": "original", "glossary": "resolved"}
    (replacement,) = details["replacements"]
    assert details["original"][replacement["start"] : replacement["end"]] == "it"
    (hit,) = details["glossary"]
    assert details["resolved"] == "Is throat cancer safe with Glucophage?"
    assert details["resolved"][hit["start"] : hit["end"]] == "Glucophage"
    assert details["rewritten"] == "Is throat cancer safe with metformin?"
