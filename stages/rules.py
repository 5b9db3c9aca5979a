"""Analyst rules as stages: ``rules.prefilter`` (a document mask) and ``rules.override``.

``rules.prefilter`` decides which documents may be retrieved at all. It produces a mask over
every index row; recall stages apply it inside recall, so a forbidden document never takes a
recall slot. Conditions that do not depend on the query are evaluated once, at warm-up; the rest
cost a few numpy operations per query over per-field columns (see :mod:`rules.corpus`). Access
rules fail closed: a document a rule cannot judge (an expression that raises, a date or number
comparison on a value that is not one, a malformed nested path or access value, an
``eq``/``in``/``contains`` test meeting a value of another type than the rule's) is denied, and the
trace says how many and why (a ``rule_error`` decision; ``undecidable`` in the rule's report).

``rules.override`` applies pins, buries, excludes and boosts/demotes to a ranked list. Its
precedence is fixed and does not depend on the order of rules in the file:

1. **exclude** — the document is removed (any other rule on it is reported as suppressed); a
   document a pin would bring in (recall did not return it) is checked against the excludes too,
   and is not brought in when one matches it or cannot be evaluated on it;
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

import copy
import hashlib
import logging
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Optional, Sequence

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from engine.errors import ConfigError, ConfigIssue
from engine.model import Candidate, Decision, Drop, Query, ScoreEntry
from engine.paths import file_version
from engine.registry import register_stage
from engine.stage import (
    DocumentMask,
    Explanation,
    GraphIssue,
    GraphView,
    Port,
    RecentNotes,
    Resources,
    Stage,
    StageContext,
    StageNode,
    StageParams,
    StageResult,
)
from rules.conditions import ExpressionRuntimeError, Frame, QueryView, Subject, redact_query_evidence
from rules.ruleset import OVERRIDE_PRECEDENCE

if TYPE_CHECKING:
    import numpy as np

    from rules.corpus import DocumentTable
    from rules.ruleset import CompiledRule, RuleSet

OVERRIDE_SIGNAL = "override"
PIN_SIGNAL = "override.pin"  # ledger signal of a pinned document (select.threshold keeps these)
RULE_FILE_PATTERN = r"^[^\x00]+\.(ya?ml)$"
TABLE_KEY = "rules.table:{index}"  # resources.shared key of an index's DocumentTable
_RULE_FILE = re.compile(RULE_FILE_PATTERN)


class RulesParams(StageParams):
    rules: str = Field(
        description="rule file (YAML), relative to the pipeline config's directory",
        json_schema_extra={"pattern": RULE_FILE_PATTERN},
    )
    strictness: Optional[Literal["strict", "default", "lenient"]] = Field(
        None, description="grade of findings of the rule checks; None: the rule file's own setting"
    )

    @field_validator("rules")
    @classmethod
    def _yaml_file(cls, value: str) -> str:
        from engine.yamlsource import path_problem

        problem = path_problem(value)  # first: 'x\0.yaml' ends in .yaml, and a NUL is what is wrong with it
        if problem is not None:
            raise PydanticCustomError("rule_file", "{problem}", {"problem": problem})
        if not _RULE_FILE.match(value):
            raise PydanticCustomError(
                "rule_file",
                "a rule file is a YAML file: its name must end in .yaml or .yml",
            )
        return value


class OverrideParams(RulesParams):
    max_traced_firings: int = Field(500, ge=0, le=100_000, description="firings listed in the trace per query")


def _rule_file_issues(
    path: Path, kind: Literal["prefilter", "override"], strictness: str | None,
    extra: "Callable[[RuleSet], list[ConfigIssue]] | None" = None,
) -> tuple["RuleSet | None", list[ConfigIssue]]:
    """Load the rule file and run every rule-file check, on every rule that validated."""
    from rules.conflicts import check_rule_file

    return check_rule_file(path, kind, strictness, extra)


def _score_field_issues(ruleset: "RuleSet", node: StageNode, graph: GraphView) -> list[ConfigIssue]:
    """A ``score.<stage>`` (field or expression) that names no scoring stage upstream can never be
    read: the condition is never true, the rule never fires. An error, whatever the strictness."""
    from difflib import get_close_matches

    from rules.conflicts import score_references

    scoring = graph.upstream_signals(node.id)  # the stages upstream that write a ledger score: id -> signal
    upstream = {n.id: n for n in graph.ancestors(node.id)}
    every = {n.id: n for n in graph.nodes()}
    known = ", ".join(sorted(scoring)) or "none that scores"
    issues = []
    for rule in ruleset.rules:
        for path, stage, in_expression in score_references(rule):
            if stage in scoring:
                continue
            notes = []
            if stage == node.id:
                notes.append(f"'{stage}' is this stage: it writes its score after its rules have run")
            elif stage in upstream:
                notes.append(f"'{stage}' ({upstream[stage].cls.type_name}) is upstream but writes no score")
            elif stage in every:
                notes.append(f"'{stage}' is not upstream of '{node.id}'")
            notes.append(f"upstream: {known}")
            hint = get_close_matches(stage, list(scoring), n=1)
            if hint:
                notes.append(f"did you mean 'score.{hint[0]}'?")
            what = f"the expression reads 'score.{stage}', which" if in_expression else f"'score.{stage}'"
            issues.append(ConfigIssue(
                ruleset.locate(rule, *path), ruleset.dotted(rule, *path),
                f"rule '{rule.id}': {what} names no scoring stage upstream of '{node.id}' ({'; '.join(notes)}); "
                "the condition can never hold",
            ))
    return issues


def _graph_check(node: StageNode, graph: GraphView, kind: Literal["prefilter", "override"]) -> list[GraphIssue]:
    """Load and check the rule file at compile time when the compiler says where the config lives.

    Needs ``GraphView.base_dir`` (the pipeline file's directory). Without it, the same checks run
    at warm-up, where ``resources.resolve_path`` knows the directory (all but the check of
    ``score.<stage>`` fields against the upstream stages, which needs the graph).
    """
    base_dir = getattr(graph, "base_dir", None)
    if base_dir is None:
        return []
    params = node.params
    assert isinstance(params, RulesParams)
    path = Path(params.rules).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    extra = (lambda ruleset: _score_field_issues(ruleset, node, graph)) if kind == "override" else None
    _, issues = _rule_file_issues(path, kind, params.strictness, extra)
    # the rule file's own location, quoted at the config's `rules:` field; its severity is said once
    return [GraphIssue(f"{issue.location}  {issue.detail()}", ("params", "rules"), issue.severity) for issue in issues]


# Stage types that re-order (or drop by similarity) the list they are given: after an override stage they undo its
# pins and burials, which are positions in its output
_RERANKING = ("fuse.", "rerank.", "boost.", "dedup.")


def _reranked_after(node: StageNode, graph: GraphView) -> list[GraphIssue]:
    """A warning for each stage downstream of the override stage ``node`` that re-ranks what it placed."""
    found = []
    for other in graph.nodes():
        if other.cls.type_name.startswith(_RERANKING) and any(a.id == node.id for a in graph.ancestors(other.id)):
            found.append(GraphIssue(
                f"stage '{other.id}' ({other.cls.type_name}) comes after this override stage and re-ranks its output: "
                "the pins and burials (positions in this stage's output) do not survive it"
                + (", and it may drop a pinned document as a near-duplicate of another" if
                   other.cls.type_name.startswith("dedup.") else "")
                + "; put the override stage after every stage that ranks", (), "warning",
            ))
    return found


def _prepare(stage: Stage, resources: Resources, kind: Literal["prefilter", "override"]) -> tuple["RuleSet", "DocumentTable", list[str]]:
    """Load the rule file, build (or share) the document table, run every check; errors raise."""
    from rules.conflicts import check_against_corpus, check_query_entities, corpus_fields
    from rules.corpus import DocumentTable

    params = stage.params
    assert isinstance(params, RulesParams)
    index = resources.require_index(stage.id)
    path = resources.resolve_path(params.rules)
    ruleset, issues = _rule_file_issues(path, kind, params.strictness)
    if ruleset is None:
        raise ConfigError(issues)
    stage._on_disk = _OnDisk(Path(path), ruleset.sha256)  # type: ignore[attr-defined]
    fields = corpus_fields(ruleset)
    # one table per index, shared by the rule stages (and boost.recency): columns of the fields the rules read,
    # built in one pass over the corpus; documents are read from the index's store when needed
    table: DocumentTable = resources.shared(TABLE_KEY.format(index=index.path),
                                            lambda: DocumentTable.from_index(index, fields))
    issues = issues + check_against_corpus(ruleset, table) + check_query_entities(ruleset, index)
    if any(i.severity == "error" for i in issues):
        raise ConfigError(issues)
    stage._entity_reader = _entity_reader(index, ruleset)  # type: ignore[attr-defined]
    return ruleset, table, [str(i) for i in issues]


class _OnDisk:
    """Whether the rule file on disk still holds the rules a stage loaded: a stat per query, a hash only when the
    stat changes. An analyst who edits the file of a running server learns from the traces that the edit is not
    in force (and why the replays of its queries name the file as changed)."""

    def __init__(self, path: Path, sha256: str):
        self.path = path
        self.loaded = sha256
        self._lock = threading.Lock()
        self._stat = self._read_stat()
        self._sha: str | None = sha256
        self._warned: set[str | None] = set()

    def _read_stat(self) -> tuple[int, int, int, int] | None:
        try:
            return file_version(os.stat(self.path))
        except OSError:
            return None

    def decision(self) -> Decision | None:
        """None while the file holds the loaded rules; else a ``rule_file_changed`` decision."""
        stat = self._read_stat()
        with self._lock:
            if stat != self._stat:
                self._stat = stat
                try:
                    self._sha = None if stat is None else hashlib.sha256(self.path.read_bytes()).hexdigest()
                except OSError:
                    self._sha = None
            now = self._sha
        if now == self.loaded:
            return None
        state = "was removed" if now is None else f"changed (sha256 {now[:12]}…, loaded {self.loaded[:12]}…)"
        detail = (f"the rule file {self.path} {state} since the pipeline loaded it: this query ran the rules as "
                  "loaded; restart the process (sieve serve) to apply the edit")
        if now not in self._warned:  # once per state, not once per query
            self._warned.add(now)
            logging.getLogger("sieve.rules").warning(detail)
        return Decision("rule_file_changed", detail, {"file": str(self.path), "loaded_sha256": self.loaded,
                                                      "on_disk_sha256": now})


def _entity_reader(index: Any, ruleset: "RuleSet") -> Any:
    """The extractor of the query's entities, when a rule reads them (``query.entities``, ``query.entities.<LABEL>``,
    ``query.entity_labels``) and the index has an entities component: the extractor it was built with, so a
    query's 'Glucophage' is the documents' metformin. None otherwise (:func:`check_query_entities` says so)."""
    from rules.conflicts import reads_query_entities

    if "entities" not in index.manifest["components"] or not any(reads_query_entities(r) for r in ruleset.rules):
        return None
    from stages.entities import query_entity_source

    return query_entity_source(index, "rules")


def _view(stage: Stage, query: Query, trace_text: bool = True) -> QueryView:
    """The query side of the rules, with the query's entities extracted when a rule reads them and the caller
    gave none (a rule test may give them). ``trace_text`` False: its errors quote no value (they may quote the
    query)."""
    reader = getattr(stage, "_entity_reader", None)
    return QueryView(reader.with_entities(query) if reader is not None else query, trace_text)


def _names_set_aside(stage: Stage, query: Query, trace_text: bool) -> dict[str, Any]:
    """For the stage's details, when a rule reads the query's entities: the names the query holds that do not count
    for want of their gazetteer entries' context (``out_of_context``, as boost.entity_consistency lists them)."""
    reader = getattr(stage, "_entity_reader", None)
    if reader is None or query.entities:
        return {}
    from stages.entities import out_of_context

    return out_of_context(reader.query_set_aside(query.effective_text), trace_text)


