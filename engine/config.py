"""The pipeline configuration schema (top level and per-stage envelope) and error mapping.

Stage parameters are validated separately, by the model each registered stage type declares, so
the schema here stays independent of which stages exist.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from difflib import get_close_matches
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.errors import ConfigIssue
from engine.model import KEY_ENV_NAME
from engine.strictness import NoCoercion
from engine.yamlsource import PathKey, SourceMap
from rules.conditions import Condition

STAGE_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*$"

# ``${NAME}`` (or an unclosed ``${``) and ``$NAME``: what a shell or a templating tool would expand
_VARIABLE = re.compile(r"\$(?:\{[^}]*\}?|[A-Za-z_][A-Za-z0-9_]*)")


def variable_problem(value: str, override: str, what: str = "path") -> str | None:
    """Why ``value`` cannot be a config value: it holds an environment variable, which Sieve never expands (a
    config must mean the same on every machine, and the trace records it as written). ``override``: how to give
    the value from the command line instead. None: no variable in it."""
    found = _VARIABLE.search(value)
    if found is None:
        return None
    return (f"'{found.group(0)}' looks like an environment variable, but Sieve does not expand variables in a "
            f"config (it must mean the same on every machine, and the trace records it as written): write the "
            f"{what} itself, or give it on the command line ({override})")


def _no_variable(override: str) -> AfterValidator:
    def check(value: str | None) -> str | None:
        problem = None if value is None else variable_problem(value, override)
        if problem is not None:
            raise ValueError(problem)
        return value

    return AfterValidator(check)


# A path in the pipeline config: taken as written, never with environment variables expanded
IndexPath = Annotated[str, _no_variable("--index DIR, or --set index=DIR")]
TraceLogPath = Annotated[str, _no_variable("--log FILE, or --set trace.log=FILE")]


class Strict(NoCoercion):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class StageSpec(Strict):
    """One stage of the pipeline as written in YAML."""

    id: str = Field(pattern=STAGE_ID_PATTERN, max_length=64)
    type: str = Field(description="registered stage type, e.g. recall.bm25 or recall.bm25@1")
    inputs: list[str] = Field(default_factory=list, description=(
        "ids of the stages this one reads: their candidates, the query in effect and the access mask"))
    params: dict[str, Any] = Field(default_factory=dict)
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="fail: the query fails; skip: pass the input through and mark the trace degraded"
    )
    description: str | None = None
    enabled: bool = Field(
        True, description="false: the stage is not loaded and does not run; the stages that read it read its one "
        "input instead (refused for access and override rules, a stage with several inputs and the output)"
    )
    when: Condition | None = Field(
        None, description="a condition on the query (query.*, user.*, as_of; the rule files' condition language), "
        "judged per query when the stage is due: when it does not hold the stage is bypassed (not run; its one input "
        "is handed on, or nothing for a stage without inputs) and the trace says why (routing by query class)"
    )

    @field_validator("when", mode="before")
    @classmethod
    def _when_written(cls, value: Any) -> Any:
        """``when:`` with nothing under it (its lines commented out) reads as null, which would run the stage for
        every query without a word: refused, as in the rule files."""
        if value is None:
            raise ValueError("'when' is empty (are its lines commented out?): write its condition, or remove the key "
                             "for a stage that runs for every query")
        return value


class TraceSettings(Strict):
    """What goes into the per-query trace and where it is logged."""

    log: TraceLogPath | None = Field(
        "traces/trace.jsonl", description="tamper-evident JSONL log (relative to the working directory); null: none"
    )
    include_query_text: bool = Field(True, description="store query text (else only its sha256)")
    hash_key_env: str | None = Field(None, pattern=rf"^{KEY_ENV_NAME.pattern}$", description=(
        "the environment variable holding a secret key (16 bytes or more): the query's, its history's and its "
        "rewrite's hashes are then HMAC-SHA256 under it, not plain sha256, which a word list reverses for a short "
        "query; a replay needs the same key in the same variable. Unset: plain sha256"))
    include_document_text: bool = Field(False, description="store returned documents' text in the trace")
    explain: bool = Field(True, description="store an explanation tree per returned document")
    explain_top: int | None = Field(None, ge=0, le=1_000_000, description=(
        "with explain: the trees of the first N returned documents only (null: every one); the others keep their "
        "ledger (each stage's score) and no tree. For a pipeline returning hundreds of documents, whose trees are "
        "most of a query's own time (bench/results/explain_top.md); replay reproduces what was stored"))


class Limits(Strict):
    max_query_chars: int = Field(4096, ge=1, le=1_000_000, description=(
        "the longest query text accepted, in characters: a longer query is refused with an error (a 400 under "
        "sieve serve), never truncated"))
    max_history_turns: int = Field(20, ge=0, le=10_000, description=(
        "the most earlier turns a query's conversation history may have: more is refused with an error, never cut "
        "(rewrite.coreference's own max_history_turns chooses how many it reads)"))


class ServerSettings(Strict):
    """What an HTTP request may ask of this pipeline under ``sieve serve`` (the CLI and the Python API, used by
    operators, may do all of it). Each gives a caller more than the results its user may see, so each is off
    unless the config turns it on, for a gateway that admits only trusted callers (auditors)."""

    request_as_of: bool = Field(
        False, description="a request may set the query's as_of: the rules are then judged at a time the caller "
        "chooses (an archived or an embargoed document becomes visible); off: the server's clock"
    )
    include_trace: bool = Field(
        False, description="a search may ask for its whole trace (\"include_trace\": true): every stage's output, "
        "rule counts, ids of documents access rules suppressed, rule-file paths"
    )
    explain: bool = Field(
        False, description="POST /v1/pipelines/{name}/explain answers: where given document ids left the pipeline "
        "(which access rule masked one, whether an id exists at all)"
    )


class ExecutorSettings(Strict):
    max_workers: int = Field(2, ge=1, le=64, description="threads for independent branches of the DAG")
    deadline_ms: int | None = Field(
        None, ge=1, le=3_600_000,
        description="the query's time budget: a stage with on_error: skip that is due to start after it is skipped, "
        "and one running when it passes stops (a reranker between batches) and is skipped, its input passed on; "
        "stages with on_error: fail always run. null: no deadline",
    )


class PipelineConfig(Strict):
    """A whole pipeline: its stages (a DAG through ``inputs``) and which stage is the output."""

    version: Literal[1]
    name: str | None = None
    description: str | None = None
    index: IndexPath | None = Field(None, description="index directory, relative to this file")
    stages: list[Any] = Field(min_length=1)
    output: str | None = Field(None, description="the stage whose candidates are returned")
    trace: TraceSettings = Field(default_factory=TraceSettings)
    limits: Limits = Field(default_factory=Limits)
    server: ServerSettings = Field(default_factory=ServerSettings)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """Models an annotation may hold: ``Optional[M]``, ``list[M]``, ``tuple[M, ...]``, ``dict[str, M]``, ``M | N``..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None:
        return []
    args = typing.get_args(annotation)[1:] if origin is dict else typing.get_args(annotation)
    found: list[type[BaseModel]] = []
    for arg in args:
        if arg is Ellipsis or arg is type(None):
            continue
        for inner in models_in(arg):
            if inner not in found:
                found.append(inner)
    return found


