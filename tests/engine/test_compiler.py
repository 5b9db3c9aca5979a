"""Config validation: every broken config gets precise, located errors, all at once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.compiler import compile_file
from engine.errors import ConfigError

VALID = """\
version: 1
index: idx
stages:
  - id: bm25
    type: recall.bm25
    params: {top_k: 50}
  - id: final
    type: select.top_k
    inputs: [bm25]
    params: {k: 5}
output: final
"""


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        compile_file(path)
    return [str(issue) for issue in caught.value.issues]


def test_valid_config_compiles(write_config):
    compiled = compile_file(write_config(VALID))
    assert compiled.order == ["bm25", "final"]
    assert compiled.output == "final"
    assert compiled.canonical["stages"][0]["type"] == "recall.bm25@1"
    assert re.fullmatch(r"[0-9a-f]{64}", compiled.config_sha256)


def test_config_hash_ignores_comments_and_layout(write_config):
    first = compile_file(write_config(VALID, "a.yaml"))
    second = compile_file(write_config("# a comment\n" + VALID.replace("{top_k: 50}", "\n      top_k: 50"), "b.yaml"))
    assert first.config_sha256 == second.config_sha256


def test_misspelt_key_is_located_with_a_suggestion(write_config):
    path = write_config(VALID.replace("top_k: 50", "top_kk: 50").replace("    params: {k: 5}", "    parms: {k: 5}"))
    errors = errors_of(path)
    assert len(errors) == 2
    assert errors[0].startswith(f"{path}:6:14  stages.0.params.top_kk: unknown field 'top_kk' (did you mean 'top_k'?)")
    assert errors[1].startswith(f"{path}:10:5  stages.1.parms: unknown field 'parms' (did you mean 'params'?)")
    assert "valid fields: id, type, inputs, params, on_error, description" in errors[1]


def test_unknown_type_lists_known_types_and_never_imports_a_path(write_config):
    path = write_config(
        VALID.replace("type: recall.bm25", "type: recall.bm52").replace("type: select.top_k", "type: os.path:join")
    )
    errors = errors_of(path)
    assert errors[0].startswith(f"{path}:5:11  stages.0.type: unknown stage type 'recall.bm52' (did you mean 'recall.bm25'?)")
    assert "known types:" in errors[0] and "select.top_k" in errors[0]
    assert f"{path}:8:11  stages.1.type: 'os.path:join' is not a stage type name" in errors[1]
    assert "Python paths are never loaded" in errors[1]


def test_unknown_version_lists_available_versions(write_config):
    errors = errors_of(write_config(VALID.replace("type: recall.bm25", "type: recall.bm25@9")))
    assert "stage type 'recall.bm25' has no version 9; available: recall.bm25@1" in errors[0]


def test_cycle_is_reported_with_its_path(write_config):
    path = write_config(
        "version: 1\nstages:\n"
        "  - {id: a, type: select.top_k, inputs: [c]}\n"
        "  - {id: b, type: select.top_k, inputs: [a]}\n"
        "  - {id: c, type: select.top_k, inputs: [b]}\n"
    )
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:3:")
    assert "stages form a cycle:" in error
    cycle = error.split("stages form a cycle: ")[1].split(" -> ")
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}


def test_dangling_input_suggests_the_close_name(write_config):
    path = write_config(VALID.replace("inputs: [bm25]", "inputs: [bm52]"))
    (error,) = errors_of(path)
    assert error == f"{path}:9:14  stages.1.inputs.0: unknown input 'bm52' (did you mean 'bm25'?); stages defined: bm25, final"


def test_bad_value_types_are_all_reported(write_config):
    path = write_config(
        VALID.replace("top_k: 50", "top_k: many").replace("{k: 5}", "{k: -3}").replace("output: final", "output: final\nlimits: {max_query_chars: zero}")
    )
    errors = errors_of(path)
    assert any("stages.0.params.top_k: Input should be a valid integer" in e and "'many'" in e for e in errors)
    assert any(e.startswith(f"{path}:10:") and "stages.1.params.k: Input should be greater than or equal to 1" in e for e in errors)
    assert any("limits.max_query_chars" in e for e in errors)
    assert len(errors) == 3


def test_duplicate_stage_id(write_config):
    path = write_config("version: 1\nstages:\n  - {id: bm25, type: recall.bm25}\n  - {id: bm25, type: select.top_k, inputs: [bm25]}\n")
    (error,) = errors_of(path)
    assert error == f"{path}:4:10  stages.1.id: duplicate stage id 'bm25' (first used by stages.0)"


def test_duplicate_yaml_key(write_config):
    path = write_config(VALID.replace("output: final", "output: final\noutput: bm25"))
    (error,) = errors_of(path)
    assert error == f"{path}:12:1  output: duplicate key 'output'"


def test_empty_and_comment_only_files(write_config):
    for text in ("", "\n\n", "# nothing here\n"):
        (error,) = errors_of(write_config(text))
        assert error.endswith("file is empty")


def test_not_yaml(write_config):
    path = write_config("version: 1\nstages: [\n  - {id: a\n")
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:3:3  not valid YAML:")


def test_top_level_must_be_a_mapping(write_config):
    (error,) = errors_of(write_config("- just\n- a list\n"))
    assert "the top level must be a mapping" in error


def test_yaml_bomb_is_refused(write_config):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (error,) = errors_of(write_config("\n".join(lines) + "\nversion: 1\n"))
    assert "aliases expanding exponentially" in error


def test_aliases_of_a_long_value_are_refused_by_the_text_they_expand_to(write_config, tmp_path):
    """Resource audit F2/F3: an alias of a 1 MB string counts as one node, so 3,000 of them passed the node count:
    `sieve validate` ran out of memory (exit 70), 100 made every trace 202 MB; in a rule file each cost a rescan."""
    from typer.testing import CliRunner

    from engine.cli import app

    long = "x" * 300_000
    text = (f"version: 1\nstages:\n  - id: bm25\n    type: recall.bm25\n    when: {{field: query.text, op: not_in, "
            f"value: [&s {long}, " + ", ".join(["*s"] * 20) + "]}\noutput: bm25\n")
    (error,) = errors_of(write_config(text))
    assert "expands to more than 4,194,304 characters" in error and ":5:" in error  # located at the alias
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nkind: override\nrules:\n  - {id: r, action: exclude, match: {field: doc.text, "
                     f"op: contains_any, value: [&s {long}, " + ", ".join(["*s"] * 20) + "]}}\n", encoding="utf-8")
    done = CliRunner().invoke(app, ["rules", "check", str(rules)])
    assert done.exit_code == 2 and "expands to more than" in done.output, done.output


def test_very_deep_nesting_is_refused(write_config):
    (error,) = errors_of(write_config("version: 1\nstages: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert "nesting is deeper than 64 levels" in error


def test_python_tags_are_not_constructed(write_config):
    path = write_config("version: 1\nstages: !!python/object/apply:os.system ['echo pwned']\n")
    (error,) = errors_of(path)
    assert "not valid YAML" in error and "python/object/apply" in error


def test_wrong_port_and_input_count(write_config):
    path = write_config(
        "version: 1\nstages:\n  - {id: a, type: recall.bm25}\n  - {id: b, type: recall.bm25, inputs: [a]}\n"
        "  - {id: c, type: select.top_k}\n"
    )
    errors = errors_of(path)
    assert any("stages.1.inputs.0: 'a' (recall.bm25) produces candidates, but recall.bm25 accepts: mask, query" in e for e in errors)
    assert any("stages.2.inputs: select.top_k takes exactly 1 candidate input(s), got 0" in e for e in errors)


def test_unreachable_stage_and_missing_output(write_config):
    unreachable = VALID.replace("output: final", "  - {id: orphan, type: recall.bm25}\noutput: final")
    errors = errors_of(write_config(unreachable, "u.yaml"))
    assert any("stage 'orphan' does not feed the output 'final' (unreachable)" in e for e in errors)
    ambiguous = VALID.replace("output: final", "  - {id: other, type: recall.bm25}")
    errors = errors_of(write_config(ambiguous, "o.yaml"))
    assert any("several final stages (final, other)" in e for e in errors)


def test_output_must_exist(write_config):
    path = write_config(VALID.replace("output: final", "output: fnial"))
    (error,) = errors_of(path)
    assert error == f"{path}:11:9  output: output 'fnial' is not a stage (did you mean 'final'?); stages defined: bm25, final"


def test_missing_file_is_a_config_error(tmp_path):
    (error,) = errors_of(tmp_path / "nope.yaml")
    assert error.endswith("file not found")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"version: 1\nname: caf\xe9\n")
    (error,) = errors_of(path)
    assert "not UTF-8 text" in error


def test_cli_validate_prints_located_errors_and_exits_non_zero(write_config):
    path = write_config(VALID.replace("top_k: 50", "top_kk: 50"))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}:6:14  stages.0.params.top_kk: unknown field 'top_kk'" in result.output
    assert "Traceback" not in result.output


def test_cli_validate_ok(write_config):
    result = CliRunner().invoke(app, ["validate", str(write_config(VALID))])
    assert result.exit_code == 0, result.output
    assert "2 stages, output 'final'" in result.output


def test_installed_console_script_reports_errors_without_traceback(write_config):
    path = write_config("version: 1\nstages: [\n")
    sieve = Path(sys.executable).with_name("sieve")
    done = subprocess.run([str(sieve), "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{path}:3:1" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_usage_errors_are_usage_errors_not_internal_ones(tmp_path):
    # typer's own copy of click raises its own UsageError: it was reported as "internal error ... a bug"
    sieve = Path(sys.executable).with_name("sieve")
    for args, expected in ((["frobnicate"], "No such command 'frobnicate'"), (["search"], "Missing argument"),
                           (["validate", "--bogus"], "No such option")):
        done = subprocess.run([str(sieve), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert expected in done.stderr and "internal error" not in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- found by an audit of bad configs


def test_one_problem_does_not_hide_the_others(write_config):
    path = write_config(
        "version: 1\nstages:\n  - {id: bm25, type: recall.bm25, params: {top_k: 0, top_k: 3}}\n"
        "  - {id: final, type: select.top_k, inputs: [bm52], params: {k: 5}}\n"
        "  - {id: gone, type: recall.bm25x}\n  - {id: after, type: select.top_k, inputs: [gone]}\n"
        "output: finall\noutptu: x\n"
    )
    errors = errors_of(path)
    assert any(f"{path}:3:54  stages.0.params.top_k: duplicate key 'top_k'" in e for e in errors)
    assert any("stages.0.params.top_k: Input should be greater than or equal to 1" in e for e in errors)
    assert any("stages.1.inputs.0: unknown input 'bm52' (did you mean 'bm25'?)" in e for e in errors)
    assert any("stages.2.type: unknown stage type 'recall.bm25x'" in e for e in errors)
    assert any("output: output 'finall' is not a stage (did you mean 'final'?)" in e for e in errors)
    assert any("outptu: unknown field 'outptu' (did you mean 'output'?)" in e for e in errors)
    # an input naming an entry that is itself invalid is not reported again
    assert not any("unknown input 'gone'" in e for e in errors)


def test_values_an_explicit_tag_cannot_make_are_located_not_crashes(write_config, tmp_path):
    path = write_config("version: 1\nname: !!timestamp yesterday\nstages:\n"
                        "  - {id: b, type: recall.bm25, params: {top_k: !!int abc}}\n")
    errors = errors_of(path)
    assert errors[0] == f"{path}:2:7  name: 'yesterday' is not a valid !!timestamp"
    assert errors[1].startswith(f"{path}:4:48  stages.0.params.top_k: 'abc' is not a valid !!int")
    assert len(errors) == 2  # the value is not reported again by the schema
    done = subprocess.run([str(Path(sys.executable).with_name("sieve")), "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "internal error" not in done.stderr


def test_yaml_12_booleans_and_dates_stay_text():
    from engine.yamlsource import load_yaml_text

    data = load_yaml_text("a: [SE, NO, yes, off, On]\nb: true\nc: FALSE\nd: 2025-02-30\ne: 2025-01-31\n", "t.yaml").data
    assert data == {"a": ["SE", "NO", "yes", "off", "On"], "b": True, "c": False, "d": "2025-02-30", "e": "2025-01-31"}


@pytest.mark.parametrize("change, message", [
    (("top_k: 50", 'top_k: "50"'), "stages.0.params.top_k: expected a number, not text (write it without quotes)"),
    (("top_k: 50", "top_k: true"), "stages.0.params.top_k: expected a number, not true/false"),
    (("top_k: 50", "top_k: 50.0"), "stages.0.params.top_k: expected a whole number (write 50, not 50.0)"),
    (("{k: 5}", "{k: 5, min_score: .inf}"), "stages.1.params.min_score: Input should be a finite number"),
    (("output: final", "output: final\ntrace: {explain: 'off'}"), "trace.explain: expected true or false, not text"),
    (("output: final", "output: final\ntrace: {explain: yes}"), "trace.explain: expected true or false, not text"),
    (("output: final", "output: final\nexecutor: {max_workers: 2.0}"), "executor.max_workers: expected a whole number"),
    (("output: final", "output: final\nlimits: {max_query_chars: 99999999999}"), "limits.max_query_chars: Input should be less"),
])
def test_values_are_taken_as_written(write_config, change, message):
    errors = errors_of(write_config(VALID.replace(*change)))
    assert len(errors) == 1 and message in errors[0], errors


def test_nested_numbers_are_taken_as_written(write_config):
    config = ("version: 1\nstages:\n  - {id: a, type: recall.bm25}\n  - {id: b, type: recall.bm25}\n"
              "  - {id: f, type: fuse.rrf, inputs: [a, b], params: {weights: {a: '1', b: 1}}}\n")
    (error,) = errors_of(write_config(config))
    assert "stages.2.params.weights: 'a': expected a number, not text" in error


def test_a_trace_log_that_cannot_be_a_file_is_located(write_config, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for log, says in [(str(tmp_path), "is a directory; name the log file"),
                      (str(tmp_path / "file.txt" / "t.jsonl"), "is a file, so the log cannot be created under it")]:
        (error,) = errors_of(write_config(VALID + f"trace: {{log: '{log}'}}\n"))
        assert f":12:14  trace.log: '" in error and says in error


def test_an_access_stage_cannot_fail_open(write_config):
    config = VALID.replace("  - id: bm25\n", "  - id: access\n    type: rules.prefilter\n    on_error: skip\n"
                           "    params: {rules: access.yaml}\n  - id: bm25\n    inputs: [access]\n")
    errors = errors_of(write_config(config))
    assert any("stages.0.on_error: rules.prefilter decides which documents may be retrieved: skipping it on a "
               "failure would let every document through (fail open)" in e for e in errors)


def test_files_that_are_not_pipeline_configs(write_config, tmp_path):
    (error,) = errors_of(write_config("version: 1\nkind: prefilter\nrules: []\n"))
    assert "kind: this is a rule file (kind: prefilter), not a pipeline config" in error
    (error,) = errors_of(write_config("version: 1\nentries: []\n"))
    assert "this looks like a gazetteer or glossary file, not a pipeline config" in error
    (error,) = errors_of(write_config("---\n"))
    assert "the top level must be a mapping of settings (version, stages, ...), got nothing" in error
    (error,) = errors_of(write_config("- version: 1\n"))
    assert error.endswith("got a list")
    (error,) = errors_of(write_config(VALID + "~: 1\n"))
    assert ":12:1  a key is empty or null" in error


def test_unreadable_and_undecodable_files_are_located(tmp_path):
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert errors_of(fifo) == [f"{fifo}  not a regular file"]  # not a hang
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"version: 1\nstages:\n  - {id: b, type: recall.bm25}\n\x00\n")
    assert errors_of(nul) == [f"{nul}:4:1  not valid YAML: character U+0000 is not allowed in YAML text"]
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"version: 1\ndescription: caf\xe9\n")
    assert errors_of(latin) == [f"{latin}:2:17  not UTF-8 text (byte 0xe9; save the file as UTF-8)"]


def test_a_named_gazetteer_is_checked_at_validate(write_config):
    config = VALID.replace("output: final", "").replace(
        "    params: {k: 5}\n", "    params: {k: 5}\n  - {id: ent, type: boost.entity_consistency, inputs: [final], "
        "params: {gazetteer: missing.yaml}}\n")
    (error,) = errors_of(write_config(config))
    assert "stages.2.params.gazetteer:" in error and "missing.yaml  file not found" in error
    config = config.replace("gazetteer: missing.yaml", "labels: []")
    (error,) = errors_of(write_config(config))
    assert "stages.2.params: labels: [] considers no label" in error


def test_a_recall_that_bypasses_the_access_rules_is_refused(write_config, tmp_path):
    """An audit wired a second recall without the prefilter and fused it with the masked one: validate passed and
    the search returned documents the access rules deny."""
    rules = Path(__file__).resolve().parents[2] / "configs" / "medical" / "access.yaml"
    path = write_config(f"""\
