"""Runs a compiled pipeline for one query at a time and builds its trace.

Stages run in dependency order; branches that do not depend on each other run concurrently
(``executor.max_workers``). The query in effect and the document mask flow along every edge, so
a reranker downstream of a rewrite sees the rewritten query. Each stage's error policy decides
what a failure does: ``fail`` fails the query, ``skip`` passes the input through and marks the
trace degraded.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import unicodedata
import graphlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine import __version__
from engine.compiler import CompiledPipeline, compile_file
from engine.cache import asked_by
from engine.errors import (ConfigError, ConfigIssue, DeadlineExceeded, Location, ModelLoadError, QueryError, SieveError,
                           SieveIndexError, StageError, TraceError)
from engine.index import Index
from engine.model import (Candidate, Decision, Drop, Query, QueryKeyError, ScoreEntry, UserContext, key_id, query_key,
                          text_digest)
from engine.registry import plugin_of
from engine.stage import (DocumentMask, Explanation, Port, Resources, StageContext, StageResult,
                          explanation_dicts, run_notes, stage_deadline)
from engine.trace import TRACE_SCHEMA, TraceLog, canonical
from rules.conditions import ExpressionRuntimeError, Node, QueryView, Subject, redact_query_evidence


@dataclass
class StageOutcome:
    """What one stage produced for one query, plus its trace record."""

    query: Query
    mask: DocumentMask | None
    candidates: list[Candidate] | None
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    results: list[Candidate]
    trace: dict[str, Any]
    degraded: bool
    # every stage's outcome and the query as asked, kept only when run(keep_outcomes=True): what
    # engine.workbench.inspect.why_not walks to say where a document left the pipeline
    outcomes: dict[str, StageOutcome] | None = None
    query: Query | None = None



def compile_with_settings(path: Path, settings: Sequence[str]) -> CompiledPipeline:
    """Compile the config file at ``path`` with ``PATH=VALUE`` overrides (a dotted path, stages by id:
    ``stages.rerank.params.device=cpu``; the value is YAML: ``[a, b]`` is a list value) applied to its data first.
    Errors in what the file says keep their file:line; a bad override is named by its setting."""
    from engine.compiler import compile_loaded, load_config_file
    from engine.workbench.sweep import apply_setting, split_setting_located

    loaded = load_config_file(path)  # merged onto the base it extends: a setting changes the config that runs
    seen: set[str] = set()
    for text in settings:
        name, value = split_setting_located(text, "PATH=VALUE (e.g. stages.rerank.params.device=cpu)", "value")
        if name in seen:
            raise SieveError(f"--set {name} is given twice")
        seen.add(name)
        if name == "extends" or name.startswith("extends."):
            raise SieveError(f"--set {name}: a config's base (extends) is chosen in the file, not on the command line")
        if not isinstance(loaded.data, dict):
            break  # compiling says what is wrong with the file
        # what the setting wrote is located on the command line, not at the file line of the value it replaced
        loaded.source.graft(apply_setting(loaded.data, name, value.data), value.source)
    return compile_loaded(loaded, base_dir=path.resolve().parent, check_log_path=True)


def _without_query_words(message: str, query: Query) -> str:
    """A stage's error message where traces keep no query text: it goes to the trace, the log, a batch's output and
    the server's answer, and a stage's exception (a plugin's, a library's) may quote the query. The query's words
    (its text, rewrite and history, bar function words) are redacted; the rest stays for the operator."""
    from stages.rewrite.discourse import Redactor

    redactor = Redactor([query.text, query.rewritten or "", *query.history])
    message = unicodedata.normalize("NFC", message)  # a decomposed accent is the word too
    if redactor.quotes_escaped(message):  # escaped (bytes, JSON, URL): no word to cut out, so nothing is kept
        return ("the stage's message is withheld: it quotes the query in an escaped form (include_query_text is "
                "false; the server's or the caller's log of the exception has it)")
    redacted = redactor.words(message)
    if redacted == message:
        return message
    return f"{redacted} (words of the query are redacted: include_query_text is false)"


class Pipeline:
    """A compiled pipeline bound to its index; warm it up once, then run many queries."""

    def __init__(self, compiled: CompiledPipeline, *, index_path: Path | None = None, verify_index: bool = True):
        self.compiled = compiled
        self.index_path = index_path if index_path is not None else compiled.index_path
        self.verify_index = verify_index
        self.resources: Resources | None = None
        self.unavailable: dict[str, str] = {}  # stages whose warm-up failed under on_error: skip
        self.warnings: list[str] = []  # what the stages' warm-up found ("stage 'id': ..."), for the CLI and server
        self._when_entities: dict[str, Any] = {}  # stage id -> the query-entity extractor its `when` reads with
        self.settings: tuple[str, ...] = ()  # the PATH=VALUE overrides the config was compiled with (from_file)
        self._warm_lock = threading.Lock()
        # The trace's index record (as JSON), per index, and the resolved config as JSON: each trace reads its own
        # copy of them, so a caller editing one trace in place (redacting it) changes no other, nor the pipeline
        self._index_identity: tuple[Index, str] | None = None
        self._canonical_json = json.dumps(compiled.canonical)
        # A relative trace.log names a file under the working directory the pipeline was made in: a process that
        # changes directory later (a daemon, a worker) keeps appending to that log, not to a new chain elsewhere.
        try:
            self._made_in: Path | None = Path.cwd()
        except OSError:  # the working directory was removed: a relative log is then resolved when written to
            self._made_in = None
        self._closed = False
        self._query_key: bytes | None = None  # trace.hash_key_env's key, read at warm-up
        self._owns_resources = True  # False when warm_up(reuse=...) shares another pipeline's index and models

    def close(self) -> None:
        """Release what the pipeline opened: the index's files and document-store connections, and its hold on the
        models (freed once nothing else holds them); idempotent. A closed pipeline refuses queries; make a new one
        to query again. Resources it shares with another pipeline (``warm_up(reuse=...)``) are that one's to close.
        ``with Pipeline.from_file(...) as pipeline:`` closes it at the end of the block."""
        with self._warm_lock:
            self._closed = True
            resources, self.resources = self.resources, None
        if resources is not None and self._owns_resources and resources.index is not None:
            resources.index.close()

    def index_state(self) -> dict[str, Any] | None:
        """The index this pipeline reads against the one now at its path (``Index.disk_state``: ``replaced_on_disk``,
        ``rebuilt_identically``, the manifest sha256 served and on disk), as ``sieve serve``'s ``/readyz`` reports it;
        None before the first query (or ``warm_up``) and for a pipeline without an index. A replaced index is read
        as opened until a new Pipeline is made."""
        resources = self.resources
        if resources is None or resources.index is None:
            return None
        return resources.index.disk_state()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise SieveError("a Pipeline cannot be pickled (it holds an open index, models and locks): pass the config "
                         "path to the worker process and call Pipeline.from_file there")

    @classmethod
    def from_file(cls, path: str | Path, *, index_path: Path | None = None,
                  settings: Sequence[str] = ()) -> "Pipeline":
        """The pipeline a config file describes; ``settings``: ``PATH=VALUE`` overrides applied to the file's data
        before it is compiled (``sieve search --set stages.rerank.params.device=cpu``), as one machine needs
        them without editing the file. The trace records them with the config they produced."""
        _require(path, (str, os.PathLike), "the config path", "a str or a pathlib.Path")
        _require(index_path, (str, os.PathLike, type(None)), "index_path", "a str or a pathlib.Path (or None)")
        if isinstance(settings, (str, bytes)):
            raise SieveError(f"settings are a list of PATH=VALUE texts, got {settings!r:.80}")
        settings = tuple(settings)  # once: a generator given is read here, not consumed by the check
        if not all(isinstance(setting, str) for setting in settings):
            raise SieveError(f"settings are a list of PATH=VALUE texts, got {settings!r:.80}")
        if index_path is not None:
            index_path = Path(index_path)
        if not settings:
            return cls(compile_file(path), index_path=index_path)
        pipeline = cls(compile_with_settings(Path(path), settings), index_path=index_path)
        pipeline.settings = tuple(settings)
        return pipeline

    # ------------------------------------------------------------------ lifecycle

    def warm_up(self, *, reuse: Resources | None = None) -> Resources:
        """Open the index and let every stage load what it needs; idempotent and thread-safe. ``reuse``: another
        pipeline's resources on the same index and directory (variants of one config, ``sieve sweep``): what it
        loaded (the index, models, BM25) is shared, not loaded again. An index rebuilt on disk while the stages
        loaded it (one may have read the new version's files) is opened again, up to three times."""
        with self._warm_lock:
            if self._closed:
                raise SieveError("this Pipeline was closed: make a new one (Pipeline.from_file) to query again")
            if self.resources is not None:
                return self.resources
            key_env = self.compiled.config.trace.hash_key_env
            if key_env is not None:  # at warm-up, before any query: a server without its key does not start
                try:
                    self._query_key = query_key(key_env)
                except QueryKeyError as exc:
                    raise ConfigError([ConfigIssue(Location(self.compiled.source_file), "trace.hash_key_env",
                                                   str(exc))]) from None
            if reuse is not None and reuse.base_dir == self.compiled.base_dir and (
                (reuse.index is None and self.index_path is None)
                or (reuse.index is not None and self.index_path is not None
                    and Path(reuse.index.path).resolve() == Path(self.index_path).resolve())):
                resources = reuse.sharing()  # the same index and models, keyed by what was loaded
                self._load(resources)
                self.resources = resources
                self._owns_resources = False
                return resources
            for _ in range(3):
                self.unavailable.clear()
                index = Index.open(self.index_path, verify=self.verify_index) if self.index_path is not None else None
                resources = Resources(index, self.compiled.base_dir)
                try:
                    self._load(resources)
                except SieveError:
                    if index is None or not index.replaced_on_disk():
                        raise
                    index.close()  # a stage found the index replaced while it loaded: open it again
                    continue
                changed = index.changed_since_opened() if index is not None else []
                if index is None or not index.replaced_on_disk() and not changed:
                    self.resources = resources
                    return resources
                index.close()  # replaced, or a file in it changed after it was hashed (a stage may have loaded it)
            raise SieveIndexError(f"the index at {self.index_path} kept being replaced or changed on disk while the "
                                  "pipeline loaded it; load it once the rebuilds are done")

    def _when_readers(self, resources: Resources) -> None:
        """The query-entity extractor for each ``when`` that reads the query's entities: the index's entities
        component (as the rule stages read them), or a warning that the condition sees none."""
        from rules.conflicts import QUERY_ENTITY_FIELDS

        self._when_entities = {}
        for stage_id, condition in self.compiled.when.items():
            fields = sorted(f for f in condition.fields() if f.startswith(QUERY_ENTITY_FIELDS))
            if not fields:
                continue
            index = resources.index
            if index is None or "entities" not in index.manifest["components"]:
                self.warnings.append(
                    f"stage '{stage_id}': its `when` reads {', '.join(fields)}, but "
                    + ("the pipeline has no index" if index is None else f"the index at {index.path} has no entities "
                       "component") + " to extract the query's entities with, so it sees none (build the index with "
                    "an entities component)")
                continue
            from stages.entities import query_entity_source

            self._when_entities[stage_id] = query_entity_source(index, stage_id)

    def _load(self, resources: Resources) -> None:
        """Every stage's warm-up on ``resources`` (a failing ``on_error: skip`` stage is noted as unavailable)."""
        self.warnings = []
        self._when_readers(resources)
        for stage_id in self.compiled.order:
            stage = self.compiled.stages[stage_id]
            try:
                stage.warm_up(resources)
                self.warnings.extend(f"stage '{stage_id}': {w}" for w in stage.warm_up_warnings())
            except Exception as exc:
                message = str(exc) if isinstance(exc, SieveError) else f"{type(exc).__name__}: {exc}"
                if self.compiled.specs[stage_id].on_error == "skip":
                    self.unavailable[stage_id] = f"warm-up failed: {message}"
                    continue
                if type(exc) in (ModelLoadError, SieveIndexError) and not message.startswith("stage '"):
                    # say which stage (a pipeline may load several models from one index)
                    raise type(exc)(f"stage '{stage_id}' ({stage.qualified_name()}): {message}") from exc
                if isinstance(exc, SieveError):
                    raise
                raise StageError(stage_id, stage.qualified_name(), f"warm-up failed: {message}") from exc

    def make_query(
        self,
        text: str,
        *,
        history: list[str] | tuple[str, ...] = (),
        user: UserContext | None = None,
        as_of: datetime | None = None,
        language: str | None = None,
    ) -> Query:
        """Validate user input against this pipeline's limits (a :class:`~engine.errors.QueryError` says what is
        wrong): ``history`` the earlier turns, oldest first; ``user`` a UserContext or a mapping of its fields;
        ``as_of`` a datetime (naive is UTC); ``language`` a tag such as ``en`` or ``zh-CN``."""
        limits = self.compiled.config.limits
        return Query.create(text, history=history, user=user, as_of=as_of, language=language,
                            max_chars=limits.max_query_chars, max_history_turns=limits.max_history_turns)

    def search(self, text: str, *, log: bool = True, **kwargs: Any) -> RunResult:
        """Run one query (``kwargs``: see :meth:`make_query`) and, with ``log`` (the default), append its trace to
        the config's trace log before the results are returned: every query has its audit record, or the caller
        gets a :class:`~engine.errors.TraceError` instead of results (as the server withholds them). A config
        without a log (``trace: {log: null}``) logs nothing. ``log=False`` leaves it to the caller
        (:meth:`log_trace`)."""
        if not isinstance(log, bool):
            raise QueryError(f"log is True or False, got {log!r:.80}; to log elsewhere, search with log=False and "
                             "call log_trace(result.trace, path)")
        result = self.run(self.make_query(text, **kwargs))
        if log:
            self.log_trace(result.trace)
        return result

    # ------------------------------------------------------------------ running

    def run(self, query: Query, *, keep_outcomes: bool = False,
            deadline_cuts: Mapping[str, Mapping[str, Any]] | None = None) -> RunResult:
        """Run one query. ``keep_outcomes``: the result also holds every stage's full candidate list and mask
        (the trace only summarises them), for ``why_not``; it costs nothing but the memory while it is held.
        ``deadline_cuts`` (replay): run without a live deadline, cutting exactly the stages a trace records as
        cut by it (stage id -> that stage's trace record), so the replay runs what the traced query ran."""
        _require(query, (Query,), "run's query", "an engine.model.Query (Pipeline.make_query, or search(text))")
        # what stages note for explanations lives as long as the run, whatever the load; caches keyed by what was
        # asked are the asking user's own (engine/cache.py: another user's question must not show in the latency)
        with run_notes(), asked_by(query.user.asker()):
            return self._run(query, keep_outcomes, deadline_cuts)

    def _run(self, query: Query, keep_outcomes: bool,
             deadline_cuts: Mapping[str, Mapping[str, Any]] | None = None) -> RunResult:
        resources = self.warm_up()
        compiled = self.compiled
        started = time.perf_counter()
        budget = compiled.config.executor.deadline_ms
        deadline = started + budget / 1000.0 if budget is not None and deadline_cuts is None else None
        outcomes: dict[str, StageOutcome] = {}
        graph = {sid: list(compiled.specs[sid].inputs) for sid in compiled.order}
        sorter = graphlib.TopologicalSorter(graph)
        sorter.prepare()
        workers = compiled.config.executor.max_workers

        def execute(stage_id: str) -> StageOutcome:
            return self._run_stage(stage_id, query, outcomes, resources, started, deadline,
                                   (deadline_cuts or {}).get(stage_id))

        if workers == 1:
            while sorter.is_active():
                for stage_id in sorter.get_ready():
                    outcomes[stage_id] = execute(stage_id)
                    sorter.done(stage_id)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sieve-stage") as pool:
                pending: dict[Future[StageOutcome], str] = {}
                while sorter.is_active():
                    ready = list(sorter.get_ready())
                    for stage_id in ready[1:]:
                        pending[pool.submit(contextvars.copy_context().run, execute, stage_id)] = stage_id
                    if ready:
                        # One ready stage runs on this thread: no hand-off cost for linear chains.
                        outcomes[ready[0]] = execute(ready[0])
                        sorter.done(ready[0])
                        continue
                    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                    for future in done:
                        stage_id = pending.pop(future)
                        outcomes[stage_id] = future.result()
                        sorter.done(stage_id)

        total_ms = (time.perf_counter() - started) * 1000.0
        final = outcomes[compiled.output]
        results = final.candidates or []
        degraded = any(o.record.get("status") == "skipped" for o in outcomes.values())
        trace = self._trace(query, final.query, outcomes, results, total_ms, degraded, resources)
        if keep_outcomes:
            return RunResult(results, trace, degraded, outcomes, query)
        return RunResult(results, trace, degraded)

    def _inherit(self, stage_id: str, query: Query, outcomes: dict[str, StageOutcome]) -> tuple[Query, DocumentMask | None, list[list[Candidate]]]:
        """The query in effect, the combined mask, and the candidate lists from the inputs."""
        spec = self.compiled.specs[stage_id]
        effective = query
        rewritten_seen = False
        mask: DocumentMask | None = None
        lists: list[list[Candidate]] = []
        for dep in spec.inputs:
            upstream = outcomes[dep]
            if not rewritten_seen and upstream.query is not query:
                effective, rewritten_seen = upstream.query, True
            if upstream.mask is not None:
                mask = upstream.mask if mask is None else mask.intersect(upstream.mask)
            if self.compiled.stages[dep].produces is Port.CANDIDATES:
                lists.append(upstream.candidates or [])
        return effective, mask, lists

    def _run_stage(
        self,
        stage_id: str,
        original: Query,
        outcomes: dict[str, StageOutcome],
        resources: Resources,
        started: float,
        deadline: float | None = None,
        recorded_cut: Mapping[str, Any] | None = None,
    ) -> StageOutcome:
        stage = self.compiled.stages[stage_id]
        spec = self.compiled.specs[stage_id]
        query, mask, lists = self._inherit(stage_id, original, outcomes)
        bypassed = frozenset(dep for dep in spec.inputs if outcomes[dep].record.get("status") == "bypassed")
        ctx = StageContext(stage_id, query, lists, mask, resources, self.compiled.config.trace.include_query_text,
                           bypassed)
        begin = time.perf_counter()
        record: dict[str, Any] = {
            "id": stage_id,
            "type": stage.qualified_name(),
            "inputs": list(spec.inputs),
            "input_counts": [len(items) for items in lists],
            "started_ms": round((begin - started) * 1000.0, 3),
        }
        plugin = plugin_of(stage.type_name, stage.version)
        if plugin is not None:  # a third party's stage: which package ran it (replay needs it installed)
            record["plugin"] = plugin
        condition = self.compiled.when.get(stage_id)
        if condition is None or self._judge_when(stage_id, condition, query, record):
            result, status, error = self._execute(stage_id, ctx, lists, record, resources, started, begin, deadline,
                                                  recorded_cut)
        else:  # routed past: the stage does not run and its input is handed on (not a degradation)
            result, status, error = self._pass_through(stage.produces, lists), "bypassed", None
        record["duration_ms"] = round((time.perf_counter() - begin) * 1000.0, 3)
        record["status"] = status
        if error is not None:
            record["error"] = error
        if result.timings_ms:
            record["timings_ms"] = {k: round(v, 3) for k, v in result.timings_ms.items()}

        out_query = result.query if (stage.produces is Port.QUERY and result.query is not None) else query
        out_mask = mask
        if stage.produces is Port.MASK and result.mask is not None:
            out_mask = result.mask if mask is None else mask.intersect(result.mask)
        candidates = result.candidates if stage.produces is Port.CANDIDATES else None
        if stage.produces is Port.CANDIDATES and candidates is None:
            candidates = []
        if candidates and mask is not None:
            candidates = self._enforce_mask(candidates, mask, result)
        if stage.produces is Port.QUERY and result.query is not None:
            rewritten = result.query.rewritten
            if self.compiled.config.trace.include_query_text:
                record["query"] = {"rewritten": rewritten}
            else:  # the text stays out of the trace; its hash lets an auditor match it
                record["query"] = {"rewritten_sha256": None if rewritten is None else
                                   text_digest(rewritten, self._query_key)}
        if stage.produces is Port.MASK and result.mask is not None:
            record["mask"] = {"allowed": int(result.mask.allowed.sum()), "total": int(result.mask.allowed.size)}
        if candidates is not None:
            record["output"] = [[c.doc_id, c.score] for c in candidates]
        if result.drops:
            record["drops"] = [_drop(d) for d in result.drops]
        if result.decisions:
            record["decisions"] = [_decision(d) for d in result.decisions]
        if result.details:
            record["details"] = result.details
        return StageOutcome(out_query, out_mask, candidates, record)

    def _judge_when(self, stage_id: str, condition: Node, query: Query, record: dict[str, Any]) -> bool:
        """Does the stage's ``when`` hold for ``query`` (the query in effect where the stage is due: a rewrite
        upstream is in ``query.rewritten``)? Recorded in ``record["when"]`` with its evidence. A condition that
        cannot be judged (an expression failing on this query) runs the stage, as if the config had no ``when``:
        routing never loses a stage's work, and the trace says why."""
        reader, asked = self._when_entities.get(stage_id), query
        if reader is not None:
            query = reader.with_entities(query)
        evidence: list[dict[str, Any]] = []
        trace_text = self.compiled.config.trace.include_query_text
        try:
            holds = condition.evaluate(Subject(QueryView(query, trace_text)), evidence)
        except ExpressionRuntimeError as exc:
            record["when"] = {"holds": None, "condition": condition.describe(),
                              "error": f"{exc.describe(trace_text)}; the stage runs as if it had no `when`"}
            return True
        record["when"] = {"holds": bool(holds), "condition": condition.describe()}
        if holds and evidence:
            record["when"]["evidence"] = redact_query_evidence(evidence, trace_text)
        if reader is not None and not asked.entities:  # "why was it bypassed?": names that did not count
            from stages.entities import out_of_context

            record["when"].update(out_of_context(reader.query_set_aside(query.effective_text), trace_text))
        return bool(holds)

    def _execute(self, stage_id: str, ctx: StageContext, lists: list[list[Candidate]], record: dict[str, Any],
                 resources: Resources, started: float, begin: float, deadline: float | None,
                 recorded_cut: Mapping[str, Any] | None) -> tuple[StageResult, str, str | None]:
        """Run the stage under its error policy and the query's deadline: (its result, status, error)."""
        stage = self.compiled.stages[stage_id]
        spec = self.compiled.specs[stage_id]
        cuttable = spec.on_error == "skip"  # the deadline never cuts a stage the query needs (on_error: fail)
        budget = self.compiled.config.executor.deadline_ms
        plugin = plugin_of(stage.type_name, stage.version)
        try:
            if stage_id in self.unavailable:
                raise StageError(stage_id, stage.qualified_name(), self.unavailable[stage_id])
            if cuttable and recorded_cut is not None:  # a replay: cut as the traced query's run was
                record["deadline"] = dict(recorded_cut.get("deadline") or {})
                raise DeadlineExceeded(str(recorded_cut.get("error", "cut by the query's deadline")))
            if cuttable and deadline is not None and begin >= deadline:
                elapsed = (begin - started) * 1000.0
                record["deadline"] = {"deadline_ms": budget, "cut": "before_start", "elapsed_ms": round(elapsed, 3)}
                raise DeadlineExceeded(f"cut by the query's deadline ({budget} ms): {elapsed:.0f} ms had passed when "
                                       "the stage was due to start")
            with stage_deadline(deadline if cuttable else None):
                result = stage.run(ctx)
            if plugin is not None:
                _check_plugin_result(stage_id, stage.produces, result, lists, resources)
            return result, "ok", None
        except Exception as exc:
            if isinstance(exc, StageError) and exc.stage_id == stage_id:
                message = exc.detail  # the stage's own error: named once, not twice
            else:
                message = str(exc) if isinstance(exc, SieveError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, DeadlineExceeded) and cuttable and "deadline" not in record:
                elapsed = (time.perf_counter() - started) * 1000.0
                record["deadline"] = {"deadline_ms": budget, "cut": "while_running", "elapsed_ms": round(elapsed, 3)}
                message = f"cut by the query's deadline ({budget} ms) while the stage ran, at {elapsed:.0f} ms"
                if "expected to take" in str(exc) or "waiting for" in str(exc):  # cut ahead, or while waiting
                    message += f": {exc}"
            if not ctx.trace_text:
                message = _without_query_words(message, ctx.query)
            if spec.on_error == "fail":
                raise StageError(stage_id, stage.qualified_name(), message) from exc
            return self._pass_through(stage.produces, lists), "skipped", message

    @staticmethod
    def _enforce_mask(candidates: list[Candidate], mask: DocumentMask, result: StageResult) -> list[Candidate]:
        """No stage hands on a document the access rules upstream of it deny: recall applies the mask itself, and
        this guarantees it for every stage (a fusion, an injected pin, a stage written without the mask in mind)."""
        import numpy as np

        rows = np.fromiter((c.row for c in candidates), dtype=np.int64, count=len(candidates))
        permitted = mask.allowed[rows]
        if permitted.all():
            return candidates
        sources = ", ".join(dict.fromkeys(mask.sources))
        result.drops = list(result.drops) + [
            Drop(c.doc_id, "access_mask", f"denied by the access rules of {sources}; removed by the engine")
            for c, ok in zip(candidates, permitted.tolist()) if not ok
        ]
        return [c for c, ok in zip(candidates, permitted.tolist()) if ok]

    @staticmethod
    def _pass_through(produces: Port, lists: list[list[Candidate]]) -> StageResult:
        """What a skipped stage hands on: its candidate inputs merged in order, or nothing."""
        if produces is not Port.CANDIDATES:
            return StageResult()
        merged: dict[str, Candidate] = {}
        for items in lists:
            for candidate in items:
                merged[candidate.doc_id] = merged[candidate.doc_id].merged(candidate) if candidate.doc_id in merged else candidate
        return StageResult(candidates=list(merged.values()))

    # ------------------------------------------------------------------ trace

    def _trace(
        self,
        query: Query,
        final_query: Query,
        outcomes: dict[str, StageOutcome],
        results: list[Candidate],
        total_ms: float,
        degraded: bool,
        resources: Resources,
    ) -> dict[str, Any]:
        """The run's trace; ``resources`` are the ones it ran on (a ``close()`` meanwhile has dropped the pipeline's)."""
        compiled = self.compiled
        settings = compiled.config.trace
        key = self._query_key
        query_record: dict[str, Any] = {
            "text_sha256": text_digest(query.text, key),
            "as_of": query.as_of.isoformat(),
            "user": query.user.model_dump(mode="json"),
            "language": query.language,
            "history_turns": len(query.history),
        }
        if settings.include_query_text:
            query_record["text"] = query.text
            query_record["history"] = list(query.history)
            query_record["rewritten"] = final_query.rewritten
        else:  # the text stays out of the trace; hashes let an auditor or a replay match it (null: not rewritten)
            rewritten = final_query.rewritten
            query_record["rewritten_sha256"] = None if rewritten is None else text_digest(rewritten, key)
            if query.history:  # the turns' hashes let a replay check the turns given
                query_record["history_sha256"] = [text_digest(turn, key) for turn in query.history]
        if key is not None:  # the *_sha256 fields are HMAC-SHA256 under this key (a replay needs it)
            query_record["hashed_with"] = {"algorithm": "hmac-sha256", "key_env": settings.hash_key_env,
                                           "key_id": key_id(key)}
        models = []
        for stage_id in compiled.order:
            identity = compiled.stages[stage_id].identity()
            if identity:
                models.append({"stage": stage_id, **identity})
        documents = {}
        if settings.include_document_text and resources.index is not None and results:
            documents = resources.index.documents.get([c.row for c in results])
        result_records = []
        explain = self._explainer(outcomes) if settings.explain else None
        for rank, candidate in enumerate(results, start=1):
            entry: dict[str, Any] = {
                "rank": rank,
                "doc_id": candidate.doc_id,
                "score": candidate.score,
                "ledger": [
                    {"stage": e.stage, "signal": e.signal, "value": e.value, "rank": e.rank}
                    for e in candidate.ledger
                ],
            }
            if explain is not None and (settings.explain_top is None or rank <= settings.explain_top):
                # the root node made as a dict: what explain(...).to_dict() gives
                value, description, trees = explain(candidate)
                entry["explanation"] = {"value": value, "description": description,
                                        "details": explanation_dicts(trees)}
            if candidate.row in documents:
                doc = documents[candidate.row]
                entry["document"] = {"title": doc.title, "text": doc.text}
            result_records.append(entry)
        return {
            "schema": TRACE_SCHEMA,
            "trace_id": uuid.uuid4().hex,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "engine_version": __version__,
            "config": {
                "file": str(compiled.source_file),
                "dir": str(compiled.base_dir),
                "sha256": compiled.config_sha256,
                "resolved": json.loads(self._canonical_json),  # the trace's own copy (a caller may edit it)
                **({"set": list(self.settings)} if self.settings else {}),
                # the base configs the file extends (resolved holds the merged config), nearest first
                **({"extends": [dict(base) for base in compiled.extends]} if compiled.extends else {}),
            },
            "index": self._index_record(resources.index) if resources.index is not None else None,
            "models": models,
            "query": query_record,
            "degraded": degraded,
            # what the stages' warm-up found that changes what the pipeline does (Pipeline.warnings)
            **({"warnings": list(self.warnings)} if self.warnings else {}),
            "timing_ms": {"total": round(total_ms, 3)},
            "stages": [outcomes[sid].record for sid in compiled.order],
            # stages the config switched off (enabled: false) and what their readers read instead
            **({"disabled": {sid: list(instead) for sid, instead in compiled.disabled.items()}} if compiled.disabled
               else {}),
            "output": compiled.output,
            "results": result_records,
        }

    def _index_record(self, index: Index) -> dict[str, Any]:
        """What a trace records about the index: its description, the corpus's sha256 and a sha256 per component
        over its files' hashes (so a replay against a rebuilt index can say whether the corpus was the same and
        which components' files differ). Computed once per index."""
        cached = self._index_identity
        if cached is not None and cached[0] is index:
            return json.loads(cached[1])  # each trace its own copy: a caller editing one edits no other
        record = index.describe()
        manifest = index.manifest if isinstance(getattr(index, "manifest", None), dict) else {}
        corpus = manifest.get("corpus") if isinstance(manifest.get("corpus"), dict) else {}
        if isinstance(corpus.get("sha256"), str):
            record["corpus_sha256"] = corpus["sha256"]
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        if files:
            parts: dict[str, dict[str, Any]] = {}
            for name, digest in files.items():
                component = name.split("/", 1)[0] if "/" in name else "documents"
                parts.setdefault(component, {})[name] = digest
            record["component_sha256"] = {
                component: hashlib.sha256(canonical(entries)).hexdigest() for component, entries in sorted(parts.items())
            }
        self._index_identity = (index, json.dumps(record))
        return json.loads(self._index_identity[1])  # not record: its parts are the manifest's own

    def explain(self, candidate: Candidate, outcomes: dict[str, StageOutcome]) -> Explanation:
        """Explanation tree: the final score at the root, each ledger entry's own tree below."""
        _require(candidate, (Candidate,), "explain's candidate", "an engine.model.Candidate (a RunResult's results)")
        _require(outcomes, (dict,), "explain's outcomes", "the dict of run(..., keep_outcomes=True).outcomes")
        return Explanation(*self._explainer(outcomes)(candidate))

    def _explainer(self, outcomes: dict[str, StageOutcome]) -> Callable[
            [Candidate], tuple[float, str, tuple[Explanation, ...]]]:
        """The root of a candidate's explanation tree (value, description, the ledger entries' trees below it), with
        what is the same for every candidate of the query looked up once: which stages ran (each one's ``explain``
        and the query it saw) and whether the trace may hold query text. Made per query: nothing outlives it."""
        trace_text = self.compiled.config.trace.include_query_text
        stages = self.compiled.stages
        explainers = {stage_id: (stages[stage_id].explain, outcome.query)
                      for stage_id, outcome in outcomes.items() if stage_id in stages}

        def root(candidate: Candidate) -> tuple[float, str, tuple[Explanation, ...]]:
            ledger = candidate.ledger
            details = []
            for entry in ledger:
                found = explainers.get(entry.stage)
                if found is not None:
                    stage_explain, stage_query = found
                    details.append(stage_explain(stage_query, candidate, entry.value, entry.rank, trace_text))
            if ledger:  # candidate.score: the last entry's value
                last = ledger[-1]
                return last.value, f"score of '{candidate.doc_id}' from stage '{last.stage}'", tuple(details)
            return 0.0, f"'{candidate.doc_id}' was never scored", tuple(details)

        return root

    def log_target(self, log_path: Path | None = None) -> Path | None:
        """The log a trace goes to: ``log_path`` (``--log``), else the config's ``trace.log``; None for none."""
        _require(log_path, (str, os.PathLike, type(None)), "the log path", "a str or a pathlib.Path (or None)")
        if log_path is not None:
            return Path(log_path)
        configured = self.compiled.config.trace.log
        if configured is None:
            return None
        return self._made_in / configured if self._made_in is not None else Path(configured)

    def log_trace(self, trace: dict[str, Any], log_path: Path | None = None) -> Path | None:
        """Append to the configured tamper-evident log (or ``log_path``); returns the log's path.

        Once logged, the trace says where (``trace["log"]``: the log's absolute path, the record's seq and hash;
        not part of what was hashed), so a copy of it written elsewhere (``--trace-out``) can be checked against
        that record by ``sieve replay`` and ``sieve report``."""
        _require(trace, (dict,), "the trace", "a dict (a RunResult's trace)")
        target = self.log_target(log_path)
        if target is None:
            return None
        logged = {k: v for k, v in trace.items() if k != "log"}
        try:
            record = TraceLog(target).append(logged)
        except TypeError as exc:  # a value JSON cannot hold (a set, bytes, a datetime) in a trace built by hand
            raise TraceError(f"cannot append to the trace log {target}: the trace holds a value JSON cannot hold "
                             f"({exc})") from None
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path, text that is not valid Unicode
            raise TraceError(f"cannot append to the trace log {target}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from exc
        trace["log"] = {"path": str(Path(target).absolute()), "seq": record["seq"], "hash": record["hash"]}
        return target


def _require(value: Any, kinds: tuple[type, ...], what: str, expected: str) -> None:
    """A QueryError naming what was given where the library expects another kind (not Python's TypeError or
    AttributeError from deep inside: every error Sieve raises is a SieveError)."""
    if not isinstance(value, kinds):
        raise QueryError(f"{what} must be {expected}, got {type(value).__name__}")


def _drop(drop: Drop) -> dict[str, Any]:
    record = {"doc_id": drop.doc_id, "reason": drop.reason}
    if drop.detail:
        record["detail"] = drop.detail
    return record


def _decision(decision: Decision) -> dict[str, Any]:
    record: dict[str, Any] = {"code": decision.code, "detail": decision.detail}
    if decision.data:
        record["data"] = decision.data
    return record


def _check_plugin_result(stage_id: str, produces: Port, result: Any, lists: list[list[Candidate]],
                         resources: Resources) -> None:
    """A third party's stage result, checked before the engine takes it (a bad one is the stage's error, so
    ``on_error`` applies): a StageResult; candidates that are Candidates of real rows, each document once;
    a ledger that keeps its inputs' entries as they were plus at most one of the stage's own (a score under
    another stage's name would be credited to that stage in the trace); finite scores; drops, decisions and
    details of the right kinds, the details plain JSON."""
    import json
    import math

    def fail(message: str) -> None:
        raise SieveError(f"the plugin stage returned {message}")

    if not isinstance(result, StageResult):
        fail(f"a {type(result).__name__}, not a StageResult")
    if produces is Port.CANDIDATES and result.candidates is not None:
        if not isinstance(result.candidates, list):
            fail(f"candidates as a {type(result.candidates).__name__}, not a list")
        index = resources.index
        doc_ids = index.doc_ids() if index is not None else None
        given = {}
        for items in lists:
            for candidate in items:
                for entry in candidate.ledger:
                    given[(candidate.doc_id, entry.stage)] = entry
        seen: set[str] = set()
        for position, candidate in enumerate(result.candidates):
            if not isinstance(candidate, Candidate):
                fail(f"a {type(candidate).__name__} at position {position} of its candidates, not a Candidate")
            if candidate.doc_id in seen:
                fail(f"document '{candidate.doc_id}' twice")
            seen.add(candidate.doc_id)
            if doc_ids is not None and not (isinstance(candidate.row, int) and 0 <= candidate.row < len(doc_ids)
                                            and doc_ids[candidate.row] == candidate.doc_id):
                fail(f"document '{candidate.doc_id}' with row {candidate.row!r}, which is not its row in the index")
            own = 0
            for entry in candidate.ledger:
                if not isinstance(entry, ScoreEntry) or not isinstance(entry.value, (int, float)) or isinstance(
                        entry.value, bool) or not math.isfinite(entry.value):
                    fail(f"a ledger entry {entry!r} of document '{candidate.doc_id}' that is not a finite score")
                if entry.stage == stage_id:
                    own += 1
                elif given.get((candidate.doc_id, entry.stage)) != entry:
                    fail(f"a score of document '{candidate.doc_id}' under stage '{entry.stage}', which did not give "
                         "it (a stage scores under its own id only)")
            if own > 1:
                fail(f"{own} scores of its own for document '{candidate.doc_id}' (one at most)")
    for name, kind, items in (("drops", Drop, result.drops), ("decisions", Decision, result.decisions)):
        if not isinstance(items, list) or not all(isinstance(item, kind) for item in items):
            fail(f"{name} that are not a list of {kind.__name__}")
    if not isinstance(result.details, dict):
        fail(f"details as a {type(result.details).__name__}, not a dict")
    try:
        json.dumps(result.details, allow_nan=False)
    except (TypeError, ValueError) as exc:
        fail(f"details that are not plain JSON ({exc})")
