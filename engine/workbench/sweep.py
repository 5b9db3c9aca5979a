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
from collections.abc import Callable
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml

from engine.errors import SieveError
from engine.evaluation import BeirData, aggregate, load_beir, per_query_metrics, run_pipeline
from engine.workbench.evaluate import latency_summary, machine_summary, measures_for

MAX_VARIANTS = 200
TEST_SPLITS = frozenset({"test"})


@dataclass(frozen=True)
class Setting:
    """One ``--set``: a dotted config path and the values to try there."""

    path: str
    values: tuple[Any, ...]


def parse_setting(text: str) -> Setting:
    """``stages.blend.params.weights.rerank=[0.5, 0.65, 0.8]`` (a YAML list) or ``...=0.5`` (one YAML value)."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path or any(not part for part in path.split(".")):
        raise SieveError(f"--set takes PATH=VALUES (e.g. stages.blend.params.weights.rerank=[0.5, 0.65]), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SieveError(f"--set {path}: the values are not YAML ({exc.problem or exc})") from None
    values = tuple(value) if isinstance(value, list) else (value,)
    if not values:
        raise SieveError(f"--set {path}: an empty list tries nothing")
    if len(set(map(_key, values))) != len(values):
        raise SieveError(f"--set {path}: a value is listed twice")
    return Setting(path, values)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def apply_setting(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``path`` in config data. ``stages.<id>`` addresses a stage by its id; a missing mapping on the way is
    created (a param left at its default), a missing stage or a path through a value that is not a mapping is a
    SieveError naming what exists."""
    parts = path.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if depth == 0 and part == "stages" and isinstance(node.get("stages"), list):
            stage_id = parts[1] if len(parts) > 1 else None
            stages = {s.get("id"): s for s in node["stages"] if isinstance(s, dict)}
            if stage_id not in stages:
                hint = get_close_matches(str(stage_id), [str(s) for s in stages], n=1)
                raise SieveError(f"--set {path}: the config has no stage '{stage_id}'"
                                 + (f" (did you mean '{hint[0]}'?)" if hint else "")
                                 + f"; stages: {', '.join(str(s) for s in stages)}")
            node = stages[stage_id]
            parts = ["stages", *parts[1:]]
            continue
        if depth == 1 and parts[0] == "stages":
            continue  # the stage id, resolved above
        if not isinstance(node, dict):
            raise SieveError(f"--set {path}: {'.'.join(parts[:depth])} is not a mapping, so it has no '{part}'")
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise SieveError(f"--set {path}: {where} is {json.dumps(node, default=str)}, not a mapping")
    if not isinstance(node, dict):
        raise SieveError(f"--set {path}: its parent is not a mapping")
    node[parts[-1]] = value


