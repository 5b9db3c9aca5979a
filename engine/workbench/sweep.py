"""``sieve sweep``: tune a pipeline by configuration, the way an analyst would by hand, over a grid of settings.

Each ``--set PATH=VALUES`` names a config setting by dotted path (a stage by its id: ``stages.blend.params.
weights.rerank``) and the values to try (one YAML value, or a YAML list of them). Every combination is compiled
and checked as a config file would be, run over the judged queries of a split, and scored with pytrec_eval, next
to the config as written. Models and index components are loaded once and shared by every variant.

Tuning on the split that reports the figures makes them worthless as a test, so the test split is refused unless
asked for explicitly; the best of N variants on the tuning split is optimistic (the report says so, with a paired
test against the config as written), and is to be confirmed once on held-out queries.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml

from engine.errors import ConfigError, SieveError
from engine.evaluation import BeirData, aggregate, load_beir, per_query_metrics, run_pipeline
from engine.model import UserContext
from engine.workbench.evaluate import latency_summary, machine_summary, measures_for
from engine.yamlsource import LoadedYaml, load_yaml_text

MAX_VARIANTS = 200
TEST_SPLITS = frozenset({"test"})


@dataclass(frozen=True)
class Setting:
    """One ``--set``: a dotted config path and the values to try there."""

    path: str
    values: tuple[Any, ...]


def split_setting(text: str, form: str = "PATH=VALUES (e.g. stages.blend.params.weights.rerank=[0.5, 0.65])",
                  what: str = "values") -> tuple[str, Any]:
    """``PATH=YAML`` as (the dotted path, the YAML value); a malformed one is a SieveError saying ``form`` (and
    ``what`` the right-hand side holds: a sweep's values, an override's value)."""
    path, loaded = split_setting_located(text, form, what)
    return path, loaded.data


def split_setting_located(text: str, form: str, what: str) -> tuple[str, LoadedYaml]:
    """:func:`split_setting`, the value with its source map: read as a config file is (YAML 1.2: ``NO`` and ``off``
    are text, ``010`` is not octal, a date stays text), located in a "file" named ``--set PATH``."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path or any(not part for part in path.split(".")):
        raise SieveError(f"--set takes {form}, got {text!r}")
    if not raw.strip() or raw.lstrip().startswith("#"):
        raise SieveError(f"--set {path}= gives no value (write null for a null, [a, b] for "
                         f"{'several' if what == 'values' else 'a list'})")
    try:
        loaded = load_yaml_text(raw, f"--set {path}")
    except ConfigError as exc:
        problem = "; ".join(issue.message for issue in exc.issues)
        raise SieveError(f"--set {path}: the {what} {'is' if what == 'value' else 'are'} not YAML "
                         f"({problem})") from None
    loaded.source.forget_positions()
    return path, loaded


def parse_setting(text: str) -> Setting:
    """``stages.blend.params.weights.rerank=[0.5, 0.65, 0.8]`` (a YAML list) or ``...=0.5`` (one YAML value)."""
    path, value = split_setting(text)
    values = tuple(value) if isinstance(value, list) else (value,)
    if not values:
        raise SieveError(f"--set {path}: an empty list tries nothing")
    if len({_key(v) for v in values}) != len(values):
        raise SieveError(f"--set {path}: a value is listed twice")
    parts = path.split(".")
    if parts[0] == "extends":
        raise SieveError(f"--set {path}: a sweep runs the config merged onto its base; set the base's values by "
                         "their paths instead (stages.<id>.params.<name>)")
    if parts[0] in NOT_RESULTS or (parts[0] == "stages" and len(parts) == 3 and parts[2] in ("id", "description")):
        raise SieveError(f"--set {path}: it does not change what a query returns (every variant would score the same)"
                         if parts[-1] != "id" else f"--set {path}: a stage's id names it; sweep its params instead")
    _check_inside_a_stage(path)
    return Setting(path, values)


