"""What the fuzzing audit of analysts' files found (findings 3, 4, 6, 7, 8, 13, 14): text that is not Unicode, a path no
file system can open, a relevance grade trec_eval cannot hold, a switch written as text, a key given twice, a term
listed twice, a k1 that overflows. Each is a located error from the loader that reads the file, said before anything
runs; none is an internal error, a crash at run time or a silent reading.

Real files in tmp_path, through the real loaders (compile_file, load_glossary, load_gazetteer, load_index_settings,
load_rule_file, load_test_file, load_beir) and the CLI where the CLI is what was broken.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.compiler import compile_file
from engine.errors import ConfigError, ModelLoadError, SieveError

QUOTE = '"'
PIPELINE = """\
version: 1
stages:
  - {id: bm25, type: recall.bm25}
trace: {log: null}
"""


def at(path: Path, needle: str, after: str = "") -> str:
    """``path:line:column`` of the first ``needle`` that follows ``after`` in the file (where the loader locates the
    value written there)."""
    text = path.read_text(encoding="utf-8")
    offset = text.index(after + needle) + len(after)
    line = text.count("\n", 0, offset) + 1
    return f"{path}:{line}:{offset - (text.rfind(chr(10), 0, offset) + 1) + 1}"


def issues_of(call, *args) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        call(*args)
    return [str(issue) for issue in caught.value.issues]


def validate(path: Path) -> str:
    """``sieve validate PATH``'s output: the config refused (exit 2), never an internal error."""
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    return result.output


# ---------------------------------------------------------------------------- 3, 8: text that is not Unicode


def test_a_lone_surrogate_in_any_config_value_or_key_is_located_all_at_once(write_config):
    """Finding 3: the sha256 of the config crashed on it (internal error)."""
    path = write_config(
        'version: 1\n'                                                            # 1
        'name: "caf\\ud800"\n'                                                    # 2
        'index: "idx\\udc00"\n'                                                   # 3
        'stages:\n'                                                               # 4
        '  - {id: bm25, type: recall.bm25, description: "a\\ud800b"}\n'          # 5
        '  - {id: top, type: select.top_k, inputs: [bm25], "k\\ud83d": 3}\n'      # 6
        'trace: {log: "t\\ud800.jsonl"}\n'                                       # 7
    )
    assert issues_of(compile_file, path) == [
        f"{at(path, QUOTE + 'caf')}  name: not valid Unicode text (a lone surrogate U+D800 at character 4)",
        f"{at(path, QUOTE + 'idx')}  index: not valid Unicode text (a lone surrogate U+DC00 at character 4)",
        f"{at(path, QUOTE + 'a')}  stages.0.description: not valid Unicode text (a lone surrogate U+D800 at "
        "character 2)",
        f"{at(path, QUOTE + 'k')}  stages.1: the key 'k\\ud83d' is not valid Unicode text (a lone surrogate U+D83D at "
        "character 2)",
        f"{at(path, QUOTE + 't')}  trace.log: not valid Unicode text (a lone surrogate U+D800 at character 2)",
    ]
    # through the CLI: the located errors, not "internal error: UnicodeEncodeError"
    assert f"{path}:2:7  name: not valid Unicode text" in validate(path)


def test_a_lone_surrogate_in_a_glossary_canonical_fails_validation_not_every_query(tmp_path, write_config):
    """Finding 8: `sieve validate` said ✓, then every query using the term failed writing its trace."""
    (tmp_path / "g.yaml").write_text('version: 1\nentries:\n  - {id: m, action: replace, terms: [Glucophage], '
                                     'canonical: "metformin\\ud800"}\n', encoding="utf-8")
    config = write_config(PIPELINE.replace("  - {id: bm25, type: recall.bm25}\n",
                                           "  - {id: rw, type: rewrite.coreference, params: {glossary: g.yaml}}\n"
                                           "  - {id: bm25, type: recall.bm25, inputs: [rw]}\n"))
    assert issues_of(compile_file, config) == [
        f"{at(config, 'g.yaml')}  stages.0.params.glossary: {at(tmp_path / 'g.yaml', QUOTE + 'metformin')}  "
        "entries.0.canonical: not valid Unicode text (a lone surrogate U+D800 at character 10)"]


