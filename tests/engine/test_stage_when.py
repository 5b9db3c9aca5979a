"""Routing by query class: a stage's ``when`` (a condition on the query) decides per query whether it runs.

Real pipelines on the SciFact-slice BM25 index (and the medical example with its entities component): a stage
whose ``when`` does not hold is bypassed — its one input handed on, nothing for a recall stage — and the trace,
the CLI, ``explain``, ``eval`` and the HTML report say so; a replay reproduces it; every condition the compiler
cannot give a meaning is a located error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.compiler import compile_file
from engine.errors import ConfigError
from engine.pipeline import Pipeline
from engine.replay import replay_trace
from engine.workbench.evaluate import evaluate_pipeline
from engine.workbench.inspect import why_not
from tests.engine.test_stage_switch import chain as switch_chain

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "Does a deficiency of vitamin B12 increase blood levels of homocysteine?"
KEYWORDS = "vitamin B12 homocysteine"

QUESTIONS_ONLY = "{field: query.text, op: regex, value: '\\?\\s*$'}"


def chain(index: Path, when: str = QUESTIONS_ONLY, log: str = "null") -> str:
    """bm25 -> short (keeps 3) -> final (keeps 10), ``when`` the short stage's (test_stage_switch's chain)."""
    return switch_chain(index, f"\n    when: {when}", log=log)


def stage(result, stage_id: str) -> dict:
    return next(s for s in result.trace["stages"] if s["id"] == stage_id)


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        compile_file(path)
    return [str(issue) for issue in caught.value.issues if issue.severity == "error"]


def warnings_of(path: Path) -> list[str]:
    return [str(issue) for issue in compile_file(path).warnings]


# ---------------------------------------------------------------------------- routing


def test_a_stage_runs_for_the_queries_its_when_admits_and_is_bypassed_for_the_others(bm25_index, write_config):
    pipeline = Pipeline.from_file(write_config(chain(bm25_index)))
    asked = pipeline.search(QUESTION, log=False)
    typed = pipeline.search(KEYWORDS, log=False)
    assert len(asked.results) == 3 and stage(asked, "short")["status"] == "ok"
    assert stage(asked, "short")["when"]["holds"] is True
    assert stage(asked, "short")["when"]["evidence"]  # what matched, as the rule stages record it
    # keywords: the stage is routed past, its input handed on: final keeps 10 of bm25's list
    record = stage(typed, "short")
    assert record["status"] == "bypassed" and record["when"]["holds"] is False
    assert "query.text regex" in record["when"]["condition"]
    assert "error" not in record and record["output"] == stage(typed, "bm25")["output"]
    assert len(typed.results) == 10 and not typed.degraded  # a route is not a degradation
    unrouted = Pipeline.from_file(write_config(chain(bm25_index).replace(
        "    when: " + QUESTIONS_ONLY + "\n", "").replace("{k: 3}", "{k: 10}"), "plain.yaml")).search(KEYWORDS, log=False)
    assert [c.doc_id for c in typed.results] == [c.doc_id for c in unrouted.results]


def test_a_bypassed_recall_stage_contributes_nothing_to_the_fusion_that_reads_it(bm25_index, write_config):
    config = f"""\
version: 1
index: {bm25_index}
stages:
  - id: wide
    type: recall.bm25
    params: {{top_k: 30}}
  - id: narrow
    type: recall.bm25
    params: {{top_k: 5}}
    when: {{field: user.roles, op: contains, value: analyst}}
  - id: fused
    type: fuse.rrf
    inputs: [wide, narrow]
    params: {{k: 60, top_k: 30}}