def _prepare_match(rule: "CompiledRule", ruleset: "RuleSet", table: "DocumentTable") -> None:
    """Compute a rule's query-independent conditions over the corpus; a condition that cannot be computed at all (a
    pattern that backtracks without end on a document) stops the pipeline with the rule named."""
    assert rule.match is not None
    try:
        rule.match.prepare(table)
    except ExpressionRuntimeError as exc:
        raise ConfigError(f"{ruleset.locate(rule, 'match')}  rule '{rule.id}' cannot be evaluated on the corpus: "
                          f"{exc}") from None


def _per_query_reads(node: Any) -> tuple[set[str], bool]:
    """The ``doc.<...>`` columns a condition reads for every query (its query-dependent parts; a query-independent
    part is computed once and kept), and whether it reads whole documents per query (an expression on ``doc``
    that also reads the query or the candidate)."""
    from rules.conditions import Expr, Leaf

    fields: set[str] = set()
    documents = False

    def walk(item: Any) -> None:
        nonlocal documents
        if item is None or item.static:
            return
        if isinstance(item, Expr):
            documents = documents or item.uses_document
        elif isinstance(item, Leaf):
            fields.add(item.field)
        path = getattr(item, "path", None)
        if isinstance(path, str):
            fields.add(path)
        for child in getattr(item, "children", ()):
            walk(child)
        walk(getattr(item, "child", None))

    walk(node)
    return {f for f in fields if f.startswith("doc.")}, documents


