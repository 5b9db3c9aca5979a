"""`sieve batch` and what happens around it: its trace log or output directory removed mid-run, a resume that would
split the batch over two logs (or go on in a log that no longer holds its traces), a key given twice on a query line,
a second batch started while one runs, a queries file that is a pipe, the config's trace.log checked up front.

Real batches (in a subprocess where one must be stopped or have files removed under it) on the SciFact-slice BM25
index, real files, real directories removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from engine import __version__
from engine.errors import SieveError
from engine.index import manifest_sha256_of
from engine.model import UserContext
from engine.pipeline import Pipeline
from engine.trace import TraceLog, check_log
from engine.workbench import batch
from tests.workbench.conftest import ROOT, run_sieve
from tests.workbench.test_batch import (BEIR_QUERIES, _count_lines, _lines, _sieve, _slow_config, _stopped_batch,
                                        _without_trace_ids, _write_queries)


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while _count_lines(path) < count and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _count_lines(path) >= count, process.communicate(timeout=60)


def _log_ids(path: Path) -> list[str]:
    return [r["trace"]["trace_id"] for r in TraceLog(path).records()]


# F2: the trace log's directory disappears mid-run


def test_a_log_directory_removed_mid_run_stops_the_batch_and_it_resumes_once_the_log_is_back(bm25_index, tmp_path):
    config = _slow_config(tmp_path, bm25_index)
    logs = tmp_path / "logs"
    log = logs / "t.jsonl"
    out = tmp_path / "r.jsonl"
    partial = tmp_path / "r.jsonl.partial"
    common = ("batch", config, BEIR_QUERIES, "--as-of", "2025-06-01", "--out", out, "--log", log)
    running = _sieve(tmp_path, *common, sleep_ms=100)
    _wait_for_lines(partial, 3, running)
    logs.rename(tmp_path / "logs.moved")  # the directory is gone (as rm -rf would leave it)
    _, stderr = running.communicate(timeout=60)
    text = " ".join(stderr.split())
    assert running.returncode == 2, stderr
    assert f"the trace log {log} was removed or replaced since record seq" in text
    assert f"its directory {logs} is gone" in text and "refusing to start a new chain" in text
    assert f"the results written so far are kept in {partial}" in text and "--resume" in text
    assert not logs.exists() and not out.exists()  # no new log begun; the batch is not complete
    kept = _lines(partial)
    assert 3 <= len(kept) < 50
    moved = tmp_path / "logs.moved" / "t.jsonl"
    assert _log_ids(moved) == [line["trace_id"] for line in kept]  # every line's trace is in the log, no other

    # resumed while the log is still gone: refused, its lines' traces are in no log there
    refused = _sieve(tmp_path, *common, "--resume")
    _, stderr = refused.communicate(timeout=60)
    text = " ".join(stderr.split())
    assert refused.returncode == 2, stderr
    assert f"cannot resume {partial}: its line for query {kept[-1]['id']!r} names the trace" in text
    assert f"which the trace log {log} does not hold (it does not exist)" in text
    assert not logs.exists()

    (tmp_path / "logs.moved").rename(logs)  # put back: the batch goes on in the same chain
    resumed = _sieve(tmp_path, *common, "--resume", "--json")
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert json.loads(stdout)["resumed"] == len(kept)
    final = _lines(out)
    assert _log_ids(log) == [line["trace_id"] for line in final] and check_log(log).problems == []


# F3: a resume must append to the log the batch started with


def test_resume_refuses_another_trace_log_or_none_and_resumes_with_the_same(cli, mini_config, tmp_path):
    config = mini_config()
    out, log = tmp_path / "r.jsonl", tmp_path / "a.jsonl"
    whole = cli("batch", config, BEIR_QUERIES, "--out", tmp_path / "whole.jsonl", "--log", log, "--as-of",
                "2025-06-01")
    assert whole.exit_code == 0, (whole.output, whole.exception)
    (tmp_path / "r.jsonl.partial").write_text("".join(
        (tmp_path / "whole.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    pipeline = Pipeline.from_file(config)
    as_of = datetime(2025, 6, 1, tzinfo=timezone.utc)
    queries = batch.read_queries(BEIR_QUERIES, pipeline, UserContext(), as_of)
    identity = batch.batch_identity(queries, pipeline, manifest_sha256_of(pipeline.index_path), UserContext(), as_of,
                                    None, log)
    assert identity["trace_log"] == os.path.realpath(log)
    (tmp_path / "r.jsonl.partial.meta.json").write_text(json.dumps(identity), encoding="utf-8")

    no_log = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--resume")
    message = " ".join(str(no_log.exception).split())
    assert isinstance(no_log.exception, SieveError), no_log.output
    assert (f"the trace log (--log, --no-log or the config's trace.log) changed: {os.path.realpath(log)} when it "
            "started, no log (--no-log, or a config whose trace.log is null) now") in message
    other = cli("batch", config, BEIR_QUERIES, "--out", out, "--log", tmp_path / "b.jsonl", "--resume")
    message = " ".join(str(other.exception).split())
    assert f"changed: {os.path.realpath(log)} when it started, {os.path.realpath(tmp_path / 'b.jsonl')} now" in message
    assert not (tmp_path / "b.jsonl").exists() and len(_lines(tmp_path / "r.jsonl.partial")) == 3
    # the same log, named through a symlink and a relative path: the same file, resumed
    (tmp_path / "link.jsonl").symlink_to(log)
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--log", tmp_path / "link.jsonl", "--resume", "--json")
    assert done.exit_code == 0, (done.output, done.exception)
    assert json.loads(done.stdout)["resumed"] == 3
    assert _without_trace_ids(_lines(out)) == _without_trace_ids(_lines(tmp_path / "whole.jsonl"))
    assert check_log(log).problems == []


def test_a_batch_another_engine_version_began_is_not_finished_by_this_one(cli, mini_config, tmp_path):
    """From an upgrade audit: 0.7.0 resumed a batch 0.6.0 began and the finished file was neither version's run
    (3 lines ranked by one, 7 by the other; the sidecar that said so removed at the end). A batch's lines come
    from one engine: another version's sidecar is refused, naming the version, as a changed config is; and an
    earlier engine's sidecar schema (sieve.batch/1, without the trace log) the same, however it was resumed."""
    config = mini_config()
    out = tmp_path / "r.jsonl"
    _stopped_batch(tmp_path, config, out)
    meta_path = tmp_path / "r.jsonl.partial.meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    assert meta["schema"] == "sieve.batch/2"
    meta_path.write_text(json.dumps({**meta, "engine_version": "0.6.9"}), encoding="utf-8")
    other = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--resume")
    message = " ".join(str(other.exception).split())
    assert isinstance(other.exception, SieveError), other.output
    assert (f"the engine changed (a batch's lines come from one engine): 0.6.9 when it started, {__version__} now"
            in message)
    earlier = {key: value for key, value in meta.items() if key != "trace_log"}
    meta_path.write_text(json.dumps({**earlier, "schema": "sieve.batch/1", "engine_version": "0.6.0"}),
                         encoding="utf-8")
    for options in (["--no-log"], []):
        refused = cli("batch", config, BEIR_QUERIES, "--out", out, "--resume", *options)
        message = " ".join(str(refused.exception).split())
        assert isinstance(refused.exception, SieveError), refused.output
        assert ("was begun by an earlier Sieve (Sieve 0.6.0; its sidecar is sieve.batch/1): a batch's lines come "
                "from one engine, so finish it with that version, or discard it with --overwrite") in message
    assert len(_lines(tmp_path / "r.jsonl.partial")) == 3 and not out.exists()  # nothing written, nothing lost
    meta_path.write_text(json.dumps(meta), encoding="utf-8")  # the version that began it finishes it
    done = cli("batch", config, BEIR_QUERIES, "--out", out, "--no-log", "--resume", "--json")
    assert done.exit_code == 0, (done.output, done.exception)
    assert json.loads(done.stdout)["resumed"] == 3


