"""`sieve serve` when its trace log is removed or replaced under it, and what /metrics counts.

A real server process over the SciFact-slice BM25 index, driven over HTTP on loopback; the log's directory is
really moved away, an empty one really put in its place, the log really rotated by another process. The server
refuses (500 trace_not_logged, /readyz 503, sieve_trace_log_failing 1) rather than beginning a new chain at seq 0,
and recovers by itself once the chain is back.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.server import serve_in_subprocess
from engine.trace import TraceLog, check_log
from tests.engine.test_server import scrape

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """version: 1
name: kept
index: {index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: final, type: select.top_k, inputs: [bm25], params: {{k: 5}}}}
output: final
trace:
  log: {log}
"""


@pytest.fixture(scope="module")
def served(bm25_index: Path, tmp_path_factory: pytest.TempPathFactory):
    """(base URL, the log's path) of a server whose log held two records when it started."""
    directory = tmp_path_factory.mktemp("server-log")
    log = directory / "logs" / "trace.jsonl"
    code = ("import sys; from engine.trace import TraceLog\n"
            "for i in ('earlier-0', 'earlier-1'): TraceLog(sys.argv[1]).append({'schema': 'sieve.trace/1', "
            "'trace_id': i})\n")
    subprocess.run([sys.executable, "-c", code, str(log)], check=True, cwd=ROOT, timeout=60)  # another process
    config = directory / "kept.yaml"
    config.write_text(CONFIG.format(index=bm25_index, log=log), encoding="utf-8")
    with serve_in_subprocess([config], cwd=directory) as base:
        yield base, log


def _search(base: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/pipelines/kept/search", json={"query": "vitamin D and bone density"}, timeout=60)


def _withheld(base: str, says: str) -> str:
    response = _search(base)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "trace_not_logged" and "results are withheld" in error["message"]
    assert says in error["message"], error["message"]
    return error["message"]


def _not_ready(base: str, says: str) -> None:
    ready = httpx.get(f"{base}/readyz", timeout=30)
    assert ready.status_code == 503, ready.text
    error = ready.json()["error"]
    assert error["type"] == "trace_log_failing" and error["pipelines"] == ["kept"] and says in error["message"]


def _grew(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_a_log_removed_under_the_server_is_refused_until_the_chain_is_back(served):
    base, log = served
    logs, moved = log.parent, log.parent.with_name("logs.moved")
    before = scrape(base)

    logs.rename(moved)  # before the first query: the server found the log ending at seq 1 when it started
    message = _withheld(base, f"the trace log {log} was removed or replaced since this process found it ending at "
                              "record seq 1")
    assert f"its directory {logs} is gone" in message and "refusing to start a new chain" in message
    _not_ready(base, "the last trace append was refused: the log is not the chain this server appended to; now: ")
    assert not logs.exists()  # no directory, no log, no chain begun at seq 0

    logs.mkdir()  # an empty directory where the log was: still not the chain
    _not_ready(base, "the file is gone")
    _withheld(base, "(the file is gone)")
    assert not log.exists()
    metrics = scrape(base)
    assert metrics[("sieve_trace_log_failing", (("pipeline", "kept"),))] == 1

    logs.rmdir()
    moved.rename(logs)  # put back: ready again without a query, and appended to in the same chain
    assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
    assert _search(base).status_code == 200
    assert check_log(log).problems == [] and len(list(TraceLog(log).records())) == 3
    after = scrape(base)
    assert after[("sieve_trace_log_failing", (("pipeline", "kept"),))] == 0
    # the two withheld queries are errors, not queries run: latency, stage runs and empties count the answered one
    assert _grew(before, after, "sieve_query_errors_total", pipeline="kept", type="trace_not_logged") == 2
    assert _grew(before, after, "sieve_requests_total", pipeline="kept", endpoint="search", code="500") == 2
    assert _grew(before, after, "sieve_query_duration_seconds_count", pipeline="kept") == 1
    assert _grew(before, after, "sieve_stage_runs_total", pipeline="kept", stage="bm25", status="ok") == 1
    assert _grew(before, after, "sieve_stage_duration_seconds_count", pipeline="kept", stage="final") == 1

    copy = log.read_bytes()  # restored from a copy (a new file, or the freed inode number again): the same chain
    log.unlink()
    log.write_bytes(copy)
    assert _search(base).status_code == 200  # seq 3
    older = log.read_bytes()
    assert _search(base).status_code == 200  # seq 4
    latest = log.read_bytes()
    log.unlink()
    log.write_bytes(older)  # a copy from before seq 4: the server's last record is missing from it
    message = _withheld(base, "since record seq 4 was appended")
    assert "does not hold record seq 4" in message or "it was cut back" in message, message
    _not_ready(base, "record seq 4")
    log.unlink()
    log.write_bytes(latest)  # the right copy
    assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
    assert _search(base).status_code == 200
    check = check_log(log)
    assert check.problems == [] and check.records == 6


def test_rotation_by_another_process_is_followed(served):
    base, log = served
    assert _search(base).status_code == 200
    rotate = subprocess.run([sys.executable, "-m", "engine.cli", "trace", "rotate", str(log)], capture_output=True,
                            text=True, cwd=ROOT, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert rotate.returncode == 0, rotate.stderr
    assert _search(base).status_code == 200
    check = check_log(log)
    assert check.problems == [] and len(check.segments) == 2


def _post_raw(base: str, path: str) -> int:
    where = urlsplit(base)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        connection.request("POST", path, body=json.dumps({"query": "x"}), headers={"content-type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_metrics_count_only_the_paths_the_router_serves_as_an_endpoint(served):
    base, _ = served
    before = scrape(base)
    statuses = [_post_raw(base, "//v1/pipelines/kept/search"), _post_raw(base, "/v1/pipelines/kept/search/"),
                _post_raw(base, "/v1/pipelines/kept/explain/"), _post_raw(base, "/v1//pipelines/kept/search")]
    assert all(status != 200 for status in statuses)
    after = scrape(base)
    search_counts = [key for key in after if key[0] == "sieve_requests_total" and ("endpoint", "search") in key[1]
                     and ("pipeline", "kept") in key[1]]
    assert all(after[key] == before.get(key, 0.0) for key in search_counts)  # none counted as the endpoint
    other = sum(_grew(before, after, "sieve_requests_total", pipeline="-", endpoint="other", code=str(code))
                for code in set(statuses))
    assert other == 4


def test_the_help_lists_the_metrics_endpoint():
    for args in (["--help"], ["serve", "--help"]):
        shown = CliRunner().invoke(app, args, terminal_width=200)
        assert shown.exit_code == 0
        assert "GET /metrics" in " ".join(shown.output.replace("│", " ").split()), shown.output
