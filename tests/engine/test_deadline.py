"""A query deadline (executor.deadline_ms): optional stages (on_error: skip) are cut, essential ones always run.

The shipped cross-encoder and a real BM25 index; a test-only stage that sleeps makes the deadline pass at a known
point, so no assertion depends on how fast the machine is. A cut is traced (when, at what elapsed time), marks the
query degraded, and a replay cuts exactly the stages the trace records as cut.
"""

from __future__ import annotations

import time

import pytest

from engine.errors import ConfigError, DeadlineExceeded
from engine.pipeline import Pipeline
from engine.replay import replay_trace
from engine.stage import Stage, StageContext, StageParams, StageResult, check_deadline, stage_deadline

QUERY = "vitamin B12 homocysteine"


class SleepParams(StageParams):
    ms: int = 0
    then_check: bool = False


@pytest.fixture
def sleep_stage():
    """Passes its input on after sleeping ``ms``; with ``then_check`` it then calls check_deadline() (a stage's
    cooperative check, as the reranker makes between batches). Registered for one test only."""
    from engine import registry

    class Sleep(Stage):
        type_name = "test.sleep"
        version = 1
        Params = SleepParams
        summary = "test only: sleeps, then passes its input on"

        def run(self, ctx):
            time.sleep(self.params.ms / 1000.0)
            if self.params.then_check:
                check_deadline()
            (incoming,) = ctx.inputs
            return StageResult(candidates=list(incoming))

    registry.register_stage(Sleep)
    yield Sleep
    registry._stages.pop(Sleep.type_name)


def _config(write_config, index, *, deadline: str, sleep: str, rerank_on_error: str = "skip") -> Pipeline:
    return Pipeline.from_file(write_config(f"""\
version: 1
index: {index}
executor: {{deadline_ms: {deadline}}}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: slow, type: test.sleep, inputs: [bm25], params: {sleep}}}
  - {{id: rerank, type: rerank.cross_encoder, inputs: [slow], on_error: {rerank_on_error}, params: {{window: 10}}}}
  - {{id: final, type: select.top_k, inputs: [rerank], params: {{k: 5}}}}
output: final
trace: {{log: null}}
"""))


def _stage(trace: dict, stage_id: str) -> dict:
    return next(s for s in trace["stages"] if s["id"] == stage_id)


def test_an_optional_stage_due_after_the_deadline_is_cut_and_the_essential_ones_run(sleep_stage, bm25_index,
                                                                                     write_config):
    pipeline = _config(write_config, bm25_index, deadline="20", sleep="{ms: 60}")
    result = pipeline.search(QUERY, log=False)
    rerank, final = _stage(result.trace, "rerank"), _stage(result.trace, "final")
    assert rerank["status"] == "skipped" and rerank["deadline"]["cut"] == "before_start"
    assert rerank["deadline"]["deadline_ms"] == 20 and rerank["deadline"]["elapsed_ms"] >= 60
    assert rerank["error"].startswith("cut by the query's deadline (20 ms): ") and "due to start" in rerank["error"]
    assert _stage(result.trace, "slow")["status"] == "ok" and final["status"] == "ok"  # on_error: fail: they run
    assert result.degraded and result.trace["degraded"]
    bm25_order = [doc_id for doc_id, _ in _stage(result.trace, "bm25")["output"]][:5]
    assert [c.doc_id for c in result.results] == bm25_order  # the reranker's input, passed on
    # the replay cuts exactly that stage, whatever its own clock says, and says so
    report = replay_trace(result.trace)
    assert report["identical"], report["differences"]
    assert any("stage rerank was cut by the query's deadline when it was traced" in n for n in report["notes"])


def test_with_time_to_spare_nothing_is_cut_and_a_replay_applies_no_deadline(sleep_stage, bm25_index, write_config):
    pipeline = _config(write_config, bm25_index, deadline="600000", sleep="{ms: 0}")
    result = pipeline.search(QUERY, log=False)
    rerank = _stage(result.trace, "rerank")
    assert rerank["status"] == "ok" and "deadline" not in rerank and not result.degraded
    report = replay_trace(result.trace)
    assert report["identical"] and not any("deadline" in n for n in report["notes"])