version: 1
index: idx
stages:
  - {{id: access, type: rules.prefilter, params: {{rules: {rules}}}}}
  - {{id: bm25, type: recall.bm25, inputs: [access], params: {{top_k: 20}}}}
  - {{id: raw, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: hybrid, type: fuse.rrf, inputs: [bm25, raw]}}
output: hybrid
""")
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:6:5  stages.2.inputs: stage 'raw' (recall.bm25) retrieves documents without "
                                "the access rules of 'access' (rules.prefilter): it would return documents they deny. "
                                "Add 'access' to its inputs")
    # both recalls under the rules (one also taking a rewrite): accepted
    fine = write_config(f"""\
version: 1
index: idx
stages:
  - {{id: access, type: rules.prefilter, params: {{rules: {rules}}}}}
  - {{id: rewrite, type: rewrite.coreference}}
  - {{id: bm25, type: recall.bm25, inputs: [access], params: {{top_k: 20}}}}
  - {{id: raw, type: recall.bm25, inputs: [rewrite, access], params: {{top_k: 20}}}}
  - {{id: hybrid, type: fuse.rrf, inputs: [bm25, raw]}}
output: hybrid
""", "fine.yaml")
    assert compile_file(fine).output == "hybrid"


def test_numbers_with_an_exponent_are_numbers_as_in_yaml_1_2(write_config):
    """PyYAML (YAML 1.1) read 1e-3 and 1.5e3 as text, so `min_score: 1e-3` was 'expected a number, not text'."""
    for written, value in (("1e-3", 0.001), ("1.5e3", 1500.0), ("2E2", 200.0), ("1.0e+3", 1000.0)):
        path = write_config(VALID.replace("params: {k: 5}", f"params: {{k: 5, min_score: {written}}}"), f"{written}.yaml")
        assert compile_file(path).stages["final"].params.min_score == value
    path = write_config(VALID.replace("params: {k: 5}", "params: {k: 5, min_score: v1e3}"), "text.yaml")
    assert any("min_score" in e for e in errors_of(path))  # text that only looks like one stays text


def test_integers_are_yaml_1_2_core_not_1_1(write_config):
    """YAML 1.1 read 010 as octal eight, 1:30 as sexagesimal ninety and 1_000 as a thousand, without a word."""
    for written, value in (("010", 10), ("0o10", 8), ("0x10", 16), ("+7", 7)):
        path = write_config(VALID.replace("params: {k: 5}", f"params: {{k: {written}}}"), f"k{written}.yaml")
        assert compile_file(path).stages["final"].params.k == value
    for written in ("1_000", "1:30", "0b11"):
        path = write_config(VALID.replace("params: {k: 5}", f"params: {{k: {written}}}"), "text.yaml")
        assert any("stages.1.params.k" in e for e in errors_of(path)), written
    tagged = write_config(VALID.replace("params: {k: 5}", "params: {k: !!int 012}"), "tagged.yaml")
    assert compile_file(tagged).stages["final"].params.k == 12


def test_a_problem_inside_an_alias_is_located_where_the_alias_is_used(write_config):
    """An alias is its anchor's node: an error in the second stage's params pointed at the first stage's line."""
    path = write_config("""\
version: 1
index: idx
stages:
  - {id: bm25, type: recall.bm25, params: &shared {top_k: 50}}
  - id: final
    type: select.top_k
    inputs: [bm25]
    params: *shared
output: final
""")
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:8:13  stages.1.params.top_k: unknown field 'top_k'"), error


