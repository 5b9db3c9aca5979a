"""Looking inside one query's run: captured stage outcomes, score contributions, "why not doc X?".

A run with ``keep_outcomes=True`` (what :class:`InspectingPipeline` does by default) keeps every
stage's outcome (its candidate list and the document mask in effect), which the trace only
summarises. :func:`why_not` walks those outcomes to say where a document left the pipeline: masked by a
prefilter (and by which rule), never recalled (with its would-be recall rank and score against
the cut-off, from a probe run of the recall stage over the whole corpus), or dropped by a stage
(with the stage's recorded reason and its score against the last candidate kept).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from engine.model import Candidate, Query
from engine.pipeline import Pipeline, RunResult, StageOutcome
from engine.stage import Port, StageContext

_SIGNAL_NODE = re.compile(r"^signal '(?P<signal>[^']+)': weight (?P<weight>\S+) x normalised (?P<norm>\S+) \((?P<method>[^)]*)\)")


class InspectingPipeline(Pipeline):
    """A pipeline whose runs keep every stage's outcome (``RunResult.outcomes``), for :func:`why_not`.
    The outcomes belong to each result, so one instance serves concurrent queries."""

    def run(self, query: Query, *, keep_outcomes: bool = True) -> RunResult:
        return super().run(query, keep_outcomes=keep_outcomes)


# ----------------------------------------------------------------------------- contributions


def signal_contributions(explanation: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-signal parts of a weighted-fusion score found in an explanation tree (raw, normalised, weighted).

    Empty when no ``fuse.weighted`` stage scored the document. The outermost fusion wins when
    fusions are nested (the one closest to the final score).
    """
    found: list[dict[str, Any]] = []

    def visit(node: dict[str, Any]) -> bool:
        parts = []
        for child in node.get("details", []):
            match = _SIGNAL_NODE.match(child.get("description", ""))
            if match is None:
                continue
            inner = (child.get("details") or [{}])[0]
            raw_node = (inner.get("details") or [None])[0]
            parts.append({
                "signal": match.group("signal"),
                "weight": float(match.group("weight")),
                "normalised": inner.get("value", float(match.group("norm"))),
                "method": match.group("method"),
                "raw": raw_node.get("value") if raw_node else None,
                "weighted": child["value"],
            })
        if parts:
            found.extend(parts)
            return True
        return any(visit(child) for child in reversed(node.get("details", [])))

    visit(explanation)
    return found


def score_parts(record: dict[str, Any]) -> list[dict[str, Any]]:
    """What to draw in a document's score bar: weighted signals when fused, else the deciding stage's parts.

    Each part has ``label`` and ``value`` (non-negative parts only are drawn; the rest are listed).
    """
    explanation = record.get("explanation")
    if not explanation:
        return [{"label": "score", "value": record.get("score", 0.0)}]
    fused = signal_contributions(explanation)
    if fused:
        parts = [{"label": p["signal"], "value": p["weighted"], "detail": f"{p['weight']:g} x {p['normalised']:.3g}"}
                 for p in fused]
        rest = explanation.get("value", 0.0) - sum(p["weighted"] for p in fused)
        if abs(rest) > 1e-9:  # stages after the fusion (override boosts, MMR, ...) moved the score
            parts.append({"label": "after fusion", "value": rest, "detail": "later stages (e.g. override rules)"})
        return parts
    # No fusion: the stage whose score is the final one, and its own parts when they add up to it.
    deciding = None
    for node in reversed(explanation.get("details", [])):
        if abs(node.get("value", 0.0) - explanation.get("value", 0.0)) <= 1e-9 * max(1.0, abs(explanation["value"])):
            deciding = node
            break
    if deciding is not None:
        children = deciding.get("details", [])
        total = sum(c.get("value", 0.0) for c in children)
        if children and abs(total - deciding["value"]) <= 1e-6 * max(1.0, abs(deciding["value"])):
            return [{"label": c["description"], "value": c["value"]} for c in children]
    return [{"label": "score", "value": explanation.get("value", 0.0)}]


def rules_fired(trace: dict[str, Any], doc_id: str) -> list[dict[str, Any]]:
    """Override firings on ``doc_id`` from every rules.override stage of a trace."""
    fired = []
    for stage in trace.get("stages", []):
        for firing in (stage.get("details") or {}).get("firings", []) or []:
            if firing.get("doc_id") == doc_id:
                fired.append({"stage": stage["id"], **firing})
    return fired


def dedup_merges(trace: dict[str, Any], doc_id: str) -> list[dict[str, Any]]:
    """Documents ``doc_id`` absorbed as near-duplicates (and their similarity), per dedup stage."""
    merges = []
    for stage in trace.get("stages", []):
        absorbed = (stage.get("details") or {}).get("absorbed")
        if isinstance(absorbed, dict) and doc_id in absorbed:
            for other, similarity in absorbed[doc_id]:
                merges.append({"stage": stage["id"], "absorbed": other, "similarity": similarity})
    return merges


# ----------------------------------------------------------------------------- why not


