"""Recall on SciFact test: BM25 vs dense (all-MiniLM-L6-v2) vs hybrid (RRF), through the real pipelines.

Builds (or reuses) a bm25 + dense index of the full SciFact corpus under ``indexes/scifact``, runs
the test queries through ``configs/bm25.yaml``, ``configs/dense.yaml`` and ``configs/hybrid.yaml``
with :mod:`engine.evaluation` (pytrec_eval), and reports nDCG@10, Recall@100, MRR@10 and latency.
BM25 is the baseline of the same run; the design notes' figures are shown for reference.

    .venv/bin/python bench/recall_scifact.py [--rebuild] [--data ../shared/data/scifact]

Writes ``bench/results/recall_scifact.json`` and ``bench/results/recall_scifact.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench._common import host, run_record, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONFIGS = {"bm25": "configs/bm25.yaml", "dense": "configs/dense.yaml", "hybrid": "configs/hybrid.yaml"}
# Measured before the first line of code (shared/DESIGN.md), same corpus and split.
DESIGN_NOTES = {"bm25": 0.686, "dense": 0.646, "hybrid": 0.717}
METRICS = {"ndcg_cut_10": "nDCG@10", "recall_100": "Recall@100", "mrr_10": "MRR@10"}


def machine() -> dict[str, Any]:
    import faiss
    import torch

    return host(
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        faiss=faiss.__version__,
        faiss_omp_threads=faiss.omp_get_max_threads(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )


def ensure_index(data_dir: Path, index_dir: Path, rebuild: bool) -> dict[str, Any]:
    """Reuse an index of this corpus with bm25 and dense components, or build one (timed)."""
    from engine.index import Index, build_index, sha256_file

    corpus = data_dir / "corpus.jsonl"
    if not rebuild and (index_dir / "manifest.json").is_file():
        manifest = Index.open(index_dir, verify=False).manifest
        have = set(manifest["components"])
        if {"bm25", "dense"} <= have and manifest["corpus"]["sha256"] == sha256_file(corpus):
            print(f"reusing the index at {index_dir} (built {manifest['created_at']})", flush=True)
            return {"reused": True, "manifest": manifest}
        print(f"rebuilding {index_dir}: it has {sorted(have)} for corpus {manifest['corpus']['sha256'][:12]}", flush=True)

    last_report: dict[str, float] = {}
    done: dict[str, int] = {}

    def progress(task: str, advance: int, total: int | None) -> None:
        done[task] = done.get(task, 0) + advance
        now = time.monotonic()
        if now - last_report.get(task, 0.0) > 15 or (total is not None and done[task] >= total):
            last_report[task] = now
            print(f"  {task}: {done[task]}/{total}", flush=True)

    print(f"building a bm25 + dense index of {corpus} into {index_dir}", flush=True)
    began = time.perf_counter()
    manifest = build_index(data_dir, index_dir, {"bm25": {}, "dense": {}}, progress)
    return {"reused": False, "build_seconds": round(time.perf_counter() - began, 1), "manifest": manifest}


def percentile(values: list[float], q: float) -> float:
    from engine.evaluation import percentile as pct

    return pct(values, q)


def run_config(name: str, config: Path, index_dir: Path, data: Any) -> dict[str, Any]:
    from engine.evaluation import evaluate_run, run_pipeline
    from engine.pipeline import Pipeline

    pipeline = Pipeline.from_file(config, index_path=index_dir)
    began = time.perf_counter()
    pipeline.warm_up()
    warm_up_s = time.perf_counter() - began
    output = run_pipeline(pipeline, data.queries)
    metrics = evaluate_run(output.run, data.qrels)
    stage_ms = {stage: {"p50": round(percentile(v, 50), 2), "p95": round(percentile(v, 95), 2)}
                for stage, v in output.stage_latency_ms.items()}
    stages_total = [sum(values) for values in zip(*output.stage_latency_ms.values())]
    identities = [s.identity() for s in pipeline.compiled.stages.values() if s.identity()]
    return {
        "config": str(config.relative_to(ROOT)),
        "config_sha256": pipeline.compiled.config_sha256,
        "queries": len(data.queries),
        "metrics": {key: round(metrics[key], 4) for key in METRICS},
        "latency_ms": {
            "p50": round(percentile(output.latency_ms, 50), 2),
            "p95": round(percentile(output.latency_ms, 95), 2),
            "mean": round(statistics.fmean(output.latency_ms), 2),
        },
        "stages_latency_ms": {"p50": round(percentile(stages_total, 50), 2),
                              "p95": round(percentile(stages_total, 95), 2)},
        "per_stage_ms": stage_ms,
        "warm_up_seconds": round(warm_up_s, 2),
        "models": identities,
    }


def markdown(payload: dict[str, Any]) -> str:
    info = payload["machine"]
    index = payload["index"]
    dense = index["dense"]
    rows = []
    base = payload["results"]["bm25"]["metrics"]["ndcg_cut_10"]
    for name, result in payload["results"].items():
        m = result["metrics"]
        delta = m["ndcg_cut_10"] - base
        rows.append(
            f"| {name} (`{result['config']}`) | **{m['ndcg_cut_10']:.3f}** | {delta:+.3f} | "
            f"{m['recall_100']:.3f} | {m['mrr_10']:.3f} | {result['latency_ms']['p50']:.1f} / "
            f"{result['latency_ms']['p95']:.1f} | {result['stages_latency_ms']['p50']:.1f} / "
            f"{result['stages_latency_ms']['p95']:.1f} | {DESIGN_NOTES[name]:.3f} |"
        )
    built = ("reused an existing index" if index["reused"] else
             f"built in {index['build_seconds']:.0f} s, of which {dense['embed_seconds']:.0f} s embedding")
    gpu = f", GPU {info['cuda']}" if info["cuda"] else ", no GPU"
    return "\n".join([
        "# Recall on SciFact (test split): BM25 vs dense vs hybrid (RRF)",
        "",
        f"Machine: {info['cpu']}, {info['cpu_cores_usable']} usable cores, torch {info['torch']} with "
        f"{info['torch_threads']} threads, faiss {info['faiss']} with {info['faiss_omp_threads']} OpenMP threads"
        f"{gpu}; load average at start {info['load_average_at_start']} (cores shared with other jobs).",
        "",
        f"Data: {payload['data']['corpus_docs']} documents, {payload['data']['queries']} test queries with "
        f"judgements. Index: bm25 (bm25s, Lucene, k1=1.5, b=0.75) + dense ({dense['model']['name']}, "
        f"{dense['pooling']} pooling, L2-normalised, max_length {dense['max_length']}, {dense['index_type']} "
        f"dim {dense['dimension']}, {dense['precision']} on {dense['device']}; {dense['truncated_documents']} "
        f"documents longer than max_length, cut and recorded); {built}.",
        "",
        "| pipeline | nDCG@10 | vs BM25 | Recall@100 | MRR@10 | latency p50 / p95 ms | stages p50 / p95 ms | design notes nDCG@10 |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "One-off warm-up before the first query (opening the index, loading the model): "
        + ", ".join(f"{name} {r['warm_up_seconds']:.1f} s" for name, r in payload["results"].items())
        + (" (the embedding model was already loaded by the index build in this process)." if not index["reused"]
           else "."),
        "",
        "Latency is per query through `Pipeline.search`, trace and per-result explanations included; \"stages\" "
        "is the sum of the stage timings the executor records (the rest is the executor's own work: contexts, "
        "trace, explanations). Dense latency is mostly the query embedding on CPU. Metrics from pytrec_eval "
        "(`engine.evaluation`); MRR@10 is reciprocal rank on the run cut at 10.",
        "",
        f"Command: `{payload['command']}`",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--index", type=Path, default=ROOT / "indexes" / "scifact")
    parser.add_argument("--split", default="test")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the index even if a matching one exists")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    args = parser.parse_args()

    from engine.evaluation import load_beir

    info = machine()
    print("machine:", json.dumps(info), flush=True)
    index_info = ensure_index(args.data, args.index, args.rebuild)
    manifest = index_info.pop("manifest")
    index_info["dense"] = {k: v for k, v in manifest["components"]["dense"].items() if k != "settings"}
    if not index_info["reused"]:  # the build's timings lie beside the manifest (build.json), not in it
        built = json.loads((Path(args.index) / "build.json").read_text(encoding="utf-8"))
        index_info["dense"]["embed_seconds"] = built["components"]["dense"]["seconds"]
    index_info["manifest_files_sha256"] = {k: v for k, v in manifest["files"].items() if k.startswith("dense/")}
    data = load_beir(args.data, args.split)
    results = {}
    for name, config in CONFIGS.items():
        print(f"running {config} over {len(data.queries)} queries", flush=True)
        results[name] = run_config(name, ROOT / config, args.index, data)
        m = results[name]["metrics"]
        print(f"  {name}: nDCG@10 {m['ndcg_cut_10']:.4f}  Recall@100 {m['recall_100']:.4f}  MRR@10 {m['mrr_10']:.4f}  "
              f"latency p50 {results[name]['latency_ms']['p50']:.1f} ms p95 {results[name]['latency_ms']['p95']:.1f} ms",
              flush=True)
    payload = {
        **run_record("recall_scifact"),
        "machine": info,
        "data": {"directory": str(args.data), "split": args.split, "corpus_docs": manifest["corpus"]["doc_count"],
                 "queries": len(data.queries)},
        "index": index_info,
        "design_notes_ndcg_10": DESIGN_NOTES,
        "results": results,
    }
    text = markdown(payload)
    print()
    print(text)
    if not args.no_write:
        json_path, md_path = write_results("recall_scifact", payload, text)
        print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
