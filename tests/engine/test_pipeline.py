"""End to end on a real bm25s index: search, trace content, replay, error policies, bad input."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import QueryError, SieveError, SieveIndexError, StageError, TraceError
from engine.index import Index, build_index
from engine.pipeline import Pipeline
from engine.replay import replay_trace
from engine.trace import TraceLog
from tests.conftest import FAILS_AT_RUN_TIME

QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine."


def pipeline_yaml(index: Path, *, k: int = 5, top_k: int = 100, extra: str = "", bm25_extra: str = "") -> str:
    return f"""\
version: 1
index: {index}
stages:
  - id: bm25
    type: recall.bm25
    params: {{top_k: {top_k}{bm25_extra}}}
  - id: final
    type: select.top_k
    inputs: [bm25]
    params: {{k: {k}}}
output: final
trace: {{log: null}}
{extra}"""


@pytest.fixture
def pipeline(bm25_index, write_config) -> Pipeline:
    return Pipeline.from_file(write_config(pipeline_yaml(bm25_index)))


def test_search_returns_ranked_results_with_a_full_trace(pipeline):
    result = pipeline.search(QUERY)
    assert len(result.results) == 5
    scores = [c.score for c in result.results]
    assert scores == sorted(scores, reverse=True)
    trace = result.trace
    assert trace["schema"] == "sieve.trace/1"
    assert trace["config"]["sha256"] == pipeline.compiled.config_sha256
    assert trace["index"]["manifest_sha256"] == pipeline.resources.index.manifest_sha256
    assert trace["query"]["text"] == QUERY and trace["query"]["as_of"]
    bm25, final = trace["stages"]
    assert bm25["type"] == "recall.bm25@1" and bm25["status"] == "ok" and bm25["duration_ms"] >= 0
    assert len(bm25["output"]) == 100 and "bm25_scoring" in bm25["timings_ms"]
    assert "homocystein" in bm25["details"]["terms"]
    assert [d["reason"] for d in final["drops"]] == ["beyond_top_k"] * 95
    top = trace["results"][0]
    assert top["ledger"][0]["stage"] == "bm25"
    explanation = top["explanation"]["details"][0]
    assert "BM25 (lucene, k1=1.5, b=0.75)" in explanation["description"]
    term_sum = sum(d["value"] for d in explanation["details"])
    assert term_sum == pytest.approx(top["score"], rel=1e-5)


def test_runs_are_deterministic_and_replay_identically(pipeline, tmp_path):
    as_of = datetime(2026, 1, 1, tzinfo=timezone.utc)
    first = pipeline.search(QUERY, as_of=as_of)
    second = pipeline.search(QUERY, as_of=as_of)
    assert [(c.doc_id, c.score) for c in first.results] == [(c.doc_id, c.score) for c in second.results]
    # through a file, as an auditor would
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(first.trace))
    report = replay_trace(json.loads(path.read_text()))
    assert report["identical"] and report["compared"] == 5 and report["differences"] == []


def test_replay_detects_a_different_ranking(pipeline):
    trace = pipeline.search(QUERY).trace
    trace["results"][0], trace["results"][1] = trace["results"][1], trace["results"][0]
    report = replay_trace(trace)
    assert not report["identical"] and "rank 1" in report["differences"][0]


def test_replay_detects_a_rebuilt_index(bm25_index, write_config, tmp_path):
    index = tmp_path / "copy"
    shutil.copytree(bm25_index, index)
    trace = Pipeline.from_file(write_config(pipeline_yaml(index))).search(QUERY).trace
    build_index(Path(__file__).resolve().parents[2] / "examples" / "scifact-mini", index, {"bm25": {"k1": 1.2}})
    report = replay_trace(trace)
    assert not report["identical"]
    assert any("index manifest differs" in d for d in report["differences"])


def test_query_text_can_be_kept_out_of_the_trace(bm25_index, write_config):
    config = pipeline_yaml(bm25_index).replace("trace: {log: null}", "trace: {log: null, include_query_text: false}")
    trace = Pipeline.from_file(write_config(config)).search(QUERY).trace
    text = json.dumps(trace)
    assert QUERY not in text and "homocystein" not in text
    with pytest.raises(TraceError, match="pass the original text with --query"):
        replay_trace(trace)
    with pytest.raises(TraceError, match="does not match the sha256"):
        replay_trace(trace, query_text="something else")
    assert replay_trace(trace, query_text=QUERY)["identical"]


def test_bad_queries_are_rejected(pipeline):
    with pytest.raises(QueryError, match="query is empty"):
        pipeline.search("  \n ")
    with pytest.raises(QueryError, match="the limit is 4096"):
        pipeline.search("vitamin " * 1000)


def test_edge_cases_are_decided_and_recorded(bm25_index, write_config):
    big_k = Pipeline.from_file(write_config(pipeline_yaml(bm25_index, top_k=100_000, k=10)))
    trace = big_k.search(QUERY).trace
    codes = [d["code"] for d in trace["stages"][0]["decisions"]]
    assert codes[0] == "k_clamped" and "fewer_matches" in codes
    nothing = big_k.search("zzzzqqq xxyyzz").trace
    assert nothing["results"] == []
    assert nothing["stages"][0]["decisions"][-1]["code"] == "no_matching_terms"
    assert nothing["stages"][0]["decisions"][-1]["detail"].startswith("no query term occurs in the index")
    stopwords_only = big_k.search("the of and").trace
    assert stopwords_only["results"] == []
    # not "no query term occurs in the index" (these words are in every document): no word of it is a term
    said = stopwords_only["stages"][0]["decisions"][-1]["detail"]
    assert said.startswith("the index's tokenizer keeps no word of the query (stop words"), said


def test_on_error_skip_marks_the_trace_degraded(bm25_index, write_config):
    config = pipeline_yaml(bm25_index, bm25_extra=", component: nope").replace(
        "    params: {top_k: 100, component: nope}", "    params: {top_k: 100, component: nope}\n    on_error: skip"
    )
    result = Pipeline.from_file(write_config(config)).search(QUERY)
    assert result.degraded and result.trace["degraded"]
    stage = result.trace["stages"][0]
    assert stage["status"] == "skipped" and "'nope' component" in stage["error"]
    failing = Pipeline.from_file(write_config(pipeline_yaml(bm25_index, bm25_extra=", component: nope"), "f.yaml"))
    with pytest.raises(SieveIndexError, match="needs the 'nope' component"):
        failing.search(QUERY)


def test_a_stage_failing_at_run_time_is_named_once(bm25_index, write_config):
    """z-scores are negative for half the list, and multiplying a decay into them is refused at run time."""
    failing = Pipeline.from_file(write_config(FAILS_AT_RUN_TIME.format(index=bm25_index, extra="") + "trace: {log: null}\n"))
    with pytest.raises(StageError) as caught:
        failing.search(QUERY)
    message = str(caught.value)
    assert message.startswith("stage 'recent' (boost.recency@1) failed: combine: multiply needs non-negative scores")
    assert message.count("failed:") == 1
    skipping = Pipeline.from_file(write_config(FAILS_AT_RUN_TIME.format(index=bm25_index, extra="\n    on_error: skip") + "trace: {log: null}\n",
                                               "skip.yaml"))
    result = skipping.search(QUERY)
    stage = next(s for s in result.trace["stages"] if s["id"] == "recent")
    assert result.degraded and stage["status"] == "skipped"
    assert stage["error"].startswith("combine: multiply needs non-negative scores")


def test_trace_log_is_appended(pipeline, tmp_path):
    result = pipeline.search(QUERY)
    log_path = pipeline.log_trace(result.trace, tmp_path / "log.jsonl")
    assert TraceLog(log_path).find()["trace_id"] == result.trace["trace_id"]


def test_missing_and_corrupt_indexes_are_reported(bm25_index, tmp_path, write_config):
    with pytest.raises(SieveIndexError, match="no index at"):
        Pipeline.from_file(write_config(pipeline_yaml(tmp_path / "nowhere"))).search(QUERY)
    broken = tmp_path / "broken"
    shutil.copytree(bm25_index, broken)
    data = next((broken / "bm25").glob("data.csc.index.npy"))
    data.write_bytes(data.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(SieveIndexError, match="is corrupt: bm25/data.csc.index.npy does not match"):
        Index.open(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(SieveIndexError, match="manifest.json is corrupt"):
        Index.open(broken)


def test_failed_build_leaves_the_old_index_intact(bm25_index, tmp_path):
    target = tmp_path / "idx"
    shutil.copytree(bm25_index, target)
    before = (target / "manifest.json").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "1", "text": "fine"}\n{"_id": "2", "text": 5}\nnot json\n')
    with pytest.raises(SieveError) as caught:
        build_index(bad, target, {"bm25": {}})
    assert f"{bad}:2: 'text' must be a string" in str(caught.value)
    assert f"{bad}:3: not a JSON object" in str(caught.value)
    assert (target / "manifest.json").read_bytes() == before
    Index.open(target)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cli_search_json_and_replay(bm25_index, write_config, tmp_path):
    config = write_config(pipeline_yaml(bm25_index))
    trace_file = tmp_path / "t.json"
    runner = CliRunner()
    result = runner.invoke(app, ["search", str(config), QUERY, "--json", "--no-log", "--trace-out", str(trace_file)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert len(payload["results"]) == 5
    replayed = runner.invoke(app, ["replay", str(trace_file)])
    assert replayed.exit_code == 0 and "identical" in replayed.output
    shown = runner.invoke(app, ["search", str(config), QUERY, "--explain", "--no-log"])
    assert shown.exit_code == 0 and "term 'homocystein'" in shown.output


def test_cli_bad_input_is_a_message_not_a_traceback(bm25_index, write_config):
    import subprocess
    import sys

    sieve = Path(sys.executable).with_name("sieve")
    config = write_config(pipeline_yaml(bm25_index))
    empty = subprocess.run([str(sieve), "search", str(config), " "], capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "query is empty" in empty.stderr and "Traceback" not in empty.stderr
    missing = subprocess.run([str(sieve), "index", "/nonexistent/corpus.jsonl", "--out", "/tmp/x"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "corpus not found" in missing.stderr


def test_a_log_that_cannot_be_appended_is_a_trace_error(pipeline, tmp_path):
    result = pipeline.search(QUERY)
    with pytest.raises(TraceError, match=f"cannot append to the trace log {tmp_path}: Is a directory"):
        pipeline.log_trace(result.trace, tmp_path)
    with pytest.raises(TraceError, match="cannot append to the trace log"):
        pipeline.log_trace(result.trace, Path(f"{tmp_path}/x\0.jsonl"))


def _access_pipeline(tmp_path: Path, domain: str, top_k: int, more_stages: str = "") -> Path:
    """A config over examples/<domain> (a BM25 index built in tmp_path): that domain's access rules, masked BM25
    recall ('bm25'), then ``more_stages`` (YAML list items; the last one is the output)."""
    root = Path(__file__).resolve().parents[2]
    index = tmp_path / domain
    build_index(root / "examples" / domain, index, {"bm25": {}})
    config = tmp_path / f"{domain}.yaml"
    config.write_text(
        f"version: 1\nindex: {index}\nstages:\n"
        f"  - {{id: access, type: rules.prefilter, params: {{rules: {root / 'configs' / domain / 'access.yaml'}}}}}\n"
        f"  - {{id: bm25, type: recall.bm25, inputs: [access], params: {{top_k: {top_k}}}}}\n"
        f"{more_stages}trace: {{log: null}}\n",
        encoding="utf-8",
    )
    return config


@pytest.fixture
def careless_stage():
    """A stage written without the mask in mind: it adds a fixed document to whatever it is given (a third-party
    stage, or a bug). Registered for one test only."""
    from engine import registry
    from engine.model import Candidate, ScoreEntry
    from engine.stage import Port, Stage, StageParams, StageResult

    class AddParams(StageParams):
        doc_id: str

    class AddsADocument(Stage):
        type_name = "test.adds_a_document"
        version = 1
        Params = AddParams
        produces = Port.CANDIDATES
        accepts = frozenset({Port.CANDIDATES})
        summary = "test only: appends params.doc_id, ignoring the mask"

        def run(self, ctx):
            (incoming,) = ctx.inputs
            row = ctx.resources.index.row_of(self.params.doc_id)
            added = Candidate(self.params.doc_id, row, (ScoreEntry(self.id, "added", 0.0, len(incoming) + 1),))
            return StageResult(candidates=[*incoming, added])

    registry.register_stage(AddsADocument)
    yield AddsADocument.type_name
    registry._stages.pop(AddsADocument.type_name)


def test_no_stage_hands_on_a_document_the_access_rules_deny(careless_stage, tmp_path):
    """The engine filters every stage's output by the mask it received: a denied document never reaches the
    results (nor a later stage's input), and the trace says which stage produced it and which rules deny it."""
    pipeline = Pipeline.from_file(_access_pipeline(tmp_path, "medical", 5, f"""\
  - {{id: careless, type: {careless_stage}, inputs: [bm25], params: {{doc_id: med-007}}}}
  - {{id: final, type: select.top_k, inputs: [careless], params: {{k: 10}}}}
"""))
    from engine.model import UserContext

    clinician = UserContext(roles=("clinician",), jurisdictions=("US",))
    allowed = pipeline.search("metformin trial protocol", user=clinician, as_of=datetime(2025, 6, 1, tzinfo=timezone.utc))
    assert "med-007" not in [c.doc_id for c in allowed.results]  # the monitoring board's only: the clinician may not see it
    careless = next(s for s in allowed.trace["stages"] if s["id"] == "careless")
    assert {"doc_id": "med-007", "reason": "access_mask",
            "detail": "denied by the access rules of access; removed by the engine"} in careless["drops"]
    assert "med-007" not in [doc_id for doc_id, _ in careless["output"]]
    monitor = UserContext(roles=("clinician",), groups=("trial-dsmb",), jurisdictions=("US",))
    seen = pipeline.search("metformin trial protocol", user=monitor, as_of=datetime(2025, 6, 1, tzinfo=timezone.utc))
    assert "med-007" in [c.doc_id for c in seen.results]  # where the rules allow it, it stays


def test_the_cli_passes_user_attributes_that_access_rules_read(tmp_path):
    """The finance rules let wall-crossed staff see restricted issuers (user.attributes.wall_crossed): the CLI could
    not say so (an audit found no way to pass attributes but HTTP)."""
    config = _access_pipeline(tmp_path, "finance", 10)
    runner = CliRunner()
    base = ["search", str(config), "Acme Robotics earnings", "--group", "research", "--as-of", "2025-06-01", "--json"]

    def returned(*extra: str) -> list[str]:
        outcome = runner.invoke(app, [*base, *extra])
        assert outcome.exit_code == 0, outcome.output
        return [r["doc_id"] for r in json.loads(outcome.output)["results"]]

    assert "fin-008" not in returned()  # restricted issuer
    assert "fin-008" in returned("--attribute", "wall_crossed=yes")
    bad = runner.invoke(app, [*base, "--attribute", "wall_crossed"])
    assert isinstance(bad.exception, SieveError)  # the console entry point prints it and exits 2
    assert str(bad.exception) == "--attribute takes NAME=VALUE (e.g. wall_crossed=yes), got 'wall_crossed'"


@pytest.fixture
def busy_stage():
    """A stage during whose run 100 other queries go through the same pipeline (as on a busy server, while one
    query waits on a slow stage). Registered for one test only."""
    from engine import registry
    from engine.stage import Stage, StageParams, StageResult

    class Busy(Stage):
        type_name = "test.busy"
        version = 1
        Params = StageParams
        summary = "test only: runs 100 other queries through its pipeline, then passes its input on"
        pipeline: Pipeline | None = None

        def run(self, ctx):
            if Busy.pipeline is not None and ctx.query.text.endswith("slow"):
                for i in range(100):
                    Busy.pipeline.search(f"vitamin dose {i}")
            (incoming,) = ctx.inputs
            return StageResult(candidates=list(incoming))

    registry.register_stage(Busy)
    yield Busy
    registry._stages.pop(Busy.type_name)


def test_explanations_keep_their_detail_however_many_queries_pass_meanwhile(busy_stage, bm25_index, write_config):
    """Stages note what explain() needs in a store of the 64 most recent queries, and explanations are built when
    the run ends: 64 queries passing a stage meanwhile evicted a slow query's notes, its fusion explanation lost
    its parts and its trace replayed as different. The notes now live as long as the run."""
    config = write_config(f"""\
version: 1
index: {bm25_index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 10}}}}
  - {{id: bm25b, type: recall.bm25, params: {{top_k: 5}}}}
  - {{id: hybrid, type: fuse.rrf, inputs: [bm25, bm25b], params: {{k: 60, top_k: 10}}}}
  - {{id: busy, type: {busy_stage.type_name}, inputs: [hybrid]}}
  - {{id: final, type: select.top_k, inputs: [busy], params: {{k: 3}}}}
output: final
trace: {{log: null}}
""")
    pipeline = Pipeline.from_file(config)
    quiet = pipeline.search("vitamin B12 homocysteine slow").trace
    busy_stage.pipeline = pipeline
    busy = pipeline.search("vitamin B12 homocysteine slow").trace
    fusion = busy["results"][0]["explanation"]["details"][-1]
    assert len(fusion["details"]) == 2, fusion  # one part per input: it had none
    assert [r["explanation"] for r in busy["results"]] == [r["explanation"] for r in quiet["results"]]
    busy_stage.pipeline = None
    assert replay_trace(busy)["identical"]


def test_search_logs_its_trace_unless_told_not_to(bm25_index, write_config, tmp_path):
    """Pipeline.search wrote no audit record (the caller had to know of log_trace); it now appends the trace to
    the config's log before returning, and says where (trace['log'])."""
    log = tmp_path / "audit.jsonl"
    pipeline = Pipeline.from_file(write_config(pipeline_yaml(bm25_index).replace("trace: {log: null}",
                                                                                    f"trace: {{log: {log}}}")))
    logged = pipeline.search(QUERY)
    assert logged.trace["log"]["seq"] == 0 and logged.trace["log"]["path"] == str(log)
    unlogged = pipeline.search(QUERY, log=False)
    assert "log" not in unlogged.trace
    assert [json.loads(line)["trace"]["trace_id"] for line in log.read_text().splitlines()] == [logged.trace["trace_id"]]


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"history": "Is it safe?"}, "history must be a list of the earlier turns (strings), not a str"),
    ({"user": {"roles": "clinician"}}, "user: roles: "),
    ({"user": {"role": ["clinician"]}}, "user: role: Extra inputs are not permitted"),
    ({"user": ["clinician"]}, "user must be a UserContext or a mapping of its fields, not a list"),
    ({"as_of": "yesterday"}, "as_of must be a datetime"),
    ({"as_of": 1700000000}, "as_of must be a datetime"),
    ({"language": "xx-not-a-tag!"}, "language must be a language tag such as en or zh-CN"),
    ({"language": 5}, "language must be a language tag"),
])
def test_bad_arguments_to_the_python_api_are_query_errors(pipeline, kwargs, says):
    """From the library audit: a string history became one turn per character, a bad user, as_of or language
    raised pydantic's ValidationError (or passed: a number as Unix seconds, any language string)."""
    with pytest.raises(QueryError) as raised:
        pipeline.search(QUERY, **kwargs)
    assert says in str(raised.value)


def test_a_user_given_as_a_mapping_is_a_user(pipeline):
    result = pipeline.search(QUERY, user={"roles": ["clinician"], "jurisdictions": ["US"]}, language="en")
    assert result.trace["query"]["user"]["roles"] == ["clinician"]