@dataclass
class StageStep:
    """Where a document stood after one candidate-producing stage."""

    stage: str
    type: str
    rank: int | None  # None: not in this stage's output
    score: float | None
    of: int  # how many candidates the stage output


@dataclass
class Verdict:
    """The answer to "why not doc X?" (or where it was returned)."""

    doc_id: str
    status: str  # returned | dropped | masked | not_recalled | not_in_index | lost
    message: str
    stage: str | None = None
    reason: str | None = None
    score: float | None = None
    cutoff: float | None = None
    rank: int | None = None
    journey: list[StageStep] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "doc_id": self.doc_id, "status": self.status, "message": self.message, "stage": self.stage,
            "reason": self.reason, "score": self.score, "cutoff": self.cutoff, "rank": self.rank,
            "journey": [step.__dict__ for step in self.journey], "details": self.details,
        }


def _position(candidates: list[Candidate] | None, doc_id: str) -> tuple[int, Candidate] | None:
    for rank, candidate in enumerate(candidates or [], start=1):
        if candidate.doc_id == doc_id:
            return rank, candidate
    return None


def _denying_rules(pipeline: Pipeline, stage_id: str, query: Query, row: int) -> list[str] | None:
    """Which rules of a mask stage deny ``row`` for ``query`` (``rules.prefilter.denying_rules``); None when
    the stage type cannot say."""
    denying_rules = getattr(pipeline.compiled.stages[stage_id], "denying_rules", None)
    return denying_rules(query, row) if denying_rules is not None else None


def _probe_recall(pipeline: Pipeline, stage_id: str, query: Query, row: int, doc_id: str,
                  outcomes: dict[str, StageOutcome]) -> dict[str, Any] | None:
    """Re-run a recall stage over the whole corpus (same query and mask) to find the document's rank and score."""
    stage = pipeline.compiled.stages[stage_id]
    params = stage.params
    resources = pipeline.resources
    if "top_k" not in type(params).model_fields or resources is None or resources.index is None:
        return None
    corpus = resources.index.doc_count
    probe = type(stage)(stage_id, params.model_copy(update={"top_k": corpus}))
    probe.warm_up(resources)  # shares the loaded index and model through resources.shared
    effective, mask, lists = pipeline._inherit(stage_id, query, outcomes)
    result = probe.run(StageContext(stage_id, effective, lists, mask, resources, True))
    found = _position(result.candidates, doc_id)
    answer: dict[str, Any] = {"top_k": params.top_k, "corpus": corpus, "scored": len(result.candidates or [])}
    if found is not None:
        answer.update(rank=found[0], score=found[1].score)
    return answer


# Drop reasons that are a matter of score: for these the verdict quotes the last candidate kept
_SCORE_CUTS = frozenset({"below_threshold", "below_min_score", "beyond_top_k", "no_score"})


