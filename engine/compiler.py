"""YAML pipeline -> validated DAG of stage instances.

Every problem is collected and reported at once, each located (file:line:col). Compiling never
loads a model or an index and never imports torch: stage constructors are cheap by contract.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.config import PipelineConfig, StageSpec, issues_from_validation, variable_problem
from engine.errors import ConfigError, ConfigIssue
from engine.paths import nearest_existing_parent
from engine.registry import UnknownStageType, resolve_stage
from engine.stage import GraphView, Port, Stage, StageNode
from engine.yamlsource import LoadedYaml, PathKey, SourceMap, load_yaml_file, nearby, path_problem
from rules.conditions import Node


@dataclass
class CompiledPipeline:
    """A validated pipeline: stages in a valid execution order and their wiring."""

    config: PipelineConfig
    specs: dict[str, StageSpec]  # the stages that run; their inputs as run (a disabled stage's readers read its input)
    stages: dict[str, Stage]
    order: list[str]  # a topological order
    output: str
    source_file: str
    base_dir: Path
    config_sha256: str  # of the canonical (resolved) configuration
    canonical: dict[str, Any]  # the configuration as validated, stage types resolved to versions
    warnings: list[ConfigIssue]
    # stages the config disables (``enabled: false``; not in specs, stages or order) -> what the stages that read
    # one read in its place
    disabled: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the base configs the file extends, nearest first, each {"file": its absolute path, "sha256": of its bytes}:
    # ``canonical`` is the merged config; these say which bases made it
    extends: list[dict[str, str]] = field(default_factory=list)
    # the compiled ``when`` of each running stage that has one: judged per query, a stage whose ``when`` does not
    # hold is bypassed (its input handed on)
    when: dict[str, Node] = field(default_factory=dict)

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
    return compile_loaded(load_config_file(path), base_dir=path.resolve().parent, check_log_path=True)


MAX_EXTENDS_DEPTH = 8  # bases in one chain of ``extends``


def load_config_file(path: str | Path) -> LoadedYaml:
    """A pipeline config file as it runs: loaded, and merged onto the base config it ``extends`` (if it names one)."""
    path = Path(path)
    return resolve_extends(load_yaml_file(path, collect=True), path.resolve().parent)


def resolve_extends(loaded: LoadedYaml, base_dir: Path, *, _chain: tuple[Path, ...] = ()) -> LoadedYaml:
    """``loaded`` merged onto the base config its top-level ``extends`` names (itself resolved first, so a base may
    extend another), without the ``extends`` key; ``loaded`` itself when it names none. The base lies in ``base_dir``
    (so every relative path means the same in both files). Mappings merge key by key, the extending config's value
    winning; ``stages`` merge by id (an entry whose id is in the base is merged into that stage, which keeps its
    type; a new id is appended); any other list, and ``null``, replaces the base's value. The source map locates
    every value in the file that wrote it; ``bases`` names each base file with its sha256, nearest first."""
    data, source = loaded.data, loaded.source
    if not isinstance(data, dict) or "extends" not in data:
        return loaded
    if not _chain:
        here = Path(source.file)
        _chain = (here.resolve(),) if here.is_file() else ()
    name = data["extends"]

    def refuse(message: str) -> ConfigError:
        return ConfigError([*loaded.issues, ConfigIssue(source.locate(("extends",)), "extends", message)])

    if "extends" in loaded.unmade:
        raise ConfigError(loaded.issues)
    if not isinstance(name, str) or not name.strip():
        got = "nothing" if name is None else f"a {_YAML_KIND.get(type(name), type(name).__name__)}"
        raise refuse(f"extends names the base config this one is written over, a file in this config's directory "
                     f"(extends: base.yaml), got {got}")
    problem = path_problem(name)
    if problem is not None:
        raise refuse(problem)
    directory = base_dir.resolve()
    try:
        target = (directory / name).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise refuse(f"cannot resolve '{name}': {exc}") from None
    problem = path_problem(str(target))  # this config's directory and the name together
    if problem is not None:
        raise refuse(problem)
    if target.parent != directory:
        raise refuse(f"the base config '{name}' is in {target.parent}, not in this config's directory ({directory}): "
                     "a base must lie beside the configs that extend it, so that every relative path in either file "
                     "(the index, rule files, glossaries, models, trace.log) means the same; copy it here")
    if target in _chain:
        cycle = " -> ".join(p.name for p in (*_chain[_chain.index(target):], target))
        raise refuse(f"extends '{name}' makes a cycle: {cycle}")
    if len(_chain) > MAX_EXTENDS_DEPTH:
        raise refuse(f"more than {MAX_EXTENDS_DEPTH} configs extend one another in a chain "
                     f"({' -> '.join(p.name for p in _chain)} -> {target.name}): merge some of them")
    if not target.exists():
        raise refuse(f"the base config '{name}' is not there (looked for {target}){nearby(target)}")
    if target.is_dir():
        raise refuse(f"the base config '{name}' is a directory ({target}); name a config file in it (extends: "
                     f"{name.rstrip('/')}/base.yaml is refused too: a base lies beside this config)")
    shown = Path(source.file).parent / name if Path(source.file).is_file() else target  # as the file names it
    try:
        base = load_yaml_file(shown, collect=True)
        if not isinstance(base.data, dict):
            got = "nothing" if base.data is None else f"a {_YAML_KIND.get(type(base.data), type(base.data).__name__)}"
            raise ConfigError([*base.issues, ConfigIssue(base.source.locate(()), "", "a base config must be a mapping "
                                                         f"of settings (version, stages, ...), got {got}")])
        base = resolve_extends(base, base_dir, _chain=(*_chain, target))
    except ConfigError as exc:
        raise ConfigError([*loaded.issues, *exc.issues]) from None
    return _Merge(base, loaded).result(target)


_REMOVED = object()  # what a merged key becomes when the child removes it
_WHEN_REMOVED = "`when: null` removes the base config's `when` of stage "


def _removes_when(issue: ConfigIssue, dotted: str) -> bool:
    """Whether ``issue`` is the warning that a config removed the `when` at ``dotted`` (stages.K.when)."""
    return issue.path == dotted and issue.severity == "warning" and issue.message.startswith(_WHEN_REMOVED)


class _Merge:
    """An extending config merged onto its (resolved) base, with a source map that locates each value in its file."""

    def __init__(self, base: LoadedYaml, child: LoadedYaml):
        self.base, self.child = base, child
        self.out = SourceMap(child.source.file)
        self.issues: list[ConfigIssue] = []
        self.stage_position: dict[int, int] = {}  # the child's stages.i -> the merged stages.j
        self.removed: list[ConfigIssue] = []  # warnings: a base's `when` removed by the child's `when: null`
        self.when_set: set[str] = set()  # stages.K.when the child sets where a base config had removed it

    def result(self, target: Path) -> LoadedYaml:
        child_data = {key: value for key, value in self.child.data.items() if key != "extends"}
        self._entry(self.child.source, (), ())
        data = self._mapping(self.base.data, (), child_data, ())
        if self.issues:
            raise ConfigError([*self.child.issues, *self.issues])
        unmade = set(self.base.unmade) | {self._moved(dotted) for dotted in self.child.unmade}
        sha = self.base.sha256 or ""
        kept = [issue for issue in self.base.issues if not any(_removes_when(issue, d) for d in self.when_set)]
        return LoadedYaml(data, self.out, [*self.child.issues, *kept, *self.removed], unmade,
                          sha256=self.child.sha256, bases=[{"file": str(target), "sha256": sha}, *self.base.bases])

    def _moved(self, dotted: str) -> str:
        """A dotted path of the child's data as a path of the merged data (its stage entries may move)."""
        parts = dotted.split(".")
        if len(parts) > 1 and parts[0] == "stages" and parts[1].isdigit() and int(parts[1]) in self.stage_position:
            parts[1] = str(self.stage_position[int(parts[1])])
        return ".".join(parts)

    def _entry(self, source: SourceMap, at: PathKey, to: PathKey) -> None:
        """Where the value (and key) at ``at`` in ``source`` was written, recorded for ``to`` in the merged map."""
        for table, files, out_table, out_files in ((source.values, source.value_files, self.out.values,
                                                    self.out.value_files),
                                                   (source.keys, source.key_files, self.out.keys, self.out.key_files)):
            if at in table:
                out_table[to] = table[at]
                file = files.get(at, source.file)
                if file != self.out.file:
                    out_files[to] = file
                else:
                    out_files.pop(to, None)

    def _whole(self, source: SourceMap, value: Any, at: PathKey, to: PathKey) -> Any:
        """A value taken whole from one file: it and everything inside it located there."""
        self._entry(source, at, to)
        if isinstance(value, dict):
            for key, item in value.items():
                self._whole(source, item, at + (key,), to + (key,))
        elif isinstance(value, list):
            for j, item in enumerate(value):
                self._whole(source, item, at + (j,), to + (j,))
        return value

    def _merge(self, base: Any, at_base: PathKey, child: Any, at_child: PathKey, to: PathKey) -> Any:
        if len(to) == 3 and to[0] == "stages" and to[2] == "when":  # a condition is replaced whole, never merged
            if child is None:  # removed, as --set stages.X.when=null removes it; said, in case its lines were
                self.removed.append(ConfigIssue(  # commented out
                    self.child.source.locate(at_child, prefer_key=True), ".".join(map(str, to)),
                    f"{_WHEN_REMOVED}'{self.base.data['stages'][to[1]]['id']}' "
                    f"({self.base.source.locate(at_base, prefer_key=True)}): it runs for every query", "warning"))
                return _REMOVED
            return self._whole(self.child.source, child, at_child, to)
        if isinstance(base, dict) and isinstance(child, dict):
            self._entry(self.child.source, at_child, to)
            return self._mapping(base, at_base, child, to, at_child)
        if to == ("stages",) and isinstance(base, list) and isinstance(child, list):
            self._entry(self.child.source, at_child, to)
            return self._stages(base, child)
        return self._whole(self.child.source, child, at_child, to)

    def _mapping(self, base: dict[Any, Any], at_base: PathKey, child: dict[Any, Any], to: PathKey,
                 at_child: PathKey | None = None) -> dict[Any, Any]:
        at_child = to if at_child is None else at_child
        merged: dict[Any, Any] = {}
        for key, value in base.items():
            if key in child:
                merged[key] = self._merge(value, at_base + (key,), child[key], at_child + (key,), to + (key,))
                if merged[key] is _REMOVED:
                    del merged[key]
            else:
                merged[key] = self._whole(self.base.source, value, at_base + (key,), to + (key,))
        for key, value in child.items():
            if key not in base:
                if len(to) == 2 and to[0] == "stages" and key == "when":
                    dotted = ".".join(map(str, to + (key,)))
                    if value is None and any(_removes_when(issue, dotted) for issue in self.base.issues):
                        continue  # removed by a base already (said there): nothing more to remove
                    self.when_set.add(dotted)  # set again: a base's warning that it was removed no longer holds
                merged[key] = self._whole(self.child.source, value, at_child + (key,), to + (key,))
        return merged

    def _stages(self, base: list[Any], child: list[Any]) -> list[Any]:
        """Stages merged by id: a child entry naming a base stage's id is merged into it, a new id appended."""
        by_id: dict[str, int] = {}
        for k, entry in enumerate(base):
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                by_id.setdefault(entry["id"], k)
        into: dict[int, int] = {}  # base stages.k -> the child entry merged into it
        appended: list[int] = []
        first: dict[str, int] = {}  # id -> the child's first entry with it
        for i, entry in enumerate(child):
            sid = entry.get("id") if isinstance(entry, dict) else None
            if isinstance(sid, str) and sid in first:
                self.issues.append(ConfigIssue(
                    self.child.source.locate(("stages", i, "id")), f"stages.{i}.id",
                    f"duplicate stage id '{sid}' (this file's stages.{first[sid]} has it already): write each "
                    "stage's changes in one entry"))
                continue
            if isinstance(sid, str):
                first[sid] = i
            if isinstance(sid, str) and sid in by_id and by_id[sid] not in into:
                k = by_id[sid]
                written, given = base[k].get("type"), entry.get("type")
                if "type" in base[k] and "type" in entry and not _same_type(given, written):
                    where = self.base.source.locate(("stages", k, "type"))
                    self.issues.append(ConfigIssue(
                        self.child.source.locate(("stages", i, "type")), f"stages.{k}.type",
                        f"stage '{sid}' is {written!r} in the base config ({where}): a config that extends it may "
                        f"change a stage's settings, not its type; give this stage a new id (and point what reads "
                        f"'{sid}' at it)"))
                into[k] = i
            else:
                appended.append(i)
        merged: list[Any] = []
        for k, entry in enumerate(base):
            if k in into:
                i = into[k]
                self.stage_position[i] = k
                merged.append(self._merge(entry, ("stages", k), child[i], ("stages", i), ("stages", k)))
            else:
                merged.append(self._whole(self.base.source, entry, ("stages", k), ("stages", k)))
        for i in appended:
            self.stage_position[i] = len(merged)
            merged.append(self._whole(self.child.source, child[i], ("stages", i), ("stages", len(merged))))
        return merged


