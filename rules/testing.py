"""Analysts' regression tests for their rules, written next to the rule files.

A test file (``*.tests.yaml``) names a pipeline and lists cases: a query, who asks, when, and
what must (not) come back::

    version: 1
    pipeline: pipeline.yaml           # relative to this file
    corpus: ../../examples/medical    # optional: build a fresh index from this corpus for the run
    gazetteer: entities.yaml          # optional, with corpus: its entities component too (query.entities rules)
    index_settings: {bm25: {tokenizer: {language: zh}}}   # optional, with corpus: as `sieve index --settings`
    as_of: 2025-06-01                 # default query time for every case (replays are stable)
    cases:
      - name: the FDA alert leads metformin queries
        query: metformin kidney function
        user: {roles: [clinician], groups: [public], jurisdictions: [US]}
        expect:
          - {doc: med-003, rank: 1}
          - {doc: med-025, max_rank: 5}
          - {doc: med-006, absent: true}
          - {doc: med-002, below: med-001}
          - {fired: pin-fda-metformin-alert}
          - {not_fired: pin-sema-brochure}

Expectation kinds: ``rank`` (exactly), ``max_rank`` (at rank k or better), ``absent`` (never
returned), ``present``, ``below`` (both returned, this one ranked lower), ``fired`` /
``not_fired`` (an override rule pinned, buried, excluded, boosted or demoted at least one of the
query's candidates; read from the override stage's complete ``fired_rules``, not from its firing
list, which ``max_traced_firings`` cuts). ``fired`` / ``not_fired`` on an access (prefilter) rule is
refused at load: the rule masks the whole corpus before recall, so whether it hid some document
anywhere says nothing about the query; test what it hides with ``absent`` and a contrasting case
for a user it lets through.

A case's ``entities`` stand for the ones extraction would find: ``{text, label}`` and, for a
gazetteer entity, its canonical ``id`` (``{text: Glucophage, label: DRUG, id: metformin}``), which
rules on ``query.entities`` read as production does.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.config import issues_from_validation
from engine.errors import ConfigError, ConfigIssue, Location
from engine.yamlsource import SourceMap, load_yaml_file, path_problem
from engine.strictness import IsoMoment, NoCoercion
from rules.expressions import parse_date

TEST_FILE_SUFFIX = ".tests.yaml"


class _Strict(NoCoercion):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UserSpec(_Strict):
    id: Optional[str] = None
    roles: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    jurisdictions: list[str] = Field(default_factory=list)
    attributes: dict[str, str] = Field(default_factory=dict)


class EntitySpec(_Strict):
    text: str
    label: str
    id: Optional[str] = Field(None, description="the gazetteer's canonical id (Glucophage -> metformin), as "
                              "extraction supplies it; rules on query.entities read it too")


def _id_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Expectation(_Strict):
    doc: Optional[str] = None
    rank: Optional[int] = Field(None, ge=1)
    max_rank: Optional[int] = Field(None, ge=1)
    absent: Optional[bool] = None
    present: Optional[bool] = None
    below: Optional[str] = None
    fired: Optional[str] = None
    not_fired: Optional[str] = None

    @field_validator("doc", "below", mode="before")
    @classmethod
    def _numeric_ids(cls, value: Any) -> Any:
        return _id_text(value)  # BEIR ids are often numbers; YAML reads them as ints

    @model_validator(mode="after")
    def _one_check(self) -> "Expectation":
        checks = [n for n in ("rank", "max_rank", "absent", "present", "below", "fired", "not_fired")
                  if getattr(self, n) is not None]
        if len(checks) != 1:
            raise PydanticCustomError(
                "expectation",
                "an expectation has exactly one of rank, max_rank, absent, present, below, fired, not_fired "
                f"(found: {', '.join(checks) or 'none'})",
            )
        needs_doc = checks[0] not in ("fired", "not_fired")
        if needs_doc and self.doc is None:
            raise PydanticCustomError("expectation", f"'{checks[0]}' needs 'doc' (the document it is about)")
        if not needs_doc and self.doc is not None:
            raise PydanticCustomError("expectation", f"'{checks[0]}' is about a rule; it takes no 'doc'")
        if checks[0] in ("absent", "present") and getattr(self, checks[0]) is not True:
            raise PydanticCustomError("expectation", f"write '{checks[0]}: true'")
        return self


class Case(_Strict):
    name: str = Field(min_length=1)
    query: str = Field(min_length=1)
    history: list[str] = Field(default_factory=list)
    user: UserSpec = Field(default_factory=UserSpec)
    as_of: Optional[IsoMoment] = None
    entities: list[EntitySpec] = Field(default_factory=list)
    expect: list[Expectation] = Field(min_length=1)


class RuleTestFile(_Strict):
    version: int = Field(ge=1, le=1)
    pipeline: str = Field(description="pipeline YAML, relative to this file")
    corpus: Optional[str] = Field(None, description="build a fresh BM25 index from this BEIR corpus for the run")
    gazetteer: Optional[str] = Field(
        None, description="with corpus: also build the entities component with this gazetteer (relative to this "
        "file), for rules that read the query's entities (query.entities.<LABEL>)"
    )
    index_settings: Optional[dict[str, dict[str, Any]]] = Field(
        None, description="with corpus: settings of the index built for the run, as `sieve index --settings` takes "
        "them, e.g. {bm25: {tokenizer: {language: zh}}} for Chinese (else an English BM25 index is built)"
    )
    index: Optional[str] = Field(None, description="index directory to use instead of the pipeline's")
    as_of: Optional[IsoMoment] = Field(None, description="default query time of every case")
    cases: list[Case] = Field(min_length=1)

    @model_validator(mode="after")
    def _index_source(self) -> "RuleTestFile":
        if self.corpus is not None and self.index is not None:
            raise PydanticCustomError("test_file", "give 'corpus' or 'index', not both")
        if self.gazetteer is not None and self.corpus is None:
            raise PydanticCustomError("test_file", "'gazetteer' goes with 'corpus' (the index built for the run)")
        if self.index_settings is not None:
            if self.corpus is None:
                raise PydanticCustomError("test_file", "'index_settings' go with 'corpus' (the index built for the run)")
            extra = sorted(set(self.index_settings) - {"bm25", "entities"})
            if extra:
                raise PydanticCustomError("test_file", "index_settings for {names}: the index built for the run has "
                                          "bm25 and, with gazetteer, entities", {"names": ", ".join(extra)})
            if "entities" in self.index_settings and self.gazetteer is None:
                raise PydanticCustomError("test_file", "index_settings for entities need 'gazetteer'")
        return self


@dataclass
class CaseResult:
    name: str
    location: Location
    failures: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class FileResult:
    path: str
    cases: list[CaseResult]

    @property
    def failed(self) -> int:
        return sum(1 for c in self.cases if not c.passed)


def discover(paths: list[Path]) -> list[Path]:
    """Test files among ``paths`` (files as given; directories searched for ``*.tests.yaml``)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(path.rglob(f"*{TEST_FILE_SUFFIX}")))
        else:
            found.append(path)
    return found


