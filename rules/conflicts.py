"""Checks on rule sets, run before any query: conflicts, expired rules, fields no document has.

Two families:

- :func:`check_rules` needs only the rule file (run at compile time when the pipeline's
  directory is known, and always at warm-up): two pins competing for one slot, a pin and an
  exclude of the same document, a pin and a bury of the same document, one document pinned to
  two places, rules whose validity window has ended.
- :func:`check_against_corpus` needs the index (run at warm-up): rules reading a field no
  document has (for every prefilter rule an error whatever the strictness: a misspelt access field
  turns the rule off; for an override rule a warning; both with a did-you-mean), documents a rule
  cannot judge (a date or number comparison on a value that is not one, a nested path through a
  non-mapping, an access value that is not a string or a list of strings: a prefilter denies
  them), fields an ``eq``/``in``/``contains`` test reads whose documents hold another JSON type
  than the rule's value (``"true"`` for ``true``: undecidable) or, for ``contains``, a list on some
  documents and a string on others, ``docs`` naming ids the index does not hold, exclude/bury
  ``match`` conditions that catch a pinned document, prefilter rules that exclude every document.

:func:`check_rule_file` loads a file and runs :func:`check_rules` (and a caller's own checks, such
as ``rules.override``'s check of ``score.<stage>`` fields against the stages upstream of it) on
every rule that validated, so that a broken rule does not hide the conflicts among the others.

"Overlapping conditions" is decided conservatively: two rules are treated as able to fire for
the same query unless their validity windows are disjoint or their ``when`` conditions are
provably exclusive (e.g. ``query.language eq en`` vs ``eq fr``, ``x`` vs ``not x``,
``user.roles contains a`` vs ``not_contains a``, disjoint ``as_of`` ranges).

Each finding has a default severity, which the file's ``strictness`` adjusts: ``strict`` makes
every finding an error, ``lenient`` makes every finding a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from engine.errors import ConfigError, ConfigIssue
from engine.textform import comparable
from rules.conditions import (
    CONTAINS_OPS,
    TYPED_OPS,
    AllOf,
    AnyOf,
    Condition,
    Constant,
    Expr,
    ExpressionRuntimeError,
    Leaf,
    Node,
    Not,
    NullView,
    RelativeDate,
    brief,
    kind_of,
)
from rules.ruleset import CompiledRule, Kind, RuleFileError, RuleSet, load_rule_file

if TYPE_CHECKING:
    from rules.corpus import DocumentTable, Tally

# Query-side fields holding one value (eq on two different values cannot both hold).
SCALAR_QUERY_FIELDS = ("query.text", "query.rewritten", "query.effective", "query.language", "user.id", "as_of")


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # default severity, before strictness
    rule: CompiledRule | None
    path: tuple[str | int, ...]
    message: str
    graded: bool = True  # False: the severity stands whatever the file's strictness


def _grade(ruleset: RuleSet, finding: Finding) -> ConfigIssue:
    severity = finding.severity
    if not finding.graded:
        pass
    elif ruleset.strictness == "strict":
        severity = "error"
    elif ruleset.strictness == "lenient":
        severity = "warning"
    return ConfigIssue(
        ruleset.locate(finding.rule, *finding.path),
        ruleset.dotted(finding.rule, *finding.path),
        f"[{finding.code}] {finding.message}",
        severity,
    )


# --------------------------------------------------------------------------- overlap reasoning


def _conjuncts(node: Node) -> list[Node]:
    if isinstance(node, AllOf) and type(node) is AllOf:
        out: list[Node] = []
        for child in node.children:
            out.extend(_conjuncts(child))
        return out
    if isinstance(node, Constant) and node.value:
        return []
    return [node]


def _literal_leaf(node: Node) -> Leaf | None:
    if isinstance(node, Leaf) and node.value_from is None and not isinstance(node.literal, RelativeDate):
        return node
    return None


def _interval(leaf: Leaf) -> tuple[Any, bool, Any, bool] | None:
    """(low, low inclusive, high, high inclusive) for an order comparison with a literal."""
    value = leaf.literal
    if value is None or leaf.negated:
        return None
    if leaf.positive in ("lt", "before"):
        return (None, False, value, False)
    if leaf.positive == "le":
        return (None, False, value, True)
    if leaf.positive in ("gt", "after"):
        return (value, False, None, False)
    if leaf.positive == "ge":
        return (value, True, None, False)
    return None


def _empty(a: tuple[Any, bool, Any, bool], b: tuple[Any, bool, Any, bool]) -> bool:
    try:
        lows = [x for x in ((a[0], a[1]), (b[0], b[1])) if x[0] is not None]
        highs = [x for x in ((a[2], a[3]), (b[2], b[3])) if x[0] is not None]
        if not lows or not highs:
            return False
        low = max(lows, key=lambda x: (x[0], not x[1]))
        high = min(highs, key=lambda x: (x[0], x[1]))
        if low[0] > high[0]:
            return True
        return low[0] == high[0] and not (low[1] and high[1])
    except TypeError:
        return False


def _leaves_exclusive(x: Node, y: Node) -> bool:
    if isinstance(x, Not) and x.child.describe() == y.describe():
        return True
    if isinstance(y, Not) and y.child.describe() == x.describe():
        return True
    a, b = _literal_leaf(x), _literal_leaf(y)
    if a is None or b is None or a.field != b.field or a.case_sensitive != b.case_sensitive:
        return False
    if a.positive == b.positive and a.negated != b.negated and a.literal == b.literal and a.op != "exists":
        return True  # x vs not x
    if a.op == "exists" and b.op == "exists":
        return a.literal != b.literal
    scalar = a.field in SCALAR_QUERY_FIELDS or a.field.startswith("user.attributes.")
    if scalar and not a.negated and not b.negated:
        sets = []
        for leaf in (a, b):
            if leaf.positive == "eq":
                sets.append(frozenset([leaf.literal]))
            elif leaf.positive == "in":
                sets.append(leaf.literal)
            else:
                sets.append(None)
        if sets[0] is not None and sets[1] is not None and not (sets[0] & sets[1]):
            return True
        ia, ib = _interval(a), _interval(b)
        if ia is not None and ib is not None and _empty(ia, ib):
            return True
    return False


def conditions_exclusive(first: Node, second: Node) -> bool:
    """True only when no query can satisfy both (a sound but incomplete test)."""
    left, right = _conjuncts(first), _conjuncts(second)
    return any(_leaves_exclusive(x, y) for x in left for y in right)


def may_fire_together(first: CompiledRule, second: CompiledRule) -> bool:
    if not (first.spec.enabled and second.spec.enabled):
        return False
    if first.end is not None and second.start is not None and first.end <= second.start:
        return False
    if second.end is not None and first.start is not None and second.end <= first.start:
        return False
    return not conditions_exclusive(first.when, second.when)


def _precedence_note(first: CompiledRule, second: CompiledRule) -> tuple[str, str]:
    """(default severity, explanation) for two competing rules of the same action."""
    if first.priority != second.priority:
        winner = first if first.priority > second.priority else second
        return "warning", f"'{winner.id}' wins (higher priority){_unless_not_recalled(winner)}"
    winner = min(first, second, key=lambda r: r.id)
    return "error", (f"they have the same priority, so only the rule id decides ('{winner.id}' wins"
                     f"{_unless_not_recalled(winner)}); set priorities")


def _unless_not_recalled(pin: CompiledRule) -> str:
    """For a winning pin that does not bring documents in: it wins only when recall returns the document."""
    if pin.action == "pin" and not getattr(pin.spec, "inject", True):
        return f" when recall returns the document: '{pin.id}' has inject: false, so otherwise the other one places it"
    return ""


# --------------------------------------------------------------------------- rule-file checks


def check_rule_file(
    path: str | Path,
    kind: Kind | None = None,
    strictness: str | None = None,
    extra: Callable[[RuleSet], list[ConfigIssue]] | None = None,
) -> tuple[RuleSet | None, list[ConfigIssue]]:
    """Load a rule file and run the rule-file checks (:func:`check_rules`, then ``extra``).

    Returns (the rule set, or None when the file itself has errors; every issue, in file order:
    the file's errors and the checks' findings, graded by the strictness, errors among them). A rule
    that fails validation does not hide the others: the checks run on every rule that validated,
    and their findings are reported with the errors. ``strictness`` overrides the file's own.
    """
    try:
        ruleset: RuleSet | None = load_rule_file(path, kind)
        checked, issues = ruleset, []
    except RuleFileError as exc:
        ruleset, checked, issues = None, exc.partial, list(exc.issues)
    except ConfigError as exc:  # the YAML itself is unreadable
        return None, list(exc.issues)
    if checked is not None:
        if strictness is not None:
            checked.strictness = strictness  # type: ignore[assignment]
        issues += check_rules(checked)
        if extra is not None:
            issues += extra(checked)
    issues.sort(key=lambda i: (i.location.file, i.location.line or 0, i.location.column or 0, i.path))
    return ruleset, issues


def score_references(rule: CompiledRule) -> Iterator[tuple[tuple[str | int, ...], str, bool]]:
    """Each ``score.<stage>`` a rule's ``match`` reads: (path of the field or expression in the rule,
    stage id, whether it is read in an expression)."""

    def walk(node: Node, path: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str, bool]]:
        if isinstance(node, AllOf):
            key = "any" if isinstance(node, AnyOf) else "all"
            for i, child in enumerate(node.children):
                yield from walk(child, path + (key, i))
        elif isinstance(node, Not):
            yield from walk(node.child, path + ("not",))
        elif isinstance(node, Leaf):
            if node.field.startswith("score."):
                yield path + ("field",), node.field[len("score."):], False
        elif isinstance(node, Expr):
            for stage in sorted(node.compiled.members.get("score", ())):
                yield path + ("expr",), stage, True

    if rule.match is not None and getattr(rule.spec, "match", None) is not None:  # not the acl/... sugar
        yield from walk(rule.match, ("match",))


def check_rules(ruleset: RuleSet, today: datetime | None = None) -> list[ConfigIssue]:
    """Findings that need only the rule file, graded by the file's strictness; an expired rule is a warning
    whatever the strictness: it depends on the clock, not the file, and a query with an earlier ``as_of`` (a
    replay, a rule test) still sees it fire, so it must not stop the file loading the day after its ``until``."""
    now = today if today is not None else datetime.now(timezone.utc)
    findings: list[Finding] = []
    for rule in ruleset.rules:
        if rule.end is not None and rule.end <= now and rule.spec.enabled:
            findings.append(Finding(
                "expired", "warning", rule, ("until",),
                f"rule '{rule.id}' has expired (until {_shown_until(rule)}; now is {now.date().isoformat()}): it "
                "fires only for queries whose as_of is before then (replays, back-dated queries and rule tests); "
                "remove it once none needs it", graded=False,
            ))
    if ruleset.kind == "override":
        findings.extend(_pin_findings(ruleset))
    return sorted((_grade(ruleset, f) for f in findings), key=lambda i: (str(i.location), i.path))


def _shown_until(rule: CompiledRule) -> str:
    until = rule.spec.until
    return until.isoformat() if until is not None else "?"


def _pin_chain_findings(pins: list[CompiledRule]) -> list[Finding]:
    """A pin pushed off its position by one that was itself displaced there (p2 takes 1, so p1 takes 2, which p5
    asked for): no two pins claim one position, so ``pin_slot_conflict`` does not see it. Slots are assigned as
    ``rules.override`` does (priority, then rule id; a taken slot moves a pin to the next free one), among pins that
    may all fire together with each."""
    findings: list[Finding] = []
    order = sorted(pins, key=lambda p: (-p.priority, p.id))
    for pin in pins:
        taken: dict[int, tuple[CompiledRule, int]] = {}  # slot -> (the pin holding it, the position it asked for)
        placed: set[str] = set()
        landed: list[tuple[str, int, int]] = []
        group = [pin]  # pins that may all fire together with it (greedily, in precedence order)
        for other in order:
            if other is not pin and all(may_fire_together(other, member) for member in group):
                group.append(other)
        for other in (p for p in order if p in group):
            for offset, doc_id in enumerate(other.docs):
                if doc_id in placed:
                    continue  # a document pinned twice: the first pin places it
                requested = other.spec.position + offset  # type: ignore[attr-defined]
                slot = requested
                while slot in taken:
                    slot += 1
                taken[slot] = (other, requested)
                placed.add(doc_id)
                if other is pin:
                    landed.append((doc_id, requested, slot))
        for doc_id, requested, slot in landed:
            holder, asked = taken[requested]
            if slot != requested and asked != requested and holder is not pin:  # its own shifted documents: not news
                findings.append(Finding(
                    "pin_displaced_chain", "warning", pin, ("position",),
                    f"pin '{pin.id}' asks for position {requested} ('{doc_id}'), which '{holder.id}' takes after being "
                    f"displaced from {asked} by a pin of higher precedence; when they fire together '{doc_id}' lands "
                    f"at {slot}",
                ))
    return findings


def _pin_findings(ruleset: RuleSet) -> list[Finding]:
    findings: list[Finding] = []
    pins = [r for r in ruleset.rules if r.action == "pin"]
    for i, first in enumerate(pins):
        for second in pins[i + 1:]:
            if not may_fire_together(first, second):
                continue
            first_slots = {first.spec.position + k: d for k, d in enumerate(first.docs)}  # type: ignore[attr-defined]
            second_slots = {second.spec.position + k: d for k, d in enumerate(second.docs)}  # type: ignore[attr-defined]
            shared = sorted(set(first_slots) & set(second_slots))
            contested = [s for s in shared if first_slots[s] != second_slots[s]]
            if contested:
                severity, note = _precedence_note(first, second)
                findings.append(Finding(
                    "pin_slot_conflict", severity, second, ("position",),
                    f"pins '{first.id}' and '{second.id}' both claim position {contested[0]} "
                    f"('{first_slots[contested[0]]}' vs '{second_slots[contested[0]]}') for overlapping conditions; "
                    f"{note}",
                ))
            same_doc_elsewhere = {
                d for s, d in first_slots.items() if d in second_slots.values() and second_slots.get(s) != d
            }
            if same_doc_elsewhere:
                severity, note = _precedence_note(first, second)
                doc = sorted(same_doc_elsewhere)[0]
                findings.append(Finding(
                    "pin_doc_conflict", severity, second, ("docs",),
                    f"pins '{first.id}' and '{second.id}' put '{doc}' at different positions for overlapping "
                    f"conditions; {note}",
                ))
    findings.extend(_pin_chain_findings(pins))
    for pin in pins:
        for other in ruleset.rules:
            if other.action not in ("exclude", "bury") or other.match is not None or not may_fire_together(pin, other):
                continue
            both = sorted(set(pin.docs) & set(other.docs))
            if not both:
                continue
            if other.action == "exclude":
                findings.append(Finding(
                    "pin_exclude_conflict", "error", other, ("docs",),
                    f"'{other.id}' excludes '{both[0]}', which '{pin.id}' pins, for overlapping conditions; "
                    "exclude wins, so the pin never shows it then",
                ))
            else:
                findings.append(Finding(
                    "pin_bury_conflict", "warning", other, ("docs",),
                    f"'{other.id}' buries '{both[0]}', which '{pin.id}' pins, for overlapping conditions; "
                    "the pin wins",
                ))
    return findings


# --------------------------------------------------------------------------- corpus checks


QUERY_ENTITY_FIELDS = ("query.entities", "query.entity_labels")


def reads_query_entities(rule: CompiledRule) -> list[str]:
    """The query-entity fields ``rule`` reads (``query.entities``, ``query.entities.<LABEL>``, ``query.entity_labels``)."""
    fields = rule.when.fields() | (rule.match.fields() if rule.match is not None else set())
    return sorted(f for f in fields if f.startswith(QUERY_ENTITY_FIELDS))


def check_query_entities(ruleset: RuleSet, index: Any) -> list[ConfigIssue]:
    """A finding for each rule that reads the query's entities when the index has no entities component to
    extract them with: the condition then sees only entities a caller supplies (the Python API, rule tests).
    Graded by the file's strictness."""
    if "entities" in index.manifest["components"]:
        return []
    return [
        _grade(ruleset, Finding(
            "no_query_entities", "warning", rule, (),
            f"rule '{rule.id}' reads {', '.join(fields)}, but the index at {index.path} has no entities component to "
            "extract a query's entities with (build it with `sieve index ... --with entities`): the rule sees only "
            "entities a caller supplies (the Python API, rule tests), never a served or searched query's",
        ))
        for rule in ruleset.rules if (fields := reads_query_entities(rule))
    ]


