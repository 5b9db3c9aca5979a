"""`sieve serve`: a real uvicorn server in a subprocess, driven over HTTP on loopback."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from engine import __version__
from engine.errors import SieveError
from engine.server import load_pipelines, serve_in_subprocess
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
server: {{request_as_of: true, include_trace: true, explain: true}}
"""


# the default limits (4096 characters a query, 20 turns of history): the server's body limit follows them
ROOMY = """version: 1
name: roomy
index: {index}
stages:
  - id: bm25
    type: recall.bm25
    params: {{top_k: 20}}
  - id: final
    type: select.top_k
    inputs: [bm25]
    params: {{k: 5}}
output: final
trace:
  log: {log}
server: {{explain: true}}
"""


# routed: the top-5 cut only for questions (a stage's `when`; an output stage cannot be routed past, so 'out' follows)
# (and a deadline that cuts nothing: a config warning the server lists)
ROUTED = ROOMY.replace("name: roomy", "name: routed").replace(
    "    params: {{k: 5}}\n", "    params: {{k: 5}}\n    when: {{field: query.text, op: regex, value: '\\?$'}}\n"
    "  - {{id: out, type: select.top_k, inputs: [final], params: {{k: 20}}}}\n"
).replace("output: final", "output: out") + "executor: {{deadline_ms: 60000}}\n"


@pytest.fixture(scope="module")
def server(bm25_index: Path, tmp_path_factory: pytest.TempPathFactory):
    """(base URL, trace log path) of a running `sieve serve` over the SciFact slice: pipelines 'mini',
    'failing' (nothing allowed but search), 'roomy' (default limits; explain allowed) and 'routed' (a `when`)."""
    directory = tmp_path_factory.mktemp("server")
    log = directory / "trace.jsonl"
    config = directory / "mini.yaml"
    config.write_text(PIPELINE.format(index=bm25_index, log=log), encoding="utf-8")
    failing = directory / "failing.yaml"
    failing.write_text(FAILS_AT_RUN_TIME.format(index=bm25_index, extra="") + "name: failing\n"
                       f"trace: {{log: {directory / 'failing.jsonl'}}}\n", encoding="utf-8")
    roomy = directory / "roomy.yaml"
    roomy.write_text(ROOMY.format(index=bm25_index, log=directory / "roomy.jsonl"), encoding="utf-8")
    routed = directory / "routed.yaml"
    routed.write_text(ROUTED.format(index=bm25_index, log=directory / "routed.jsonl"), encoding="utf-8")
    with serve_in_subprocess([config, failing, roomy, routed], cwd=directory) as base:
        yield base, log


def search(base: str, body: dict, pipeline: str = "mini") -> httpx.Response:
    return httpx.post(f"{base}/v1/pipelines/{pipeline}/search", json=body, timeout=60)