output: fused
trace: {{log: null}}
"""
    pipeline = Pipeline.from_file(write_config(config))
    analyst = pipeline.search(KEYWORDS, log=False, user={"roles": ["analyst"]})
    other = pipeline.search(KEYWORDS, log=False, user={"roles": ["clinician"]})
    assert stage(analyst, "narrow")["status"] == "ok" and len(stage(analyst, "narrow")["output"]) == 5
    assert stage(other, "narrow")["status"] == "bypassed" and stage(other, "narrow")["output"] == []
    assert stage(other, "fused")["input_counts"] == [len(stage(other, "wide")["output"]), 0]
    assert all({e.stage for e in c.ledger} == {"wide", "fused"} for c in other.results)
    assert any("narrow" in {e.stage for e in c.ledger} for c in analyst.results)
    # each result's fusion tree says why the routed input added nothing (not that it did not retrieve the document)
    explained = json.dumps(other.trace["results"])
    assert explained.count("input 'narrow': bypassed for this query (its `when` does not hold), adds 0") == len(
        other.results) and "input 'narrow': not retrieved" not in explained
    assert "input 'narrow': not retrieved, adds 0" in json.dumps(analyst.trace["results"])  # ran, and missed some


def test_an_expression_that_fails_on_a_query_runs_the_stage_and_says_why(bm25_index, write_config):
    """A `when` that cannot be judged for this query routes nothing: the stage runs as if it had none."""
    pipeline = Pipeline.from_file(write_config(chain(bm25_index, when='{expr: "query.text * 1000000 == 1"}')))
    result = pipeline.search(KEYWORDS, log=False)
    record = stage(result, "short")
    assert record["status"] == "ok" and len(result.results) == 3
    assert record["when"]["holds"] is None and "as if it had no `when`" in record["when"]["error"]


def test_the_query_text_in_a_whens_evidence_stays_out_of_a_trace_without_query_text(bm25_index, write_config):
    text = chain(bm25_index).replace("trace: {log: null}", "trace: {log: null, include_query_text: false}")
    result = Pipeline.from_file(write_config(text)).search(QUESTION, log=False)
    evidence = stage(result, "short")["when"]["evidence"]
    assert evidence and all(item.get("matched", "<redacted>") == "<redacted>" for item in evidence)
    assert QUESTION not in str(result.trace["stages"])


def test_a_when_on_the_query_entities_reads_those_the_index_extracts(tmp_path, write_config):
    """'Glucophage' is metformin by the gazetteer the index was built with; the stage runs only for drug queries."""
    from engine.index import build_index

    index = tmp_path / "medical"
    build_index(ROOT / "examples" / "medical", index,
                {"bm25": {}, "entities": {"gazetteer": str(ROOT / "configs" / "medical" / "entities.yaml")}})
    config = chain(index, when="{field: query.entities.DRUG, op: contains, value: metformin}")
    pipeline = Pipeline.from_file(write_config(config))
    pipeline.warm_up()
    assert pipeline.warnings == []
    assert stage(pipeline.search("Glucophage and kidney function", log=False), "short")["status"] == "ok"
    assert stage(pipeline.search("kidney function", log=False), "short")["status"] == "bypassed"


def test_a_when_on_entities_over_an_index_without_them_is_a_warm_up_warning(bm25_index, write_config):
    pipeline = Pipeline.from_file(write_config(chain(bm25_index, when="{field: query.entity_labels, op: "
                                                                      "contains, value: DRUG}")))
    pipeline.warm_up()
    (warning,) = pipeline.warnings
    assert warning.startswith("stage 'short': its `when` reads query.entity_labels, but the index at")
    assert "has no entities component" in warning
    assert stage(pipeline.search(KEYWORDS, log=False), "short")["status"] == "bypassed"


# ---------------------------------------------------------------------------- the auditor's and analyst's tools


def test_a_routed_query_replays_and_the_cli_and_report_say_the_stage_was_bypassed(bm25_index, write_config, tmp_path):
    log = tmp_path / "trace.jsonl"
    config = write_config(chain(bm25_index, log=str(log)))
    runner = CliRunner()
    searched = runner.invoke(app, ["search", str(config), KEYWORDS])
    assert searched.exit_code == 0, searched.output
    assert "short: bypassed, its `when` does not hold (query.text regex" in " ".join(searched.output.split())
    trace = json.loads(log.read_text(encoding="utf-8").splitlines()[-1])["trace"]
    assert replay_trace(trace)["identical"]
    html = tmp_path / "report.html"
    reported = runner.invoke(app, ["report", str(log), "--html", str(html)])
    assert reported.exit_code == 0, reported.output
    assert "bypassed (its when does not hold: query.text regex" in html.read_text(encoding="utf-8")


def test_why_not_names_a_recall_stage_the_query_was_routed_past(bm25_index, write_config):
    config = f"""\