def test_a_stage_running_when_the_deadline_passes_stops_at_its_next_check(sleep_stage, bm25_index, write_config):
    pipeline = Pipeline.from_file(write_config(f"""\
version: 1
index: {bm25_index}
executor: {{deadline_ms: 10}}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: slow, type: test.sleep, inputs: [bm25], on_error: skip, params: {{ms: 40, then_check: true}}}}
  - {{id: final, type: select.top_k, inputs: [slow], params: {{k: 5}}}}
output: final
trace: {{log: null}}
"""))
    trace = pipeline.search(QUERY, log=False).trace
    slow = _stage(trace, "slow")
    assert slow["status"] == "skipped" and slow["deadline"]["cut"] == "while_running", slow
    assert slow["error"].startswith("cut by the query's deadline (10 ms) while the stage ran, at ")
    assert replay_trace(trace)["identical"]


def test_the_deadline_never_cuts_a_stage_with_on_error_fail(sleep_stage, bm25_index, write_config):
    pipeline = _config(write_config, bm25_index, deadline="20", sleep="{ms: 60}", rerank_on_error="fail")
    result = pipeline.search(QUERY, log=False)
    assert _stage(result.trace, "rerank")["status"] == "ok" and not result.degraded


def test_the_reranker_checks_the_deadline_between_batches(bm25_index, write_config, sleep_stage):
    pipeline = _config(write_config, bm25_index, deadline="null", sleep="{ms: 0}")
    resources = pipeline.warm_up()
    rerank = pipeline.compiled.stages["rerank"]
    query = pipeline.make_query(QUERY)
    candidates = pipeline.run(query).results  # 5 of them: a window the reranker has not scored (no cache hit)
    ctx = StageContext("rerank", query, [candidates], None, resources)
    with stage_deadline(time.perf_counter() - 1.0), pytest.raises(DeadlineExceeded):
        rerank.run(ctx)  # not "cross-encoder inference failed": the executor must see a deadline
    check_deadline()  # outside a cut stage: a no-op


@pytest.mark.parametrize(("value", "says"), [("0", "greater than or equal to 1"), ('"100"', "expected a number, not text")])
def test_a_bad_deadline_is_a_config_error_with_its_line(bm25_index, write_config, value, says):
    path = write_config(f"""\
version: 1
index: {bm25_index}
executor:
  deadline_ms: {value}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
output: bm25
trace: {{log: null}}
""")
    with pytest.raises(ConfigError) as caught:
        Pipeline.from_file(path)
    assert f"{path}:4" in str(caught.value) and "deadline_ms" in str(caught.value) and says in str(caught.value)


def test_the_reranker_does_not_start_a_batch_expected_to_end_past_the_deadline(bm25_index, write_config, sleep_stage):
    """A forward pass cannot be stopped: a 30 ms deadline let a one-batch rerank run 1.2 s, and a multi-batch one
    was cut only after its first batch. The stage times its batches and does not start one it expects to overrun."""
    pipeline = _config(write_config, bm25_index, deadline="60000", sleep="{ms: 0}")
    resources = pipeline.warm_up()
    rerank = pipeline.compiled.stages["rerank"]
    model = rerank._model
    model._seconds_per_cell = 10.0  # as if this machine took 10 s per padded token
    trace = pipeline.search(QUERY, log=False).trace
    record = _stage(trace, "rerank")
    assert record["status"] == "skipped" and record["deadline"]["cut"] == "while_running"
    assert "the rest of its work, expected to take" in record["error"] and "would end past the deadline" in record["error"]
    assert model._seconds_per_cell == pytest.approx(9.0)  # an estimate that cuts every query decays
    # a realistic estimate: the stage runs
    model._seconds_per_cell = 1e-9
    query = pipeline.make_query(QUERY)
    recalled = pipeline.run(query, keep_outcomes=True).outcomes["bm25"].candidates[:7]
    ctx = StageContext("rerank", query, [recalled], None, resources)
    with stage_deadline(time.perf_counter() + 60):
        assert rerank.run(ctx).candidates