@dataclass
class Variant:
    settings: dict[str, Any]  # path -> value; empty for the config as written
    config_sha256: str
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]] = field(repr=False)
    latency_ms: dict[str, float]
    degraded: int

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "config_sha256": self.config_sha256,
                "metrics": {k: round(v, 6) for k, v in sorted(self.metrics.items())},
                "latency_ms": self.latency_ms, "degraded_queries": self.degraded}


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

    @property
    def best(self) -> Variant:
        return self.variants[0]

    def note(self) -> str:
        return (f"the best of {len(self.variants)} variants on {self.split} ({self.queries} queries) is an optimistic "
                f"estimate: confirm the chosen config once on held-out queries (sieve eval ... --split test)")

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config, "dataset": self.dataset, "split": self.split, "queries": self.queries,
            "metric": self.metric, "settings": {s.path: list(s.values) for s in self.settings},
            "baseline": self.baseline.to_json(), "variants": [v.to_json() for v in self.variants],
            "best": self.best.to_json(), "best_vs_baseline": self.best_vs_baseline, "note": self.note(),
            "machine": self.machine,
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
) -> SweepReport:
    """Evaluate the config as written and every combination of ``settings`` on ``split``; best first."""
    from engine.compiler import compile_data
    from engine.pipeline import Pipeline
    from engine.yamlsource import load_yaml_file

    if split in TEST_SPLITS and not allow_test:
        raise SieveError(f"refusing to tune on the '{split}' split: its figures would no longer measure anything "
                         "(tune on train or dev, then evaluate the chosen config once on test); --allow-test to do "
                         "it anyway")
    if not settings:
        raise SieveError("give at least one --set PATH=VALUES to sweep")
    paths = [s.path for s in settings]
    if len(set(paths)) != len(paths):
        raise SieveError(f"--set names {next(p for p in paths if paths.count(p) > 1)} twice")
    combos = list(itertools.product(*(s.values for s in settings)))
    if len(combos) > MAX_VARIANTS:
        raise SieveError(f"{len(combos)} combinations (the product of the --set values) is more than {MAX_VARIANTS}: "
                         "sweep fewer values, or one setting at a time")
    if limit is not None and limit < 1:
        raise SieveError(f"--limit must be at least 1, got {limit}")
    measures = measures_for(recall_k)
    base = Pipeline.from_file(config, index_path=index_path)  # the config as written, checked as a file
    loaded = load_yaml_file(config)
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
    for setting in settings:  # a path that names nothing fails now, not after the first variants ran
        apply_setting(copy.deepcopy(loaded.data), setting.path, setting.values[0])
    shared = base.warm_up()
    total = len(combos) + 1

    def run(pipeline: Pipeline, chosen: dict[str, Any], number: int) -> Variant:
        if on_variant is not None:
            on_variant(number, total, chosen)
        pipeline.warm_up(reuse=shared)
        output = run_pipeline(pipeline, queries)
        per_query = per_query_metrics(output.run, qrels, measures)
        return Variant(chosen, pipeline.compiled.config_sha256, aggregate(per_query), per_query,
                       latency_summary(output.latency_ms), output.degraded)

    baseline = run(base, {}, 1)
    variants = []
    for number, values in enumerate(combos, start=2):
        chosen = dict(zip(paths, values))
        variant_data = copy.deepcopy(loaded.data)
        for path, value in chosen.items():
            apply_setting(variant_data, path, value)
        label = f"{config} with " + ", ".join(f"{p}={json.dumps(v, default=str)}" for p, v in chosen.items())
        compiled = compile_data(variant_data, label=label, base_dir=base.compiled.base_dir)
        variants.append(run(Pipeline(compiled, index_path=index_path or base.index_path), chosen, number))
    variants.sort(key=lambda v: (-v.metrics.get(metric, 0.0), _key(v.settings)))
    return SweepReport(str(config), str(dataset), split, len(queries), metric, settings, baseline, variants,
                       _paired(baseline, variants[0], metric))


def _paired(baseline: Variant, best: Variant, metric: str) -> dict[str, Any]:
    from engine.workbench.compare import paired_tests

    qids = sorted(set(baseline.per_query) & set(best.per_query))
    a = [baseline.per_query[q].get(metric, 0.0) for q in qids]
    b = [best.per_query[q].get(metric, 0.0) for q in qids]
    t_p, rand_p = paired_tests(a, b) if qids else (None, None)
    return {"difference": round(sum(y - x for x, y in zip(a, b)) / len(qids), 6) if qids else 0.0,
            "wins": sum(1 for x, y in zip(a, b) if y > x + 1e-12), "losses": sum(1 for x, y in zip(a, b) if x > y + 1e-12),
            "t_test_p": t_p, "randomisation_p": rand_p}


def write_best(report: SweepReport, config: Path, out: Path) -> None:
    """The best variant's config, beside the original (its relative paths, the index's and the rule files', are
    relative to that directory), with a header saying where it came from."""
    from engine.trace import write_text_atomic
    from engine.yamlsource import load_yaml_file

    if out.resolve().parent != config.resolve().parent:
        raise SieveError(f"--best-out {out}: write it beside {config} (in {config.resolve().parent}): the config's "
                         "relative paths (its index, rule files, glossaries) are relative to that directory")
    if out.resolve() == config.resolve():
        raise SieveError(f"--best-out {out} is the config being swept: write the best variant to a new file")
    data = copy.deepcopy(load_yaml_file(config).data)
    for path, value in report.best.settings.items():
        apply_setting(data, path, value)
    chosen = ", ".join(f"{p}={json.dumps(v, default=str)}" for p, v in report.best.settings.items()) or "as written"
    header = (f"# sieve sweep: {config.name} with {chosen}\n"
              f"# {report.metric} {report.best.metrics.get(report.metric, 0.0):.4f} on {report.dataset} "
              f"({report.split}, {report.queries} queries), best of {len(report.variants)}; the config as written: "
              f"{report.baseline.metrics.get(report.metric, 0.0):.4f}\n"
              f"# {report.note()}\n")
    text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110)
    write_text_atomic(out, text)