version: 1
index: {bm25_index}
stages:
  - id: bm25
    type: recall.bm25
    params: {{top_k: 10}}
    when: {{field: query.language, op: eq, value: en}}
  - {{id: final, type: select.top_k, inputs: [bm25], params: {{k: 10}}}}
output: final
trace: {{log: null}}
"""
    pipeline = Pipeline.from_file(write_config(config))
    result = pipeline.run(pipeline.make_query(KEYWORDS, language="de"), keep_outcomes=True)
    assert result.results == []
    doc_id = stage(pipeline.search(KEYWORDS, log=False, language="en"), "bm25")["output"][0][0]
    verdict = why_not(pipeline, result, doc_id)
    assert verdict.status == "not_recalled"
    assert "'bm25' was bypassed for this query (its `when`, query.language eq 'en', does not hold)" in verdict.message


def test_eval_reports_how_many_queries_each_routed_stage_ran_for(bm25_index, write_config, mini_corpus):
    report = evaluate_pipeline(write_config(chain(bm25_index)), mini_corpus, split="test")
    figures = report.stage_latency_ms["short"]
    # the slice's queries are claims, not questions: the stage is routed past for every one
    assert figures["bypassed"] == report.queries and figures["count"] == 0
    assert "bypassed" not in report.stage_latency_ms["bm25"]
    assert report.degraded["queries"] == 0
    assert report.to_json()["stage_latency_ms"]["short"]["bypassed"] == report.queries


def test_a_when_can_be_set_from_the_command_line_and_is_recorded_in_the_config(bm25_index, write_config):
    plain = write_config(chain(bm25_index).replace("    when: " + QUESTIONS_ONLY + "\n", ""), "plain.yaml")
    pipeline = Pipeline.from_file(plain, settings=["stages.short.when={field: user.id, op: eq, value: ann}"])
    assert stage(pipeline.search(KEYWORDS, log=False, user={"user_id": "bob"}), "short")["status"] == "bypassed"
    result = pipeline.search(KEYWORDS, log=False, user={"user_id": "ann"})
    assert stage(result, "short")["status"] == "ok"
    written = next(s for s in result.trace["config"]["resolved"]["stages"] if s["id"] == "short")
    assert written["when"] == {"field": "user.id", "op": "eq", "value": "ann", "case_sensitive": False}
    # a config without a `when` keeps the sha256 it had before stages could have one
    assert "when" not in next(s for s in compile_file(plain).canonical["stages"] if s["id"] == "short")


def test_a_sweep_measures_routing_against_none(bm25_index, write_config, mini_corpus):
    """`--set stages.short.when=null` is the stage without a `when` (an empty `when:` in a file is an error)."""
    from engine.workbench.sweep import parse_setting, sweep

    setting = parse_setting("stages.short.when=[null, {field: query.text, op: contains, value: homocysteine}]")
    result = sweep(write_config(chain(bm25_index)), mini_corpus, [setting], split="test", allow_test=True)
    by_when = {json.dumps(v.settings.get("stages.short.when")): v for v in result.variants if v.settings}
    assert set(by_when) == {"null", '{"field": "query.text", "op": "contains", "value": "homocysteine"}'}
    assert len({json.dumps(v.metrics, sort_keys=True) for v in by_when.values()}) == 2


def test_not_and_any_survive_the_canonical_config_a_replay_compiles(bm25_index, write_config, tmp_path):
    log = tmp_path / "trace.jsonl"
    when = "{not: {any: [{field: query.text, op: contains, value: homocysteine}, {field: user.id, op: exists, value: true}]}}"
    pipeline = Pipeline.from_file(write_config(chain(bm25_index, when=when, log=str(log))))
    result = pipeline.search(KEYWORDS)
    assert stage(result, "short")["status"] == "bypassed"
    written = next(s for s in result.trace["config"]["resolved"]["stages"] if s["id"] == "short")
    assert "not" in written["when"] and "not_" not in written["when"]
    assert replay_trace(result.trace)["identical"]


# ---------------------------------------------------------------------------- what a `when` cannot mean


def test_conditions_a_stage_cannot_be_routed_by_are_located_errors(bm25_index, write_config):
    path = write_config(chain(bm25_index, when="{field: doc.year, op: gt, value: 2000}"))
    (error,) = errors_of(path)
    assert f"{path}:11:" in error and "stages.1.when.field" in error
    assert "'doc.year' cannot be used in a stage's `when`" in error
    path = write_config(chain(bm25_index, when="{field: query.txt, op: contains, value: x}"), "typo.yaml")
    (error,) = errors_of(path)
    assert "unknown query field 'query.txt'" in error and "query.text" in error
    path = write_config(chain(bm25_index, when=""), "empty.yaml")
    (error,) = errors_of(path)
    assert "stages.1.when: 'when' is empty (are its lines commented out?)" in error
    path = write_config(chain(bm25_index, when="{field: query.text, op: regex, value: '('}"), "regex.yaml")
    (error,) = errors_of(path)
    assert "stages.1.when.value" in error and "invalid regular expression" in error


def test_access_and_override_rules_cannot_be_routed_past(bm25_index, write_config, tmp_path):
    (tmp_path / "access.yaml").write_text("version: 1\nkind: prefilter\nrules:\n  - id: open\n    action: exclude\n"
                                          "    match: {field: doc.id, op: eq, value: nothing}\n", encoding="utf-8")
    config = f"""\
