"""`sieve batch`: a file of queries through one pipeline, offline, resumably.

Real pipelines on the SciFact-slice BM25 index, real files. Bad input is reported whole before anything runs and
leaves nothing behind; a failing query is an error line and the batch goes on; an interrupted batch leaves a
partial file that `--resume` completes into what an uninterrupted run writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import SieveError
from engine.index import manifest_sha256_of
from engine.model import UserContext
from engine.pipeline import Pipeline
from engine.workbench import batch
from tests.conftest import FAILS_AT_RUN_TIME, MINI
from tests.workbench.conftest import run_sieve

BEIR_QUERIES = MINI / "queries.jsonl"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _without_trace_ids(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "trace_id"} for line in lines]


def _beir_ids() -> list[str]:
    return [json.loads(line)["_id"] for line in BEIR_QUERIES.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_queries(path: Path, records: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_a_beir_queries_file_runs_whole_in_order_each_trace_logged(cli, mini_config, tmp_path):
    from engine.trace import check_log

    config = mini_config(k=10)
    out, log = tmp_path / "results.jsonl", tmp_path / "traces.jsonl"
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--log", log, "--as-of", "2025-06-01", "--json")
    assert done.exit_code == 0, (done.output, done.exception)
    summary = json.loads(done.stdout)
    ids = _beir_ids()
    assert summary["queries"] == summary["run"] == len(ids) == 50 and summary["resumed"] == summary["failed"] == 0
    assert summary["complete"] and summary["output"] == str(out) and summary["trace_log"] == str(log.absolute())
    assert summary["asked_as"]["as_of"] == "2025-06-01T00:00:00+00:00"
    assert set(summary["latency_ms"]) == {"p50", "p95", "mean", "count"} and summary["latency_ms"]["count"] == 50
    lines = _lines(out)
    assert [line["id"] for line in lines] == ids  # input order
    assert all(set(line) == {"id", "trace_id", "results", "degraded"} for line in lines)
    assert not (tmp_path / "results.jsonl.partial").exists() and not (tmp_path / "results.jsonl.partial.meta.json").exists()
    # one trace per query, in the same order, each line naming its record
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [r["trace"]["trace_id"] for r in records] == [line["trace_id"] for line in lines]
    assert not check_log(log).problems
    # the same results `Pipeline.search` gives the query, asked at the same time
    first = json.loads(BEIR_QUERIES.read_text(encoding="utf-8").splitlines()[0])
    expected = Pipeline.from_file(config).search(first["text"], log=False,
                                                 as_of=datetime(2025, 6, 1, tzinfo=timezone.utc))
    assert lines[0]["results"] == [{"rank": rank, "doc_id": c.doc_id, "score": c.score}
                                   for rank, c in enumerate(expected.results, start=1)]
    assert len(lines[0]["results"]) == 10 and records[0]["trace"]["query"]["as_of"] == "2025-06-01T00:00:00+00:00"


def test_each_line_may_give_its_history_user_time_and_language_and_defaults_fill_the_rest(cli, mini_config, tmp_path):
    queries = _write_queries(tmp_path / "q.jsonl", [
        {"id": "a", "text": "vitamin B12 homocysteine", "as_of": "2024-01-02T03:04:05Z", "language": "en",
         "user": {"groups": ["research"], "attributes": {"desk": "x"}}, "history": ["an earlier turn"]},
        "",  # blank lines are skipped
        {"id": 7, "text": "birth weight perinatal mortality"},
    ])
    out, log = tmp_path / "r.jsonl", tmp_path / "t.jsonl"
    done = cli("batch", mini_config(), queries, "--out", out, "--log", log, "--group", "default-group",
               "--as-of", "2025-06-01T00:00:00+00:00")
    assert done.exit_code == 0, (done.output, done.exception)
    assert "1 queries give a history, but this pipeline has no query-rewriting stage" in " ".join(done.stderr.split())
    assert [line["id"] for line in _lines(out)] == ["a", "7"]
    first, second = (json.loads(line)["trace"]["query"] for line in log.read_text(encoding="utf-8").splitlines())
    assert first["as_of"] == "2024-01-02T03:04:05+00:00" and first["user"]["groups"] == ["research"]
    assert first["language"] == "en" and first["history"] == ["an earlier turn"]
    assert second["as_of"] == "2025-06-01T00:00:00+00:00" and second["user"]["groups"] == ["default-group"]


def test_every_problem_of_the_file_is_reported_at_once_and_nothing_runs_or_is_written(mini_config, tmp_path):
    (tmp_path / "long.yaml").write_text(mini_config().read_text(encoding="utf-8")
                                        + "limits: {max_query_chars: 40}\n", encoding="utf-8")
    queries = _write_queries(tmp_path / "bad.jsonl", [
        {"id": "q1", "text": "vitamin"},
        "{not json",
        "[1, 2]",
        {"id": "q1", "text": "again"},
        {"id": "q3", "txt": "typo"},
        {"id": "q4", "text": "   "},
        {"id": "q5", "text": "x" * 41},
        {"id": "q6", "text": "fine", "as_of": "yesterday", "user": {"role": ["a"]}},
        {"_id": "q7", "text": "beir", "metadata": {"kept": "out"}},
    ])
    out = tmp_path / "r.jsonl"
    done = run_sieve("batch", tmp_path / "long.yaml", queries, "--out", out, "--log", tmp_path / "t.jsonl",
                     cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    text = " ".join(done.stderr.split())
    assert "9 problems in the queries file" in text and "no query was run" in text
    for expected in [
        f"{queries}:2: not JSON",
        f"{queries}:3: expected a JSON object with id and text, got an array",
        f"{queries}:4: id 'q1' appears a second time (first at {queries}:1)",
        f"{queries}:5: unknown key 'txt' (did you mean 'text'?)",
        f"{queries}:5: no text",
        f"{queries}:6: query is empty: give some text to search for",  # the very message `sieve search` gives
        f"{queries}:7: query is 41 characters long; the limit is 40",
        f"{queries}:8: as_of 'yesterday': not an ISO 8601 date or date-time (e.g. 2026-01-31",
        f"{queries}:8: user: unknown key 'role' (did you mean 'roles'?)",
    ]:
        assert expected in text, expected
    assert f"{queries}:9" not in text  # a BEIR line, metadata and all, is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "long.yaml", "pipeline.yaml"]


def test_an_empty_queries_file_is_an_error(cli, mini_config, tmp_path):
    queries = _write_queries(tmp_path / "q.jsonl", ["", "  "])
    done = cli("batch", mini_config(), queries, "--out", tmp_path / "r.jsonl")
    assert isinstance(done.exception, SieveError) and "holds no queries" in str(done.exception)
    assert not (tmp_path / "r.jsonl.partial").exists()


def test_a_failing_query_gets_an_error_line_and_the_batch_goes_on(bm25_index, write_config, tmp_path):
    config = write_config(FAILS_AT_RUN_TIME.format(index=bm25_index, extra="") + "trace: {log: null}\n")
    queries = _write_queries(tmp_path / "q.jsonl", [
        {"id": "fails", "text": "vitamin B12 homocysteine"},  # z-scores below 0 into a multiplied decay: refused
        {"id": "runs", "text": "qqqzzzxxyy"},  # recalls nothing, so nothing to refuse
    ])
    out = tmp_path / "r.jsonl"
    done = run_sieve("batch", config, queries, "--out", out, "--json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "1 of 2 queries failed" in " ".join(done.stderr.split())
    summary = json.loads(done.stdout)
    assert summary["failed"] == 1 and summary["empty"] == 1 and summary["run"] == 2 and summary["complete"]
    assert summary["failures"][0]["id"] == "fails" and summary["failures"][0]["line"] == 1
    failed, ran = _lines(out)
    assert failed["id"] == "fails" and failed["results"] == [] and failed["trace_id"] is None
    assert failed["error"].startswith("stage 'recent' (boost.recency@1) failed: combine: multiply needs")
    assert ran == {"id": "runs", "trace_id": ran["trace_id"], "results": [], "degraded": False}


def test_top_keeps_each_querys_first_n(cli, mini_config, tmp_path):
    config = mini_config(k=10)
    done = cli("batch", config, BEIR_QUERIES, "--out", tmp_path / "all.jsonl", "--no-log", "--as-of", "2025-06-01")
    top = cli("batch", config, BEIR_QUERIES, "--out", tmp_path / "top.jsonl", "--no-log", "--as-of", "2025-06-01",
              "--top", "3")
    assert done.exit_code == 0 and top.exit_code == 0, (done.output, top.output)
    every, first = _lines(tmp_path / "all.jsonl"), _lines(tmp_path / "top.jsonl")
    assert any(len(line["results"]) > 3 for line in every)
    assert [line["results"] for line in first] == [line["results"][:3] for line in every]


def test_two_workers_write_the_same_lines_as_one(cli, mini_config, tmp_path):
    config = mini_config()
    for workers in ("1", "2"):
        done = cli("batch", config, BEIR_QUERIES, "--out", tmp_path / f"w{workers}.jsonl", "--no-log",
                   "--as-of", "2025-06-01", "--workers", workers)
        assert done.exit_code == 0, (done.output, done.exception)
    one, two = _lines(tmp_path / "w1.jsonl"), _lines(tmp_path / "w2.jsonl")
    assert len(one) == 50 and _without_trace_ids(one) == _without_trace_ids(two)


def test_an_existing_output_or_an_interrupted_batch_is_never_overwritten_unasked(cli, mini_config, tmp_path):
    config = mini_config()
    out = tmp_path / "r.jsonl"
    out.write_text("my earlier results\n", encoding="utf-8")
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log")
    assert isinstance(done.exception, SieveError) and "exists" in str(done.exception)
    assert "--overwrite" in str(done.exception) and out.read_text(encoding="utf-8") == "my earlier results\n"
    (tmp_path / "r.jsonl.partial").write_text("", encoding="utf-8")
    (tmp_path / "r.jsonl.partial.meta.json").write_text("{}", encoding="utf-8")
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--overwrite")
    assert done.exit_code == 0, (done.output, done.exception)  # --overwrite replaces both
    assert len(_lines(out)) == 50 and not (tmp_path / "r.jsonl.partial").exists()
    # the queries file is never the output
    done = cli("batch", config, out, "--out", out, "--no-log", "--overwrite")
    assert isinstance(done.exception, SieveError) and "would write over the queries file" in str(done.exception)


def test_a_batch_stopped_before_its_first_line_is_started_again(cli, mini_config, tmp_path):
    """Crash audit L2: SIGTERM (or SIGKILL) in a batch's warm-up leaves its empty partial file and its sidecar; that
    is nothing to resume and nothing to lose (before: "was interrupted", refused without --resume/--overwrite)."""
    config = mini_config()
    out = tmp_path / "r.jsonl"
    (tmp_path / "r.jsonl.partial").write_text("", encoding="utf-8")
    (tmp_path / "r.jsonl.partial.meta.json").write_text('{"as_of": "2020-01-01T00:00:00+00:00"}', encoding="utf-8")
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--as-of", "2025-06-01")
    assert done.exit_code == 0, (done.output, done.exception)
    assert len(_lines(out)) == 50 and not (tmp_path / "r.jsonl.partial.meta.json").exists()
    out.unlink()
    (tmp_path / "r.jsonl.partial").write_text("", encoding="utf-8")
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--as-of", "2025-06-01", "--resume")
    assert done.exit_code == 0 and "no interrupted batch to resume" in done.output and "holds no line" in done.output


# A stage that sleeps BATCH_TEST_SLEEP_MS (from the environment, so that the config, and its sha256, is the same
# whatever the pace): a batch in a subprocess is slow enough to be stopped part-way.
SLOW_SIEVE = """\
import os, sys, time
from engine import registry
from engine.stage import Stage, StageParams, StageResult

