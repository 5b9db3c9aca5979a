"""What `sieve serve` adds per query, against the same pipeline run in-process.

Pipeline: BM25 over the full SciFact corpus (5,183 abstracts), top 10, explanations traced, every
trace appended to a hash-chained log (fsync), as a served query's trace is. Queries: the first
``--queries`` SciFact test queries, ``--repeats`` timed passes after one warm-up pass.

Measured in the same run:

- in-process: ``Pipeline.run`` + ``Pipeline.log_trace`` (what the server's handler does), one
  query after another;
- server: the same queries as HTTP POSTs to a real ``sieve serve`` on loopback, one client with a
  kept-alive connection; the figure includes request parsing, the JSON response with each result's
  document, and the client's own HTTP work;
- throughput with ``--clients`` concurrent clients against the server vs as many threads calling
  the pipeline in-process.

Usage: .venv/bin/python bench/server_overhead.py [--queries 100] [--repeats 3] [--clients 4]
Writes bench/results/server_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench._common import SCIFACT, host, run_record, scifact_bm25_index, write_results  # noqa: E402
from engine.server import serve_in_subprocess  # noqa: E402

CONFIG = """version: 1
name: bm25-served
index: {index}
stages:
  - id: bm25
    type: recall.bm25
    params: {{top_k: 100}}
  - id: final
    type: select.top_k
    inputs: [bm25]
    params: {{k: 10}}
output: final
trace:
  log: {log}
"""


def summary(values: list[float]) -> dict[str, float]:
    from engine.evaluation import percentile

    return {"p50_ms": round(statistics.median(values), 3), "p95_ms": round(percentile(values, 95), 3),
            "mean_ms": round(statistics.fmean(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    import httpx

    from engine.pipeline import Pipeline

    info = host(httpx=httpx.__version__)
    index = scifact_bm25_index()
    test_ids = {line.split("\t")[0] for line in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    queries = [json.loads(line)["text"] for line in (SCIFACT / "queries.jsonl").read_text().splitlines()
               if json.loads(line)["_id"] in test_ids][: args.queries]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        config = work / "served.yaml"
        config.write_text(CONFIG.format(index=index, log=work / "in-process.jsonl"), encoding="utf-8")
        served_config = work / "served-http.yaml"
        served_config.write_text(CONFIG.format(index=index, log=work / "served.jsonl"), encoding="utf-8")

        pipeline = Pipeline.from_file(config)
        pipeline.warm_up()

        def in_process(text: str) -> float:
            began = time.perf_counter()
            result = pipeline.run(pipeline.make_query(text))
            pipeline.log_trace(result.trace)
            return (time.perf_counter() - began) * 1000

        with serve_in_subprocess([served_config], cwd=work) as base:
            url = f"{base}/v1/pipelines/bm25-served/search"
            with httpx.Client(timeout=60) as client:

                def over_http(text: str) -> float:
                    began = time.perf_counter()
                    response = client.post(url, json={"query": text})
                    response.raise_for_status()
                    response.json()
                    return (time.perf_counter() - began) * 1000

                for text in queries:  # warm-up pass for both
                    in_process(text)
                    over_http(text)
                local: list[float] = []
                remote: list[float] = []
                for _ in range(args.repeats):
                    for text in queries:  # alternating, so load drifts hit both alike
                        local.append(in_process(text))
                        remote.append(over_http(text))

            def throughput(call: Any) -> float:
                work_items = queries * args.repeats
                began = time.perf_counter()
                with ThreadPoolExecutor(max_workers=args.clients) as pool:
                    list(pool.map(call, work_items))
                return len(work_items) / (time.perf_counter() - began)

            # one thread-safe client with a connection per caller
            with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=args.clients)) as shared:

                def concurrent_http(text: str) -> None:
                    shared.post(url, json={"query": text}).raise_for_status()

                local_qps = throughput(in_process)
                remote_qps = throughput(concurrent_http)

    payload = {
        **run_record("server_overhead"),
        "machine": info,
        "setup": {"queries": len(queries), "repeats": args.repeats, "clients": args.clients,
                  "pipeline": "recall.bm25 top 100 -> select.top_k 10, explanations, trace log with fsync"},
        "in_process": summary(local),
        "server": summary(remote),
        "overhead_p50_ms": round(statistics.median(remote) - statistics.median(local), 3),
        "throughput_qps": {"in_process": round(local_qps, 1), "server": round(remote_qps, 1)},
    }
    line = (f"{info['cpu']}, {info['cpu_cores_usable']} usable cores, Python {info['python']}, httpx "
            f"{info['httpx']}; load average at start {info.get('load_average_at_start')}")
    markdown = f"""# `sieve serve` overhead (BM25 over SciFact, top 10, traced and logged)

Machine: {line}.

{len(queries)} SciFact test queries x {args.repeats} timed passes (after a warm-up pass), the in-process
call and the HTTP request alternating. Both do the same work: run the pipeline (explanations on),
append the trace to a hash-chained log with fsync. The HTTP figure adds FastAPI/uvicorn, the JSON
response with each result's document, and the client's own HTTP work, all on loopback.

| | p50 ms | p95 ms | mean ms |
|---|---|---|---|
| in-process (`Pipeline.run` + `log_trace`) | {payload['in_process']['p50_ms']:.2f} | {payload['in_process']['p95_ms']:.2f} | {payload['in_process']['mean_ms']:.2f} |
| over HTTP (`sieve serve`, one client) | {payload['server']['p50_ms']:.2f} | {payload['server']['p95_ms']:.2f} | {payload['server']['mean_ms']:.2f} |
| **difference of medians** | **{payload['overhead_p50_ms']:.2f}** | | |

Throughput with {args.clients} concurrent callers: in-process {local_qps:.1f} queries/s, over HTTP
{remote_qps:.1f} queries/s (the client runs on the same 2 cores as the server).

Command: `{payload['command']}`
"""
    json_path, md_path = write_results("server_overhead", payload, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