def test_gazetteer_names_context_and_ids_that_can_never_match_are_located(tmp_path):
    """Finding 8: a name holding a lone surrogate, a NUL, or only a zero-width space was accepted."""
    from stages.entities import load_gazetteer

    path = tmp_path / "gaz.yaml"
    path.write_text(
        'version: 1\n'                                                                         # 1
        'entities:\n'                                                                          # 2
        '  - {label: DRUG, names: [metformin, "glu\\ud800"]}\n'                               # 3
        '  - {label: DRUG, names: [insulin, "in\\0sulin"], context: ["\\u200b"]}\n'           # 4
        '  - {label: DRUG, id: "\\u200b\\u200b", names: [aspirin]}\n',                        # 5
        encoding="utf-8")
    assert issues_of(load_gazetteer, path) == [
        f"{at(path, QUOTE + 'glu')}  entities.0.names.1: not valid Unicode text (a lone surrogate U+D800 at "
        "character 4)",
    ]
    path.write_text(path.read_text(encoding="utf-8").replace('"glu\\ud800"', "glucophage"), encoding="utf-8")
    assert issues_of(load_gazetteer, path) == [
        f"{at(path, QUOTE + 'in')}  entities.1.names.1: the name contains a control character (U+0000 at character "
        "3): it can never match (got 'in\\x00sulin')",
        f"{at(path, QUOTE, after='[')}  entities.1.context.0: the context phrase has no visible character (only the "
        "invisible U+200B): it can never match (got '\\u200b')",
        f"{at(path, QUOTE, after='id: ')}  entities.2.id: the id has no visible character (only the invisible "
        "U+200B): it can never match (got '\\u200b\\u200b')",
    ]


def test_glossary_terms_that_can_never_match_are_located(tmp_path):
    """Finding 8: glossary terms holding a lone surrogate, a NUL or only a zero-width space."""
    from stages.rewrite.glossary import load_glossary

    path = tmp_path / "g.yaml"
    path.write_text(
        'version: 1\n'
        'entries:\n'
        '  - {id: a, terms: [phone case, "\\u200b"]}\n'
        '  - {id: b, terms: [cell cover, "mobile\\0cover"]}\n'
        '  - {id: c, action: replace, terms: [Glucophage], canonical: "\\u200b"}\n',
        encoding="utf-8")
    assert issues_of(load_glossary, path) == [
        f"{at(path, QUOTE)}  entries.0.terms.1: the term has no visible character (only the invisible U+200B): it "
        "can never match (got '\\u200b')",
        f"{at(path, QUOTE + 'mobile')}  entries.1.terms.1: the term contains a control character (U+0000 at "
        "character 7): it can never match (got 'mobile\\x00cover')",
        f"{at(path, QUOTE, after='canonical: ')}  entries.2.canonical: the canonical has no visible character (only "
        "the invisible U+200B): write the term the others are replaced by (got '\\u200b')",
    ]
    path.write_text('version: 1\nentries:\n  - {id: a, terms: [phone case, "\\ud800"]}\n', encoding="utf-8")
    assert issues_of(load_glossary, path) == [
        f"{at(path, QUOTE)}  entries.0.terms.1: not valid Unicode text (a lone surrogate U+D800 at character 1)"]


def test_rule_docs_and_a_rule_tests_expected_doc_with_a_lone_surrogate_are_located(tmp_path):
    """Finding 8: rule `docs:` and a rule test's `expect.doc` holding one were accepted."""
    from rules.ruleset import load_rule_file
    from rules.testing import load_test_file

    rules = tmp_path / "o.yaml"
    rules.write_text('version: 1\nkind: override\nrules:\n  - {id: r, action: bury, docs: [a, "b\\ud800"]}\n',
                     encoding="utf-8")
    assert issues_of(load_rule_file, rules) == [
        f"{at(rules, QUOTE + 'b')}  rules.0.docs.1: not valid Unicode text (a lone surrogate U+D800 at character 2)"]
    tests = tmp_path / "o.tests.yaml"
    tests.write_text('version: 1\npipeline: p.yaml\nas_of: 2025-01-01\ncases:\n'
                     '  - {name: n, query: q, expect: [{doc: "\\ud800", absent: true}]}\n', encoding="utf-8")
    assert issues_of(load_test_file, tests) == [
        f"{at(tests, QUOTE, after='doc: ')}  cases.0.expect.0.doc: not valid Unicode text (a lone surrogate U+D800 "
        "at character 1)"]


