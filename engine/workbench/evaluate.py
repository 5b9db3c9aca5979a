"""``sieve eval``: run a pipeline over a BEIR split and score it with pytrec_eval.

Metrics come from :mod:`engine.evaluation` (pytrec_eval, i.e. trec_eval's own code); this module
adds the measure set, per-stage latency percentiles from the traces' stage timings, and the
machine-readable report that ``--json`` prints and ``bench/results`` stores.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine import __version__
from engine.errors import SieveError
from engine.evaluation import BeirData, RunOutput, load_beir, per_query_metrics, aggregate, percentile, run_pipeline
from engine.model import UserContext

#: Metrics shown first in tables, in this order (pytrec_eval spelling; mrr_10 is ours, see evaluation.py).
PRIMARY = ("ndcg_cut_10", "mrr_10", "map")


def measures_for(recall_k: int) -> tuple[str, ...]:
    """pytrec_eval measure strings: nDCG@10, Recall@100 and Recall@``recall_k``, MAP, reciprocal rank."""
    if recall_k < 1:
        raise SieveError(f"--recall-k must be at least 1, got {recall_k}")
    cutoffs = ",".join(str(k) for k in sorted({100, recall_k}))
    return ("ndcg_cut.10", f"recall.{cutoffs}", "map", "recip_rank")


def latency_summary(values: list[float]) -> dict[str, float]:
    """p50, p95 and mean of a list of milliseconds (rounded to microseconds)."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "mean": 0.0, "count": 0}
    return {
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "mean": round(statistics.fmean(values), 3),
        "count": len(values),
    }


def machine_summary() -> dict[str, Any]:
    """The machine a measurement ran on (CPU model, usable cores, load): stored with every report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    info: dict[str, Any] = {"cpu": cpu, "cpu_cores_usable": cores, "python": platform.python_version()}
    try:
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


@dataclass
class EvalReport:
    """Everything ``sieve eval`` measured for one pipeline on one split."""

    config: str
    config_sha256: str
    pipeline_name: str | None
    dataset: str
    split: str
    index: dict[str, Any] | None
    queries: int
    recall_k: int
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    latency_ms: dict[str, float]
    stage_latency_ms: dict[str, dict[str, Any]]
    run: dict[str, dict[str, float]] = field(repr=False)
    machine: dict[str, Any] = field(default_factory=machine_summary)
    run_file: str | None = None
    trace_log: str | None = None  # where each query's trace was appended, if anywhere
    # queries that ran with a stage skipped (on_error: skip) and, per stage, how often at the deadline or on an error
    degraded: dict[str, Any] = field(default_factory=lambda: {"queries": 0, "stages": {}})
    asked_as: dict[str, Any] = field(default_factory=dict)  # the user and as_of every query was asked with
    empty: int = 0  # queries that returned no document
    settings: list[str] = field(default_factory=list)  # the --set overrides the config ran with
    warm_up_warnings: list[str] = field(default_factory=list)  # what the stages' warm-up found (Pipeline.warnings)

    def empty_warning(self) -> str | None:
        """A sentence for the console when queries returned nothing: all of them usually means the user the
        queries were asked as may see nothing (an access-controlled pipeline evaluated as an anonymous user)."""
        if not self.empty:
            return None
        user = self.asked_as.get("user") or {}
        who = ", ".join(f"{k} {v}" for k, v in user.items() if v) or "an anonymous user (no --user/--group/...)"
        share = "every query" if self.empty == self.queries else f"{self.empty} of {self.queries} queries"
        return (f"{share} returned no document, asked as {who} at {self.asked_as.get('as_of', '?')}: with access "
                "rules, evaluate as the user whose results you mean to measure (--user, --group, --jurisdiction, "
                "--role, --attribute, --as-of)")

    def degraded_warning(self) -> str | None:
        """A sentence for the console when some queries ran degraded (their figures are those of the cut runs)."""
        count = self.degraded["queries"]
        if not count:
            return None
        parts = [f"'{sid}' skipped in " + " and ".join(f"{n} ({'at the deadline' if why == 'deadline' else 'on an error'})"
                                                          for why, n in sorted(counts.items()))
                 for sid, counts in self.degraded["stages"].items()]
        return (f"{count} of {self.queries} queries ran degraded ({'; '.join(parts)}): the figures are those of "
                "the runs as cut, not of the whole pipeline")

    def to_json(self, *, per_query: bool = False) -> dict[str, Any]:
        """The ``--json`` document; per-query figures only when asked (they are long)."""
        data: dict[str, Any] = {
            "engine_version": __version__,
            "config": self.config,
            "config_sha256": self.config_sha256,
            "pipeline": self.pipeline_name,
            "dataset": self.dataset,
            "split": self.split,
            "index": self.index,
            "queries": self.queries,
            "recall_k": self.recall_k,
            "metrics": {name: round(value, 6) for name, value in sorted(self.metrics.items())},
            "latency_ms": self.latency_ms,
            "stage_latency_ms": self.stage_latency_ms,
            "run_file": self.run_file,
            "trace_log": self.trace_log,
            "degraded": self.degraded,
            "asked_as": self.asked_as,
            "settings": self.settings,
            "empty_queries": self.empty,
            "warm_up_warnings": self.warm_up_warnings,
            "machine": self.machine,
        }
        if per_query:
            data["per_query"] = self.per_query
        return data


def ordered_metric_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Primary metrics first, then recall cut-offs by depth, then the rest alphabetically."""
    def key(name: str) -> tuple[int, int, str]:
        if name in PRIMARY:
            return (0, PRIMARY.index(name), name)
        if name.startswith("recall_") and name[7:].isdigit():
            return (1, int(name[7:]), name)
        return (2, 0, name)

    return sorted(names, key=key)


