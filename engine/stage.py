"""The contract between the engine and a stage.

A stage type is a class registered under a versioned name (``recall.bm25@1``). It declares what
it consumes and produces (typed ports, checked when the pipeline is compiled), a frozen pydantic
model for its parameters, and optionally a whole-graph check. Constructors are cheap; anything
heavy (an index, a model) is loaded in :meth:`Stage.warm_up`, once per process.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ConfigDict

from engine.cache import LRUCache
from engine.errors import DeadlineExceeded
from engine.model import Candidate, Decision, Drop, Query
from engine.strictness import NoCoercion

if TYPE_CHECKING:
    import numpy as np

    from engine.index import Index


class Port(str, enum.Enum):
    """What flows along an edge of the pipeline."""

    QUERY = "query"  # a (rewritten) query
    MASK = "mask"  # which documents may be retrieved at all
    CANDIDATES = "candidates"  # a ranked candidate list


class StageParams(NoCoercion):
    """Base of every stage's parameter model: frozen, a misspelt key is an error, numbers and booleans are
    taken as written (no "10" -> 10, no true -> 1) and must be finite."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class DocumentMask:
    """Rows of the index that may be retrieved (``allowed[row]``), and which stages decided it."""

    allowed: "np.ndarray"
    sources: tuple[str, ...]

    def intersect(self, other: "DocumentMask") -> "DocumentMask":
        return DocumentMask(self.allowed & other.allowed, self.sources + other.sources)


@dataclass(frozen=True, init=False)
class Explanation:
    """Elasticsearch-style explanation: a value, how it was computed, and its parts."""

    value: float
    description: str
    details: tuple["Explanation", ...] = ()

    def __init__(self, value: float, description: str, details: tuple["Explanation", ...] = ()) -> None:
        # What the generated __init__ of a frozen dataclass does (the fields, in order, into the instance's dict) in
        # under half its time: that one calls object.__setattr__ per field. A traced query makes hundreds of nodes
        # (explanation_dicts reads them back from this dict).
        fields = self.__dict__
        fields["value"] = value
        fields["description"] = description
        fields["details"] = details

    def to_dict(self) -> dict[str, Any]:
        """The tree as plain dicts: ``{"value", "description", "details": [...]}`` at every level."""
        details = self.details
        return {"value": self.value, "description": self.description,
                "details": explanation_dicts(details) if details else []}


def explanation_dicts(nodes: Sequence[Explanation]) -> list[dict[str, Any]]:
    """``[node.to_dict() for node in nodes]``, with a call per inner node only (a traced query turns hundreds of
    nodes into dicts, most of them leaves); a subclass's node is asked for its own ``to_dict``."""
    dicts = []
    for node in nodes:
        if type(node) is not Explanation:
            dicts.append(node.to_dict())
            continue
        fields = node.__dict__  # what __init__ filled: quicker to read than the attributes
        details = fields["details"]
        dicts.append({"value": fields["value"], "description": fields["description"],
                      "details": explanation_dicts(details) if details else []})
    return dicts


@dataclass
class StageContext:
    """Everything a stage sees when it runs for one query."""

    stage_id: str
    query: Query
    inputs: list[list[Candidate]]  # one ranked list per candidate-producing input, in order
    mask: DocumentMask | None
    resources: "Resources"
    trace_text: bool = True  # may the stage put query-derived text (terms, entities) in the trace?
    bypassed: frozenset[str] = frozenset()  # its inputs routed past for this query (their `when` did not hold)


@dataclass
class StageResult:
    """What a stage returns. Only the field matching the stage's ``produces`` port is read."""

    candidates: list[Candidate] | None = None
    query: Query | None = None
    mask: DocumentMask | None = None
    drops: list[Drop] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GraphIssue:
    """A whole-pipeline problem a stage found in its own wiring; ``path`` is relative to the stage."""

    message: str
    path: tuple[str | int, ...] = ()
    severity: str = "error"


@dataclass(frozen=True)
class StageNode:
    """A stage as the compiler sees it when running graph checks."""

    id: str
    cls: type["Stage"]
    params: StageParams
    inputs: tuple[str, ...]


