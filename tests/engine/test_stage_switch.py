"""A stage switched off by configuration (``enabled: false``), and paths that name environment variables.

Real pipelines on the SciFact-slice BM25 index: a disabled stage does not run and is not loaded, the stages that
read it read its one input, every case where that is not defined is a located error, and the toggle can be swept
and replayed. A config never expands ``${VAR}``: a path naming one is a located error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.compiler import compile_file
from engine.errors import ConfigError, ModelLoadError
from engine.pipeline import Pipeline
from engine.replay import replay_trace
from engine.workbench.evaluate import evaluate_pipeline
from engine.workbench.sweep import parse_setting, sweep

QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine."

# bm25 -> short (keeps 3) -> final (keeps 10); {short} and {final_inputs} vary per test
CHAIN = """\
version: 1
index: {index}
stages:
  - id: bm25
    type: recall.bm25
    params: {{top_k: 50}}
  - id: short
    type: select.top_k
    inputs: [bm25]
    params: {{k: 3}}{short}
  - id: final
    type: select.top_k
    inputs: [{final_inputs}]
    params: {{k: 10}}
output: final
trace: {{log: {log}}}
"""


def chain(index: Path | str, short: str = "", final_inputs: str = "short", log: str = "null") -> str:
    return CHAIN.format(index=index, short=short, final_inputs=final_inputs, log=log)


def without_short(index: Path) -> str:
    """The chain with the stage deleted, as one had to before a stage could be disabled."""
    return chain(index, final_inputs="bm25").replace(
        "  - id: short\n    type: select.top_k\n    inputs: [bm25]\n    params: {k: 3}\n", "")


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        compile_file(path)
    return [str(issue) for issue in caught.value.issues if issue.severity == "error"]


# ---------------------------------------------------------------------------- the pass-through


def test_a_disabled_stage_does_not_run_and_its_reader_reads_its_input(bm25_index, write_config):
    enabled = Pipeline.from_file(write_config(chain(bm25_index), "on.yaml")).search(QUERY, log=False)
    disabled_file = write_config(chain(bm25_index, "\n    enabled: false"), "off.yaml")
    disabled = Pipeline.from_file(disabled_file).search(QUERY, log=False)
    direct = Pipeline.from_file(write_config(without_short(bm25_index), "direct.yaml")).search(
        QUERY, log=False)
    assert len(enabled.results) == 3
    assert [c.doc_id for c in disabled.results] == [c.doc_id for c in direct.results]
    assert len(disabled.results) == 10
    compiled = compile_file(disabled_file)
    assert compiled.order == ["bm25", "final"] and "short" not in compiled.stages
    assert compiled.specs["final"].inputs == ["bm25"]
    assert compiled.disabled == {"short": ("bm25",)}
    # the trace: the stages that ran, with the inputs they read, and the config as written, which says what is off
    trace = disabled.trace
    assert [s["id"] for s in trace["stages"]] == ["bm25", "final"]
    assert trace["stages"][1]["inputs"] == ["bm25"]
    short = next(s for s in trace["config"]["resolved"]["stages"] if s["id"] == "short")
    assert short["enabled"] is False and short["inputs"] == ["bm25"]
    final = next(s for s in trace["config"]["resolved"]["stages"] if s["id"] == "final")
    assert "enabled" not in final and final["inputs"] == ["short"]
    assert trace["disabled"] == {"short": ["bm25"]}  # said where an auditor reads the stages, not only in the config
    assert "disabled" not in direct.trace


def test_enabled_changes_the_config_hash_and_enabled_true_is_the_default(bm25_index, write_config):
    plain = compile_file(write_config(chain(bm25_index), "a.yaml"))
    explicit = compile_file(write_config(chain(bm25_index, "\n    enabled: true"), "b.yaml"))
    off = compile_file(write_config(chain(bm25_index, "\n    enabled: false"), "c.yaml"))
    assert plain.config_sha256 == explicit.config_sha256  # the hash of a config that disables nothing is unchanged
    assert off.config_sha256 != plain.config_sha256
    assert all("enabled" not in stage for stage in plain.canonical["stages"])


def rewrite_off(bm25_index: Path | str) -> str:
    """A rewrite switched off before BM25 (its reader then reads the query as asked)."""
    return f"""\