def evaluate_pipeline(
    config: Path,
    dataset: Path,
    *,
    split: str = "test",
    index_path: Path | None = None,
    limit: int | None = None,
    recall_k: int = 10,
    on_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    trace_log: Path | None = None,
    data: BeirData | None = None,
    user: UserContext | None = None,
    as_of: datetime | None = None,
    settings: tuple[str, ...] = (),
) -> EvalReport:
    """Run ``config`` over the judged queries of ``dataset``/``split`` and score the run (``data``: that data set
    when the caller has already read it). Every query is asked as ``user`` (default: anonymous) at ``as_of``
    (default: the time the evaluation starts, one time for all queries), and the report records both."""
    from engine.pipeline import Pipeline

    measures = measures_for(recall_k)
    if limit is not None and limit < 1:
        raise SieveError(f"--limit must be at least 1, got {limit}")
    if data is None:
        data = load_beir(dataset, split)
    queries = data.queries
    if limit is not None:
        queries = dict(list(queries.items())[:limit])
    qrels = {qid: data.qrels[qid] for qid in queries}
    with Pipeline.from_file(config, index_path=index_path, settings=settings) as pipeline:
        resources = pipeline.warm_up()
        if resources.index is not None:
            judged = {doc_id for judgements in qrels.values() for doc_id, grade in judgements.items() if grade > 0}
            if judged and not any(resources.index.row_of(doc_id) is not None for doc_id in sorted(judged)):
                raise SieveError(f"none of the {len(judged)} relevant documents judged in {dataset} ({split}) is in "
                                 f"the index {resources.index.path}: every metric would be 0; is it the index of this "
                                 "data set?")
        if on_start is not None:
            on_start(len(queries))
        user = user if user is not None else UserContext()
        as_of = as_of if as_of is not None else datetime.now(timezone.utc)
        output: RunOutput = run_pipeline(pipeline, queries, progress, trace_log=trace_log,
                                         context={"user": user, "as_of": as_of})
        resources = pipeline.resources
        index = resources.index.describe() if resources is not None and resources.index is not None else None
    per_query = per_query_metrics(output.run, qrels, measures)
    compiled = pipeline.compiled
    stage_types = {sid: compiled.stages[sid].qualified_name() for sid in compiled.order}
    return EvalReport(
        config=str(config),
        config_sha256=compiled.config_sha256,
        pipeline_name=compiled.config.name,
        dataset=str(dataset),
        split=split,
        index=index,
        queries=len(queries),
        recall_k=recall_k,
        metrics=aggregate(per_query),
        per_query=per_query,
        latency_ms=latency_summary(output.latency_ms),
        stage_latency_ms={  # of the queries each stage ran for; a `when` that routed queries past it: bypassed
            sid: {"type": stage_types.get(sid, "?"), **latency_summary(values),
                  **({"bypassed": output.bypassed[sid]} if sid in output.bypassed else {})}
            for sid, values in output.stage_latency_ms.items()
        },
        run=output.run,
        trace_log=str(trace_log) if trace_log is not None else None,
        degraded={"queries": output.degraded, "stages": output.skipped},
        asked_as={"user": user.model_dump(mode="json"), "as_of": as_of.isoformat()},
        settings=list(settings),
        empty=output.empty,
        warm_up_warnings=list(pipeline.warnings),
    )
