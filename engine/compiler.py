"""YAML pipeline -> validated DAG of stage instances.

Every problem is collected and reported at once, each located (file:line:col). Compiling never
loads a model or an index and never imports torch: stage constructors are cheap by contract.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.config import PipelineConfig, StageSpec, issues_from_validation
from engine.errors import ConfigError, ConfigIssue
from engine.paths import nearest_existing_parent
from engine.registry import UnknownStageType, resolve_stage
from engine.stage import GraphView, Port, Stage, StageNode
from engine.yamlsource import LoadedYaml, SourceMap, load_yaml_file


@dataclass
class CompiledPipeline:
    """A validated pipeline: stages in a valid execution order and their wiring."""

    config: PipelineConfig
    specs: dict[str, StageSpec]
    stages: dict[str, Stage]
    order: list[str]  # a topological order
    output: str
    source_file: str
    base_dir: Path
    config_sha256: str  # of the canonical (resolved) configuration
    canonical: dict[str, Any]  # the configuration as validated, stage types resolved to versions
    warnings: list[ConfigIssue]

    @property
    def index_path(self) -> Path | None:
        if self.config.index is None:
            return None
        path = Path(self.config.index).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()


_YAML_KIND = {list: "list", str: "string", int: "number", float: "number", bool: "true/false"}


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def compile_file(path: str | Path) -> CompiledPipeline:
    """Load, validate and compile a pipeline YAML file."""
    path = Path(path)
    loaded = load_yaml_file(path, collect=True)
    return compile_loaded(loaded, base_dir=path.resolve().parent, check_log_path=True)


def compile_data(data: Any, *, label: str, base_dir: Path) -> CompiledPipeline:
    """Compile already-parsed configuration data (e.g. the copy embedded in a trace)."""
    return compile_loaded(LoadedYaml(data, SourceMap(label)), base_dir=base_dir)


def compile_loaded(loaded: LoadedYaml, *, base_dir: Path, check_log_path: bool = False) -> CompiledPipeline:
    """Validate and compile loaded config data. ``check_log_path``: also check that ``trace.log`` can be a
    file here (a config file being compiled to run; not a config replayed from a trace)."""
    data, source = loaded.data, loaded.source
    issues: list[ConfigIssue] = []
    if not isinstance(data, dict):
        got = "nothing" if data is None else f"a {_YAML_KIND.get(type(data), type(data).__name__)}"
        raise ConfigError([*loaded.issues, ConfigIssue(
            source.locate(()), "", f"the top level must be a mapping of settings (version, stages, ...), got {got}")])
    kind = data.get("kind")
    if "stages" not in data and kind in ("prefilter", "override"):
        raise ConfigError([ConfigIssue(
            source.locate(("kind",)), "kind", f"this is a rule file (kind: {kind}), not a pipeline config: a pipeline "
            f"names it in a rules.{kind} stage's params.rules; check rule files with `sieve rules check`")])
    if "stages" not in data and ("entities" in data or "entries" in data):
        raise ConfigError([ConfigIssue(
            source.locate(()), "", "this looks like a gazetteer or glossary file, not a pipeline config: a pipeline "
            "names it in a stage's params (gazetteer:, glossary:); `sieve validate` on that pipeline checks it")])
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        issues.extend(issues_from_validation(exc, source, (), PipelineConfig))
        config = None
    if config is not None and check_log_path and config.trace.log is not None:
        problem = _log_path_problem(config.trace.log)
        if problem is not None:
            issues.append(ConfigIssue(source.locate(("trace", "log")), "trace.log", problem))
    raw_stages = data.get("stages") if isinstance(data.get("stages"), list) else []

    specs: dict[str, StageSpec] = {}
    nodes: dict[str, StageNode] = {}
    first_seen: dict[str, int] = {}
    all_specs_valid = True
    # ids of every stage entry, valid or not: an input naming one of them is not an unknown input
    declared = {raw["id"] for raw in raw_stages if isinstance(raw, dict) and isinstance(raw.get("id"), str)}
    for i, raw in enumerate(raw_stages):
        prefix: tuple[str | int, ...] = ("stages", i)
        if not isinstance(raw, dict):
            issues.append(
                ConfigIssue(source.locate(prefix), f"stages.{i}", "each stage must be a mapping with id and type")
            )
            all_specs_valid = False
            continue
        validated = _validate_params(raw, prefix, source, issues)
        try:
            spec = StageSpec.model_validate(raw)
        except ValidationError as exc:
            issues.extend(issues_from_validation(exc, source, prefix, StageSpec))
            all_specs_valid = False
            continue
        if spec.id in first_seen:
            issues.append(
                ConfigIssue(
                    source.locate(prefix + ("id",)),
                    f"stages.{i}.id",
                    f"duplicate stage id '{spec.id}' (first used by stages.{first_seen[spec.id]})",
                )
            )
            all_specs_valid = False
            continue
        first_seen[spec.id] = i
        if validated is None:
            all_specs_valid = False
            continue
        cls, params = validated
        if params is None:  # reported; the stage still takes part in the wiring checks
            all_specs_valid = False
        if spec.on_error == "skip" and cls.produces is Port.MASK:
            issues.append(ConfigIssue(
                source.locate(prefix + ("on_error",), prefer_key=True), f"stages.{i}.on_error",
                f"{cls.type_name} decides which documents may be retrieved: skipping it on a failure would let "
                "every document through (fail open); it must fail the query instead (on_error: fail)"))
        elif spec.on_error == "skip" and cls.type_name == "rules.override":
            issues.append(ConfigIssue(
                source.locate(prefix + ("on_error",), prefer_key=True), f"stages.{i}.on_error",
                "rules.override applies the analysts' exclusions and pins: skipping it on a failure or at the "
                "query's deadline (executor.deadline_ms) would return what its rules exclude; it must fail the query "
                "instead (on_error: fail)"))
        specs[spec.id] = spec
        nodes[spec.id] = StageNode(spec.id, cls, params, tuple(spec.inputs))

    # The wiring is checked even when some entries are invalid, so every problem is reported at once;
    # the stage types' own graph checks (which read params) only when every entry is valid.
    output: str | None = None
    order: list[str] = []
    raw_output = data.get("output")
    if nodes and (config is not None or raw_output is None or isinstance(raw_output, str)):
        output, order = _check_graph(
            config.output if config is not None else raw_output, nodes, source, first_seen, issues, base_dir,
            declared=declared, deep=config is not None and all_specs_valid,
        )

    if config is not None and config.executor.deadline_ms is not None and specs \
            and not any(spec.on_error == "skip" for spec in specs.values()):
        issues.append(ConfigIssue(
            source.locate(("executor", "deadline_ms")), "executor.deadline_ms",
            "no stage has on_error: skip, so the deadline cuts nothing (stages with on_error: fail always run): mark "
            "the stages a query may do without, such as a reranker, on_error: skip", "warning"))

    if loaded.issues:  # the loader's problems first; a value it could not make is not reported again
        issues = [*loaded.issues, *(i for i in issues if i.path not in loaded.unmade)]
    errors = [i for i in issues if i.severity == "error"]
    if errors or config is None or output is None or not all_specs_valid:
        raise ConfigError(issues)

    canonical = json.loads(canonical_json(config.model_dump(mode="json")))
    canonical["stages"] = [
        {
            **specs[sid].model_dump(mode="json", exclude_none=True),
            "type": nodes[sid].cls.qualified_name(),
            "params": nodes[sid].params.model_dump(mode="json"),
        }
        for sid in first_seen
    ]
    canonical["output"] = output
    sha = hashlib.sha256(canonical_json(canonical).encode("utf-8")).hexdigest()
    stages = {sid: nodes[sid].cls(sid, nodes[sid].params) for sid in order}
    return CompiledPipeline(
        config=config,
        specs=specs,
        stages=stages,
        order=order,
        output=output,
        source_file=source.file,
        base_dir=base_dir,
        config_sha256=sha,
        canonical=canonical,
        warnings=[i for i in issues if i.severity != "error"],
    )


def _log_path_problem(log: str) -> str | None:
    """Why the trace log could not be a file at ``log`` (relative to the working directory), if it could not."""
    if "\x00" in log:
        return "the path contains a NUL character"
    path = Path(log).expanduser()
    if path.is_dir():
        return f"'{log}' is a directory; name the log file (e.g. {(path / 'trace.jsonl').as_posix()})"
    parent = nearest_existing_parent(path)
    if parent is not None and not parent.is_dir():
        return f"'{parent}' is a file, so the log cannot be created under it"
    return None


def _keys_sorted(value: Any) -> Any:
    """``value`` with every mapping's keys in sorted order. A stage sees its params the same whichever order the
    YAML wrote them in, and the same again when a replay compiles the config from a trace log (which stores
    keys sorted): e.g. the order of a weighted fusion's terms in its explanation."""
    if isinstance(value, dict):
        return {key: _keys_sorted(value[key]) for key in sorted(value, key=str)}
    if isinstance(value, list):
        return [_keys_sorted(item) for item in value]
    return value