def _same_type(given: Any, written: Any) -> bool:
    """Whether two spellings name one stage type (``recall.bm25`` and ``recall.bm25@1`` while 1 is the latest)."""
    if given == written:
        return True
    try:
        return resolve_stage(str(given)) is resolve_stage(str(written))
    except UnknownStageType:
        return False


def compile_data(data: Any, *, label: str, base_dir: Path) -> CompiledPipeline:
    """Compile already-parsed configuration data (e.g. the copy embedded in a trace)."""
    return compile_loaded(LoadedYaml(data, SourceMap(label)), base_dir=base_dir)


def compile_loaded(loaded: LoadedYaml, *, base_dir: Path, check_log_path: bool = False) -> CompiledPipeline:
    """Validate and compile loaded config data. ``check_log_path``: also check that ``trace.log`` can be a
    file here (a config file being compiled to run; not a config replayed from a trace). Data that ``extends`` a
    base config is merged onto it first (relative to ``base_dir``); a caller that varies the data (``sieve sweep``)
    loads it merged (:func:`load_config_file`) and varies that."""
    if isinstance(loaded.data, dict) and "extends" in loaded.data:
        loaded = resolve_extends(loaded, base_dir)
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
    whens: dict[str, Node] = {}  # the compiled `when` of each stage that has one
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
        variables = _variable_issues(raw.get("params"), prefix + ("params",), spec.id, source)
        if variables:  # a path naming a variable is not checked further (as a file that is not there)
            issues.extend(variables)
            params = None
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
        essential = _why_essential(cls)
        if not spec.enabled and essential is not None:
            issues.append(ConfigIssue(
                source.locate(prefix + ("enabled",), prefer_key=True), f"stages.{i}.enabled",
                f"{essential}, so it cannot be disabled (enabled: false): switch off a rule with the rule's own "
                "`enabled: false` in its rule file, or remove the stage from the pipeline (a change the config's "
                "history shows)"))
        if spec.when is not None:
            condition = _compile_when(spec, cls, prefix, source, issues)
            if condition is None:
                all_specs_valid = False
            else:
                whens[spec.id] = condition
        specs[spec.id] = spec
        nodes[spec.id] = StageNode(spec.id, cls, params, tuple(spec.inputs))

    # The wiring is checked even when some entries are invalid, so every problem is reported at once;
    # the stage types' own graph checks (which read params) only when every entry is valid.
    # A disabled stage (enabled: false) takes part in the wiring checks as written, so a config means the same
    # whichever stages it switches on; then it is taken out, its readers reading its input, and the stages that run
    # are checked as they will run (stage types' own checks included).
    output: str | None = None
    order: list[str] = []
    raw_output = data.get("output")
    deep = config is not None and all_specs_valid
    disabled = {sid for sid, spec in specs.items() if not spec.enabled and _why_essential(nodes[sid].cls) is None}
    running = nodes
    bypassed: dict[str, tuple[str, ...]] = {}
    if nodes and (config is not None or raw_output is None or isinstance(raw_output, str)):
        errors_before = sum(1 for i in issues if i.severity == "error")
        output, order = _check_graph(
            config.output if config is not None else raw_output, nodes, source, first_seen, issues, base_dir,
            declared=declared, deep=deep and not disabled,
        )
        if disabled and output is not None and sum(1 for i in issues if i.severity == "error") == errors_before:
            bypass = _bypass_disabled(nodes, disabled, output, source, first_seen, issues)
            if bypass is None:
                output = None
            else:
                running, bypassed = bypass
                output, order = _check_graph(output, running, source, first_seen, issues, base_dir,
                                             declared=declared, deep=deep, as_written=nodes)
        elif disabled:
            output = None  # reported: the wiring as written is wrong

    if output is not None and whens:
        _check_whens(whens, specs, running, output, source, first_seen, issues)

    if config is not None and config.executor.deadline_ms is not None and specs \
            and not any(spec.on_error == "skip" for sid, spec in specs.items() if sid not in disabled):
        issues.append(ConfigIssue(
            source.locate(("executor", "deadline_ms")), "executor.deadline_ms",
            "no stage has on_error: skip, so the deadline cuts nothing (stages with on_error: fail always run): mark "
            "the stages a query may do without, such as a reranker, on_error: skip", "warning"))

    if config is not None and config.trace.explain_top is not None and not config.trace.explain:
        issues.append(ConfigIssue(
            source.locate(("trace", "explain_top")), "trace.explain_top",
            "explain_top is set but not used: it applies only with trace.explain: true", "warning"))

    if loaded.issues:  # the loader's problems first; a value it could not make is not reported again
        issues = [*loaded.issues, *(i for i in issues if i.path not in loaded.unmade)]
    errors = [i for i in issues if i.severity == "error"]
    if errors or config is None or output is None or not all_specs_valid:
        raise ConfigError(issues)

    canonical = json.loads(canonical_json(config.model_dump(mode="json")))
    canonical["stages"] = [_canonical_stage(specs[sid], nodes[sid]) for sid in first_seen]
    canonical["output"] = output
    sha = hashlib.sha256(canonical_json(canonical).encode("utf-8")).hexdigest()
    stages = {sid: running[sid].cls(sid, running[sid].params) for sid in order}
    run_specs = {sid: specs[sid] if running[sid].inputs == nodes[sid].inputs
                 else specs[sid].model_copy(update={"inputs": list(running[sid].inputs)}) for sid in order}
    return CompiledPipeline(
        config=config,
        specs=run_specs,
        stages=stages,
        order=order,
        output=output,
        source_file=source.file,
        base_dir=base_dir,
        config_sha256=sha,
        canonical=canonical,
        warnings=[i for i in issues if i.severity != "error"],
        disabled=bypassed,
        extends=[dict(base) for base in loaded.bases],
        when={sid: whens[sid] for sid in order if sid in whens},
    )


