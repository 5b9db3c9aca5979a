"""Rule files: their schema, loading with located errors, and the compiled rule set.

A rule file is YAML owned by analysts::

    version: 1
    kind: prefilter            # or: override
    strictness: default        # strict | default | lenient (how findings of the checks are graded)
    default_deny: false        # prefilter only: acl, jurisdiction and date_range rules deny documents
                               # without their field (unless the rule sets `missing:` itself)
    rules:
      - id: hide-drafts
        description: drafts are never retrievable
        action: exclude
        match: {field: doc.status, op: eq, value: draft}

Every rule has ``id``, optional ``description``, ``enabled`` (default true), an optional validity
window ``from``/``until`` judged against the query's ``as_of`` (so a replay is stable), and an
optional query condition ``when``. Override rules also take ``priority`` (default 0, higher wins);
a prefilter rule refuses it (every prefilter rule must pass, so none outranks another). Loading
validates everything at once and reports each problem as ``file:line:col  path: message``.

The access actions (``acl``, ``jurisdiction``) compare whole values: the document's field is a
string or a list of strings (a string is a one-element list, never searched for substrings), the
user's groups / roles / jurisdictions likewise, and the document passes when one value is equal on
both sides (or is one of ``public`` / ``global``), ignoring case unless ``case_sensitive: true``.
An empty string matches nothing. A document whose field has another shape (a mapping, a nested
list, a nested path through a non-mapping) cannot be judged and is denied.

Validity windows: ``from`` is inclusive; ``until`` is inclusive when it is a date (the whole day)
and exclusive when it is a date-time. Dates without a time zone are UTC.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from difflib import get_close_matches
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.errors import ConfigError, ConfigIssue, Location
from engine.model import is_date_only, not_a_moment
from engine.yamlsource import LoadedYaml, SourceMap, load_yaml_file
from engine.strictness import NoCoercion
from rules.conditions import (
    AllOf,
    AnyOf,
    CompileError,
    Condition,
    Constant,
    Leaf,
    Node,
    Scope,
    Subject,
    Window,
    compile_condition,
    relative_date_problem,
    relative_tests,
)
from rules.expressions import parse_date
from rules.messages import analyst_issues

RULE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
FIELD_NAME_PATTERN = r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$"
_RULE_ID = re.compile(RULE_ID_PATTERN)
_FIELD_NAME = re.compile(FIELD_NAME_PATTERN)
Strictness = Literal["strict", "default", "lenient"]
Kind = Literal["prefilter", "override"]


class _Strict(NoCoercion):
    # keys as written in YAML only: `from`, `field`, `global` (never the Python names behind them)
    model_config = ConfigDict(frozen=True, extra="forbid")


def _err(message: str, shows_input: bool = False) -> PydanticCustomError:
    return PydanticCustomError("rule", message, {"shows_input": True} if shows_input else None)


def _field_name(value: Any) -> Any:
    """A metadata field named by an acl / jurisdiction / date_range rule (``acl``, ``access.groups``)."""
    if isinstance(value, str) and not _FIELD_NAME.match(value):
        raise _err(
            "not a metadata field name: write the field's key, e.g. acl or access.groups (without 'doc.'; "
            "letters, digits, '_' and '-', with '.' between nested keys)"
        )
    return value


# --------------------------------------------------------------------------- schema


class RuleBase(_Strict):
    id: str = Field(max_length=100, json_schema_extra={"pattern": RULE_ID_PATTERN},
                    description="unique in the file; ASCII letters, digits, '_', '.' and '-' (traces name it)")
    description: Optional[str] = Field(None, description="for people: why the rule exists")
    action: str
    priority: int = Field(0, ge=-1_000_000, le=1_000_000, description="higher wins among rules of one action")
    enabled: bool = Field(True, description="false: kept in the file, never applied")
    valid_from: Optional[Union[datetime, date]] = Field(None, alias="from", description="inclusive")
    until: Optional[Union[datetime, date]] = Field(
        None, description="inclusive when a date (the whole day), exclusive when a date-time"
    )
    when: Optional[Condition] = Field(None, description="condition on the query (text, entities, user, as_of)")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _RULE_ID.match(value):
            raise _err(
                "not a valid rule id: start with an ASCII letter or digit and use only ASCII letters, digits, '_', "
                "'.' and '-' (no spaces; ids appear in URLs, logs and file names)"
            )
        return value

    @field_validator("field_name", check_fields=False)  # acl, jurisdiction and date_range rules
    @classmethod
    def _field_name(cls, value: Any) -> Any:
        return _field_name(value)

    @field_validator("when", "match", mode="before", check_fields=False)
    @classmethod
    def _not_empty(cls, value: Any, info: ValidationInfo) -> Any:
        """``when:`` or ``match:`` with nothing under it (its lines commented out) reads as null, which would make
        the rule apply to every query (or document) without a word: refused."""
        if value is None:
            scope = "query" if info.field_name == "when" else "document"
            raise _err(f"'{info.field_name}' is empty (are its lines commented out?): write its condition, or remove "
                       f"the key for a rule that applies to every {scope}")
        return value

    @field_validator("valid_from", "until", mode="before")
    @classmethod
    def _date_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            parsed = parse_date(value)
            if parsed is None:
                raise _err(not_a_moment(value))
            return parsed.date() if is_date_only(value) else parsed  # a date alone: the whole (UTC) day
        return value

    @model_validator(mode="after")
    def _window(self) -> "RuleBase":
        start, end = window_bounds(self.valid_from, self.until)
        if start is not None and end is not None and start >= end:
            raise _err("the validity window is empty: 'from' is not before 'until'")
        return self


class PrefilterMatchRule(RuleBase):
    """exclude: drop documents matching ``match``; include: keep only documents matching it."""

    action: Literal["exclude", "include"]
    match: Condition = Field(description="condition on the document (query-side operands allowed)")


MISSING_POLICY = "documents without the field (absent or null); unset: deny when the file sets default_deny, else allow"


class AclRule(RuleBase):
    """A document is visible when its ACL field shares a whole value with the user's groups (or roles)."""

    action: Literal["acl"]
    field_name: str = Field("acl", alias="field", json_schema_extra={"pattern": FIELD_NAME_PATTERN},
                            description="the document's metadata field holding its ACL values")
    user_field: Literal["groups", "roles"] = Field("groups", description="the user's values it is compared with")
    public: list[str] = Field(default_factory=list, description="ACL values that make a document visible to all")
    case_sensitive: bool = Field(False, description="compare ACL values with their case (default: ignore case)")
    missing: Optional[Literal["allow", "deny"]] = Field(None, description=MISSING_POLICY)


