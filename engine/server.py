"""HTTP server: pipelines behind a small JSON API (FastAPI, served by uvicorn via ``sieve serve``).

    GET  /healthz                          the process is up
    GET  /readyz                           every pipeline is warmed up (200) or not (503)
    GET  /v1/pipelines                     each pipeline: name, config file and sha256, stages, output,
                                           stages unavailable after warm-up (``on_error: skip``)
    POST /v1/pipelines/{name}/search       one query: {"query", "history", "user", "as_of", "language",
                                           "explain", "include_trace"} -> ranked results with their
                                           documents, the trace id, whether the run was degraded
    POST /v1/pipelines/{name}/explain      the same body plus "doc_ids" and "top" -> each result's score
                                           tree, signal contributions, rules fired and dedup merges, and
                                           for each doc id where it left the pipeline (masked by which rule,
                                           never recalled and its would-be rank, dropped by which stage),
                                           as ``sieve explain --json``; the query's trace is logged too

Every pipeline is compiled and warmed up before the server accepts a request, so a bad config, a
missing index or a model that fails to load stops ``sieve serve`` at start with the same message
``sieve validate`` / ``sieve search`` give. Each query's trace is appended to the pipeline's
tamper-evident log (``trace.log``), as ``sieve search`` does; the response carries its ``trace_id``
so an auditor can find and replay it.

Errors are JSON, ``{"error": {"type": ..., "message": ...}}``, never a stack trace: 400 for a query
the pipeline refuses (empty, too long, too much history), 404 for an unknown pipeline, 413 for a
body over ``max_body_bytes``, 422 for a malformed body (with each field's location), 500 when a
stage fails (its message; the traceback goes to the server's log only) and 500 when the trace cannot
be appended to the log: results are never returned without their audit record.

The server has no authentication of its own and trusts the ``user`` in the body (access rules read
it): it belongs behind the gateway that authenticates callers; ``sieve serve`` listens on loopback
unless told otherwise.

Requests are served concurrently: FastAPI runs each search in its thread pool, and a warmed
pipeline is safe to share between threads.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.errors import QueryError, SieveError
from engine.model import UserContext

if TYPE_CHECKING:
    from fastapi import FastAPI

    from engine.pipeline import Pipeline

log = logging.getLogger("sieve.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above the longest query and history the limits allow
_LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")


class UserBody(BaseModel):
    """Who is asking (access rules read it; the trace records it)."""

    model_config = ConfigDict(extra="forbid")

    user_id: str | None = Field(None, max_length=256)
    roles: list[str] = Field(default_factory=list, max_length=64)
    groups: list[str] = Field(default_factory=list, max_length=256)
    jurisdictions: list[str] = Field(default_factory=list, max_length=64)
    attributes: dict[str, str] = Field(default_factory=dict)


class SearchBody(BaseModel):
    """One query. ``as_of`` without a time zone is UTC; absent, it is the time of the request."""

    model_config = ConfigDict(extra="forbid")

    query: str
    history: list[str] = Field(default_factory=list, description="earlier turns of the conversation, oldest first")
    user: UserBody | None = None
    as_of: datetime | None = None
    language: str | None = Field(None, max_length=35, description="a language tag, e.g. en or zh-CN")
    explain: bool = Field(False, description="return each result's explanation tree (when the config traces them)")
    include_trace: bool = Field(False, description="return the whole trace as well")

    @field_validator("language")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is not None and not _LANGUAGE_TAG.match(value):
            raise ValueError(f"not a language tag: {value!r} (e.g. en, zh-CN)")
        return value


class ExplainBody(SearchBody):
    """A query to explain: each result's score tree, signal contributions, rules fired and dedup merges
    (the first ``top``), and for each of ``doc_ids`` where it left the pipeline ('why not this document?')."""

    doc_ids: list[str] = Field(default_factory=list, max_length=100, description="why not these documents?")
    top: int | None = Field(None, ge=0, le=10_000, description="explain only the first N results (default: all)")
    explain: bool = Field(True, description="(always on here)")

    @field_validator("doc_ids")
    @classmethod
    def _ids(cls, value: list[str]) -> list[str]:
        for doc_id in value:
            if not doc_id or len(doc_id) > 512:
                raise ValueError("a document id is 1 to 512 characters")
        return value


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 as soon as it is seen to be (from its
    Content-Length, or while a chunked body arrives), never read into memory whole."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client has gone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from fastapi.responses import JSONResponse

        response = JSONResponse(status_code=413, content={"error": {
            "type": "body_too_large", "message": f"request body over {self.limit} bytes"}})
        await response(scope, receive, send)


def load_pipelines(configs: list[Path]) -> dict[str, "Pipeline"]:
    """Compile and warm up each config; pipelines are addressed by their config's ``name`` (else the file's
    stem)."""
    from engine.pipeline import Pipeline

    pipelines: dict[str, Pipeline] = {}
    for path in configs:
        pipeline = Pipeline.from_file(path)
        name = pipeline.compiled.config.name or Path(path).stem
        if name in pipelines:
            raise SieveError(
                f"two configs are named '{name}' ({pipelines[name].compiled.source_file} and {path}): "
                "the server addresses pipelines by name; rename one"
            )
        pipeline.warm_up()
        pipelines[name] = pipeline
    if not pipelines:
        raise SieveError("no pipeline to serve: give at least one config")
    return pipelines


def create_app(pipelines: dict[str, "Pipeline"], *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> "FastAPI":
    """The application over already-loaded pipelines."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from engine import __version__

    app = FastAPI(title="Sieve", version=__version__, description="Auditable rules-plus-model retrieval")

    def error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message, **extra}})

    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"location": ".".join(str(part) for part in problem.get("loc", ())),
                     "message": problem.get("msg", "")} for problem in exc.errors()]
        summary = "; ".join(f"{p['location']}: {p['message']}" for p in problems)
        return error(422, "invalid_request", f"malformed request: {summary}", problems=problems)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, "internal_error",
                     f"{type(exc).__name__}: {exc} (a bug in Sieve; the server log has the traceback)")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Any:
        waiting = [name for name, pipeline in pipelines.items() if pipeline.resources is None]
        if waiting:
            return error(503, "not_ready", f"not warmed up: {', '.join(waiting)}")
        return {"status": "ready", "pipelines": sorted(pipelines)}

    @app.get("/v1/pipelines")
    def list_pipelines() -> dict[str, Any]:
        return {"pipelines": [describe(name, pipeline) for name, pipeline in sorted(pipelines.items())]}

    def run(name: str, body: SearchBody, keep_outcomes: bool = False) -> Any:
        """The pipeline's run of the body's query, its trace appended to the log: (pipeline, result, log
        path), or the error response."""
        pipeline = pipelines.get(name)
        if pipeline is None:
            return error(404, "unknown_pipeline", f"no pipeline named '{name}'; served: {', '.join(sorted(pipelines))}")
        user = UserContext(**body.user.model_dump()) if body.user is not None else None
        try:
            query = pipeline.make_query(body.query, history=body.history, user=user, as_of=body.as_of,
                                        language=body.language)
        except QueryError as exc:
            return error(400, "bad_query", str(exc))
        try:
            result = pipeline.run(query, keep_outcomes=keep_outcomes)
        except SieveError as exc:
            log.error("pipeline '%s' failed: %s", name, exc)
            return error(500, "stage_failed", str(exc))
        try:
            log_path = pipeline.log_trace(result.trace)
        except (OSError, SieveError) as exc:  # no unaudited answers: the results are withheld
            log.error("pipeline '%s': trace %s not logged: %s", name, result.trace["trace_id"], exc)
            return error(500, "trace_not_logged", f"the query ran but its trace could not be appended to the log "
                         f"({type(exc).__name__}: {exc}); results are withheld", trace_id=result.trace["trace_id"])
        return pipeline, result, log_path

    @app.post("/v1/pipelines/{name}/search")
    def search(name: str, body: SearchBody) -> Any:
        ran = run(name, body)
        if isinstance(ran, JSONResponse):
            return ran
        pipeline, result, log_path = ran
        return respond(name, pipeline, result, body, log_path)

    @app.post("/v1/pipelines/{name}/explain")
    def explain(name: str, body: ExplainBody) -> Any:
        from engine.workbench.inspect import explain_report, why_not

        ran = run(name, body, keep_outcomes=True)
        if isinstance(ran, JSONResponse):
            return ran
        pipeline, result, log_path = ran
        verdicts = [why_not(pipeline, result, doc_id) for doc_id in dict.fromkeys(body.doc_ids)]
        return {
            "pipeline": name,
            "trace_log": str(log_path) if log_path is not None else None,
            "query": {"text": body.query, "rewritten": result.trace["query"].get("rewritten")},
            "degraded": result.degraded,
            "explain_in_trace": pipeline.compiled.config.trace.explain,
            **explain_report(result.trace, verdicts, body.top),
        }

    return app


