"""HTTP server: pipelines behind a small JSON API (FastAPI, served by uvicorn via ``sieve serve``).

    GET  /healthz                          the process is up
    GET  /readyz                           every pipeline is warmed up and can log its traces (200) or not
                                           (503, with the reason); says when an index was rebuilt on disk
    GET  /v1/pipelines                     each pipeline: name, config file and sha256, stages, output,
                                           stages unavailable after warm-up (``on_error: skip``), what
                                           its requests may ask beyond results (``allows``), its warnings
                                           (whole only where it allows include_trace; see ``describe``)
    POST /v1/pipelines/{name}/search       one query: {"query", "history", "user", "as_of", "language",
                                           "explain", "include_trace"} -> ranked results with their
                                           documents, the trace id, whether the run was degraded
    GET  /metrics                          Prometheus text format: requests by pipeline, endpoint and status
                                           code, request and query latency, each stage's latency and
                                           outcome (ok / skipped / bypassed), degraded and empty queries,
                                           errors by kind, trace-log and index state
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

Every response carries ``X-Request-ID`` (the caller's, or a new one; see :class:`Front`). Errors are JSON,
``{"error": {"type": ..., "message": ..., "request_id": ...}}``, never a stack trace: 400 for a query
the pipeline refuses (empty, too long, too much history), 404 for an unknown pipeline (``unknown_pipeline``)
or path (``not_found``), 403 (``not_allowed``) for ``as_of``, ``include_trace`` or the explain endpoint where
the pipeline's ``server:`` settings do not allow them (each off by default), 405 for a wrong method, 413 for a body over ``max_body_bytes``, 415 for a body
that is not ``application/json`` (UTF-8) or is compressed (``Content-Encoding``: the server decodes
none), 422 for a malformed body (``invalid_request``: not UTF-8, not JSON, nested too deeply, a key given
twice, a field of the wrong type or a string holding a lone surrogate; each problem located, the first
20 listed), 500 when a stage fails (its message; the traceback goes to the server's log only) and 500
when the trace cannot be appended to the log: results are never returned without their audit record; 503
``overloaded`` beyond ``--limit-concurrency`` requests at once, 503 ``shutting_down`` for a request still running
when the shutdown's grace ran out.

Bodies are read strictly: booleans are ``true``/``false``, ``top`` an integer, strings strings (no
coercion between types), ``as_of`` an ISO 8601 date or date-time string (never a Unix timestamp), and
``history`` at most 1000 turns (the pipeline's ``limits.max_history_turns`` is checked after, as 400).
``max_body_bytes`` defaults to what the served pipelines' limits allow, JSON-escaped at worst (12 bytes a
character, an astral character being two ``\\uXXXX`` escapes): 12 bytes x ``max_query_chars`` x
(``max_history_turns`` + 1) for the query and its history, 12 bytes x 512 characters x 100 for ``doc_ids``,
plus 256 KiB for the user and the rest, for the most generous pipeline; never below 1 MiB nor above 64 MiB.

The server has no authentication of its own and trusts the ``user`` in the body (access rules read
it): it belongs behind the gateway that authenticates callers; ``sieve serve`` listens on loopback
unless told otherwise. What gives a caller more than its user's results (choosing the time the rules are
judged at, the whole trace, the explain endpoint) is each refused unless the pipeline's config allows it
(``server:``, see ``engine.config.ServerSettings``).

Requests are served concurrently: FastAPI runs each search in its thread pool, and a warmed
pipeline is safe to share between threads.

Each pipeline serves the index version it opened at start, for its whole life: an index rebuilt at the
same path (``sieve index --out`` swaps a new directory in) is not mixed in (engine.index.Index), and
is not picked up either; restart the server to serve it. ``/readyz`` and ``GET /v1/pipelines`` say when
an index was replaced on disk since start (``index_replaced_on_disk``, the serving and the on-disk
manifest sha256) and the server logs a warning once per change; readiness stays 200, since the server
still answers consistently from the version it opened (taking every replica out of rotation at once
after a rebuild would be an outage). An index rebuilt identically (the same manifest sha256: the same
corpus and settings, builds being deterministic) is the index served, so it is not reported as replaced
and needs no restart: ``GET /v1/pipelines`` shows it as ``rebuilt_identically`` and the server logs it
once, at INFO. An index replaced while the server warms up is opened again.

Readiness also follows the trace log: when an append fails for a reason of the log's storage (an
OSError: disk full, permissions, the log's path not a file) and none has succeeded since, every query
would get 500 ``trace_not_logged``, so ``/readyz`` answers 503 ``trace_log_failing`` with the error. A
probe re-checks the log's storage without a query (the log's directory writable, the log a writable
file, at least ``MIN_LOG_FREE_BYTES`` free there) and reports ready again once it is; the next append
that succeeds clears the state too, one that fails sets it again.

The server never starts a second chain under a log's name (engine.trace, ``TraceLogReplaced``): once it has
appended to a log (or found it at start, ending at a record), an append that finds the file removed (its
directory deleted), emptied or replaced by another file, which no ``sieve trace rotate`` explains, is refused:
500 ``trace_not_logged``, ``/readyz`` 503 and ``sieve_trace_log_failing`` 1. It recovers by itself once the
chain is back at the path: the file (or its directory) moved back, or a copy that holds the record it last
appended; an empty directory or a new file does not count. To start a new log deliberately, restart the server
(or rotate the log with ``sieve trace rotate``, which keeps the chain and needs no restart).
"""

from __future__ import annotations

import contextlib
import contextvars
import email.message
import json
import logging
import logging.config
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictBool, StrictInt
from pydantic import StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from engine.config import did_you_mean, models_in
from engine.console import written_out
from engine.errors import QueryError, SieveError
from engine.model import LANGUAGE_TAG, UserContext, iso_moment, not_a_moment
from engine.strictness import LONE_SURROGATE, FlawedObject, json_kind, refused_keys, strict_object

if TYPE_CHECKING:
    from fastapi import FastAPI

    from engine.pipeline import Pipeline

log = logging.getLogger("sieve.server")

MIN_MAX_BODY_BYTES = 1 << 20  # the default body limit is never below 1 MiB (see default_max_body_bytes)
# ... nor above 64 MiB: limits raised within their ranges (max_query_chars 1,000,000 x 1,000 turns) allowed a 12 GB
# body, held in memory and copied into the trace log whole
MAX_MAX_BODY_BYTES = 64 << 20
ESCAPED_CHAR_BYTES = 12  # the most JSON bytes one character can take: an astral one as two \uXXXX escapes
BODY_OVERHEAD_BYTES = 256 << 10  # the user, as_of, language and the JSON around them
MAX_HISTORY_ITEMS = 1000  # the schema's cap; the pipeline's limits.max_history_turns applies within it
MAX_DOC_IDS = 100
MAX_DOC_ID_CHARS = 512
MAX_PROBLEMS = 20  # a 422 lists the first 20 problems and counts the rest
MIN_LOG_FREE_BYTES = 1 << 20  # /readyz after a failed trace append: free space the log's disk needs (a trace ~30 KB)
_SUMMARY_PROBLEMS = 3  # ... and its message names the first 3

_PIPELINE_NAME = re.compile(r"[A-Za-z0-9._-]+")  # one URL path segment, as it is, with no escaping