def test_index_settings_with_a_lone_surrogate_are_located(tmp_path):
    from engine.index import load_index_settings

    settings = tmp_path / "s.yaml"
    settings.write_text('bm25: {tokenizer: {language: "e\\ud800n"}}\n', encoding="utf-8")
    assert issues_of(load_index_settings, settings, ["bm25"]) == [
        f"{at(settings, QUOTE)}  bm25.tokenizer.language: not valid Unicode text (a lone surrogate U+D800 at "
        "character 2)"]


def _pipeline(bm25_index: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    from engine.pipeline import Pipeline

    config = tmp_path / "p.yaml"
    config.write_text(PIPELINE.replace("version: 1\n", f"version: 1\nindex: {bm25_index}\n"), encoding="utf-8")
    return Pipeline(compile_file(config))


def test_a_batch_line_with_a_lone_surrogate_in_any_value_is_refused_before_any_query_runs(bm25_index, tmp_path):
    """Finding 8: `user.groups: ["\\ud800"]` passed the whole-file check, then stopped the batch at query 1; finding
    14: an id that is only a zero-width space was accepted (.strip() keeps it)."""
    from engine.model import UserContext
    from engine.workbench.batch import BatchInputError, read_queries

    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join([
        '{"id": "q1", "text": "vitamin B12", "user": {"groups": ["\\ud800"], "attributes": {"desk": "a\\udc00"}}}',
        '{"id": "\\u200b", "text": "anemia"}',
        '{"id": "q3\\ud800", "text": "x\\udfff", "history": ["ok", "\\ud800"]}',
        '{"id": "q4\\u0000", "text": "anemia"}',
        '{"_id": "q5", "text": "fine", "metadata": {"note": "\\ud800 is ignored with the rest of metadata"}}',
    ]) + "\n", encoding="utf-8")
    with pytest.raises(BatchInputError) as caught:
        read_queries(queries, _pipeline(bm25_index, tmp_path), UserContext(), datetime.now(timezone.utc))
    assert caught.value.problems == [
        f"{queries}:1: user.groups.0: not valid Unicode text (a lone surrogate U+D800 at character 1)",
        f"{queries}:1: user.attributes.desk: not valid Unicode text (a lone surrogate U+DC00 at character 2)",
        f"{queries}:2: id has no visible character (only the invisible U+200B): give an id one can read",
        f"{queries}:3: id: not valid Unicode text (a lone surrogate U+D800 at character 3)",
        f"{queries}:3: text: not valid Unicode text (a lone surrogate U+DFFF at character 2)",
        f"{queries}:3: history.1: not valid Unicode text (a lone surrogate U+D800 at character 1)",
        f"{queries}:4: id contains a control character (U+0000 at character 3): give an id one can read",
    ]
    str(caught.value).encode("utf-8")  # the message itself can be printed and logged


def test_a_batch_line_with_nan_is_not_json(bm25_index, tmp_path):
    from engine.model import UserContext
    from engine.workbench.batch import BatchInputError, read_queries

    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "q1", "text": "a", "metadata": {"score": NaN}}\n', encoding="utf-8")
    with pytest.raises(BatchInputError) as caught:
        read_queries(queries, _pipeline(bm25_index, tmp_path), UserContext(), datetime.now(timezone.utc))
    assert caught.value.problems == [f"{queries}:1: not JSON (NaN is not a JSON value)"]


# ---------------------------------------------------------------------------- 4: paths no file system can open

LONG = "x" * 300


def test_extends_naming_a_path_no_file_system_can_open_is_located(write_config):
    for name, message in [
        ('"base\\ud800.yaml"', "extends: not valid Unicode text (a lone surrogate U+D800 at character 5)"),
        ('"base\\0.yaml"', "extends: the path contains a NUL character"),
        (f"{LONG}.yaml", "extends: a name in the path is longer than the file system allows (305 bytes, at most 255: "
                         f"'{'x' * 40}...')"),
    ]:
        path = write_config(f"extends: {name}\nname: x\n")
        assert issues_of(compile_file, path) == [f"{path}:1:10  {message}"]


def test_a_trace_log_with_an_over_long_name_is_located(write_config):
    """Finding 4: OSError ENAMETOOLONG from Path.is_dir() was an internal error."""
    path = write_config(PIPELINE.replace("trace: {log: null}", f"trace: {{log: {LONG}.jsonl}}"))
    assert issues_of(compile_file, path) == [
        f"{path}:4:14  trace.log: a name in the path is longer than the file system allows (306 bytes, at most 255: "
        f"'{'x' * 40}...')"]
    assert "trace.log: a name in the path is longer" in validate(path)