def corpus_fields(ruleset: RuleSet) -> set[str]:
    """Every ``doc.<...>`` path the rules of ``ruleset`` read (the columns their table needs)."""
    fields: set[str] = set()
    for rule in ruleset.rules:
        fields |= rule.when.fields() | (rule.match.fields() if rule.match is not None else set())
        fields |= set(_judged_fields(rule.match))
        access_field = _access_field(ruleset, rule)
        if access_field is not None:
            fields.add(access_field)
    return {f for f in fields if f.startswith("doc.")}


def check_against_corpus(ruleset: RuleSet, table: "DocumentTable") -> list[ConfigIssue]:
    """Findings that need the index (run at warm-up), graded by the file's strictness."""
    findings: list[Finding] = []
    table.ensure(corpus_fields(ruleset))  # every column the checks and the rules read, in one pass
    broken: set[str] = set()
    for rule in ruleset.rules:
        if rule.match is None or not _static(rule.match) or not table.size:
            continue
        try:  # computed once over the corpus (and kept: the stage reuses it)
            rule.match.vector(table, NullView())
        except ExpressionRuntimeError as exc:  # as a whole, e.g. a pattern over its time limit on a document
            broken.add(rule.id)
            findings.append(Finding(
                "cannot_evaluate", "error", rule, ("match",),
                f"rule '{rule.id}' cannot be evaluated on the corpus: {exc}", graded=False,
            ))
    for rule in ruleset.rules:
        fields = rule.when.fields() | (rule.match.fields() if rule.match is not None else set())
        access_field = _access_field(ruleset, rule)
        if access_field is not None and table.size and not table.has_field(access_field):
            findings.append(_unknown_access_field(rule, access_field, table))
        sites = leaf_sites(rule)
        where: dict[str, tuple[str | int, ...]] = {}
        for leaf, path in sites:
            where.setdefault(leaf.field, path + ("field",))
        for name in sorted(f for f in fields if f.startswith("doc.") and f != access_field):
            if not table.has_field(name):
                findings.append(_unknown_field(
                    ruleset, rule, name, where.get(name, ("match",) if rule.match is not None else ()), table))
        findings.extend(_value_type_findings(ruleset, rule, sites, table))
        for number, doc_id in enumerate(rule.docs):
            if doc_id not in table.row_of:
                findings.append(Finding(
                    "unknown_document", "warning", rule, ("docs", number),
                    f"rule '{rule.id}' names document '{doc_id}', which the index does not hold",
                ))
        findings.extend(_undecidable_findings(ruleset, rule, table))
    if ruleset.kind == "override":
        findings.extend(_pin_match_findings(ruleset, table, broken))
    else:
        findings.extend(_prefilter_findings(ruleset, table, broken))
    return sorted((_grade(ruleset, f) for f in findings), key=lambda i: (str(i.location), i.path))