# F5: a key given twice on a query line


def test_a_key_given_twice_on_a_query_line_is_an_error_at_its_line(cli, mini_config, tmp_path):
    queries = _write_queries(tmp_path / "q.jsonl", [
        '{"id": "x", "text": "cancer", "text": "vitamin d"}',
        '{"id": "y", "text": "cancer", "id": "x"}',  # not "id 'x' appears a second time": which id is meant?
        '{"id": "z", "text": "cancer", "user": {"roles": ["a"], "roles": ["admin"]}}',
        '{"id": "w", "text": "cancer", "user": {"attributes": {"desk": "1", "desk": "2"}}}',
        '{"id": "v", "text": "cancer", "user": {"roles": ["a"]}, "user": {"roles": ["admin"]}}',
        '{"id": "u", "text": "fine"}',
    ])
    done = cli("batch", mini_config(), queries, "--out", tmp_path / "r.jsonl", "--no-log")
    assert isinstance(done.exception, SieveError), done.output
    message = str(done.exception)
    assert message.startswith("5 problems in the queries file")
    for expected in [f"{queries}:1: key 'text' given twice", f"{queries}:2: key 'id' given twice",
                     f"{queries}:3: key 'user.roles' given twice",
                     f"{queries}:4: key 'user.attributes.desk' given twice",
                     f"{queries}:5: key 'user' given twice"]:
        assert expected in message, message
    assert "appears a second time" not in message and f"{queries}:6" not in message
    assert not (tmp_path / "r.jsonl.partial").exists()


# F6: messages that point the right way


def test_a_batch_still_running_is_reported_as_running_not_interrupted(bm25_index, tmp_path):
    config = _slow_config(tmp_path, bm25_index)
    common = ("batch", config, BEIR_QUERIES, "--as-of", "2025-06-01", "--out", tmp_path / "r.jsonl", "--no-log")
    running = _sieve(tmp_path, *common, sleep_ms=500)  # 25 s for the file: it is still running when asked again
    try:
        _wait_for_lines(tmp_path / "r.jsonl.partial", 2, running)
        for extra in ((), ("--resume",), ("--overwrite",)):
            second = run_sieve(*common, *extra, cwd=tmp_path)
            text = " ".join(second.stderr.split())
            assert second.returncode == 2, second.stderr
            assert f"another sieve batch is writing {tmp_path / 'r.jsonl.partial'} (it holds its lock)" in text
            assert "was interrupted" not in text
    finally:
        running.send_signal(signal.SIGTERM)
        running.communicate(timeout=60)
    assert running.returncode == 143  # the running batch was not harmed: it stopped as asked, its lines whole
    assert all(line["id"] for line in _lines(tmp_path / "r.jsonl.partial"))


