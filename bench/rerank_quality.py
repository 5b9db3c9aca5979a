"""Rerank quality on SciFact **test**: BM25 top-N reranked by the shipped model, and fused.

Runs the engine itself: an index of the full SciFact corpus (built once under build/), a
``recall.bm25 (top N) -> rerank.cross_encoder (window N)`` pipeline (N = ``--depth``, 30 by
default as in the configs), every test query. From each query's ledger (bm25 and rerank scores)
it also derives:
- with ``--depth`` above 30, rerank of the top 30 only (the same scores re-sorted within BM25's
  first 30: identical to a window-30 stage, without scoring the pairs twice);
- BM25 + rerank fusion: ``w * minmax(rerank) + (1 - w) * minmax(bm25)`` over the N candidates,
  with ``w`` taken from the model card — chosen on queries held out of the *training* split,
  never on test.
Unless ``--no-hybrid``, ``configs/hybrid-rerank.yaml`` (BM25 + dense, RRF, rerank, blend) is
evaluated too, on ``indexes/scifact``.

Usage: HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/rerank_quality.py
Writes bench/results/rerank_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BUILD, ROOT, machine, machine_line, scifact_bm25_index, write_results  # noqa: E402
from _common import SCIFACT as DATA  # noqa: E402
from _common import SHIPPED_RERANKER as SHIPPED  # noqa: E402


# Reference points (not measured here): see DESIGN.md "Bars to beat".
REFERENCES = {
    "BM25 (Anserini, BEIR paper)": 0.679,
    "MiniLM cross-encoder rerank (published)": 0.688,
    "RRF(BM25, MiniLM dense), untrained (measured in the design notes, top-30)": 0.717,
}


def minmax(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high - low <= 0:
        return [1.0] * len(values)
    return [(v - low) / (high - low) for v in values]


def ranked_run(scores: dict[str, float]) -> dict[str, float]:
    """Strictly decreasing run scores in the order (-score, doc_id), so trec_eval sees our order."""
    order = sorted(scores, key=lambda d: (-scores[d], d))
    return {d: float(len(order) - i) for i, d in enumerate(order)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(SHIPPED))
    parser.add_argument("--depth", type=int, default=30, help="BM25 depth reranked (the configs use 30)")
    parser.add_argument("--no-hybrid", action="store_true", help="skip configs/hybrid-rerank.yaml")
    parser.add_argument("--limit", type=int, default=None, help="first N test queries only (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import stages  # noqa: F401  (registers the stage types)
    from engine.evaluation import evaluate_run, load_beir, percentile
    from engine.models import model_card
    from engine.pipeline import Pipeline
    from engine.registry import UnknownStageType, resolve_stage

    info = machine()
    print(f"machine: {machine_line(info)}")
    data = load_beir(DATA, "test")
    queries = dict(list(data.queries.items())[: args.limit]) if args.limit else data.queries
    qrels = {q: data.qrels[q] for q in queries}
    index_dir = scifact_bm25_index()

    card = model_card(Path(args.model)) or {}
    fusion_weight = ((card.get("fusion") or {}).get("weights") or {}).get("rerank")
    BUILD.mkdir(parents=True, exist_ok=True)
    config_path = BUILD / "bm25-rerank.yaml"
    config_path.write_text(
        f"""version: 1
index: {index_dir}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: {args.depth}}}}}
  - {{id: rerank, type: rerank.cross_encoder, inputs: [bm25], params: {{model: {args.model}, window: {args.depth}, batch_size: {args.batch_size}, cache_size: 0}}}}
