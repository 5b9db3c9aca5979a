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
from collections.abc import Sequence
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
    RecentNotes,
    Stage,
    StageContext,
    StageNode,
    StageParams,
    StageResult,
)
from stages.normalize import FLAT_ZSCORE, METHODS, TIED_MINMAX, Method, SignalStats, apply, formula


def union(lists: Sequence[Sequence[Candidate]]) -> dict[str, Candidate]:
    """Candidates of every list by doc_id, ledgers merged (first list's entries first)."""
    merged: dict[str, Candidate] = {}
    for items in lists:
        for candidate in items:
            existing = merged.get(candidate.doc_id)
            merged[candidate.doc_id] = candidate if existing is None else existing.merged(candidate)
    return merged


class _Union:
    """The union of the input lists, merging a document's ledgers only when it is kept.

    Merging is the costly part of a fusion (a new ledger per overlapping document); documents cut
    by ``top_k`` never need it. ``merged(doc_id)`` equals ``union(lists)[doc_id]``.
    """

    def __init__(self, lists: Sequence[Sequence[Candidate]]):
        self.first: dict[str, Candidate] = {}
        self.later: dict[str, list[Candidate]] = {}
        for items in lists:
            for candidate in items:
                if candidate.doc_id in self.first:
                    self.later.setdefault(candidate.doc_id, []).append(candidate)
                else:
                    self.first[candidate.doc_id] = candidate

    def __len__(self) -> int:
        return len(self.first)

    def merged(self, doc_id: str) -> Candidate:
        candidate = self.first[doc_id]
        for other in self.later.get(doc_id, ()):
            candidate = candidate.merged(other)
        return candidate


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
            if weight == 0:  # contributes nothing: a variant that switches its stage off need not drop the weight
                issues.append(GraphIssue(f"'{key}' is not {what}{did_you_mean}; available: {known}; its weight is 0, "
                                         "so it changes nothing", path, "warning"))
            else:
                issues.append(GraphIssue(f"'{key}' is not {what}{did_you_mean}; available: {known}", path))
    finite = [w for w in weights.values() if math.isfinite(w)]
    if weights and finite and len(finite) == len(weights) and not any(w > 0 for w in finite):
        issues.append(GraphIssue("no weight is positive, so every document would score 0; give at least one "
                                 "input a weight above 0", ("params", "weights")))
    return issues


def _scored(candidate: Candidate, entry: ScoreEntry) -> Candidate:
    """``candidate`` with this stage's entry appended. A DAG never routes a candidate through the
    same stage twice, so ``Candidate.with_score``'s duplicate scan (5 us a call here) is skipped."""
    return Candidate(candidate.doc_id, candidate.row, candidate.ledger + (entry,))


# The engine hands a stage its candidate lists (``StageContext.inputs``) without the ids of the
# stages that produced them, and constructs the stage with only (id, params). fuse.rrf needs the
# ids (weights are keyed by input id; explanations name the input), so ``check_graph``, which the
# compiler runs on every node just before constructing the stages, records them here under the
# identity of the node's params object, and the constructor takes them back. Pipeline._inherit
# passes the lists in the order of the stage's `inputs`, candidate-producing inputs only.
_WIRING: dict[int, tuple[str, ...]] = {}


def _rank_and_cut(
    stage_id: str, signal: str, pool: _Union, scores: dict[str, float], top_k: int | None
) -> tuple[list[Candidate], list[Drop]]:
    """Order by score (ties on doc_id), keep ``top_k`` with this stage's ledger entry, report the rest."""
    order = sorted(scores, key=lambda doc_id: (-scores[doc_id], doc_id))
    keep = order if top_k is None else order[:top_k]
    kept = [
        _scored(pool.merged(doc_id), ScoreEntry(stage_id, signal, scores[doc_id], rank))
        for rank, doc_id in enumerate(keep, start=1)
    ]
    detail = f"top_k={top_k}"
    drops = [Drop(doc_id, "beyond_top_k", detail) for doc_id in order[len(keep):]]
    return kept, drops


# --------------------------------------------------------------------------- fuse.rrf