def _check_inside_a_stage(path: str) -> None:
    """``stages.<id>`` alone would replace the whole stage entry with the value: refused, naming what can be set."""
    parts = path.split(".")
    if parts[0] == "stages" and len(parts) < 3:
        raise SieveError(f"--set {path}: name a setting inside the stage (stages.<id>.params.<name>, "
                         "stages.<id>.inputs, stages.<id>.on_error, stages.<id>.enabled, stages.<id>.when)")


# Top-level sections that do not change what a query returns
NOT_RESULTS = frozenset({"trace", "server", "name", "description", "version"})


def _key(value: Any) -> str:
    """A value's identity for duplicates and ties: 10 and 10.0 are one value."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, default=str)


def apply_setting(data: dict[str, Any], path: str, value: Any) -> tuple[str | int, ...]:
    """Set ``path`` in config data and return where it is in the data (a stage by its position). ``stages.<id>``
    addresses a stage by its id; a missing mapping on the way is created (a param left at its default), a missing
    stage or a path through a value that is not a mapping is a SieveError naming what exists."""
    parts = path.split(".")
    _check_inside_a_stage(path)
    node: Any = data
    where_in: list[str | int] = []
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if depth == 0 and part == "stages" and isinstance(node.get("stages"), list):
            stage_id = parts[1] if len(parts) > 1 else None
            stages = {s.get("id"): i for i, s in enumerate(node["stages"]) if isinstance(s, dict)}  # id -> position
            if stage_id not in stages:
                hint = get_close_matches(str(stage_id), [str(s) for s in stages], n=1)
                raise SieveError(f"--set {path}: the config has no stage '{stage_id}'"
                                 + (f" (did you mean '{hint[0]}'?)" if hint else "")
                                 + f"; stages: {', '.join(str(s) for s in stages)}")
            where_in = ["stages", stages[stage_id]]
            node = node["stages"][stages[stage_id]]
            continue
        if depth == 1 and parts[0] == "stages" and where_in:
            continue  # the stage id, resolved above
        if not isinstance(node, dict):
            raise SieveError(f"--set {path}: {'.'.join(parts[:depth])} is not a mapping, so it has no '{part}'")
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
        where_in.append(part)
        if not isinstance(node, dict):
            raise SieveError(f"--set {path}: {where} is {json.dumps(node, default=str)}, not a mapping")
    if not isinstance(node, dict):
        raise SieveError(f"--set {path}: its parent is not a mapping")
    where_in.append(parts[-1])
    if value is None and len(parts) == 3 and parts[0] == "stages" and parts[2] == "when":
        node.pop("when", None)  # a stage without routing (in a file, an empty `when:` is an error: commented out?)
        return tuple(where_in)
    node[parts[-1]] = value
    return tuple(where_in)


@dataclass
class Variant:
    settings: dict[str, Any]  # path -> value; empty for the config as written
    config_sha256: str
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]] = field(repr=False)
    latency_ms: dict[str, float]
    degraded: int
    error: str | None = None  # a variant that failed at run time: no figures
    warm_up_warnings: list[str] = field(default_factory=list)  # what its stages' warm-up found (Pipeline.warnings)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"settings": self.settings, "config_sha256": self.config_sha256,
                                "metrics": {k: round(v, 6) for k, v in sorted(self.metrics.items())},
                                "latency_ms": self.latency_ms, "degraded_queries": self.degraded}
        if self.error is not None:
            data["error"] = self.error
        return data


@dataclass
class SweepReport:
    config: str
    dataset: str
    split: str
    queries: int
    metric: str
    settings: list[Setting]
    baseline: Variant
    variants: list[Variant]  # the grid, best first
    best_vs_baseline: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=machine_summary)
    config_data: Any = field(default=None, repr=False)  # the config as parsed when the sweep ran
    asked_as: dict[str, Any] = field(default_factory=dict)  # the user and as_of every query was asked with
    empty: int = 0  # queries the config as written answered with no document

    @property
    def best(self) -> Variant:
        """The best variant that ran (variants are sorted best first, failed ones last)."""
        return self.variants[0]

    @property
    def improves(self) -> bool:
        """Whether the best variant scores above the config as written."""
        return self.best.error is None and self.best.metrics.get(self.metric, 0.0) > \
            self.baseline.metrics.get(self.metric, 0.0) + 1e-12

    def note(self) -> str:
        return (f"the best of {len(self.variants)} variants on {self.split} ({self.queries} queries) is an optimistic "
                f"estimate: confirm the chosen config once on held-out queries (sieve eval ... --split test); "
                "latency is measured with the caches the earlier runs warmed (sieve eval measures a config alone)")

    def warnings(self) -> list[str]:
        """Variants that failed or ran degraded, and a grid whose best does not beat the config as written."""
        found = list(self.baseline.warm_up_warnings)  # what warm-up found, once for the config as written ...
        found += [f"variant {_describe(v.settings)}: {w}" for v in self.variants  # ... and what only a variant has
                  for w in v.warm_up_warnings if w not in self.baseline.warm_up_warnings]
        found += [f"variant {_describe(v.settings)} failed: {v.error}" for v in self.variants if v.error is not None]
        found += [f"{'the config as written' if not v.settings else 'variant ' + _describe(v.settings)}: {v.degraded} "
                  f"of {self.queries} queries ran degraded (a stage skipped at the deadline or on an error)"
                  for v in [self.baseline, *self.variants] if v.degraded]
        if not self.improves:
            found.append(f"no variant scores above the config as written ({self.metric} "
                         f"{self.baseline.metrics.get(self.metric, 0.0):.4f})")
        if self.empty:
            user = {k: v for k, v in (self.asked_as.get("user") or {}).items() if v}
            found.append(f"{self.empty} of {self.queries} queries returned no document with the config as written, "
                         f"asked as {user or 'an anonymous user'}: with access rules, sweep as the user whose results "
                         "you mean to tune for (--user, --group, --jurisdiction, --role, --attribute)")
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config, "dataset": self.dataset, "split": self.split, "queries": self.queries,
            "metric": self.metric, "settings": {s.path: list(s.values) for s in self.settings},
            "baseline": self.baseline.to_json(), "variants": [v.to_json() for v in self.variants],
            "best": self.best.to_json(), "best_improves": self.improves, "best_vs_baseline": self.best_vs_baseline,
            "warnings": self.warnings(), "note": self.note(), "asked_as": self.asked_as, "machine": self.machine,
        }


def sweep(
    config: Path,
    dataset: Path,
    settings: list[Setting],
    *,
    split: str = "train",
    index_path: Path | None = None,
    limit: int | None = None,
    metric: str = "ndcg_cut_10",
    recall_k: int = 10,
    allow_test: bool = False,
    data: BeirData | None = None,
    on_variant: Callable[[int, int, dict[str, Any]], None] | None = None,
    user: UserContext | None = None,
    as_of: datetime | None = None,
) -> SweepReport:
    """Evaluate the config as written and every combination of ``settings`` on ``split``; best first. Every query
    of every variant is asked as ``user`` (default: anonymous) at ``as_of`` (default: when the sweep starts)."""
    from engine.compiler import compile_data, compile_loaded, load_config_file
    from engine.pipeline import Pipeline

    if split in TEST_SPLITS and not allow_test:
        raise SieveError(f"refusing to tune on the '{split}' split: its figures would no longer measure anything "
                         "(tune on train or dev, then evaluate the chosen config once on test); --allow-test to do "
                         "it anyway")
    if not settings:
        raise SieveError("give at least one --set PATH=VALUES to sweep")
    paths = [s.path for s in settings]
    if len(set(paths)) != len(paths):
        raise SieveError(f"--set names {next(p for p in paths if paths.count(p) > 1)} twice")
    count = math.prod(len(s.values) for s in settings)  # before anything is built: 4 x 100 values is 1e8
    if count > MAX_VARIANTS:
        raise SieveError(f"{count} combinations (the product of the --set values) is more than {MAX_VARIANTS}: "
                         "sweep fewer values, or one setting at a time")
    if index_path is not None and "index" in paths:
        raise SieveError("--set index and --index together: --index would override every variant's index")
    if limit is not None and limit < 1:
        raise SieveError(f"--limit must be at least 1, got {limit}")
    measures = measures_for(recall_k)
    loaded = load_config_file(config)  # read once (merged onto what it extends): the config as written, every variant's base
    base = Pipeline(compile_loaded(loaded, base_dir=config.resolve().parent, check_log_path=True),
                    index_path=index_path)
    if data is None:
        data = load_beir(dataset, split)
    queries = dict(list(data.queries.items())[:limit]) if limit is not None else data.queries
    qrels = {qid: data.qrels[qid] for qid in queries}
    first = next(iter(queries))
    names = sorted(aggregate(per_query_metrics({first: {"-": 1.0}}, {first: qrels[first]}, measures)))
    if metric not in names:
        hint = get_close_matches(metric, names, n=1)
        raise SieveError(f"--metric {metric} is not a measure sweep computes"
                         + (f" (did you mean '{hint[0]}'?)" if hint else "") + f"; measures: {', '.join(names)}")
    # Every variant is compiled and checked before any query runs: a bad value is found now, not hours in.
    pipelines: list[tuple[dict[str, Any], Pipeline]] = []
    problems: dict[str, list[str]] = {}  # what is wrong -> the variants it is wrong in (said once for them all)
    for values in itertools.product(*(s.values for s in settings)):
        chosen = dict(zip(paths, values))
        variant_data = copy.deepcopy(loaded.data)
        try:
            for path, value in chosen.items():
                apply_setting(variant_data, path, value)
            compiled = compile_data(variant_data, label=str(config), base_dir=base.compiled.base_dir)
        except ConfigError as exc:
            said = "; ".join(f"{i.path}: {i.message}" for i in exc.issues if i.severity == "error")
            problems.setdefault(said, []).append(_describe(chosen))
            continue
        except SieveError as exc:
            problems.setdefault(str(exc), []).append(_describe(chosen))
            continue
        own_index = index_path or compiled.index_path  # a variant that sets `index` runs on that index
        pipelines.append((chosen, Pipeline(compiled, index_path=own_index)))
    if problems:
        invalid = sum(len(variants) for variants in problems.values())
        lines = [f"{said} ({'every variant' if len(variants) == count else _some(variants)})"
                 for said, variants in problems.items()]
        shown = lines[:10] + ([f"… and {len(lines) - 10} more problems"] if len(lines) > 10 else [])
        raise SieveError(f"{invalid} of {count} variants are not valid configs (nothing was run):\n  "
                         + "\n  ".join(shown))
    shared = base.warm_up()
    total = count + 1

    context = {"user": user if user is not None else UserContext(),
               "as_of": as_of if as_of is not None else datetime.now(timezone.utc)}  # one time for every variant
    empty = 0  # queries the config as written answers with no document

    def run(pipeline: Pipeline, chosen: dict[str, Any], number: int) -> Variant:
        nonlocal empty
        if on_variant is not None:
            on_variant(number, total, chosen)
        try:
            pipeline.warm_up(reuse=shared)
            output = run_pipeline(pipeline, queries, context=context)
        except SieveError as exc:  # this variant fails (a model, an index, a query it refuses): the others run
            if not chosen:
                raise
            return Variant(chosen, pipeline.compiled.config_sha256, {}, {}, latency_summary([]), 0, str(exc))
        finally:
            if pipeline is not base:  # what a variant opened of its own (another index) is released as it ends
                pipeline.close()
        per_query = per_query_metrics(output.run, qrels, measures)
        if not chosen:
            empty = output.empty
        return Variant(chosen, pipeline.compiled.config_sha256, aggregate(per_query), per_query,
                       latency_summary(output.latency_ms), output.degraded,
                       warm_up_warnings=list(pipeline.warnings))

    with base:  # the index and models every variant shares, released once all have run
        baseline = run(base, {}, 1)
        variants = [run(pipeline, chosen, number) for number, (chosen, pipeline) in enumerate(pipelines, start=2)]
    variants.sort(key=lambda v: (v.error is not None, -v.metrics.get(metric, 0.0), _key(v.settings)))
    return SweepReport(str(config), str(dataset), split, len(queries), metric, settings, baseline, variants,
                       _paired(baseline, variants[0], metric), config_data=loaded.data,
                       asked_as={"user": context["user"].model_dump(mode="json"),
                                 "as_of": context["as_of"].isoformat()}, empty=empty)


def _some(variants: list[str], shown: int = 3) -> str:
    return "; ".join(variants[:shown]) + (f"; and {len(variants) - shown} more" if len(variants) > shown else "")


def _describe(chosen: dict[str, Any]) -> str:
    return ", ".join(f"{path}={json.dumps(value, default=str)}" for path, value in chosen.items()) or "as written"


def _paired(baseline: Variant, best: Variant, metric: str) -> dict[str, Any]:
    from engine.workbench.compare import paired_tests

    qids = sorted(set(baseline.per_query) & set(best.per_query))
    a = [baseline.per_query[q].get(metric, 0.0) for q in qids]
    b = [best.per_query[q].get(metric, 0.0) for q in qids]
    t_p, rand_p = paired_tests(a, b) if qids else (None, None)
    return {"difference": round(sum(y - x for x, y in zip(a, b)) / len(qids), 6) if qids else 0.0,
            "wins": sum(1 for x, y in zip(a, b) if y > x + 1e-12), "losses": sum(1 for x, y in zip(a, b) if x > y + 1e-12),
            "t_test_p": t_p, "randomisation_p": rand_p}


def check_best_out(config: Path, out: Path) -> None:
    """Where ``--best-out`` may write, checked before a sweep runs: beside the config (its relative paths, the
    index's and the rule files', are relative to that directory), a new file (a config is never overwritten, nor
    the file a symlink names)."""
    if out.is_symlink() or out.exists():
        raise SieveError(f"--best-out {out} exists already: give a new file name (sweep never overwrites a config)")
    if out.resolve().parent != config.resolve().parent:
        raise SieveError(f"--best-out {out}: write it beside {config} (in {config.resolve().parent}): the config's "
                         "relative paths (its index, rule files, glossaries) are relative to that directory")


def write_best(report: SweepReport, config: Path, out: Path) -> None:
    """The best variant's config, beside the original, with a header saying where it came from. Refused when no
    variant scores above the config as written (the best of the grid would be a worse config). The file is the
    parsed config written out again: the original's comments and YAML anchors are not kept."""
    check_best_out(config, out)
    if not report.improves:
        raise SieveError(f"no variant scores above the config as written ({report.metric} "
                         f"{report.baseline.metrics.get(report.metric, 0.0):.4f}): nothing written to {out}")
    data = copy.deepcopy(report.config_data)  # what the sweep ran, whatever the file holds now
    for path, value in report.best.settings.items():
        apply_setting(data, path, value)
    header = (f"# sieve sweep: {config.name} with {_describe(report.best.settings)}\n"
              f"# {report.metric} {report.best.metrics.get(report.metric, 0.0):.4f} on {report.dataset} "
              f"({report.split}, {report.queries} queries), best of {len(report.variants)}; the config as written: "
              f"{report.baseline.metrics.get(report.metric, 0.0):.4f}\n"
              f"# {report.note()}\n"
              f"# written out from the parsed {config.name}: its comments and YAML anchors are not kept\n")
    text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110)
    temporary = out.with_name(f".{out.name[:96]}.tmp-{os.getpid()}")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, out)  # whole or not at all, and never over a file that appeared meanwhile
    except FileExistsError:
        raise SieveError(f"--best-out {out} appeared while the sweep ran: nothing written") from None
    finally:
        temporary.unlink(missing_ok=True)
