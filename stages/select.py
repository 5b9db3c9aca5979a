"""Selection stages: cut a ranked list to its final size."""

from __future__ import annotations

import math

from pydantic import Field

from engine.model import Drop
from engine.registry import register_stage
from engine.stage import Port, Stage, StageContext, StageParams, StageResult


class TopKParams(StageParams):
    k: int = Field(10, ge=1, le=10_000, description="how many results to return")
    min_score: float | None = Field(
        None, description="drop candidates whose current score is below this floor (None: no floor)"
    )


@register_stage
class TopK(Stage):
    """Keep the first k candidates (in the order received), optionally above a score floor."""

    type_name = "select.top_k"
    version = 1
    Params = TopKParams
    produces = Port.CANDIDATES
    accepts = frozenset({Port.CANDIDATES})
    summary = "keep the top k candidates, optionally above a score floor"
    params: TopKParams

    def run(self, ctx: StageContext) -> StageResult:
        (incoming,) = ctx.inputs
        floor = self.params.min_score
        kept, drops = [], []
        for candidate in incoming:
            if floor is not None and not candidate.score >= floor:  # a NaN score is below any floor
                drops.append(Drop(candidate.doc_id, "below_min_score", f"{candidate.score:.6g} < {floor:g}"
                                  if math.isfinite(candidate.score) else f"score {candidate.score} is not a number"))
            elif len(kept) >= self.params.k:
                drops.append(Drop(candidate.doc_id, "beyond_top_k", f"k={self.params.k}"))
            else:
                kept.append(candidate)
        return StageResult(candidates=kept, drops=drops)