def test_a_line_number_in_a_message_is_not_an_emoji(write_config):
    """rich read ':100:' in 'file:100: ...' as the emoji code for 💯 (and ':fire:' in a file name as 🔥)."""
    path = write_config(VALID.replace("top_k: 50", "top_kk: 50"), ":fire:.yaml")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert f"{path}:6:14" in result.output and "🔥" not in result.output


def test_the_candidate_bound_of_a_graph_of_diamonds_is_worked_out_once_per_stage():
    """most_candidates (the rerank window check reads it) summed over every path: 2^40 walks for forty stacked
    diamonds of fusions; each stage's bound is now worked out once."""
    import stages  # noqa: F401  (registers the stage types)
    from engine.registry import resolve_stage
    from engine.stage import GraphView, StageNode

    recall, fusion = resolve_stage("recall.bm25"), resolve_stage("fuse.rrf")
    nodes = {"recall": StageNode("recall", recall, recall.Params(top_k=10), ())}
    below = ("recall", "recall")
    for level in range(40):
        for side in "ab":
            nodes[f"{side}{level}"] = StageNode(f"{side}{level}", fusion, fusion.Params(), below)
        below = (f"a{level}", f"b{level}")
    graph = GraphView(nodes)
    assert graph.most_candidates("a39") == 10 * 2 ** 40  # fusions without top_k pass on what their inputs do
    assert set(graph._most) == set(nodes) - {"b39"}  # each asked once; b39 feeds nothing asked