def test_a_queries_file_that_is_a_pipe_is_refused_up_front(mini_config, tmp_path):
    config = mini_config()
    text = BEIR_QUERIES.read_text(encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    piped = subprocess.run([sys.executable, "-m", "engine.cli", "batch", str(config), "/dev/stdin", "--out",
                            str(tmp_path / "p.jsonl"), "--no-log"], input=text, capture_output=True, text=True,
                           cwd=ROOT, env=env, timeout=120)
    message = " ".join(piped.stderr.split())
    assert piped.returncode == 2, piped.stderr
    assert "the queries file /dev/stdin is a pipe" in message and "it must be a regular file" in message
    assert "reads it twice" in message and "changed while the batch ran" not in message
    fifo = tmp_path / "queries.fifo"
    os.mkfifo(fifo)  # never opened: refused from its type (opening it would wait for a writer)
    named = run_sieve("batch", config, fifo, "--out", tmp_path / "f.jsonl", "--no-log", cwd=tmp_path)
    assert named.returncode == 2 and f"the queries file {fifo} is a pipe" in " ".join(named.stderr.split())
    assert not (tmp_path / "p.jsonl.partial").exists() and not (tmp_path / "f.jsonl.partial").exists()


def test_an_output_directory_removed_mid_run_is_said_and_nothing_is_claimed_kept(bm25_index, tmp_path):
    config = _slow_config(tmp_path, bm25_index)
    outdir = tmp_path / "outv"
    outdir.mkdir()
    partial = outdir / "r.jsonl.partial"
    log = tmp_path / "t.jsonl"
    running = _sieve(tmp_path, "batch", config, BEIR_QUERIES, "--as-of", "2025-06-01", "--out", outdir / "r.jsonl",
                     "--log", log, sleep_ms=100)
    _wait_for_lines(partial, 3, running)
    shutil.rmtree(outdir)
    _, stderr = running.communicate(timeout=60)
    text = " ".join(stderr.split())
    assert running.returncode == 2, stderr
    assert f"{partial} is gone: its directory {outdir} was removed while the batch ran" in text
    assert "result lines written to it are lost and the batch stopped" in text
    assert f"are in the trace log {log}, without their result lines" in text and "Nothing can be resumed" in text
    assert "kept in" not in text and "--resume" not in text.replace("Nothing can be resumed", "")
    assert not outdir.exists()
    assert len(_log_ids(log)) < 50  # it stopped within about a second, rather than running every query for nothing


def test_the_configs_trace_log_is_checked_before_the_warm_up_as_log_is(bm25_index, tmp_path):
    not_a_log = tmp_path / "notes.jsonl"
    not_a_log.write_text('{"hello": 1}\n', encoding="utf-8")
    queries = _write_queries(tmp_path / "q.jsonl", [{"id": "a", "text": "vitamin"}])
    cases = [(not_a_log, f"the config's trace.log: {not_a_log} is not a Sieve trace log")]
    read_only = Path("/proc/sys")  # a directory no one may write in, root included (where the system has one)
    if read_only.is_dir() and not os.access(read_only, os.W_OK):
        cases.append((read_only / "t.jsonl", f"the config's trace.log {read_only / 't.jsonl'}: cannot write in "
                      f"{read_only}"))
    config = tmp_path / "c.yaml"

    def logging_to(target: Path) -> Path:
        # an index that does not exist: had the warm-up run first, it would be the error
        config.write_text(f"""version: 1
index: {tmp_path / 'no-such-index'}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 5}}}}
output: bm25
trace: {{log: {target}}}
""", encoding="utf-8")
        return config

    for target, says in cases:
        done = run_sieve("batch", logging_to(target), queries, "--out", tmp_path / "r.jsonl", cwd=tmp_path)
        text = " ".join(done.stderr.split())
        assert done.returncode == 2 and says in text, done.stderr
        assert "no-such-index" not in text
        assert not (tmp_path / "r.jsonl.partial").exists()
    assert not_a_log.read_text(encoding="utf-8") == '{"hello": 1}\n'
    # and the same checks as --log's: never the queries file or the output
    done = run_sieve("batch", logging_to(queries), queries, "--out", tmp_path / "r.jsonl", cwd=tmp_path)
    text = " ".join(done.stderr.split())
    assert done.returncode == 2 and f"the config's trace.log {queries} is the queries file" in text, done.stderr
    done = run_sieve("batch", logging_to(tmp_path / "r.jsonl.partial"), queries, "--out", tmp_path / "r.jsonl",
                     cwd=tmp_path)
    text = " ".join(done.stderr.split())
    assert done.returncode == 2 and "would write over the config's trace.log" in text, done.stderr