output: rerank
trace: {{log: null, explain: false}}
""",
        encoding="utf-8",
    )
    pipeline = Pipeline.from_file(config_path)
    began = time.perf_counter()
    pipeline.warm_up()
    identity = pipeline.compiled.stages["rerank"].identity()
    print(f"model: {identity}")
    ledgers: dict[str, dict[str, tuple[float, float | None]]] = {}
    bm25_order: dict[str, list[str]] = {}
    rerank_order: dict[str, list[str]] = {}
    stage_ms: list[float] = []
    truncated = 0
    pairs = 0
    for number, (qid, text) in enumerate(queries.items(), start=1):
        result = pipeline.search(text, log=False)
        record = next(s for s in result.trace["stages"] if s["id"] == "rerank")
        stage_ms.append(record["duration_ms"])
        truncated += record["details"]["truncated"]["count"]
        pairs += record["details"]["reranked"]
        bm25_order[qid] = [d for d, _ in next(s for s in result.trace["stages"] if s["id"] == "bm25")["output"]]
        rerank_order[qid] = [c.doc_id for c in result.results]
        ledgers[qid] = {c.doc_id: (c.score_of("bm25"), c.score_of("rerank")) for c in result.results}
        if number % 25 == 0:
            print(f"{number}/{len(queries)} queries, median rerank {statistics.median(stage_ms):.0f} ms")
    seconds = time.perf_counter() - began

    def positional(order: dict[str, list[str]]) -> dict[str, dict[str, float]]:
        return {q: {d: float(len(ids) - i) for i, d in enumerate(ids)} for q, ids in order.items()}

    runs = {
        f"BM25 top-{args.depth}": positional(bm25_order),
        f"BM25 top-{args.depth} -> rerank (window {args.depth})": positional(rerank_order),
    }
    top30 = {}
    for qid, ids in bm25_order.items():
        head = sorted(ids[:30], key=lambda d: (-ledgers[qid][d][1], d))
        top30[qid] = head + ids[30:]
    if args.depth > 30:
        runs[f"BM25 top-{args.depth} -> rerank (window 30)"] = positional(top30)
    weights = [fusion_weight] if fusion_weight is not None else []
    for weight in weights:
        fused = {}
        for qid, ledger in ledgers.items():
            docs = list(ledger)
            b = minmax([ledger[d][0] for d in docs])
            r = minmax([ledger[d][1] for d in docs])
            fused[qid] = ranked_run({d: weight * rv + (1 - weight) * bv for d, bv, rv in zip(docs, b, r)})
        runs[f"fused: {weight:g} x minmax(rerank) + {1 - weight:g} x minmax(bm25)"] = fused

    hybrid = None
    try:
        for name in ("recall.dense", "fuse.rrf", "fuse.weighted"):
            resolve_stage(name)
        hybrid = None if args.no_hybrid else ROOT / "configs" / "hybrid-rerank.yaml"
    except UnknownStageType:
        print("recall.dense / fuse.rrf / fuse.weighted are not registered yet: skipping configs/hybrid-rerank.yaml")
    hybrid_error = None
    if hybrid is not None and hybrid.is_file():
        try:
            from engine.evaluation import run_pipeline

            hybrid_pipeline = Pipeline.from_file(hybrid, index_path=ROOT / "indexes" / "scifact")
            runs["configs/hybrid-rerank.yaml"] = run_pipeline(hybrid_pipeline, queries).run
        except Exception as exc:  # noqa: BLE001 - reported in the results, not fatal for the rest
            hybrid_error = f"{type(exc).__name__}: {exc}"
            print(f"hybrid pipeline not evaluated: {hybrid_error}")

    metrics = {name: evaluate_run(run, qrels) for name, run in runs.items()}
    for name, figures in metrics.items():
        print(f"{name:60s} nDCG@10 {figures['ndcg_cut_10']:.4f}  R@100 {figures['recall_100']:.4f}  "
              f"MRR@10 {figures['mrr_10']:.4f}")
    payload = {
        "machine": info,
        "data": {"directory": str(DATA), "split": "test", "queries": len(queries)},
        "model": identity,
        "model_card": {k: card.get(k) for k in ("head", "scale", "selected_epoch", "fusion", "metrics", "seed")},
        "depth": args.depth,
        "fusion_weight_from_model_card": fusion_weight,
        "metrics": {name: {k: round(v, 4) for k, v in figures.items()} for name, figures in metrics.items()},
        "rerank_stage_ms": {"median": statistics.median(stage_ms), "p95": percentile(stage_ms, 95)},
        "pairs_scored": pairs,
        "pairs_truncated": truncated,
        "seconds": round(seconds, 1),
        "references": REFERENCES,
        "hybrid_error": hybrid_error,
    }
    rows = "\n".join(
        f"| {name} | {f['ndcg_cut_10']:.4f} | {f['recall_100']:.4f} | {f['mrr_10']:.4f} |" for name, f in metrics.items()
    )
    refs = "\n".join(f"| {name} | {value:.3f} | | |" for name, value in REFERENCES.items())
    markdown = f"""# Rerank quality: SciFact test

Machine: {machine_line(info)}.

{len(queries)} test queries; BM25 (bm25s, Lucene, k1 1.5, b 0.75, stemmed) top {args.depth}, reranked by
`{identity.get('model')}` ({identity.get('kind')}, weights sha256 `{str(identity.get('weights_sha256'))[:16]}…`,
{identity.get('device')} {identity.get('precision')}, max_length {identity.get('max_length')}). The fusion
weight comes from the model card (chosen on queries held out of the training split); nothing here
was tuned on test. {truncated} of {pairs} scored pairs were cut to max_length (recorded per document
in the traces).

| run | nDCG@10 | Recall@100 | MRR@10 |
|---|---|---|---|
{rows}
| *references, not measured here* | | | |
{refs}

Rerank stage latency per query ({args.depth} pairs, batch {args.batch_size}): median
{statistics.median(stage_ms):.0f} ms, p95 {percentile(stage_ms, 95):.0f} ms. Whole run {seconds / 60:.1f} min.

Command: `HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/rerank_quality.py`
"""
    json_path, md_path = write_results("rerank_quality", payload, markdown)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