def _unicode_text(value: Any) -> Any:
    """A string as JSON can carry it but UTF-8 cannot (``"\\ud800"``) is refused before it goes anywhere (a
    BeforeValidator: pydantic's own string checks would fail on it with a less helpful message)."""
    found = LONE_SURROGATE.search(value) if isinstance(value, str) else None
    if found is not None:
        raise PydanticCustomError("lone_surrogate", "contains a lone surrogate ({code}), not valid Unicode text",
                                  {"code": f"\\u{ord(found.group()):04x}"})
    return value


def _doc_id(value: str) -> str:
    if not 1 <= len(value) <= MAX_DOC_ID_CHARS:
        raise PydanticCustomError("doc_id", f"a document id is 1 to {MAX_DOC_ID_CHARS} characters")
    return value


# strings are strings (no coercion from numbers), and valid Unicode text
Text = Annotated[str, Strict(), BeforeValidator(_unicode_text)]
UserId = Annotated[str, Strict(), StringConstraints(max_length=256), BeforeValidator(_unicode_text)]
AttributeName = Annotated[str, Strict(), StringConstraints(max_length=128), BeforeValidator(_unicode_text)]
AttributeValue = Annotated[str, Strict(), StringConstraints(max_length=256), BeforeValidator(_unicode_text)]
LanguageTag = Annotated[str, Strict(), StringConstraints(max_length=35), BeforeValidator(_unicode_text)]
DocId = Annotated[str, Strict(), AfterValidator(_doc_id), BeforeValidator(_unicode_text)]


class UserBody(BaseModel):
    """Who is asking (access rules read it; the trace records it)."""

    model_config = ConfigDict(extra="forbid")

    user_id: UserId | None = None
    roles: list[Text] = Field(default_factory=list, max_length=64)
    groups: list[Text] = Field(default_factory=list, max_length=256)
    jurisdictions: list[Text] = Field(default_factory=list, max_length=64)
    attributes: dict[AttributeName, AttributeValue] = Field(default_factory=dict, max_length=32)


class SearchBody(BaseModel):
    """One query. ``as_of`` is an ISO 8601 date or date-time string; without a time zone it is UTC; absent, it
    is the time of the request. Types are strict: no string is read as a boolean or a number, nor a number as a
    string or a time."""

    model_config = ConfigDict(extra="forbid")

    query: Text
    history: list[Text] = Field(default_factory=list, max_length=MAX_HISTORY_ITEMS,
                                description="earlier turns of the conversation, oldest first")
    user: UserBody | None = None
    as_of: datetime | None = Field(None, description="ISO 8601, e.g. 2025-06-01 or 2025-06-01T12:00:00Z")
    language: LanguageTag | None = Field(None, description="a language tag, e.g. en or zh-CN")
    explain: StrictBool = Field(False, description="return each result's explanation tree (when the config traces "
                                "them)")
    include_trace: StrictBool = Field(False, description="return the whole trace as well")

    @field_validator("as_of", mode="before")
    @classmethod
    def _iso_8601(cls, value: Any) -> Any:
        """Only an ISO 8601 string: a number (or a string of digits) would otherwise be read as Unix seconds or
        milliseconds, silently."""
        if value is None:
            return value
        if not isinstance(value, str):
            raise PydanticCustomError("iso_8601", "must be an ISO 8601 date or date-time string (e.g. 2025-06-01 "
                                      "or 2025-06-01T12:00:00Z), not a {kind}", {"kind": json_kind(value)})
        moment = iso_moment(value)
        if moment is None:
            raise PydanticCustomError("iso_8601", "{reason}", {"reason": not_a_moment(value)})
        return moment

    @field_validator("language")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is not None and not LANGUAGE_TAG.fullmatch(value):
            raise ValueError(f"not a language tag: {value!r} (e.g. en, zh-CN)")
        return value


class ExplainBody(SearchBody):
    """A query to explain: each result's score tree, signal contributions, rules fired and dedup merges
    (the first ``top``), and for each of ``doc_ids`` where it left the pipeline ('why not this document?')."""

    doc_ids: list[DocId] = Field(default_factory=list, max_length=MAX_DOC_IDS, description="why not these documents?")
    top: StrictInt | None = Field(None, ge=0, le=10_000, description="explain only the first N results (default: "
                                  "all)")
    explain: StrictBool = Field(True, description="(always on here)")


