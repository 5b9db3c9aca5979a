"""How aggressive may near-duplicate removal be? Measured on SciFact (train by default: the default
threshold is chosen there; ``--split test`` reports test), where every document is
a distinct abstract, so every relevant document a threshold removes is a loss.

For each judged query the hybrid list (BM25 top 100 + dense top 100, RRF, top ``--depth``) is taken
from the real pipeline; the similarities are the ``dedup.near_duplicate`` stage's own (cosine of the
index's all-MiniLM-L6-v2 vectors; MinHash Jaccard of word 3-grams), and the removals are what the
stage itself drops at each threshold (greedy, best-ranked survives). Reported: the distribution of
pairwise cosines in the top-k and of each document's highest similarity to a better-ranked one,
and per threshold the documents removed, the distinct relevant documents removed, the queries
that lose one, and nDCG@10 before/after.

    .venv/bin/python bench/dedup_threshold.py [--index indexes/scifact] [--depth 30] [--split train]

Writes ``bench/results/dedup_threshold.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench._common import machine, machine_line, write_results  # noqa: E402

COSINE_THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)
JACCARD_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)

PIPELINE = """\
version: 1
index: {index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 100}}}}
  - {{id: dense, type: recall.dense, params: {{top_k: 100}}}}
  - {{id: hybrid, type: fuse.rrf, inputs: [bm25, dense], params: {{k: 60, top_k: {depth}}}}}
{dedup}
output: {output}
trace: {{explain: false}}
"""


def percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    array = np.asarray(values, dtype=np.float64)
    return {f"p{q:g}": round(float(np.percentile(array, q)), 4) for q in (50, 90, 99, 99.9)} | {
        "max": round(float(array.max()), 4), "count": int(array.size)}


def main() -> None:
    import numpy as np

    from engine.compiler import compile_data
    from engine.evaluation import load_beir, per_query_metrics, aggregate
    from engine.pipeline import Pipeline
    from engine.stage import StageContext
    from engine.yamlsource import load_yaml_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, default=ROOT / "indexes" / "scifact")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--depth", type=int, default=30)
    parser.add_argument("--split", default="train", help="judged split to measure on (train: where the default is chosen)")
    args = parser.parse_args()
    info = machine()
    print(machine_line(info), flush=True)
    data = load_beir(args.data, args.split)

    dedup_yaml = "\n".join(
        ["  - {id: cos, type: dedup.near_duplicate, inputs: [hybrid], params: {threshold: 0.99}}",
         "  - {id: jac, type: dedup.near_duplicate, inputs: [cos], params: {method: minhash, threshold: 0.99}}"]
    )
    text = PIPELINE.format(index=args.index.resolve(), depth=args.depth, dedup=dedup_yaml, output="jac")
    loaded = load_yaml_text(text, "<dedup_threshold>")
    pipeline = Pipeline(compile_data(loaded.data, label="<dedup_threshold>", base_dir=ROOT))
    resources = pipeline.warm_up()
    cosine_stage = pipeline.compiled.stages["cos"]
    jaccard_stage = pipeline.compiled.stages["jac"]
    variants: dict[str, Any] = {}
    for threshold in COSINE_THRESHOLDS:
        variants[f"cosine>={threshold:g}"] = type(cosine_stage)("cos", cosine_stage.Params(threshold=threshold))
    for threshold in JACCARD_THRESHOLDS:
        variants[f"jaccard>={threshold:g}"] = type(jaccard_stage)(
            "jac", jaccard_stage.Params(method="minhash", threshold=threshold))
    for stage in variants.values():
        stage.warm_up(resources)

    pairwise: list[float] = []
    nearest_better: list[float] = []
    nearest_better_jaccard: list[float] = []
    relevant_pairs: list[float] = []  # cosine between two relevant documents of the same query
    runs: dict[str, dict[str, dict[str, float]]] = {name: {} for name in ["none", *variants]}
    removed: dict[str, Counter[str]] = {name: Counter() for name in variants}
    began = time.perf_counter()
    for number, (qid, query_text) in enumerate(data.queries.items(), start=1):
        query = pipeline.make_query(query_text)
        # The hybrid list, from the real pipeline's trace (the dedup stages at 0.99 drop nothing we use).
        result = pipeline.run(query)
        hybrid_record = next(s for s in result.trace["stages"] if s["id"] == "hybrid")
        hybrid_ids = [doc_id for doc_id, _ in hybrid_record["output"]]
        index = resources.index
        from engine.model import Candidate, ScoreEntry

        incoming = [Candidate(d, index.row_of(d), (ScoreEntry("hybrid", "rrf", float(len(hybrid_ids) - r), r + 1),))
                    for r, d in enumerate(hybrid_ids)]
        rows = [c.row for c in incoming]
        cosine = cosine_stage.similarity_matrix(rows)
        jaccard = jaccard_stage.similarity_matrix(rows)
        upper = np.triu_indices(len(rows), k=1)
        pairwise.extend(cosine[upper].tolist())
        for i in range(1, len(rows)):
            nearest_better.append(float(cosine[i, :i].max()))
            nearest_better_jaccard.append(float(jaccard[i, :i].max()))
        relevant = {d for d, grade in data.qrels.get(qid, {}).items() if grade > 0}
        positions = [i for i, d in enumerate(hybrid_ids) if d in relevant]
        for a in range(len(positions)):
            for b in range(a + 1, len(positions)):
                relevant_pairs.append(float(cosine[positions[a], positions[b]]))
        runs["none"][qid] = {d: float(len(hybrid_ids) - r) for r, d in enumerate(hybrid_ids)}
        for name, stage in variants.items():
            out = stage.run(StageContext(stage.id, query, [incoming], None, resources))
            kept = [c.doc_id for c in out.candidates]
            runs[name][qid] = {d: float(len(kept) - r) for r, d in enumerate(kept)}
            removed[name]["documents"] += len(out.drops)
            lost = [d.doc_id for d in out.drops if d.doc_id in relevant]
            removed[name]["relevant"] += len(lost)
            removed[name]["queries_losing_relevant"] += 1 if lost else 0
        if number % 50 == 0:
            print(f"{number}/{len(data.queries)} queries, {time.perf_counter() - began:.0f} s", flush=True)

    base = aggregate(per_query_metrics(runs["none"], data.qrels, {"ndcg_cut.10"}))["ndcg_cut_10"]
    table = []
    for name in variants:
        ndcg = aggregate(per_query_metrics(runs[name], data.qrels, {"ndcg_cut.10"}))["ndcg_cut_10"]
        table.append({
            "threshold": name,
            "removed_per_query": round(removed[name]["documents"] / len(data.queries), 3),
            "relevant_removed": removed[name]["relevant"],
            "queries_losing_relevant": removed[name]["queries_losing_relevant"],
            "ndcg_cut_10": round(ndcg, 4),
            "delta_ndcg_cut_10": round(ndcg - base, 4),
        })

    # Exact duplicates in the corpus (same title + text): what a dedup stage must always catch.
    digests: Counter[str] = Counter()
    for doc in resources.index.documents.iter_documents():
        digests[doc.content_sha256()] += 1
    exact_groups = sum(1 for n in digests.values() if n > 1)

    payload = {
        "machine": info,
        "queries": len(data.queries),
        "depth": args.depth,
        "similarity": {"cosine": cosine_stage._source, "jaccard": jaccard_stage._source},
        "pairwise_cosine_top_k": percentiles(pairwise),
        "nearest_better_ranked_cosine": percentiles(nearest_better),
        "nearest_better_ranked_jaccard": percentiles(nearest_better_jaccard),
        "cosine_between_relevant_documents_of_a_query": percentiles(relevant_pairs) if relevant_pairs else None,
        "ndcg_cut_10_without_dedup": round(base, 4),
        "thresholds": table,
        "corpus_exact_duplicate_groups": exact_groups,
        "seconds": round(time.perf_counter() - began, 1),
    }
    lines = [
        f"# Near-duplicate threshold: SciFact {args.split}",
        "",
        f"Machine: {machine_line(info)}.",
        "",
        f"{len(data.queries)} {args.split} queries; the hybrid list (BM25 top 100 + dense top 100, RRF k=60) cut to the top "
        f"{args.depth}. Similarities are the `dedup.near_duplicate` stage's own: {cosine_stage._source}; "
        f"{jaccard_stage._source}. Removals are what the stage drops (greedy, best-ranked survives). "
        "SciFact documents are distinct abstracts, so every relevant document removed is a loss.",
        "",
        "| distribution | p50 | p90 | p99 | p99.9 | max | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, key in (("cosine, all pairs in the top-k", "pairwise_cosine_top_k"),
                       ("cosine to the most similar better-ranked document", "nearest_better_ranked_cosine"),
                       ("Jaccard (MinHash) to the most similar better-ranked document", "nearest_better_ranked_jaccard"),
                       ("cosine between two relevant documents of one query", "cosine_between_relevant_documents_of_a_query")):
        p = payload[key]
        if p:
            lines.append(f"| {label} | {p['p50']} | {p['p90']} | {p['p99']} | {p['p99.9']} | {p['max']} | {p['count']} |")
    lines += [
        "",
        f"nDCG@10 of the list without dedup: {base:.4f}.",
        "",
        "| threshold | removed per query | relevant removed | queries losing a relevant doc | nDCG@10 | Δ |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(f"| {row['threshold']} | {row['removed_per_query']} | {row['relevant_removed']} | "
                     f"{row['queries_losing_relevant']} | {row['ndcg_cut_10']:.4f} | {row['delta_ndcg_cut_10']:+.4f} |")
    lines += [
        "",
        f"Exact duplicates in the corpus (same title and text): {exact_groups} groups.",
        "",
        f"Run time {payload['seconds']} s. Command: `HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python "
        f"bench/dedup_threshold.py --index {args.index} --depth {args.depth} --split {args.split}`",
    ]
    json_path, md_path = write_results("dedup_threshold" if args.split == "train" else f"dedup_threshold_{args.split}", payload, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