def _canonical_stage(spec: StageSpec, node: StageNode) -> dict[str, Any]:
    """A stage as the canonical config records it: types resolved to versions, params in full; ``enabled`` only
    when false (so the sha256 of a config that disables nothing is what it was before stages could be disabled)."""
    stage = {**spec.model_dump(mode="json", exclude_none=True, by_alias=True), "type": node.cls.qualified_name(),
             "params": node.params.model_dump(mode="json")}
    if spec.enabled:
        del stage["enabled"]
    return stage


def _why_essential(cls: type[Stage]) -> str | None:
    """Why a stage of this type may never be switched off by ``enabled: false`` (None: it may): the access rules and
    the analysts' overrides, which the config cannot drop silently (as neither may be skipped: ``on_error``)."""
    if cls.produces is Port.MASK:
        return (f"{cls.type_name} decides which documents may be retrieved: switching it off would let every document "
                "through")
    if cls.type_name == "rules.override":
        return "rules.override applies the analysts' exclusions and pins: switching it off would return what they exclude"
    return None


def _compile_when(spec: StageSpec, cls: type[Stage], prefix: tuple[str | int, ...], source: SourceMap,
                  issues: list[ConfigIssue]) -> Node | None:
    """A stage's ``when`` compiled for the query scope (None: the problems reported, located in it)."""
    from rules.conditions import CompileError, compile_condition

    assert spec.when is not None
    at = prefix + ("when",)
    essential = _why_essential(cls)
    if essential is not None:
        issues.append(ConfigIssue(
            source.locate(at, prefer_key=True), ".".join(map(str, at)),
            f"{essential}, so it cannot be bypassed by a `when`: give the rules that apply only to some queries "
            "their own `when` in the rule file"))
        return None
    try:
        return compile_condition(spec.when, "query")
    except CompileError as exc:
        path = at + exc.path
        issues.append(ConfigIssue(source.locate(path), ".".join(map(str, path)),
                                  exc.message.replace("a rule's `when`", "a stage's `when`")))
        return None


