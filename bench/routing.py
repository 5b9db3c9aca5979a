"""Routing by query class (a stage's ``when``): what judging a condition costs, and what routing a reranker buys.

Measured in one run, on SciFact test (300 claims, the full corpus of 5,183 abstracts):

- the cost of a ``when``: BM25 top 100 -> top 10, without and with a ``when`` on the BM25 stage that always holds
  (``query.text exists``) and one that is an expression (``query.effective.split() | length >= 1``), the three
  pipelines alternating query by query; the difference of the medians is what judging a condition adds to a query;
- the trade-off a route makes: BM25 top 30 -> the shipped cross-encoder (window 30) -> top 10, the reranker run for
  every query, and routed (``when``) to the queries of at least ``--min-words`` words (default: the median length of
  the test claims, so about half), and never: nDCG@10 (pytrec_eval) and latency per query of each.

Usage: .venv/bin/python bench/routing.py [--min-words N] [--queries 300]
Writes bench/results/routing.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench._common import (SCIFACT, SHIPPED_RERANKER, machine, machine_line, scifact_bm25_index,  # noqa: E402
                           write_results)

CHEAP = """version: 1
index: {index}
stages:
  - id: bm25
    type: recall.bm25
    params: {{top_k: 100}}{when}
  - {{id: final, type: select.top_k, inputs: [bm25], params: {{k: 10}}}}
output: final
trace: {{log: null}}
"""

RERANKED = """version: 1
index: {index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 30}}}}
  - id: rerank
    type: rerank.cross_encoder
    inputs: [bm25]
    params: {{model: {model}, window: 30}}{when}
  - {{id: final, type: select.top_k, inputs: [rerank], params: {{k: 10}}}}
