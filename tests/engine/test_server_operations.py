"""Observability and lifecycle audit of `sieve serve` (a real server in a child process each): request ids, what a
shutdown whose grace ran out answers, requests over --limit-concurrency, a client that drops mid-body, series
present from the start, no redirect for a trailing slash, the exit status after SIGINT/SIGTERM, the disk's free
space and an index removed under the server. Each says what happened before ("before:")."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import FAILS_AT_RUN_TIME, served

BM25 = ("version: 1\nname: {name}\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 30}}}}\n"
        "{extra}output: {output}\ntrace: {{log: {log}}}\n")
RERANK = "  - {id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {window: 30, batch_size: 2}}\n"


def _config(directory: Path, index: Path, name: str, extra: str = "", output: str = "bm25") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(BM25.format(name=name, index=index, extra=extra, output=output, log=directory / f"{name}.jsonl"),
                    encoding="utf-8")
    return path


def _scrape(base: str) -> str:
    return httpx.get(f"{base}/metrics", timeout=30).text


def _count(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_request_ids_errors_series_and_redirects(bm25_index, tmp_path):
    failing = tmp_path / "failing.yaml"
    failing.write_text(FAILS_AT_RUN_TIME.format(index=bm25_index, extra="") + "name: failing\n"
                       f"trace: {{log: {tmp_path / 'failing.jsonl'}}}\n", encoding="utf-8")
    with served([_config(tmp_path, bm25_index, "p"), failing], tmp_path) as (base, _, log):
        metrics = _scrape(base)
        # before: these series appeared only after their first event (an alert on rate() saw "no data")
        for series in ('sieve_degraded_queries_total{pipeline="p"} 0.0', 'sieve_empty_queries_total{pipeline="p"} 0.0',
                       'sieve_query_errors_total{pipeline="p",type="stage_failed"} 0.0'):
            assert series in metrics
        assert 'sieve_trace_log_free_bytes{pipeline="p"}' in metrics
        assert "_created" not in metrics  # before: a creation time beside each counter (36 of 187 samples)
        ok = httpx.post(f"{base}/v1/pipelines/p/search", json={"query": "cells"}, timeout=60)
        assert ok.status_code == 200 and len(ok.headers["x-request-id"]) == 32
        given = httpx.post(f"{base}/v1/pipelines/p/search", json={"query": ""}, headers={"X-Request-ID": "gw-42"},
                           timeout=60)
        assert given.headers["x-request-id"] == "gw-42" and given.json()["error"]["request_id"] == "gw-42"
        odd = httpx.get(f"{base}/healthz", headers={"X-Request-ID": "a b\x7f" * 50}, timeout=30)
        assert odd.headers["x-request-id"] != "a b\x7f" * 50  # not echoed: a new id
        # before: a stage_failed 500 and its ERROR line had no id to match them by
        broken = httpx.post(f"{base}/v1/pipelines/failing/search", json={"query": "cells"},
                            headers={"X-Request-ID": "req-broken-1"}, timeout=60)
        assert broken.status_code == 500 and broken.json()["error"]["request_id"] == "req-broken-1"
        # before: a trailing slash was a 307 to the endpoint (run once, counted under two endpoints)
        slash = httpx.post(f"{base}/v1/pipelines/p/search/", json={"query": "cells"}, timeout=60)
        assert slash.status_code == 404 and slash.json()["error"]["type"] == "not_found"
    lines = log.read_text(encoding="utf-8").splitlines()
    assert any("request req-broken-1: pipeline 'failing' failed" in line for line in lines), lines
    # before: the access line had no id, so a client's 500 could not be matched to it under concurrency
    assert any('"POST /v1/pipelines/failing/search HTTP/1.1" 500' in line and line.endswith(" request req-broken-1")
               for line in lines), lines
    assert any('"POST /v1/pipelines/p/search HTTP/1.1" 400' in line and line.endswith(" request gw-42")
               for line in lines), lines


def test_a_client_that_drops_mid_body_is_not_a_server_error(bm25_index, tmp_path):
    with served([_config(tmp_path, bm25_index, "p")], tmp_path) as (base, _, _):
        port = int(base.rsplit(":", 1)[1])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(b"POST /v1/pipelines/p/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 50\r\n\r\n{\"query\": ")
        deadline = time.monotonic() + 30  # until the server has seen the three go (not a fixed sleep)
        while _count(metrics := _scrape(base), 'sieve_requests_total{code="499"') < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert _count(metrics, 'sieve_requests_total{code="500"') == 0  # before: 3 server errors no one was sent
    assert _count(metrics, 'sieve_requests_total{code="499"') == 3


def test_requests_over_the_limit_get_a_counted_json_503(bm25_index, tmp_path):
    config = _config(tmp_path, bm25_index, "slow", extra=RERANK, output="rerank")
    with served([config], tmp_path, "--limit-concurrency", "2") as (base, _, _):
        answers: list[httpx.Response] = []

        def ask() -> None:
            answers.append(httpx.post(f"{base}/v1/pipelines/slow/search", json={"query": "cells in the blood"},
                                      timeout=120))

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        probe = httpx.get(f"{base}/healthz", timeout=30)  # while the queries run: a probe is never shed
        for thread in threads:
            thread.join()
        metrics = _scrape(base)
    assert probe.status_code == 200
    shed = [a for a in answers if a.status_code == 503]
    assert shed and all(a.json()["error"]["type"] == "overloaded" for a in shed)  # before: plain text, uncounted
    assert {a.status_code for a in answers} <= {200, 503}
    assert _count(metrics, 'sieve_requests_total{code="503",endpoint="search",pipeline="slow"}') == len(shed)


def _stopped_under_load(tmp_path: Path, bm25_index: Path, queries: list[str], window: int = 30):
    """SIGTERM a server (grace 0.3 s) one second into ``queries`` sent at once to a pipeline reranking ``window``
    documents: (the responses, the server's log text, the trace ids of the 200s and of the 503s naming one, the trace
    ids its log holds). It must exit 143."""
    config = _config(tmp_path, bm25_index, "slow", extra=RERANK.replace("window: 30", f"window: {window}"),
                     output="rerank")
    with served([config], tmp_path, "--shutdown-grace", "0.3") as (base, process, log):
        answers: list[httpx.Response | Exception] = []

        def ask(text: str) -> None:
            try:
                answers.append(httpx.post(f"{base}/v1/pipelines/slow/search", json={"query": text}, timeout=120))
            except httpx.HTTPError as exc:
                answers.append(exc)

        threads = [threading.Thread(target=ask, args=(text,)) for text in queries]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join()
        assert process.wait(timeout=60) == 143  # before: killed by the signal it re-raised (143 too), SIGINT exit 0
    responses = [a for a in answers if isinstance(a, httpx.Response)]
    told = {a.json()["trace_id"] for a in responses if a.status_code == 200}
    told |= {a.json()["error"]["trace_id"] for a in responses if a.status_code == 503 and "trace_id" in a.json()["error"]}
    log_file = tmp_path / "slow.jsonl"  # none when every query was cut before its trace was logged
    logged = {json.loads(line)["trace"]["trace_id"]
              for line in (log_file.read_text(encoding="utf-8").splitlines() if log_file.exists() else ())}
    return responses, log.read_text(encoding="utf-8"), told, logged


def test_a_shutdown_whose_grace_runs_out_answers_each_request_as_it_stands_and_exits_143(bm25_index, tmp_path):
    """Before: requests still running when the grace ran out got uvicorn's plain-text 500 and a traceback each. A
    query's handler runs in a thread no cancel stops, so a cut request may run on: one whose trace is logged gets
    its answer, or a 503 naming its trace_id (a blind retry would run it twice); any other gets 503 shutting_down
    and its thread logs nothing after (review of this change: the threads logged the traces of five answers never
    sent). Every trace in the log is of a 200 or of a 503 that names it."""
    responses, lines, told, logged = _stopped_under_load(tmp_path, bm25_index, ["cells in the blood"] * 6)
    for answer in responses:  # before: 500 "Internal Server Error" in plain text
        assert answer.status_code == 200 or answer.json()["error"]["type"] == "shutting_down", answer.text
    assert logged == told  # no trace of an answer never sent, nor an answer without its trace
    assert any(a.status_code == 503 for a in responses)  # six queries of ~a second on two cores: some were cut
    assert "Traceback" not in lines


def test_a_stopped_server_exits_without_waiting_for_the_queries_it_cut(bm25_index, tmp_path):
    """Concurrency audit F1. Before: past the grace, the process waited for every query the shutdown had cut (each
    answered 503, none to be logged) to finish in its thread: 10.8 s after SIGTERM with a 2 s grace in the audit's
    run, no bound, so an orchestrator timed to the grace killed it meanwhile. It exits once no trace is being
    appended, saying how many threads it left; the log holds exactly the traces of the answers sent."""
    responses, lines, told, logged = _stopped_under_load(tmp_path, bm25_index,
                                                         [f"cells {n} in blood" for n in range(8)], window=60)
    assert logged == told
    if not any(a.status_code == 503 and "trace_id" not in a.json()["error"] for a in responses):
        pytest.skip("this machine answered every query within the grace: none was cut to be left running")
    assert "thread(s) still running the queries the shutdown cut and their stages (answered 503, not logged)" \
        in " ".join(lines.split()), lines[-3000:]


def test_sigint_exits_130_once_the_server_has_stopped(bm25_index, tmp_path):
    with served([_config(tmp_path, bm25_index, "p")], tmp_path) as (_, process, _):
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130  # before: 0


def test_an_index_removed_under_the_server_is_said_to_be_gone(bm25_index, tmp_path):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(bm25_index, index)
    with served([_config(tmp_path, index, "p")], tmp_path) as (base, _, log):
        shutil.rmtree(index)
        ready = httpx.get(f"{base}/readyz", timeout=30)
        assert ready.status_code == 200  # it still serves what it opened
    text = log.read_text(encoding="utf-8")
    assert "is gone from disk" in text and "a restart (or a new replica) fails" in text  # before: "replaced"
