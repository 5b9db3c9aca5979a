"""BM25 explanations: what building the per-document explanation trees costs a query, before and after.

`recall.bm25` explains each returned document (when the trace is written with its query text) as its score,
the formula, and one node per matching query term. A profile found that building those trees was about 2/3 of a
BM25 query's time at top 100: ``run`` looked every query term up for the returned rows, and each ``explain``
rebuilt the formula, made a dict of the terms' values and asked each term's non-occurrence score. Now ``run`` only
keeps the query's terms and the rows; the first ``explain`` of the query makes the term nodes of all the returned
documents at once (a few array operations per term), each ``explain`` reads its document's slice; the formula is
made once per stage.

Measured in one run, on SciFact test (the first ``--queries`` claims, 300 by default: all of them; the full corpus
of 5,183 abstracts), BM25 top 100, the variants alternating query by query, ``--repeats`` timed passes after a
warm-up pass:

- stage level (``run``, then ``explain`` for each of the 100 candidates, no executor around them):
  (a) the search without explanations (trace text off: ``run`` keeps no notes, nothing explained);
  (b) the pre-change implementation (a copy of it below, labelled: the old notes and ``explain``), search, then
  search + explanations; (c) the current implementation, the same two;
- pipeline level (``Pipeline.search``, the whole trace built, nothing logged): ``trace.explain`` off, on with the
  pre-change stage, on with the current stage.

Every query's explanations are compared, the pre-change tree against the current one (``to_dict`` and its JSON):
the run stops on the first difference.

Usage: .venv/bin/python bench/bm25_explain.py [--queries 300] [--repeats 5]
Writes bench/results/bm25_explain.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench._common import SCIFACT, host, scifact_bm25_index, write_results  # noqa: E402
from engine.model import Candidate, Query  # noqa: E402
from engine.stage import Explanation, RecentNotes  # noqa: E402
from stages.recall.bm25 import FORMULAS, BM25Recall  # noqa: E402

CONFIG = """version: 1
index: {index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: {top_k}}}}}
trace: {{log: null, explain: {explain}}}
executor: {{max_workers: 1}}
"""


# ---------------------------------------------------------------- the pre-change implementation (baseline)
# A copy of stages/recall/bm25.py's explanation code before this change (the notes ``run`` kept, and ``explain``),
# kept here so that each run of the benchmark measures its baseline on the same machine, index and queries.


class PreChangeTermContributions:
    """Pre-change ``_TermContributions``: per-term float32 scores of the returned rows; a dict built per read."""

    def __init__(self) -> None:
        self._entries = RecentNotes()  # query text -> (term counts, row -> position, term -> scores)

    def put(self, text: str, terms: Counter[str], rows: list[int], scores: dict[str, Any]) -> None:
        self._entries.put(text, (terms, {row: i for i, row in enumerate(rows)}, scores))

    def get(self, text: str, row: int) -> tuple[Counter[str], dict[str, float]] | None:
        entry = self._entries.get(text)
        if entry is None or row not in entry[1]:
            return None
        terms, position, scores = entry
        at = position[row]
        return terms, {term: float(values[at]) for term, values in scores.items()}


class PreChangeBM25Recall(BM25Recall):
    """``recall.bm25`` with the pre-change notes and ``explain`` (the search itself is the current one)."""

    def __init__(self, stage_id: str, params: Any):
        super().__init__(stage_id, params)
        self._contributions = PreChangeTermContributions()  # type: ignore[assignment]

    def _remember(self, query: Query, known: list[str], order: list[int]) -> None:
        counts = Counter(known)
        self._contributions.put(  # type: ignore[call-arg]
            self._text(query), counts, order, {term: self._bm25.term_scores(term, order) for term in counts}
        )

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        settings = self._bm25.settings
        method = settings.get("method", "lucene")
        delta = getattr(self._bm25.retriever, "delta", 0.5)
        formula = (
            f"BM25 ({method}, k1={settings.get('k1')}, b={settings.get('b')}) "
            f"over {'+'.join(settings.get('fields', ['title', 'text']))}: "
            f"sum over query terms of {FORMULAS.get(method, FORMULAS['lucene']).format(delta=delta)}; "
            f"rank {rank} in stage '{self.id}'"
        )
        if not trace_text:
            return Explanation(value, formula)
        details = []
        remembered = self._contributions.get(self._text(query), candidate.row)  # type: ignore[attr-defined]
        if remembered is None:  # explained outside the search that recalled it
            counts = Counter(t for t in self._terms(query) if t in self._bm25.vocab)
            remembered = counts, {t: float(self._bm25.term_scores(t, [candidate.row])[0]) for t in counts}
        counts, contributions = remembered
        for term, count in counts.items():
            contribution = contributions[term]
            if contribution > 0:
                times = f" x{count} (repeated in the query)" if count > 1 else ""
                absent = self._bm25.absent_score(term)
                lacks = " (not in the document: the method's non-occurrence score)" if absent and not (
                    self._bm25.holds(term, candidate.row)) else ""
                details.append(Explanation(contribution * count, f"term '{term}'{times}{lacks}"))
        return Explanation(value, formula, tuple(details))


# ---------------------------------------------------------------- measuring


def summary(values: list[float]) -> dict[str, float]:
    from engine.evaluation import percentile

    return {"p50_ms": round(statistics.median(values), 4), "p95_ms": round(percentile(values, 95), 4),
            "mean_ms": round(statistics.fmean(values), 4)}


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
    from engine.pipeline import Pipeline
    from engine.stage import StageContext

    info = host(numpy=numpy.__version__, bm25s=bm25s.__version__)
    print("machine:", json.dumps(info))
    index = scifact_bm25_index()
    data = load_beir(SCIFACT, "test")
    texts = [data.queries[qid] for qid in list(data.queries)[: args.queries]]

    with tempfile.TemporaryDirectory(prefix="sieve-bench-bm25-explain-") as scratch:
        configs = {}
        for explain in ("true", "false"):
            configs[explain] = Path(scratch) / f"explain-{explain}.yaml"
            configs[explain].write_text(CONFIG.format(index=index, top_k=args.top_k, explain=explain), encoding="utf-8")
        current = Pipeline(compile_file(configs["true"]))
        resources = current.warm_up()
        pre_compiled = compile_file(configs["true"])
        pre_compiled.stages["bm25"] = PreChangeBM25Recall("bm25", pre_compiled.stages["bm25"].params)
        pre_change = Pipeline(pre_compiled)
        pre_change.warm_up(reuse=resources)
        no_explain = Pipeline(compile_file(configs["false"]))
        no_explain.warm_up(reuse=resources)
        stages = {"current": current.compiled.stages["bm25"], "pre-change": pre_change.compiled.stages["bm25"]}
        assert isinstance(stages["pre-change"], PreChangeBM25Recall)

        def stage_pass(stage: BM25Recall, query: Query, explain: bool, trace_text: bool = True) -> tuple[float, Any]:
            began = time.perf_counter()
            result = stage.run(StageContext("bm25", query, [], None, resources, trace_text))
            trees = [stage.explain(query, c, c.score_of("bm25"), c.ledger[-1].rank, trace_text)
                     for c in result.candidates] if explain else None
            return (time.perf_counter() - began) * 1000.0, (result, trees)

        stage_ms: dict[str, list[float]] = {k: [] for k in (
            "search, trace text off", "pre-change: search", "pre-change: search + explanations",
            "current: search", "current: search + explanations")}
        pipeline_ms: dict[str, list[float]] = {k: [] for k in (
            "trace.explain off", "trace.explain on, pre-change", "trace.explain on, current")}
        candidates_explained: list[int] = []
        compared = 0
        for repeat in range(args.repeats + 1):
            timed = repeat > 0
            for i, text in enumerate(texts):
                query = current.make_query(text)
                # the stage-level variants, rotated so none always runs first (warm caches)
                variants = [
                    ("search, trace text off", lambda: stage_pass(stages["current"], query, False, trace_text=False)),
                    ("pre-change: search", lambda: stage_pass(stages["pre-change"], query, False)),
                    ("pre-change: search + explanations", lambda: stage_pass(stages["pre-change"], query, True)),
                    ("current: search", lambda: stage_pass(stages["current"], query, False)),
                    ("current: search + explanations", lambda: stage_pass(stages["current"], query, True)),
                ]
                shift = (i + repeat) % len(variants)
                trees = {}
                for name, call in variants[shift:] + variants[:shift]:
                    ms, (result, explained) = call()
                    if timed:
                        stage_ms[name].append(ms)
                    if explained is not None:
                        trees[name] = [tree.to_dict() for tree in explained]
                        if name.startswith("current") and timed:
                            candidates_explained.append(len(explained))
                old, new = trees["pre-change: search + explanations"], trees["current: search + explanations"]
                if old != new or json.dumps(old) != json.dumps(new):
                    raise SystemExit(f"query {i}: the explanations differ between the pre-change and current code")
                pipelines = [("trace.explain off", no_explain), ("trace.explain on, pre-change", pre_change),
                             ("trace.explain on, current", current)]
                shift = (i + repeat) % len(pipelines)
                results = {}
                for name, pipeline in pipelines[shift:] + pipelines[:shift]:
                    began = time.perf_counter()
                    results[name] = pipeline.search(text, log=False)
                    if timed:
                        pipeline_ms[name].append((time.perf_counter() - began) * 1000.0)
                old_results = results["trace.explain on, pre-change"].trace["results"]
                new_results = results["trace.explain on, current"].trace["results"]
                if json.dumps([r["explanation"] for r in old_results]) != json.dumps(
                        [r["explanation"] for r in new_results]):
                    raise SystemExit(f"query {i}: the traces' explanations differ (pre-change vs current)")
                compared += 1

    stage = {name: summary(values) for name, values in stage_ms.items()}
    pipeline = {name: summary(values) for name, values in pipeline_ms.items()}

    def share(with_explanations: dict[str, float], without: dict[str, float]) -> float:
        return round((with_explanations["p50_ms"] - without["p50_ms"]) / with_explanations["p50_ms"], 3)

    explained = statistics.median(candidates_explained)
    bare = stage["search, trace text off"]
    shares = {  # of the p50: what run keeps for the explanations plus explain, against the search keeping nothing
        "pre-change": share(stage["pre-change: search + explanations"], bare),
        "current": share(stage["current: search + explanations"], bare),
        # explain and the trees in the trace, against the same pipeline with trace.explain off
        "pipeline pre-change": share(pipeline["trace.explain on, pre-change"], pipeline["trace.explain off"]),
        "pipeline current": share(pipeline["trace.explain on, current"], pipeline["trace.explain off"]),
    }
    per_candidate_us = {
        impl: round((stage[f"{impl}: search + explanations"]["p50_ms"] - stage[f"{impl}: search"]["p50_ms"])
                    * 1000.0 / explained, 2)
        for impl in ("pre-change", "current")
    }
    notes_ms = {impl: round(stage[f"{impl}: search"]["p50_ms"] - bare["p50_ms"], 4)
                for impl in ("pre-change", "current")}
    payload: dict[str, Any] = {
        "machine": info,
        "corpus": {"documents": 5183, "source": str(SCIFACT)},
        "queries": len(texts),
        "repeats": args.repeats,
        "top_k": args.top_k,
        "candidates_explained_median": explained,
        "explanations_identical_queries": compared,
        "stage": stage,
        "pipeline": pipeline,
        "explanation_share_of_p50": shares,
        "explain_per_candidate_us": per_candidate_us,
        "notes_per_query_ms": notes_ms,
        "explain_speedup": round(per_candidate_us["pre-change"] / per_candidate_us["current"], 2),
    }
    load = info.get("load_average_at_start")
    rows = "\n".join(f"| {name} | {v['p50_ms']:.3f} | {v['p95_ms']:.3f} | {v['mean_ms']:.3f} |"
                     for name, v in stage.items())
    pipeline_rows = "\n".join(f"| {name} | {v['p50_ms']:.3f} | {v['p95_ms']:.3f} | {v['mean_ms']:.3f} |"
                              for name, v in pipeline.items())
    markdown = f"""# BM25 explanations: cost per query, pre-change vs current

