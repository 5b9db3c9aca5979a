"""The shipped reranker on a GPU, on real queries: SciFact test, BM25 top 100 -> rerank.cross_encoder (window 100).

The trained model (``models/sieve-reranker-scifact-minilm``) through the real pipeline, run three ways in one
process, each warmed up first:

- CUDA, ``precision: auto`` (fp16 there), on every test query;
- CUDA, fp32, on the same queries: the quality reference for fp16 on this model;
- the CPU of the same machine, ``precision: auto``, on the first ``--cpu-queries`` queries: the baseline.

Reported per run: nDCG@10 (and BM25 alone), the rerank stage's median / p95 ms per query from the traces, the
whole search's median; between fp16 and fp32: same top-10 set / order, the largest score difference.
Score cache off, so every query is scored.

Usage (a machine with CUDA; see bench/rerank_gpu_device.sh for the lent GPU machine):
    python bench/rerank_gpu_scifact.py [--data DIR] [--index DIR] [--queries N] [--cpu-queries 30]
Writes bench/results/rerank_gpu_scifact.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BUILD, machine, machine_line, scifact_bm25_index, write_results  # noqa: E402
from _common import SCIFACT as DATA  # noqa: E402
from _common import SHIPPED_RERANKER as SHIPPED  # noqa: E402


def _config(path: Path, index: Path, depth: int, rerank: str | None) -> Path:
    stages = f"  - {{id: bm25, type: recall.bm25, params: {{top_k: {depth}}}}}\n"
    if rerank is not None:
        stages += (f"  - {{id: rerank, type: rerank.cross_encoder, inputs: [bm25],\n"
                   f"      params: {{model: {SHIPPED}, window: {depth}, batch_size: 32, cache_size: 0, {rerank}}}}}\n")
    path.write_text(f"version: 1\nindex: {index}\nstages:\n{stages}output: {'rerank' if rerank else 'bm25'}\n"
                    "trace: {log: null}\n", encoding="utf-8")
    return path


def _run(pipeline, queries: dict[str, str], warm: int) -> dict:  # type: ignore[no-untyped-def]
    import time

    pipeline.warm_up()
    for text in list(queries.values())[:warm]:  # untimed: the kernels of the first shapes are chosen here
        pipeline.search(text, log=False)
    out: dict = {"run": {}, "scores": {}, "rerank_ms": [], "search_ms": [], "identity": None}
    for qid, text in queries.items():
        began = time.perf_counter()
        result = pipeline.search(text, log=False)
        out["search_ms"].append((time.perf_counter() - began) * 1000.0)
        stage = next((s for s in result.trace["stages"] if s["id"] == "rerank"), None)
        if stage is not None:
            out["rerank_ms"].append(stage["duration_ms"])
            out["identity"] = next(m for m in result.trace["models"] if m["stage"] == "rerank")
        total = len(result.results)
        out["run"][qid] = {c.doc_id: float(total - rank) for rank, c in enumerate(result.results)}
        out["scores"][qid] = {c.doc_id: c.score_of("rerank") for c in result.results} if stage else {}
    return out


def _p(values: list[float], q: float) -> float:
    from engine.evaluation import percentile

    return round(percentile(values, q), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="SciFact in BEIR form (queries, qrels/test.tsv)")
    parser.add_argument("--index", type=Path, default=None, help="a BM25 index of the SciFact corpus")
    parser.add_argument("--queries", type=int, default=None, help="first N test queries (default: all)")
    parser.add_argument("--cpu-queries", type=int, default=30, help="queries for the CPU baseline")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--warm", type=int, default=10, help="queries run untimed first, per run")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("rerank_gpu_scifact: no CUDA device here; run it on a machine with a GPU")

    import stages  # noqa: F401  (registers the stage types)
    from engine.evaluation import evaluate_run, load_beir
    from engine.pipeline import Pipeline

    info = machine()
    print(f"machine: {machine_line(info)}")
    data = load_beir(args.data, "test")
    queries = dict(list(data.queries.items())[: args.queries])
    index = args.index.resolve() if args.index else scifact_bm25_index()  # the config lies in build/bench
    BUILD.mkdir(parents=True, exist_ok=True)
    settings = {"bm25": None, "cuda-auto": "device: cuda, precision: auto", "cuda-fp32": "device: cuda, precision: fp32",
                "cpu-auto": "device: cpu, precision: auto"}
    runs = {}
    for name, rerank in settings.items():
        subset = dict(list(queries.items())[: args.cpu_queries]) if name == "cpu-auto" else queries
        pipeline = Pipeline.from_file(_config(BUILD / f"gpu-scifact-{name}.yaml", index, args.depth, rerank))
        runs[name] = _run(pipeline, subset, args.warm)
        runs[name]["ndcg_10"] = evaluate_run(runs[name]["run"], {q: data.qrels[q] for q in subset})["ndcg_cut_10"]
        print(f"{name}: {len(subset)} queries, nDCG@10 {runs[name]['ndcg_10']:.4f}, rerank p50 "
              f"{_p(runs[name]['rerank_ms'], 50) if runs[name]['rerank_ms'] else '-'} ms")

    fp16, fp32 = runs["cuda-auto"], runs["cuda-fp32"]
    same_set = sum(set(list(fp16["run"][q])[:10]) == set(list(fp32["run"][q])[:10]) for q in queries)
    same_order = sum(list(fp16["run"][q])[:10] == list(fp32["run"][q])[:10] for q in queries)
    largest = max(abs(fp16["scores"][q][d] - fp32["scores"][q][d]) for q in queries for d in fp16["scores"][q])
    cpu_ids = list(runs["cpu-auto"]["run"])
    # the GPU's figures on the CPU baseline's queries, for a like-for-like comparison of time
    gpu_on_cpu_queries = [fp16["rerank_ms"][i] for i in range(len(cpu_ids))]
    rows, payload_runs = [], {}
    for name, label in (("bm25", "BM25 alone"), ("cuda-auto", "CUDA, precision auto"),
                        ("cuda-fp32", "CUDA, fp32"), ("cpu-auto", "CPU, precision auto")):
        r = runs[name]
        identity = r["identity"] or {}
        payload_runs[name] = {"queries": len(r["run"]), "ndcg_10": round(r["ndcg_10"], 4),
                              "device": identity.get("device"), "precision": identity.get("precision"),
                              "rerank_ms_p50": _p(r["rerank_ms"], 50) if r["rerank_ms"] else None,
                              "rerank_ms_p95": _p(r["rerank_ms"], 95) if r["rerank_ms"] else None,
                              "search_ms_p50": _p(r["search_ms"], 50)}
        p = payload_runs[name]
        rows.append(f"| {label} | {p['device'] or '-'} / {p['precision'] or '-'} | {p['queries']} | {p['ndcg_10']:.4f} | "
                    f"{p['rerank_ms_p50'] if p['rerank_ms_p50'] is not None else '-'} | "
                    f"{p['rerank_ms_p95'] if p['rerank_ms_p95'] is not None else '-'} | {p['search_ms_p50']} |")
    cpu_qrels = {q: data.qrels[q] for q in cpu_ids}
    gpu_ndcg_cpu_queries = evaluate_run({q: fp16["run"][q] for q in cpu_ids}, cpu_qrels)["ndcg_cut_10"]
    speedup = statistics.median(runs["cpu-auto"]["rerank_ms"]) / statistics.median(gpu_on_cpu_queries)
    agreement = {"same_top10_set": same_set, "same_top10_order": same_order, "queries": len(queries),
                 "largest_score_difference": round(largest, 4)}
    md = f"""# The shipped reranker on a GPU: SciFact test, BM25 top {args.depth} -> rerank (window {args.depth})