def test_an_override_stage_may_not_be_skipped(bm25_index, write_config, tmp_path):
    (tmp_path / "overrides.yaml").write_text("version: 1\nkind: override\nrules:\n"
                                             "  - {id: x, action: exclude, docs: [d1]}\n", encoding="utf-8")
    path = write_config(f"""\
version: 1
index: {bm25_index}
executor: {{deadline_ms: 100}}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - id: rules
    type: rules.override
    inputs: [bm25]
    on_error: skip
    params: {{rules: overrides.yaml}}
output: rules
trace: {{log: null}}
""")
    with pytest.raises(ConfigError) as caught:
        Pipeline.from_file(path)
    assert f"{path}:9:" in str(caught.value) and "would return what its rules exclude" in str(caught.value)


def test_a_deadline_that_can_cut_nothing_is_a_warning(bm25_index, write_config):
    path = write_config(f"""\
version: 1
index: {bm25_index}
executor: {{deadline_ms: 100}}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
output: bm25
trace: {{log: null}}
""")
    warnings = [str(w) for w in Pipeline.from_file(path).compiled.warnings]
    assert any(f"{path}:3:" in w and "so the deadline cuts nothing" in w for w in warnings), warnings


def test_sieve_eval_counts_the_queries_that_ran_degraded(sleep_stage, bm25_index, write_config, mini_corpus):
    from engine.workbench.evaluate import evaluate_pipeline

    config = write_config(f"""\
version: 1
index: {bm25_index}
executor: {{deadline_ms: 10}}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: slow, type: test.sleep, inputs: [bm25], params: {{ms: 30}}}}
  - {{id: rerank, type: rerank.cross_encoder, inputs: [slow], on_error: skip, params: {{window: 10}}}}
output: rerank
trace: {{log: null}}
""")
    report = evaluate_pipeline(config, mini_corpus, split="test", limit=3)
    assert report.degraded == {"queries": 3, "stages": {"rerank": {"deadline": 3}}}
    assert report.to_json()["degraded"] == report.degraded
    assert report.degraded_warning() == ("3 of 3 queries ran degraded ('rerank' skipped in 3 (at the deadline)): the "
                                         "figures are those of the runs as cut, not of the whole pipeline")


def test_the_reranker_pays_its_first_slow_forward_pass_at_warm_up(bm25_index, write_config, sleep_stage):
    """A process's first forward pass is several times slower than the next: paid by the first query, it made a cold
    `sieve explain` cut the rerank that the warm server ran. It is made once per loaded model at warm-up."""
    pipeline = _config(write_config, bm25_index, deadline="null", sleep="{ms: 0}")
    pipeline.warm_up()
    model = pipeline.compiled.stages["rerank"]._model
    assert model._warmed and model._timed_batches == 1 and model._seconds_per_cell is None  # not counted
    again = _config(write_config, bm25_index, deadline="null", sleep="{ms: 0}")
    again.warm_up(reuse=pipeline.resources)
    assert again.compiled.stages["rerank"]._model is model and model._timed_batches == 1  # once per model


def test_a_query_waiting_for_the_model_another_query_holds_is_cut_at_the_deadline(bm25_index, write_config,
                                                                                   sleep_stage):
    """Under load a query waited for the reranker's lock without looking at its deadline (a 1.5 s deadline gave
    3 s responses)."""
    pipeline = _config(write_config, bm25_index, deadline="300", sleep="{ms: 0}")
    pipeline.warm_up()
    model = pipeline.compiled.stages["rerank"]._model
    model.lock.acquire()  # another query is scoring
    try:
        began = time.perf_counter()
        trace = pipeline.search(QUERY, log=False).trace
        took = time.perf_counter() - began
    finally:
        model.lock.release()
    record = _stage(trace, "rerank")
    assert record["status"] == "skipped" and "waiting for the model, which other queries held" in record["error"]
    assert took < 5.0  # it gave up at the deadline, not when the lock came free