output: final
trace: {{log: null}}
"""


def summary(values: list[float]) -> dict[str, float]:
    from engine.evaluation import percentile

    return {"p50_ms": round(statistics.median(values), 4), "p95_ms": round(percentile(values, 95), 4),
            "mean_ms": round(statistics.fmean(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--min-words", type=int, default=None, help="route the reranker to claims of this many "
                        "words or more (default: the median length)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of the cost-of-a-when comparison")
    args = parser.parse_args()

    from engine.evaluation import aggregate, load_beir, per_query_metrics
    from engine.pipeline import Pipeline

    info = machine()
    index = scifact_bm25_index()
    data = load_beir(SCIFACT, "test")
    qids = list(data.queries)[: args.queries]  # natural order of query id
    queries = {qid: data.queries[qid] for qid in qids}
    lengths = sorted(len(text.split()) for text in queries.values())
    min_words = args.min_words if args.min_words is not None else lengths[len(lengths) // 2]
    qrels = {qid: data.qrels[qid] for qid in qids}

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)

        def pipeline(template: str, name: str, when: str = "") -> Pipeline:
            path = work / f"{name}.yaml"
            path.write_text(template.format(index=index, model=SHIPPED_RERANKER,
                                            when=f"\n    when: {when}" if when else ""), encoding="utf-8")
            built = Pipeline.from_file(path)
            built.warm_up()
            return built

        # --- the cost of judging a `when`
        cheap = {"no when": pipeline(CHEAP, "plain"),
                 "when: query.text exists": pipeline(CHEAP, "field", "{field: query.text, op: exists, value: true}"),
                 "when: an expression": pipeline(CHEAP, "expr", '{expr: "query.effective.split() | length >= 1"}')}
        timings: dict[str, list[float]] = {name: [] for name in cheap}
        for text in queries.values():  # warm-up pass
            for p in cheap.values():
                p.search(text, log=False)
        for _ in range(args.repeats):
            for text in queries.values():
                for name, p in cheap.items():
                    began = time.perf_counter()
                    p.search(text, log=False)
                    timings[name].append((time.perf_counter() - began) * 1000.0)
        cost = {name: summary(values) for name, values in timings.items()}
        base = cost["no when"]["p50_ms"]
        for name in cheap:
            cost[name]["p50_minus_no_when_us"] = round((cost[name]["p50_ms"] - base) * 1000.0, 1)

        # --- what routing the reranker buys
        routes = {"reranker for every query": "",
                  f"reranker for claims of {min_words}+ words": f'{{expr: "query.effective.split() | length >= {min_words}"}}',
                  "no reranker (routed past every query)": "{field: query.text, op: exists, value: false}"}
        quality: dict[str, Any] = {}
        for name, when in routes.items():
            p = pipeline(RERANKED, f"route{len(quality)}", when)
            p.search(next(iter(queries.values())), log=False)  # the model's first forward pass is not timed
            run, latency, reranked = {}, [], 0
            for qid, text in queries.items():
                began = time.perf_counter()
                result = p.search(text, log=False)
                latency.append((time.perf_counter() - began) * 1000.0)
                reranked += next(s for s in result.trace["stages"] if s["id"] == "rerank")["status"] == "ok"
                total = len(result.results)
                run[qid] = {c.doc_id: float(total - rank) for rank, c in enumerate(result.results)}
            metrics = aggregate(per_query_metrics(run, qrels, ("ndcg_cut.10", "recall.10")))
            quality[name] = {"ndcg_cut_10": round(metrics["ndcg_cut_10"], 4), "recall_10": round(metrics["recall_10"], 4),
                             "queries_reranked": reranked, **summary(latency)}

    payload = {"machine": info, "queries": len(queries), "min_words": min_words,
               "claim_words": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
               "cost_of_a_when": cost, "routing_the_reranker": quality}
    rows = "\n".join(f"| {name} | {v['p50_ms']:.4f} | {v['mean_ms']:.4f} | {v['p50_minus_no_when_us']:+.1f} |"
                     for name, v in cost.items())
    routed = "\n".join(f"| {name} | {v['queries_reranked']} | {v['ndcg_cut_10']:.4f} | {v['recall_10']:.4f} | "
                       f"{v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {v['mean_ms']:.1f} |" for name, v in quality.items())
    markdown = f"""# Routing by query class (a stage's `when`) on SciFact test

Machine: {machine_line(info)}.

{len(queries)} SciFact test claims ({lengths[0]} to {lengths[-1]} words, median {lengths[len(lengths) // 2]}), the
full corpus (5,183 abstracts).

## What judging a `when` costs

BM25 top 100 -> top 10, the three pipelines alternating query by query, {args.repeats} timed passes after a warm-up
pass; the `when` is on the BM25 stage and always holds, so every pipeline does the same work besides judging it.

| pipeline | p50 ms | mean ms | p50 - no when (µs) |
|---|---:|---:|---:|
{rows}

## What routing the reranker buys

BM25 top 30 -> the shipped cross-encoder (window 30) -> top 10; the reranker run for every query, routed by a `when`
to the claims of {min_words} words or more, or to none (the stage bypassed: BM25's order is returned).

| route | queries reranked | nDCG@10 | Recall@10 | p50 ms | p95 ms | mean ms |
|---|---:|---:|---:|---:|---:|---:|
{routed}

Routing is tuned by configuration: `sieve sweep CONFIG --set 'stages.rerank.when=[null, {{expr: "query.effective.split()
| length >= {min_words}"}}]'` measures a route against none on a tuning split (SciFact's claims are of one kind, so a
route by length is a cost/quality dial here, not a better ranking; a route by class, such as a bare ticker or record id
that needs no semantic stages, is where it keeps quality and saves the work).

Command: `.venv/bin/python bench/routing.py{'' if args.min_words is None else f' --min-words {args.min_words}'}`
"""
    json_path, md_path = write_results("routing", payload, markdown)
    print(markdown)
    print(f"written: {json_path} and {md_path}")


if __name__ == "__main__":
    main()