def _settle_table(ruleset: "RuleSet", table: "DocumentTable", kind: Literal["prefilter", "override"]) -> None:
    """After a rule stage's warm-up: keep the columns its rules read per query, drop the text columns no one
    needs any more; a prefilter whose expression reads documents per query (every document, every query) keeps
    the documents in memory."""
    whole = False
    for rule in ruleset.rules:
        fields, documents = _per_query_reads(rule.match)
        table.pin(fields)
        whole = whole or documents
    if whole and kind == "prefilter":
        table.keep_documents()
    table.release()


def _prefetch(table: "DocumentTable", rows: Any) -> None:
    """Read the documents of ``rows`` from the store in one go (about to be evaluated one by one)."""
    prefetch = getattr(table.documents, "prefetch", None)
    if prefetch is not None and len(rows):
        prefetch(rows)


def _warm_up_warnings(stage: Stage) -> list[str]:
    """The rule stages' warm-up findings that do not stop the pipeline (each also kept in the traces)."""
    return list(getattr(stage, "_warnings", ()))


def _file_changed(stage: Stage) -> list[Decision]:
    """``[rule_file_changed]`` when the stage's rule file no longer holds the rules it loaded, else ``[]``."""
    on_disk = getattr(stage, "_on_disk", None)
    found = on_disk.decision() if on_disk is not None else None
    return [found] if found is not None else []


def _identity(stage: Stage) -> dict[str, Any] | None:
    """The rule file a stage runs, by content hash: recorded with the trace so a replay can tell it changed."""
    ruleset = getattr(stage, "_ruleset", None)
    if ruleset is None:
        return None
    return {"rules_file": ruleset.path, "sha256": ruleset.sha256, "kind": ruleset.kind, "rules": len(ruleset.rules)}