class JurisdictionRule(RuleBase):
    """A document is visible when its jurisdiction is one of the user's, or a global value."""

    action: Literal["jurisdiction"]
    field_name: str = Field("jurisdiction", alias="field", json_schema_extra={"pattern": FIELD_NAME_PATTERN},
                            description="the document's metadata field holding its jurisdictions")
    global_values: list[str] = Field(default_factory=lambda: ["global"], alias="global",
                                     description="values that make a document visible in every jurisdiction")
    case_sensitive: bool = Field(False, description="compare jurisdictions with their case (default: ignore case)")
    missing: Optional[Literal["allow", "deny"]] = Field(None, description=MISSING_POLICY)


class DateRangeRule(RuleBase):
    """A document is visible when its date lies in the window (bounds may be relative to as_of)."""

    action: Literal["date_range"]
    field_name: str = Field("date", alias="field", json_schema_extra={"pattern": FIELD_NAME_PATTERN},
                            description="the document's metadata field holding its date")
    on_or_after: Optional[Union[datetime, date, str]] = Field(
        None, description="inclusive lower bound: an ISO date, or relative to the query's time (as_of - 15y)")
    before: Optional[Union[datetime, date, str]] = Field(
        None, description="exclusive upper bound: an ISO date, or relative (as_of + 1d)")
    missing: Optional[Literal["allow", "deny"]] = Field(None, description=MISSING_POLICY)

    @field_validator("on_or_after", "before", mode="before")
    @classmethod
    def _bound(cls, value: Any) -> Any:
        from rules.conditions import RELATIVE_DATE

        if isinstance(value, str) and not RELATIVE_DATE.match(value) and parse_date(value) is None:
            raise _err("not a date: write an ISO date (2025-01-31, 2025-01-31T12:00:00Z) or a relative one: as_of, "
                       "or as_of - or + a whole number and a unit in lower case, h (hours), d (days), w (weeks), "
                       "mo (months) or y (years), e.g. as_of - 30d, as_of - 6mo, as_of + 12h")
        problem = relative_date_problem(value)
        if problem is not None:
            raise _err(problem, shows_input=True)
        return value

    @model_validator(mode="after")
    def _bounds(self) -> "DateRangeRule":
        if self.on_or_after is None and self.before is None:
            raise _err("a date_range needs 'on_or_after', 'before' or both")
        return self