class Params(StageParams):
    pass

class Sleep(Stage):
    type_name = "test.sleep_env"
    version = 1
    Params = Params
    summary = "test only: sleeps BATCH_TEST_SLEEP_MS, then passes its input on"

    def run(self, ctx):
        time.sleep(int(os.environ.get("BATCH_TEST_SLEEP_MS", "0")) / 1000.0)
        (incoming,) = ctx.inputs
        return StageResult(candidates=list(incoming))

registry.register_stage(Sleep)
from engine.cli import main
sys.argv[0] = "sieve"
main()
"""


def _slow_config(tmp_path: Path, index: Path) -> Path:
    config = tmp_path / "slow.yaml"
    config.write_text(f"""version: 1
index: {index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: slow, type: test.sleep_env, inputs: [bm25]}}
output: slow
trace: {{log: null}}
""", encoding="utf-8")
    return config


def _sieve(tmp_path: Path, *args: object, sleep_ms: int = 0, **kwargs):  # type: ignore[no-untyped-def]
    script = tmp_path / "slow_sieve.py"
    script.write_text(SLOW_SIEVE, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "BATCH_TEST_SLEEP_MS": str(sleep_ms)}
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_an_interrupted_batch_resumes_into_what_an_uninterrupted_run_writes(bm25_index, tmp_path):
    config = _slow_config(tmp_path, bm25_index)
    common = ("batch", config, BEIR_QUERIES, "--as-of", "2025-06-01", "--top", "5")
    whole = _sieve(tmp_path, *common, "--out", tmp_path / "whole.jsonl", "--log", tmp_path / "whole-log.jsonl")
    out, log = tmp_path / "r.jsonl", tmp_path / "log.jsonl"
    partial = tmp_path / "r.jsonl.partial"
    stopped = _sieve(tmp_path, *common, "--out", out, "--log", log, sleep_ms=100)
    deadline = time.monotonic() + 60
    while _count_lines(partial) < 4 and stopped.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    stopped.send_signal(signal.SIGTERM)
    _, stderr = stopped.communicate(timeout=60)
    assert whole.wait(timeout=60) == 0, whole.stderr.read() if whole.stderr else ""
    assert stopped.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr and not out.exists()
    kept = _lines(partial)
    assert 4 <= len(kept) < 50 and [line["id"] for line in kept] == _beir_ids()[:len(kept)]
    assert len(log.read_text(encoding="utf-8").splitlines()) == len(kept)  # each line's trace, no other
    meta = json.loads((tmp_path / "r.jsonl.partial.meta.json").read_text(encoding="utf-8"))
    assert meta["top"] == 5 and meta["as_of"] == "2025-06-01T00:00:00+00:00" and meta["queries"]["count"] == 50
    # a writer killed mid-line leaves a torn last line: it is dropped and that query runs again
    with open(partial, "ab") as handle:
        handle.write(b'{"id":"torn","trace_id":"ab')
    # without --resume: refused, saying how to go on
    refused = _sieve(tmp_path, *common, "--out", out, "--log", log)
    _, stderr = refused.communicate(timeout=60)
    assert refused.returncode == 2 and "was interrupted" in stderr and "--resume" in stderr and "--overwrite" in stderr
    resumed = _sieve(tmp_path, *common, "--out", out, "--log", log, "--resume", "--json")
    stdout, stderr = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["resumed"] == len(kept) and summary["run"] == 50 - len(kept) and summary["complete"]
    assert summary["asked_as"]["as_of"] == "2025-06-01T00:00:00+00:00"
    assert not partial.exists() and not (tmp_path / "r.jsonl.partial.meta.json").exists()
    final = _lines(out)
    assert _without_trace_ids(final) == _without_trace_ids(_lines(tmp_path / "whole.jsonl"))
    logged = [json.loads(line)["trace"]["trace_id"] for line in log.read_text(encoding="utf-8").splitlines()]
    assert logged == [line["trace_id"] for line in final]  # one trace per query, the log in the file's order


def _stopped_batch(tmp_path: Path, config: Path, out: Path, lines_kept: int = 3) -> None:
    """A partial file and its sidecar as a stopped batch leaves them: its first lines, from a whole run."""
    whole = tmp_path / "whole.jsonl"
    done = CliRunner().invoke(app, ["batch", str(config), str(BEIR_QUERIES), "--out", str(whole), "--no-log",
                                    "--as-of", "2025-06-01"])
    assert done.exit_code == 0, done.output
    lines = whole.read_text(encoding="utf-8").splitlines(keepends=True)
    Path(f"{out}.partial").write_text("".join(lines[:lines_kept]), encoding="utf-8")
    pipeline = Pipeline.from_file(config)
    as_of = datetime(2025, 6, 1, tzinfo=timezone.utc)
    queries = batch.read_queries(BEIR_QUERIES, pipeline, UserContext(), as_of)
    identity = batch.batch_identity(queries, pipeline, manifest_sha256_of(pipeline.index_path), UserContext(), as_of,
                                    None)
    Path(f"{out}.partial.meta.json").write_text(json.dumps(identity), encoding="utf-8")


def test_resume_refuses_a_batch_whose_config_or_settings_changed_saying_what_changed(cli, mini_config, tmp_path):
    config = mini_config()
    out = tmp_path / "r.jsonl"
    _stopped_batch(tmp_path, config, out)
    before = Pipeline.from_file(config).compiled.config_sha256
    after = Pipeline.from_file(config, settings=["stages.bm25.params.top_k=50"]).compiled.config_sha256
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--resume",
               "--set", "stages.bm25.params.top_k=50")
    assert isinstance(done.exception, SieveError), done.output
    message = str(done.exception)
    assert f"the config changed (as compiled, --set included): sha256 {before} when it started, {after} now" in message
    assert "--overwrite" in message
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--resume", "--top", "3", "--role", "x")
    message = str(done.exception)
    assert "--top changed: null when it started, 3 now" in message and "the default user" in message
    assert "config changed" not in message
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--resume", "--as-of", "2025-06-02")
    assert "the batch's as_of (--as-of) changed: 2025-06-01T00:00:00+00:00 when it started" in str(done.exception)
    assert len(Path(f"{out}.partial").read_text(encoding="utf-8").splitlines()) == 3  # nothing touched
    # as it started: resumes (its as_of kept without --as-of) and completes as a whole run does
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--resume", "--json")
    assert done.exit_code == 0, (done.output, done.exception)
    assert json.loads(done.stdout)["resumed"] == 3
    assert _without_trace_ids(_lines(out)) == _without_trace_ids(_lines(tmp_path / "whole.jsonl"))


def test_a_partial_file_another_batch_is_writing_is_left_alone(cli, mini_config, tmp_path):
    config = mini_config()
    out = tmp_path / "r.jsonl"
    _stopped_batch(tmp_path, config, out)
    with open(f"{out}.partial", "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--resume")
    assert isinstance(done.exception, SieveError) and "another sieve batch is writing" in str(done.exception)
    assert len(Path(f"{out}.partial").read_text(encoding="utf-8").splitlines()) == 3


@pytest.mark.parametrize("line, says", [
    ('{"id":"9999","trace_id":null,"results":[],"degraded":false}\n', "holds id '9999' where query"),
    ("garbage\n", "not a result line of sieve batch"),
])
def test_a_partial_file_changed_by_something_else_is_not_resumed(cli, mini_config, tmp_path, line, says):
    config = mini_config()
    out = tmp_path / "r.jsonl"
    _stopped_batch(tmp_path, config, out)
    with open(f"{out}.partial", "a", encoding="utf-8") as handle:
        handle.write(line)
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--resume")
    assert isinstance(done.exception, SieveError) and says in str(done.exception)
    assert f"{out}.partial:4" in str(done.exception)


def test_a_batch_stopped_after_its_last_line_is_only_renamed_on_resume(cli, mini_config, tmp_path):
    config = mini_config()
    out = tmp_path / "r.jsonl"
    _stopped_batch(tmp_path, config, out, lines_kept=50)
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--resume", "--json")
    assert done.exit_code == 0, (done.output, done.exception)
    summary = json.loads(done.stdout)
    assert summary["resumed"] == 50 and summary["run"] == 0 and summary["complete"]
    assert out.read_text(encoding="utf-8") == (tmp_path / "whole.jsonl").read_text(encoding="utf-8")


def test_a_file_of_many_bad_lines_lists_the_first_hundred_problems_and_counts_the_rest(cli, mini_config, tmp_path):
    queries = _write_queries(tmp_path / "q.jsonl", [{"id": f"q{i}"} for i in range(150)])
    done = cli("batch", mini_config(), queries, "--out", tmp_path / "r.jsonl")
    message = str(done.exception)
    assert isinstance(done.exception, SieveError) and message.startswith("150 problems in the queries file")
    assert f"{queries}:100: no text" in message and f"{queries}:101:" not in message
    assert message.endswith("... and 50 more")