def test_rule_and_gazetteer_paths_no_file_system_can_open_are_located(tmp_path, write_config):
    """Finding 4: each of these crashed at its own site (load_yaml_file's stat, Path.resolve())."""
    rules = write_config(
        "version: 1\nstages:\n"
        f"  - {{id: acc, type: rules.prefilter, params: {{rules: {LONG}.yaml}}}}\n"
        "  - {id: bm25, type: recall.bm25, inputs: [acc]}\ntrace: {log: null}\n", "rules.yaml")
    assert issues_of(compile_file, rules) == [
        f"{at(rules, 'xxx')}  stages.0.params.rules: a name in the path is longer than the file system allows (305 "
        f"bytes, at most 255: '{'x' * 40}...') (got '{LONG}.yaml')"]
    gazetteer = write_config(
        "version: 1\nstages:\n  - {id: bm25, type: recall.bm25}\n"
        '  - {id: e, type: boost.entity_consistency, inputs: [bm25], params: {gazetteer: "g\\0.yaml"}}\n'
        "trace: {log: null}\n", "gazetteer.yaml")
    assert issues_of(compile_file, gazetteer) == [
        f"{at(gazetteer, QUOTE + 'g')}  stages.1.params.gazetteer: the path contains a NUL character (got "
        "'g\\x00.yaml')"]


def test_a_loader_handed_a_path_no_file_system_can_open_says_so(tmp_path):
    """The loaders themselves (a path from code, not a config): a ConfigError at the path, its odd characters
    escaped, never ValueError or UnicodeEncodeError."""
    from engine.yamlsource import load_yaml_file
    from stages.entities import load_gazetteer
    from stages.rewrite.glossary import load_glossary

    for load in (load_yaml_file, load_glossary, load_gazetteer):
        assert issues_of(load, tmp_path / "g\0.yaml") == [f"{tmp_path}/g\\x00.yaml  the path contains a NUL character"]
        assert issues_of(load, tmp_path / "g\ud800.yaml") == [
            f"{tmp_path}/g\\ud800.yaml  the path is not valid Unicode text (a lone surrogate U+D800 at character "
            f"{len(str(tmp_path)) + 3})"]
    undecodable = tmp_path / "caf\udce9.yaml"  # a name whose bytes are not UTF-8 (b"caf\xe9"), as argv gives it
    undecodable.write_text("a: 1\n", encoding="utf-8")
    assert load_yaml_file(undecodable).data == {"a": 1}


def test_index_settings_naming_paths_no_file_system_can_open_are_located(tmp_path):
    """Finding 4: entities.gazetteer and dense.model with a NUL crashed `sieve index` (Path.resolve())."""
    from engine.index import load_index_settings

    settings = tmp_path / "s.yaml"
    settings.write_text(f'entities: {{gazetteer: "x\\0.yaml", model: {LONG}}}\n', encoding="utf-8")
    assert issues_of(load_index_settings, settings, ["entities"]) == [
        f"{settings}:1:23  entities.gazetteer: the path contains a NUL character (got 'x\\x00.yaml')",
        f"{settings}:1:42  entities.model: a name in the path is longer than the file system allows (300 bytes, at "
        f"most 255: '{'x' * 40}...') (got '{LONG}')",
    ]
    settings.write_text('dense: {model: "models/all-MiniLM\\0"}\n', encoding="utf-8")
    assert issues_of(load_index_settings, settings, ["dense"]) == [
        f"{settings}:1:16  dense.model: dense index model: model models/all-MiniLM\\x00: the path contains a NUL "
        "character"]


def test_resolving_a_model_path_no_file_system_can_open_is_a_model_error():
    from engine.models import missing_model_path, resolve_model, resolve_spacy

    with pytest.raises(ModelLoadError, match=r"^recall.dense model: model models/m\\x00: the path contains a NUL"):
        resolve_model("models/m\0", purpose="recall.dense model")
    with pytest.raises(ModelLoadError, match="a name in the path is longer than the file system allows"):
        resolve_model(f"./{LONG}")
    with pytest.raises(ModelLoadError, match=r"spaCy pipeline directory ./m\\x00: the path contains a NUL"):
        resolve_spacy("./m\0")
    assert missing_model_path("./m\0", None) == "model directory ./m\\x00: the path contains a NUL character"