def load_test_file(path: Path) -> tuple[RuleTestFile, SourceMap]:
    loaded = load_yaml_file(path)
    if not isinstance(loaded.data, dict):
        raise ConfigError([ConfigIssue(loaded.source.locate(()), "", "a rule test file is a mapping with pipeline and cases")])
    try:
        spec = RuleTestFile.model_validate(loaded.data)
    except ValidationError as exc:
        raise ConfigError(issues_from_validation(exc, loaded.source, (), RuleTestFile)) from None
    issues = _index_settings_issues(spec, loaded.source)
    for key in ("pipeline", "corpus", "gazetteer", "index"):  # paths no file system can open: said here, located
        written = getattr(spec, key)
        problem = path_problem(written) if written is not None else None
        if problem is not None:
            issues.append(ConfigIssue(loaded.source.locate((key,)), key, problem))
    for number, case in enumerate(spec.cases):
        if case.as_of is None and spec.as_of is None:
            issues.append(ConfigIssue(loaded.source.locate(("cases", number)), f"cases.{number}.as_of",
                                      "no as_of for this case and no file-wide as_of: rule tests need a fixed time"))
    if issues:
        raise ConfigError(issues)
    return spec, loaded.source


def _index_settings_issues(spec: RuleTestFile, source: SourceMap) -> list[ConfigIssue]:
    """``index_settings`` checked as ``sieve index --settings`` checks its file (engine.index's settings models), each
    problem located in this file (``index_settings.bm25.k1``), before anything is built. The gazetteer is the file's own
    ``gazetteer:`` (opened when the index is built); one given in the settings too would be replaced, so it is
    refused."""
    from engine.index import check_index_settings

    if spec.index_settings is None:
        return []
    at = ("index_settings",)
    issues: list[ConfigIssue] = []
    components: dict[str, Any] = {"bm25": spec.index_settings.get("bm25") or {}}
    if "entities" in spec.index_settings:
        entities = dict(spec.index_settings["entities"])
        if "gazetteer" in entities:
            issues.append(ConfigIssue(
                source.locate(at + ("entities", "gazetteer"), prefer_key=True), "index_settings.entities.gazetteer",
                "the gazetteer of the index built for the run is the file's own 'gazetteer:' (this one would be "
                "replaced by it): remove it here"))
        entities["gazetteer"] = spec.gazetteer  # checked, not opened: the file is read when the index is built
        components["entities"] = entities
    try:
        check_index_settings(components, _under(source, at), files=False)
    except ConfigError as exc:
        issues.extend(dataclasses.replace(issue, path=".".join(("index_settings", issue.path)) if issue.path
                                          else "index_settings") for issue in exc.issues)
    return issues


