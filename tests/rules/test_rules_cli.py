"""`sieve rules test` / `sieve rules check`: the example packs' suites pass, and the suites have
teeth — weakening a rule makes them fail, with the failing expectation located."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rules.cli import rules_app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.mark.parametrize("domain", ["medical", "finance"])
def test_example_rule_packs_pass_their_own_tests(domain):
    result = runner.invoke(rules_app, ["test", str(ROOT / "configs" / domain)])
    assert result.exit_code == 0, result.output
    assert " 0 failed" in result.output


def _copy_pack(tmp_path: Path, domain: str) -> Path:
    shutil.copytree(ROOT / "configs" / domain, tmp_path / "configs" / domain)
    shutil.copytree(ROOT / "examples" / domain, tmp_path / "examples" / domain)
    return tmp_path / "configs" / domain


def test_weakening_an_access_rule_fails_the_suite(tmp_path):
    pack = _copy_pack(tmp_path, "medical")
    access = pack / "access.yaml"
    text = access.read_text()
    access.write_text(text.replace("action: acl\n", "action: acl\n    enabled: false\n"))
    result = runner.invoke(rules_app, ["test", str(pack)])
    assert result.exit_code == 1, result.output
    assert "✗ trial protocol and DSMB report stay hidden from other clinicians" in result.output
    tests_file = pack / "rules.tests.yaml"
    assert f"{tests_file}:" in result.output and "expected 'med-006' never to be returned, got rank" in result.output


def test_moving_a_pin_fails_the_suite(tmp_path):
    pack = _copy_pack(tmp_path, "finance")
    overrides = pack / "overrides.yaml"
    overrides.write_text(overrides.read_text().replace("docs: [fin-002]\n    position: 1", "docs: [fin-002]\n    position: 3"))
    result = runner.invoke(rules_app, ["test", str(pack), "-k", "Form SHO"])
    assert result.exit_code == 1
    assert "expected 'fin-002' at rank 1, got rank 3" in result.output


def test_broken_test_file_is_a_located_error(tmp_path):
    pack = _copy_pack(tmp_path, "medical")
    tests_file = pack / "rules.tests.yaml"
    tests_file.write_text(tests_file.read_text().replace("{doc: med-003, rank: 1}", "{doc: med-003, rnk: 1}", 1))
    result = runner.invoke(rules_app, ["test", str(tests_file)])
    assert result.exit_code == 2
    assert f"{tests_file}:13:24  cases.0.expect.0.rnk: unknown field 'rnk'" in result.output


def test_broken_rule_file_is_reported_not_raised(tmp_path):
    pack = _copy_pack(tmp_path, "medical")
    overrides = pack / "overrides.yaml"
    overrides.write_text(overrides.read_text().replace("op: contains_any, value: [metformin, glucophage]",
                                                       "op: contains_some, value: [metformin, glucophage]"))
    result = runner.invoke(rules_app, ["test", str(pack)])
    assert result.exit_code == 2
    assert (f"{overrides}:19:40  rules.0.when.any.0.op: rule 'pin-fda-metformin-alert': 'contains_some' is not one "
            "of 'eq', ") in result.output and "(did you mean 'contains'?)" in result.output
    assert "1 file(s) could not be run" in result.output
    assert "Traceback" not in result.output


def test_check_command_reports_conflicts_and_corpus_findings(tmp_path):
    rules = tmp_path / "overrides.yaml"
    rules.write_text(
        "version: 1\nkind: override\nrules:\n"
        "  - {id: a, action: pin, docs: [med-001], position: 1}\n"
        "  - {id: b, action: exclude, docs: [med-001]}\n"
        "  - {id: c, action: bury, match: {field: doc.colour, op: eq, value: red}}\n")
    result = runner.invoke(rules_app, ["check", str(rules)])
    assert result.exit_code == 2
    assert "[pin_exclude_conflict]" in result.output
    clean = runner.invoke(rules_app, ["check", str(ROOT / "configs" / "medical" / "access.yaml")])
    assert clean.exit_code == 0 and "7 prefilter rules" in clean.output


def test_no_test_files_found(tmp_path):
    result = runner.invoke(rules_app, ["test", str(tmp_path)])
    assert result.exit_code == 2 and "no rule test files" in result.output


def test_expectations_that_could_never_fail_are_errors(tmp_path):
    pack = _copy_pack(tmp_path, "medical")
    tests_file = pack / "rules.tests.yaml"
    text = tests_file.read_text()
    assert "{doc: med-006, absent: true}" in text and "{fired: pin-fda-metformin-alert}" in text
    tests_file.write_text(text.replace("{doc: med-006, absent: true}", "{doc: no-such-doc, absent: true}", 1)
                          .replace("{fired: pin-fda-metformin-alert}", "{fired: no-such-rule}", 1))
    result = runner.invoke(rules_app, ["test", str(tests_file)])
    assert result.exit_code == 2, result.output
    assert "document 'no-such-doc' is not in the index" in result.output
    assert "no rule 'no-such-rule' in the pipeline's rule files" in result.output


def test_a_filter_that_selects_no_case_fails(tmp_path):
    result = runner.invoke(rules_app, ["test", str(ROOT / "configs" / "medical"), "-k", "zzzz-no-such-case"])
    assert result.exit_code == 2 and "no test case matches 'zzzz-no-such-case'" in result.output


def _chinese_pack(tmp_path: Path, settings: str) -> Path:
    import json

    corpus = tmp_path / "corpus"
    corpus.mkdir(parents=True)
    docs = [{"_id": "zh-1", "title": "二甲双胍", "text": "肾功能不全患者使用二甲双胍应减量。"},
            {"_id": "zh-2", "title": "阿司匹林", "text": "阿司匹林可用于预防心血管疾病。"}]
    (corpus / "corpus.jsonl").write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs), encoding="utf-8")
    (tmp_path / "pipeline.yaml").write_text("""\
