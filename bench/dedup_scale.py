"""MinHash dedup's cost per query when its signature cache does not help (a large corpus), before and after the
batched signatures, in the same run.

On a corpus of 250k documents nearly every candidate of a query misses the stage's 50,000-row signature cache, so
each query signs most of its 200 candidates afresh; on SciFact (5,183 documents) the cache soon holds the whole
corpus and hides that cost. Here each query runs against an empty cache (``cold``: the production case), then again
on the filled one (``warm``).

Candidates: the BM25 top 200 of each of the first ``--queries`` SciFact test queries (a BM25 index of the full
corpus under build/bench, as the other benchmarks build it). Both implementations run ``dedup.near_duplicate``
(``method: minhash``, threshold 0.7, as ``bench/signals_scifact.py``) on the same candidates, in alternating order
per query: ``HEAD`` is ``stages/dedup.py`` as committed at ``--baseline`` (default 3dfaaca^, the commit before batch signing; datasketch's
``MinHash.generator`` per document), ``working tree`` is the file as it is now. The run also checks that both give
the same signatures, the same survivors, drops and details for every query, and reports the cost per signed
document.

    .venv/bin/python bench/dedup_scale.py [--queries 100] [--baseline REV] [--name dedup_scale]

Writes ``bench/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import SCIFACT, host, scifact_bm25_index, write_results  # noqa: E402

CANDIDATES = 200
PARAMS = {"method": "minhash", "threshold": 0.7}


def baseline_stage_class(revision: str) -> type:
    """``NearDuplicateFilter`` from ``stages/dedup.py`` at ``revision``, loaded as a private module (not registered:
    the registry holds the working tree's)."""
    source = subprocess.run(["git", "show", f"{revision}:stages/dedup.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    source = source.replace("@register_stage\n", "")
    module = types.ModuleType("dedup_baseline")
    module.__file__ = f"<{revision}:stages/dedup.py>"
    sys.modules[module.__name__] = module  # pydantic resolves the params' annotations through it
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own file at a commit
    return module.NearDuplicateFilter


def test_queries(count: int) -> list[str]:
    judged = set()
    with open(SCIFACT / "qrels" / "test.tsv", encoding="utf-8") as handle:
        for line in handle:
            query_id = line.split("\t")[0]
            if query_id != "query-id":
                judged.add(query_id)
    texts = []
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if str(record["_id"]) in judged:
                texts.append(record["text"])
    return texts[:count]


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": round(statistics.median(ordered), 3),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
            "mean_ms": round(statistics.fmean(ordered), 3), "queries": len(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--baseline", default="3dfaaca^", help="git revision whose stages/dedup.py is the baseline "
                        "(default: the commit before batch signing)")
    parser.add_argument("--name", default="dedup_scale")
    args = parser.parse_args()

    import datasketch
    import numpy as np

    from engine.cache import LRUCache
    from engine.compiler import compile_data
    from engine.model import Candidate, ScoreEntry
    from engine.pipeline import Pipeline
    from engine.stage import StageContext

    index_path = scifact_bm25_index()
    config = {"version": 1, "index": str(index_path),
              "stages": [{"id": "bm25", "type": "recall.bm25", "params": {"top_k": CANDIDATES}},
                         {"id": "dedup", "type": "dedup.near_duplicate", "inputs": ["bm25"], "params": PARAMS}],
              "output": "dedup"}
    pipeline = Pipeline(compile_data(config, label="<dedup-scale>", base_dir=ROOT))
    resources = pipeline.warm_up()
    index = resources.index
    current = pipeline.compiled.stages["dedup"]
    Baseline = baseline_stage_class(args.baseline)
    baseline = Baseline("dedup", Baseline.Params(**PARAMS))
    baseline.warm_up(resources)
    stages = {"HEAD": baseline, "working tree": current}

    cold: dict[str, list[float]] = {name: [] for name in stages}
    warm: dict[str, list[float]] = {name: [] for name in stages}
    signed = 0  # documents signed per implementation (each query's distinct candidates, all misses when cold)
    mismatches: list[str] = []
    queries = test_queries(args.queries)
    for number, text in enumerate(queries):
        query = pipeline.make_query(text)
        result = pipeline.run(query)
        ranked = next(s for s in result.trace["stages"] if s["id"] == "bm25")["output"]
        incoming = [Candidate(d, index.row_of(d), (ScoreEntry("bm25", "bm25", float(score), rank),))
                    for rank, (d, score) in enumerate(ranked, start=1)]
        signed += len({c.row for c in incoming})
        outputs = {}
        order = list(stages) if number % 2 == 0 else list(reversed(stages))
        for name in order:
            stage = stages[name]
            stage._cache = LRUCache(50_000)  # cold: as on a corpus far larger than the cache
            began = time.perf_counter()
            out = stage.run(StageContext("dedup", query, [incoming], None, resources))
            cold[name].append((time.perf_counter() - began) * 1000.0)
            began = time.perf_counter()
            stage.run(StageContext("dedup", query, [incoming], None, resources))
            warm[name].append((time.perf_counter() - began) * 1000.0)
            outputs[name] = ([c.doc_id for c in out.candidates], [(d.doc_id, d.reason, d.detail) for d in out.drops],
                             json.dumps(out.details, sort_keys=True))
        rows = [c.row for c in incoming]
        same_signatures = all(np.array_equal(a, b) for a, b in zip(baseline._signatures(rows), current._signatures(rows)))
        if outputs["HEAD"] != outputs["working tree"] or not same_signatures:
            mismatches.append(text)

    per_document_us = {name: round(sum(cold[name]) * 1000.0 / signed, 1) for name in stages}
    summary = {name: {"cold": stats(cold[name]), "warm": stats(warm[name])} for name in stages}
    speedup = round(summary["HEAD"]["cold"]["median_ms"] / summary["working tree"]["cold"]["median_ms"], 2)
    info = host(numpy=np.__version__, datasketch=datasketch.__version__)
    payload = {
        "machine": info, "index": str(index_path.relative_to(ROOT)), "documents": len(index.documents.doc_ids()),
        "queries": len(queries), "candidates": CANDIDATES, "params": PARAMS, "baseline": args.baseline,
        "documents_signed_per_implementation": signed, "results": summary,
        "cold_us_per_signed_document": per_document_us, "cold_median_speedup": speedup,
        "identical_outputs_and_signatures": not mismatches, "mismatched_queries": mismatches[:10],
    }
    lines = [
        "# MinHash dedup per query with no cache help (SciFact, 200 candidates)", "",
        f"Command: `{' '.join(['.venv/bin/python', *sys.argv])}`", "",
        f"Machine: {info['cpu']}, {info['cpu_cores_usable']} usable cores, Python {info['python']}, numpy "
        f"{info['numpy']}, datasketch {info['datasketch']}; load average at start {info.get('load_average_at_start')}.", "",
        f"`dedup.near_duplicate` `{json.dumps(PARAMS)}` on the BM25 top {CANDIDATES} of {len(queries)} SciFact test "
        f"queries ({payload['documents']} documents). **cold**: the stage's signature cache emptied before each query, "
        "so every candidate is signed (what a corpus far larger than the 50,000-row cache sees); **warm**: the same "
        "query again, every signature cached. `HEAD` is `stages/dedup.py` at "
        f"`{args.baseline}` (datasketch `MinHash.generator`, one MinHash per document); `working tree` signs all "
        "missing candidates in one batch (`minhash_signatures`). Same run, alternating order per query.", "",
        "| implementation | cold median ms | cold p95 | warm median ms | µs per signed document (cold) |",
        "|---|---|---|---|---|",
    ]
    for name in stages:
        lines.append(f"| {name} | {summary[name]['cold']['median_ms']} | {summary[name]['cold']['p95_ms']} | "
                     f"{summary[name]['warm']['median_ms']} | {per_document_us[name]} |")
    lines += ["", f"Cold median speed-up: **{speedup}x**. Signatures, survivors, drops and details identical for "
              f"every query: **{'yes' if not mismatches else 'NO (' + str(len(mismatches)) + ' queries)'}**."]
    json_path, md_path = write_results(args.name, payload, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