version: 1
index: {bm25_index}
stages:
  - {{id: rewrite, type: rewrite.coreference, enabled: false}}
  - {{id: bm25, type: recall.bm25, inputs: [rewrite], params: {{top_k: 5}}}}
output: bm25
trace: {{log: null}}
"""


def test_a_disabled_rewrite_leaves_its_reader_the_query_as_asked(bm25_index, write_config):
    path = write_config(rewrite_off(bm25_index))
    compiled = compile_file(path)
    assert compiled.order == ["bm25"] and compiled.specs["bm25"].inputs == []
    assert compiled.disabled == {"rewrite": ()}
    result = Pipeline(compiled).search(QUERY, log=False)  # spaCy is never loaded
    assert len(result.results) == 5


def test_validate_says_which_stages_are_disabled(bm25_index, write_config):
    path = write_config(chain(bm25_index, "\n    enabled: false"))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path}:11:5  warning: stages.1.enabled: stage 'short' is disabled (enabled: false): it is not loaded " \
           "and does not run; 'final' reads 'bm25' in its place" in result.output
    assert "2 stages (1 disabled: short)" in " ".join(result.output.split())


def test_the_json_schema_knows_enabled(bm25_index, write_config):
    """Editors validating against `sieve schema` must not flag what `sieve validate` accepts."""
    import jsonschema
    import yaml

    from engine.workbench.schema import pipeline_json_schema

    data = yaml.safe_load(chain(bm25_index, "\n    enabled: false"))
    jsonschema.validate(data, pipeline_json_schema())


# ---------------------------------------------------------------------------- what cannot be disabled


def test_enabled_is_taken_as_written(bm25_index, write_config):
    errors = errors_of(write_config(chain(bm25_index, "\n    enabled: \"no\"")))
    assert len(errors) == 1 and ":11:14  stages.1.enabled: " in errors[0] and "true or false" in errors[0]


def test_a_disabled_output_is_a_located_error(bm25_index, write_config):
    path = write_config(chain(bm25_index).replace("    params: {k: 10}", "    params: {k: 10}\n    enabled: false"))
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:15:5  stages.2.enabled: stage 'final' is the pipeline's output")
    assert "cannot be disabled" in errors[0]


def test_a_disabled_recall_that_a_stage_reads_is_a_located_error(write_config):
    path = write_config("""\
version: 1
index: idx
stages:
  - {id: bm25, type: recall.bm25}
  - {id: wide, type: recall.bm25, params: {top_k: 500}, enabled: false}
  - {id: hybrid, type: fuse.rrf, inputs: [bm25, wide]}
output: hybrid
""")
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:5:57  stages.1.enabled: stage 'wide' is disabled, but 'hybrid' reads it: ")
    assert "'wide' (recall.bm25) has none: it is where their candidates come from" in errors[0]


def test_a_disabled_fusion_that_a_stage_reads_is_a_located_error(write_config):
    path = write_config("""\
version: 1
index: idx
stages:
  - {id: bm25, type: recall.bm25}
  - {id: wide, type: recall.bm25, params: {top_k: 500}}
  - {id: hybrid, type: fuse.rrf, inputs: [bm25, wide], enabled: false}
  - {id: short, type: select.top_k, inputs: [hybrid], enabled: false}
  - {id: final, type: select.top_k, inputs: [short]}
output: final
""")
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:6:56  stages.2.enabled: stage 'hybrid' is disabled, but 'final' (through "
                                "'short') reads it: ")
    assert "'hybrid' has 2 (bm25, wide), so what they would read is not defined" in errors[0]


def test_a_disabled_stage_whose_input_is_not_candidates_is_a_located_error(write_config):
    path = write_config("""\
version: 1
index: idx
stages:
  - {id: rewrite, type: rewrite.coreference}
  - {id: bm25, type: recall.bm25, inputs: [rewrite], enabled: false}
  - {id: final, type: select.top_k, inputs: [bm25]}
output: final
""")
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:5:54  stages.1.enabled: stage 'bm25' is disabled, but 'final' reads it: ")
    assert "'rewrite', gives query, not candidates" in errors[0]


def test_a_fusion_reading_a_disabled_stage_and_its_input_is_a_located_error(write_config):
    path = write_config("""\
version: 1
index: idx
stages:
  - {id: bm25, type: recall.bm25}
  - {id: short, type: select.top_k, inputs: [bm25], enabled: false}
  - {id: hybrid, type: fuse.rrf, inputs: [bm25, short]}
