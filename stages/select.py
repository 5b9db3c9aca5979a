"""Selection stages: cut a ranked list to its final size."""

from __future__ import annotations

import json
import math
from typing import Literal

from pydantic import Field, field_validator

from engine.model import Drop
from engine.registry import register_stage
from engine.stage import Port, Resources, Stage, StageContext, StageParams, StageResult

MAX_TRACED_UNREADABLE = 20


class MaxPerParams(StageParams):
    """A cap on the results that share a document field's value (at most n per source, say)."""

    field: str = Field(min_length=1, description=(
        "a document field, as rules name it without 'doc.' (source, access.team); its value, compared as "
        "JSON (a list as a whole), groups the candidates"))
    n: int = Field(ge=1, le=10_000, description="results kept per value at most; later ones are dropped (beyond_max_per)")
    missing: Literal["keep", "group"] = Field("keep", description=(
        "candidates without the field: keep (never capped) or group (capped together, as one value)"))

    @field_validator("field")
    @classmethod
    def _no_prefix(cls, value: str) -> str:
        if value.startswith("doc.") or any(not part for part in value.split(".")):
            raise ValueError("name the field as a document's metadata key, without 'doc.' (source, access.team)")
        return value


class TopKParams(StageParams):
    k: int = Field(10, ge=1, le=10_000, description="how many results to return")
    min_score: float | None = Field(
        None, description="drop candidates whose current score is below this floor (None: no floor)"
    )
    max_per: MaxPerParams | None = Field(None, description=(
        "at most n results per value of a document field, in rank order (a candidate over its value's cap is "
        "dropped and the next one takes its place); None: no cap"))


@register_stage
class TopK(Stage):
    """Keep the first k candidates (in the order received), optionally above a score floor."""

    type_name = "select.top_k"
    version = 1
    Params = TopKParams
    produces = Port.CANDIDATES
    accepts = frozenset({Port.CANDIDATES})
    summary = "keep the top k candidates, optionally above a score floor and at most n per value of a field"
    params: TopKParams
    _warnings: tuple[str, ...] = ()  # what warm-up found

    def warm_up(self, resources: Resources) -> None:
        """With ``max_per``: a warning when none of the index's first documents has the field (a typo caps
        nothing, silently), with the field names they do have."""
        self._warnings = ()
        cap = self.params.max_per
        index = resources.index
        if cap is None or index is None or not index.doc_count:
            return
        from stages.fields import absent_fields

        absent, names, read = absent_fields(index, [cap.field])
        if not absent:
            return
        effect = ("every candidate is kept (missing: keep), so nothing is capped" if cap.missing == "keep" else
                  f"every candidate falls in one group (missing: group), so only {cap.n} can be returned")
        self._warnings = (f"max_per.field '{cap.field}': none of the index's first {read} documents has it"
                          f"{absent[cap.field]}; {effect}. Fields they have: {', '.join(names)}",)

    def warm_up_warnings(self) -> list[str]:
        return list(self._warnings)

    def run(self, ctx: StageContext) -> StageResult:
        (incoming,) = ctx.inputs
        floor = self.params.min_score
        cap = self.params.max_per
        unreadable: dict[str, str] = {}
        groups = self._groups(ctx, incoming, unreadable) if cap is not None else {}
        taken: dict[str, int] = {}
        kept, drops = [], []
        for candidate in incoming:
            group = groups.get(candidate.row)
            if floor is not None and not candidate.score >= floor:  # a NaN score is below any floor
                drops.append(Drop(candidate.doc_id, "below_min_score", f"{candidate.score:.6g} < {floor:g}"
                                  if math.isfinite(candidate.score) else f"score {candidate.score} is not a number"))
            elif len(kept) >= self.params.k:
                drops.append(Drop(candidate.doc_id, "beyond_top_k", f"k={self.params.k}"))
            elif cap is not None and group is not None and taken.get(group, 0) >= cap.n:
                drops.append(Drop(candidate.doc_id, "beyond_max_per", f"{cap.field} {group}: {cap.n} kept already"))
            else:
                kept.append(candidate)
                if group is not None:
                    taken[group] = taken.get(group, 0) + 1
        details = {"max_per": {"field": cap.field, "n": cap.n, "kept": taken}} if cap is not None else {}
        if unreadable:  # a nested path through a value that is not a mapping: malformed, not absent
            details["max_per"]["unreadable"] = dict(list(unreadable.items())[:MAX_TRACED_UNREADABLE])
            details["max_per"]["unreadable_count"] = len(unreadable)
        return StageResult(candidates=kept, drops=drops, details=details)

    def _groups(self, ctx: StageContext, incoming: list, unreadable: dict[str, str]) -> dict[int, str]:  # type: ignore[type-arg]
        """Each candidate's group under ``max_per``: its field's value as JSON (None: not capped). A document whose
        nested path runs through a value that is not a mapping is treated as missing, and named in
        ``unreadable`` (doc id -> why)."""
        from rules.conditions import MISSING, doc_field, doc_path_problem

        cap = self.params.max_per
        assert cap is not None
        index = ctx.resources.require_index(self.id)
        documents = index.documents.get([c.row for c in incoming])
        groups: dict[int, str] = {}
        for row, document in documents.items():
            problem = doc_path_problem(document, f"doc.{cap.field}")
            if problem is not None:
                unreadable[document.doc_id] = problem
            value = doc_field(document, f"doc.{cap.field}")
            if value is MISSING or value is None:
                if cap.missing == "group":
                    groups[row] = "(missing)"
                continue
            groups[row] = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
        return groups