ACCESS_ACTIONS = ("acl", "jurisdiction", "date_range")


def _access_field(ruleset: RuleSet, rule: CompiledRule) -> str | None:
    """``doc.<field>`` of a prefilter's acl / jurisdiction / date_range rule (None for other rules)."""
    if ruleset.kind != "prefilter" or rule.action not in ACCESS_ACTIONS:
        return None
    return f"doc.{rule.spec.field_name}"  # type: ignore[attr-defined]


def close_field(path: str, table: "DocumentTable") -> str | None:
    """The ``doc.<...>`` field of the index nearest to ``path`` (same depth), for a did-you-mean; None if none is
    close."""
    from difflib import get_close_matches

    known = table.field_names(path)
    if path.count(".") == 1:
        known = sorted(set(known) | {"doc.id", "doc.title", "doc.text"})
    by_name = {f[len("doc."):]: f for f in known}
    hint = get_close_matches(path[len("doc."):], list(by_name), n=1, cutoff=0.6)
    return by_name[hint[0]] if hint else None


def _unknown_field(
    ruleset: RuleSet, rule: CompiledRule, name: str, path: tuple[str | int, ...], table: "DocumentTable"
) -> Finding:
    """A rule reading a field no document has (a misspelling, most often). In a prefilter rule an error whatever the
    strictness: every document would lack the field, so the rule would silently judge none by it (an exclude hides
    nothing). In an override rule a warning (overrides fail open: the rule simply never fires on it)."""
    hint = close_field(name, table)
    did_you_mean = f" (did you mean '{hint}'?)" if hint else ""
    known = ", ".join(sorted(table.metadata_keys)[:20]) or "none"
    if ruleset.kind == "prefilter" and table.size:
        return Finding(
            "unknown_access_field", "error", rule, path,
            f"rule '{rule.id}' ({rule.action}) reads '{name}', which no document of the index has{did_you_mean}; "
            f"metadata fields: {known}. An access rule on a field no document has judges every document as lacking "
            "it (the rule is silently off, or hides every document), so this is an error whatever the strictness",
            graded=False,
        )
    return Finding(
        "unknown_field", "warning", rule, path,
        f"rule '{rule.id}' reads '{name}', which no document in the index has{did_you_mean}; metadata fields: "
        f"{known}. The condition can never see a value, so the rule never fires on a value of it",
    )


