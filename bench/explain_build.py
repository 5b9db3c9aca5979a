"""The engine's part of a traced query's explanations: the root node per returned document and the trees as dicts.

With ``trace.explain`` on, each returned document's entry in the trace holds its explanation tree as dicts: the
root (the final score, which stage gave it) over each ledger entry's tree from its stage's ``explain``. After
bench/bm25_explain.py made the BM25 stage's term nodes fast, a profile (cProfile, SciFact test, BM25 top 100) put
the rest of the explanations' time in the engine: ``Pipeline.explain`` looked up each ledger entry's stage and
outcome and the trace settings again for every document; ``Explanation.to_dict`` recursed with a call and a list
comprehension per node, leaves included (four in five nodes of a BM25 tree are term leaves); and each node's
frozen-dataclass ``__init__`` set its three fields through ``object.__setattr__``. Now ``Pipeline._explainer``
looks the stages up once per query, the trace makes the root as a dict directly, ``explanation_dicts`` makes the
dicts with a call per inner node only (reading each node's instance dict), and ``Explanation.__init__`` fills the
instance dict itself.

Measured in one run, on SciFact test (the first ``--queries`` claims, 300 by default: all of them; the full corpus
of 5,183 abstracts), BM25 top 100, the variants alternating query by query, ``--repeats`` timed passes after a
warm-up pass:

- pipeline level (``Pipeline.search``, the whole trace built, nothing logged): ``trace.explain`` off; on with the
  pre-change code; on with the current code;
- per candidate (the same query's finished run, its stage outcomes kept): what the trace does per returned
  document to give it its explanation (the tree, then as dicts), pre-change and current; and of it, the trees to
  dicts alone (``to_dict``, ``explanation_dicts``) over the same trees.

The pre-change code is a copy below (labelled): ``Pipeline._trace`` and ``Pipeline.explain`` as a Pipeline
subclass's, the dataclass-generated ``Explanation.__init__`` and the recursive ``to_dict``, installed on
``Explanation`` for the pre-change variants' blocks only (the stages make their nodes with it then too). Every
query's explanations are compared, pre-change against current (the traces' result records, the trees, the dicts
and their JSON, key order included): the run stops at the first difference.

Usage: .venv/bin/python bench/explain_build.py [--queries 300] [--repeats 5]
Writes bench/results/explain_build.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench._common import SCIFACT, host, scifact_bm25_index, write_results  # noqa: E402
from engine import __version__  # noqa: E402
from engine.model import Candidate, Query  # noqa: E402
from engine.pipeline import Pipeline, StageOutcome  # noqa: E402
from engine.stage import Explanation, explanation_dicts  # noqa: E402
from engine.trace import TRACE_SCHEMA  # noqa: E402

CONFIG = """version: 1
index: {index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: {top_k}}}}}
trace: {{log: null, explain: {explain}}}
executor: {{max_workers: 1}}
"""


# ---------------------------------------------------------------- the pre-change implementation (baseline)
# A copy of engine/stage.py's Explanation and engine/pipeline.py's Pipeline._trace and Pipeline.explain before this
# change, kept here so that each run of the benchmark measures its baseline on the same machine, index and queries.


@dataclass(frozen=True)
class PreChangeExplanation:
    """Pre-change ``Explanation``: its dataclass-generated ``__init__`` and its ``to_dict`` are what the pre-change
    variants install on ``Explanation`` (``pre_change_explanation``)."""

    value: float
    description: str
    details: tuple["Explanation", ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "description": self.description,
            "details": [d.to_dict() for d in self.details],
        }


@contextmanager
def pre_change_explanation() -> Iterator[None]:
    """Within it, ``Explanation`` is built and turned to dicts by the pre-change code (every stage's nodes too)."""
    saved = Explanation.__dict__["__init__"], Explanation.__dict__["to_dict"]
    Explanation.__init__ = PreChangeExplanation.__init__  # type: ignore[method-assign]
    Explanation.to_dict = PreChangeExplanation.to_dict  # type: ignore[method-assign]
    try:
        yield
    finally:
        Explanation.__init__, Explanation.to_dict = saved  # type: ignore[method-assign]


class PreChangePipeline(Pipeline):
    """A pipeline whose trace and ``explain`` are the pre-change ones (the run itself is the current one)."""

    def _trace(
        self,
        query: Query,
        final_query: Query,
        outcomes: dict[str, StageOutcome],
        results: list[Candidate],
        total_ms: float,
        degraded: bool,
    ) -> dict[str, Any]:
        compiled = self.compiled
        settings = compiled.config.trace
        resources = self.resources
        assert resources is not None
        query_record: dict[str, Any] = {
            "text_sha256": query.text_sha256(),
            "as_of": query.as_of.isoformat(),
            "user": query.user.model_dump(mode="json"),
            "language": query.language,
            "history_turns": len(query.history),
        }
        if settings.include_query_text:
            query_record["text"] = query.text
            query_record["history"] = list(query.history)
            query_record["rewritten"] = final_query.rewritten
        else:  # the text stays out of the trace; hashes let an auditor or a replay match it (null: not rewritten)
            rewritten = final_query.rewritten
            query_record["rewritten_sha256"] = (None if rewritten is None
                                                else hashlib.sha256(rewritten.encode("utf-8")).hexdigest())
            if query.history:  # the turns' hashes let a replay check the turns given
                query_record["history_sha256"] = [hashlib.sha256(turn.encode("utf-8")).hexdigest()
                                                  for turn in query.history]
        models = []
        for stage_id in compiled.order:
            identity = compiled.stages[stage_id].identity()
            if identity:
                models.append({"stage": stage_id, **identity})
        documents = {}
        if settings.include_document_text and resources.index is not None and results:
            documents = resources.index.documents.get([c.row for c in results])
        result_records = []
        for rank, candidate in enumerate(results, start=1):
            entry: dict[str, Any] = {
                "rank": rank,
                "doc_id": candidate.doc_id,
                "score": candidate.score,
                "ledger": [
                    {"stage": e.stage, "signal": e.signal, "value": e.value, "rank": e.rank}
                    for e in candidate.ledger
                ],
            }
            if settings.explain:
                entry["explanation"] = self.explain(candidate, outcomes).to_dict()
            if candidate.row in documents:
                doc = documents[candidate.row]
                entry["document"] = {"title": doc.title, "text": doc.text}
            result_records.append(entry)
        return {
            "schema": TRACE_SCHEMA,
            "trace_id": uuid.uuid4().hex,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "engine_version": __version__,
            "config": {
                "file": str(compiled.source_file),
                "dir": str(compiled.base_dir),
                "sha256": compiled.config_sha256,
                "resolved": compiled.canonical,
                **({"set": list(self.settings)} if self.settings else {}),
                # the base configs the file extends (resolved holds the merged config), nearest first
                **({"extends": [dict(base) for base in compiled.extends]} if compiled.extends else {}),
            },
            "index": self._index_record(resources.index) if resources.index is not None else None,
            "models": models,
            "query": query_record,
            "degraded": degraded,
            # what the stages' warm-up found that changes what the pipeline does (Pipeline.warnings)
            **({"warnings": list(self.warnings)} if self.warnings else {}),
            "timing_ms": {"total": round(total_ms, 3)},
            "stages": [outcomes[sid].record for sid in compiled.order],
            # stages the config switched off (enabled: false) and what their readers read instead
            **({"disabled": {sid: list(instead) for sid, instead in compiled.disabled.items()}} if compiled.disabled
               else {}),
            "output": compiled.output,
            "results": result_records,
        }

    def explain(self, candidate: Candidate, outcomes: dict[str, StageOutcome]) -> Explanation:
        """Explanation tree: the final score at the root, each ledger entry's own tree below."""
        trace_text = self.compiled.config.trace.include_query_text
        details = []
        for entry in candidate.ledger:
            stage = self.compiled.stages.get(entry.stage)
            if stage is not None and entry.stage in outcomes:
                stage_query = outcomes[entry.stage].query
                details.append(stage.explain(stage_query, candidate, entry.value, entry.rank, trace_text))
        return Explanation(
            candidate.score,
            f"score of '{candidate.doc_id}' from stage '{candidate.ledger[-1].stage}'"
            if candidate.ledger
            else f"'{candidate.doc_id}' was never scored",
            tuple(details),
        )


# ---------------------------------------------------------------- measuring


def current_entries(pipeline: Pipeline, outcomes: dict[str, StageOutcome], results: list[Candidate]) -> list[Any]:
    """What the current ``Pipeline._trace`` does for each returned document's explanation."""
    explain = pipeline._explainer(outcomes)
    entries = []
    for candidate in results:
        value, description, trees = explain(candidate)
        entries.append({"value": value, "description": description, "details": explanation_dicts(trees)})
    return entries


def summary(values: list[float]) -> dict[str, float]:
    from engine.evaluation import percentile

    return {"p50_ms": round(statistics.median(values), 4), "p95_ms": round(percentile(values, 95), 4),
            "mean_ms": round(statistics.fmean(values), 4)}


def same(a: Any, b: Any) -> bool:
    """Equal, and written alike as JSON (floats bit for bit, dict keys in the same order)."""
    return a == b and json.dumps(a) == json.dumps(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=300, help="the first N SciFact test claims (300: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the queries (after one warm-up)")
    parser.add_argument("--top-k", type=int, default=100)
    args = parser.parse_args()

    import bm25s
    import numpy

    from engine.compiler import compile_file
    from engine.evaluation import load_beir

    info = host(numpy=numpy.__version__, bm25s=bm25s.__version__)
    print("machine:", json.dumps(info))
    index = scifact_bm25_index()
    data = load_beir(SCIFACT, "test")
    texts = [data.queries[qid] for qid in list(data.queries)[: args.queries]]

    with tempfile.TemporaryDirectory(prefix="sieve-bench-explain-build-") as scratch:
        configs = {}
        for explain in ("true", "false"):
            configs[explain] = Path(scratch) / f"explain-{explain}.yaml"
            configs[explain].write_text(CONFIG.format(index=index, top_k=args.top_k, explain=explain), encoding="utf-8")
        current = Pipeline(compile_file(configs["true"]))
        resources = current.warm_up()
        pre_change = PreChangePipeline(compile_file(configs["true"]))
        pre_change.warm_up(reuse=resources)
        no_explain = Pipeline(compile_file(configs["false"]))
        no_explain.warm_up(reuse=resources)

        def code(name: str) -> Any:
            """The Explanation code a variant runs with (installed outside its timing)."""
            return pre_change_explanation() if "pre-change" in name else nullcontext()

        pipeline_ms: dict[str, list[float]] = {k: [] for k in (
            "trace.explain off", "trace.explain on, pre-change", "trace.explain on, current")}
        candidate_ms: dict[str, list[float]] = {k: [] for k in (
            "pre-change: explanations", "current: explanations", "pre-change: to_dict", "current: explanation_dicts")}
        candidates_explained: list[int] = []
        compared = 0
        for repeat in range(args.repeats + 1):
            timed = repeat > 0
            for i, text in enumerate(texts):
                pipelines = [("trace.explain off", no_explain), ("trace.explain on, pre-change", pre_change),
                             ("trace.explain on, current", current)]
                shift = (i + repeat) % len(pipelines)
                traced = {}
                for name, pipeline in pipelines[shift:] + pipelines[:shift]:
                    with code(name):
                        began = time.perf_counter()
                        traced[name] = pipeline.search(text, log=False)
                        elapsed = (time.perf_counter() - began) * 1000.0
                    if timed:
                        pipeline_ms[name].append(elapsed)
                old_records = traced["trace.explain on, pre-change"].trace["results"]
                new_records = traced["trace.explain on, current"].trace["results"]
                if not same(old_records, new_records):
                    raise SystemExit(f"query {i}: the traces' result records differ (pre-change vs current)")

                # per candidate: one finished run of the query, its outcomes kept (the stages' notes made)
                run = current.run(current.make_query(text), keep_outcomes=True)
                outcomes, results = run.outcomes, run.results
                assert outcomes is not None
                # the pre-change explain on the current pipeline: the same stages, whose notes this run made
                old_explain = PreChangePipeline.explain.__get__(current)
                with pre_change_explanation():
                    old_trees = [old_explain(c, outcomes) for c in results]
                new_trees = [current.explain(c, outcomes) for c in results]
                if old_trees != new_trees:
                    raise SystemExit(f"query {i}: the explanation trees differ (pre-change vs current)")

                variants = [
                    ("pre-change: explanations", lambda: [old_explain(c, outcomes).to_dict() for c in results]),
                    ("current: explanations", lambda: current_entries(current, outcomes, results)),
                    ("pre-change: to_dict", lambda: [tree.to_dict() for tree in old_trees]),
                    ("current: explanation_dicts", lambda: explanation_dicts(new_trees)),
                ]
                shift = (i + repeat) % len(variants)
                made = {}
                for name, call in variants[shift:] + variants[:shift]:
                    with code(name):
                        began = time.perf_counter()
                        made[name] = call()
                        elapsed = (time.perf_counter() - began) * 1000.0
                    if timed:
                        candidate_ms[name].append(elapsed)
                expected = [record["explanation"] for record in run.trace["results"]]
                if not all(same(made[name], expected) for name in made) or not same(expected, [
                        record["explanation"] for record in new_records]):
                    raise SystemExit(f"query {i}: the explanations as dicts differ (pre-change vs current)")
                if timed:
                    candidates_explained.append(len(results))
                compared += 1

    pipeline = {name: summary(values) for name, values in pipeline_ms.items()}
    per_query = {name: summary(values) for name, values in candidate_ms.items()}
    explained = statistics.median(candidates_explained)
    per_candidate_us = {name: round(v["p50_ms"] * 1000.0 / explained, 3) for name, v in per_query.items()}
    off = pipeline["trace.explain off"]["p50_ms"]
    shares = {  # explanations' share of the traced query's p50 (against the same pipeline with trace.explain off)
        impl: round((pipeline[f"trace.explain on, {impl}"]["p50_ms"] - off) / pipeline[f"trace.explain on, {impl}"][
            "p50_ms"], 3) for impl in ("pre-change", "current")}
    speedup = {
        "traced query p50": round(pipeline["trace.explain on, pre-change"]["p50_ms"]
                                  / pipeline["trace.explain on, current"]["p50_ms"], 2),
        "explanations added to the query p50": round(
            (pipeline["trace.explain on, pre-change"]["p50_ms"] - off)
            / (pipeline["trace.explain on, current"]["p50_ms"] - off), 2),
        "explanations per candidate": round(per_candidate_us["pre-change: explanations"]
                                            / per_candidate_us["current: explanations"], 2),
        "to dicts per candidate": round(per_candidate_us["pre-change: to_dict"]
                                        / per_candidate_us["current: explanation_dicts"], 2),
    }
    payload: dict[str, Any] = {
        "machine": info,
        "corpus": {"documents": 5183, "source": str(SCIFACT)},
        "queries": len(texts),
        "repeats": args.repeats,
        "top_k": args.top_k,
        "candidates_explained_median": explained,
        "explanations_identical_queries": compared,
        "pipeline": pipeline,
        "explanation_share_of_p50": shares,
        "explanations_per_query": per_query,
        "per_candidate_us": per_candidate_us,
        "speedup": speedup,
    }
    load = info.get("load_average_at_start")
    pipeline_rows = "\n".join(f"| {name} | {v['p50_ms']:.3f} | {v['p95_ms']:.3f} | {v['mean_ms']:.3f} |"
                              for name, v in pipeline.items())
    candidate_rows = "\n".join(
        f"| {name} | {v['p50_ms']:.3f} | {v['p95_ms']:.3f} | {per_candidate_us[name]:.2f} |"
        for name, v in per_query.items())
    markdown = f"""# The engine's part of the explanations: root nodes and dicts, pre-change vs current

Machine: {info['cpu']}, {info['cpu_cores_usable']} usable cores, Python {info['python']}, numpy {info['numpy']},
bm25s {info['bm25s']}; load average at start {load} (the cores are shared with other jobs: read the medians).

SciFact test, {len(texts)} claims x {args.repeats} timed passes (after a warm-up pass), the full corpus (5,183
abstracts), BM25 (lucene) top {args.top_k}: {explained:.0f} candidates explained per query (median). The variants
alternate query by query. The pre-change code is a copy kept in `bench/explain_build.py`; its result records,
trees and dicts (JSON, key order included) and the current ones were identical in all {compared} query runs
compared (every pass).

## A traced query (`Pipeline.search`, the whole trace built, nothing logged)

| pipeline | p50 ms | p95 ms | mean ms |
|---|---:|---:|---:|
{pipeline_rows}

Traced query p50: **{speedup['traced query p50']:.2f}x** faster; what the explanations add to it (against
`trace.explain` off): {pipeline['trace.explain on, pre-change']['p50_ms'] - off:.3f} ms ->
{pipeline['trace.explain on, current']['p50_ms'] - off:.3f} ms ({speedup['explanations added to the query p50']:.2f}x),
{shares['pre-change']:.0%} of the traced query pre-change, {shares['current']:.0%} now.

## Per candidate (a finished run's outcomes; what the trace does per returned document)

| variant | p50 ms per query | p95 ms | µs per candidate (p50) |
|---|---:|---:|---:|
{candidate_rows}

"explanations": the tree (root, the BM25 stage's node and its term nodes, the query's term nodes already made),
then as dicts; "to_dict" / "explanation_dicts": the same trees to dicts alone. Per candidate
{per_candidate_us['pre-change: explanations']:.2f} µs -> {per_candidate_us['current: explanations']:.2f} µs
(**{speedup['explanations per candidate']:.2f}x**), of which to dicts
{per_candidate_us['pre-change: to_dict']:.2f} µs -> {per_candidate_us['current: explanation_dicts']:.2f} µs
({speedup['to dicts per candidate']:.2f}x).

Command: `.venv/bin/python bench/explain_build.py --queries {args.queries} --repeats {args.repeats}`
"""
    write_results("explain_build", payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