@pytest.mark.parametrize(("setting", "said"), [
    ("normalize: min-max", "'min-max' is not one of 'none', 'max', 'minmax' (did you mean 'minmax'?)"),
    ("normalize: maximum", "'maximum' is not one of 'none', 'max', 'minmax' (did you mean 'max'?)"),
    ("normalize: 3", "3 is not one of 'none', 'max', 'minmax'"),
])
def test_a_value_that_is_none_of_the_choices_says_what_was_given_and_the_closest(write_config, setting, said):
    """Error-message audit: a value outside a setting's choices showed pydantic's 'Input should be ...', without the
    value given or the choice it was likely meant to be."""
    config = write_config("version: 1\nindex: x\nstages:\n  - {id: bm25, type: recall.bm25, params: {top_k: 10}}\n"
                          "  - {id: t, type: select.threshold, inputs: [bm25], params: {min_score: 0.5, "
                          f"{setting}}}}}\noutput: t\n")
    assert [e.split("  ", 1)[1] for e in errors_of(config)] == [f"stages.1.params.normalize: {said}"]


def test_a_quoted_version_is_told_the_value_that_works(write_config):
    """Error-message audit C2: `version: "1.0"` was told to write it without quotes, which gave a second error."""
    quoted = write_config('version: "1.0"\nindex: x\nstages:\n  - {id: bm25, type: recall.bm25}\noutput: bm25\n')
    [said] = errors_of(quoted)
    assert "version: expected a whole number, not text (write 1, without quotes)" in said
    other = write_config("version: 2\nindex: x\nstages:\n  - {id: bm25, type: recall.bm25}\noutput: bm25\n")
    [said] = errors_of(other)
    assert said.endswith("version: must be 1 (got 2)")