class OverrideRule(RuleBase):
    """Shared by every override action: which documents it targets."""

    docs: Optional[list[str]] = Field(None, min_length=1, description="doc ids targeted")
    match: Optional[Condition] = Field(None, description="condition on each candidate (document, scores, query)")

    @field_validator("docs", mode="before")
    @classmethod
    def _numeric_ids(cls, value: Any) -> Any:
        """``docs: [4983, 5836]`` (BEIR ids are often numbers; YAML reads them as ints) means the ids as text."""
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("docs")
    @classmethod
    def _listed_once(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            twice = sorted({d for d in value if value.count(d) > 1})
            if twice:
                raise _err(f"'{twice[0]}' is listed twice in docs (a copy-paste slip?): list each document once")
        return value

    @model_validator(mode="after")
    def _targets(self) -> "OverrideRule":
        if self.docs is None and self.match is None:
            raise _err(f"a {self.action} rule needs 'docs', 'match' or both (both: a document must satisfy both)")
        return self


class PinRule(OverrideRule):
    """pin: put the targeted documents at `position` (the first listed there, the next below it), above the ranking."""

    action: Literal["pin"]
    position: int = Field(ge=1, le=10_000, description="1-based rank of the first listed document")
    inject: bool = Field(True, description="bring in a pinned document even when recall did not return it")

    @model_validator(mode="after")
    def _pin_targets(self) -> "PinRule":
        if self.docs is None or self.match is not None:
            raise _err("a pin names its documents in 'docs' (in the order they take positions) and takes no 'match'")
        return self


class ExcludeRule(OverrideRule):
    """exclude: drop the targeted documents from the results (the trace records each drop)."""

    action: Literal["exclude"]


class BuryRule(OverrideRule):
    """bury: move the targeted documents below every result that is not buried."""

    action: Literal["bury"]


class BoostRule(OverrideRule):
    """boost/demote: new score = score × factor + add (a negative score is divided by the factor, so it moves the same
    way; all firing boosts' factors multiply, adds sum)."""

    action: Literal["boost", "demote"]
    factor: Optional[float] = Field(None, gt=0, le=1_000_000, allow_inf_nan=False)
    add: Optional[float] = Field(None, ge=-1e9, le=1e9, allow_inf_nan=False)

    @model_validator(mode="after")
    def _effect(self) -> "BoostRule":
        if self.factor is None and self.add is None:
            raise _err(f"a {self.action} needs 'factor' (multiplicative), 'add' (additive) or both")
        if self.action == "boost" and ((self.factor is not None and self.factor < 1) or (self.add is not None and self.add < 0)):
            raise _err("a boost raises scores: factor >= 1 and add >= 0 (use action: demote to lower them)")
        if self.action == "demote" and ((self.factor is not None and self.factor > 1) or (self.add is not None and self.add > 0)):
            raise _err("a demote lowers scores: factor <= 1 and add <= 0 (use action: boost to raise them)")
        if (self.factor is None or self.factor == 1) and (self.add is None or self.add == 0):
            raise _err(f"this {self.action} changes no score (factor 1, add 0): give it a factor or an add that moves "
                       "scores, or remove it")
        return self


PREFILTER_ACTIONS: dict[str, type[RuleBase]] = {
    "exclude": PrefilterMatchRule,
    "include": PrefilterMatchRule,
    "acl": AclRule,
    "jurisdiction": JurisdictionRule,
    "date_range": DateRangeRule,
}
OVERRIDE_ACTIONS: dict[str, type[RuleBase]] = {
    "exclude": ExcludeRule,
    "pin": PinRule,
    "bury": BuryRule,
    "boost": BoostRule,
    "demote": BoostRule,
}
# Precedence among override actions (lower first): exclude > pin > bury > boost/demote.
OVERRIDE_PRECEDENCE = {"exclude": 0, "pin": 1, "bury": 2, "boost": 3, "demote": 3}


class RuleFileSchema(_Strict):
    version: Literal[1] = Field(description="the format's version")
    kind: Kind = Field(description="prefilter: who may see what (before recall); override: pins, excludes, buries "
                       "and boosts on the ranked candidates")
    description: Optional[str] = Field(None, description="for people: what the file is for")
    strictness: Strictness = Field("default", description="strict: every finding is an error; lenient: a warning")
    default_deny: bool = Field(
        False, description="prefilter: acl, jurisdiction and date_range rules without their own `missing:` deny "
        "documents that lack the field"
    )
    rules: list[Any] = Field(description="the rules, in any order (precedence does not depend on it)")

    @model_validator(mode="after")
    def _kind_settings(self) -> "RuleFileSchema":
        if self.kind == "override" and self.default_deny:
            raise _err("default_deny applies to prefilter files only")
        return self


# --------------------------------------------------------------------------- compiled form


def window_bounds(start: date | datetime | None, end: date | datetime | None) -> tuple[datetime | None, datetime | None]:
    """Validity window as [start, end) in UTC; a date ``until`` covers its whole day."""
    lower = parse_date(start) if start is not None else None
    upper = None
    if end is not None:
        upper = parse_date(end)
        if upper is not None and not isinstance(end, datetime):
            try:
                upper = upper + timedelta(days=1)
            except OverflowError:  # until: 9999-12-31 -- the whole last day there is
                upper = datetime.max.replace(tzinfo=timezone.utc)
    return lower, upper


@dataclass
class CompiledRule:
    """One rule, validated and with its conditions compiled."""

    spec: RuleBase
    number: int  # position in the file's rule list
    when: Node
    match: Node | None  # document/candidate condition (None: not used by this action)
    docs: tuple[str, ...]
    start: datetime | None
    end: datetime | None
    effect: Literal["include", "exclude"] | None = None  # prefilter rules

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def action(self) -> str:
        return self.spec.action

    @property
    def priority(self) -> int:
        return self.spec.priority

    def active_at(self, as_of: datetime) -> bool:
        return (self.start is None or as_of >= self.start) and (self.end is None or as_of < self.end)

    @cached_property
    def relative_tests(self) -> tuple[tuple[str, Leaf], ...]:
        """The tests of its conditions that compare with a relative date (``as_of - 1mo``), each with its wording."""
        return tuple((test.describe(), test) for test in relative_tests(self.when) + relative_tests(self.match))

    def resolved_dates(self, as_of: datetime) -> dict[str, str]:
        """Each relative date the rule's conditions compare with, as it resolved at ``as_of`` (UTC), by the test that
        reads it (``{"doc.date ge as_of - 1mo": "2025-02-28T01:00:00+00:00"}``): for the trace, so that an auditor
        need not redo the calendar arithmetic."""
        return {wording: test.literal.resolve(as_of).isoformat() for wording, test in self.relative_tests}

    def inactive_reason(self, as_of: datetime) -> str | None:
        """Why this rule does not apply at ``as_of`` (disabled, not yet valid, expired), or None."""
        if not self.spec.enabled:
            return "disabled"
        if self.start is not None and as_of < self.start:
            return f"not valid before {self.start.isoformat()}"
        if self.end is not None and as_of >= self.end:
            return f"expired at {self.end.isoformat()}"
        return None


@dataclass
class RuleSet:
    """A loaded, compiled rule file."""

    path: str
    kind: Kind
    strictness: Strictness
    default_deny: bool
    description: str | None
    rules: list[CompiledRule]
    source: SourceMap
    sha256: str
    by_id: dict[str, CompiledRule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id = {r.id: r for r in self.rules}

    @cached_property
    def dated_rules(self) -> tuple[CompiledRule, ...]:
        """The rules that compare with a relative date, whose resolved dates each query's trace records."""
        return tuple(rule for rule in self.rules if rule.relative_tests)

    def locate(self, rule: CompiledRule | None, *path: str | int) -> Location:
        if rule is None:
            return self.source.locate(tuple(path))
        return self.source.locate(("rules", rule.number) + tuple(path))

    def dotted(self, rule: CompiledRule | None, *path: str | int) -> str:
        prefix: tuple[str | int, ...] = ("rules", rule.number) if rule is not None else ()
        return ".".join(str(p) for p in prefix + tuple(path))

    def fields(self) -> set[str]:
        """Every field path the rules read."""
        found: set[str] = set()
        for rule in self.rules:
            found |= rule.when.fields()
            if rule.match is not None:
                found |= rule.match.fields()
        return found

    def describe(self) -> dict[str, Any]:
        """What a trace records about the rule file (so a replay can tell if it changed)."""
        return {"file": self.path, "sha256": self.sha256, "kind": self.kind, "rules": len(self.rules)}


# --------------------------------------------------------------------------- loading


def load_rule_file(path: str | Path, expected_kind: Kind | None = None) -> RuleSet:
    """Load, validate and compile a rule file; every problem at once as a located ConfigError."""
    path = Path(path)
    loaded = load_yaml_file(path)
    assert loaded.sha256 is not None
    return compile_rules(loaded, loaded.sha256, expected_kind)  # the bytes parsed, read once


class RuleFileError(ConfigError):
    """A rule file with errors. ``partial`` holds the rules that did validate (None when the file's
    kind is unknown), so that the checks on a rule set can still run on them and report their
    findings with the errors: for checking only, never for running queries."""

    def __init__(self, issues: list[ConfigIssue], partial: "RuleSet | None" = None):
        super().__init__(issues)
        self.partial = partial


def compile_rules(loaded: LoadedYaml, sha256: str, expected_kind: Kind | None = None) -> RuleSet:
    """Validate and compile a loaded rule file; every problem at once as a :class:`RuleFileError`.

    A rule that fails validation does not stop the others from being checked: duplicate ids are
    found among every rule by the id as written, and the error carries the rules that validated.
    """
    data, source = loaded.data, loaded.source
    issues: list[ConfigIssue] = []
    if not isinstance(data, dict):
        raise RuleFileError([ConfigIssue(source.locate(()), "", "a rule file is a mapping with version, kind and rules")])
    if "stages" in data and "kind" not in data and "rules" not in data:
        named = [str(stage["params"]["rules"]) for stage in data["stages"] if isinstance(stage, dict)
                 and isinstance(stage.get("params"), dict) and isinstance(stage["params"].get("rules"), str)] \
            if isinstance(data["stages"], list) else []
        raise RuleFileError([ConfigIssue(source.locate(("stages",)), "", "this is a pipeline config (it has stages:), "
                                         "not a rule file: give the rule files its stages name"
                                         + (f" ({', '.join(named)}, relative to the config)" if named else "")
                                         + "; `sieve validate` checks a pipeline config and its rule files")])
    try:
        header = RuleFileSchema.model_validate(data)
    except ValidationError as exc:
        issues.extend(analyst_issues(exc, source, (), RuleFileSchema))
        header = None
    kind = data.get("kind") if data.get("kind") in ("prefilter", "override") else None
    if expected_kind is not None and kind is not None and kind != expected_kind:
        issues.append(
            ConfigIssue(source.locate(("kind",)), "kind",
                        f"this stage needs a '{expected_kind}' rule file, but this one is kind '{kind}'")
        )
    raw_rules = data.get("rules") if isinstance(data.get("rules"), list) else []
    default_deny = bool(data.get("default_deny")) if isinstance(data.get("default_deny"), bool) else False
    compiled: list[CompiledRule] = []
    first_seen: dict[str, int] = {}
    for number, raw_rule in enumerate(raw_rules):
        raw_id = raw_rule.get("id") if isinstance(raw_rule, dict) else None
        duplicate = isinstance(raw_id, str) and raw_id in first_seen
        if duplicate:
            issues.append(
                ConfigIssue(source.locate(("rules", number, "id")), f"rules.{number}.id",
                            f"duplicate rule id '{raw_id}' (first used by rules.{first_seen[raw_id]})")
            )
        elif isinstance(raw_id, str):
            first_seen[raw_id] = number
        if kind is None:
            continue  # which actions exist depends on the kind (reported above)
        rule = _compile_rule(raw_rule, number, kind, default_deny, source, issues)
        if rule is not None and not duplicate:
            compiled.append(rule)
    if any(i.severity == "error" for i in issues) or header is None:
        partial = None
        if kind is not None:
            strictness = data.get("strictness")
            partial = RuleSet(
                path=source.file,
                kind=kind,  # type: ignore[arg-type]
                strictness=strictness if strictness in ("strict", "default", "lenient") else "default",
                default_deny=default_deny,
                description=None,
                rules=compiled,
                source=source,
                sha256=sha256,
            )
        raise RuleFileError(issues, partial)
    return RuleSet(
        path=source.file,
        kind=header.kind,
        strictness=header.strictness,
        default_deny=header.default_deny,
        description=header.description,
        rules=compiled,
        source=source,
        sha256=sha256,
    )


def _compile_rule(
    raw: Any, number: int, kind: Kind, default_deny: bool, source: SourceMap, issues: list[ConfigIssue]
) -> CompiledRule | None:
    prefix: tuple[str | int, ...] = ("rules", number)
    dotted = f"rules.{number}"
    if not isinstance(raw, dict):
        issues.append(ConfigIssue(source.locate(prefix), dotted, "each rule is a mapping with id and action"))
        return None
    rule_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    named = f"rule '{rule_id}': " if rule_id else ""
    actions = PREFILTER_ACTIONS if kind == "prefilter" else OVERRIDE_ACTIONS
    action = raw.get("action")
    if action is not None and not isinstance(action, str):  # a list or mapping cannot even be looked up
        from rules.conditions import brief, shape_of

        single = action[0] if isinstance(action, list) and len(action) == 1 else None
        written = single if isinstance(single, str) and single in actions else None
        hint = f" (write action: {written}, without brackets)" if written is not None else ""
        issues.append(ConfigIssue(
            source.locate(prefix + ("action",)), f"{dotted}.action",
            f"{named}action must be one of the {kind} actions, a single name: {', '.join(actions)}; got "
            f"{shape_of(action)}, {brief(action)}{hint}"))
        return None
    if action not in actions:
        hint = get_close_matches(str(action), list(actions), n=1) if action is not None else []
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        message = (
            "required field is missing" if action is None
            else f"{named}unknown {kind} action '{action}'{did_you_mean}"
        ) + f"; {kind} actions: {', '.join(actions)}"
        where = source.locate(prefix + ("action",)) if action is not None else source.locate(prefix)
        issues.append(ConfigIssue(where, f"{dotted}.action", message))
        return None
    if kind == "prefilter" and "priority" in raw:
        issues.append(ConfigIssue(
            source.locate(prefix + ("priority",), prefer_key=True), f"{dotted}.priority",
            f"{named}'priority' has no effect in a prefilter file: a document must pass every prefilter rule, so "
            "no rule outranks another; remove it (priority orders override rules only)",
        ))
    model = actions[action]
    try:
        spec = model.model_validate(raw)
    except ValidationError as exc:
        for issue in analyst_issues(exc, source, prefix, model):
            issues.append(ConfigIssue(issue.location, issue.path, named + issue.message, issue.severity))
        return None

    def compile_at(condition: Condition | None, scope: Scope, key: str) -> Node | None:
        if condition is None:
            return None
        try:
            return compile_condition(condition, scope)
        except CompileError as exc:
            path = prefix + (key,) + exc.path
            issues.append(ConfigIssue(source.locate(path), ".".join(map(str, path)), named + exc.message))
            return None

    when = compile_at(spec.when, "query", "when")
    when_failed = spec.when is not None and when is None  # the match is still checked, then the rule dropped
    start, end = window_bounds(spec.valid_from, spec.until)
    docs: tuple[str, ...] = ()
    effect: Literal["include", "exclude"] | None = None
    match: Node | None = None
    if kind == "prefilter":
        if isinstance(spec, PrefilterMatchRule):
            match = compile_at(spec.match, "document", "match")
            if match is None:
                return None
            if match.uses_query and _has_query_expression(match):
                issues.append(
                    ConfigIssue(source.locate(prefix + ("match",)), f"{dotted}.match",
                                f"{named}an expression in a prefilter match may read only 'doc' (it is evaluated "
                                "once over the whole corpus); put query conditions in 'when' or use value_from")
                )
                return None
            effect = spec.action  # type: ignore[assignment]
        else:
            match = _sugar(spec, default_deny)
            effect = "include"
    else:
        assert isinstance(spec, OverrideRule)
        docs = tuple(spec.docs or ())
        match = compile_at(spec.match, "candidate", "match")
        if spec.match is not None and match is None:
            return None
    if when_failed:
        return None
    return CompiledRule(
        spec=spec, number=number, when=when if when is not None else Constant(True), match=match,
        docs=docs, start=start, end=end, effect=effect,
    )


def _has_query_expression(node: Node) -> bool:
    from rules.conditions import Expr, Not

    if isinstance(node, Expr):
        return node.uses_query or node.uses_candidate
    if isinstance(node, (AllOf, AnyOf)):
        return any(_has_query_expression(c) for c in node.children)
    if isinstance(node, Not):
        return _has_query_expression(node.child)
    return False


class Absent(Node):
    """The document has no value for a field (absent or null; an empty list is a value). A nested path
    through a value that is not a mapping is not absent: it is undecidable (see :class:`AccessMatch`)."""

    uses_document = True

    def __init__(self, path: str):
        self.path = path

    def evaluate(self, subject: Subject, evidence: list[dict[str, Any]] | None = None) -> bool:
        from rules.conditions import MISSING, doc_path_problem

        value = subject.get(self.path)
        result = value is MISSING or value is None
        if result and subject.document is not None and doc_path_problem(subject.document, self.path) is not None:
            result = False
        if result and evidence is not None:
            evidence.append({"field": self.path, "op": "absent"})
        return result

    def fields(self) -> set[str]:
        return {self.path}

    def describe(self) -> str:
        return f"{self.path} is absent"

    def _vector(self, table: Any, view: Any, frame: Any) -> Any:
        import numpy as np

        from rules.conditions import MISSING, note_undecidable

        codes, uniques = table.factorized(self.path)
        lookup = np.fromiter((u is MISSING or u is None for u in uniques), dtype=bool, count=len(uniques))
        result = lookup[codes]
        if self.path.count(".") >= 2:
            result = result & ~table.undecidable(self.path, "path")[0]
            note_undecidable(table, self.path, "path", view, None if frame is None else frame)
        return result if frame is None else result[frame.rows]


class AccessMatch(Node):
    """An ``acl`` / ``jurisdiction`` test: does the document's value share a *whole* value with the
    user's (``value_from``, e.g. ``user.groups``) or with fixed ones (``public`` / ``global``)?

    Both sides are a string or a list of strings (a string is a one-element list: ``"trial-investigators"``
    is not found by the group ``trial``); values are compared case-folded unless ``case_sensitive``;
    an empty (or blank) string matches nothing. Non-string elements (numbers, true/false) match nothing.
    A document value of another shape (a mapping, a list inside the list) or a nested path through a
    non-mapping cannot be judged: it matches nothing and is noted in ``view.errors``, so a prefilter
    denies it.
    """

    uses_document = True

    def __init__(self, path: str, *, value_from: str | None = None, values: Sequence[str] = (),
                 case_sensitive: bool = False):
        self.path = path
        self.value_from = value_from
        self.case_sensitive = case_sensitive
        self.values = frozenset(v for v in (self._norm(x) for x in values) if v is not None)
        self.uses_query = value_from is not None
        self._lookups: dict[Any, Any] = {}

    def _norm(self, value: Any) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return None
        # identifiers granting access compare as written (case folded): a looser form would let a group spelt with
        # another hyphen or in full-width letters grant what the document's own group does (fail closed)
        return value if self.case_sensitive else value.casefold()

    def wanted(self, view: Any) -> frozenset[str]:
        from rules.conditions import MISSING

        if self.value_from is None:
            return self.values
        raw = view.get(self.value_from)
        if raw is MISSING or raw is None:
            return frozenset()
        items = raw if isinstance(raw, (list, tuple, set, frozenset)) else [raw]
        return frozenset(v for v in (self._norm(x) for x in items) if v is not None)

    def test_value(self, value: Any, wanted: frozenset[str]) -> tuple[bool, Any]:
        from rules.conditions import MISSING

        if value is MISSING or value is None or isinstance(value, Mapping) or not wanted:
            return False, None
        for element in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(element, (list, tuple, Mapping)):
                return False, None  # a malformed value matches nothing (and is denied as undecidable)
        for element in value if isinstance(value, (list, tuple)) else [value]:
            folded = self._norm(element)
            if folded is not None and folded in wanted:
                return True, element
        return False, None

    def evaluate(self, subject: Subject, evidence: list[dict[str, Any]] | None = None) -> bool:
        hit, matched = self.test_value(subject.get(self.path), self.wanted(subject.view))
        if hit and evidence is not None:
            record: dict[str, Any] = {"field": self.path, "op": "equals one of", "matched": matched}
            if self.value_from is not None:
                record["value_from"] = self.value_from
            evidence.append(record)
        return hit

    def fields(self) -> set[str]:
        return {self.path} | ({self.value_from} if self.value_from else set())

    def describe(self) -> str:
        other = self.value_from if self.value_from is not None else "[" + ", ".join(sorted(self.values)) + "]"
        return f"{self.path} equals one of {other}" + (" (case-sensitive)" if self.case_sensitive else "")

    def unheld(self, table: Any, view: Any) -> list[tuple[str, str | None]]:
        """The user's values (``value_from``) that no document's value holds and that are none of the fixed ones
        (``public`` / ``global`` live in another node): a value that grants nothing, most likely mistyped. Each with
        the closest value the documents hold (compared as this test compares), or None."""
        from difflib import get_close_matches

        raw = view.get(self.value_from) if self.value_from is not None else None
        given = [v for v in (raw if isinstance(raw, (list, tuple, set, frozenset)) else [raw]) if isinstance(v, str)]
        if not given:
            return []
        _, uniques = table.factorized(self.path)
        held: dict[str, str] = {}  # compared form -> as a document writes it
        for value in uniques:
            for element in value if isinstance(value, (list, tuple)) else [value]:
                folded = self._norm(element)
                if folded is not None:
                    held.setdefault(folded, element)
        unheld = []
        for value in given:
            folded = self._norm(value)
            if folded is not None and folded not in held:
                close = get_close_matches(folded, list(held), n=1, cutoff=0.6)
                unheld.append((value, held[close[0]] if close else None))
        return unheld

    def _vector(self, table: Any, view: Any, frame: Any) -> Any:
        import numpy as np

        from rules.conditions import note_undecidable

        wanted = self.wanted(view)
        codes, uniques = table.factorized(self.path)
        key = (id(uniques), wanted)
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = np.fromiter((self.test_value(u, wanted)[0] for u in uniques), dtype=bool, count=len(uniques))
            if len(self._lookups) >= 256:
                self._lookups.clear()
            self._lookups[key] = lookup
        note_undecidable(table, self.path, "path", view, frame)
        note_undecidable(table, self.path, "values", view, frame)
        return lookup[codes if frame is None else codes[frame.rows]]


def missing_policy(spec: RuleBase, default_deny: bool) -> str:
    """What an access rule does with documents lacking its field: its own ``missing:``, else the file's
    ``default_deny`` (deny), else allow."""
    missing = getattr(spec, "missing", None)
    return missing if missing is not None else ("deny" if default_deny else "allow")


def _sugar(spec: RuleBase, default_deny: bool) -> Node:
    """acl / jurisdiction / date_range as the include condition they stand for."""
    missing = missing_policy(spec, default_deny)
    if isinstance(spec, (AclRule, JurisdictionRule)):
        path = f"doc.{spec.field_name}"
        if isinstance(spec, AclRule):
            own, shared = f"user.{spec.user_field}", spec.public
        else:
            own, shared = "user.jurisdictions", spec.global_values
        parts: list[Node] = [AccessMatch(path, value_from=own, case_sensitive=spec.case_sensitive)]
        if shared:
            parts.append(AccessMatch(path, values=list(shared), case_sensitive=spec.case_sensitive))
        if missing == "allow":
            parts.append(Absent(path))
        return AnyOf(parts)
    assert isinstance(spec, DateRangeRule)
    path = f"doc.{spec.field_name}"
    bounds: list[Leaf] = []
    if spec.on_or_after is not None:
        bounds.append(Leaf(Condition(field=path, op="ge", value=spec.on_or_after)))
    if spec.before is not None:
        bounds.append(Leaf(Condition(field=path, op="before", value=spec.before)))
    inside: Node = bounds[0] if len(bounds) == 1 else Window(path, bounds)
    return AnyOf([inside, Absent(path)]) if missing == "allow" else inside