def _under(source: SourceMap, at: tuple[str | int, ...]) -> SourceMap:
    """The part of ``source`` at and under ``at``, its paths relative to ``at`` (for a check of the value there that
    locates its problems by its own paths)."""
    inner = SourceMap(source.file)
    for table, files, inner_table, inner_files in (
            (source.values, source.value_files, inner.values, inner.value_files),
            (source.keys, source.key_files, inner.keys, inner.key_files)):
        for path, place in table.items():
            if path[:len(at)] == at:
                inner_table[path[len(at):]] = place
                if path in files:
                    inner_files[path[len(at):]] = files[path]
    return inner


def run_test_file(path: Path, name_filter: str | None = None) -> FileResult:
    """Run every case of one test file; ConfigError for a broken test, pipeline or rule file."""
    from engine.compiler import compile_file
    from engine.index import build_index
    from engine.pipeline import Pipeline

    spec, source = load_test_file(path)
    base = path.resolve().parent
    compiled = compile_file(base / spec.pipeline)
    with tempfile.TemporaryDirectory(prefix="sieve-rule-tests-") as scratch:
        index_path: Path | None = None
        if spec.corpus is not None:
            index_path = Path(scratch) / "index"
            given = spec.index_settings or {}
            components: dict[str, dict[str, Any]] = {"bm25": dict(given.get("bm25") or {})}
            if spec.gazetteer is not None:
                components["entities"] = {**(given.get("entities") or {}), "gazetteer": str(base / spec.gazetteer)}
            build_index(base / spec.corpus, index_path, components)
        elif spec.index is not None:
            index_path = base / spec.index
        with Pipeline(compiled, index_path=index_path) as pipeline:
            _check_names(pipeline, spec, source)
            results = [_run_case(pipeline, spec, case, source, number) for number, case in enumerate(spec.cases)
                       if name_filter is None or name_filter.casefold() in case.name.casefold()]
    return FileResult(str(path), results)