Machine: {machine_line(info)}.

`models/sieve-reranker-scifact-minilm` (the model this project trained) through the real pipeline, batch size 32,
score cache off. Each run warmed up first; times are the trace's stage durations (tokenisation included).

| run | device / precision | queries | nDCG@10 | rerank ms p50 | rerank ms p95 | search ms p50 |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- On the CPU baseline's {len(cpu_ids)} queries, the rerank stage's median is {speedup:.1f}x faster on the GPU
  (precision auto on each: {payload_runs['cuda-auto']['precision']} on CUDA, {payload_runs['cpu-auto']['precision']} on this CPU),
  and nDCG@10 on those queries is {gpu_ndcg_cpu_queries:.4f} on the GPU against {runs['cpu-auto']['ndcg_10']:.4f} on the CPU.
- Each run first ran its first {args.warm} queries untimed (a new input shape costs the first query that meets it).
- fp16 against fp32 on CUDA: the same top 10 set for {same_set} of {len(queries)} queries, the same order for
  {same_order}; largest score difference {largest:.4f} (scores are 20 x a cosine, range -20..20).

Command: `{' '.join(['python', *sys.argv])}`
"""
    write_results("rerank_gpu_scifact", {"machine": info, "depth": args.depth, "runs": payload_runs,
                                         "fp16_vs_fp32": agreement, "warm_queries": args.warm,
                                         "ndcg_10_gpu_on_cpu_queries": round(gpu_ndcg_cpu_queries, 4),
                                         "speedup_rerank_p50_on_cpu_queries": round(speedup, 1)}, md)
    print(md)


if __name__ == "__main__":
    main()
