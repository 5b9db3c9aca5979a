"""Fusion stages: merge candidate lists into one ranking.

- ``fuse.rrf``: Reciprocal Rank Fusion, ``score(d) = sum_i w_i / (k + rank_i(d))`` over the
  inputs that retrieved ``d`` (rank = 1-based position in that input's list; an input that did not
  retrieve ``d`` adds nothing). Scores are ignored, so BM25 and cosine need no calibration.
- ``fuse.weighted``: ``score(d) = sum_s w_s * norm_s(x_s(d))`` over named ledger signals (keys
  are upstream stage ids), each normalised over this stage's candidate list by a declared method
  (:mod:`stages.normalize`), with an explicit policy for a document that lacks a signal.

Both take the union of their inputs; a document's ledger keeps every input's entries
(``Candidate.merged``) and gains this stage's score. Ties break on doc_id.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from engine.errors import StageError
from engine.model import Candidate, Decision, Drop, Query, ScoreEntry
from engine.registry import register_stage
from engine.stage import (
    Explanation,
    GraphIssue,
    GraphView,
    Port,
    Stage,
    StageContext,
    StageNode,
    StageParams,
    StageResult,
)
from stages.normalize import METHODS, Method, SignalStats, apply, formula


def union(lists: Sequence[Sequence[Candidate]]) -> dict[str, Candidate]:
    """Candidates of every list by doc_id, ledgers merged (first list's entries first)."""
    merged: dict[str, Candidate] = {}
    for items in lists:
        for candidate in items:
            existing = merged.get(candidate.doc_id)
            merged[candidate.doc_id] = candidate if existing is None else existing.merged(candidate)
    return merged


def _weight_issues(weights: dict[str, float], valid: dict[str, str], what: str) -> list[GraphIssue]:
    """Non-finite, negative, all-zero, or unknown weights, each located at its key."""
    issues = []
    for key, weight in weights.items():
        path = ("params", "weights", key)
        if not math.isfinite(weight):
            issues.append(GraphIssue(f"weight of '{key}' must be a finite number, got {weight}", path))
        elif weight < 0:
            issues.append(GraphIssue(f"weight of '{key}' is negative ({weight:g}); weights must be >= 0", path))
        if key not in valid:
            from difflib import get_close_matches

            hint = get_close_matches(key, list(valid), n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            known = ", ".join(f"{k} ({v})" for k, v in sorted(valid.items())) or "none"
            issues.append(GraphIssue(f"'{key}' is not {what}{did_you_mean}; available: {known}", path))
    finite = [w for w in weights.values() if math.isfinite(w)]
    if weights and finite and len(finite) == len(weights) and not any(w > 0 for w in finite):
        issues.append(GraphIssue("at least one weight must be positive (all are 0)", ("params", "weights")))
    return issues


class _Notes:
    """Per-document explanation notes for the most recent queries, keyed by the Query object."""

    def __init__(self, capacity: int = 64):
        self._items: OrderedDict[int, tuple[Query, dict[str, Any]]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def put(self, query: Query, notes: dict[str, Any]) -> None:
        with self._lock:
            # The Query is held, so its id cannot be reused while the entry lives.
            self._items[id(query)] = (query, notes)
            self._items.move_to_end(id(query))
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def get(self, query: Query, doc_id: str) -> Any:
        with self._lock:
            found = self._items.get(id(query))
        if found is None or found[0] is not query:
            return None
        return found[1].get(doc_id)


# The engine hands a stage its candidate lists (``StageContext.inputs``) without the ids of the
# stages that produced them, and constructs the stage with only (id, params). fuse.rrf needs the
# ids (weights are keyed by input id; explanations name the input), so ``check_graph``, which the
# compiler runs on every node just before constructing the stages, records them here under the
# identity of the node's params object, and the constructor takes them back. Pipeline._inherit
# passes the lists in the order of the stage's `inputs`, candidate-producing inputs only.
_WIRING: dict[int, tuple[str, ...]] = {}


def _cut(ranked: list[Candidate], top_k: int | None) -> tuple[list[Candidate], list[Drop]]:
    if top_k is None or len(ranked) <= top_k:
        return ranked, []
    return ranked[:top_k], [Drop(c.doc_id, "beyond_top_k", f"top_k={top_k}") for c in ranked[top_k:]]


# --------------------------------------------------------------------------- fuse.rrf


class RRFParams(StageParams):
    k: float = Field(60.0, ge=0, allow_inf_nan=False, description="rank constant: score = sum w / (k + rank)")
    weights: dict[str, float] | None = Field(
        None, description="weight per input stage id; None: 1 for every input; an input not listed gets 1"
    )
    top_k: int | None = Field(None, ge=1, le=100_000, description="keep this many; None: the whole union")


@dataclass(frozen=True)
class _RRFTerm:
    input_id: str
    rank: int | None  # None: not retrieved by this input
    weight: float
    value: float


@register_stage
class ReciprocalRankFusion(Stage):
    """Reciprocal Rank Fusion of two or more candidate lists."""

    type_name = "fuse.rrf"
    version = 1
    Params = RRFParams
    produces = Port.CANDIDATES
    accepts = frozenset({Port.CANDIDATES, Port.QUERY, Port.MASK})
    min_candidate_inputs = 2
    max_candidate_inputs = None
    signal = "rrf"
    summary = "reciprocal rank fusion: sum of w / (k + rank) over the inputs"
    params: RRFParams

    def __init__(self, stage_id: str, params: StageParams):
        super().__init__(stage_id, params)
        self._notes = _Notes()
        # See _WIRING: the ids of the candidate inputs, in the order the engine passes their lists.
        self._input_ids: tuple[str, ...] | None = _WIRING.pop(id(params), None)

    @classmethod
    def check_graph(cls, node: StageNode, graph: GraphView) -> Sequence[GraphIssue]:
        params = node.params
        assert isinstance(params, RRFParams)
        candidate_inputs = {
            i: graph.node(i).cls.type_name for i in node.inputs if graph.node(i).cls.produces is Port.CANDIDATES
        }
        _WIRING[id(params)] = tuple(candidate_inputs)
        if params.weights is None:
            return ()
        return _weight_issues(params.weights, candidate_inputs, "a candidate input of this stage")

    def _weight(self, input_id: str) -> float:
        weights = self.params.weights
        if weights is None or input_id not in weights:
            return 1.0
        return weights[input_id]

    def run(self, ctx: StageContext) -> StageResult:
        input_ids = self._candidate_input_ids(ctx)
        k = self.params.k
        positions: list[dict[str, int]] = [
            {c.doc_id: position for position, c in enumerate(items, start=1)} for items in ctx.inputs
        ]
        merged = union(ctx.inputs)
        scores: dict[str, float] = {}
        notes: dict[str, list[_RRFTerm]] = {}
        for doc_id in merged:
            terms = []
            for input_id, ranks in zip(input_ids, positions):
                rank = ranks.get(doc_id)
                weight = self._weight(input_id)
                value = weight / (k + rank) if rank is not None else 0.0
                terms.append(_RRFTerm(input_id, rank, weight, value))
            # Summed in input order with fsum: the same score whatever the hash order of the dict.
            scores[doc_id] = math.fsum(t.value for t in terms)
            notes[doc_id] = terms
        ordered = sorted(merged.values(), key=lambda c: (-scores[c.doc_id], c.doc_id))
        ranked = [
            c.with_score(ScoreEntry(self.id, "rrf", scores[c.doc_id], rank)) for rank, c in enumerate(ordered, start=1)
        ]
        kept, drops = _cut(ranked, self.params.top_k)
        self._notes.put(ctx.query, notes)
        in_all = sum(1 for terms in notes.values() if all(t.rank is not None for t in terms))
        details = {
            "inputs": {input_id: len(items) for input_id, items in zip(input_ids, ctx.inputs)},
            "union": len(merged),
            "in_every_input": in_all,
        }
        decisions = []
        if not merged:
            decisions.append(Decision("empty_input", "no input retrieved anything"))
        return StageResult(candidates=kept, drops=drops, decisions=decisions, details=details)

    def _candidate_input_ids(self, ctx: StageContext) -> list[str]:
        """Ids of the candidate inputs, parallel to ``ctx.inputs``."""
        ids = getattr(ctx, "input_ids", None)  # once the engine passes them (see _WIRING)
        if ids is None:
            ids = self._input_ids
        if ids is None or len(ids) != len(ctx.inputs):
            if self.params.weights is not None:
                raise StageError(self.id, self.qualified_name(),
                                 "cannot tell which input list is which, so per-input weights cannot be applied "
                                 "(the stage was not built by the compiler)")
            return [f"input {i + 1}" for i in range(len(ctx.inputs))]
        return list(ids)

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        description = (f"reciprocal rank fusion: sum over inputs of w / (k + rank), k={self.params.k:g}; "
                       f"rank {rank} in stage '{self.id}'")
        terms: list[_RRFTerm] | None = self._notes.get(query, candidate.doc_id)
        if terms is None:
            return Explanation(value, description)
        details = []
        for term in terms:
            if term.rank is None:
                details.append(Explanation(0.0, f"input '{term.input_id}': not retrieved, adds 0"))
            else:
                details.append(Explanation(
                    term.value,
                    f"input '{term.input_id}': rank {term.rank}, {term.weight:g} / ({self.params.k:g} + {term.rank})",
                ))
        return Explanation(value, description, tuple(details))


# --------------------------------------------------------------------------- fuse.weighted


class WeightedParams(StageParams):
    weights: dict[str, float] = Field(
        ..., min_length=1, description="weight per ledger signal, keyed by the upstream stage id that wrote it"
    )
    normalize: Method = Field("minmax", description=f"normalisation of every signal: {', '.join(METHODS)}")
    normalize_signals: dict[str, Method] = Field(
        default_factory=dict, description="per-signal override of `normalize`, e.g. {rerank: sigmoid}"
    )
    missing: Literal["zero", "min"] = Field(
        "zero", description="a document lacking a signal: zero: the term is 0; min: the lowest normalised value seen"
    )
    top_k: int | None = Field(None, ge=1, le=100_000, description="keep this many; None: all")


@dataclass(frozen=True)
class _WeightedTerm:
    signal: str
    weight: float
    method: str
    raw: float | None  # None: the document lacks this signal
    rank: int | None
    normalized: float
    how: str  # the normalisation written out

    @property
    def weighted(self) -> float:
        return self.weight * self.normalized


@register_stage
class WeightedFusion(Stage):
    """Weighted sum of normalised ledger signals over the union of the inputs."""

    type_name = "fuse.weighted"
    version = 1
    Params = WeightedParams
    produces = Port.CANDIDATES
    accepts = frozenset({Port.CANDIDATES, Port.QUERY, Port.MASK})
    min_candidate_inputs = 1
    max_candidate_inputs = None
    signal = "fused"
    summary = "weighted sum of normalised signals (minmax, zscore, sigmoid, rank)"
    params: WeightedParams

    def __init__(self, stage_id: str, params: StageParams):
        super().__init__(stage_id, params)
        self._notes = _Notes()

    @classmethod
    def check_graph(cls, node: StageNode, graph: GraphView) -> Sequence[GraphIssue]:
        params = node.params
        assert isinstance(params, WeightedParams)
        signals = graph.upstream_signals(node.id)
        issues = _weight_issues(params.weights, signals, "a signal written by an upstream stage")
        for key in params.normalize_signals:
            if key not in params.weights:
                issues.append(GraphIssue(
                    f"normalisation given for '{key}', which has no weight; weighted signals: "
                    f"{', '.join(params.weights)}",
                    ("params", "normalize_signals", key),
                ))
        return issues

    def method_of(self, signal: str) -> str:
        return self.params.normalize_signals.get(signal, self.params.normalize)

    def run(self, ctx: StageContext) -> StageResult:
        params = self.params
        merged = union(ctx.inputs)
        decisions: list[Decision] = []
        details: dict[str, Any] = {"union": len(merged), "signals": {}}
        columns: dict[str, dict[str, tuple[float, int]]] = {}
        for signal in params.weights:
            present: dict[str, tuple[float, int]] = {}
            non_finite = []
            for doc_id, candidate in merged.items():
                entry = next((e for e in candidate.ledger if e.stage == signal), None)
                if entry is None:
                    continue
                if not math.isfinite(entry.value):
                    non_finite.append(doc_id)
                    continue
                present[doc_id] = (entry.value, entry.rank)
            if non_finite:
                decisions.append(Decision(
                    "non_finite_score", f"signal '{signal}': {len(non_finite)} non-finite scores treated as missing",
                    {"doc_ids": sorted(non_finite)},
                ))
            columns[signal] = present

        stats: dict[str, SignalStats] = {}
        normalized: dict[str, dict[str, float]] = {}
        for signal, present in columns.items():
            method = self.method_of(signal)
            ordered_ids = sorted(present)
            values = [present[d][0] for d in ordered_ids]
            ranks = [present[d][1] for d in ordered_ids]
            signal_stats = SignalStats.of(values, ranks)
            stats[signal] = signal_stats
            normalized[signal] = {d: apply(method, v, r, signal_stats) for d, v, r in zip(ordered_ids, values, ranks)}
            details["signals"][signal] = {
                "method": method, "present": len(present), "missing": len(merged) - len(present),
            }
            if not present and merged:
                decisions.append(Decision("signal_absent", f"no candidate carries signal '{signal}'; its term is 0"))
            elif method == "minmax" and signal_stats.tied:
                decisions.append(Decision(
                    "minmax_tied",
                    f"signal '{signal}': {signal_stats.count} value(s), all equal; minmax maps each to "
                    f"{apply('minmax', values[0], 1, signal_stats):g}",
                ))
            elif method == "zscore" and signal_stats.flat:
                decisions.append(Decision(
                    "zscore_flat", f"signal '{signal}': standard deviation 0 over {signal_stats.count} value(s); "
                    "zscore maps each to 0",
                ))

        scores: dict[str, float] = {}
        notes: dict[str, list[_WeightedTerm]] = {}
        for doc_id in merged:
            terms = []
            for signal, weight in params.weights.items():
                method = self.method_of(signal)
                if doc_id in columns[signal]:
                    raw, rank = columns[signal][doc_id]
                    value = normalized[signal][doc_id]
                    how = formula(method, raw, rank, stats[signal])
                    terms.append(_WeightedTerm(signal, weight, method, raw, rank, value, how))
                else:
                    value, how = self._missing_value(signal, normalized[signal])
                    terms.append(_WeightedTerm(signal, weight, method, None, None, value, how))
            scores[doc_id] = math.fsum(t.weighted for t in terms)
            notes[doc_id] = terms

        ordered = sorted(merged.values(), key=lambda c: (-scores[c.doc_id], c.doc_id))
        ranked = [
            c.with_score(ScoreEntry(self.id, "fused", scores[c.doc_id], rank)) for rank, c in enumerate(ordered, start=1)
        ]
        kept, drops = _cut(ranked, params.top_k)
        if not merged:
            decisions.append(Decision("empty_input", "no candidates to fuse"))
        self._notes.put(ctx.query, notes)
        return StageResult(candidates=kept, drops=drops, decisions=decisions, details=details)

    def _missing_value(self, signal: str, normalized: dict[str, float]) -> tuple[float, str]:
        if self.params.missing == "min" and normalized:
            lowest = min(normalized.values())
            return lowest, f"missing: policy 'min', the lowest normalised '{signal}' value in the list ({lowest:.6g})"
        if self.params.missing == "min":
            return 0.0, f"missing: policy 'min', but no candidate carries '{signal}', so 0"
        return 0.0, "missing: policy 'zero', so 0"

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        weights = " + ".join(f"{w:g}*norm({s})" for s, w in self.params.weights.items())
        description = (f"weighted fusion: {weights} (weights not rescaled; missing signal policy "
                       f"'{self.params.missing}'); rank {rank} in stage '{self.id}'")
        terms: list[_WeightedTerm] | None = self._notes.get(query, candidate.doc_id)
        if terms is None:
            return Explanation(value, description)
        details = []
        for term in terms:
            if term.raw is None:
                inner: tuple[Explanation, ...] = (Explanation(term.normalized, term.how),)
            else:
                inner = (Explanation(term.normalized, term.how, (
                    Explanation(term.raw, f"raw '{term.signal}' score (rank {term.rank} there)"),
                )),)
            details.append(Explanation(
                term.weighted,
                f"signal '{term.signal}': weight {term.weight:g} x normalised {term.normalized:.6g} ({term.method})",
                inner,
            ))
        return Explanation(value, description, tuple(details))
