"""`sieve serve`: a real uvicorn server in a subprocess, driven over HTTP on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from engine.server import serve_in_subprocess
from tests.conftest import FAILS_AT_RUN_TIME

SIEVE = Path(sys.executable).with_name("sieve")

PIPELINE = """version: 1
name: mini
description: coreference rewrite -> bm25 -> top 5
index: {index}
stages:
  - id: rewrite
    type: rewrite.coreference
  - id: bm25
    type: recall.bm25
    inputs: [rewrite]
    params: {{top_k: 20}}
  - id: final
    type: select.top_k
    inputs: [bm25]
    params: {{k: 5}}
output: final
trace:
  log: {log}
limits:
  max_query_chars: 500
  max_history_turns: 3
"""


@pytest.fixture(scope="module")
def server(bm25_index: Path, tmp_path_factory: pytest.TempPathFactory):
    """(base URL, trace log path) of a running `sieve serve` over the SciFact slice: pipelines 'mini' and
    'failing'."""
    directory = tmp_path_factory.mktemp("server")
    log = directory / "trace.jsonl"
    config = directory / "mini.yaml"
    config.write_text(PIPELINE.format(index=bm25_index, log=log), encoding="utf-8")
    failing = directory / "failing.yaml"
    failing.write_text(FAILS_AT_RUN_TIME.format(index=bm25_index, extra="") + "name: failing\n"
                       f"trace: {{log: {directory / 'failing.jsonl'}}}\n", encoding="utf-8")
    with serve_in_subprocess([config, failing], cwd=directory) as base:
        yield base, log


def search(base: str, body: dict, pipeline: str = "mini") -> httpx.Response:
    return httpx.post(f"{base}/v1/pipelines/{pipeline}/search", json=body, timeout=60)


def test_search_returns_ranked_documents_and_logs_the_trace(server):
    base, log = server
    response = search(base, {"query": "vitamin D and bone density", "explain": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["pipeline"] == "mini" and not body["degraded"]
    results = body["results"]
    assert [r["rank"] for r in results] == list(range(1, len(results) + 1)) and len(results) == 5
    assert all(r["document"]["text"] and "explanation" in r for r in results)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    # the trace went to the pipeline's tamper-evident log, findable by the id the response gives
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert body["trace_id"] in [record["trace"]["trace_id"] for record in records]
    verify = subprocess.run([str(SIEVE), "trace", "verify", str(log)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    replay = subprocess.run([str(SIEVE), "replay", str(log), "--id", body["trace_id"]], capture_output=True, text=True,
                            timeout=120)
    assert replay.returncode == 0 and "identical" in replay.stdout, replay.stdout + replay.stderr
    # explanations and the trace only on request
    plain = search(base, {"query": "vitamin D and bone density"}).json()
    assert "explanation" not in plain["results"][0] and "trace" not in plain
    traced = search(base, {"query": "vitamin D", "include_trace": True}).json()
    assert traced["trace"]["schema"].startswith("sieve.trace") and traced["trace"]["trace_id"] == traced["trace_id"]


def test_conversation_history_is_rewritten(server):
    base, _ = server
    body = search(base, {"query": "Is it treatable?", "history": ["What is throat cancer?"]}).json()
    assert body["query"] == {"text": "Is it treatable?", "rewritten": "Is throat cancer treatable?"}


def test_pipelines_health_and_readiness(server):
    base, _ = server
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").json() == {"status": "ready", "pipelines": ["failing", "mini"]}
    _, pipeline = httpx.get(f"{base}/v1/pipelines").json()["pipelines"]
    assert pipeline["name"] == "mini" and len(pipeline["config_sha256"]) == 64
    assert [s["id"] for s in pipeline["stages"]] == ["rewrite", "bm25", "final"] and pipeline["unavailable"] == {}


@pytest.mark.parametrize(
    "body, status, kind, says",
    [
        ({"query": "  "}, 400, "bad_query", "query is empty"),
        ({"query": "x" * 501}, 400, "bad_query", "the limit is 500"),
        ({"query": "x", "history": ["a", "b", "c", "d"]}, 400, "bad_query", "the limit is 3"),
        ({"query": "x", "bogus": 1}, 422, "invalid_request", "body.bogus"),
        ({"query": "x", "as_of": "yesterday"}, 422, "invalid_request", "body.as_of"),
        ({"query": "x", "language": "english!"}, 422, "invalid_request", "not a language tag"),
        ({"query": "x", "user": {"roles": "admin"}}, 422, "invalid_request", "body.user.roles"),
        ({"history": []}, 422, "invalid_request", "body.query"),
    ],
)
def test_bad_requests_get_a_precise_json_error(server, body, status, kind, says):
    base, _ = server
    response = search(base, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and says in error["message"]


def test_unknown_pipeline_malformed_json_and_oversized_body(server):
    base, _ = server
    missing = search(base, {"query": "x"}, pipeline="nope")
    assert missing.status_code == 404 and "served: failing, mini" in missing.json()["error"]["message"]
    broken = httpx.post(f"{base}/v1/pipelines/mini/search", content=b"{not json", timeout=30,
                        headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["error"]["type"] == "invalid_request"
    huge = httpx.post(f"{base}/v1/pipelines/mini/search", content=b"x" * (2 << 20), timeout=30,
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "body_too_large"
    # a chunked body (no Content-Length) is cut off as it arrives; a small chunked one goes through
    def chunks(data: bytes):
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]

    url = f"{base}/v1/pipelines/mini/search"
    headers = {"content-type": "application/json"}
    big = json.dumps({"query": "a" * (3 << 20)}).encode()
    assert httpx.post(url, content=chunks(big), headers=headers, timeout=30).status_code == 413
    small = json.dumps({"query": "vitamin D"}).encode()
    assert httpx.post(url, content=chunks(small), headers=headers, timeout=30).status_code == 200


def test_concurrent_requests_get_the_sequential_answers(server):
    base, _ = server
    queries = ["vitamin D and bone density", "smoking and lung cancer", "aspirin and heart attack",
               "obesity and diabetes risk"] * 4
    expected = {q: [r["doc_id"] for r in search(base, {"query": q}).json()["results"]] for q in set(queries)}
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda q: search(base, {"query": q}), queries))
    assert all(a.status_code == 200 for a in answers)
    assert all([r["doc_id"] for r in a.json()["results"]] == expected[q] for q, a in zip(queries, answers))


def test_results_are_withheld_when_the_trace_cannot_be_logged(server):
    base, log = server
    aside = log.with_name("trace.aside")
    had_log = log.exists()
    if had_log:
        log.rename(aside)
    log.mkdir()  # the log path is now a directory: the append fails (even for root)
    try:
        response = search(base, {"query": "vitamin D"})
        assert response.status_code == 500, response.text
        body = response.json()
        assert body["error"]["type"] == "trace_not_logged" and "withheld" in body["error"]["message"]
        assert "results" not in body and len(body["error"]["trace_id"]) == 32
    finally:
        log.rmdir()
        if had_log:
            aside.rename(log)
    assert search(base, {"query": "vitamin D"}).status_code == 200


def test_explain_gives_score_trees_and_why_not_each_document(server):
    base, log = server
    logged = len(log.read_text(encoding="utf-8").splitlines())
    returned = [r["doc_id"] for r in search(base, {"query": "vitamin D and bone density"}).json()["results"]]
    recalled = [d for d, _ in httpx.post(f"{base}/v1/pipelines/mini/search", timeout=60, json={
        "query": "vitamin D and bone density", "include_trace": True}).json()["trace"]["stages"][1]["output"]]
    cut = next(d for d in recalled if d not in returned)
    response = httpx.post(f"{base}/v1/pipelines/mini/explain", timeout=60, json={
        "query": "vitamin D and bone density", "doc_ids": [returned[0], cut, "no-such-doc"], "top": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["doc_id"] for r in body["results"]] == returned[:2]
    assert all("explanation" in r and "rules_fired" in r and "merged" in r for r in body["results"])
    verdicts = {v["doc_id"]: v for v in body["why_not"]}
    assert verdicts[returned[0]]["status"] == "returned" and verdicts[returned[0]]["rank"] == 1
    assert verdicts[cut]["status"] == "dropped" and verdicts[cut]["stage"] == "final"
    assert verdicts["no-such-doc"]["status"] == "not_in_index"
    # an explained query is a query: its trace is logged like any other
    assert body["trace_id"] in log.read_text(encoding="utf-8")
    assert len(log.read_text(encoding="utf-8").splitlines()) == logged + 3
    bad = httpx.post(f"{base}/v1/pipelines/mini/explain", timeout=60, json={"query": "x", "doc_ids": [""]})
    assert bad.status_code == 422 and "1 to 512 characters" in bad.json()["error"]["message"]
    too_many = httpx.post(f"{base}/v1/pipelines/mini/explain", timeout=60, json={"query": "x", "doc_ids": ["a"] * 101})
    assert too_many.status_code == 422 and "body.doc_ids" in too_many.json()["error"]["message"]


def test_a_stage_failing_at_run_time_is_a_json_500_and_the_server_goes_on(server):
    base, _ = server
    response = search(base, {"query": "vitamin D and bone density"}, pipeline="failing")
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "stage_failed"
    assert error["message"].startswith("stage 'recent' (boost.recency@1) failed: combine: multiply needs non-negative")
    assert "Traceback" not in response.text
    assert search(base, {"query": "vitamin D"}).status_code == 200


def test_a_bad_config_stops_the_server_at_start_with_its_location(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("version: 1\nstages:\n  - id: a\n    type: recall.bm25x\noutput: a\n", encoding="utf-8")
    done = subprocess.run([str(SIEVE), "serve", str(config), "--port", "65000"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert f"{config}:4:11" in done.stderr and "unknown stage type 'recall.bm25x'" in done.stderr
    assert "Traceback" not in done.stderr