Machine: {info['cpu']}, {info['cpu_cores_usable']} usable cores, Python {info['python']}, numpy {info['numpy']},
bm25s {info['bm25s']}; load average at start {load} (the cores are shared with other jobs: read the medians).

SciFact test, {len(texts)} claims x {args.repeats} timed passes (after a warm-up pass), the full corpus (5,183
abstracts), BM25 (lucene) top {args.top_k}: {explained:.0f} candidates explained per query (median). The variants
alternate query by query. The pre-change implementation is a copy kept in `bench/bm25_explain.py`; its trees
and the current ones were identical (`to_dict` and JSON) in all {compared} query runs compared (every pass).

## Stage level (`run`, then `explain` for each candidate)

| variant | p50 ms | p95 ms | mean ms |
|---|---:|---:|---:|
{rows}

Explanations' share of the query (p50; what `run` keeps for them plus `explain`, against the search with the
trace's query text off, which keeps nothing): **{shares['pre-change']:.0%} pre-change, {shares['current']:.0%}
now**. `explain` per candidate (now including its share of the term nodes made at the query's first one):
{per_candidate_us['pre-change']:.2f} µs -> {per_candidate_us['current']:.2f} µs
(**{payload['explain_speedup']:.1f}x**);
what `run` keeps for the explanations (search minus the bare search): {notes_ms['pre-change']:.3f} ms ->
{notes_ms['current']:.3f} ms per query.

## Pipeline level (`Pipeline.search`, the whole trace built, nothing logged)

| pipeline | p50 ms | p95 ms | mean ms |
|---|---:|---:|---:|
{pipeline_rows}

Explanations' share of the traced query (p50; `explain` and the trees written as dicts, against the same
pipeline with `trace.explain` off; about half of what remains is the engine's part: the root node per
document and `to_dict`): {shares['pipeline pre-change']:.0%}
pre-change, {shares['pipeline current']:.0%} now.

Command: `.venv/bin/python bench/bm25_explain.py --queries {args.queries} --repeats {args.repeats}`
"""
    write_results("bm25_explain", payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
