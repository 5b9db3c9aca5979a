"""BM25 on SciFact test through Sieve: reference parity and the engine's overhead per query.

1. Builds (or reuses) a BM25-only index of the full SciFact corpus (title + text, bm25s defaults:
   Lucene, k1 1.5, b 0.75; Snowball English stemming, English stop words) under ``build/bench``.
2. Runs every test query through ``configs/bm25.yaml`` (``recall.bm25`` top 100) with
   :mod:`engine.evaluation` (pytrec_eval) and checks nDCG@10 against the reference 0.679
   (Anserini BM25 in the BEIR paper): it must lie within 0.01.
3. Engine overhead: in the same run, each query is also answered by bm25s directly (the index's
   own tokenizer, ``get_scores``, a top-100 sort) — the baseline. For three trace settings
   (no explanations; explanations; explanations + appending to the hash-chained trace log) it
   reports latency per query and the overhead = pipeline latency - the BM25 scoring call timed
   inside the very same search (``timings_ms.bm25_scoring``). Queries are interleaved across
   variants so drift in machine load hits all of them alike.

    .venv/bin/python bench/bm25_scifact.py [--data ../shared/data/scifact] [--rounds 3]

Writes ``bench/results/bm25_scifact.json`` and ``bench/results/bm25_scifact.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine, machine_line, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REFERENCE_NDCG10 = 0.679  # Anserini BM25, BEIR paper (Thakur et al., 2021), SciFact test
TOLERANCE = 0.01
DEPTH = 100
VARIANTS = {
    "no explanations": "trace: {log: null, explain: false}",
    "explanations": "trace: {log: null, explain: true}",
    "explanations + trace log": "trace: {log: LOG, explain: true}",
}


def ensure_index(data_dir: Path, index_dir: Path) -> dict[str, Any]:
    """Reuse a BM25 index of this corpus, or build one (timed)."""
    from engine.index import Index, build_index, sha256_file

    corpus_sha = sha256_file(data_dir / "corpus.jsonl")
    if (index_dir / "manifest.json").is_file():
        manifest = Index.open(index_dir, verify=False).manifest
        if manifest["corpus"]["sha256"] == corpus_sha and "bm25" in manifest["components"]:
            return {"path": str(index_dir), "reused": True, "build_seconds": None,
                    "documents": manifest["corpus"]["doc_count"]}
    began = time.perf_counter()
    manifest = build_index(data_dir, index_dir, {"bm25": {}})
    return {"path": str(index_dir), "reused": False, "build_seconds": round(time.perf_counter() - began, 2),
            "documents": manifest["corpus"]["doc_count"]}


def raw_bm25(loaded: Any, text: str, depth: int) -> tuple[list[int], float]:
    """The baseline: bm25s alone (tokenise, score the corpus, sort the top ``depth``); rows and ms."""
    import numpy as np

    began = time.perf_counter()
    terms = [t for t in loaded.tokenizer.tokenize(text) if t in loaded.vocab]
    scores = loaded.retriever.get_scores(terms)
    top = np.argpartition(-scores, depth)[:depth]
    rows = top[np.argsort(-scores[top], kind="stable")].tolist()
    return rows, (time.perf_counter() - began) * 1000.0


def summary(values: list[float]) -> dict[str, float]:
    from engine.evaluation import percentile

    return {"p50": round(statistics.median(values), 3), "p95": round(percentile(values, 95), 3),
            "mean": round(statistics.fmean(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--index", type=Path, default=ROOT / "build" / "bench" / "scifact-index")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the queries (first pass warms caches)")
    args = parser.parse_args()

    import stages  # noqa: F401  (registers the stage types)
    from engine.evaluation import evaluate_run, load_beir, run_pipeline
    from engine.pipeline import Pipeline
    from stages.recall.bm25 import LoadedBM25

    info = machine()
    print(f"machine: {machine_line(info)}", flush=True)
    data = load_beir(args.data, "test")
    index = ensure_index(args.data, args.index)
    print(f"index: {index}", flush=True)

    # Quality: the shipped baseline config, pointed at this index.
    baseline = Pipeline.from_file(ROOT / "configs" / "bm25.yaml", index_path=args.index)
    output = run_pipeline(baseline, data.queries)
    metrics = {k: round(v, 4) for k, v in evaluate_run(output.run, data.qrels).items()}
    delta = metrics["ndcg_cut_10"] - REFERENCE_NDCG10
    within = abs(delta) <= TOLERANCE
    print(f"nDCG@10 {metrics['ndcg_cut_10']:.4f} (reference {REFERENCE_NDCG10}, delta {delta:+.4f})", flush=True)

    # Overhead: the same config under three trace settings, against bm25s alone.
    work = Path(tempfile.mkdtemp(prefix="sieve-bench-"))
    base_text = (ROOT / "configs" / "bm25.yaml").read_text(encoding="utf-8")
    pipelines: dict[str, Pipeline] = {}
    for name, trace in VARIANTS.items():
        config = work / f"{name.replace(' ', '-').replace('+', 'and')}.yaml"
        config.write_text(base_text + trace.replace("LOG", str(work / "trace.jsonl")) + "\n", encoding="utf-8")
        pipelines[name] = Pipeline.from_file(config, index_path=args.index)
        pipelines[name].warm_up()
    directory, entry = baseline.resources.index.component("bm25", "bench")  # type: ignore[union-attr]
    loaded = LoadedBM25(directory, entry)

    latency: dict[str, list[float]] = {name: [] for name in VARIANTS}
    overhead: dict[str, list[float]] = {name: [] for name in VARIANTS}
    scoring: list[float] = []
    raw_ms: list[float] = []
    same_order = 0
    queries = list(data.queries.values())
    for round_number in range(args.rounds + 1):
        timed = round_number > 0  # round 0 warms every cache the same way for every variant
        for text in queries:
            rows, ms = raw_bm25(loaded, text, DEPTH)
            if timed:
                raw_ms.append(ms)
            for name, pipeline in pipelines.items():
                began = time.perf_counter()
                result = pipeline.search(text, log=False)
                if pipeline.compiled.config.trace.log is not None:
                    pipeline.log_trace(result.trace)
                elapsed = (time.perf_counter() - began) * 1000.0
                if not timed:
                    continue
                record = next(s for s in result.trace["stages"] if s["id"] == "bm25")
                inside = record["timings_ms"]["bm25_scoring"]
                latency[name].append(elapsed)
                overhead[name].append(elapsed - inside)
                if name == "no explanations":
                    scoring.append(inside)
                    if round_number == 1 and [c.row for c in result.results] == rows:
                        same_order += 1
        print(f"round {round_number} done", flush=True)

    payload = {
        "machine": info,
        "data": {"directory": str(args.data), "split": "test", "queries": len(data.queries)},
        "index": index,
        "config": "configs/bm25.yaml",
        "metrics": metrics,
        "reference_ndcg_cut_10": REFERENCE_NDCG10,
        "delta_vs_reference": round(delta, 4),
        "within_tolerance": within,
        "timed_queries_per_variant": len(scoring),
        "bm25s_alone_ms": summary(raw_ms),
        "bm25_scoring_inside_stage_ms": summary(scoring),
        "latency_ms": {name: summary(values) for name, values in latency.items()},
        "engine_overhead_ms": {name: summary(values) for name, values in overhead.items()},
        "same_top_100_as_bm25s_alone": f"{same_order}/{len(queries)}",
    }
    rows_md = "\n".join(
        f"| {name} | {payload['latency_ms'][name]['p50']:.2f} / {payload['latency_ms'][name]['p95']:.2f} | "
        f"{payload['engine_overhead_ms'][name]['p50']:.2f} / {payload['engine_overhead_ms'][name]['p95']:.2f} |"
        for name in VARIANTS
    )
    build = ("reused an existing index" if index["reused"] else f"index built in {index['build_seconds']:.1f} s")
    markdown = f"""# BM25 on SciFact test through Sieve: parity and engine overhead