def _check_whens(whens: dict[str, Node], specs: dict[str, StageSpec], running: dict[str, StageNode],
                 output: str, source: SourceMap, position: dict[str, int], issues: list[ConfigIssue]) -> None:
    """What a stage's ``when`` cannot mean, once the wiring is known: an error for the output stage (bypassed, a
    final cut would return its whole input) and for a stage with several candidate inputs (what a bypassed stage
    hands on is its one input); warnings for a ``when`` that never decides anything (the stage is disabled) or
    reads a rewrite no stage before it makes."""
    for sid, condition in whens.items():
        at = ("stages", position[sid], "when")
        loc, dotted = source.locate(at, prefer_key=True), ".".join(map(str, at))
        if not specs[sid].enabled:
            issues.append(ConfigIssue(loc, dotted, f"stage '{sid}' is disabled (enabled: false), so its `when` is "
                                      "never judged", "warning"))
            continue
        if sid == output:
            issues.append(ConfigIssue(loc, dotted, f"stage '{sid}' is the pipeline's output, whose results a query "
                                      "returns: it cannot be bypassed by a `when` (its whole input would be returned, "
                                      "past any final cut); route a stage before it, or add a final stage after it "
                                      "(select.top_k) as the output"))
            continue
        node = running[sid]
        lists = [dep for dep in node.inputs if running[dep].cls.produces is Port.CANDIDATES]
        if len(lists) > 1:
            issues.append(ConfigIssue(loc, dotted, f"a bypassed stage hands its one candidate input on, and '{sid}' "
                                      f"reads {len(lists)} ({', '.join(lists)}), so what its readers would read is not "
                                      "defined: put the `when` on the stages that feed it"))
            continue
        fields = condition.fields()
        if "query.rewritten" in fields and not any(
                a.cls.produces is Port.QUERY for a in GraphView(running).ancestors(sid)):
            issues.append(ConfigIssue(loc, dotted, f"the `when` of '{sid}' reads query.rewritten, but no rewrite stage "
                                      "runs before it, so it is always missing (query.effective is the text in "
                                      "effect)", "warning"))