def _unknown_access_field(rule: CompiledRule, path: str, table: "DocumentTable") -> Finding:
    """A prefilter access rule on a field no document has: the rule sees no value anywhere, so it either
    lets every document through (missing: allow) or hides every one. Always an error."""
    name = path[len("doc."):]
    known = [f[len("doc."):] for f in table.field_names(path)]
    hint = close_field(path, table)
    did_you_mean = f" (did you mean '{hint[len('doc.'):]}'?)" if hint else ""
    shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "none"
    return Finding(
        "unknown_access_field", "error", rule, ("field",),
        f"rule '{rule.id}' ({rule.action}) reads the field '{name}', which no document of the index has"
        f"{did_you_mean}; fields of the index: {shown}. An access rule on a missing field would judge no "
        "document by it (every document would count as lacking it), so this is an error whatever the strictness",
        graded=False,
    )


def leaf_sites(rule: CompiledRule) -> list[tuple[Leaf, tuple[str | int, ...]]]:
    """The field tests of a rule's ``match`` as written, each with its path in the rule (``match.any.0``), so a
    finding points at the line of the test itself. (acl / jurisdiction / date_range rules have none.)"""
    spec = getattr(rule.spec, "match", None)
    found: list[tuple[Leaf, tuple[str | int, ...]]] = []

    def walk(condition: Condition, node: Node, path: tuple[str | int, ...]) -> None:
        if condition.all is not None and isinstance(node, AllOf):
            for number, (inner, child) in enumerate(zip(condition.all, node.children)):
                walk(inner, child, path + ("all", number))
        elif condition.any is not None and isinstance(node, AnyOf):
            for number, (inner, child) in enumerate(zip(condition.any, node.children)):
                walk(inner, child, path + ("any", number))
        elif condition.not_ is not None and isinstance(node, Not):
            walk(condition.not_, node.child, path + ("not",))
        elif isinstance(node, Leaf):
            found.append((node, path))

    if isinstance(spec, Condition) and rule.match is not None:
        walk(spec, rule.match, ("match",))
    return found