def test_a_rule_test_naming_a_pipeline_no_file_system_can_open_is_a_config_error(tmp_path):
    """Finding 4: `sieve rules test` with `pipeline: "pipe\\0line.yaml"` was an internal error (ValueError)."""
    from rules.testing import run_test_file

    tests = tmp_path / "t.tests.yaml"
    tests.write_text('version: 1\npipeline: "pipe\\0line.yaml"\nas_of: 2025-01-01\ncases:\n'
                     '  - {name: n, query: q, expect: [{doc: d, absent: true}]}\n', encoding="utf-8")
    assert issues_of(run_test_file, tests) == [f"{tests}:2:11  pipeline: the path contains a NUL character"]
    result = CliRunner().invoke(app, ["rules", "test", str(tests)])
    assert "internal error" not in result.output and "the path contains a NUL character" in result.output


# ---------------------------------------------------------------------------- 6, 13: the evaluation's files


def _dataset(tmp_path: Path, mini_corpus: Path, qrels: str | None = None, queries: str | None = None) -> Path:
    data = tmp_path / "data"
    (data / "qrels").mkdir(parents=True)
    (data / "qrels" / "test.tsv").write_text(
        qrels if qrels is not None else (mini_corpus / "qrels" / "test.tsv").read_text(encoding="utf-8"),
        encoding="utf-8")
    (data / "queries.jsonl").write_text(
        queries if queries is not None else (mini_corpus / "queries.jsonl").read_text(encoding="utf-8"),
        encoding="utf-8")
    return data


@pytest.mark.parametrize("grade", ["99999999999999999999", "2147483648", "4294967296", "-2147483649", "1_0",
                                   "\u0661", "\uff11", "1.0"])