def _when(rule: "CompiledRule", view: QueryView) -> tuple[bool | None, list[dict[str, Any]], str | None]:
    """(does the rule's query condition hold — None on error, evidence, error message)."""
    evidence: list[dict[str, Any]] = []
    try:
        return rule.when.evaluate(Subject(view), evidence), evidence, None
    except ExpressionRuntimeError as exc:
        return None, [], exc.describe(view.trace_text)


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
        self._ruleset, self._table, self._warnings = _prepare(self, resources, "prefilter")
        for rule in self._ruleset.rules:  # query-independent conditions: computed now, once
            assert rule.match is not None
            _prepare_match(rule, self._ruleset, self._table)
        _settle_table(self._ruleset, self._table, "prefilter")

    warm_up_warnings = _warm_up_warnings

    def identity(self) -> dict[str, Any] | None:
        return _identity(self)

    def unheld_user_values(self, query: Query) -> list[str]:
        """For the command line, after warm-up: each value of the user's that an ``acl`` or ``jurisdiction`` rule in
        force compares with the documents and that no document holds, with the closest one they hold. Such a value
        grants nothing, most likely mistyped (``--jurisdiction usa`` where the documents say ``US`` hid every US
        document, silently). Not put in traces or server answers: the closest value would tell the user of
        documents they may not see."""
        from rules.ruleset import AccessMatch

        def access_tests(node: Any) -> Iterator[AccessMatch]:
            if isinstance(node, AccessMatch):
                if node.value_from is not None:
                    yield node
                return
            for child in getattr(node, "children", ()):
                yield from access_tests(child)

        view = QueryView(query, True)
        said = []
        for rule in self._ruleset.rules:
            if rule.action not in ("acl", "jurisdiction") or rule.inactive_reason(query.as_of) is not None:
                continue
            for test in access_tests(rule.match):
                for value, close in test.unheld(self._table, view):
                    said.append(f"stage '{self.id}': rule '{rule.id}' ({rule.action}): no document's "
                                f"{test.path.removeprefix('doc.')} holds the user's {value!r} ({test.value_from}), "
                                "so it grants nothing" + (f" (did you mean {close!r}?)" if close else ""))
        return said

    def denying_rules(self, query: Query, row: int) -> list[str]:
        """The ids of the rules that deny index row ``row`` for ``query``, evaluated as :meth:`run` does
        (a rule inactive at ``as_of`` or whose ``when`` is false denies nothing; a rule whose ``when``
        fails applies, and a rule that fails on the document denies it: access rules fail closed)."""
        view = _view(self, query)
        denying = []
        for rule in self._ruleset.rules:
            if rule.inactive_reason(query.as_of) is not None:
                continue
            holds, _, error = _when(rule, view)
            if error is None and not holds:
                continue
            denied, _ = self._denied(rule, view)
            if denied[row]:
                denying.append(rule.id)
        return denying

    def _denied(self, rule: "CompiledRule", view: QueryView) -> tuple["np.ndarray", "np.ndarray | None"]:
        """The rows ``rule`` denies (fail closed: a row the rule cannot be evaluated on is denied too),
        and those error rows (None when there are none)."""
        import numpy as np

        assert rule.match is not None
        view.errors = []
        try:
            matched = rule.match.vector(self._table, view)
        except ExpressionRuntimeError as exc:  # the condition as a whole: access rules fail closed, deny every row
            view.errors = [(0, exc.describe(view.trace_text))]
            everything = np.ones(self._table.size, dtype=bool)
            return everything, everything
        denied = matched if rule.effect == "exclude" else ~matched
        if not view.errors:
            return denied, None
        error_rows = np.zeros(self._table.size, dtype=bool)
        error_rows[[r for r, _ in view.errors]] = True
        return denied | error_rows, error_rows

    def run(self, ctx: StageContext) -> StageResult:
        import numpy as np

        table = self._table
        view = _view(self, ctx.query, ctx.trace_text)
        allowed = np.ones(table.size, dtype=bool)
        report: list[dict[str, Any]] = []
        decisions: list[Decision] = _file_changed(self)
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
            denied, error_rows = self._denied(rule, view)
            undecided = 0
            if error_rows is not None:
                undecided = int(error_rows.sum())
                reasons = list(dict.fromkeys(message for _, message in view.errors))[:3]
                decisions.append(Decision(
                    "rule_error", f"rule '{rule.id}' cannot judge {undecided} documents ({'; '.join(reasons)}"
                    f"{'; ...' if undecided > len(reasons) else ''}); they are denied (access rules fail closed)",
                    {"rule": rule.id, "documents": undecided, "reasons": reasons},
                ))
            newly = int(np.count_nonzero(denied & allowed))
            allowed &= ~denied
            entry.update(status="applied", excluded=int(np.count_nonzero(denied)), newly_excluded=newly)
            if undecided:
                entry["undecidable"] = undecided  # among `excluded`: documents the rule could not judge
            if evidence:
                entry["when"] = redact_query_evidence(evidence, ctx.trace_text)
            report.append(entry)
        evaluated_ms = (time.perf_counter() - began) * 1000.0
        kept = int(np.count_nonzero(allowed))
        details: dict[str, Any] = {
            "rules_file": self._ruleset.describe(),
            "documents": table.size,
            "allowed": kept,
            "excluded": table.size - kept,
            "rules": report,
            **_names_set_aside(self, ctx.query, ctx.trace_text),
            **_resolved_dates(self._ruleset.dated_rules, ctx.query.as_of),
        }
        if self._warnings:
            details["rule_warnings"] = list(self._warnings)  # the trace's own list
        if kept == 0:
            decisions.append(Decision("nothing_allowed", "the access rules allow no document for this query"))
        return StageResult(
            mask=DocumentMask(allowed, (self.id,)),
            decisions=decisions,
            details=details,
            timings_ms={"rules": evaluated_ms},
        )


def _resolved_dates(dated: Iterable["CompiledRule"], as_of: datetime) -> dict[str, Any]:
    """``{"resolved_dates": {rule id: {test: moment}}}`` for the rules whose conditions compare with a relative date
    (``RuleSet.dated_rules``), each resolved at this query's ``as_of`` in UTC; nothing for a rule file without one."""
    resolved = {rule.id: rule.resolved_dates(as_of) for rule in dated}
    return {"resolved_dates": resolved} if resolved else {}


# =========================================================================== override


@dataclass
class _Pin:
    rule: "CompiledRule"
    doc_id: str
    row: int
    requested: int
    slot: int = 0
    when: list[dict[str, Any]] = field(default_factory=list)


def _effect(rule: "CompiledRule") -> str:
    """What a non-pin rule does, as the trace states it (``boost x1.25 +0.1``)."""
    if rule.action in ("exclude", "bury"):
        return "excluded" if rule.action == "exclude" else "buried"
    spec = rule.spec
    parts = [rule.action]
    if spec.factor is not None:  # type: ignore[attr-defined]
        parts.append(f"x{spec.factor:g}")  # type: ignore[attr-defined]
    if spec.add is not None:  # type: ignore[attr-defined]
        parts.append(f"{spec.add:+g}")  # type: ignore[attr-defined]
    return " ".join(parts)