Machine: {machine_line(info)}.

Data: {index['documents']} documents, {len(data.queries)} test queries with judgements; `configs/bm25.yaml`
(`recall.bm25`, bm25s Lucene k1 1.5 b 0.75, title + text, Snowball stemming, top {DEPTH}); {build}.
Metrics from pytrec_eval (`engine.evaluation`).

| run | nDCG@10 | Recall@100 | MRR@10 | MAP |
|---|---|---|---|---|
| Sieve `configs/bm25.yaml` | **{metrics['ndcg_cut_10']:.4f}** | {metrics['recall_100']:.4f} | {metrics['mrr_10']:.4f} | {metrics['map']:.4f} |
| reference: BM25 (Anserini, BEIR paper) | 0.679 | | | |

Difference from the reference: {delta:+.4f} ({'within' if within else 'OUTSIDE'} the ±{TOLERANCE} tolerance).
The pipeline returned the same top {DEPTH} as bm25s alone for {same_order} of {len(queries)} queries (ties broken by document id in Sieve).

## Engine overhead per query

Baseline in the same run: bm25s alone (tokenise, `get_scores`, sort the top {DEPTH}) p50
{payload['bm25s_alone_ms']['p50']:.2f} ms, p95 {payload['bm25s_alone_ms']['p95']:.2f} ms; the scoring call inside the stage
p50 {payload['bm25_scoring_inside_stage_ms']['p50']:.2f} ms. Overhead = `Pipeline.search` latency minus that scoring call,
measured in the same search: query validation, tokenising, the top-{DEPTH} selection, candidates and
their ledgers, the trace (config and index hashes, per-stage records) and, where on, explanations and
the log append. {args.rounds} timed passes over the {len(queries)} queries after one warm-up pass,
variants interleaved query by query.

| trace setting | latency p50 / p95 ms | engine overhead p50 / p95 ms |
|---|---|---|
{rows_md}

Command: `.venv/bin/python bench/bm25_scifact.py`
"""
    json_path, md_path = write_results("bm25_scifact", payload, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