# Fields every document has as text: their shape and type never vary
_TEXT_FIELDS = ("doc.id", "doc.title", "doc.text")


def _value_type_findings(
    ruleset: RuleSet, rule: CompiledRule, sites: list[tuple[Leaf, tuple[str | int, ...]]], table: "DocumentTable",
) -> list[Finding]:
    """The ``eq`` / ``in`` / ``contains`` tests on a field whose documents hold another JSON type than the rule's
    value (``"true"`` for ``true``, ``"40"`` for ``40``: never coerced, so undecidable) or, with a ``value_from``,
    several types; and the ``contains`` tests on a field that is a list on some documents and a string on others
    (whole elements there, substrings here)."""
    findings: list[Finding] = []
    if not table.size:
        return findings
    denied = ("the prefilter denies such a document whenever the rule applies" if ruleset.kind == "prefilter"
              else "the rule does not fire on it")
    reported: set[tuple[str, str]] = set()
    for leaf, path in sites:
        name = leaf.field
        if leaf.positive not in TYPED_OPS or not name.startswith("doc.") or name in _TEXT_FIELDS:
            continue
        profile = table.profile(name)
        if leaf.positive in CONTAINS_OPS and {"a list", "a string"} <= set(profile.shapes) \
                and (name, "shape") not in reported:
            reported.add((name, "shape"))
            lists, strings = profile.shapes["a list"], profile.shapes["a string"]
            whole = {"contains": "op: eq", "not_contains": "op: ne", "contains_any": "op: in",
                     "contains_all": "an all: of op: eq tests"}[leaf.op]
            findings.append(Finding(
                "mixed_shapes", "warning", rule, path + ("field",),
                f"rule '{rule.id}' tests {name} with {leaf.op}, which finds whole elements in a list but substrings in "
                f"a string, and the documents mix the two: {lists.count} hold a list (e.g. '{lists.doc_id}'), "
                f"{strings.count} a string (e.g. '{strings.doc_id}': {brief(strings.value)}); on a string a value is "
                f"also found inside a longer one{_inside(leaf, strings.value)}. To compare whole values whatever the "
                f"shape, use {whole} (a string is one value, a list matches by any element), or export the field as a "
                "list on every document",
            ))
        if leaf.value_from is None:
            literal = leaf.literal
            wanted = {k for k in map(kind_of, literal if isinstance(literal, frozenset) else (literal,)) if k}
            compared = f"{brief(leaf.raw_value)} ({' or '.join(sorted(wanted))})"
        elif leaf.value_from != "as_of":  # the query's and the user's values are text
            wanted = {"a string"}
            compared = f"the query's {leaf.value_from} (a string: the query's and the user's values are text)"
        else:
            continue
        other = {kind: tally for kind, tally in profile.kinds.items() if kind not in wanted}
        if not wanted or not other or (name, types := " or ".join(sorted(wanted))) in reported:
            continue
        holding = sum(tally.count for kind, tally in profile.kinds.items() if kind in wanted)
        opening = (f"rule '{rule.id}' compares {name} ({leaf.op}) with {compared}, but documents hold other types "
                   f"there: {_held(other)}" + (f"; {holding} hold {types}" if holding else ""))
        reported.add((name, types))
        findings.append(Finding(
            "mixed_types", "warning", rule, path + ("field",),
            f"{opening}. Values are not coerced ('40' is not 40, 'true' is not true): a document whose value has "
            f"another type than the rule's cannot be judged: {denied}; write {name} as {types} on every document (or "
            "compare with the type the documents hold)",
        ))
    return findings


