"""Index settings (`sieve index --settings FILE`) are checked as a pipeline config is: every problem at once, each at
its file:line:col, a did-you-mean for a misspelt key, wrong types in the pipeline's words, finite numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import ConfigError, SieveError
from engine.index import build_index, index_setting_hint, load_index_settings

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    records = [{"_id": "a", "title": "Cats", "text": "Cats purr."}, {"_id": "b", "text": "Dogs bark at the postman."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def messages(error: ConfigError) -> list[str]:
    return [str(issue) for issue in error.issues]


def test_a_misspelt_setting_is_located_with_did_you_mean(tmp_path: Path):
    """The audit's case: `bm25: {kl: 1.2}` said "kl: Extra inputs are not permitted", no file, no line, no hint."""
    settings = write(tmp_path, "bm25: {kl: 1.2}\n")
    with pytest.raises(ConfigError) as caught:
        load_index_settings(settings, ["bm25"])
    from stages.recall.bm25 import BM25IndexSettings

    assert messages(caught.value) == [
        f"{settings}:1:8  bm25.kl: unknown field 'kl' (did you mean 'k1'?); valid fields: "
        + ", ".join(BM25IndexSettings.model_fields)
    ]


def test_every_problem_at_once_each_located(tmp_path: Path):
    settings = write(tmp_path, "\n".join([
        "bm25:",
        "  k1: '1.2'",             # text, not a number
        "  b: 2",                  # out of range
        "  method: luceen",        # not a choice
        "  tokenizer:",
        "    languag: zh",         # misspelt nested key
        "    lowercase: yes",      # YAML 1.2: text, not a boolean
        "dense: {}",               # a component not being built
        "bm52: {}",                # no such component
    ]) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_index_settings(settings, ["bm25"])
    found = messages(caught.value)
    assert len(found) == 7, found
    expected = [
        (2, 7, "bm25.k1: expected a number, not text (write it without quotes) (got '1.2')"),
        (3, 6, "bm25.b: Input should be less than or equal to 1 (got 2)"),
        (4, 11, "bm25.method: 'luceen' is not one of 'lucene', 'robertson', 'atire', 'bm25l', 'bm25+' (did you mean "
                "'lucene'?)"),
        (6, 5, "bm25.tokenizer.languag: unknown field 'languag' (did you mean 'language'?)"),
        (7, 16, "bm25.tokenizer.lowercase: expected true or false, not text"),
        (8, 1, "dense: settings for 'dense', which is not being built (add --with dense; building: bm25)"),
        (9, 1, "bm52: unknown index component 'bm52' (did you mean 'bm25'?)"),
    ]
    for (line, column, text), message in zip(expected, found):
        assert message.startswith(f"{settings}:{line}:{column}  {text}"), message


def test_non_finite_numbers_are_refused(tmp_path: Path):
    settings = write(tmp_path, "bm25: {k1: .inf, b: .nan}\n")
    with pytest.raises(ConfigError) as caught:
        load_index_settings(settings, ["bm25"])
    assert [i.path for i in caught.value.issues] == ["bm25.k1", "bm25.b"]  # in the order of the file
    assert all("finite number" in i.message for i in caught.value.issues)


@pytest.mark.parametrize(("text", "expected"), [
    ("bm25: 1.2\n", ":1:7  bm25: expected a mapping of bm25 settings (e.g. bm25: {method: lucene}), got a number"),
    ("- bm25\n", ":1:1  expected a mapping of component name to its settings (e.g. bm25: {k1: 1.2}), got an array"),
])
def test_a_file_of_the_wrong_shape(tmp_path: Path, text: str, expected: str):
    settings = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_index_settings(settings, ["bm25"])
    assert messages(caught.value) == [f"{settings}{expected}"]


def test_the_loaders_problems_come_with_the_settings_problems(tmp_path: Path):
    settings = write(tmp_path, "bm25:\n  k1: 1.2\n  k1: 1.3\n  bb: 0.5\n")
    with pytest.raises(ConfigError) as caught:
        load_index_settings(settings, ["bm25"])
    assert [(i.location.line, i.path) for i in caught.value.issues] == [(3, "bm25.k1"), (4, "bm25.bb")]
    assert "duplicate key 'k1'" in caught.value.issues[0].message
    assert "(did you mean 'b'?)" in caught.value.issues[1].message


def test_null_means_the_defaults_and_components_without_a_section_get_them(tmp_path: Path):
    settings = write(tmp_path, "bm25:\n")
    assert load_index_settings(settings, ["bm25", "dense"]) == {"bm25": {}, "dense": {}}
    assert load_index_settings(None, ["bm25"]) == {"bm25": {}}


def test_language_sets_the_tokenizer_over_the_file(tmp_path: Path):
    settings = write(tmp_path, "bm25: {k1: 1.2, tokenizer: {stemmer: none, language: en}}\n")
    assert load_index_settings(settings, ["bm25"], language="zh") == {
        "bm25": {"k1": 1.2, "tokenizer": {"stemmer": "none", "language": "zh"}}}
    with pytest.raises(ConfigError) as caught:
        load_index_settings(None, ["bm25"], language="fr")
    assert messages(caught.value) == ["--language  bm25.tokenizer.language: 'fr' is not one of 'en', 'zh'"]
    with pytest.raises(SieveError, match="--language applies to the bm25 component"):
        load_index_settings(None, ["dense"], language="zh")


def test_an_unknown_component_to_build(tmp_path: Path):
    with pytest.raises(SieveError, match=r"--with unknown index component 'bm52' \(did you mean 'bm25'\?\)"):
        load_index_settings(None, ["bm52"])


def test_settings_given_in_code_are_checked_alike_before_anything_is_written(corpus: Path, tmp_path: Path):
    """build_index (the Python API, rule tests' index_settings) says the same, every problem at once, unlocated."""
    out = tmp_path / "index"
    with pytest.raises(ConfigError) as caught:
        build_index(corpus, out, {"bm25": {"kl": 1.2, "b": 2.0}, "dense": "big"})
    found = messages(caught.value)
    assert len(found) == 3, found
    assert found[0] == "index settings  bm25.b: Input should be less than or equal to 1 (got 2.0)"
    assert found[1].startswith("index settings  bm25.kl: unknown field 'kl' (did you mean 'k1'?); valid fields: ")
    assert found[2].startswith("index settings  dense: expected a mapping of dense settings")
    assert found[2].endswith("got a string")
    assert not out.exists()


def test_settings_read_from_a_file_build_the_index(corpus: Path, tmp_path: Path):
    settings = write(tmp_path, "bm25: {k1: 1.2, b: 0.5, tokenizer: {stemmer: none}}\n")
    manifest = build_index(corpus, tmp_path / "index", load_index_settings(settings, ["bm25"]))
    recorded = manifest["components"]["bm25"]["settings"]
    assert (recorded["k1"], recorded["b"], recorded["tokenizer"]["stemmer"]) == (1.2, 0.5, "none")


def run_index(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "engine.cli", "index", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_cli_says_did_you_mean_and_reports_every_problem(corpus: Path, tmp_path: Path):
    settings = write(tmp_path, "bm25: {kl: 1.2, b: 2}\n")
    done = run_index(corpus, "--out", tmp_path / "index", "--with", "bm25", "--settings", settings)
    assert done.returncode == 2, done.stderr
    assert "2 configuration errors" in done.stderr
    assert "bm25.kl: unknown field 'kl' (did you mean 'k1'?)" in done.stderr
    assert "bm25.b: Input should be less than or equal to 1 (got 2)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "index").exists()


def test_cli_locates_the_problem_in_the_settings_file(corpus: Path, tmp_path: Path):
    settings = write(tmp_path, "bm25:\n  kl: 1.2\n")
    done = run_index(corpus, "--out", tmp_path / "index", "--with", "bm25", "--settings", settings)
    assert done.returncode == 2, done.stderr
    assert f"{settings}:2:3  bm25.kl: unknown field 'kl' (did you mean 'k1'?)" in done.stderr


# --------------------------------------------------------------------------- index settings named in a stage


def test_a_stage_setting_that_belongs_to_the_index_is_pointed_there():
    from stages.fuse import RRFParams
    from stages.recall.bm25 import BM25Params
    from stages.recall.dense import DenseParams

    hint = index_setting_hint(BM25Params, "k1")
    assert hint == ("'k1' is a setting of the index's bm25 component, fixed when the index is built: sieve index "
                    "--with bm25 --settings FILE, with FILE holding bm25: {k1: ...}")
    assert "dense component" in (index_setting_hint(DenseParams, "hnsw_m") or "")
    assert index_setting_hint(BM25Params, "kl") == hint  # one letter off
    assert index_setting_hint(BM25Params, "colour") is None
    assert index_setting_hint(RRFParams, "k1") is None  # reads no index component


def test_compiling_k1_in_a_bm25_stage_says_where_k1_lives(write_config):
    from engine.compiler import compile_file

    config = write_config("version: 1\nstages:\n  - {id: bm25, type: recall.bm25, params: {top_k: 10, k1: 1.2}}\n")
    with pytest.raises(ConfigError) as caught:
        compile_file(config)
    (issue,) = caught.value.issues
    assert issue.path == "stages.0.params.k1"
    assert "'k1' is a setting of the index's bm25 component, fixed when the index is built" in issue.message