def _boosted(score: float, factor: float, add: float) -> float:
    """A boost or demote: the factor moves a score the same way whatever its sign (x factor when it is 0 or more,
    / factor when it is negative: a boost of x2 takes a cross-encoder logit of -4 to -2, up, not to -8), then
    ``add``. A score of 0 is not moved by a factor (the stage says so: ``factor_on_zero``)."""
    return (score * factor if score >= 0 else score / factor) + add


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
        return _graph_check(node, graph, "override") + _reranked_after(node, graph)

    def warm_up(self, resources: Resources) -> None:
        import numpy as np

        self._ruleset, self._table, self._warnings = _prepare(self, resources, "override")
        self._listed: dict[str, np.ndarray] = {}  # rows named in each rule's `docs`
        self._evidence: dict[tuple[str, int], list[dict[str, Any]]] = {}  # static match evidence by (rule, row)
        self._effects = {rule.id: _effect(rule) for rule in self._ruleset.rules if rule.action != "pin"}
        self._notes = RecentNotes()
        for rule in self._ruleset.rules:
            if rule.action == "pin":
                continue
            if rule.docs:
                listed = np.zeros(self._table.size, dtype=bool)
                listed[[self._table.row_of[d] for d in rule.docs if d in self._table.row_of]] = True
                listed.setflags(write=False)
                self._listed[rule.id] = listed
            if rule.match is not None:  # query-independent parts: computed now, once
                _prepare_match(rule, self._ruleset, self._table)
        self._reads_documents = {rule.id for rule in self._ruleset.rules if _per_query_reads(rule.match)[1]}
        _settle_table(self._ruleset, self._table, "override")

    warm_up_warnings = _warm_up_warnings

    # ------------------------------------------------------------------ run

    def identity(self) -> dict[str, Any] | None:
        return _identity(self)

    def run(self, ctx: StageContext) -> StageResult:
        import numpy as np

        (incoming,) = ctx.inputs
        table = self._table
        view = _view(self, ctx.query, ctx.trace_text)
        decisions: list[Decision] = _file_changed(self)
        drops: list[Drop] = []
        began = time.perf_counter()

        frame = Frame(incoming, table)
        # Defence in depth: nothing the prefilter forbids leaves this stage.
        if ctx.mask is not None and len(frame):
            permitted = ctx.mask.allowed[frame.rows]
            if not permitted.all():
                forbidden = np.flatnonzero(~permitted).tolist()
                drops.extend(Drop(incoming[i].doc_id, "forbidden_by_prefilter", "arrived despite the mask")
                             for i in forbidden)
                decisions.append(Decision(
                    "mask_enforced", f"{len(forbidden)} incoming candidates are forbidden by the prefilter; dropped",
                ))
                incoming = [c for c, ok in zip(incoming, permitted.tolist()) if ok]
                frame = Frame(incoming, table)
        size = len(incoming)
        position_of = {c.doc_id: i for i, c in enumerate(incoming)}

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
                active.append((rule, redact_query_evidence(evidence, ctx.trace_text)))
            else:
                inactive[rule.id] = "condition false"
        # precedence first (exclude > pin > bury > boost/demote), then priority (higher first), then rule id
        active.sort(key=lambda item: (OVERRIDE_PRECEDENCE[item[0].action], -item[0].priority, item[0].id))

        excluded = np.zeros(size, dtype=bool)
        excluded_by: dict[int, str] = {}
        buried = np.zeros(size, dtype=bool)
        factor = np.ones(size, dtype=np.float64)
        addend = np.zeros(size, dtype=np.float64)
        boosted = np.zeros(size, dtype=bool)
        fired: list[tuple["CompiledRule", int, list[dict[str, Any]]]] = []  # (rule, position, when evidence)
        suppressed: list[dict[str, Any]] = []
        pins: list[_Pin] = []
        for rule, when_evidence in active:
            action = rule.action
            if action == "pin":
                for offset, doc_id in enumerate(rule.docs):
                    row = table.row_of.get(doc_id)
                    requested = rule.spec.position + offset  # type: ignore[attr-defined]
                    pins.append(_Pin(rule, doc_id, -1 if row is None else row, requested, when=when_evidence))
                continue
            selected = self._targets_among(rule, frame, view, decisions)
            if not selected.any():
                continue
            blocked = selected & excluded
            for position in np.flatnonzero(blocked).tolist():
                suppressed.append({"rule": rule.id, "doc_id": incoming[position].doc_id,
                                   "reason": f"excluded by '{excluded_by[position]}'"})
            selected &= ~excluded
            if action == "exclude":
                for position in np.flatnonzero(selected).tolist():
                    excluded_by[position] = rule.id
                excluded |= selected
            elif action == "bury":
                buried |= selected
            else:
                spec = rule.spec
                if spec.factor is not None:  # type: ignore[attr-defined]
                    factor[selected] *= spec.factor  # type: ignore[attr-defined]
                    zero = [incoming[p].doc_id for p in np.flatnonzero(selected).tolist() if incoming[p].score == 0]
                    if zero and spec.factor != 1:  # type: ignore[attr-defined]
                        decisions.append(Decision(
                            "factor_on_zero", f"rule '{rule.id}' multiplies {len(zero)} candidate score(s) of 0 (e.g. "
                            f"the bottom of a min-max normalised list), which a factor cannot move; give it `add` "
                            "to move them", {"rule": rule.id, "doc_ids": zero[:20]},
                        ))
                if spec.add is not None:  # type: ignore[attr-defined]
                    addend[selected] += spec.add  # type: ignore[attr-defined]
                boosted |= selected
            fired += [(rule, position, when_evidence) for position in np.flatnonzero(selected).tolist()]

        # pins: validity of each request, then slots by precedence
        pinned: dict[str, _Pin] = {}
        taken: set[int] = set()
        mask = ctx.mask.allowed if ctx.mask is not None else None
        injected_excluded = self._excluded_injections(pins, position_of, mask, active, view)
        for pin in sorted(pins, key=lambda p: (-p.rule.priority, p.rule.id, p.requested)):
            problem = None
            position = position_of.get(pin.doc_id)
            if pin.row < 0:
                problem = ("pin_unknown_document", f"rule '{pin.rule.id}' pins '{pin.doc_id}', which the index does not hold")
            elif mask is not None and not mask[pin.row]:
                problem = ("pin_forbidden", f"rule '{pin.rule.id}' pins '{pin.doc_id}', which the prefilter forbids for this "
                           "query; not shown")
            elif position is not None and excluded[position]:
                problem = ("pin_excluded", f"rule '{pin.rule.id}' pins '{pin.doc_id}', which rule "
                           f"'{excluded_by[position]}' excludes (exclude wins)")
            elif position is None and not pin.rule.spec.inject:  # type: ignore[attr-defined]
                problem = ("pin_not_recalled", f"rule '{pin.rule.id}' pins '{pin.doc_id}', which recall did not return "
                           "(inject: false)")
            elif position is None and pin.doc_id in injected_excluded:
                problem = ("pin_excluded", f"rule '{pin.rule.id}' would bring in '{pin.doc_id}' (not recalled), which "
                           f"{injected_excluded[pin.doc_id]} (exclude wins)")
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
        pinned_positions = [position_of[d] for d in pinned if d in position_of]
        if pinned_positions:
            pinned_mask = np.zeros(size, dtype=bool)
            pinned_mask[pinned_positions] = True
            for rule, position, _ in fired:
                if rule.action == "bury" and pinned_mask[position]:
                    doc_id = incoming[position].doc_id
                    suppressed.append({"rule": rule.id, "doc_id": doc_id,
                                       "reason": f"pinned by '{pinned[doc_id].rule.id}' (pin wins)"})
            fired = [f for f in fired if not (f[0].action == "bury" and pinned_mask[f[1]])]
            buried &= ~pinned_mask
        else:
            pinned_mask = None

        # the new order: free documents, then buried ones, with pins in their slots
        scores = [c.score for c in incoming]
        if boosted.any():
            for position in np.flatnonzero(boosted).tolist():
                scores[position] = _boosted(scores[position], float(factor[position]), float(addend[position]))
        placed = excluded | buried if pinned_mask is None else excluded | buried | pinned_mask
        free = np.flatnonzero(~placed).tolist()
        sunk = np.flatnonzero(buried & ~excluded).tolist()
        if boosted.any():
            # Scores are comparable only among documents the same stage scored last: a reranker's window holds its
            # logits, the documents below it their recall scores. A boost re-ranks a document within its group; the
            # groups keep their order (a tail document's BM25 score of 15 is not above a window's logit of 8).
            tier_of: dict[str, int] = {}
            tiers = [tier_of.setdefault(c.ledger[-1].stage if c.ledger else "", len(tier_of)) for c in incoming]
            if len(tier_of) > 1:
                spans = []
                for name, tier in tier_of.items():
                    ranks = [i + 1 for i, t in enumerate(tiers) if t == tier]
                    spans.append(f"'{name}' for {len(ranks)} (ranks {ranks[0]}-{ranks[-1]})" if name else
                                 f"none for {len(ranks)}")
                decisions.append(Decision(
                    "boost_within_scored_groups", f"the incoming scores come from {len(tier_of)} stages ("
                    f"{', '.join(spans)}): boosts re-rank documents among those the same stage scored; the groups "
                    "keep their order", {"groups": list(tier_of)},
                ))
            free.sort(key=lambda i: (tiers[i], -scores[i], incoming[i].doc_id))
            sunk.sort(key=lambda i: (tiers[i], -scores[i], incoming[i].doc_id))
        base = [incoming[i].doc_id for i in free + sunk]
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

        results = []
        after: dict[str, int] = {}
        stage_id = self.id
        for rank, doc_id in enumerate(order, start=1):
            after[doc_id] = rank
            position = position_of.get(doc_id)
            signal = PIN_SIGNAL if doc_id in pinned else OVERRIDE_SIGNAL
            if position is None:  # pinned in, not recalled
                results.append(Candidate(doc_id, pinned[doc_id].row, (ScoreEntry(stage_id, signal, 0.0, rank),)))
            else:
                existing = incoming[position]  # one new ledger entry; this stage never scored it before
                entry = ScoreEntry(stage_id, signal, float(scores[position]), rank)
                results.append(Candidate(doc_id, existing.row, existing.ledger + (entry,)))
        for position, rule_id in excluded_by.items():
            drops.append(Drop(incoming[position].doc_id, "override_exclude", f"rule '{rule_id}'"))

        # what explain() needs: the rank each document arrived at, the pin rule that placed it, and the boost and
        # demote rules that moved its score (as applied here: not judged again, which could differ on a document
        # a rule could not judge)
        applied: dict[str, set[str]] = {}
        for rule, position, _ in fired:
            if rule.action in ("boost", "demote"):
                applied.setdefault(incoming[position].doc_id, set()).add(rule.id)
        self._notes.put_for(ctx.query, {"arrived": {doc_id: p + 1 for doc_id, p in position_of.items()},
                                        "pins": {doc_id: pin.rule.id for doc_id, pin in pinned.items()},
                                        "applied": applied})
        limit = self.params.max_traced_firings
        records = self._firing_records(fired[:limit], pinned, frame, view, after, scores, position_of, ctx.trace_text)
        details: dict[str, Any] = {
            "rules_file": self._ruleset.describe(),
            "active_rules": [rule.id for rule, _ in active],
            "inactive_rules": inactive,
            "firings": records,
            "counts": {
                "incoming": size, "returned": len(results), "excluded": len(excluded_by),
                "pinned": len(pinned), "injected": sum(1 for d in pinned if d not in position_of),
                "buried": int(buried.sum()), "boosted": int(boosted.sum()),
            },
            **_names_set_aside(self, ctx.query, ctx.trace_text),
        }
        if len(fired) + len(pinned) > len(records):
            details["firings_truncated"] = len(fired) + len(pinned) - len(records)
        # every rule that fired and on how many documents, whatever max_traced_firings cut from the list above
        fired_rules = Counter(pin.rule.id for pin in pinned.values()) + Counter(rule.id for rule, _, _ in fired)
        details["fired_rules"] = dict(sorted(fired_rules.items()))
        details.update(_resolved_dates(self._ruleset.dated_rules, ctx.query.as_of))
        if suppressed:
            details["suppressed"] = suppressed
        if self._warnings:
            details["rule_warnings"] = list(self._warnings)  # the trace's own list
        return StageResult(
            candidates=results, drops=drops, decisions=decisions, details=details,
            timings_ms={"rules": (time.perf_counter() - began) * 1000.0},
        )

    def _excluded_injections(
        self, pins: list[_Pin], position_of: dict[str, int], mask: "np.ndarray | None",
        active: list[tuple["CompiledRule", list[dict[str, Any]]]], view: QueryView,
    ) -> dict[str, str]:
        """The documents pins would bring in (recall did not return them) that an active exclude rule
        removes, with why. Exclude beats pin for them too: the excludes are evaluated on each such
        document as on a recalled one (it has no upstream scores and no rank on arrival), and an
        exclude that cannot be evaluated on it keeps it out (a pin may not surface what an exclude might
        remove)."""
        import numpy as np

        rows: dict[str, int] = {}
        for pin in pins:
            if (pin.row >= 0 and pin.doc_id not in position_of and pin.rule.spec.inject  # type: ignore[attr-defined]
                    and (mask is None or mask[pin.row])):
                rows.setdefault(pin.doc_id, pin.row)
        excludes = [rule for rule, _ in active if rule.action == "exclude"]
        if not rows or not excludes:
            return {}
        frame = Frame([Candidate(doc_id, row, ()) for doc_id, row in rows.items()], self._table, arrived=False)
        found: dict[str, str] = {}
        for rule in excludes:  # in precedence order: the first exclude that removes a document names it
            selected = np.ones(len(frame), dtype=bool)
            listed = self._listed.get(rule.id)
            if listed is not None:
                selected &= listed[frame.rows]
            failed: dict[int, str] = {}
            if rule.match is not None and selected.any():
                view.errors = []
                selected &= rule.match.vector(self._table, view, frame)  # expression errors: in view.errors
                failed = {row: message for row, message in view.errors}
            for position, candidate in enumerate(frame.candidates):
                if candidate.doc_id in found:
                    continue
                if selected[position]:
                    found[candidate.doc_id] = f"rule '{rule.id}' excludes"
                elif candidate.row in failed and (listed is None or listed[candidate.row]):
                    found[candidate.doc_id] = (f"rule '{rule.id}' might exclude (it cannot be evaluated on it: "
                                               f"{failed[candidate.row]})")
        return found

    def _targets_among(self, rule: "CompiledRule", frame: Frame, view: QueryView, decisions: list[Decision]) -> "np.ndarray":
        """Which candidates (by position in the incoming list) a non-pin rule targets."""
        import numpy as np

        if not len(frame):
            return np.zeros(0, dtype=bool)
        selected = np.ones(len(frame), dtype=bool)
        listed = self._listed.get(rule.id)
        if listed is not None:
            selected &= listed[frame.rows]
        if rule.match is not None and selected.any():
            view.errors = []
            candidates = selected.copy()
            if rule.id in self._reads_documents:
                _prefetch(self._table, frame.rows[candidates])
            try:
                selected &= rule.match.vector(self._table, view, frame)  # a candidate it fails on: no firing
            except ExpressionRuntimeError as exc:  # the condition as a whole (a pattern over its time limit)
                decisions.append(Decision("rule_error", f"rule '{rule.id}' cannot be evaluated "
                                          f"({exc.describe(view.trace_text)}); it does not "
                                          "fire", {"rule": rule.id}))
                return np.zeros(len(frame), dtype=bool)
            # a query-independent condition is evaluated over the whole corpus once: report only these candidates
            rows = set(frame.rows[candidates].tolist())
            failed = [(row, message) for row, message in view.errors if row in rows]
            if failed:  # it does not fire on them, whatever wraps the failed test (a `not:` would turn it true)
                selected &= ~np.isin(frame.rows, [row for row, _ in failed])
                names = self._table.doc_ids
                decisions.append(Decision(
                    "rule_error", f"rule '{rule.id}' failed on {len(failed)} candidate(s) ({failed[0][1]}); "
                    "it does not fire on them",
                    {"rule": rule.id, "doc_ids": [names[row] for row, _ in failed[:20]]},
                ))
        return selected

    def _match_evidence(
        self, rule: "CompiledRule", frame: Frame, position: int, view: QueryView,
    ) -> tuple[list[dict[str, Any]], ExpressionRuntimeError | None]:
        """What the rule's target condition matched on this candidate, and the error that cut evaluating it short
        (None: none). Memoised when query-independent, but never a failed evaluation: it failed on this query (a
        pattern over its time limit on a busy process), and every later query would show its evidence as missing."""
        candidate = frame.candidates[position]
        static = rule.match is None or rule.match.static
        key = (rule.id, candidate.row)
        if static:
            cached = self._evidence.get(key)
            if cached is not None:
                return cached, None
        evidence: list[dict[str, Any]] = []
        if rule.docs:
            evidence.append({"field": "doc.id", "op": "in", "matched": candidate.doc_id})
        if rule.match is not None:
            try:
                rule.match.evaluate(frame.subject(position, view), evidence)
            except ExpressionRuntimeError as exc:  # it fired (_targets_among judged it): only the evidence is missing
                return evidence, exc
        if static:
            if len(self._evidence) >= 100_000:
                self._evidence.clear()
            self._evidence[key] = evidence
        return evidence, None

    def _firing_records(
        self, fired: list[tuple["CompiledRule", int, list[dict[str, Any]]]], pinned: dict[str, _Pin], frame: Frame,
        view: QueryView, after: dict[str, int], scores: list[float], position_of: dict[str, int], trace_text: bool,
    ) -> list[dict[str, Any]]:
        """One trace record per firing: rule, document, what matched (query text redacted unless the config lets it
        into traces), rank before -> after, effect."""
        records = []
        _prefetch(self._table, [  # the documents whose evidence is not memoised
            int(frame.rows[position]) for rule, position, _ in fired
            if not (rule.match is None or rule.match.static) or (rule.id, int(frame.rows[position])) not in self._evidence
        ])
        for pin in sorted(pinned.values(), key=lambda p: p.slot):
            position = position_of.get(pin.doc_id)
            records.append({
                "rule": pin.rule.id, "action": "pin", "doc_id": pin.doc_id, "when": pin.when,
                "rank_before": None if position is None else position + 1, "rank_after": after.get(pin.doc_id),
                "effect": f"pinned at {after.get(pin.doc_id)}" + ("" if position is not None else " (injected: not recalled)"),
            })
        candidates = frame.candidates
        effects = self._effects
        for rule, position, when_evidence in fired:
            candidate = candidates[position]
            evidence, failed = self._match_evidence(rule, frame, position, view)
            record: dict[str, Any] = {
                "rule": rule.id, "action": rule.action, "doc_id": candidate.doc_id, "when": when_evidence,
                "match": copy.deepcopy(redact_query_evidence(evidence, trace_text)),  # cached: the trace's own copy
                "rank_before": position + 1, "rank_after": after.get(candidate.doc_id), "effect": effects[rule.id],
            }
            if failed is not None:  # why `match` lacks what the condition matched
                record["match_error"] = (f"what its target condition matched could not be collected: "
                                         f"{failed.describe(trace_text)}")
            if rule.action in ("boost", "demote"):
                record["score_before"] = candidate.score
                record["score_after"] = scores[position]
                if candidate.doc_id in pinned:
                    record["effect"] += " (position fixed by a pin)"
            records.append(record)
        return records

    # ------------------------------------------------------------------ explain

    def _pinning_rule(self, query: Query, view: QueryView, doc_id: str) -> str:
        """The pin rule that holds ``doc_id``'s position: the one ``run`` placed it with (its notes), else, of the
        active pins naming it whose condition holds, the one that wins a contended document (higher priority,
        then rule id)."""
        notes = self._notes.get_for(query)
        if notes is not None and doc_id in notes["pins"]:
            return f"override rule '{notes['pins'][doc_id]}'"
        contenders = []
        for rule in self._ruleset.rules:
            if rule.action != "pin" or doc_id not in rule.docs or rule.inactive_reason(query.as_of) is not None:
                continue
            try:
                if rule.when.evaluate(Subject(view)):
                    contenders.append(rule)
            except ExpressionRuntimeError:
                continue
        if not contenders:
            return "an override rule"
        winner = min(contenders, key=lambda rule: (-rule.priority, rule.id))
        return f"override rule '{winner.id}'"

    def _would_apply(self, rule: "CompiledRule", view: QueryView, subject: Subject, row: int) -> bool:
        """Whether a boost or demote rule holds for a document, judged alone (when the run's record is gone)."""
        try:
            if not rule.when.evaluate(Subject(view)):
                return False
            listed = self._listed.get(rule.id)
            if listed is not None and not listed[row]:
                return False
            return rule.match is None or bool(rule.match.evaluate(subject))
        except ExpressionRuntimeError:
            return False

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        own = next((e for e in candidate.ledger if e.stage == self.id), None)
        earlier = [e for e in candidate.ledger if e.stage != self.id]
        previous = earlier[-1].value if earlier else None
        details: list[Explanation] = []
        view = _view(self, query, trace_text)
        arrived = Candidate(candidate.doc_id, candidate.row, tuple(earlier))
        # the rank it arrived at (a stage between the last scorer and this one, such as dedup, moves it)
        notes = self._notes.get_for(query)
        arrival_rank = notes["arrived"].get(candidate.doc_id) if notes is not None else None
        if arrival_rank is None and notes is None:
            arrival_rank = earlier[-1].rank if earlier else None
        subject = Subject(view, self._table.documents[candidate.row], arrived, arrival_rank)
        applied = notes.get("applied") if notes is not None else None
        for rule in self._ruleset.rules:
            if rule.action not in ("boost", "demote") or rule.inactive_reason(query.as_of) is not None:
                continue
            if applied is not None:  # the run's own record of what moved this document's score
                if rule.id not in applied.get(candidate.doc_id, ()):
                    continue
            elif not self._would_apply(rule, view, subject, candidate.row):
                continue
            spec = rule.spec
            if getattr(spec, "factor", None) is not None:
                details.append(Explanation(spec.factor, f"x{spec.factor:g} ({rule.action} rule '{rule.id}')"))  # type: ignore[attr-defined]
            if getattr(spec, "add", None) is not None:
                details.append(Explanation(spec.add, f"{spec.add:+g} ({rule.action} rule '{rule.id}')"))  # type: ignore[attr-defined]
        start = previous if previous is not None else 0.0
        # a negative score is divided by the factors, so a boost raises it (see _boosted)
        formula = (f"{start:.6g} x product(factors) + sum(adds)" if start >= 0 else
                   f"{start:.6g} / product(factors) + sum(adds) (a negative score is divided by the factors, so a "
                   "boost raises it)")
        if own is not None and own.signal == PIN_SIGNAL:
            if previous is None:
                origin = "not recalled, so no upstream score"
            elif details:
                origin = f"score = {formula}"
            else:
                origin = f"score {previous:.6g} carried over"
            return Explanation(value, f"pinned at rank {rank} by {self._pinning_rule(query, view, candidate.doc_id)} "
                               f"in stage '{self.id}'; {origin}", tuple(details))
        if details:
            return Explanation(value, f"score after override rules = {formula}; rank {rank}", tuple(details))
        moved = "" if own is None or arrival_rank is None or arrival_rank == rank else f" (was {arrival_rank})"
        return Explanation(value, f"score unchanged by override rules; rank {rank}{moved}")