class BodyError(Exception):
    """A request body the server will not read: ``status`` and ``kind`` for the error, and for a 422 the
    problems, each ``(location, message)``."""

    def __init__(self, status: int, kind: str, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.problems = problems or []


def _flawed_keys(document: Any) -> list[tuple[str, str]]:
    """Each refused key in an object of the parsed body: (its location, the message)."""
    found: list[tuple[str, str]] = []
    for path, flaw in refused_keys(document):
        key = path[-1]
        location = ".".join(("body", *path))
        if flaw == "unreadable":
            code = f"\\u{ord(LONE_SURROGATE.search(key).group()):04x}"  # type: ignore[union-attr]
            found.append((location, f"the key contains a lone surrogate ({code}), not valid Unicode text"))
        else:
            found.append((location, f"duplicate key {key!r}: a JSON object gives each key once"))
    return found


class _NumberTooLong(ValueError):
    pass


_MAX_INT_DIGITS = 30


def _json_int(digits: str) -> int:
    """``json.loads``'s parse_int: no field takes an integer near 30 digits, and one of thousands would stop
    ``int()`` with a ValueError json.loads does not locate."""
    if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
        raise _NumberTooLong(f"a JSON integer of {len(digits.lstrip('-'))} digits is too long (the server reads "
                             f"at most {_MAX_INT_DIGITS})")
    return int(digits)


def read_json_body(content_type: str | None, content_encoding: str | None, raw: bytes) -> Any:
    """The JSON document a request body holds, read strictly: BodyError (415) unless it is ``application/json``
    in UTF-8 and not compressed; BodyError (422) when it is empty, not UTF-8, not JSON, nested too deeply, gives
    a key twice in one object or a key with a lone surrogate (strings are checked by the body's model)."""
    if content_encoding is not None and content_encoding.strip().lower() not in ("", "identity"):
        raise BodyError(415, "unsupported_media_type", f"the body has Content-Encoding {content_encoding!r}: the "
                        "server decodes no compressed body; send it as it is")
    header = email.message.Message()
    header["content-type"] = content_type or ""
    if not content_type or header.get_content_type() != "application/json":
        given = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise BodyError(415, "unsupported_media_type", f"the body must be JSON, sent as Content-Type: "
                        f"application/json (the request has {given})")
    charset = header.get_param("charset")
    if isinstance(charset, str) and charset.strip().lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise BodyError(415, "unsupported_media_type", f"JSON is UTF-8: charset {charset!r} is not read")

    def invalid(message: str) -> BodyError:
        return BodyError(422, "invalid_request", message, [("body", message)])

    if not raw:
        raise invalid("empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None
    flawed = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal flawed
        obj = strict_object(items)
        flawed = flawed or isinstance(obj, FlawedObject)
        return obj

    try:
        document = json.loads(text, object_pairs_hook=pairs, parse_int=_json_int)
    except json.JSONDecodeError as exc:
        raise invalid(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except _NumberTooLong as exc:
        raise invalid(str(exc)) from None
    except RecursionError:
        raise invalid("JSON nested too deeply") from None
    if flawed:
        raise BodyError(422, "invalid_request", "refused keys", _flawed_keys(document))
    return document


# seconds: a BM25 stage takes a millisecond, a CPU reranker a second
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ENDPOINTS = frozenset({"search", "explain"})


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (two apps in one process do not share counts).
    Labels are bounded: a pipeline label is a served pipeline's name (anything else is ``-``), an endpoint one of
    the API's, a stage a configured stage id, so no request can grow the series without limit."""

    def __init__(self, pipelines: dict[str, "Pipeline"]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self._pipelines = pipelines
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sieve_requests", "HTTP requests answered, by pipeline, endpoint and status code",
                                ["pipeline", "endpoint", "code"], registry=registry)
        self.request_seconds = Histogram("sieve_request_duration_seconds", "time to answer an HTTP request "
                                         "(reading the body, the query, logging its trace, the response)",
                                         ["pipeline", "endpoint"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.query_seconds = Histogram("sieve_query_duration_seconds", "a query's run through its pipeline "
                                       "(the trace's timing_ms.total); this, the stage, degraded and empty counts "
                                       "cover the queries answered (one whose trace could not be logged is counted "
                                       "in sieve_query_errors_total{type=\"trace_not_logged\"} only)", ["pipeline"],
                                       buckets=_LATENCY_BUCKETS, registry=registry)
        self.stage_seconds = Histogram("sieve_stage_duration_seconds", "a stage's run for one query (stages that "
                                       "ran: status ok or skipped)", ["pipeline", "stage"], buckets=_LATENCY_BUCKETS,
                                       registry=registry)
        self.stage_runs = Counter("sieve_stage_runs", "what each stage did per query: ok, skipped (on_error: skip, "
                                  "at the deadline or on a failure: the query ran degraded) or bypassed (its `when` "
                                  "did not hold)", ["pipeline", "stage", "status"], registry=registry)
        self.degraded = Counter("sieve_degraded_queries", "queries that ran with a stage skipped", ["pipeline"],
                                registry=registry)
        self.empty = Counter("sieve_empty_queries", "queries that returned no document", ["pipeline"],
                             registry=registry)
        self.errors = Counter("sieve_query_errors", "queries refused or failed, by the error's type (bad_query, "
                              "stage_failed, trace_not_logged)", ["pipeline", "type"], registry=registry)
        self.info = Gauge("sieve_pipeline_info", "each served pipeline (always 1), with its config's sha256",
                          ["pipeline", "config_sha256", "engine_version"], registry=registry)
        self.log_failing = Gauge("sieve_trace_log_failing", "1 while the pipeline's trace log cannot be appended "
                                 "to (every query is refused), else 0", ["pipeline"], registry=registry)
        self.index_replaced = Gauge("sieve_index_replaced_on_disk", "1 when the pipeline's index was rebuilt on "
                                    "disk since the server opened it (it still serves the one it opened), else 0",
                                    ["pipeline"], registry=registry)
        from engine import __version__

        self.log_free = Gauge("sieve_trace_log_free_bytes", "free space on the disk of the pipeline's trace log "
                              "(alert before it fills: appends then fail and queries are refused)", ["pipeline"],
                              registry=registry)
        for name, pipeline in pipelines.items():
            self.info.labels(name, pipeline.compiled.config_sha256, __version__).set(1)
            # each series there from the start, at 0: an alert on rate() sees 0, not "no data", until the first
            self.degraded.labels(name)
            self.empty.labels(name)
            for kind in ("bad_query", "stage_failed", "trace_not_logged"):
                self.errors.labels(name, kind)

    def labels_of(self, path: str) -> tuple[str, str]:
        """(pipeline, endpoint) of a request path; ``-`` for a pipeline not served, ``other`` for a path not
        the API's (``//v1/pipelines/X/search`` or ``.../search/`` are not the search endpoint: no route serves
        them)."""
        parts = path.split("/")  # exactly as the router matches: "/v1/pipelines/{name}/{endpoint}", nothing around it
        if len(parts) == 5 and parts[:3] == ["", "v1", "pipelines"] and parts[3] and parts[4] in _ENDPOINTS:
            return (parts[3] if parts[3] in self._pipelines else "-"), parts[4]
        if path in ("/healthz", "/readyz", "/metrics", "/v1/pipelines"):
            return "-", path.strip("/").replace("v1/", "")
        return "-", "other"

    def answered(self, path: str, code: int, seconds: float) -> None:
        pipeline, endpoint = self.labels_of(path)
        self.requests.labels(pipeline, endpoint, str(code)).inc()
        self.request_seconds.labels(pipeline, endpoint).observe(seconds)

    def ran(self, name: str, result: Any) -> None:
        """One query answered: its latency, each stage's, what each stage did. Called once its trace is logged: a
        query whose results were withheld (500 trace_not_logged) is counted in ``errors`` only, not as run."""
        trace = result.trace
        self.query_seconds.labels(name).observe(float(trace["timing_ms"]["total"]) / 1000.0)
        for stage in trace["stages"]:
            status = str(stage.get("status", "ok"))
            self.stage_runs.labels(name, stage["id"], status).inc()
            if status != "bypassed":
                self.stage_seconds.labels(name, stage["id"]).observe(float(stage.get("duration_ms", 0.0)) / 1000.0)
        if result.degraded:
            self.degraded.labels(name).inc()
        if not result.results:
            self.empty.labels(name).inc()

    def failed(self, name: str, kind: str) -> None:
        self.errors.labels(name, kind).inc()

    def exposition(self, health: "_Health") -> tuple[bytes, str]:
        """The scrape's text, with the trace-log and index gauges as they are now."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        failing = health.log_failures()
        replaced = set(health.replaced_indexes())
        for name, pipeline in self._pipelines.items():
            self.log_failing.labels(name).set(1 if name in failing else 0)
            self.index_replaced.labels(name).set(1 if name in replaced else 0)
            target = pipeline.compiled.config.trace.log
            if target is not None:
                with contextlib.suppress(OSError):  # its directory gone: the failing gauge says what matters
                    disk = os.statvfs(Path(target).absolute().parent)
                    self.log_free.labels(name).set(disk.f_bavail * disk.f_frsize)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# The request being answered: its id (X-Request-ID), in every response's header, error body and the server's log
# lines about it. A context variable, so the handlers' threads see it too (anyio copies the context into them).
REQUEST_ID: "contextvars.ContextVar[str]" = contextvars.ContextVar("sieve_request_id", default="-")
# Where a request's handler and :class:`Front` meet when the shutdown cuts the request: a handler's thread cannot be
# cancelled, so it may run on after the cut. Under ``lock``: ``cut`` (set by Front: the handler then logs no trace
# and answers nothing), ``logging`` (set by the handler before it appends the query's trace: the cut then says the
# query was logged), ``trace_id`` and ``response`` (what the handler answered).
ANSWER: "contextvars.ContextVar[dict[str, Any] | None]" = contextvars.ContextVar("sieve_answer", default=None)


class _Appends:
    """How many handlers are appending a trace to a log (from :func:`_claim_log` to :meth:`done`): a server stopping
    waits for those, and for nothing else its handlers still run (see :func:`serve`)."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    def began(self) -> None:
        with self._changed:
            self._count += 1

    def done(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait(self, timeout: float) -> bool:
        """Whether every append under way ended within ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout)


APPENDS = _Appends()
APPEND_WAIT_S = 10.0  # how long a stopping server waits for traces being appended (an fsync'd line: milliseconds)


def _claim_log(trace_id: str) -> bool:
    """Before a handler appends a query's trace: False when the shutdown cut the request (nothing is logged, so the
    client's 503 says true: it did not run to the log); else it records that the trace is being logged, and counts
    the append in :data:`APPENDS` until the handler says it is done."""
    state = ANSWER.get()
    if state is None:
        APPENDS.began()
        return True
    with state["lock"]:
        if state.get("cut"):
            return False
        state["logging"], state["trace_id"] = True, trace_id
        APPENDS.began()  # under the lock: a cut from now on finds the append counted
        return True
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_GONE = 499  # counted for a request whose client went away before any answer (nothing was sent)
_PROBES = frozenset({"/healthz", "/readyz", "/metrics"})  # never shed: a liveness probe failing under load restarts


class Front:
    """The outermost ASGI middleware. Each HTTP request gets an id (the caller's ``X-Request-ID`` when it is one of
    letters, digits and ``._:-``, up to 128; else a new one), sent back in ``X-Request-ID``. Beyond ``limit``
    requests at once a request gets a JSON 503 ``overloaded`` at once (the probes and /metrics never are). A
    request still open when the shutdown's grace ran out (uvicorn cancels it) is answered as it stands
    (:meth:`_cut`), not with uvicorn's plain-text 500 and a traceback. Every request's status and time go into
    :class:`Metrics`: one whose client went away before any answer counts as 499, not as a server error."""

    def __init__(self, app: Any, metrics: Metrics, limit: int | None = None):
        self.app = app
        self.metrics = metrics
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import asyncio

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        answer: dict[str, Any] = {"lock": threading.Lock()}
        answer_token = ANSWER.set(answer)
        code: list[int | None] = [None]

        async def sent(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                code[0] = int(message["status"])
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            probe = scope.get("path") in _PROBES  # never refused, and not counted against the limit
            if self.limit is not None and self.in_flight >= self.limit and not probe:
                await _error_response(503, "overloaded", f"more than {self.limit} requests at once (the server's "
                                      "--limit-concurrency): retry later", request_id)(scope, receive, sent)
                return
            self.in_flight += 0 if probe else 1
            try:
                await self.app(scope, receive, sent)
            except asyncio.CancelledError:  # the shutdown's grace ran out: uvicorn cancels what still runs
                if code[0] is None:
                    await self._cut(scope, receive, sent, request_id, answer)
            except BaseException:
                if code[0] is None:
                    code[0] = 500  # raised past every exception handler: uvicorn answers 500
                raise
            finally:
                self.in_flight -= 0 if probe else 1
        finally:
            ANSWER.reset(answer_token)
            REQUEST_ID.reset(token)
            self.metrics.answered(scope.get("path", ""), code[0] if code[0] is not None else CLIENT_GONE,
                                  time.perf_counter() - began)


    @staticmethod
    async def _cut(scope: dict[str, Any], receive: Any, send: Any, request_id: str, answer: dict[str, Any]) -> None:
        """A request whose task the shutdown cancelled; its handler's thread, which no cancel stops, may run on. One
        whose answer is ready gets it. One whose trace is logged (or being logged) gets 503 ``shutting_down`` naming
        its ``trace_id``: it ran, so a blind retry would run it twice. Any other gets 503 ``shutting_down``, to retry
        elsewhere, and its handler logs nothing from now on (``_claim_log``): no trace of an answer never sent."""
        from fastapi.encoders import jsonable_encoder
        from fastapi.responses import JSONResponse

        with answer["lock"]:
            answer["cut"] = True
            ready, logging, trace_id = answer.get("response"), answer.get("logging"), answer.get("trace_id")
        where = f"{scope.get('method', '')} {written_out(scope.get('path', ''))}"
        if ready is not None:
            log.warning("request %s %s: the shutdown's grace ran out as it was answered; its answer is sent",
                        request_id, where)
            response = ready if isinstance(ready, JSONResponse) else JSONResponse(jsonable_encoder(ready))
        elif logging:
            log.warning("request %s %s: cut by the shutdown after its query ran (trace %s logged); answered 503",
                        request_id, where, trace_id)
            response = _error_response(503, "shutting_down", f"the server is shutting down: this request's query ran "
                                       f"and its trace {trace_id} was logged, but the grace ran out before its answer "
                                       "was sent; ask again knowing it ran", request_id, trace_id=trace_id)
        else:
            log.warning("request %s %s: cut by the shutdown (its grace ran out) before its query was logged; answered "
                        "503 shutting_down", request_id, where)
            response = _error_response(503, "shutting_down", "the server is shutting down and its grace ran out "
                                       "before this request's query ran to the log: retry (on another replica)",
                                       request_id)
        with contextlib.suppress(Exception):  # the connection may be gone too
            await response(scope, receive, send)


def _error_response(status: int, kind: str, message: str, request_id: str | None = None, *,
                    headers: dict[str, str] | None = None, **extra: Any) -> Any:
    """The server's error shape, ``{"error": {"type", "message", "request_id", ...extra}}``."""
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, headers=headers, content={"error": {
        "type": kind, "message": _printable(message), "request_id": request_id or REQUEST_ID.get(), **extra}})



class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 as soon as it is seen to be (from its
    Content-Length, or while a chunked body arrives), never read into memory whole; a body that has not
    arrived whole within ``timeout`` seconds gets 408 (a client that stalls mid-body would otherwise hold its
    connection, and a graceful shutdown, for ever)."""

    def __init__(self, app: Any, limit: int, timeout: float = 30.0):
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._reject(scope, receive, send)
            return
        import asyncio

        chunks: list[bytes] = []
        size = 0
        more = True
        deadline = asyncio.get_running_loop().time() + self.timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                await self._timed_out(scope, send)
                return
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

    async def _timed_out(self, scope: dict[str, Any], send: Any) -> None:
        response = _error_response(408, "body_timeout", f"the request body did not arrive whole within "
                                   f"{self.timeout:g} s", headers={"connection": "close"})

        async def gone() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        await response(scope, gone, send)

    async def _reject(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _error_response(413, "body_too_large", f"request body over {self.limit} bytes")(scope, receive, send)


def load_pipelines(configs: list[Path]) -> dict[str, "Pipeline"]:
    """Compile each config, then warm each up; pipelines are addressed by their config's ``name`` (else the
    file's stem), which must do as one URL path segment (letters, digits, '.', '_', '-') and be unique."""
    from engine.pipeline import Pipeline

    pipelines: dict[str, Pipeline] = {}
    for path in configs:
        pipeline = Pipeline.from_file(path)
        name = pipeline.compiled.config.name or Path(path).stem
        if not _PIPELINE_NAME.fullmatch(name) or name in (".", ".."):
            raise SieveError(
                f"{path}: pipeline name {name!r} cannot be served: the server addresses a pipeline by its name as "
                "one URL path segment (/v1/pipelines/{name}/search), so a name may use only letters, digits, '.', "
                "'_' and '-' (and is not '.' or '..'); rename it (the config's `name`, else the file's name)"
            )
        if name in pipelines:
            raise SieveError(
                f"two configs are named '{name}' ({pipelines[name].compiled.source_file} and {path}): "
                "the server addresses pipelines by name; rename one"
            )
        pipelines[name] = pipeline
    if not pipelines:
        raise SieveError("no pipeline to serve: give at least one config")
    for name, pipeline in pipelines.items():  # only once every config is known to be servable
        try:
            pipeline.warm_up()  # (an index rebuilt while it loads is opened again there)
        except SieveError as exc:  # which of the served configs failed
            raise SieveError(f"pipeline '{name}' ({pipeline.compiled.source_file}): {exc}") from exc
        # at start, where the operator looks (also in /v1/pipelines): what `sieve validate` warns of in the config
        # (an expired rule, a disabled stage, a deadline that cuts nothing...), then what warm-up found
        for issue in pipeline.compiled.warnings:
            log.warning("pipeline '%s': config: %s", name, issue)
        for warning in pipeline.warnings:
            log.warning("pipeline '%s': %s", name, warning)
        if pipeline.compiled.config.trace.log is not None:
            from engine.trace import TraceLog

            # where the log ends now: one removed or replaced before the first query is refused, not begun anew
            TraceLog(pipeline.compiled.config.trace.log).remember_end()
    return pipelines


def default_max_body_bytes(pipelines: dict[str, "Pipeline"]) -> int:
    """The largest body the pipelines' limits allow, JSON-escaped at worst (12 bytes a character): the query and
    each turn of history at ``max_query_chars`` (history capped by the schema's 1000 turns), 100 document ids of
    512 characters (``/explain``), plus 256 KiB for the user and the rest; the most of any pipeline, never below
    1 MiB and never above 64 MiB (``MAX_MAX_BODY_BYTES``: a larger query gets 413; the server logs it at start)."""
    return min(MAX_MAX_BODY_BYTES, max(MIN_MAX_BODY_BYTES, _needed_body_bytes(pipelines)))


def _needed_body_bytes(pipelines: dict[str, "Pipeline"]) -> int:
    chars = max((limits.max_query_chars * (min(limits.max_history_turns, MAX_HISTORY_ITEMS) + 1)
                 for limits in (pipeline.compiled.config.limits for pipeline in pipelines.values())), default=0)
    return ESCAPED_CHAR_BYTES * (chars + MAX_DOC_IDS * MAX_DOC_ID_CHARS) + BODY_OVERHEAD_BYTES


def _printable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate becomes its escape (``\\ud800``)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _clip(text: str, limit: int) -> str:
    text = _printable(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _body_problem(problem: dict[str, Any], body: type[BaseModel]) -> str:
    """One problem of a request body in the caller's terms: an unknown key with the closest known one and the keys
    the object takes (as ``sieve batch`` says of a queries file), rather than pydantic's 'Extra inputs are not
    permitted'."""
    location = tuple(problem.get("loc", ()))
    if problem.get("type") != "extra_forbidden" or len(location) < 2 or location[0] != "body":
        return str(problem.get("msg", ""))
    owner: type[BaseModel] | None = body
    for part in location[1:-1]:  # the object holding the key: the body, or its user
        field = owner.model_fields.get(str(part)) if owner is not None else None
        owner = next(iter(models_in(field.annotation)), None) if field is not None else None
    if owner is None:
        return str(problem.get("msg", ""))
    key, known = str(location[-1]), list(owner.model_fields)
    endpoint = "an explain" if body is ExplainBody else "a search"
    what = f"{endpoint} body takes" if owner is body else f"{location[-2]} takes"
    if owner is body and key == "text":
        hint = " (the query's text is 'query' here; 'text' is a batch file's key)"
    elif owner is body and body is SearchBody and key in ExplainBody.model_fields:
        hint = f" ('{key}' is a key of the explain endpoint, POST /v1/pipelines/{{name}}/explain)"
    else:
        hint = did_you_mean(key, known)
    return f"unknown key{hint}; {what}: {', '.join(known)}"


def _invalid_request(problems: list[tuple[str, str]]) -> tuple[str, dict[str, Any]]:
    """A 422's message and extra fields: the first MAX_PROBLEMS problems (each location and message clipped)
    and the count of the rest; the message names the first few. However many problems a body has, the answer
    stays small."""
    listed = [{"location": _clip(location, 200), "message": _clip(message, 300)}
              for location, message in problems[:MAX_PROBLEMS]]
    summary = "; ".join(f"{p['location']}: {p['message']}" for p in listed[:_SUMMARY_PROBLEMS])
    rest = len(problems) - _SUMMARY_PROBLEMS
    if rest > 0:
        summary += f"; and {rest} more problem{'s' if rest > 1 else ''}"
    extra: dict[str, Any] = {"problems": listed}
    if len(problems) > MAX_PROBLEMS:
        extra["more_problems"] = len(problems) - MAX_PROBLEMS
    return f"malformed request: {summary}", extra


_HTTP_ERRORS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
                415: "unsupported_media_type"}
_ROUTES = ("GET /healthz, GET /readyz, GET /metrics, GET /v1/pipelines, POST /v1/pipelines/{name}/search, "
           "POST /v1/pipelines/{name}/explain")


def create_app(pipelines: dict[str, "Pipeline"], *, max_body_bytes: int | None = None,
               body_timeout: float = 30.0, limit_concurrency: int | None = None) -> "FastAPI":
    """The application over already-loaded pipelines; ``max_body_bytes`` defaults to
    ``default_max_body_bytes(pipelines)``; a body not whole within ``body_timeout`` seconds gets 408; beyond
    ``limit_concurrency`` requests at once a request gets 503 ``overloaded``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.routing import APIRoute
    from starlette.exceptions import HTTPException

    from engine import __version__

    class ReadRequest(Request):
        """The request with its body already read and parsed (by ``read_json_body``)."""

        def __init__(self, request: Request, raw: bytes, document: Any):
            super().__init__(request.scope, request.receive)
            self._raw = raw
            self._document = document

        async def body(self) -> bytes:
            return self._raw

        async def json(self) -> Any:
            return self._document

    class StrictJSONRoute(APIRoute):
        """A route whose body is read by ``read_json_body`` (415 unless JSON; 422 for bytes that are not UTF-8, not
        JSON, too deep or with a key given twice) before FastAPI validates it against the body's model."""

        def get_route_handler(self) -> Any:
            handler = super().get_route_handler()
            if self.body_field is None:
                return handler

            async def read_then_handle(request: Request) -> Response:
                raw = await request.body()
                document = read_json_body(request.headers.get("content-type"),
                                          request.headers.get("content-encoding"), raw)
                return await handler(ReadRequest(request, raw, document))

            return read_then_handle

    # redirect_slashes off: ".../search/" is no route (404), not a 307 to one (which a client following it ran
    # once, counted under two endpoints)
    app = FastAPI(title="Sieve", version=__version__, description="Auditable rules-plus-model retrieval",
                  redirect_slashes=False)
    app.router.route_class = StrictJSONRoute

    def error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
        return _error_response(status, kind, message, **extra)

    app.add_middleware(BodyLimit, limit=max_body_bytes if max_body_bytes is not None else
                       default_max_body_bytes(pipelines), timeout=body_timeout)
    metrics = Metrics(pipelines)
    # outermost: a 413 or 408 of BodyLimit is counted and carries the request's id too
    app.add_middleware(Front, metrics=metrics, limit=limit_concurrency)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = ExplainBody if request.url.path.endswith("/explain") else SearchBody
        problems = [(".".join(str(part) for part in problem.get("loc", ())), _body_problem(problem, body))
                    for problem in exc.errors()]
        message, extra = _invalid_request(problems)
        return error(422, "invalid_request", message, **extra)

    @app.exception_handler(BodyError)
    async def unreadable_body(request: Request, exc: BodyError) -> JSONResponse:
        if exc.problems:
            message, extra = _invalid_request(exc.problems)
            return error(exc.status, exc.kind, message, **extra)
        return error(exc.status, exc.kind, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Starlette's and FastAPI's own errors (no route, wrong method, ...) in the server's error shape."""
        headers = dict(exc.headers or {})
        if exc.status_code in (204, 304) or exc.status_code < 200:
            return Response(status_code=exc.status_code, headers=headers)
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"{where}: no such path (the API: {_ROUTES})"
        elif exc.status_code == 405:
            message = f"{where}: method not allowed here (allowed: {headers.get('Allow', 'none')})"
        else:
            message = f"{where}: {exc.detail}"
        response = error(exc.status_code, _HTTP_ERRORS.get(exc.status_code, "http_error"), message)
        response.headers.update(headers)
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s: internal error on %s %s", REQUEST_ID.get(), request.method,
                      written_out(request.url.path))  # ESC: not raw
        return error(500, "internal_error",
                     f"{type(exc).__name__}: {exc} (a bug in Sieve; the server log has the traceback)")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    health = _Health(pipelines)

    @app.get("/readyz")
    def readyz() -> Any:
        waiting = [name for name, pipeline in pipelines.items() if pipeline.resources is None]
        if waiting:
            return error(503, "not_ready", f"not warmed up: {', '.join(waiting)}")
        failing = health.log_failures()
        replaced = health.replaced_indexes()
        extra: dict[str, Any] = {"index_replaced_on_disk": True, "indexes": replaced} if replaced else {}
        if failing:
            reasons = "; ".join(f"pipeline '{name}': {reason}" for name, reason in sorted(failing.items()))
            return error(503, "trace_log_failing", f"the trace log cannot be appended to, so every query is refused "
                         f"(500 trace_not_logged): {reasons}", pipelines=sorted(failing), **extra)
        return {"status": "ready", "pipelines": sorted(pipelines), **extra}

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        text, content_type = metrics.exposition(health)
        return Response(content=text, media_type=content_type)

    @app.get("/v1/pipelines")
    def list_pipelines() -> dict[str, Any]:
        described = []
        for name, pipeline in sorted(pipelines.items()):
            item = describe(name, pipeline)
            item["index"] = health.index_state(name)
            described.append(item)
        return {"engine_version": __version__, "pipelines": described}

    def refused(name: str, setting: str, what: str) -> JSONResponse:
        return error(403, "not_allowed", f"pipeline '{name}' does not allow {what}; its config allows it with "
                     f"`server: {{{setting}: true}}`, for a gateway that admits only trusted callers")

    def run(name: str, body: SearchBody, explaining: bool = False) -> Any:
        """The pipeline's run of the body's query, its trace appended to the log: (pipeline, result, log
        path), or the error response."""
        state = ANSWER.get()
        if state is not None and state.get("cut"):  # queued for a thread until after the shutdown cut it
            return error(503, "shutting_down", "the server is shutting down: the query did not run")
        pipeline = pipelines.get(name)
        if pipeline is None:
            return error(404, "unknown_pipeline", f"no pipeline named '{name}'; served: {', '.join(sorted(pipelines))}")
        allowed = pipeline.compiled.config.server
        if body.as_of is not None and not allowed.request_as_of:
            return refused(name, "request_as_of", "as_of in requests (the rules would be judged at a time the caller "
                           "chooses: archived or embargoed documents would become visible); it uses the server's clock")
        if body.include_trace and not allowed.include_trace:
            return refused(name, "include_trace", "include_trace (the whole trace names documents access rules "
                           "suppressed)")
        if explaining and not allowed.explain:
            return refused(name, "explain", "the explain endpoint (it says where any document id left the pipeline, "
                           "which access rule masked it, whether it exists)")
        user = UserContext(**body.user.model_dump()) if body.user is not None else None
        try:
            query = pipeline.make_query(body.query, history=body.history, user=user, as_of=body.as_of,
                                        language=body.language)
        except QueryError as exc:
            metrics.failed(name, "bad_query")
            return error(400, "bad_query", str(exc))
        try:
            result = pipeline.run(query, keep_outcomes=explaining)
        except SieveError as exc:
            log.error("request %s: pipeline '%s' failed: %s", REQUEST_ID.get(), name, exc)
            metrics.failed(name, "stage_failed")
            return error(500, "stage_failed", str(exc))
        if not _claim_log(result.trace["trace_id"]):  # the shutdown cut this request: its client was answered 503
            return error(503, "shutting_down", "the server is shutting down: the query was not logged")
        try:
            log_path = pipeline.log_trace(result.trace)
        except (OSError, SieveError) as exc:  # no unaudited answers: the results are withheld
            log.error("request %s: pipeline '%s': trace %s not logged: %s", REQUEST_ID.get(), name,
                      result.trace["trace_id"], exc)
            health.log_failed(name, exc)
            metrics.failed(name, "trace_not_logged")  # not counted as run: the client got no results
            return error(500, "trace_not_logged", f"the query ran but its trace could not be appended to the log "
                         f"({type(exc).__name__}: {exc}); results are withheld", trace_id=result.trace["trace_id"])
        finally:
            APPENDS.done()
        metrics.ran(name, result)
        health.log_succeeded(name)
        health.index_state(name)  # a stat or two: logs the warning once when the index was rebuilt on disk
        return pipeline, result, log_path

    def answered(response: Any) -> Any:
        """The handler's answer, kept for :class:`Front` too (a request cut by the shutdown after its query ran)."""
        kept = ANSWER.get()
        if kept is not None:
            kept["response"] = response
        return response

    @app.post("/v1/pipelines/{name}/search")
    def search(name: str, body: SearchBody) -> Any:
        ran = run(name, body)
        if isinstance(ran, JSONResponse):
            return answered(ran)
        pipeline, result, log_path = ran
        return answered(respond(name, pipeline, result, body, log_path))

    @app.post("/v1/pipelines/{name}/explain")
    def explain(name: str, body: ExplainBody) -> Any:
        from engine.workbench.inspect import explain_report, why_not

        ran = run(name, body, explaining=True)
        if isinstance(ran, JSONResponse):
            return answered(ran)
        pipeline, result, log_path = ran
        verdicts = [why_not(pipeline, result, doc_id, local=False) for doc_id in dict.fromkeys(body.doc_ids)]
        return answered({
            "pipeline": name,
            "trace_log": str(log_path) if log_path is not None else None,
            "query": _query_echo(body.query, result.trace["query"]),
            "degraded": result.degraded,
            "explain_in_trace": pipeline.compiled.config.trace.explain,
            **explain_report(result.trace, verdicts, body.top),
        })

    return app


class _Health:
    """What ``/readyz`` reports beyond warm-up: pipelines whose last trace append failed for a reason of the log's
    storage (none succeeded since), and indexes replaced on disk since start (each change logged once)."""

    def __init__(self, pipelines: dict[str, "Pipeline"]):
        self._pipelines = pipelines
        self._lock = threading.Lock()
        self._failed: dict[str, str] = {}  # pipeline -> why its last append failed
        self._warned: dict[str, str | None] = {}  # pipeline -> on-disk manifest sha256 last warned about

    def log_failed(self, name: str, exc: BaseException) -> None:
        from engine.trace import TraceLogReplaced

        if isinstance(exc, TraceLogReplaced):  # the log was removed or replaced under the server: refused until back
            with self._lock:
                self._failed[name] = "the last trace append was refused: the log is not the chain this server appended to"
            return
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        if not isinstance(cause, OSError):
            return  # about this trace (text that cannot be encoded...), not the log: the next query may log
        with self._lock:
            self._failed[name] = f"the last trace append failed ({type(cause).__name__}: {exc})"

    def log_succeeded(self, name: str) -> None:
        if name in self._failed:
            with self._lock:
                if self._failed.pop(name, None) is not None:
                    log.warning("pipeline '%s': the trace log is appended to again", name)

    def log_failures(self) -> dict[str, str]:
        """Pipelines whose log still looks unusable: the failure, and what a check of its storage finds now. One
        whose storage checks out again is cleared (the probe needs no query to recover)."""
        with self._lock:
            failed = dict(self._failed)
        still: dict[str, str] = {}
        for name, reason in failed.items():
            pipeline = self._pipelines[name]
            target = pipeline.compiled.config.trace.log
            problem = _log_storage_problem(Path(target)) if target is not None else None
            if problem is None:
                with self._lock:
                    if self._failed.get(name) == reason:
                        del self._failed[name]
                log.warning("pipeline '%s': the trace log's storage checks out again; reporting ready", name)
            else:
                still[name] = f"{reason}; now: {problem}"
        return still

    def index_state(self, name: str) -> dict[str, Any] | None:
        """The pipeline's index against the one now on disk (engine.index.Index.disk_state); a warning is logged
        once per on-disk manifest that is not the one served, an INFO line once when the index was rebuilt
        identically (the manifest served: nothing to restart for)."""
        pipeline = self._pipelines[name]
        index = pipeline.resources.index if pipeline.resources is not None else None
        if index is None:
            return None
        state = index.disk_state()
        if state["replaced_on_disk"] or state["rebuilt_identically"]:
            with self._lock:
                first = self._warned.get(name, "") != state["on_disk_manifest_sha256"]
                self._warned[name] = state["on_disk_manifest_sha256"]
            if first and state["replaced_on_disk"] and state["on_disk_manifest_sha256"] is None:
                log.warning("pipeline '%s': the index at %s is gone from disk (no readable manifest there); this "
                            "server keeps serving the version it opened, but a restart (or a new replica) fails until "
                            "an index is built there", name, index.path)
            elif first and state["replaced_on_disk"]:
                log.warning("pipeline '%s': the index at %s was replaced on disk (manifest %s, serving %s); this "
                            "server keeps serving the version it opened: restart it to serve the new one", name,
                            index.path, str(state["on_disk_manifest_sha256"])[:12], index.manifest_sha256[:12])
            elif first:
                log.info("pipeline '%s': the index at %s was rebuilt identically (the same manifest %s): it is the "
                         "index served, no restart needed", name, index.path, index.manifest_sha256[:12])
        return state

    def replaced_indexes(self) -> dict[str, dict[str, Any]]:
        found = {}
        for name in sorted(self._pipelines):
            state = self.index_state(name)
            if state is not None and state["replaced_on_disk"]:
                found[name] = {key: value for key, value in state.items()
                               if key not in ("replaced_on_disk", "rebuilt_identically")}
        return found


def _query_echo(text: str, recorded: dict[str, Any]) -> dict[str, Any]:
    """The response's ``query``: the text as asked and its rewrite as the trace records it; under
    ``include_query_text: false`` the rewrite's sha256 instead (null: not rewritten), so that "not rewritten" and
    "withheld" differ."""
    if "rewritten_sha256" in recorded:
        return {"text": text, "rewritten": None, "rewritten_sha256": recorded["rewritten_sha256"]}
    return {"text": text, "rewritten": recorded.get("rewritten")}


def _log_storage_problem(log_file: Path) -> str | None:
    """Why an append to ``log_file`` would fail now, as far as can be seen without writing: its directory missing or
    not writable, the log not a writable file, under ``MIN_LOG_FREE_BYTES`` free on its disk, or the file there not
    the chain the server appended to (``TraceLog.continuity_problem``: removed or replaced since; None: none seen)."""
    from engine.trace import TraceLog

    log_file = log_file.absolute()
    directory = log_file.parent
    if not directory.is_dir():
        return f"{directory} is not a directory"
    if log_file.exists() or log_file.is_symlink():
        if not log_file.is_file():
            return f"{log_file} is not a file"
        if not os.access(log_file, os.W_OK):
            return f"{log_file} is not writable"
    elif not os.access(directory, os.W_OK | os.X_OK):  # appends to an existing log write the file, not its directory
        return f"{directory} is not writable (the log is created there by the first query)"
    try:
        stats = os.statvfs(directory)
    except OSError as exc:
        return f"cannot check the free space of {directory}: {exc.strerror or exc}"
    free = (stats.f_bfree if os.geteuid() == 0 else stats.f_bavail) * stats.f_frsize
    if free < MIN_LOG_FREE_BYTES:
        return f"{free} bytes free on the log's disk ({directory}), under {MIN_LOG_FREE_BYTES}"
    return TraceLog(log_file).continuity_problem()


# A warning's code, as rule-file checks tag them ("rules.2.position: [pin_slot_conflict] pins ..."): snake case only,
# so a quoted id never reads as one
_WARNING_CODE = re.compile(r"\[([a-z]+(?:_[a-z]+)*)\] ")
WARNINGS_WITHHELD = ("the warnings' text is withheld (it names rules, documents and files on the server) unless the "
                     "pipeline allows include_trace, whose traces carry it; each is listed by where it arose and its "
                     "code; the server's log at start and `sieve validate` give them whole")


def _warning_kind(where: str, text: str) -> str:
    """``where`` and the code of a warning, without its text: "stage 'overrides': [expired]"."""
    code = _WARNING_CODE.search(text)
    return f"{where}: [{code.group(1)}]" if code else where


def describe(name: str, pipeline: "Pipeline") -> dict[str, Any]:
    """``GET /v1/pipelines``'s entry for a pipeline. Its warnings (warm-up's and the config's) are given whole only
    where the pipeline allows ``include_trace``: the traces it returns then carry the same names of rules, documents
    and files. Elsewhere each warning is listed as where it arose and its code, so a caller sees how many there are
    and of what kind, not which restricted document a pin conflict is about."""
    compiled = pipeline.compiled
    whole = compiled.config.server.include_trace
    if whole:
        warnings = list(pipeline.warnings)
        config_warnings = [str(issue) for issue in compiled.warnings]
    else:
        warnings = [_warning_kind(*warning.split(": ", 1)) if warning.startswith("stage '") and ": " in warning
                    else _warning_kind("warm-up", warning) for warning in pipeline.warnings]
        config_warnings = [_warning_kind(issue.path or "config", issue.message) for issue in compiled.warnings]
    return {
        "name": name,
        "description": compiled.config.description,
        "config": str(compiled.source_file),
        "config_sha256": compiled.config_sha256,
        "stages": [{"id": stage_id, "type": compiled.specs[stage_id].type,
                    **({"when": compiled.when[stage_id].describe()} if stage_id in compiled.when else {})}
                   for stage_id in compiled.order],
        "output": compiled.output,
        "unavailable": dict(pipeline.unavailable),
        "warnings": warnings,
        "config_warnings": config_warnings,
        **({} if whole or not (warnings or config_warnings) else {"warnings_withheld": WARNINGS_WITHHELD}),
        "allows": compiled.config.server.model_dump(),
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
        "engine_version": trace["engine_version"],
        "trace_id": trace["trace_id"],
        "trace_log": str(log_path) if log_path is not None else None,
        "query": _query_echo(body.query, trace["query"]),
        "degraded": result.degraded,
        "timing_ms": trace["timing_ms"]["total"],
        "results": results,
    }
    if pipeline.compiled.when:  # a config that routes: the stages this query was routed past (their `when` false)
        response["bypassed"] = [s["id"] for s in trace["stages"] if s.get("status") == "bypassed"]
    if body.include_trace:
        response["trace"] = trace
    return response


@contextlib.contextmanager
def serve_in_subprocess(configs: list[Path], *, cwd: Path | None = None, timeout: float = 120.0,
                        log_level: str = "warning", options: tuple[str, ...] = ()) -> Iterator[str]:
    """``sieve serve`` in a child process on a free loopback port: yields its base URL once ``/readyz``
    answers 200, stops it on exit. A server that exits, or is not ready within ``timeout`` seconds,
    raises SieveError with its output. For integration tests and benchmarks. The server's output goes to a
    temporary file, not a pipe: a pipe no one reads would stop the server once its buffer is full."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sieve = Path(sys.executable).with_name("sieve")
    output = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
    process = subprocess.Popen([str(sieve), "serve", *map(str, configs), "--port", str(port), "--log-level", log_level,
                                *options],
                               stdout=output, stderr=subprocess.STDOUT, text=True, cwd=cwd)
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
                process.wait()
                output.seek(0)
                raise SieveError(f"sieve serve did not become ready on {base}:\n{output.read()}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        output.close()


def serve(configs: list[Path], host: str, port: int, log_level: str = "info", *, body_timeout: float = 30.0,
          shutdown_grace: float = 30.0, limit_concurrency: int | None = 512) -> None:
    """Load and warm every pipeline, then serve until interrupted.

    The port is checked before the (possibly long) warm-up, so a port in use is said at once. ``body_timeout``:
    seconds a request body may take to arrive (408 after). ``shutdown_grace``: seconds in-flight requests get
    after SIGTERM/SIGINT before the server exits anyway (a stalled client held it open for ever).
    ``limit_concurrency``: connections and requests at once before new ones get 503 (None: no limit)."""
    import uvicorn

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SieveError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    logging_config = log_config()
    logging.config.dictConfig(logging_config)  # before warm-up, whose warnings are logged
    pipelines = load_pipelines(configs)
    needed = _needed_body_bytes(pipelines)
    if needed > MAX_MAX_BODY_BYTES:
        log.warning("the pipelines' limits (max_query_chars x max_history_turns) allow request bodies of up to %d MiB; "
                    "the server takes at most %d MiB (a larger request gets 413)", needed >> 20, MAX_MAX_BODY_BYTES >> 20)
    app = create_app(pipelines, body_timeout=body_timeout, limit_concurrency=limit_concurrency)
    # no `*_created` series (a counter's creation time, one more sample per series that no alert reads); a process
    # setting of prometheus_client, so only here, where the process is Sieve's (create_app leaves an embedder's as is)
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
    # the app answers a request over the limit (JSON 503 overloaded, counted in /metrics); uvicorn's own limit, on
    # connections and tasks (idle keep-alive connections included), is a backstop above it (twice it, and at least
    # 64 more), answered in plain text
    # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again under the handlers it found: these
    # note it, so that the process exits 130 or 143 either way (before, 0 after SIGINT, killed by SIGTERM)
    stopped: list[int] = []
    serving: list[bool] = []

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            serving.append(True)  # from here uvicorn takes the signals (and raises them again under ours when done)
            with super().capture_signals():
                yield

    def noted(received: int, frame: Any) -> None:
        if not serving:  # before uvicorn took the signals over: stop now (it would never see this one)
            raise SystemExit(130 if received == signal.SIGINT else 143)
        stopped.append(received)

    previous = {number: signal.signal(number, noted) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_grace,
                              limit_concurrency=limit_concurrency + max(limit_concurrency, 64) if limit_concurrency
                              else None, log_config=logging_config)).run()
        if stopped:  # under our handlers still: a second signal meanwhile is noted, not a kill in mid-append
            _exit_leaving_cut_queries(130 if stopped[0] == signal.SIGINT else 143)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _exit_leaving_cut_queries(code: int) -> None:
    """Exit with ``code`` once no trace is being appended, leaving the queries the shutdown cut to run on in their
    threads no signal stops: their clients were answered 503 and they log nothing (:func:`_claim_log`), but Python
    would wait for each before exiting (a query on a busy machine: seconds, with no bound; an orchestrator timed to
    the grace kills the process meanwhile)."""
    if not APPENDS.wait(APPEND_WAIT_S):
        log.error("traces were still being appended %.0f s after the shutdown: exiting anyway (the log's torn end, if "
                  "any, is set aside by the next writer)", APPEND_WAIT_S)
    running = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon and t.is_alive()]
    if running:
        time.sleep(0.2)  # a thread ending by itself (an idle worker told to stop) is not a query left running
        running = [t for t in running if t.is_alive()]
    if not running:
        raise SystemExit(code)
    log.warning("exiting with %d thread(s) still running the queries the shutdown cut and their stages (answered 503, "
                "not logged)", len(running))
    # no exit functions: run while those threads use torch and the tokenizers, the libraries' clean-up crashed the
    # process (SIGSEGV) in one of the audit's runs; the log lines and streams are flushed, nothing else is pending
    for handler in logging.getLogger().handlers + [h for name in ("uvicorn", "uvicorn.access", "uvicorn.error", "sieve")
                                                   for h in logging.getLogger(name).handlers]:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


class _RequestIdFilter(logging.Filter):
    """Gives a log record its request's id (``-`` outside a request): uvicorn writes a request's access line as its
    answer starts, inside :class:`Front`, which set the id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging set-up, each line stamped with its UTC time (2026-11-28T01:02:03.456Z), and Sieve's own
    messages (a rule file changed, an index replaced, a pipeline failing) through the same handler: an operator
    lines them up with the trace log's UTC times."""
    import copy

    import uvicorn.config
    import uvicorn.logging

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    bases = {"default": uvicorn.logging.DefaultFormatter, "access": uvicorn.logging.AccessFormatter}
    for name, formatter in config["formatters"].items():
        formatter["fmt"] = "%(asctime)s.%(msecs)03dZ " + formatter["fmt"]  # milliseconds: concurrent lines apart
        formatter["datefmt"] = "%Y-%m-%dT%H:%M:%S"
        formatter["()"] = type(f"Utc{bases[name].__name__}", (bases[name],), {"converter": staticmethod(time.gmtime)})
    # each access line ends with its request's id (X-Request-ID), as Sieve's own lines about that request name it
    config["formatters"]["access"]["fmt"] += " request %(request_id)s"
    config.setdefault("filters", {})["request_id"] = {"()": _RequestIdFilter}
    config["handlers"]["access"]["filters"] = ["request_id"]
    config["loggers"]["sieve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config
