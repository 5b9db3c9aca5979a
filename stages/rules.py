"""Analyst rules as stages: ``rules.prefilter`` (a document mask) and ``rules.override``.

``rules.prefilter`` decides which documents may be retrieved at all. It produces a mask over
every index row; recall stages apply it inside recall, so a forbidden document never takes a
recall slot. Conditions that do not depend on the query are evaluated once, at warm-up; the rest
cost a few numpy operations per query over per-field columns (see :mod:`rules.corpus`).

``rules.override`` applies pins, buries, excludes and boosts/demotes to a ranked list. Its
precedence is fixed and does not depend on the order of rules in the file:

1. **exclude** — the document is removed (any other rule on it is reported as suppressed);
2. **pin** — the document takes the pinned position; pins contending for a document or a slot
   are resolved by priority (higher first), then rule id; a pin that loses its slot takes the
   next free one after it; a pin beyond the end of the list lands at the end;
3. **bury** — the document moves below every unburied one (buried documents keep their order);
4. **boost / demote** — new score = score × (product of factors) + (sum of adds); the order
   of boosts therefore never matters. When any boost fires, unpinned documents are re-ordered
   by their new scores (ties on doc_id); otherwise the incoming order is kept.

No rule can surface a document the prefilter forbade: a pin of a document the mask forbids,
or one the index does not hold, is dropped and the trace says so; an incoming candidate the mask
forbids (a recall stage that ignored the mask) is dropped too. The stage writes a full new
ordering: every returned candidate gets one ledger entry (signal ``override``; ``override.pin``
for pinned documents) whose value is its score after boosts and whose rank is its final rank.
Documents pinned in without an upstream score get 0.0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

from pydantic import Field

from engine.errors import ConfigError, ConfigIssue
from engine.model import Candidate, Decision, Drop, Query, ScoreEntry
from engine.registry import register_stage
from engine.stage import (
    DocumentMask,
    Explanation,
    GraphIssue,
    GraphView,
    Port,
    Resources,
    Stage,
    StageContext,
    StageNode,
    StageParams,
    StageResult,
)
from rules.conditions import ExpressionRuntimeError, QueryView, Subject

if TYPE_CHECKING:
    import numpy as np

    from rules.corpus import DocumentTable
    from rules.ruleset import CompiledRule, RuleSet

OVERRIDE_SIGNAL = "override"
PIN_SIGNAL = "override.pin"  # ledger signal of a pinned document (select.threshold keeps these)
REDACTED = "<redacted>"
RULE_FILE_PATTERN = r"^[^\x00]+\.(ya?ml)$"


class RulesParams(StageParams):
    rules: str = Field(
        pattern=RULE_FILE_PATTERN, description="rule file (YAML), relative to the pipeline config's directory"
    )
    strictness: Optional[Literal["strict", "default", "lenient"]] = Field(
        None, description="grade of findings of the rule checks; None: the rule file's own setting"
    )


class OverrideParams(RulesParams):
    max_traced_firings: int = Field(500, ge=0, le=100_000, description="firings listed in the trace per query")


def _load(path: Path, kind: Literal["prefilter", "override"], strictness: str | None) -> "RuleSet":
    from rules.ruleset import load_rule_file

    ruleset = load_rule_file(path, kind)
    if strictness is not None:
        ruleset.strictness = strictness  # type: ignore[assignment]
    return ruleset


def _graph_check(node: StageNode, graph: GraphView, kind: Literal["prefilter", "override"]) -> list[GraphIssue]:
    """Load and check the rule file at compile time when the compiler says where the config lives.

    Needs ``GraphView.base_dir`` (the pipeline file's directory). Without it, the same checks run
    at warm-up, where ``resources.resolve_path`` knows the directory.
    """
    base_dir = getattr(graph, "base_dir", None)
    if base_dir is None:
        return []
    from rules.conflicts import check_rules

    params = node.params
    assert isinstance(params, RulesParams)
    path = Path(params.rules).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    try:
        ruleset = _load(path, kind, params.strictness)
    except ConfigError as exc:
        return [GraphIssue(str(issue), ("params", "rules"), issue.severity) for issue in exc.issues]
    return [GraphIssue(str(issue), ("params", "rules"), issue.severity) for issue in check_rules(ruleset)]


def _prepare(stage: Stage, resources: Resources, kind: Literal["prefilter", "override"]) -> tuple["RuleSet", "DocumentTable", list[str]]:
    """Load the rule file, build (or share) the document table, run every check; errors raise."""
    from rules.conflicts import check_against_corpus, check_rules
    from rules.corpus import DocumentTable

    params = stage.params
    assert isinstance(params, RulesParams)
    index = resources.require_index(stage.id)
    ruleset = _load(resources.resolve_path(params.rules), kind, params.strictness)
    table: DocumentTable = resources.shared(f"rules.table:{index.path}", lambda: DocumentTable.from_index(index))
    issues = check_rules(ruleset) + check_against_corpus(ruleset, table)
    if any(i.severity == "error" for i in issues):
        raise ConfigError(issues)
    return ruleset, table, [str(i) for i in issues]


def _redact(evidence: list[dict[str, Any]], trace_text: bool) -> list[dict[str, Any]]:
    """Query-derived values leave the trace unless the config allows query text in traces."""
    if trace_text:
        return evidence
    redacted = []
    for item in evidence:
        field_name = item.get("field", "")
        if (isinstance(field_name, str) and field_name.startswith(("query.", "user."))) or "expr" in item:
            item = {k: (REDACTED if k in ("matched", "actual", "expr") else v) for k, v in item.items()}
        redacted.append(item)
    return redacted


def _when(rule: "CompiledRule", view: QueryView) -> tuple[bool | None, list[dict[str, Any]], str | None]:
    """(does the rule's query condition hold — None on error, evidence, error message)."""
    evidence: list[dict[str, Any]] = []
    try:
        return rule.when.evaluate(Subject(view), evidence), evidence, None
    except ExpressionRuntimeError as exc:
        return None, [], str(exc)


# =========================================================================== prefilter


@register_stage
class RulesPrefilter(Stage):
    """Which documents may be retrieved at all: ACL, jurisdiction, dates, sources, block-lists."""

    type_name = "rules.prefilter"
    version = 1
    Params = RulesParams
    produces = Port.MASK
    accepts = frozenset({Port.QUERY})
    min_candidate_inputs = 0
    max_candidate_inputs = 0
    summary = "analyst access rules as a document mask, applied inside recall"
    params: RulesParams

    @classmethod
    def check_graph(cls, node: StageNode, graph: GraphView) -> Sequence[GraphIssue]:
        return _graph_check(node, graph, "prefilter")

    def warm_up(self, resources: Resources) -> None:
        import numpy as np

        from rules.conflicts import _NullView

        self._ruleset, self._table, self._warnings = _prepare(self, resources, "prefilter")
        self._static: dict[str, np.ndarray] = {}
        self._static_errors: dict[str, np.ndarray] = {}
        for rule in self._ruleset.rules:
            assert rule.match is not None
            if not (rule.match.uses_query or rule.match.uses_candidate):
                view = _NullView()
                self._static[rule.id] = rule.match.vector(self._table, view)
                if view.errors:
                    rows = np.zeros(self._table.size, dtype=bool)
                    rows[[r for r, _ in view.errors]] = True
                    self._static_errors[rule.id] = rows

    def run(self, ctx: StageContext) -> StageResult:
        import numpy as np

        table = self._table
        view = QueryView(ctx.query)
        allowed = np.ones(table.size, dtype=bool)
        report: list[dict[str, Any]] = []
        decisions: list[Decision] = []
        began = time.perf_counter()
        for rule in self._ruleset.rules:
            entry: dict[str, Any] = {"rule": rule.id, "action": rule.action}
            reason = rule.inactive_reason(ctx.query.as_of)
            if reason is not None:
                report.append({**entry, "status": "inactive", "reason": reason})
                continue
            holds, evidence, error = _when(rule, view)
            if error is not None:
                decisions.append(Decision("rule_error", f"rule '{rule.id}': its `when` failed ({error}); "
                                          "applied anyway (access rules fail closed)", {"rule": rule.id}))
            elif not holds:
                report.append({**entry, "status": "condition_false"})
                continue
            assert rule.match is not None
            view.errors = []
            matched = self._static.get(rule.id)
            if matched is None:
                matched = rule.match.vector(table, view)
            denied = matched if rule.effect == "exclude" else ~matched
            error_rows = self._static_errors.get(rule.id)
            if view.errors:
                dynamic_errors = np.zeros(table.size, dtype=bool)
                dynamic_errors[[r for r, _ in view.errors]] = True
                error_rows = dynamic_errors if error_rows is None else (error_rows | dynamic_errors)
            if error_rows is not None:
                denied = denied | error_rows  # a document a rule cannot be evaluated on is denied
                decisions.append(Decision(
                    "rule_error", f"rule '{rule.id}' failed on {int(error_rows.sum())} documents; they are denied",
                    {"rule": rule.id, "documents": int(error_rows.sum())},
                ))
            newly = int(np.count_nonzero(denied & allowed))
            allowed &= ~denied
            entry.update(status="applied", excluded=int(np.count_nonzero(denied)), newly_excluded=newly)
            if evidence:
                entry["when"] = _redact(evidence, ctx.trace_text)
            report.append(entry)
        evaluated_ms = (time.perf_counter() - began) * 1000.0
        kept = int(np.count_nonzero(allowed))
        details: dict[str, Any] = {
            "rules_file": self._ruleset.describe(),
            "documents": table.size,
            "allowed": kept,
            "excluded": table.size - kept,
            "rules": report,
        }
        if self._warnings:
            details["rule_warnings"] = self._warnings
        if kept == 0:
            decisions.append(Decision("nothing_allowed", "the access rules allow no document for this query"))
        return StageResult(
            mask=DocumentMask(allowed, (self.id,)),
            decisions=decisions,
            details=details,
            timings_ms={"rules": evaluated_ms},
        )


# =========================================================================== override


@dataclass
class _Firing:
    rule: "CompiledRule"
    doc_id: str
    when: list[dict[str, Any]]
    match: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Pin:
    rule: "CompiledRule"
    doc_id: str
    row: int
    requested: int
    slot: int = 0
    when: list[dict[str, Any]] = field(default_factory=list)


def _rank_map(candidates: list[Candidate]) -> dict[str, int]:
    return {c.doc_id: rank for rank, c in enumerate(candidates, start=1)}


@register_stage
class RulesOverride(Stage):
    """Manual overrides on a ranked list: pin, bury, exclude, boost/demote, with a full trace."""

    type_name = "rules.override"
    version = 1
    Params = OverrideParams
    produces = Port.CANDIDATES
    accepts = frozenset({Port.CANDIDATES, Port.QUERY, Port.MASK})
    min_candidate_inputs = 1
    max_candidate_inputs = 1
    signal = OVERRIDE_SIGNAL
    summary = "analyst overrides: pin, bury, exclude, boost/demote"
    params: OverrideParams

    @classmethod
    def check_graph(cls, node: StageNode, graph: GraphView) -> Sequence[GraphIssue]:
        return _graph_check(node, graph, "override")

    def warm_up(self, resources: Resources) -> None:
        import numpy as np

        from rules.conflicts import _NullView

        self._ruleset, self._table, self._warnings = _prepare(self, resources, "override")
        size = self._table.size
        self._targets: dict[str, np.ndarray] = {}  # query-independent target rows per rule
        self._dynamic: set[str] = set()  # rules whose match reads the query or the candidate's scores
        for rule in self._ruleset.rules:
            if rule.action == "pin":
                continue
            target = np.ones(size, dtype=bool)
            if rule.docs:
                target[:] = False
                rows = [self._table.row_of[d] for d in rule.docs if d in self._table.row_of]
                target[rows] = True
            if rule.match is not None:
                if rule.match.uses_query or rule.match.uses_candidate:
                    self._dynamic.add(rule.id)
                else:
                    view = _NullView()
                    target &= rule.match.vector(self._table, view)
                    if view.errors:  # an override that cannot be evaluated on a document does not fire on it
                        failed = np.zeros(size, dtype=bool)
                        failed[[r for r, _ in view.errors]] = True
                        target &= ~failed
            self._targets[rule.id] = target

    # ------------------------------------------------------------------ run

    def run(self, ctx: StageContext) -> StageResult:
        import numpy as np

        (incoming,) = ctx.inputs
        table = self._table
        view = QueryView(ctx.query)
        decisions: list[Decision] = []
        drops: list[Drop] = []
        began = time.perf_counter()

        # Defence in depth: nothing the prefilter forbids leaves this stage.
        if ctx.mask is not None and incoming:
            allowed = ctx.mask.allowed
            forbidden = [c for c in incoming if not allowed[c.row]]
            if forbidden:
                incoming = [c for c in incoming if allowed[c.row]]
                drops.extend(Drop(c.doc_id, "forbidden_by_prefilter", "arrived despite the mask") for c in forbidden)
                decisions.append(Decision(
                    "mask_enforced", f"{len(forbidden)} incoming candidates are forbidden by the prefilter; dropped",
                ))
        before = _rank_map(incoming)
        rows = np.fromiter((c.row for c in incoming), dtype=np.int64, count=len(incoming))

        inactive: dict[str, str] = {}
        active: list[tuple["CompiledRule", list[dict[str, Any]]]] = []
        for rule in self._ruleset.rules:
            reason = rule.inactive_reason(ctx.query.as_of)
            if reason is not None:
                inactive[rule.id] = reason
                continue
            holds, evidence, error = _when(rule, view)
            if error is not None:
                decisions.append(Decision("rule_error", f"rule '{rule.id}': its `when` failed ({error}); not applied",
                                          {"rule": rule.id}))
                continue
            if holds:
                active.append((rule, _redact(evidence, ctx.trace_text)))
            else:
                inactive[rule.id] = "condition false"
        # precedence first, then priority (higher first), then rule id
        from rules.ruleset import OVERRIDE_PRECEDENCE

        active.sort(key=lambda item: (OVERRIDE_PRECEDENCE[item[0].action], -item[0].priority, item[0].id))

        firings: dict[str, list[_Firing]] = {}  # doc_id -> firings on it, in precedence order
        pins: list[_Pin] = []
        suppressed: list[dict[str, Any]] = []
        for rule, when_evidence in active:
            if rule.action == "pin":
                for offset, doc_id in enumerate(rule.docs):
                    row = table.row_of.get(doc_id)
                    requested = rule.spec.position + offset  # type: ignore[attr-defined]
                    pins.append(_Pin(rule, doc_id, -1 if row is None else row, requested, when=when_evidence))
                continue
            for position in self._targets_among(rule, incoming, rows, view, decisions):
                candidate = incoming[position]
                evidence = self._match_evidence(rule, candidate, position, view)
                firings.setdefault(candidate.doc_id, []).append(_Firing(rule, candidate.doc_id, when_evidence, evidence))

        excluded: dict[str, "CompiledRule"] = {}
        buried: set[str] = set()
        factor: dict[str, float] = {}
        addend: dict[str, float] = {}
        applied: list[_Firing] = []
        for doc_id, on_doc in firings.items():
            for firing in on_doc:
                action = firing.rule.action
                if doc_id in excluded:
                    suppressed.append({"rule": firing.rule.id, "doc_id": doc_id,
                                       "reason": f"excluded by '{excluded[doc_id].id}'"})
                    continue
                if action == "exclude":
                    excluded[doc_id] = firing.rule
                elif action == "bury":
                    buried.add(doc_id)
                else:
                    spec = firing.rule.spec
                    if getattr(spec, "factor", None) is not None:
                        factor[doc_id] = factor.get(doc_id, 1.0) * spec.factor  # type: ignore[attr-defined]
                    if getattr(spec, "add", None) is not None:
                        addend[doc_id] = addend.get(doc_id, 0.0) + spec.add  # type: ignore[attr-defined]
                applied.append(firing)

        # pins: validity of each request, then slots by precedence
        pinned: dict[str, _Pin] = {}
        taken: set[int] = set()
        mask = ctx.mask.allowed if ctx.mask is not None else None
        for pin in sorted(pins, key=lambda p: (-p.rule.priority, p.rule.id, p.requested)):
            problem = None
            if pin.row < 0:
                problem = ("pin_unknown_document", f"rule '{pin.rule.id}' pins '{pin.doc_id}', which the index does not hold")
            elif mask is not None and not mask[pin.row]:
                problem = ("pin_forbidden", f"rule '{pin.rule.id}' pins '{pin.doc_id}', which the prefilter forbids for this "
                           "query; not shown")
            elif pin.doc_id in excluded:
                problem = ("pin_excluded", f"rule '{pin.rule.id}' pins '{pin.doc_id}', which rule "
                           f"'{excluded[pin.doc_id].id}' excludes (exclude wins)")
            elif pin.doc_id not in before and not pin.rule.spec.inject:  # type: ignore[attr-defined]
                problem = ("pin_not_recalled", f"rule '{pin.rule.id}' pins '{pin.doc_id}', which recall did not return "
                           "(inject: false)")
            elif pin.doc_id in pinned:
                problem = ("pin_superseded", f"rule '{pin.rule.id}' pins '{pin.doc_id}' at {pin.requested}, but rule "
                           f"'{pinned[pin.doc_id].rule.id}' already pins it at {pinned[pin.doc_id].slot}")
            if problem is not None:
                decisions.append(Decision(problem[0], problem[1], {"rule": pin.rule.id, "doc_id": pin.doc_id}))
                suppressed.append({"rule": pin.rule.id, "doc_id": pin.doc_id, "reason": problem[0]})
                continue
            slot = pin.requested
            while slot in taken:
                slot += 1
            if slot != pin.requested:
                decisions.append(Decision("pin_displaced", f"rule '{pin.rule.id}' pins '{pin.doc_id}' at {pin.requested}, "
                                          f"which a higher-precedence pin holds; it takes {slot}",
                                          {"rule": pin.rule.id, "doc_id": pin.doc_id}))
            pin.slot = slot
            taken.add(slot)
            pinned[pin.doc_id] = pin
        for doc_id in list(buried):
            if doc_id in pinned:
                buried.discard(doc_id)
                for firing in applied:
                    if firing.doc_id == doc_id and firing.rule.action == "bury":
                        suppressed.append({"rule": firing.rule.id, "doc_id": doc_id,
                                           "reason": f"pinned by '{pinned[doc_id].rule.id}' (pin wins)"})
                applied = [f for f in applied if not (f.doc_id == doc_id and f.rule.action == "bury")]

        # assemble the new order
        incoming_by_id = {c.doc_id: c for c in incoming}
        score: dict[str, float] = {}
        for candidate in incoming:
            if candidate.doc_id in excluded:
                continue
            value = candidate.score
            if candidate.doc_id in factor or candidate.doc_id in addend:
                value = value * factor.get(candidate.doc_id, 1.0) + addend.get(candidate.doc_id, 0.0)
            score[candidate.doc_id] = value
        for doc_id in pinned:
            score.setdefault(doc_id, 0.0)
        free = [c.doc_id for c in incoming if c.doc_id in score and c.doc_id not in pinned and c.doc_id not in buried]
        sunk = [c.doc_id for c in incoming if c.doc_id in buried and c.doc_id not in pinned]
        if factor or addend:
            free.sort(key=lambda d: (-score[d], d))
            sunk.sort(key=lambda d: (-score[d], d))
        base = free + sunk
        order: list[str] = []
        cursor = 0
        for pin in sorted(pinned.values(), key=lambda p: p.slot):
            while len(order) + 1 < pin.slot and cursor < len(base):
                order.append(base[cursor])
                cursor += 1
            if len(order) + 1 != pin.slot:
                decisions.append(Decision("pin_position_clamped", f"rule '{pin.rule.id}' pins '{pin.doc_id}' at "
                                          f"{pin.slot}, beyond the list; it lands at {len(order) + 1}",
                                          {"rule": pin.rule.id, "doc_id": pin.doc_id}))
            order.append(pin.doc_id)
        order.extend(base[cursor:])

        after = {doc_id: rank for rank, doc_id in enumerate(order, start=1)}
        results = []
        for rank, doc_id in enumerate(order, start=1):
            signal = PIN_SIGNAL if doc_id in pinned else OVERRIDE_SIGNAL
            existing = incoming_by_id.get(doc_id)
            if existing is None:
                existing = Candidate(doc_id, pinned[doc_id].row)
            results.append(existing.with_score(ScoreEntry(self.id, signal, float(score[doc_id]), rank)))
        for doc_id, rule in excluded.items():
            drops.append(Drop(doc_id, "override_exclude", f"rule '{rule.id}'"))

        fired = self._firing_records(applied, pinned, excluded, before, after, incoming_by_id, score, factor, addend)
        limit = self.params.max_traced_firings
        details: dict[str, Any] = {
            "rules_file": self._ruleset.describe(),
            "active_rules": [rule.id for rule, _ in active],
            "inactive_rules": inactive,
            "firings": fired[:limit],
            "counts": {
                "incoming": len(before), "returned": len(results), "excluded": len(excluded),
                "pinned": len(pinned), "injected": sum(1 for d in pinned if d not in before),
                "buried": len(buried), "boosted": len(set(factor) | set(addend)),
            },
        }
        if len(fired) > limit:
            details["firings_truncated"] = len(fired) - limit
        if suppressed:
            details["suppressed"] = suppressed
        if self._warnings:
            details["rule_warnings"] = self._warnings
        return StageResult(
            candidates=results, drops=drops, decisions=decisions, details=details,
            timings_ms={"rules": (time.perf_counter() - began) * 1000.0},
        )

    def _targets_among(
        self, rule: "CompiledRule", incoming: list[Candidate], rows: "np.ndarray", view: QueryView,
        decisions: list[Decision],
    ) -> list[int]:
        """Positions (0-based, in the incoming list) of the candidates a non-pin rule targets."""
        import numpy as np

        if not incoming:
            return []
        positions = np.flatnonzero(self._targets[rule.id][rows]).tolist()
        if rule.id not in self._dynamic:
            return positions
        assert rule.match is not None
        hits = []
        failures = 0
        for position in positions:
            try:
                if rule.match.evaluate(self._subject(incoming[position], position, view)):
                    hits.append(position)
            except ExpressionRuntimeError as exc:
                failures += 1
                first_error = str(exc)
        if failures:
            decisions.append(Decision("rule_error", f"rule '{rule.id}' failed on {failures} candidates "
                                      f"({first_error}); it does not fire on them", {"rule": rule.id}))
        return hits

    def _subject(self, candidate: Candidate, position: int, view: QueryView) -> Subject:
        scores = {entry.stage: entry.value for entry in candidate.ledger}
        document = self._table.documents[candidate.row]
        return Subject(view, document, scores, candidate.score if candidate.ledger else None, position + 1)

    def _match_evidence(self, rule: "CompiledRule", candidate: Candidate, position: int, view: QueryView) -> list[dict[str, Any]]:
        evidence: list[dict[str, Any]] = []
        if rule.docs:
            evidence.append({"field": "doc.id", "op": "in", "matched": candidate.doc_id})
        if rule.match is not None:
            try:
                rule.match.evaluate(self._subject(candidate, position, view), evidence)
            except ExpressionRuntimeError:  # reported by _targets_among
                pass
        return evidence

    def _firing_records(
        self, applied: list[_Firing], pinned: dict[str, _Pin], excluded: dict[str, "CompiledRule"],
        before: dict[str, int], after: dict[str, int], incoming: dict[str, Candidate], score: dict[str, float],
        factor: dict[str, float], addend: dict[str, float],
    ) -> list[dict[str, Any]]:
        records = []
        for pin in sorted(pinned.values(), key=lambda p: p.slot):
            records.append({
                "rule": pin.rule.id, "action": "pin", "doc_id": pin.doc_id, "when": pin.when,
                "rank_before": before.get(pin.doc_id), "rank_after": after.get(pin.doc_id),
                "effect": f"pinned at {after.get(pin.doc_id)}" + ("" if pin.doc_id in before else " (injected: not recalled)"),
            })
        for firing in applied:
            doc_id, action, spec = firing.doc_id, firing.rule.action, firing.rule.spec
            if action == "exclude":
                effect = "excluded"
            elif action == "bury":
                effect = "buried"
            else:
                parts = []
                if getattr(spec, "factor", None) is not None:
                    parts.append(f"x{spec.factor:g}")  # type: ignore[attr-defined]
                if getattr(spec, "add", None) is not None:
                    parts.append(f"{spec.add:+g}")  # type: ignore[attr-defined]
                original = incoming[doc_id].score
                effect = f"{action} {' '.join(parts)}: score {original:.6g} -> {score.get(doc_id, original):.6g}"
                if doc_id in pinned:
                    effect += " (position fixed by a pin)"
            records.append({
                "rule": firing.rule.id, "action": action, "doc_id": doc_id, "when": firing.when, "match": firing.match,
                "rank_before": before.get(doc_id), "rank_after": after.get(doc_id), "effect": effect,
            })
        return records

    # ------------------------------------------------------------------ explain

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        own = next((e for e in candidate.ledger if e.stage == self.id), None)
        earlier = [e for e in candidate.ledger if e.stage != self.id]
        previous = earlier[-1].value if earlier else None
        details: list[Explanation] = []
        view = QueryView(query)
        subject = Subject(view, self._table.documents[candidate.row], {e.stage: e.value for e in earlier},
                          previous, earlier[-1].rank if earlier else None)
        for rule in self._ruleset.rules:
            if rule.action not in ("boost", "demote") or rule.inactive_reason(query.as_of) is not None:
                continue
            try:
                if not rule.when.evaluate(Subject(view)):
                    continue
                if not self._targets[rule.id][candidate.row]:
                    continue
                if rule.id in self._dynamic and rule.match is not None and not rule.match.evaluate(subject):
                    continue
            except ExpressionRuntimeError:
                continue
            spec = rule.spec
            if getattr(spec, "factor", None) is not None:
                details.append(Explanation(spec.factor, f"x{spec.factor:g} ({rule.action} rule '{rule.id}')"))  # type: ignore[attr-defined]
            if getattr(spec, "add", None) is not None:
                details.append(Explanation(spec.add, f"{spec.add:+g} ({rule.action} rule '{rule.id}')"))  # type: ignore[attr-defined]
        if own is not None and own.signal == PIN_SIGNAL:
            origin = f"score {previous:.6g} carried over" if previous is not None else "not recalled: no upstream score"
            return Explanation(value, f"pinned at rank {rank} by an override rule in stage '{self.id}' ({origin}); "
                               "see the stage's trace details for the rule", tuple(details))
        if details:
            return Explanation(value, f"score after override rules = {previous if previous is not None else 0.0:.6g} "
                               "x product(factors) + sum(adds); rank " + str(rank), tuple(details))
        moved = "" if own is None or not earlier or earlier[-1].rank == rank else f" (was {earlier[-1].rank})"
        return Explanation(value, f"score unchanged by override rules; rank {rank}{moved}")

