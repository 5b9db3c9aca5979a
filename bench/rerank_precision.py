"""Rerank precision on a CPU: the shipped model in fp32 against bf16 autocast, same queries, same run.

``precision: auto`` picks bf16 on a CPU with native bf16 (AVX512-BF16 or AMX) and fp32 elsewhere.
This checks the condition that choice rests on — bf16 is faster there *and* the ranking does not
change — on SciFact **test** queries: ``recall.bm25`` (top 30) -> ``rerank.cross_encoder`` (window
30, score cache off), once per precision, the two pipelines alternating query by query so machine
load hits both alike. Reported: nDCG@10 of each (and of BM25 alone), how often the top 10 is the
same set and the same order, Kendall's tau of the 30 reranked scores, the largest score difference,
and the rerank stage's median time per query.

Usage: HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/rerank_precision.py [--queries 60]
Writes bench/results/rerank_precision.{json,md}. On a CPU without native bf16 the bf16 side is
emulated (slow); the script says so and still measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BUILD, ROOT, machine, machine_line, scifact_bm25_index, write_results  # noqa: E402
from _common import SCIFACT as DATA  # noqa: E402
from _common import SHIPPED_RERANKER as SHIPPED  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=60, help="first N SciFact test queries")
    parser.add_argument("--depth", type=int, default=30)
    args = parser.parse_args()

    from scipy.stats import kendalltau

    import stages  # noqa: F401  (registers the stage types)
    from engine.evaluation import evaluate_run, load_beir
    from engine.pipeline import Pipeline

    info = machine()
    print(f"machine: {machine_line(info)}")
    data = load_beir(DATA, "test")
    queries = dict(list(data.queries.items())[: args.queries])
    qrels = {q: data.qrels[q] for q in queries}
    index_dir = scifact_bm25_index()
    BUILD.mkdir(parents=True, exist_ok=True)
    pipelines = {}
    for precision in PRECISIONS:
        config = BUILD / f"rerank-{precision}.yaml"
        config.write_text(f"""version: 1
index: {index_dir}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: {args.depth}}}}}
  - {{id: rerank, type: rerank.cross_encoder, inputs: [bm25],
      params: {{model: {SHIPPED}, window: {args.depth}, device: cpu, precision: {precision}, cache_size: 0}}}}
output: rerank
trace: {{log: null, explain: false}}
""", encoding="utf-8")
        pipelines[precision] = Pipeline.from_file(config)
        pipelines[precision].warm_up()

    orders: dict[str, dict[str, list[str]]] = {p: {} for p in PRECISIONS}
    scores: dict[str, dict[str, dict[str, float]]] = {p: {} for p in PRECISIONS}
    stage_ms: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    bm25: dict[str, list[str]] = {}
    for number, (qid, text) in enumerate(queries.items(), start=1):
        for precision in (PRECISIONS if number % 2 else PRECISIONS[::-1]):  # alternate who goes first
            result = pipelines[precision].search(text, log=False)
            record = next(s for s in result.trace["stages"] if s["id"] == "rerank")
            stage_ms[precision].append(record["duration_ms"])
            orders[precision][qid] = [c.doc_id for c in result.results]
            scores[precision][qid] = {c.doc_id: c.score_of("rerank") for c in result.results}
            bm25[qid] = [d for d, _ in next(s for s in result.trace["stages"] if s["id"] == "bm25")["output"]]
        if number % 10 == 0:
            print(f"{number}/{len(queries)}: median rerank ms " +
                  ", ".join(f"{p} {statistics.median(stage_ms[p]):.0f}" for p in PRECISIONS))

    def positional(order: dict[str, list[str]]) -> dict[str, dict[str, float]]:
        return {q: {d: float(len(ids) - i) for i, d in enumerate(ids)} for q, ids in order.items()}

    metrics = {"BM25": evaluate_run(positional(bm25), qrels)}
    metrics.update({f"BM25 -> rerank ({p})": evaluate_run(positional(orders[p]), qrels) for p in PRECISIONS})
    same_set = sum(set(orders["fp32"][q][:10]) == set(orders["bf16"][q][:10]) for q in queries)
    same_order = sum(orders["fp32"][q][:10] == orders["bf16"][q][:10] for q in queries)
    taus, worst = [], 0.0
    for q in queries:
        docs = list(scores["fp32"][q])
        a = [scores["fp32"][q][d] for d in docs]
        b = [scores["bf16"][q][d] for d in docs]
        taus.append(float(kendalltau(a, b).statistic))
        worst = max(worst, max(abs(x - y) for x, y in zip(a, b)))
    medians = {p: statistics.median(stage_ms[p]) for p in PRECISIONS}
    speedup = medians["fp32"] / medians["bf16"]
    for name, figures in metrics.items():
        print(f"{name:28s} nDCG@10 {figures['ndcg_cut_10']:.4f}")
    print(f"top 10: same set {same_set}/{len(queries)}, same order {same_order}/{len(queries)}; "
          f"Kendall tau mean {statistics.fmean(taus):.4f} (min {min(taus):.4f}); max |score diff| {worst:.3f}")
    print(f"rerank stage median ms: fp32 {medians['fp32']:.0f}, bf16 {medians['bf16']:.0f} ({speedup:.2f}x)")

    payload = {
        "machine": info,
        "queries": len(queries), "depth": args.depth, "model": str(SHIPPED.relative_to(ROOT)),
        "ndcg_cut_10": {name: round(f["ndcg_cut_10"], 4) for name, f in metrics.items()},
        "top10_same_set": same_set, "top10_same_order": same_order,
        "kendall_tau": {"mean": statistics.fmean(taus), "min": min(taus)},
        "max_abs_score_difference": worst,
        "rerank_stage_ms": {p: {"median": medians[p], "samples": stage_ms[p]} for p in PRECISIONS},
        "bf16_speedup": speedup,
    }
    rows = "\n".join(f"| {name} | {f['ndcg_cut_10']:.4f} |" for name, f in metrics.items())
    native = "native bf16" if info["cpu_native_bf16"] else "NO native bf16 (bf16 is emulated here)"
    markdown = f"""# Rerank precision on a CPU: fp32 against bf16 (shipped model, SciFact test)

Machine: {machine_line(info)}.

The first {len(queries)} SciFact test queries, `recall.bm25` (top {args.depth}) -> `rerank.cross_encoder`
(window {args.depth}, score cache off) with `{SHIPPED.relative_to(ROOT)}`, once in fp32 and once in bf16
autocast, alternating query by query. This CPU has {native}.

| run | nDCG@10 |
|---|---|
{rows}

- rerank stage, median per query: fp32 **{medians['fp32']:.0f} ms**, bf16 **{medians['bf16']:.0f} ms** ({speedup:.2f}x)
- top 10 the same set for {same_set} of {len(queries)} queries, the same order for {same_order}
- Kendall's tau between the two score lists (30 documents): mean {statistics.fmean(taus):.4f}, lowest {min(taus):.4f}
- largest score difference {worst:.3f} (scores are 20 x a cosine, range -20..20)

Command: `HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/rerank_precision.py --queries {len(queries)}`
"""
    json_path, md_path = write_results("rerank_precision", payload, markdown)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