output: hybrid
""")
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:6:49  stages.2.inputs.1: input 'short' is disabled, so this stage would read "
                                "'bm25' in its place, which it reads already")


def test_a_weight_on_a_disabled_stage_says_it_is_disabled(write_config):
    path = write_config("""\
version: 1
index: idx
stages:
  - {id: bm25, type: recall.bm25}
  - {id: rerank, type: rerank.cross_encoder, inputs: [bm25], enabled: false}
  - id: blend
    type: fuse.weighted
    inputs: [rerank]
    params: {weights: {rerank: 0.6, bm25: 0.4}}
output: blend
""")
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:9:32  stages.2.params.weights.rerank: 'rerank' is not a signal written by an "
                                "upstream stage")
    assert errors[0].endswith("; 'rerank' is disabled (enabled: false)")
    # without the weight it compiles: blend reads bm25
    compiled = compile_file(write_config(path.read_text().replace("rerank: 0.6, ", ""), "fixed.yaml"))
    assert compiled.specs["blend"].inputs == ["bm25"] and "rerank" not in compiled.stages
    # a weight of 0 on it changes nothing: a warning, so `enabled=[true, false]` sweeps a config that weighs it 0
    zero = compile_file(write_config(path.read_text().replace("rerank: 0.6", "rerank: 0.0"), "zero.yaml"))
    (warning,) = [str(w) for w in zero.warnings if "weights.rerank" in str(w)]
    assert "its weight is 0, so it changes nothing; 'rerank' is disabled (enabled: false)" in warning
    typo = write_config(path.read_text().replace("rerank: 0.6, bm25: 0.4", "bm25: 1.0, bm52: 0.0"), "typo.yaml")
    (warning,) = [str(w) for w in compile_file(typo).warnings if "bm52" in str(w)]
    assert "(did you mean 'bm25'?)" in warning


@pytest.mark.parametrize("stage, why", [
    ("{id: acl, type: rules.prefilter, params: {rules: access.yaml}, enabled: false}",
     "rules.prefilter decides which documents may be retrieved: switching it off would let every document through"),
    ("{id: acl, type: rules.override, inputs: [bm25], params: {rules: overrides.yaml}, enabled: false}",
     "rules.override applies the analysts' exclusions and pins: switching it off would return what they exclude"),
])
def test_access_and_override_rules_cannot_be_disabled(write_config, stage, why):
    path = write_config(f"""\
version: 1
index: idx
stages:
  - {stage}
  - {{id: bm25, type: recall.bm25{', inputs: [acl]' if 'prefilter' in stage else ''}}}
  - {{id: final, type: select.top_k, inputs: [{'acl' if 'override' in stage else 'bm25'}]}}
output: final
""")
    with pytest.raises(ConfigError) as caught:
        compile_file(path)
    errors = [str(i) for i in caught.value.issues if i.path == "stages.0.enabled"]
    column = stage.index("enabled") + 5
    assert len(errors) == 1 and errors[0].startswith(f"{path}:4:{column}  stages.0.enabled: {why}, so it cannot be "
                                                     "disabled (enabled: false)")
    assert "the rule's own `enabled: false` in its rule file" in errors[0]


# ---------------------------------------------------------------------------- no model load, sweep, replay


def test_a_disabled_reranker_is_never_loaded(bm25_index, write_config):
    stages = f"""\
version: 1
index: {bm25_index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {{model: no-such-reranker}}{{enabled}}}}
  - {{id: final, type: select.top_k, inputs: [rerank], params: {{k: 5}}}}