def test_search_returns_ranked_documents_and_logs_the_trace(server):
    base, log = server
    response = search(base, {"query": "vitamin D and bone density", "explain": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["pipeline"] == "mini" and not body["degraded"]
    assert body["engine_version"] == __version__  # fields come with versions: a client can tell which it talks to
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


def test_a_routed_pipeline_says_which_stages_a_query_was_routed_past(server):
    base, _ = server
    question = search(base, {"query": "Does vitamin D improve bone density?"}, "routed").json()
    statement = search(base, {"query": "vitamin D and bone density"}, "routed").json()
    assert question["bypassed"] == [] and len(question["results"]) == 5
    assert statement["bypassed"] == ["final"] and len(statement["results"]) == 20
    assert "bypassed" not in search(base, {"query": "vitamin D"}, "roomy").json()  # a config without a `when`
    described = httpx.get(f"{base}/v1/pipelines", timeout=30).json()
    assert described["engine_version"] == __version__
    listed = {p["name"]: p for p in described["pipelines"]}
    final = next(s for s in listed["routed"]["stages"] if s["id"] == "final")
    assert final["when"].startswith("query.text regex")
    # what `sieve validate` warns of is listed (and was logged at start), not only what warm-up found; its text only
    # where the pipeline allows include_trace ('routed' allows explain alone): here, where it arose
    (warning,) = listed["routed"]["config_warnings"]
    assert warning == "executor.deadline_ms" and "include_trace" in listed["routed"]["warnings_withheld"]
    assert listed["roomy"]["config_warnings"] == [] and "warnings_withheld" not in listed["roomy"]


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed by prometheus_client's own parser: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{base}/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_count_requests_stage_outcomes_latency_and_errors(server):
    base, _ = server
    before = scrape(base)
    search(base, {"query": "vitamin D and bone density"}, "routed")  # final bypassed
    search(base, {"query": "Does vitamin D improve bone density?"}, "routed")  # final ran
    search(base, {"query": ""}, "routed")  # 400 bad_query
    search(base, {"query": "x"}, "no-such-pipeline")  # 404: counted under '-', not a label per name asked
    httpx.post(f"{base}/v1/pipelines/routed/search", content=b"{", headers={"content-type": "application/json"})
    search(base, {"query": "vitamin D"}, "failing")  # 500 stage_failed
    after = scrape(base)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("sieve_requests_total", pipeline="routed", endpoint="search", code="200") == 2
    assert grew("sieve_requests_total", pipeline="routed", endpoint="search", code="400") == 1
    assert grew("sieve_requests_total", pipeline="routed", endpoint="search", code="422") == 1
    assert grew("sieve_requests_total", pipeline="-", endpoint="search", code="404") == 1
    assert grew("sieve_requests_total", pipeline="failing", endpoint="search", code="500") == 1
    assert not any("no-such-pipeline" in str(key) for key in after)
    assert grew("sieve_stage_runs_total", pipeline="routed", stage="final", status="bypassed") == 1
    assert grew("sieve_stage_runs_total", pipeline="routed", stage="final", status="ok") == 1
    assert grew("sieve_stage_runs_total", pipeline="routed", stage="bm25", status="ok") == 2
    assert grew("sieve_stage_duration_seconds_count", pipeline="routed", stage="final") == 1  # ran once
    assert grew("sieve_query_duration_seconds_count", pipeline="routed") == 2
    assert grew("sieve_request_duration_seconds_count", pipeline="routed", endpoint="search") == 4
    assert grew("sieve_query_errors_total", pipeline="routed", type="bad_query") == 1
    assert grew("sieve_query_errors_total", pipeline="failing", type="stage_failed") == 1
    assert after[("sieve_trace_log_failing", (("pipeline", "routed"),))] == 0
    assert after[("sieve_index_replaced_on_disk", (("pipeline", "routed"),))] == 0
    assert any(name == "sieve_pipeline_info" and dict(labels)["pipeline"] == "mini" and len(
        dict(labels)["config_sha256"]) == 64 for name, labels in after)


def test_conversation_history_is_rewritten(server):
    base, _ = server
    body = search(base, {"query": "Is it treatable?", "history": ["What is throat cancer?"]}).json()
    assert body["query"] == {"text": "Is it treatable?", "rewritten": "Is throat cancer treatable?"}


def test_pipelines_health_and_readiness(server):
    base, _ = server
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").json() == {"status": "ready", "pipelines": ["failing", "mini", "roomy", "routed"]}
    _, pipeline, _, _ = httpx.get(f"{base}/v1/pipelines").json()["pipelines"]
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
    assert missing.status_code == 404 and "served: failing, mini, roomy" in missing.json()["error"]["message"]
    broken = httpx.post(f"{base}/v1/pipelines/mini/search", content=b"{not json", timeout=30,
                        headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["error"]["type"] == "invalid_request"
    huge = httpx.post(f"{base}/v1/pipelines/mini/search", content=b"x" * (2 << 20), timeout=30,
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"] == {
        "type": "body_too_large", "message": f"request body over {ROOMY_BODY_LIMIT} bytes",
        "request_id": huge.headers["x-request-id"]}
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


# ---------------------------------------------------------------- the error contract, request by request


def post_raw(base: str, path: str, content: bytes, headers: dict | None = None) -> httpx.Response:
    """POST bytes as they are (httpx's json= would never send a lone surrogate or a duplicate key)."""
    return httpx.post(f"{base}{path}", content=content, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


def assert_error(response: httpx.Response, status: int, kind: str, *says: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == kind, body
    assert all(s in body["error"]["message"] for s in says), body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize(
    "path, content, location, code",
    [
        ("search", rb'{"query":"vitamin \ud800 D"}', "body.query", r"\ud800"),
        ("search", rb'{"query":"x","history":["ok","a\udc00"]}', "body.history.1", r"\udc00"),
        ("search", rb'{"query":"x","user":{"roles":["clinician","\ud800"]}}', "body.user.roles.1", r"\ud800"),
        ("search", rb'{"query":"x","user":{"user_id":"u\ud800"}}', "body.user.user_id", r"\ud800"),
        ("search", rb'{"query":"x","user":{"groups":["\ud800"]}}', "body.user.groups.0", r"\ud800"),
        ("search", rb'{"query":"x","user":{"jurisdictions":["\ud800"]}}', "body.user.jurisdictions.0", r"\ud800"),
        ("search", rb'{"query":"x","user":{"attributes":{"k":"v\udfff"}}}', "body.user.attributes.k", r"\udfff"),
        ("search", rb'{"query":"x","user":{"attributes":{"\ud800":"v"}}}', r"body.user.attributes.\ud800", r"\ud800"),
        ("search", rb'{"query":"x","\udbff":1}', r"body.\udbff", r"\udbff"),
        ("search", rb'{"query":"x","language":"e\ud800"}', "body.language", r"\ud800"),
        ("explain", rb'{"query":"x","doc_ids":["a","\ud800"]}', "body.doc_ids.1", r"\ud800"),
        ("explain", rb'{"query":"x\ud800"}', "body.query", r"\ud800"),
    ],
)
def test_a_lone_surrogate_anywhere_is_a_located_422_before_anything_runs(server, path, content, location, code):
    base, log = server
    logged = log.read_text(encoding="utf-8").count("\n") if log.exists() else 0
    error = assert_error(post_raw(base, f"/v1/pipelines/mini/{path}", content), 422, "invalid_request",
                         f"{location}", f"contains a lone surrogate ({code}), not valid Unicode text")
    assert error["problems"][0]["location"].startswith(location)
    assert (log.read_text(encoding="utf-8").count("\n") if log.exists() else 0) == logged  # nothing ran


def test_a_lone_surrogate_keeps_the_connection_alive(server):
    base, _ = server
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
    try:
        connection.request("POST", "/v1/pipelines/mini/search", body=rb'{"query":"vitamin \ud800 D"}',
                           headers={"content-type": "application/json"})
        first = connection.getresponse()
        assert first.status == 422 and json.loads(first.read())["error"]["type"] == "invalid_request"
        sock = connection.sock
        connection.request("POST", "/v1/pipelines/mini/search", body=b'{"query":"vitamin D"}',
                           headers={"content-type": "application/json"})
        second = connection.getresponse()
        assert second.status == 200 and json.loads(second.read())["results"]
        assert connection.sock is sock  # the same keep-alive connection served both
    finally:
        connection.close()


def test_unknown_paths_wrong_methods_and_unreadable_bodies_get_the_json_error_shape(server):
    base, _ = server
    assert_error(httpx.get(f"{base}/nowhere"), 404, "not_found", "/nowhere")
    assert_error(httpx.post(f"{base}/v1/pipelines/mini/nonsense", json={"query": "x"}), 404, "not_found")
    wrong = assert_error(httpx.get(f"{base}/v1/pipelines/mini/search"), 405, "method_not_allowed", "POST")
    assert wrong["message"].startswith("GET ")
    assert httpx.get(f"{base}/v1/pipelines/mini/search").headers["allow"] == "POST"
    url = "/v1/pipelines/mini/search"
    assert_error(post_raw(base, url, b'{"query": "caf\xe9"}'), 422, "invalid_request",
                 "body: not valid UTF-8 text")
    assert_error(post_raw(base, url, b"[" * 50_000 + b"]" * 50_000), 422, "invalid_request",
                 "body: JSON nested too deeply")
    assert_error(post_raw(base, url, b""), 422, "invalid_request", "body: empty")
    assert_error(post_raw(base, url, b'{"query": "x", "top": ' + b"9" * 5000 + b"}"), 422, "invalid_request",
                 "body: a JSON integer of 5000 digits is too long")
    assert_error(post_raw(base, url, b'["vitamin D"]'), 422, "invalid_request", "body:")
    # the server decodes no compressed body, and reads only JSON
    assert_error(post_raw(base, url, gzip.compress(b'{"query": "vitamin D"}'), {"content-encoding": "gzip"}),
                 415, "unsupported_media_type", "Content-Encoding", "gzip")
    assert_error(post_raw(base, url, b'{"query": "vitamin D"}', {"content-type": "text/plain"}),
                 415, "unsupported_media_type", "application/json", "text/plain")
    no_type = httpx.post(f"{base}{url}", content=b'{"query": "vitamin D"}', timeout=60)
    assert_error(no_type, 415, "unsupported_media_type", "application/json")
    assert_error(post_raw(base, url, b'{"query": "vitamin D"}', {"content-type": "application/json; charset=latin-1"}),
                 415, "unsupported_media_type", "UTF-8")
    utf8 = post_raw(base, url, b'{"query": "vitamin D"}', {"content-type": "application/json; charset=UTF-8"})
    assert utf8.status_code == 200, utf8.text


@pytest.mark.parametrize(
    "path, body, location, says",
    [
        ("search", {"query": "x", "explain": "yes"}, "body.explain", "valid boolean"),
        ("search", {"query": "x", "explain": 1}, "body.explain", "valid boolean"),
        ("search", {"query": "x", "include_trace": "true"}, "body.include_trace", "valid boolean"),
        ("search", {"query": "x", "include_trace": 0}, "body.include_trace", "valid boolean"),
        ("explain", {"query": "x", "top": "3"}, "body.top", "valid integer"),
        ("explain", {"query": "x", "top": True}, "body.top", "valid integer"),
        ("explain", {"query": "x", "top": 2.0}, "body.top", "valid integer"),
        ("explain", {"query": "x", "explain": "no"}, "body.explain", "valid boolean"),
        ("search", {"query": "x", "as_of": 1700000000}, "body.as_of", "ISO 8601"),
        ("search", {"query": "x", "as_of": 1700000000000}, "body.as_of", "ISO 8601"),
        ("search", {"query": "x", "as_of": "1700000000"}, "body.as_of", "ISO 8601"),
        ("search", {"query": 42}, "body.query", "valid string"),
        ("search", {"query": "x", "history": [1]}, "body.history.0", "valid string"),
        ("search", {"query": "x", "user": {"user_id": 7}}, "body.user.user_id", "valid string"),
        ("search", {"query": "x", "user": {"attributes": {"age": 40}}}, "body.user.attributes.age", "valid string"),
        ("explain", {"query": "x", "doc_ids": [12]}, "body.doc_ids.0", "valid string"),
    ],
)
def test_wrong_json_types_are_refused_not_coerced(server, path, body, location, says):
    base, _ = server
    response = httpx.post(f"{base}/v1/pipelines/mini/{path}", json=body, timeout=60)
    assert_error(response, 422, "invalid_request", f"{location}: ", says)


@pytest.mark.parametrize(
    "path, body, location, says",
    [
        ("search", {"qeury": "x"}, "body.qeury", "unknown key (did you mean 'query'?); a search body takes: query, "
                                                 "history, user, as_of, language, explain, include_trace"),
        ("search", {"text": "x"}, "body.text", "unknown key (the query's text is 'query' here; 'text' is a batch "
                                               "file's key)"),
        ("search", {"query": "x", "top": 5}, "body.top", "unknown key ('top' is a key of the explain endpoint"),
        ("search", {"query": "x", "user": {"role": ["a"]}}, "body.user.role",
         "unknown key (did you mean 'roles'?); user takes: user_id, roles, groups, jurisdictions, attributes"),
        ("explain", {"query": "x", "doc_id": "a"}, "body.doc_id", "unknown key (did you mean 'doc_ids'?); an explain "
                                                                  "body takes: query,"),
    ],
)
def test_an_unknown_key_is_named_with_the_closest_known_one(server, path, body, location, says):
    """Error-message audit C12: the server answered a mistyped key with pydantic's 'Extra inputs are not permitted'
    (no suggestion, no list of keys), where `sieve batch` says 'unknown key 'txt' (did you mean 'text'?)'."""
    base, _ = server
    response = httpx.post(f"{base}/v1/pipelines/mini/{path}", json=body, timeout=60)
    assert_error(response, 422, "invalid_request", f"{location}: ", says)
    assert "Extra inputs" not in response.text


def test_what_a_request_may_ask_beyond_results_is_the_configs_choice(server):
    """as_of (time travel past retention and embargo rules), the whole trace (ids of suppressed documents) and the
    explain endpoint (which access rule masked an id, whether it exists) are refused unless the config allows them."""
    base, _ = server
    as_of = search(base, {"query": "vitamin D", "as_of": "1990-01-01"}, pipeline="roomy")
    assert_error(as_of, 403, "not_allowed", "pipeline 'roomy' does not allow as_of in requests")
    assert "`server: {request_as_of: true}`" in as_of.json()["error"]["message"]
    trace = search(base, {"query": "vitamin D", "include_trace": True}, pipeline="roomy")
    assert_error(trace, 403, "not_allowed", "pipeline 'roomy' does not allow include_trace")
    explain = httpx.post(f"{base}/v1/pipelines/failing/explain", timeout=60, json={"query": "x", "doc_ids": ["a"]})
    assert_error(explain, 403, "not_allowed", "pipeline 'failing' does not allow the explain endpoint")
    plain = search(base, {"query": "vitamin D", "explain": True}, pipeline="roomy")  # results and their scores: yes
    assert plain.status_code == 200 and plain.json()["results"]
    allows = {p["name"]: p["allows"] for p in httpx.get(f"{base}/v1/pipelines").json()["pipelines"]}
    assert allows["roomy"] == {"request_as_of": False, "include_trace": False, "explain": True}
    assert allows["mini"] == {"request_as_of": True, "include_trace": True, "explain": True}


def test_as_of_takes_iso_8601_dates_and_times(server):
    base, _ = server
    for as_of in ("2025-06-01", "2025-06-01T12:00:00Z", "2025-06-01T12:00:00+02:00"):
        response = search(base, {"query": "vitamin D", "as_of": as_of, "include_trace": True})
        assert response.status_code == 200, response.text
        assert response.json()["trace"]["query"]["as_of"].startswith("2025-06-01")


@pytest.mark.parametrize(
    "content, location, key",
    [
        (b'{"query":"a","query":"b"}', "body.query", "query"),
        (b'{"query":"a","user":{"roles":["x"]},"user":{"roles":["admin"]}}', "body.user", "user"),
        (b'{"query":"a","user":{"roles":["x"],"roles":["admin"]}}', "body.user.roles", "roles"),
        (b'{"query":"a","user":{"attributes":{"k":"1","k":"2"}}}', "body.user.attributes.k", "k"),
    ],
)
def test_duplicate_json_keys_are_refused_with_their_path(server, content, location, key):
    base, _ = server
    error = assert_error(post_raw(base, "/v1/pipelines/mini/search", content), 422, "invalid_request",
                         f"{location}: duplicate key '{key}'")
    assert error["problems"] == [{"location": location, "message": error["problems"][0]["message"]}]


def test_a_422_stays_small_however_many_problems_the_body_has(server):
    base, _ = server
    many = search(base, {"query": "x", "history": [0] * 50_000})
    assert_error(many, 422, "invalid_request", "body.history")
    assert len(many.content) < 2_000, len(many.content)
    wide = search(base, {"query": "x", "user": {"attributes": {f"k{i}": i for i in range(500)}}})
    error = assert_error(wide, 422, "invalid_request", "body.user.attributes.k0", "and 497 more problems")
    assert len(error["problems"]) == 20 and error["more_problems"] == 480
    assert len(wide.content) < 4_000, len(wide.content)
    # the schema caps history at 1000 turns; within it, the pipeline's own limit answers (400)
    capped = search(base, {"query": "x", "history": ["turn"] * 1001})
    assert_error(capped, 422, "invalid_request", "body.history", "at most 1000")
    assert_error(search(base, {"query": "x", "history": ["turn"] * 1000}), 400, "bad_query", "the limit is 3")


def test_a_language_tag_with_a_trailing_newline_is_not_a_tag(server):
    base, _ = server
    assert_error(search(base, {"query": "x", "language": "en\n"}), 422, "invalid_request", "body.language",
                 "not a language tag")
    assert search(base, {"query": "vitamin D", "language": "zh-CN"}).status_code == 200


@pytest.mark.parametrize("name", ["a/b", "a b", "..", ".", "naïve", "x?y", "a%2Fb"])
def test_a_pipeline_name_unusable_in_a_url_is_refused_at_start(tmp_path, name):
    config = tmp_path / "named.yaml"  # its index does not exist: the name is refused before any warm-up
    config.write_text(PIPELINE.format(index=tmp_path / "no-index", log=tmp_path / "t.jsonl").replace(
        "name: mini", f"name: {json.dumps(name)}"), encoding="utf-8")
    with pytest.raises(SieveError) as refused:
        load_pipelines([config])
    message = str(refused.value)
    assert str(config) in message and repr(name) in message
    assert "letters, digits, '.', '_' and '-'" in message


def test_two_configs_with_one_name_are_refused_before_any_warms_up(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    for path in (first, second):  # no index: warming the first up would fail
        path.write_text(PIPELINE.format(index=tmp_path / "no-index", log=tmp_path / "t.jsonl"), encoding="utf-8")
    with pytest.raises(SieveError, match="two configs are named 'mini'") as refused:
        load_pipelines([first, second])
    assert str(first) in str(refused.value) and str(second) in str(refused.value)
    # the name of a config without one is its file's stem, held to the same rule
    unnamed = tmp_path / "my pipeline.yaml"
    unnamed.write_text(first.read_text(encoding="utf-8").replace("name: mini\n", ""), encoding="utf-8")
    with pytest.raises(SieveError, match="pipeline name 'my pipeline' cannot be served"):
        load_pipelines([unnamed])


# 12 bytes a character (an astral character is two \uXXXX escapes) for the query and each turn of history,
# and 100 document ids of 512 characters, plus 256 KiB: for roomy's 4096 characters and 20 turns
ROOMY_BODY_LIMIT = 12 * (4096 * 21 + 100 * 512) + (256 << 10)


def test_the_body_limit_admits_the_longest_request_the_pipelines_allow(server):
    base, _ = server
    emoji = "\U0001f9ec" * 4096  # each JSON-escaped as a surrogate pair: 12 bytes a character
    body = {"query": emoji, "history": [emoji] * 20, "doc_ids": [f"{i:03d}" + "\U0001f9ec" * 509 for i in range(100)],
            "user": {"roles": ["clinician"], "attributes": {"unit": "oncology"}}, "top": 1}
    content = json.dumps(body).encode()  # ensure_ascii: the worst case
    assert (1 << 20) < len(content) < ROOMY_BODY_LIMIT
    response = post_raw(base, "/v1/pipelines/roomy/explain", content)
    assert response.status_code == 200, response.text[:500]
    assert len(response.json()["why_not"]) == 100


def test_422_locations_name_the_item_and_malformed_json_its_position(server):
    base, _ = server
    bad_id = httpx.post(f"{base}/v1/pipelines/mini/explain", timeout=60, json={"query": "x", "doc_ids": ["ok", ""]})
    error = assert_error(bad_id, 422, "invalid_request", "body.doc_ids.1: a document id is 1 to 512 characters")
    assert error["problems"] == [{"location": "body.doc_ids.1", "message": "a document id is 1 to 512 characters"}]
    broken = post_raw(base, "/v1/pipelines/mini/search", b'{"query": }')
    said = "malformed JSON at line 1, column 11: Expecting value"
    error = assert_error(broken, 422, "invalid_request", f"body: {said}")
    assert error["problems"] == [{"location": "body", "message": said}]
    two_lines = post_raw(base, "/v1/pipelines/mini/search", b'{"query": "x",\n "top": 1,}')
    assert_error(two_lines, 422, "invalid_request", "malformed JSON at line 2, column 11")


def test_user_attributes_are_bounded(server):
    base, _ = server
    for attributes, says in [({str(i): "x" for i in range(33)}, "at most 32 items"),
                             ({"k" * 129: "v"}, "at most 128 characters"), ({"team": "v" * 257}, "at most 256 characters")]:
        response = search(base, {"query": "vitamin D", "user": {"attributes": attributes}})
        assert response.status_code == 422 and says in response.json()["error"]["message"], response.text
    assert search(base, {"query": "vitamin D", "user": {"attributes": {"team": "oncology"}}}).status_code == 200



def _stall_mid_body(base: str) -> socket.socket:
    """A client that sends its headers and part of its body, then goes quiet (the connection stays open)."""
    host, port = base.removeprefix("http://").split(":")
    client = socket.create_connection((host, int(port)))
    client.sendall(b"POST /v1/pipelines/roomy/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 100\r\n\r\n{\"query\": ")
    return client


def test_a_client_that_stalls_mid_body_gets_408_and_cannot_hold_a_shutdown(bm25_index, tmp_path):
    """An audit's client sent headers and half a body, then stalled: the connection stayed open for ever, and
    SIGTERM waited on it for ever ('Waiting for connections to close'). Bodies now have a deadline (408) and a
    shutdown a grace period."""
    import signal
    import time

    config = tmp_path / "roomy.yaml"
    config.write_text(ROOMY.format(index=bm25_index, log=tmp_path / "roomy.jsonl"), encoding="utf-8")
    with serve_in_subprocess([config], cwd=tmp_path, options=("--body-timeout", "1")) as base:
        client = _stall_mid_body(base)
        client.settimeout(60)  # the point is that an answer comes (it never did), not how fast on a busy machine
        chunks = []
        while chunk := client.recv(65536):  # headers and body may come in separate segments; the server closes
            chunks.append(chunk)
        client.close()
        answer = b"".join(chunks).decode()
        assert answer.startswith("HTTP/1.1 408"), answer
        assert '"type":"body_timeout"' in answer
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([str(SIEVE), "serve", str(config), "--port", str(port), "--log-level", "warning",
                                "--body-timeout", "600", "--shutdown-grace", "1"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = _stall_mid_body(f"http://127.0.0.1:{port}")
        time.sleep(0.5)
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)  # was: still running 40 s after SIGTERM
        assert time.monotonic() - began < 10
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_port_in_use_is_said_before_the_warm_up(bm25_index, tmp_path):
    import time

    config = tmp_path / "roomy.yaml"
    config.write_text(ROOMY.format(index=bm25_index, log=tmp_path / "roomy.jsonl"), encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        result = subprocess.run([str(SIEVE), "serve", str(config), "--port", str(port)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    assert "Application startup" not in result.stderr + result.stdout
    assert time.monotonic() - began < 30