def _variable_issues(value: Any, path: tuple[str | int, ...], stage_id: str, source: SourceMap) -> list[ConfigIssue]:
    """An environment variable (``${NAME}``, ``$NAME``) in any text of a stage's params: Sieve never expands one
    (a model path, a rule file, a glossary are taken as written), so it is a located error."""
    if isinstance(value, dict):
        return [issue for key, item in value.items() for issue in _variable_issues(item, path + (key,), stage_id, source)]
    if isinstance(value, list):
        return [issue for j, item in enumerate(value) for issue in _variable_issues(item, path + (j,), stage_id, source)]
    if not isinstance(value, str):
        return []
    setting = ".".join(["stages", stage_id, *map(str, path[2:])])  # path: ("stages", i, "params", ...)
    problem = variable_problem(value, f"--set {setting}=VALUE", "value")
    if problem is None:
        return []
    return [ConfigIssue(source.locate(path), ".".join(map(str, path)), problem)]


def _log_path_problem(log: str) -> str | None:
    """Why the trace log could not be a file at ``log`` (relative to the working directory), if it could not."""
    problem = path_problem(log)
    if problem is not None:
        return problem
    path = Path(log).expanduser()
    try:
        if path.is_dir():
            return f"'{log}' is a directory; name the log file (e.g. {(path / 'trace.jsonl').as_posix()})"
        parent = nearest_existing_parent(path)
    except OSError as exc:  # '~' expanded to a path too long, a directory that cannot be searched
        return f"cannot check where the log would go: {exc.strerror or exc}"
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