_NEVER_FAILS = "the expectation could never fail"
_NEVER_PASSES = "the expectation could never pass"


def _check_names(pipeline: Any, spec: RuleTestFile, source: SourceMap) -> None:
    """Every document and rule a case names must exist: an expectation about a document the index does not
    hold or a rule no rule file defines would pass whatever the rules do ('absent', 'not_fired') or never pass
    ('rank', 'present', 'fired', ...). And 'fired' / 'not_fired' are about override rules only."""
    resources = pipeline.warm_up()
    index = resources.index
    override_ids: set[str] = set()
    prefilter_ids: set[str] = set()
    for stage in pipeline.compiled.stages.values():
        ruleset = getattr(stage, "_ruleset", None)
        if ruleset is not None:
            (prefilter_ids if ruleset.kind == "prefilter" else override_ids).update(rule.id for rule in ruleset.rules)
    suggest = _doc_suggester(index) if index is not None else None
    issues = []
    for number, case in enumerate(spec.cases):
        for k, expectation in enumerate(case.expect):
            for key in ("doc", "below"):
                doc_id = getattr(expectation, key)
                if doc_id is not None and index is not None and index.row_of(doc_id) is None:
                    outcome = _NEVER_FAILS if expectation.absent else _NEVER_PASSES
                    hint = suggest(doc_id) if suggest is not None else None
                    issues.append(ConfigIssue(
                        source.locate(("cases", number, "expect", k, key)), f"cases.{number}.expect.{k}.{key}",
                        f"document '{doc_id}' is not in the index ({index.doc_count} documents): {outcome}"
                        + (f"; did you mean '{hint}'?" if hint else "")))
            for key in ("fired", "not_fired"):
                rule_id = getattr(expectation, key)
                if rule_id is None or rule_id in override_ids:
                    continue
                where = source.locate(("cases", number, "expect", k, key))
                if rule_id in prefilter_ids:
                    issues.append(ConfigIssue(
                        where, f"cases.{number}.expect.{k}.{key}",
                        f"rule '{rule_id}' is an access (prefilter) rule: it masks documents across the whole corpus "
                        f"before recall, so '{key}' would say nothing about this query (it held whenever the rule hid "
                        "any document anywhere). Test what it hides from this user with {doc: ID, absent: true}, "
                        "and add a case for a user it lets through where that document is returned "
                        "(present, rank, max_rank); 'fired' / 'not_fired' are for override rules"))
                    continue
                known = ", ".join(sorted(override_ids)) or "none"
                hint = _close(rule_id, sorted(override_ids))
                issues.append(ConfigIssue(
                    where, f"cases.{number}.expect.{k}.{key}",
                    f"no rule '{rule_id}' in the pipeline's rule files: "
                    f"{_NEVER_FAILS if key == 'not_fired' else _NEVER_PASSES} (override rules: {known})"
                    + (f"; did you mean '{hint}'?" if hint else "")))
    if issues:
        raise ConfigError(issues)


def _close(name: str, known: list[str]) -> str | None:
    """The known name that differs from ``name`` only in case, else the closest one (difflib), else None."""
    from difflib import get_close_matches

    folded = name.casefold()
    for candidate in known:
        if candidate.casefold() == folded:
            return candidate
    found = get_close_matches(name, known, n=1, cutoff=0.75)
    return found[0] if found else None


_FUZZY_DOC_LIMIT = 200_000  # difflib over more ids than this is slow; case-insensitive matches are still found


def _doc_suggester(index: Any) -> Any:
    """A did-you-mean for document ids the index does not hold (built on first use, once per file)."""
    state: dict[str, Any] = {}

    def suggest(doc_id: str) -> str | None:
        from difflib import get_close_matches

        if "folded" not in state:
            ids = index.doc_ids()
            state["ids"] = ids
            state["folded"] = {}
            for known in ids:
                state["folded"].setdefault(known.casefold(), known)
        same = state["folded"].get(doc_id.casefold())
        if same is not None:
            return same
        if len(state["ids"]) > _FUZZY_DOC_LIMIT:
            return None
        found = get_close_matches(doc_id, state["ids"], n=1, cutoff=0.75)
        return found[0] if found else None

    return suggest