@pytest.mark.parametrize(("text", "where", "meaning"), [
    ("version: 1\nindex: x\nstages:\n  - id: bm25\n    type: recall.bm25\n  params: {top_k: 10}\noutput: bm25\n", ":6:3",
     "this key is not indented like the keys of the block above it"),
    ("version: 1\nindex: x\nstages:\n\t- id: bm25\n", ":4:1", "a tab; YAML indents with spaces only"),
    ("version: 1\nindex: x\nstages:\n  - {id: bm25, type: recall.bm25\noutput: bm25\n", ":5:7",
     "a flow collection ('{...}' or '[...]') not closed where it should be"),
    ("version: 1\nstages:\n  - final\n    type: select.top_k\n", ":4:9", "a 'key: value' where a plain value was expected"),
])
def test_yaml_slips_are_said_in_the_editors_terms(write_config, text, where, meaning):
    """Error-message audit C1: a key dedented one level was 'expected <block end>, but found '?'', and the file has no
    '?': PyYAML's token names. The likely slip is said first, the parser's words after it."""
    path = write_config(text)
    [error] = errors_of(path)
    assert error.startswith(f"{path}{where}  not valid YAML: {meaning}") and "(the parser: " in error, error


def test_an_unknown_key_inside_a_list_or_a_union_is_named_with_the_closest(write_config):
    """Error-message audit: `when: {feild: ...}` (a union of condition forms) and a list item's key got 'unknown
    field' with neither the keys there nor a suggestion."""
    config = write_config("version: 1\nindex: x\nstages:\n  - {id: bm25, type: recall.bm25, params: {top_k: 10}}\n"
                          "  - {id: f, type: select.top_k, inputs: [bm25], params: {k: 5}, when: {feild: doc.x}}\n"
                          "output: f\n")
    [said] = errors_of(config)
    assert "stages.1.when.feild: unknown field 'feild' (did you mean 'field'?); valid fields: field, op," in said