def why_not(pipeline: Pipeline, result: RunResult, doc_id: str, *, local: bool = True) -> Verdict:
    """Where ``doc_id`` went in ``result``, a run of ``pipeline`` with ``keep_outcomes=True``. ``local``: asked by the
    operator (``sieve explain``, the Python API), who is also told the index's path and how many documents it holds;
    False for the server's explain endpoint, whose callers learn neither (the count includes documents hidden from
    them)."""
    compiled = pipeline.compiled
    resources = pipeline.resources
    query = result.query
    if result.outcomes is None or query is None or resources is None:
        raise ValueError("why_not needs a result of run(query, keep_outcomes=True)")
    index = resources.index
    row = index.row_of(doc_id) if index is not None else None
    if row is None:
        return Verdict(doc_id, "not_in_index", f"'{doc_id}' is not in the index"
                       + (f" ({index.path}, {index.doc_count} documents)" if index is not None and local else ""))

    outcomes = result.outcomes
    records = {r["id"]: r for r in result.trace["stages"]}
    journey: list[StageStep] = []
    for stage_id in compiled.order:
        stage = compiled.stages[stage_id]
        outcome = outcomes.get(stage_id)
        if stage.produces is not Port.CANDIDATES or outcome is None:
            continue
        found = _position(outcome.candidates, doc_id)
        journey.append(StageStep(stage_id, stage.qualified_name(), found[0] if found else None,
                                 found[1].score if found else None, len(outcome.candidates or [])))

    returned = _position(result.results, doc_id)
    if returned is not None:
        return Verdict(doc_id, "returned", f"'{doc_id}' was returned at rank {returned[0]} (score {returned[1].score:.6g})",
                       stage=compiled.output, rank=returned[0], score=returned[1].score, journey=journey)

    # A stage that had it in an input and did not pass it on.
    for stage_id in compiled.order:
        stage = compiled.stages[stage_id]
        outcome = outcomes.get(stage_id)
        if stage.produces is not Port.CANDIDATES or outcome is None:
            continue
        effective, _, lists = pipeline._inherit(stage_id, query, outcomes)
        incoming = next((found for found in (_position(items, doc_id) for items in lists) if found), None)
        if incoming is None or _position(outcome.candidates, doc_id) is not None:
            continue
        drop = next((d for d in records[stage_id].get("drops", []) if d["doc_id"] == doc_id), None)
        kept = outcome.candidates or []
        cutoff = kept[-1].score if kept else None
        score = incoming[1].score
        reason = drop["reason"] if drop else "unrecorded"
        detail = drop.get("detail", "") if drop else ""
        message = (f"dropped by stage '{stage_id}' ({stage.qualified_name()}): {reason}"
                   + (f" ({detail})" if detail else "")
                   + f"; it arrived at rank {incoming[0]} with score {score:.6g}")
        if cutoff is not None and reason in _SCORE_CUTS:  # a rule, a dedup or the mask is no matter of score
            message += f"; the last candidate kept (rank {len(kept)}) scored {cutoff:.6g}"
        if drop is None:
            message += "; the stage recorded no reason (a bug in that stage: every drop should be reported)"
        details: dict[str, Any] = {"arrived_rank": incoming[0]}
        if reason == "near_duplicate" and "duplicate_of=" in detail:
            details["duplicate_of"] = detail.split("duplicate_of=", 1)[1].split()[0]
        return Verdict(doc_id, "dropped", message, stage=stage_id, reason=reason, score=score, cutoff=cutoff,
                       journey=journey, details=details)

    # Never a candidate: masked, or not recalled.
    for stage_id in compiled.order:
        outcome = outcomes.get(stage_id)
        if compiled.stages[stage_id].produces is not Port.MASK or outcome is None or outcome.mask is None:
            continue
        if not bool(outcome.mask.allowed[row]):
            own = outcome.mask.sources[-1] if outcome.mask.sources else stage_id
            denying = _denying_rules(pipeline, own, query, row)
            named = f" by rule(s) {', '.join(repr(r) for r in denying)}" if denying else ""
            return Verdict(doc_id, "masked",
                           f"masked by prefilter stage '{own}'{named}: the document may not be retrieved for this "
                           "query and user, so no recall stage could see it",
                           stage=own, reason="masked", journey=journey, details={"rules": denying or []})

    recall_ids = [  # candidate producers without candidate inputs: where documents enter the pipeline
        sid for sid in compiled.order
        if compiled.stages[sid].produces is Port.CANDIDATES
        and all(compiled.stages[d].produces is not Port.CANDIDATES for d in compiled.specs[sid].inputs)
    ]
    probes: dict[str, Any] = {}
    parts = []
    for stage_id in recall_ids:
        record = outcomes[stage_id].record
        if record.get("status") == "bypassed":  # routed past: it recalled nothing for this query
            parts.append(f"'{stage_id}' was bypassed for this query (its `when`, "
                         f"{(record.get('when') or {}).get('condition', '?')}, does not hold)")
            continue
        probe = _probe_recall(pipeline, stage_id, query, row, doc_id, outcomes)
        probes[stage_id] = probe
        kept = outcomes[stage_id].candidates or []
        cutoff = kept[-1].score if kept else None
        if probe is None:
            parts.append(f"'{stage_id}' did not recall it")
        elif "rank" not in probe:
            parts.append(f"'{stage_id}' gives it no score at all (e.g. no query term occurs in it)")
        else:
            parts.append(f"'{stage_id}' ranks it {probe['rank']} of {probe['scored']} with score {probe['score']:.6g}, "
                         f"below its top_k={probe['top_k']}" + (f" cut-off (last recalled {cutoff:.6g})" if cutoff is not None else ""))
    # an override pin that named it but did not bring it in (inject: false, excluded, forbidden...)
    for record in result.trace["stages"]:
        for entry in (record.get("details") or {}).get("suppressed", []):
            if entry.get("doc_id") == doc_id:
                parts.append(f"rule '{entry.get('rule')}' of stage '{record['id']}' names it but did not apply "
                             f"({entry.get('reason')})")
    first = next((p for p in probes.values() if p and "rank" in p), None)
    if not local:  # the corpus size counts documents hidden from the caller
        probes = {sid: None if probe is None else {k: v for k, v in probe.items() if k != "corpus"}
                  for sid, probe in probes.items()}
    return Verdict(doc_id, "not_recalled", "recall never found it: " + "; ".join(parts),
                   stage=recall_ids[0] if recall_ids else None, reason="not_recalled",
                   score=first["score"] if first else None, rank=first["rank"] if first else None,
                   journey=journey, details={"probes": probes})


def explain_report(trace: dict[str, Any], verdicts: list[Verdict], top: int | None = None) -> dict[str, Any]:
    """What ``sieve explain --json`` prints and the server's explain endpoint returns: each result (the first
    ``top``) with its explanation tree, signal contributions, rules fired and dedup merges; the verdicts."""
    records = trace["results"] if top is None else trace["results"][:top]
    return {
        "trace_id": trace["trace_id"],
        "results": [
            {**record, "contributions": signal_contributions(record.get("explanation") or {}),
             "rules_fired": rules_fired(trace, record["doc_id"]), "merged": dedup_merges(trace, record["doc_id"])}
            for record in records
        ],
        "why_not": [v.to_json() for v in verdicts],
    }
