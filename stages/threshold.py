"""``select.threshold``: drop candidates whose score is below a floor, each drop with its reason.

The floor applies to the current score (the latest ledger entry), or to the score one named
upstream stage gave (``score_of``), optionally normalised over the incoming list first:
``max`` divides by the best score, ``minmax`` maps the list onto [0, 1] (a one-element or fully
tied list maps to 1.0, recorded as a decision). The ledger is not touched: the stage only drops.
Documents pinned by ``rules.override`` are kept whatever their score (``keep_pinned``), since an
analyst's pin must not be undone by a floor.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence

from pydantic import Field

from engine.model import Candidate, Decision, Drop
from engine.registry import register_stage
from engine.stage import GraphIssue, GraphView, Port, Stage, StageContext, StageNode, StageParams, StageResult

PIN_SIGNAL = "override.pin"  # written by rules.override for pinned documents


class ThresholdParams(StageParams):
    min_score: float = Field(description="candidates scoring below this (after normalisation) are dropped",
                             allow_inf_nan=False)
    score_of: Optional[str] = Field(
        None, description="id of the upstream stage whose score is tested; None: the current (latest) score"
    )
    normalize: Literal["none", "max", "minmax"] = Field(
        "none", description="none: raw score; max: score / best; minmax: (score - min) / (max - min)"
    )
    keep_pinned: bool = Field(True, description="never drop a document an override rule pinned")
    missing: Literal["drop", "keep"] = Field(
        "drop", description="what to do with a candidate that `score_of` never scored"
    )


@register_stage
class Threshold(Stage):
    """Drop what scores below a floor; keep the order of what remains."""

    type_name = "select.threshold"
    version = 1
    Params = ThresholdParams
    produces = Port.CANDIDATES
    accepts = frozenset({Port.CANDIDATES})
    summary = "drop candidates below a score floor (optionally normalised)"
    params: ThresholdParams

    @classmethod
    def check_graph(cls, node: StageNode, graph: GraphView) -> Sequence[GraphIssue]:
        params = node.params
        assert isinstance(params, ThresholdParams)
        if params.score_of is None:
            return ()
        signals = graph.upstream_signals(node.id)
        if params.score_of not in signals:
            known = ", ".join(sorted(signals)) or "none"
            return (GraphIssue(
                f"'{params.score_of}' is not an upstream stage that scores candidates; scoring stages upstream: {known}",
                ("params", "score_of"),
            ),)
        return ()

    def run(self, ctx: StageContext) -> StageResult:
        (incoming,) = ctx.inputs
        params = self.params
        decisions: list[Decision] = []
        source = params.score_of if params.score_of is not None else "current score"
        raw: dict[str, float | None] = {}
        not_numbers: dict[str, float] = {}  # scored, but not with a finite number (NaN, inf)
        for candidate in incoming:
            value = candidate.score_of(params.score_of) if params.score_of is not None else (
                candidate.score if candidate.ledger else None
            )
            if value is not None and not math.isfinite(value):
                not_numbers[candidate.doc_id] = value
                value = None
            raw[candidate.doc_id] = value
        present = [v for v in raw.values() if v is not None]
        scale = _normaliser(params.normalize, present, decisions)
        kept: list[Candidate] = []
        drops: list[Drop] = []
        pinned_kept = 0
        for candidate in incoming:
            value = raw[candidate.doc_id]
            pinned = params.keep_pinned and any(e.signal == PIN_SIGNAL for e in candidate.ledger)
            if value is None:
                if pinned or params.missing == "keep":
                    kept.append(candidate)
                else:
                    drops.append(Drop(candidate.doc_id, "no_score", (
                        f"{source} is {not_numbers[candidate.doc_id]}, not a number" if candidate.doc_id in not_numbers
                        else f"not scored by '{source}'")))
                continue
            normalised = scale(value)
            if normalised >= params.min_score:
                kept.append(candidate)
            elif pinned:
                kept.append(candidate)
                pinned_kept += 1
            else:
                how = "" if params.normalize == "none" else f" ({params.normalize}-normalised {source}, raw {value:.6g})"
                drops.append(Drop(candidate.doc_id, "below_threshold", f"{normalised:.6g} < {params.min_score:g}{how}"))
        if pinned_kept:
            decisions.append(Decision("pinned_kept", f"{pinned_kept} pinned documents kept despite scoring below "
                                      f"{params.min_score:g}"))
        details: dict[str, Any] = {"floor": params.min_score, "tested": source, "normalize": params.normalize,
                                   "kept": len(kept), "dropped": len(drops)}
        return StageResult(candidates=kept, drops=drops, decisions=decisions, details=details)


def _normaliser(kind: str, values: list[float], decisions: list[Decision]):  # type: ignore[no-untyped-def]
    if kind == "none" or not values:
        return lambda v: v
    high, low = max(values), min(values)
    if kind == "max":
        if high <= 0:
            decisions.append(Decision("normalisation_undefined", f"best score is {high:.6g} (not positive): "
                                      "max-normalisation is undefined; raw scores compared"))
            return lambda v: v
        return lambda v: v / high
    if high == low:
        decisions.append(Decision("normalisation_tied", f"all {len(values)} scores are equal: each normalises to 1.0"))
        return lambda v: 1.0
    span = high - low
    return lambda v: (v - low) / span