version: 1
index: nowhere
stages:
  - {id: bm25, type: recall.bm25, params: {top_k: 10}}
  - {id: final, type: select.top_k, inputs: [bm25], params: {k: 5}}
output: final
trace: {log: null}
""", encoding="utf-8")
    tests = tmp_path / "zh.tests.yaml"
    tests.write_text(f"""\
version: 1
pipeline: pipeline.yaml
corpus: corpus
as_of: 2025-06-01
{settings}cases:
  - name: kidney function finds the metformin advice
    query: 肾功能不全
    expect:
      - {{doc: zh-1, rank: 1}}
""", encoding="utf-8")
    return tests


def test_a_chinese_suite_builds_its_index_with_the_settings_it_gives(tmp_path):
    """The index built for a run was always English BM25: a Chinese case returned nothing there and passed against
    the real (Chinese) index, with no hint why. index_settings gives the index its settings."""
    english = runner.invoke(rules_app, ["test", str(_chinese_pack(tmp_path / "en", ""))])
    assert english.exit_code == 1 and "returned: nothing" in english.output, english.output
    chinese = runner.invoke(rules_app, ["test", str(_chinese_pack(tmp_path / "zh",
                                                                   "index_settings: {bm25: {tokenizer: {language: zh}}}\n"))])
    assert chinese.exit_code == 0 and " 0 failed" in chinese.output, chinese.output
    misplaced = runner.invoke(rules_app, ["test", str(_chinese_pack(tmp_path / "bad",
                                                                     "index_settings: {dense: {}}\n"))])
    assert misplaced.exit_code == 2 and "index_settings for dense" in misplaced.output, misplaced.output


def test_a_pipeline_config_given_to_rules_check_is_named_as_one():
    """Error-message audit C9: `sieve rules check configs/demo.yaml` printed 7 field errors (one with the misleading
    "did you mean 'kind'" for `index`) and never said it was the wrong kind of file."""
    root = Path(__file__).resolve().parents[2]
    result = runner.invoke(rules_app, ["check", str(root / "configs" / "demo.yaml")])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "1 configuration error" in said and "did you mean" not in said
    assert ("this is a pipeline config (it has stages:), not a rule file: give the rule files its stages name "
            "(medical/access.yaml, medical/overrides.yaml, relative to the config)") in said


def test_an_unknown_expectation_key_in_a_rule_test_is_named_with_the_closest(tmp_path):
    """Error-message audit: `{doc: fin-002, rnk: 1}` in a rule test said only "unknown field 'rnk'"."""
    pack = _copy_pack(tmp_path, "finance")
    tests = pack / "rules.tests.yaml"
    tests.write_text(tests.read_text().replace("{doc: fin-002, rank: 1}", "{doc: fin-002, rnk: 1}", 1))
    result = runner.invoke(rules_app, ["test", str(pack)])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert ("cases.0.expect.0.rnk: unknown field 'rnk' (did you mean 'rank'?); valid fields: doc, rank, max_rank,"
            in said), said