def test_a_relevance_grade_trec_eval_cannot_read_is_refused_when_the_qrels_are_read(tmp_path, mini_corpus, grade):
    """Finding 6: 10^20 was an internal SystemError after every query had run; 2^31 wrapped silently (nDCG 0);
    int() read '1_0' as 10 and the Arabic-Indic and full-width '1' as 1."""
    from engine.evaluation import load_beir

    rows = (mini_corpus / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    qid, doc, _ = rows[2].split("\t")
    rows[2] = f"{qid}\t{doc}\t{grade}"
    data = _dataset(tmp_path, mini_corpus, qrels="\n".join(rows) + "\n")
    with pytest.raises(SieveError) as caught:
        load_beir(data)
    assert str(caught.value) == (f"{data / 'qrels' / 'test.tsv'}:3: score must be an integer written in ASCII digits "
                                 f"within -2147483648..2147483647 (trec_eval's range), got {grade!r}")


def test_relevance_grades_at_the_ends_of_trec_evals_range_are_read(tmp_path, mini_corpus):
    from engine.evaluation import load_beir

    rows = (mini_corpus / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    for number, grade in ((1, "2147483647"), (2, "-2147483648"), (3, "+2"), (4, "007")):
        rows[number] = "\t".join(rows[number].split("\t")[:2] + [grade])
    data = _dataset(tmp_path, mini_corpus, qrels="\n".join(rows) + "\n")
    grades = sorted(g for judged in load_beir(data).qrels.values() for g in judged.values())
    assert grades[0] == -2147483648 and grades[-1] == 2147483647 and 7 in grades and 2 in grades


def test_a_qrels_grade_out_of_range_stops_sieve_eval_before_any_query(tmp_path, mini_corpus, bm25_index):
    """Through the CLI: exit 2 with the file and line, not `internal error: SystemError`."""
    rows = (mini_corpus / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    rows[1] = "\t".join(rows[1].split("\t")[:2] + ["99999999999999999999"])
    data = _dataset(tmp_path, mini_corpus, qrels="\n".join(rows) + "\n")
    config = tmp_path / "p.yaml"
    config.write_text(PIPELINE.replace("version: 1\n", f"version: 1\nindex: {bm25_index}\n"), encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", str(config), "--dataset", str(data)])
    assert isinstance(result.exception, SieveError), (result.output, result.exception)
    assert f"{data / 'qrels' / 'test.tsv'}:2: score must be an integer" in str(result.exception)


def _queries(mini_corpus: Path, first: str) -> str:
    lines = (mini_corpus / "queries.jsonl").read_text(encoding="utf-8").splitlines()
    return "\n".join([first, *lines[1:]]) + "\n"


def test_an_eval_query_line_giving_a_key_twice_or_nan_is_refused(tmp_path, mini_corpus):
    """Finding 13: `{"_id": .., "text": "a", "text": "b"}` was read as "b", silently, and NaN was accepted."""
    from engine.evaluation import load_beir

    qid = json.loads((mini_corpus / "queries.jsonl").read_text(encoding="utf-8").splitlines()[0])["_id"]
    cases = [
        (f'{{"_id": "{qid}", "text": "a", "text": "b"}}', "key 'text' given twice"),
        (f'{{"_id": "{qid}", "text": "a", "metadata": {{"x": 1, "x": 2}}}}', "key 'metadata.x' given twice"),
        (f'{{"_id": "{qid}", "text": "a", "metadata": {{"score": NaN}}}}', "not JSON (NaN is not a JSON value)"),
        (f'{{"_id": "{qid}", "text": "a", "metadata": {{"score": -Infinity}}}}',
         "not JSON (-Infinity is not a JSON value)"),
        (f'{{"_id": "{qid}", "text": "a", "k\\ud800": 1}}',
         "key 'k\\ud800' is not valid Unicode text (it holds a lone surrogate)"),
        (f'{{"_id": "{qid}\\ud800", "text": "a"}}', "_id: not valid Unicode text (a lone surrogate U+D800 at character "
                                                     f"{len(str(qid)) + 1})"),
    ]
    for number, (first, message) in enumerate(cases):
        data = _dataset(tmp_path / str(number), mini_corpus, queries=_queries(mini_corpus, first))
        with pytest.raises(SieveError) as caught:
            load_beir(data)
        assert str(caught.value) == f"{data / 'queries.jsonl'}:1: {message}"


# ---------------------------------------------------------------------------- 7, 14: glossary switches and terms


@pytest.mark.parametrize("written, message", [
    ('"true"', "expected true or false, not text (write true or false without quotes) (got 'true')"),
    ("1", "expected true or false, not a number (got 1)"),
    ('"off"', "expected true or false, not text (write true or false without quotes) (got 'off')"),
])
def test_a_glossarys_case_sensitive_written_as_text_or_a_number_is_located(tmp_path, written, message):
    """Finding 7: the file's `case_sensitive: "true"` was ignored silently (an entry's was refused)."""
    from stages.rewrite.glossary import load_glossary

    path = tmp_path / "g.yaml"
    path.write_text(f"version: 1\ncase_sensitive: {written}\n"
                    "entries: [{id: ms, action: replace, terms: [Ms], canonical: multiple sclerosis}]\n",
                    encoding="utf-8")
    assert issues_of(load_glossary, path) == [f"{path}:2:17  case_sensitive: {message}"]


def test_a_term_listed_twice_in_one_glossary_entry_is_located(tmp_path):
    """Finding 14: `[foo, foo]` and (matched in any case) `[foo, Foo]` were accepted; an `expand` entry of one term
    listed twice has nothing to add."""
    from stages.rewrite.glossary import load_glossary

    path = tmp_path / "g.yaml"
    path.write_text(
        "version: 1\nentries:\n  - {id: a, terms: [foo, foo]}\n  - {id: b, terms: [bar, baz, Bar]}\n"
        "  - {id: c, terms: [MS, ms]}\n  - {id: d, terms: [QT, Qt], case_sensitive: true}\n",
        encoding="utf-8")
    assert issues_of(load_glossary, path) == [
        f"{at(path, 'foo]')}  entries.0.terms.1: 'foo' is listed twice in this entry (terms.0); list each term once",
        f"{at(path, 'Bar]')}  entries.1.terms.2: 'Bar' differs from terms.0 'bar' only in case, and one of them "
        "matches in "
        "any case (a term does unless it is written in capitals or case_sensitive is true); list each term once",
        f"{at(path, 'ms]')}  entries.2.terms.1: 'ms' differs from terms.0 'MS' only in case, and one of them "
        "matches in any "
        "case (a term does unless it is written in capitals or case_sensitive is true); list each term once",
    ]


def test_bm25_k1_has_an_upper_bound_so_scores_stay_finite(tmp_path):
    """Finding 14: `k1: 1e308` made every score inf."""
    from engine.index import load_index_settings

    settings = tmp_path / "s.yaml"
    settings.write_text("bm25: {k1: 1e308}\n", encoding="utf-8")
    assert issues_of(load_index_settings, settings, ["bm25"]) == [
        f"{settings}:1:12  bm25.k1: Input should be less than or equal to 1000 (got 1e+308)"]
    settings.write_text("bm25: {k1: 1000}\n", encoding="utf-8")
    assert load_index_settings(settings, ["bm25"])["bm25"] == {"k1": 1000}