def _run_case(pipeline: Any, spec: RuleTestFile, case: Case, source: SourceMap, number: int) -> CaseResult:
    from engine.model import UserContext

    when = parse_date(case.as_of if case.as_of is not None else spec.as_of)
    assert when is not None
    user = UserContext(
        user_id=case.user.id, roles=tuple(case.user.roles), groups=tuple(case.user.groups),
        jurisdictions=tuple(case.user.jurisdictions), attributes=dict(case.user.attributes),
    )
    query = pipeline.make_query(case.query, history=tuple(case.history), user=user, as_of=when)
    if case.entities:
        query = query.model_copy(update={"entities": tuple(_entity(e) for e in case.entities)})
    outcome = pipeline.run(query)
    returned = [c.doc_id for c in outcome.results]
    ranks = {doc_id: rank for rank, doc_id in enumerate(returned, start=1)}
    fired = _fired_rules(outcome.trace)
    result = CaseResult(case.name, source.locate(("cases", number)), results=returned)
    for k, expectation in enumerate(case.expect):
        problem = _check(expectation, ranks, fired)
        if problem is not None:
            where = source.locate(("cases", number, "expect", k))
            result.failures.append(f"{where}  {problem}")
    if result.failures:
        shown = ", ".join(f"{r}:{d}" for d, r in list(ranks.items())[:10]) or "nothing"
        result.failures.append(f"returned: {shown}")
    return result


def _entity(spec: EntitySpec) -> dict[str, Any]:
    """A test entity as extraction represents a query entity (stages.rules._view): text, id, label."""
    entity: dict[str, Any] = {"text": spec.text, "label": spec.label}
    if spec.id is not None:
        entity["id"] = spec.id
    return entity


def _fired_rules(trace: dict[str, Any]) -> set[str]:
    """The override rules that fired: the stages' complete ``fired_rules`` (the firing list is cut to
    ``max_traced_firings``; it is read only from a trace that predates ``fired_rules``)."""
    fired: set[str] = set()
    for stage in trace.get("stages", []):
        details = stage.get("details") or {}
        if "fired_rules" in details:
            fired.update(rule for rule, count in details["fired_rules"].items() if count > 0)
        else:
            fired.update(firing["rule"] for firing in details.get("firings", []))
    return fired


def _check(expectation: Expectation, ranks: dict[str, int], fired: set[str]) -> str | None:
    doc = expectation.doc
    got = ranks.get(doc) if doc is not None else None
    shown = f"rank {got}" if got is not None else "not returned"
    if expectation.rank is not None and got != expectation.rank:
        return f"expected '{doc}' at rank {expectation.rank}, got {shown}"
    if expectation.max_rank is not None and (got is None or got > expectation.max_rank):
        return f"expected '{doc}' at rank {expectation.max_rank} or better, got {shown}"
    if expectation.absent and got is not None:
        return f"expected '{doc}' never to be returned, got rank {got}"
    if expectation.present and got is None:
        return f"expected '{doc}' to be returned, it was not"
    if expectation.below is not None:
        other = ranks.get(expectation.below)
        if got is None or other is None:
            missing = doc if got is None else expectation.below
            return f"expected '{doc}' below '{expectation.below}', but '{missing}' was not returned"
        if got <= other:
            return f"expected '{doc}' below '{expectation.below}', got {got} vs {other}"
    if expectation.fired is not None and expectation.fired not in fired:
        return f"expected rule '{expectation.fired}' to fire; fired: {', '.join(sorted(fired)) or 'none'}"
    if expectation.not_fired is not None and expectation.not_fired in fired:
        return f"expected rule '{expectation.not_fired}' not to fire, but it did"
    return None