output: final
trace: {{log: null}}
"""
    with pytest.raises(ModelLoadError, match="rerank"):  # enabled, its model would be loaded (and is not there)
        Pipeline.from_file(write_config(stages.replace("{enabled}", ""), "on.yaml")).warm_up()
    pipeline = Pipeline.from_file(write_config(stages.replace("{enabled}", ", enabled: false"), "off.yaml"))
    resources = pipeline.warm_up()
    assert not any(str(key).startswith("cross_encoder:") for key in resources._shared)
    result = pipeline.search(QUERY, log=False)
    assert len(result.results) == 5 and [s["id"] for s in result.trace["stages"]] == ["bm25", "final"]
    assert result.trace["models"] == []


def test_a_sweep_switches_a_stage_on_and_off(bm25_index, write_config, mini_corpus):
    config = write_config(chain(bm25_index))
    setting = parse_setting("stages.short.enabled=[true, false]")
    report = sweep(config, mini_corpus, [setting], split="test", allow_test=True)
    by_value = {v.settings["stages.short.enabled"]: v for v in report.variants}
    assert set(by_value) == {True, False} and all(v.error is None for v in report.variants)
    assert by_value[True].config_sha256 == report.baseline.config_sha256
    assert by_value[False].config_sha256 != report.baseline.config_sha256
    # switched off, it scores as the config without the stage does
    without = evaluate_pipeline(write_config(without_short(bm25_index), "direct.yaml"), mini_corpus,
                                split="test")
    assert by_value[False].metrics["ndcg_cut_10"] == pytest.approx(without.metrics["ndcg_cut_10"])
    assert report.best.settings == {"stages.short.enabled": False} and report.improves


def test_a_trace_of_a_config_with_a_disabled_stage_replays(bm25_index, write_config, tmp_path):
    log = tmp_path / "trace.jsonl"
    trace = Pipeline.from_file(write_config(chain(bm25_index, "\n    enabled: false", log=str(log)))).search(
        QUERY).trace
    assert log.exists()
    report = replay_trace(trace)
    assert report["identical"], report["differences"]
    # the recorded config switched back on is a named difference, not a silent one
    next(s for s in trace["config"]["resolved"]["stages"] if s["id"] == "short")["enabled"] = True
    changed = replay_trace(trace)
    assert not changed["identical"]


# ---------------------------------------------------------------------------- environment variables


def test_an_environment_variable_in_the_index_path_is_a_located_error(write_config, monkeypatch):
    monkeypatch.setenv("SIEVE_INDEX", "/somewhere")
    path = write_config(chain("${SIEVE_INDEX}"))
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:2:8  index: '${{SIEVE_INDEX}}' looks like an environment variable, but "
                                "Sieve does not expand variables in a config")
    assert "--index DIR, or --set index=DIR" in errors[0]


def test_an_environment_variable_in_the_trace_log_is_a_located_error_and_nothing_is_created(
        bm25_index, write_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(chain(bm25_index, log="\"${TRACE_DIR}/trace.jsonl\""))
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:16:14  trace.log: '${{TRACE_DIR}}' looks like an environment variable")
    assert "--log FILE, or --set trace.log=FILE" in errors[0]
    path = write_config(chain(bm25_index, log="$TRACE_DIR/trace.jsonl"), "bare.yaml")
    assert "trace.log: '$TRACE_DIR' looks like an environment variable" in errors_of(path)[0]
    assert not any(tmp_path.glob("$*"))


def test_an_environment_variable_in_a_stage_param_is_a_located_error(write_config):
    path = write_config("""\
version: 1
index: idx
stages:
  - {id: acl, type: rules.prefilter, params: {rules: "${RULES}/access.yaml"}}
  - {id: bm25, type: recall.bm25, inputs: [acl]}
output: bm25
""")
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:4:54  stages.0.params.rules: '${{RULES}}' looks like an environment "
                                "variable")
    assert "--set stages.acl.params.rules=VALUE" in errors[0]


def test_a_dollar_that_names_no_variable_is_a_path(bm25_index, tmp_path, write_config):
    odd = tmp_path / "idx$5"
    odd.symlink_to(bm25_index)
    assert compile_file(write_config(chain(odd))).index_path == odd


# ---------------------------------------------------------------------------- YAML as written


def test_an_alias_of_a_whole_mapping_works_and_a_merge_key_is_a_located_error(bm25_index, write_config):
    aliased = write_config(f"""\
version: 1
index: {bm25_index}
stages:
  - {{id: bm25, type: recall.bm25, params: &recall {{top_k: 50}}}}
  - {{id: wide, type: recall.bm25, params: *recall}}
  - {{id: hybrid, type: fuse.rrf, inputs: [bm25, wide]}}
output: hybrid
trace: {{log: null}}
""")
    assert compile_file(aliased).specs["wide"].params == {"top_k": 50}
    merged = write_config(aliased.read_text().replace("params: *recall", "params: {<<: *recall, query: original}"),
                          "merged.yaml")
    errors = errors_of(merged)
    assert len(errors) == 1
    assert errors[0].startswith(f"{merged}:5:44  stages.1.params.<<: merge keys ('<<') are not supported: write the "
                                "keys out, or alias a whole mapping")