class RRFParams(StageParams):
    k: float = Field(60.0, ge=0, allow_inf_nan=False, description="rank constant: score = sum w / (k + rank)")
    weights: dict[str, float] | None = Field(
        None, description="weight per input stage id; None: 1 for every input; an input not listed gets 1"
    )
    top_k: int | None = Field(None, ge=1, le=100_000, description="keep this many; None: the whole union")


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
        self._notes = RecentNotes()
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
        weights = [self._weight(input_id) for input_id in input_ids]
        width = len(ctx.inputs)
        pool = _Union(ctx.inputs)
        positions: dict[str, list[int | None]] = {doc_id: [None] * width for doc_id in pool.first}
        for which, items in enumerate(ctx.inputs):  # 1-based position of each document in each input
            for position, candidate in enumerate(items, start=1):
                positions[candidate.doc_id][which] = position
        # Summed in input order with fsum: the same score whatever order the documents came in.
        scores = {
            doc_id: math.fsum(w / (k + p) for w, p in zip(weights, found) if p is not None)
            for doc_id, found in positions.items()
        }
        kept, drops = _rank_and_cut(self.id, "rrf", pool, scores, self.params.top_k)
        self._notes.put_for(ctx.query, (tuple(input_ids), tuple(weights), positions, ctx.bypassed))
        details = {
            "inputs": {input_id: len(items) for input_id, items in zip(input_ids, ctx.inputs)},
            "union": len(pool),
            "in_every_input": sum(1 for found in positions.values() if None not in found),
        }
        decisions = []
        if not len(pool):
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
        k = self.params.k
        description = f"reciprocal rank fusion: sum over inputs of w / (k + rank), k={k:g}; rank {rank} in stage '{self.id}'"
        notes = self._notes.get_for(query)
        found = notes[2].get(candidate.doc_id) if notes is not None else None
        if found is None:
            return Explanation(value, description)
        input_ids, weights, _, bypassed = notes
        details = []
        for input_id, weight, position in zip(input_ids, weights, found):
            if position is None and input_id in bypassed:
                details.append(Explanation(0.0, f"input '{input_id}': bypassed for this query (its `when` does not "
                                                "hold), adds 0"))
            elif position is None:
                details.append(Explanation(0.0, f"input '{input_id}': not retrieved, adds 0"))
            else:
                details.append(Explanation(
                    weight / (k + position), f"input '{input_id}': rank {position}, {weight:g} / ({k:g} + {position})"
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
        self._notes = RecentNotes()

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
        pool = _Union(ctx.inputs)
        decisions: list[Decision] = []
        signals = list(params.weights)
        # One pass over the ledgers: signal -> doc_id -> (raw value, the rank its stage gave); the
        # first entry seen for a document wins, as in Candidate.merged.
        columns: dict[str, dict[str, tuple[float, int]]] = {signal: {} for signal in signals}
        non_finite: dict[str, list[str]] = {}
        for candidate in (c for items in ctx.inputs for c in items):
            doc_id = candidate.doc_id
            for entry in candidate.ledger:
                column = columns.get(entry.stage)
                if column is None or doc_id in column:
                    continue
                if math.isfinite(entry.value):
                    column[doc_id] = (entry.value, entry.rank)
                else:
                    non_finite.setdefault(entry.stage, []).append(doc_id)
        for signal, doc_ids in non_finite.items():
            decisions.append(Decision(
                "non_finite_score", f"signal '{signal}': {len(doc_ids)} non-finite scores treated as missing",
                {"doc_ids": sorted(doc_ids)},
            ))

        details: dict[str, Any] = {"union": len(pool), "signals": {}}
        stats: dict[str, SignalStats] = {}
        normalized: dict[str, dict[str, float]] = {}
        missing_value: dict[str, float] = {}
        for signal in signals:
            method = self.method_of(signal)
            column = columns[signal]
            signal_stats = SignalStats.of([v for v, _ in column.values()], [r for _, r in column.values()])
            stats[signal] = signal_stats
            normalized[signal] = {d: apply(method, v, r, signal_stats) for d, (v, r) in column.items()}
            missing_value[signal] = (
                min(normalized[signal].values()) if params.missing == "min" and column else 0.0
            )
            details["signals"][signal] = {"method": method, "present": len(column), "missing": len(pool) - len(column)}
            if not column and len(pool):
                decisions.append(Decision("signal_absent", f"no candidate carries signal '{signal}'; its term is 0"))
            elif method == "minmax" and signal_stats.tied:
                decisions.append(Decision(
                    "minmax_tied",
                    f"signal '{signal}': {signal_stats.count} value(s), all equal; minmax maps each to {TIED_MINMAX:g}",
                ))
            elif method == "zscore" and signal_stats.flat:
                decisions.append(Decision(
                    "zscore_flat", f"signal '{signal}': standard deviation 0 over {signal_stats.count} value(s); "
                    f"zscore maps each to {FLAT_ZSCORE:g}",
                ))

        terms = [(params.weights[s], normalized[s], missing_value[s]) for s in signals]
        scores = {
            doc_id: math.fsum(w * values.get(doc_id, missing) for w, values, missing in terms) for doc_id in pool.first
        }
        kept, drops = _rank_and_cut(self.id, "fused", pool, scores, params.top_k)
        if not len(pool):
            decisions.append(Decision("empty_input", "no candidates to fuse"))
        self._notes.put_for(ctx.query, (columns, normalized, missing_value, stats))
        return StageResult(candidates=kept, drops=drops, decisions=decisions, details=details)

    def _missing_description(self, signal: str, present: int, value: float) -> str:
        if self.params.missing == "zero":
            return "missing: policy 'zero', so 0"
        if present:
            return f"missing: policy 'min', the lowest normalised '{signal}' value in the list ({value:.6g})"
        return f"missing: policy 'min', but no candidate carries '{signal}', so 0"

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        weights = " + ".join(f"{w:g}*norm({s})" for s, w in self.params.weights.items())
        description = (f"weighted fusion: {weights} (weights not rescaled; missing signal policy "
                       f"'{self.params.missing}'); rank {rank} in stage '{self.id}'")
        notes = self._notes.get_for(query)
        if notes is None:
            return Explanation(value, description)
        columns, normalized, missing_value, stats = notes
        doc_id = candidate.doc_id
        details = []
        for signal, weight in self.params.weights.items():
            method = self.method_of(signal)
            if doc_id in columns[signal]:
                raw, raw_rank = columns[signal][doc_id]
                term = normalized[signal][doc_id]
                inner = Explanation(term, formula(method, raw, raw_rank, stats[signal]), (
                    Explanation(raw, f"raw '{signal}' score (rank {raw_rank} there)"),
                ))
            else:
                term = missing_value[signal]
                inner = Explanation(term, self._missing_description(signal, len(columns[signal]), term))
            details.append(Explanation(
                weight * term, f"signal '{signal}': weight {weight:g} x normalised {term:.6g} ({method})", (inner,)
            ))
        return Explanation(value, description, tuple(details))