class GraphView:
    """Read-only view of the compiled graph offered to :meth:`Stage.check_graph`."""

    def __init__(self, nodes: dict[str, StageNode], base_dir: Path | None = None):
        self._nodes = nodes
        self.base_dir = base_dir  # the pipeline file's directory: where relative rule files live
        self._most: dict[str, int | None] = {}  # most_candidates, each stage's worked out once (shared upstreams)

    def node(self, stage_id: str) -> StageNode:
        return self._nodes[stage_id]

    def nodes(self) -> list[StageNode]:
        """Every stage of the pipeline, in the order the config lists them."""
        return list(self._nodes.values())

    def ancestors(self, stage_id: str) -> list[StageNode]:
        """Every stage upstream of ``stage_id`` (transitively), in no particular order."""
        seen: dict[str, StageNode] = {}
        stack = list(self._nodes[stage_id].inputs)
        while stack:
            current = stack.pop()
            if current in seen or current not in self._nodes:
                continue
            seen[current] = self._nodes[current]
            stack.extend(self._nodes[current].inputs)
        return list(seen.values())

    def most_candidates(self, stage_id: str) -> int | None:
        """The most candidates ``stage_id`` can pass on, as far as the config says (None: no bound is known). A
        stage's own ``top_k`` (recall, fusion) or ``k`` (select.top_k) caps it; any other stage passes on at most
        what its candidate inputs do together, except one that can bring documents in (rules.override's pins)."""
        node = self._nodes.get(stage_id)
        if node is None or node.cls.type_name == "rules.override":
            return None
        if stage_id not in self._most:
            self._most[stage_id] = None  # a cycle (reported elsewhere) knows no bound
            sources = [i for i in node.inputs if i in self._nodes and self._nodes[i].cls.produces is Port.CANDIDATES]
            bounds = [self.most_candidates(source) for source in sources]
            passed = sum(bounds) if sources and None not in bounds else None  # type: ignore[arg-type]
            own = getattr(node.params, "k" if node.cls.type_name == "select.top_k" else "top_k", None)
            if isinstance(own, int) and not isinstance(own, bool):
                passed = own if passed is None else min(own, passed)
            self._most[stage_id] = passed
        return self._most[stage_id]

    def upstream_signals(self, stage_id: str) -> dict[str, str]:
        """Ledger keys (stage ids) that upstream stages write, mapped to their signal kind."""
        found = {n.id: n.cls.signal_for(n.params) for n in self.ancestors(stage_id)}
        return {stage: signal for stage, signal in found.items() if signal is not None}


class Resources:
    """Shared, process-wide things stages load once: the index, models, caches."""

    def __init__(self, index: "Index | None", base_dir: Path):
        self.index = index
        self.base_dir = base_dir
        self._shared: dict[str, Any] = {}
        # a lock per key (made under _loading), held while its thing loads: two pipelines sharing these resources
        # and warmed from two threads at once load it once, not twice, and the other keys meanwhile
        self._loading: dict[str, threading.Lock] = {}
        self._loading_lock = threading.Lock()

    def require_index(self, stage_id: str) -> "Index":
        from engine.errors import SieveIndexError

        if self.index is None:
            raise SieveIndexError(
                f"stage '{stage_id}' needs an index, but the config names none "
                "(set `index:` in the config or pass --index)"
            )
        return self.index

    def resolve_path(self, path: str | Path) -> Path:
        """A path from the config, relative to the config file's directory."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def sharing(self) -> "Resources":
        """New resources on the same index and directory that share what these loaded (models, components)."""
        resources = Resources(self.index, self.base_dir)
        resources._shared, resources._loading, resources._loading_lock = self._shared, self._loading, self._loading_lock
        return resources

    def shared(self, key: str, factory: Callable[[], Any]) -> Any:
        """Load something once per process (e.g. one BM25 index used by two stages), whichever thread asks first."""
        if key in self._shared:
            return self._shared[key]
        with self._loading_lock:
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:
            if key not in self._shared:
                self._shared[key] = factory()
        return self._shared[key]

    def peek(self, key: str) -> Any:
        """What :meth:`shared` holds under ``key`` if another stage loaded it, else None (nothing is loaded)."""
        return self._shared.get(key)


# The notes the stages of the pipeline run in progress made, by (store, key): see ``RecentNotes``
_RUN_NOTES: ContextVar[dict[tuple[int, Hashable], Any] | None] = ContextVar("sieve_run_notes", default=None)
_ABSENT = object()


@contextmanager
def run_notes() -> Iterator[None]:
    """Within it (one pipeline run, its stage threads given a copy of the context), every note a stage puts
    is also kept for the run: the run's explanations read them whatever other queries evicted meanwhile."""
    token = _RUN_NOTES.set({})
    try:
        yield
    finally:
        _RUN_NOTES.reset(token)


# When the stage running on this thread must stop (a time.perf_counter() value): set by the executor for a stage
# that may be cut (``on_error: skip``) under ``executor.deadline_ms``; None otherwise
_DEADLINE: ContextVar[float | None] = ContextVar("sieve_stage_deadline", default=None)