def _inside(leaf: Leaf, text: Any) -> str:
    """`` ('all' is found in 'BALL')`` when one of the test's values is inside ``text`` without being all of it."""
    needles = leaf.literal if isinstance(leaf.literal, frozenset) else (leaf.literal,)
    if not isinstance(text, str):
        return ""
    folded = comparable(text, case_sensitive=leaf.case_sensitive)
    for needle in sorted(n for n in needles if isinstance(n, str)):
        if needle and needle in folded and needle != folded:
            return f" ({needle!r} is found in {text!r})"
    return ""


def _held(kinds: dict[str, "Tally"]) -> str:
    """``3 a string (e.g. 'd1': 'true'), 1 a number (e.g. 'd4': 1)``, the most common first."""
    ordered = sorted(kinds.items(), key=lambda item: (-item[1].count, item[0]))
    return ", ".join(f"{tally.count} {kind} (e.g. '{tally.doc_id}': {brief(tally.value)})" for kind, tally in ordered)


def _judged_fields(node: Node | None) -> dict[str, set[str]]:
    """The ``doc.<...>`` paths a compiled condition reads, each with how it judges them (``path``, ``date``,
    ``number``, ``values``; see :meth:`rules.corpus.DocumentTable.undecidable`)."""
    from rules.ruleset import Absent, AccessMatch

    found: dict[str, set[str]] = {}

    def walk(item: Node) -> None:
        if isinstance(item, AllOf):
            for child in item.children:
                walk(child)
        elif isinstance(item, Not):
            walk(item.child)
        elif isinstance(item, AccessMatch):
            found.setdefault(item.path, set()).update({"path", "values"})
        elif isinstance(item, Absent):
            found.setdefault(item.path, set()).add("path")
        elif isinstance(item, Leaf) and item.field.startswith("doc."):
            modes = found.setdefault(item.field, {"path"})
            if item.positive in ("lt", "le", "gt", "ge", "before", "after"):
                if item.value_from is None:
                    if item.literal is not None:
                        modes.add("date" if item.date_operand else "number")
                elif item.value_from == "as_of":
                    modes.add("date")

    if node is not None:
        walk(node)
    return found