def _bypass_disabled(
    nodes: dict[str, StageNode],
    disabled: set[str],
    output: str,
    source: SourceMap,
    position: dict[str, int],
    issues: list[ConfigIssue],
) -> tuple[dict[str, StageNode], dict[str, tuple[str, ...]]] | None:
    """The stages that run once the ``disabled`` ones are taken out, each reading, in place of a disabled input, what
    that stage would have read (its one input: what a skipped stage hands on), and for each disabled stage what its
    readers read instead. None (the problems reported, located at the ``enabled`` of the stage at fault) when that
    is not defined: a disabled output, a disabled stage with several inputs, or with none to hand on, that a running
    stage reads (directly or through other disabled stages)."""
    def located(sid: str, *rest: str | int) -> tuple[Any, str]:
        path = ("stages", position[sid], *rest)
        return source.locate(path, prefer_key=not rest[1:]), ".".join(map(str, path))

    def why_not(sid: str) -> str | None:
        """Why what a disabled stage hands on is not defined (None: it is its one input, or none for a rewrite)."""
        node = nodes[sid]
        port = node.cls.produces
        if len(node.inputs) > 1:
            return (f"a disabled stage hands its one input on to the stages that read it, and '{sid}' has "
                    f"{len(node.inputs)} ({', '.join(node.inputs)}), so what they would read is not defined")
        if not node.inputs and port is not Port.QUERY:
            return (f"a disabled stage hands its input on to the stages that read it, and '{sid}' "
                    f"({node.cls.type_name}) has none: it is where their {port.value} come from")
        if node.inputs and nodes[node.inputs[0]].cls.produces is not port:
            dep = node.inputs[0]
            return (f"a disabled stage hands its input on to the stages that read it, and the input of '{sid}' "
                    f"({node.cls.type_name}), '{dep}', gives {nodes[dep].cls.produces.value}, not {port.value}")
        return None

    def hands_on(sid: str, via: tuple[str, ...] = ()) -> tuple[tuple[str, ...] | None, str, tuple[str, ...]]:
        """What the readers of disabled ``sid`` read in its place (None: not defined), the stage at fault, and the
        disabled stages passed through on the way to it."""
        if why_not(sid) is not None:
            return None, sid, via
        inputs = nodes[sid].inputs
        if inputs and inputs[0] in disabled:
            return hands_on(inputs[0], via + (sid,))
        return tuple(inputs), sid, via

    ok = True
    if output in disabled:
        loc, dotted = located(output, "enabled")
        issues.append(ConfigIssue(loc, dotted, f"stage '{output}' is the pipeline's output, whose results a query "
                                  "returns: it cannot be disabled; name another stage as `output:`, or keep it enabled"))
        ok = False
    faults: dict[str, list[str]] = {}  # disabled stage at fault -> the running stages that read it, as said
    readers: dict[str, list[str]] = {sid: [] for sid in disabled}
    running: dict[str, StageNode] = {}
    for sid, node in nodes.items():
        if sid in disabled:
            continue
        inputs: list[str] = []
        for j, dep in enumerate(node.inputs):
            if dep not in disabled:
                given: tuple[str, ...] = (dep,)
            else:
                found, fault, via = hands_on(dep)
                readers[dep].append(sid)
                if found is None:
                    faults.setdefault(fault, []).append(
                        f"'{sid}'" + (f" (through {', '.join(repr(v) for v in via)})" if via else ""))
                    ok = False
                    continue
                given = found
            for replacement in given:
                if replacement in inputs or (replacement != dep and replacement in node.inputs):
                    loc, dotted = located(sid, "inputs", j)
                    issues.append(ConfigIssue(loc, dotted, f"input '{dep}' is disabled, so this stage would read "
                                              f"'{replacement}' in its place, which it reads already; disable this "
                                              "stage too, or keep it enabled"))
                    ok = False
                elif replacement not in inputs:
                    inputs.append(replacement)
        running[sid] = StageNode(sid, node.cls, node.params, tuple(inputs))
    for fault, who in faults.items():
        loc, dotted = located(fault, "enabled")
        issues.append(ConfigIssue(loc, dotted, f"stage '{fault}' is disabled, but {', '.join(who)} "
                                  f"{'reads' if len(who) == 1 else 'read'} it: {why_not(fault)}; change what reads "
                                  "it, or keep it enabled"))
    if not ok:
        return None
    bypassed: dict[str, tuple[str, ...]] = {}
    for sid in sorted(disabled, key=position.__getitem__):
        found, _, _ = hands_on(sid)
        bypassed[sid] = found or ()
        loc, dotted = located(sid, "enabled")
        instead = (f"; {', '.join(repr(r) for r in readers[sid])} {'reads' if len(readers[sid]) == 1 else 'read'} "
                   + (" and ".join(repr(f) for f in found) if found else "the query as asked")
                   + " in its place") if readers[sid] and found is not None else ""
        issues.append(ConfigIssue(loc, dotted, f"stage '{sid}' is disabled (enabled: false): it is not loaded and "
                                  f"does not run{instead}", "warning"))
    return running, bypassed


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
    as_written: dict[str, StageNode] | None = None,
) -> tuple[str | None, list[str]]:
    """Wiring checks: inputs exist and have the right kind, no cycles, one reachable output. ``declared``:
    ids of entries that are not in ``nodes`` because they are invalid (inputs naming them are not
    reported again). ``deep``: every node has valid params, so the stage types' own checks run too.
    ``as_written``: ``nodes`` are what runs of these stages, some disabled; a stage type's problem that the stages as
    written do not have says which disabled stages upstream cause it."""
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
    written = GraphView(as_written, base_dir) if as_written is not None else None
    for sid, node in nodes.items():
        expected: set[tuple[tuple[str | int, ...], str]] = set()
        if written is not None and as_written is not None:  # first: a check may note the wiring it saw (fuse.rrf)
            expected = {(p.path, p.message) for p in node.cls.check_graph(as_written[sid], written)}
        for problem in node.cls.check_graph(node, graph):
            loc, dotted = where(sid, *problem.path)
            message = problem.message
            if written is not None and (problem.path, problem.message) not in expected:
                off = [n.id for n in written.ancestors(sid) if n.id not in nodes]
                message += (f"; {', '.join(repr(o) for o in sorted(off, key=position.__getitem__))} "
                            f"{'is' if len(off) == 1 else 'are'} disabled (enabled: false)") if off else ""
            issues.append(ConfigIssue(loc, dotted, message, problem.severity))
    return output, order