def _validate_params(
    raw: dict[str, Any], prefix: tuple[str | int, ...], source: SourceMap, issues: list[ConfigIssue]
) -> tuple[type[Stage], Any] | None:
    """Resolve the stage type and validate its params, independently of the rest of the entry: (type, params),
    (type, None) when the params are invalid, None when the type is unknown or missing."""
    type_ref = raw.get("type")
    if not isinstance(type_ref, str):
        return None  # the envelope validation reports a missing or non-string type
    try:
        cls = resolve_stage(type_ref)
    except UnknownStageType as exc:
        issues.append(ConfigIssue(source.locate(prefix + ("type",)), ".".join(map(str, prefix + ("type",))), exc.message))
        return None
    raw_params = raw.get("params", {})
    if raw_params is None:
        raw_params = {}
    if not isinstance(raw_params, dict):
        return None  # reported by the envelope (params must be a mapping)
    try:
        return cls, cls.Params.model_validate(_keys_sorted(raw_params))
    except ValidationError as exc:
        issues.extend(issues_from_validation(exc, source, prefix + ("params",), cls.Params))
        return cls, None


def _check_graph(
    output: str | None,
    nodes: dict[str, StageNode],
    source: SourceMap,
    position: dict[str, int],
    issues: list[ConfigIssue],
    base_dir: Path | None = None,
    *,
    declared: set[str] = frozenset(),  # type: ignore[assignment]
    deep: bool = True,
) -> tuple[str | None, list[str]]:
    """Wiring checks: inputs exist and have the right kind, no cycles, one reachable output. ``declared``:
    ids of entries that are not in ``nodes`` because they are invalid (inputs naming them are not
    reported again). ``deep``: every node has valid params, so the stage types' own checks run too."""
    def where(sid: str, *rest: str | int) -> tuple[Any, str]:
        path = ("stages", position[sid]) + rest
        return source.locate(path), ".".join(str(p) for p in path)

    wiring_ok = True
    for sid, node in nodes.items():
        cls = node.cls
        stage_ok = True
        candidate_inputs = 0
        seen_inputs: set[str] = set()
        for j, dep in enumerate(node.inputs):
            loc, dotted = where(sid, "inputs", j)
            if dep in seen_inputs:
                issues.append(ConfigIssue(loc, dotted, f"input '{dep}' is listed twice"))
                stage_ok = False
                continue
            seen_inputs.add(dep)
            if dep == sid:
                issues.append(ConfigIssue(loc, dotted, "a stage cannot take its own output as input"))
                stage_ok = False
                continue
            if dep not in nodes and dep in declared:  # an invalid entry, reported already
                stage_ok = False
                continue
            if dep not in nodes:
                from difflib import get_close_matches

                hint = get_close_matches(dep, list(nodes), n=1)
                did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
                issues.append(
                    ConfigIssue(
                        loc,
                        dotted,
                        f"unknown input '{dep}'{did_you_mean}; stages defined: {', '.join(nodes)}",
                    )
                )
                stage_ok = False
                continue
            produced = nodes[dep].cls.produces
            if produced not in cls.accepts:
                accepted = ", ".join(sorted(p.value for p in cls.accepts)) or "no inputs"
                issues.append(
                    ConfigIssue(
                        loc,
                        dotted,
                        f"'{dep}' ({nodes[dep].cls.type_name}) produces {produced.value}, but "
                        f"{cls.type_name} accepts: {accepted}",
                    )
                )
                stage_ok = False
            if produced is Port.CANDIDATES:
                candidate_inputs += 1
        query_inputs = [d for d in node.inputs if d in nodes and nodes[d].cls.produces is Port.QUERY]
        if len(query_inputs) > 1:
            loc, dotted = where(sid, "inputs")
            issues.append(
                ConfigIssue(loc, dotted, f"at most one query-rewriting input, got {', '.join(query_inputs)}")
            )
            stage_ok = False
        if stage_ok:
            low, high = cls.min_candidate_inputs, cls.max_candidate_inputs
            if candidate_inputs < low or (high is not None and candidate_inputs > high):
                expected = f"exactly {low}" if low == high else (
                    f"at least {low}" if high is None else f"between {low} and {high}"
                )
                loc, dotted = where(sid, "inputs")
                issues.append(
                    ConfigIssue(
                        loc,
                        dotted,
                        f"{cls.type_name} takes {expected} candidate input(s), got {candidate_inputs}",
                    )
                )
                stage_ok = False
        wiring_ok = wiring_ok and stage_ok

    sorter = graphlib.TopologicalSorter({sid: [d for d in n.inputs if d in nodes] for sid, n in nodes.items()})
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        first = cycle[0]
        loc, dotted = where(first, "inputs")
        issues.append(ConfigIssue(loc, dotted, f"stages form a cycle: {' -> '.join(cycle)}"))
        return None, []

    # The output: named, or the single stage nothing consumes.
    if output is not None and output not in nodes:
        if output in declared:
            return None, order
        from difflib import get_close_matches

        hint = get_close_matches(output, list(declared), n=1)
        issues.append(
            ConfigIssue(
                source.locate(("output",)),
                "output",
                f"output '{output}' is not a stage" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; stages defined: {', '.join(nodes)}",
            )
        )
        return None, order
    if not wiring_ok:
        return None, order
    consumed = {dep for n in nodes.values() for dep in n.inputs}
    sinks = [sid for sid in nodes if sid not in consumed]
    if output is None:
        if len(sinks) != 1:
            issues.append(
                ConfigIssue(
                    source.locate(()),
                    "output",
                    "no `output` given and the pipeline has "
                    + (f"several final stages ({', '.join(sinks)})" if sinks else "no final stage")
                    + "; name the stage whose results are returned",
                )
            )
            return None, order
        output = sinks[0]
    if nodes[output].cls.produces is not Port.CANDIDATES:
        issues.append(
            ConfigIssue(
                source.locate(("output",)),
                "output",
                f"output '{output}' ({nodes[output].cls.type_name}) produces "
                f"{nodes[output].cls.produces.value}, not candidates",
            )
        )
        return None, order

    graph = GraphView(nodes, base_dir)
    reachable = {output} | {n.id for n in graph.ancestors(output)}
    for sid in nodes:
        if sid not in reachable:
            loc, dotted = where(sid, "id")
            issues.append(
                ConfigIssue(loc, dotted, f"stage '{sid}' does not feed the output '{output}' (unreachable)")
            )
    # Access rules apply to every recall: a candidate source (a stage with no candidate input) that no prefilter
    # feeds would bring back documents the rules deny, and a fusion downstream would pass them on.
    masks = [sid for sid, n in nodes.items() if n.cls.produces is Port.MASK]
    for sid, node in nodes.items():
        if not masks or node.cls.produces is not Port.CANDIDATES:
            continue
        if any(d in nodes and nodes[d].cls.produces is Port.CANDIDATES for d in node.inputs):
            continue
        above = {n.id for n in graph.ancestors(sid)}
        bypassed = [m for m in masks if m not in above]
        if bypassed:
            loc, dotted = where(sid, "inputs")
            named = ", ".join(f"'{m}' ({nodes[m].cls.type_name})" for m in bypassed)
            issues.append(ConfigIssue(
                loc, dotted,
                f"stage '{sid}' ({node.cls.type_name}) retrieves documents without the access rules of {named}: it "
                f"would return documents they deny. Add {' and '.join(repr(m) for m in bypassed)} to its inputs",
            ))
    if not deep:
        return output, order
    for sid, node in nodes.items():
        for problem in node.cls.check_graph(node, graph):
            loc, dotted = where(sid, *problem.path)
            issues.append(ConfigIssue(loc, dotted, problem.message, problem.severity))
    return output, order
