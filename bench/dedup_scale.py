"""MinHash dedup's cost per query when its signature cache does not help (a large corpus): signatures read from the
index's ``minhash`` component, signed per query in one batch, and signed per document as before the batching, in the
same run.

On a corpus of 250k documents nearly every candidate of a query misses the stage's 50,000-row signature cache, so
each query signs most of its 200 candidates afresh; on SciFact (5,183 documents) the cache soon holds the whole
corpus and hides that cost. Here each query runs against an empty cache (``cold``: the production case), then again
on the filled one (``warm``).

Candidates: the BM25 top 200 of each of the first ``--queries`` SciFact test queries. Two indexes of the full corpus
under build/bench: ``scifact-index`` (bm25, as the other benchmarks build it) and ``scifact-minhash-index`` (bm25 and
minhash at its defaults, as ``sieve index --with bm25 --with minhash`` builds it; rebuilt each run, and the minhash
component's build timed on its own). Three implementations of ``dedup.near_duplicate`` (``method: minhash``,
threshold 0.7, as ``bench/signals_scifact.py``) run on the same candidates, in rotating order per query: ``index
signatures`` (the working tree's stage on the minhash index), ``computed`` (the working tree's stage on the bm25
index: ``minhash_signatures``, one batch per query) and ``before batching`` (``stages/dedup.py`` as committed at
``--baseline``, default 3dfaaca^: datasketch's ``MinHash.generator`` per document, on the bm25 index). The run checks
that all three give the same signatures, survivors, drops and details (but the recorded source, ``signatures``) for
every query, and reports the cost per candidate.

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

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import BUILD, SCIFACT, host, scifact_bm25_index, write_results  # noqa: E402

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


def build_minhash_index() -> tuple[Path, float, bool]:
    """bm25 + minhash of SciFact under build/bench (rebuilt), the seconds the minhash component's build takes on its
    own, and whether that second build wrote the same files."""
    import tempfile

    from engine.index import DOCS_DB, Index, StoredDocuments, build_index
    from stages.dedup import MinHashComponent, MinHashIndexSettings

    index_dir = BUILD / "scifact-minhash-index"
    print(f"building bm25 + minhash of {SCIFACT} in {index_dir}")
    build_index(SCIFACT, index_dir, {"bm25": {}, "minhash": {}})
    index = Index.open(index_dir)
    documents = StoredDocuments(index_dir / DOCS_DB, index.doc_count)
    with tempfile.TemporaryDirectory() as scratch:
        began = time.perf_counter()
        MinHashComponent().build(documents, Path(scratch), MinHashIndexSettings(), lambda *_: None)
        seconds = time.perf_counter() - began
        same = all((Path(scratch) / name.name).read_bytes() == name.read_bytes()
                   for name in (index_dir / "minhash").iterdir())
    documents.close()
    return index_dir, seconds, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--baseline", default="3dfaaca^", help="git revision whose stages/dedup.py is the 'before "
                        "batching' implementation (default: the commit before batch signing)")
    parser.add_argument("--name", default="dedup_scale")
    args = parser.parse_args()

    import datasketch
    import numpy as np

    from engine.cache import LRUCache
    from engine.compiler import compile_data
    from engine.model import Candidate, ScoreEntry
    from engine.pipeline import Pipeline
    from engine.stage import StageContext

    def pipeline_on(index_path: Path) -> Pipeline:
        config = {"version": 1, "index": str(index_path),
                  "stages": [{"id": "bm25", "type": "recall.bm25", "params": {"top_k": CANDIDATES}},
                             {"id": "dedup", "type": "dedup.near_duplicate", "inputs": ["bm25"], "params": PARAMS}],
                  "output": "dedup"}
        pipeline = Pipeline(compile_data(config, label="<dedup-scale>", base_dir=ROOT))
        pipeline.warm_up()
        return pipeline

    bm25_path = scifact_bm25_index()
    minhash_path, component_seconds, rebuilt_same = build_minhash_index()
    computed_pipeline = pipeline_on(bm25_path)
    pipeline = pipeline_on(minhash_path)  # the candidates come from here
    resources = {"index signatures": pipeline.resources, "computed": computed_pipeline.resources}
    index = pipeline.resources.index
    if index.doc_ids() != computed_pipeline.resources.index.doc_ids():
        sys.exit("the two indexes do not hold the same rows")
    Baseline = baseline_stage_class(args.baseline)
    baseline = Baseline("dedup", Baseline.Params(**PARAMS))
    baseline.warm_up(computed_pipeline.resources)
    resources["before batching"] = computed_pipeline.resources
    stages = {"index signatures": pipeline.compiled.stages["dedup"],
              "computed": computed_pipeline.compiled.stages["dedup"], "before batching": baseline}
    sources = {}

    cold: dict[str, list[float]] = {name: [] for name in stages}
    warm: dict[str, list[float]] = {name: [] for name in stages}
    candidates = 0  # each query's distinct candidates (all signed, when cold, by the two that sign)
    mismatches: list[str] = []
    queries = test_queries(args.queries)
    names = list(stages)
    for number, text in enumerate(queries):
        query = pipeline.make_query(text)
        result = pipeline.run(query)
        ranked = next(s for s in result.trace["stages"] if s["id"] == "bm25")["output"]
        incoming = [Candidate(d, index.row_of(d), (ScoreEntry("bm25", "bm25", float(score), rank),))
                    for rank, (d, score) in enumerate(ranked, start=1)]
        candidates += len({c.row for c in incoming})
        outputs = {}
        for name in names[number % len(names):] + names[: number % len(names)]:
            stage = stages[name]
            stage._cache = LRUCache(50_000)  # cold: as on a corpus far larger than the cache
            began = time.perf_counter()
            out = stage.run(StageContext("dedup", query, [incoming], None, resources[name]))
            cold[name].append((time.perf_counter() - began) * 1000.0)
            began = time.perf_counter()
            stage.run(StageContext("dedup", query, [incoming], None, resources[name]))
            warm[name].append((time.perf_counter() - began) * 1000.0)
            details = dict(out.details)
            sources[name] = details.pop("signatures", None)
            outputs[name] = ([c.doc_id for c in out.candidates], [(d.doc_id, d.reason, d.detail) for d in out.drops],
                             json.dumps(details, sort_keys=True))
        rows = [c.row for c in incoming]
        signatures = [stage._signatures(rows) for stage in stages.values()]
        same_signatures = all(np.array_equal(a, b) for other in signatures[1:] for a, b in zip(signatures[0], other))
        if any(outputs[name] != outputs["computed"] for name in stages) or not same_signatures:
            mismatches.append(text)

    per_candidate_us = {name: round(sum(cold[name]) * 1000.0 / candidates, 1) for name in stages}
    summary = {name: {"cold": stats(cold[name]), "warm": stats(warm[name])} for name in stages}
    speedup = {name: round(summary[name]["cold"]["median_ms"] / summary["index signatures"]["cold"]["median_ms"], 1)
               for name in ("computed", "before batching")}
    info = host(numpy=np.__version__, datasketch=datasketch.__version__)
    payload = {
        "machine": info, "indexes": {"bm25": str(bm25_path.relative_to(ROOT)), "bm25+minhash": str(
            minhash_path.relative_to(ROOT))}, "documents": index.doc_count,
        "queries": len(queries), "candidates": CANDIDATES, "params": PARAMS, "baseline": args.baseline,
        "candidates_per_implementation": candidates, "signatures_source": sources, "results": summary,
        "cold_us_per_candidate": per_candidate_us, "cold_median_speedup_of_index_signatures": speedup,
        "minhash_component_build_seconds": round(component_seconds, 2),
        "minhash_component_bytes": sum(f.stat().st_size for f in (minhash_path / "minhash").iterdir()),
        "minhash_component_rebuilt_identically": rebuilt_same,
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
        "query again, every signature cached. **index signatures**: the working tree's stage on an index built with "
        "`--with bm25 --with minhash` (`signatures: index` in its details: read from the memory-mapped "
        "`minhash/signatures.npy`, no cache needed); **computed**: the working tree's stage on the bm25 index, signing "
        "every missing candidate in one batch (`minhash_signatures`, `signatures: computed`); **before batching**: "
        f"`stages/dedup.py` at `{args.baseline}` (datasketch `MinHash.generator`, one MinHash per document). Same run, "
        "rotating order per query.", "",
        "| implementation | cold median ms | cold p95 | warm median ms | µs per candidate (cold) |",
        "|---|---|---|---|---|",
    ]
    for name in stages:
        lines.append(f"| {name} | {summary[name]['cold']['median_ms']} | {summary[name]['cold']['p95_ms']} | "
                     f"{summary[name]['warm']['median_ms']} | {per_candidate_us[name]} |")
    lines += ["", f"Cold median: index signatures **{speedup['computed']}x** faster than computed, "
              f"**{speedup['before batching']}x** than before batching. Signatures, survivors, drops and details "
              "(but the recorded source) identical for every query: "
              f"**{'yes' if not mismatches else 'NO (' + str(len(mismatches)) + ' queries)'}**.", "",
              f"The minhash component's build (the whole corpus signed in batches of 1,000 and written) took "
              f"{payload['minhash_component_build_seconds']} s for {payload['documents']} documents, "
              f"{payload['minhash_component_bytes']:,} bytes on disk; built again, the same files: "
              f"**{'yes' if rebuilt_same else 'NO'}**."]
    json_path, md_path = write_results(args.name, payload, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")
    if mismatches or not rebuilt_same or sources.get("index signatures") != "index":
        sys.exit(1)


if __name__ == "__main__":
    main()