def _undecidable_findings(ruleset: RuleSet, rule: CompiledRule, table: "DocumentTable") -> list[Finding]:
    """Documents a rule cannot judge: a date/number comparison on a value that is not one, a nested path
    through a value that is not a mapping, an access value that is not a string or a list of strings."""
    findings = []
    consequence = ("the prefilter denies them whenever the rule applies (it cannot judge them)"
                   if ruleset.kind == "prefilter" else "the rule does not fire on them")
    where = ("field",) if getattr(rule.spec, "match", None) is None and ruleset.kind == "prefilter" else ("match",)
    for path, modes in sorted(_judged_fields(rule.match).items()):
        reasons: dict[int, str] = {}
        for mode in sorted(modes):
            if mode == "path" and path.count(".") < 2:
                continue
            for row, reason in table.undecidable(path, mode)[1]:
                reasons.setdefault(row, reason)
        if not reasons:
            continue
        shown = [reasons[row] for row in sorted(reasons)[:3]]
        findings.append(Finding(
            "undecidable_values", "warning", rule, where,
            f"rule '{rule.id}' cannot judge {path} on {len(reasons)} document(s): {'; '.join(shown)}"
            f"{'; ...' if len(reasons) > len(shown) else ''}; {consequence}",
        ))
    return findings


