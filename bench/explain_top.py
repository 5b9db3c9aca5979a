"""trace.explain_top: a query's own cost when the trace stores explanation trees for every returned document
against the first 10 only, for a pipeline that returns 200 (BM25 over the full SciFact corpus, top_k 200, k 200).
Each query is searched and its trace appended to a log (encoded, hashed, written, fsync'd), as `sieve search`
does; CPU time of the process per query (the cores are shared: wall time is the machine's, CPU time the query's)
and the trace's size. The two arms alternate query by query, in one run.

Usage: .venv/bin/python bench/explain_top.py [--queries 100] [--repeats 3]
Writes bench/results/explain_top.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import SCIFACT, host, scifact_bm25_index, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=100, help="the first N SciFact test claims")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the queries (after one warm-up)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from engine.evaluation import load_beir
    from engine.pipeline import Pipeline

    index = scifact_bm25_index()
    queries = list(load_beir(SCIFACT, "test").queries.values())[: args.queries]
    scratch = Path(tempfile.mkdtemp(prefix="sieve-explain-top-"))
    arms = {"every result (explain_top: null)": "null", "the first 10 (explain_top: 10)": "10"}
    pipelines = {}
    for number, (arm, top) in enumerate(arms.items()):
        config = scratch / f"p{number}.yaml"
        config.write_text(
            f"version: 1\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 200}}}}\n"
            "  - {id: final, type: select.top_k, inputs: [bm25], params: {k: 200}}\n"
            f"output: final\ntrace: {{log: {scratch / f'log{number}.jsonl'}, explain_top: {top}}}\n", encoding="utf-8")
        pipelines[arm] = Pipeline.from_file(config)
    cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    size: dict[str, list[int]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats + 1):
        for number, text in enumerate(queries):
            order = list(arms) if (number + repeat) % 2 == 0 else list(reversed(arms))
            for arm in order:
                began = time.process_time()
                trace = pipelines[arm].search(text).trace
                spent = (time.process_time() - began) * 1000.0
                if repeat:  # the first pass warms up
                    cpu[arm].append(spent)
                    size[arm].append(len(json.dumps(trace)))
    rows = {arm: {"cpu_p50_ms": statistics.median(cpu[arm]), "cpu_mean_ms": statistics.fmean(cpu[arm]),
                  "trace_kb_p50": statistics.median(size[arm]) / 1000} for arm in arms}
    info = host()
    figures = {"machine": info, "queries": len(queries), "repeats": args.repeats, "arms": rows}
    lines = [
        "# trace.explain_top: trees for every result against the first 10, at 200 results",
        "",
        f"Machine: {info.get('cpu')}, {info.get('cpu_cores_usable')} usable cores; load average at start "
        f"{info.get('load_average_at_start')}.",
        "",
        f"BM25 over the full SciFact corpus, top_k 200, k 200; {len(queries)} SciFact test claims x {args.repeats} "
        "passes after a warm-up pass, the arms alternating query by query; each query searched and its trace "
        "appended to a log (fsync'd). CPU time of the process per query.",
        "",
        "| trace stores trees for | CPU p50 ms | CPU mean ms | trace p50 KB |",
        "|---|---|---|---|",
        *(f"| {arm} | {r['cpu_p50_ms']:.2f} | {r['cpu_mean_ms']:.2f} | {r['trace_kb_p50']:.0f} |"
          for arm, r in rows.items()),
        "",
        "Command: `.venv/bin/python bench/explain_top.py`",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_results("explain_top", figures, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