version: 1
index: {bm25_index}
stages:
  - id: access
    type: rules.prefilter
    params: {{rules: access.yaml}}
    when: {{field: user.roles, op: contains, value: public}}
  - id: bm25
    type: recall.bm25
    inputs: [access]
output: bm25
trace: {{log: null}}
"""
    (error,) = errors_of(write_config(config))
    assert "stages.0.when" in error and "cannot be bypassed by a `when`" in error
    assert "their own `when` in the rule file" in error


def test_a_stage_with_several_candidate_inputs_cannot_be_routed(bm25_index, write_config):
    config = f"""\
version: 1
index: {bm25_index}
stages:
  - id: a
    type: recall.bm25
  - id: b
    type: recall.bm25
    params: {{top_k: 5}}
  - id: fused
    type: fuse.rrf
    inputs: [a, b]
    when: {{field: query.text, op: contains, value: x}}
  - {{id: final, type: select.top_k, inputs: [fused], params: {{k: 10}}}}
output: final
trace: {{log: null}}
"""
    (error,) = errors_of(write_config(config))
    assert "stages.2.when" in error and "reads 2 (a, b)" in error and "put the `when` on the stages that feed it" in error


def test_a_when_that_cannot_decide_anything_is_a_warning(bm25_index, write_config):
    disabled = chain(bm25_index).replace("    when: ", "    enabled: false\n    when: ")
    (warning,) = [w for w in warnings_of(write_config(disabled)) if "its `when`" in w]
    assert "is disabled (enabled: false), so its `when` is never judged" in warning
    rewritten = chain(bm25_index, when="{field: query.rewritten, op: exists, value: true}")
    (warning,) = warnings_of(write_config(rewritten, "rewritten.yaml"))
    assert "reads query.rewritten, but no rewrite stage runs before it" in warning


def test_an_extending_config_replaces_a_bases_when_whole(bm25_index, write_config):
    """Mappings merge key by key, but a condition is one thing: merged, `field` and `expr` would be both set."""
    write_config(chain(bm25_index), "base.yaml")
    child = write_config("extends: base.yaml\nstages:\n  - id: short\n    when: {expr: \"user.id == 'ann'\"}\n",
                         "child.yaml")
    pipeline = Pipeline.from_file(child)
    assert stage(pipeline.search(QUESTION, log=False), "short")["status"] == "bypassed"  # not the base's route
    assert stage(pipeline.search(KEYWORDS, log=False, user={"user_id": "ann"}), "short")["status"] == "ok"
    always = write_config("extends: base.yaml\nstages:\n  - id: short\n    when: {expr: 'true'}\n", "always.yaml")
    assert stage(Pipeline.from_file(always).search(KEYWORDS, log=False), "short")["status"] == "ok"


def test_when_null_in_an_extending_config_removes_the_bases_and_says_so(bm25_index, write_config):
    """As `--set stages.short.when=null` does; a warning names it (its lines may have been commented out). Where the
    base has no `when`, an empty one is still refused."""
    base = write_config(chain(bm25_index), "base.yaml")
    child = write_config("extends: base.yaml\nstages:\n  - id: short\n    when:\n    #  expr: 'true'\n", "child.yaml")
    (warning,) = warnings_of(child)
    assert warning.startswith(f"{child}:4:5") and "stages.1.when: `when: null` removes the base config's `when` of " \
        "stage 'short' (" in warning and f"{base.name}:" in warning and warning.endswith("it runs for every query")
    compiled = compile_file(child)
    assert "when" not in compiled.canonical["stages"][1]
    assert compiled.config_sha256 == compile_file(write_config(chain(bm25_index).replace(
        "\n    when: " + QUESTIONS_ONLY, ""), "plain.yaml")).config_sha256  # as a config written without it
    assert "when" not in stage(Pipeline.from_file(child).search(KEYWORDS, log=False), "short")
    empty = write_config("extends: base.yaml\nstages:\n  - {id: final, when: null}\n", "empty.yaml")
    (error,) = errors_of(empty)
    assert "stages.2.when: 'when' is empty" in error
    # further down a chain: a config that sets the `when` again drops the warning (it no longer runs for every
    # query); one that removes it again is no error (its base removed it already, and says so)
    again = write_config("extends: child.yaml\nstages:\n  - {id: short, when: {expr: 'true'}}\n", "again.yaml")
    assert warnings_of(again) == [] and "when" in compile_file(again).canonical["stages"][1]
    twice = write_config("extends: child.yaml\nstages:\n  - {id: short, when: null}\n", "twice.yaml")
    assert warnings_of(twice) == [warning] and "when" not in compile_file(twice).canonical["stages"][1]
    # where a query runs, as `sieve validate` does: `sieve search` says it too
    searched = CliRunner().invoke(app, ["search", str(child), KEYWORDS, "--no-log"])
    assert searched.exit_code == 0, searched.output
    assert "removes the base config's `when` of stage 'short'" in " ".join(searched.output.split())


def test_the_output_stage_cannot_be_routed_past(bm25_index, write_config):
    """Bypassed, an output select.top_k would return its whole input, past the final cut (as `enabled: false` on it
    is refused)."""
    config = f"""\
version: 1
index: {bm25_index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 50}}}}
  - id: final
    type: select.top_k
    inputs: [bm25]
    params: {{k: 10}}
    when: {QUESTIONS_ONLY}
output: final
trace: {{log: null}}
"""
    (error,) = errors_of(write_config(config))
    assert "stages.1.when" in error and "stage 'final' is the pipeline's output" in error
    assert "cannot be bypassed by a `when`" in error and "add a final stage after it" in error