def yaml_key(name: str, field: Any) -> str:
    """The key an analyst writes for a model field (its alias when it has one)."""
    return field.alias if isinstance(field.alias, str) else name


def fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The keys valid at ``loc`` inside ``model`` (for 'did you mean' hints), as written in YAML; through lists,
    optional values and unions (the keys of every model that may be there); None when nothing can be told."""
    current: list[type[BaseModel]] = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        following: list[type[BaseModel]] = []
        for candidate in current:
            field = next((f for name, f in candidate.model_fields.items() if part in (name, f.alias)), None)
            if field is not None:
                following.extend(m for m in models_in(field.annotation) if m not in following)
        if not following:
            return None
        current = following
    keys: list[str] = []
    for candidate in current:
        keys.extend(key for key in (yaml_key(n, f) for n, f in candidate.model_fields.items()) if key not in keys)
    return keys


def issues_from_validation(
    exc: ValidationError,
    source: SourceMap,
    prefix: PathKey,
    model: type[BaseModel],
) -> list[ConfigIssue]:
    """Turn a pydantic ValidationError into located issues, one per error."""
    issues = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        path = prefix + loc
        dotted = ".".join(str(p) for p in path)
        kind = error["type"]
        if kind == "extra_forbidden":
            key = loc[-1] if loc else "?"
            valid = fields_at(model, loc[:-1]) or []
            if model.__name__ == "PipelineConfig" and len(loc) == 1:
                valid = [*valid, "extends"]  # taken out (merged) before the config is validated
            hint = get_close_matches(str(key), valid, n=1)
            message = f"unknown field '{key}'"
            if hint:
                message += f" (did you mean '{hint[0]}'?)"
            if valid:
                message += f"; valid fields: {', '.join(valid)}"
            if len(loc) == 1:  # a stage parameter that belongs to the index component it reads (k1 in recall.bm25)
                from engine.index import index_setting_hint

                elsewhere = index_setting_hint(model, str(key))
                if elsewhere is not None:
                    message += f". {elsewhere}"
            issues.append(ConfigIssue(source.locate(path, prefer_key=True), dotted, message))
            continue
        if kind == "missing":
            message = "required field is missing"
            issues.append(ConfigIssue(source.locate(path[:-1]), dotted, message))
            continue
        if kind == "literal_error":
            issues.append(ConfigIssue(source.locate(path), dotted, literal_message(error)))
            continue
        message = error["msg"]
        if kind == "value_error":
            message = message.removeprefix("Value error, ")
        if "input" in error and not isinstance(error["input"], (dict, list)):
            message += f" (got {error['input']!r})"
        issues.append(ConfigIssue(source.locate(path), dotted, message))
    return issues


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """' (did you mean 'X'?)' for the choice closest to ``word`` (an unknown key), '' when none is close."""
    near = get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else ""


def literal_message(error: Any) -> str:
    """A value that is none of a setting's choices (pydantic's ``literal_error``), with the value given and the
    closest choice: ``'min-max' is not one of 'minmax', 'zscore', ... (did you mean 'minmax'?)``."""
    expected = str((error.get("ctx") or {}).get("expected", ""))
    choices = re.findall(r"'([^']*)'", expected)
    given = error.get("input")
    shown = repr(given) if isinstance(given, (str, int, float, bool)) else None
    if not choices:  # a single value that is no text (version: 1)
        return f"must be {expected}" + (f" (got {shown})" if shown is not None else "")
    message = (f"{shown} is not one of {expected.replace(' or ', ', ')}" if shown is not None
               else f"must be one of {expected.replace(' or ', ', ')}")
    if isinstance(given, str):
        near = get_close_matches(given, choices, n=1, cutoff=0.5) or get_close_matches(
            given.lower().replace("-", "").replace("_", ""), [c.replace("_", "") for c in choices], n=1, cutoff=0.5)
        if near:
            closest = next((c for c in choices if c == near[0] or c.replace("_", "") == near[0]), near[0])
            message += f" (did you mean '{closest}'?)"
    return message