@contextmanager
def stage_deadline(deadline: float | None) -> Iterator[None]:
    """Within it, :func:`check_deadline` on this thread (and in contexts copied from it) enforces ``deadline``."""
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_deadline(expected_s: float = 0.0) -> None:
    """For a stage's long loops (a reranker's batches): raise :class:`DeadlineExceeded` once the query's deadline
    has passed, or when the rest of its work, expected to take ``expected_s`` seconds, would end past it (a step
    cannot be stopped once started, and an unfinished stage's work is discarded: better not to start it). A no-op unless the running stage may be cut (``on_error:
    skip`` in a pipeline with ``executor.deadline_ms``), so a stage calls it freely; the executor then skips the
    stage, as on a failure."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return
    now = time.perf_counter()
    if now >= deadline:
        raise DeadlineExceeded("the query's deadline passed while the stage ran")
    if now + expected_s >= deadline:
        raise DeadlineExceeded(f"the rest of its work, expected to take {expected_s * 1000:.0f} ms, would end past "
                               "the deadline")


def deadline_remaining() -> float | None:
    """Seconds left before the query's deadline for the running stage (negative once passed), or None when it may
    not be cut: for a stage's waits (a lock another query holds), as ``check_deadline`` is for its loops."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.perf_counter()


class RecentNotes:
    """What a stage computed for its most recent queries, kept for ``explain`` (bounded, thread-safe).

    ``put``/``get`` key by any hashable (e.g. the query text); ``put_for``/``get_for`` key by the
    :class:`Query` object itself, so a note is only ever read back for the very query it was made
    for (the Query is held, so its id cannot be reused while the entry lives). Inside a pipeline run
    (:func:`run_notes`) a note is also held by the run until it ends: on a busy server 64 other queries
    could pass a stage between a slow query's run of it and that query's explanations, which then lost
    their detail (and its trace replayed as different).
    """

    def __init__(self, capacity: int = 64):
        self._items: LRUCache[Hashable, Any] = LRUCache(capacity)

    def put(self, key: Hashable, notes: Any) -> None:
        run = _RUN_NOTES.get()
        if run is not None:
            run[(id(self), key)] = notes
        self._items.put(key, notes)

    def get(self, key: Hashable) -> Any:
        run = _RUN_NOTES.get()
        if run is not None:
            found = run.get((id(self), key), _ABSENT)
            if found is not _ABSENT:
                return found
        return self._items.get(key)

    def put_for(self, query: Query, notes: Any) -> None:
        self.put(id(query), (query, notes))

    def get_for(self, query: Query) -> Any:
        found = self.get(id(query))
        return found[1] if found is not None and found[0] is query else None


class Stage:
    """Base class of every stage type."""

    type_name: ClassVar[str]
    version: ClassVar[int] = 1
    Params: ClassVar[type[StageParams]] = StageParams
    produces: ClassVar[Port] = Port.CANDIDATES
    accepts: ClassVar[frozenset[Port]] = frozenset({Port.CANDIDATES})
    min_candidate_inputs: ClassVar[int] = 1
    max_candidate_inputs: ClassVar[int | None] = 1
    signal: ClassVar[str | None] = None  # the ledger signal this stage writes, if it scores
    summary: ClassVar[str] = ""

    def __init__(self, stage_id: str, params: StageParams):
        self.id = stage_id
        self.params = params

    @classmethod
    def qualified_name(cls) -> str:
        return f"{cls.type_name}@{cls.version}"

    @classmethod
    def signal_for(cls, params: StageParams | None) -> str | None:
        """The ledger signal a stage of this type with these params writes (``signal`` unless the params
        decide, as dedup's ``mmr_lambda`` does)."""
        return cls.signal

    @classmethod
    def check_graph(cls, node: StageNode, graph: GraphView) -> Sequence[GraphIssue]:
        """Cross-stage checks for this stage type (e.g. a weight naming an unknown signal)."""
        return ()

    def warm_up(self, resources: Resources) -> None:
        """Load whatever is heavy. Called once per process before the first query."""

    def warm_up_warnings(self) -> list[str]:
        """What warm-up found that does not stop the pipeline but changes what it does (an override rule reading a
        field no document has, a recency boost whose date field half the documents lack): shown by the CLI and the
        server at start, and kept in the traces by the stage. Read after :meth:`warm_up`."""
        return []

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedError

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        """How this stage arrived at ``value`` for ``candidate`` (``query`` as this stage saw it).

        Stages override this with their formula; ``trace_text`` says whether query-derived text
        (terms, entities) may appear in the explanation.
        """
        return Explanation(value, f"{self.qualified_name()} score (stage '{self.id}', rank {rank})")

    def identity(self) -> dict[str, Any] | None:
        """Model identity (name, path, weights hash, device, precision) for the trace, if any."""
        return None