def _static(node: Node) -> bool:
    return not (node.uses_query or node.uses_candidate)


def _pin_match_findings(ruleset: RuleSet, table: "DocumentTable", broken: set[str] = frozenset()) -> list[Finding]:
    """Exclude / bury ``match`` conditions that catch a pinned document, judged as the stage judges them (over the
    corpus, so a document the condition cannot judge -- an expression that fails, a value of another type -- is
    reported as such, not as "no match")."""
    findings: list[Finding] = []
    pins = [r for r in ruleset.rules if r.action == "pin"]
    for pin in pins:
        for other in ruleset.rules:
            if other.action not in ("exclude", "bury") or other.match is None or other.id in broken \
                    or not may_fire_together(pin, other):
                continue
            if not _static(other.match):
                continue  # depends on the query or scores: cannot be decided before a query
            view = NullView()
            try:
                matched = other.match.vector(table, view)  # once over the corpus (cached); failures in view.errors
            except ExpressionRuntimeError:
                continue  # reported as cannot_evaluate
            failed: dict[int, str] = {}
            for row, message in view.errors:
                failed.setdefault(row, message)
            for doc_id in pin.docs:
                row = table.row_of.get(doc_id)
                if row is None or (other.docs and doc_id not in other.docs):
                    continue
                if row in failed:
                    if other.action == "exclude":
                        findings.append(Finding(
                            "pin_exclude_conflict", "warning", other, ("match",),
                            f"'{other.id}' cannot be evaluated on '{doc_id}', which '{pin.id}' pins ({failed[row]}); it "
                            "does not fire on it when recalled, and keeps it out when the pin would bring it in",
                        ))
                    continue
                if matched[row]:
                    code, severity, outcome = (
                        ("pin_exclude_conflict", "error", "exclude wins, so the pin never shows it then")
                        if other.action == "exclude" else ("pin_bury_conflict", "warning", "the pin wins")
                    )
                    findings.append(Finding(
                        code, severity, other, ("match",),
                        f"'{other.id}' matches '{doc_id}', which '{pin.id}' pins, for overlapping conditions; {outcome}",
                    ))
    return findings


def _prefilter_findings(ruleset: RuleSet, table: "DocumentTable", broken: set[str] = frozenset()) -> list[Finding]:
    findings: list[Finding] = []
    if table.size == 0:
        return findings
    for rule in ruleset.rules:
        if rule.match is None or not _static(rule.match) or not rule.spec.enabled or rule.id in broken:
            continue
        matched = rule.match.vector(table, NullView())
        removed = int(matched.sum()) if rule.effect == "exclude" else int((~matched).sum())
        if removed == table.size:
            findings.append(Finding(
                "excludes_everything", "warning", rule, ("match",),
                f"rule '{rule.id}' excludes all {table.size} documents whenever it applies",
            ))
    return findings