def describe(name: str, pipeline: "Pipeline") -> dict[str, Any]:
    compiled = pipeline.compiled
    return {
        "name": name,
        "description": compiled.config.description,
        "config": str(compiled.source_file),
        "config_sha256": compiled.config_sha256,
        "stages": [{"id": stage_id, "type": compiled.specs[stage_id].type} for stage_id in compiled.order],
        "output": compiled.output,
        "unavailable": dict(pipeline.unavailable),
    }


def respond(name: str, pipeline: "Pipeline", result: Any, body: SearchBody, log_path: Path | None) -> dict[str, Any]:
    """The search response: results with their documents (read from the index), the trace's identity."""
    trace = result.trace
    index = pipeline.resources.index if pipeline.resources is not None else None
    documents = index.documents.get([c.row for c in result.results]) if index is not None and result.results else {}
    results = []
    for record, candidate in zip(trace["results"], result.results):
        item: dict[str, Any] = {"rank": record["rank"], "doc_id": record["doc_id"], "score": record["score"]}
        document = documents.get(candidate.row)
        if document is not None:
            item["document"] = {"title": document.title, "text": document.text, "metadata": document.metadata}
        if body.explain and "explanation" in record:
            item["explanation"] = record["explanation"]
        results.append(item)
    response: dict[str, Any] = {
        "pipeline": name,
        "trace_id": trace["trace_id"],
        "trace_log": str(log_path) if log_path is not None else None,
        "query": {"text": body.query, "rewritten": trace["query"].get("rewritten")},
        "degraded": result.degraded,
        "timing_ms": trace["timing_ms"]["total"],
        "results": results,
    }
    if body.include_trace:
        response["trace"] = trace
    return response


@contextlib.contextmanager
def serve_in_subprocess(configs: list[Path], *, cwd: Path | None = None, timeout: float = 120.0,
                        log_level: str = "warning") -> Iterator[str]:
    """``sieve serve`` in a child process on a free loopback port: yields its base URL once ``/readyz``
    answers 200, stops it on exit. A server that exits, or is not ready within ``timeout`` seconds,
    raises SieveError with its output. For integration tests and benchmarks."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sieve = Path(sys.executable).with_name("sieve")
    process = subprocess.Popen([str(sieve), "serve", *map(str, configs), "--port", str(port), "--log-level", log_level],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with direct.open(f"{base}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:  # not listening yet, or 503 while warming up
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = process.stdout.read() if process.stdout is not None else ""
                raise SieveError(f"sieve serve did not become ready on {base}:\n{output}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def serve(configs: list[Path], host: str, port: int, log_level: str = "info") -> None:
    """Load and warm every pipeline, then serve until interrupted."""
    import uvicorn

    pipelines = load_pipelines(configs)
    app = create_app(pipelines)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