def test_a_missing_file_names_a_close_one_beside_it_and_a_directory_what_it_holds(write_config, tmp_path):
    """Error-message audit: `validate configs/demo.yml` (demo.yaml there), `extends: bse.yaml` (base.yaml there) and
    a directory given as the config said only 'file not found' / 'is a directory'."""
    write_config("version: 1\nindex: x\nstages:\n  - {id: bm25, type: recall.bm25}\noutput: bm25\n", "base.yaml")
    [said] = errors_of(tmp_path / "base.yml")
    assert said.endswith(f"file not found (did you mean {tmp_path / 'base.yaml'}?)")
    extending = write_config("extends: bse.yaml\n", "child.yaml")
    [said] = errors_of(extending)
    assert said.endswith(f"is not there (looked for {tmp_path / 'bse.yaml'}) (did you mean {tmp_path / 'base.yaml'}?)"), said
    [said] = errors_of(tmp_path / "nothing-like-it.yaml")
    assert said.endswith("file not found")
    [said] = errors_of(tmp_path)
    assert said.endswith("is a directory, not a file (it holds base.yaml, child.yaml)")


def test_a_number_written_with_a_unit_is_told_to_drop_it(write_config):
    """Error-message audit: `deadline_ms: 800ms` got pydantic's 'unable to parse string as an integer'."""
    config = write_config("version: 1\nindex: x\nexecutor: {deadline_ms: 800ms}\nstages:\n"
                          "  - {id: bm25, type: recall.bm25, params: {top_k: 10 docs}}\noutput: bm25\n")
    said = [e.split("  ", 1)[1] for e in errors_of(config)]
    assert said == [
        "executor.deadline_ms: expected a number, not text: write 800 alone (a setting's unit is fixed by its name "
        "or description, see `sieve schema`, not written with the value) (got '800ms')",
        "stages.0.params.top_k: expected a number, not text: write 10 alone (a setting's unit is fixed by its name "
        "or description, see `sieve schema`, not written with the value) (got '10 docs')"]
