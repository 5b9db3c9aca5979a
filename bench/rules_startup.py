"""Warm-up time and memory of the rule stages: the rules' document table before (--baseline) and after (this tree).

Each measurement runs in a fresh subprocess: compile the pipeline, warm it up, read RSS, then ask a few SciFact test
queries and hash the answers (doc ids and scores), which must be equal between the two versions. "old" runs with
the --baseline versions of rules/corpus.py, rules/conflicts.py, stages/rules.py and stages/recency.py laid over the
working tree (every other file is the same), so the figures compare that change alone. The pipelines are
bench/scale/prefilter.yaml and bench/scale/rules.yaml over a BM25 index of bench/scale_corpus.py's corpus (built
under build/bench when missing).

    .venv/bin/python bench/rules_startup.py --size 50k [--size 250k] [--queries 20]

Writes bench/results/rules_startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCALE = ROOT / "bench" / "scale"  # the pipelines and rule files
BUILD = ROOT / "build" / "bench"
WORK = BUILD / "rules-startup"
CHANGED = ("rules/corpus.py", "rules/conflicts.py", "stages/rules.py", "stages/recency.py")
BASELINE = "4ad7142^"  # the commit before the rules' document table kept columns instead of documents
SIZES = {"5k": 5_183, "50k": 50_000, "250k": 250_000}

CHILD = r"""
import hashlib, json, resource, sys, time
from datetime import datetime, timezone
sys.path[:0] = [p for p in sys.argv[3].split(":") if p]
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
from engine.pipeline import Pipeline
import rules.corpus
started = time.perf_counter()
pipeline = Pipeline.from_file(sys.argv[1])
pipeline.warm_up()
warm = time.perf_counter() - started
rss = rss_mb()
queries = [json.loads(line)["text"] for line in open("/work/shared/data/scifact/queries.jsonl")][: int(sys.argv[2])]
user = {"groups": ["team-1", "team-2"], "roles": ["clinician"], "jurisdictions": ["US"]}
as_of = datetime(2025, 6, 1, tzinfo=timezone.utc)
digest = hashlib.sha256()
began = time.perf_counter()
for query in queries:
    result = pipeline.search(query, user=user, as_of=as_of)
    digest.update(json.dumps([(c.doc_id, round(c.score, 9)) for c in result.results]).encode())
per_query = (time.perf_counter() - began) * 1000 / max(1, len(queries))
print(json.dumps({"warm_up_s": round(warm, 2), "rss_after_warm_up_mb": round(rss),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "query_ms_mean": round(per_query, 1), "answers_sha256": digest.hexdigest()[:16],
                  "corpus_module": rules.corpus.__file__}))
"""


def old_overlay(baseline: str) -> Path:
    """rules/ and stages/ as in the working tree, but with the baseline's versions of the files the change edits."""
    overlay = WORK / "old"
    shutil.rmtree(overlay, ignore_errors=True)
    for package in ("rules", "stages"):
        shutil.copytree(ROOT / package, overlay / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in CHANGED:
        text = subprocess.run(["git", "show", f"{baseline}:{name}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
        (overlay / name).write_text(text)
    return overlay


def scale_index(size: str) -> Path:
    """The BM25 index of bench/scale_corpus.py's corpus of this size, built under build/bench when missing."""
    corpus = BUILD / f"scale-{SIZES[size]}"
    index = BUILD / f"scale-{SIZES[size]}-bm25"
    if not (index / "manifest.json").exists():
        if not (corpus / "corpus.jsonl").exists():
            subprocess.run([sys.executable, str(ROOT / "bench" / "scale_corpus.py"), str(SIZES[size]), str(corpus)],
                           check=True)
        subprocess.run([sys.executable, "-m", "engine.cli", "index", str(corpus), "--out", str(index), "--with", "bm25"],
                       cwd=ROOT, check=True)
    return index


def configs(size: str) -> dict[str, Path]:
    """bench/scale's prefilter + BM25 and full rules pipelines for one corpus size, the index path written in."""
    out = WORK / "cfg"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("access.yaml", "overrides.yaml"):
        shutil.copy(SCALE / name, out / name)
    index = scale_index(size)
    written = {}
    for label, name in (("prefilter+bm25", "prefilter.yaml"), ("full rules pipeline", "rules.yaml")):
        target = out / f"{size}-{name}"
        target.write_text((SCALE / name).read_text().replace("index: INDEX", f"index: {index}"))
        written[label] = target
    return written


def measure(config: Path, queries: int, path: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CHILD, str(config), str(queries), path], cwd=WORK,
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", choices=["5k", "50k", "250k"])
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the code measured as the baseline")
    args = parser.parse_args()
    overlay = old_overlay(args.baseline)
    versions = {f"old ({args.baseline})": f"{overlay}:{ROOT}", "new": str(ROOT)}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.size or ["50k"]:
        for pipeline, config in configs(size).items():
            for version, path in versions.items():
                result = measure(config, args.queries, path)
                rows.append({"size": size, "pipeline": pipeline, "version": version, **result})
                print(json.dumps(rows[-1]), flush=True)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    command = "bench/rules_startup.py " + " ".join(sys.argv[1:])
    (results / "rules_startup.json").write_text(json.dumps({"machine": machine, "command": command, "rows": rows},
                                                           indent=1) + "\n")
    lines = [f"# Rule stages: warm-up and memory, old ({args.baseline}) vs new\n", f"Machine: {machine}. Command: `{command}`. "
             "Each row is a fresh process; answers hashed over the first queries (must match old vs new).\n",
             "| corpus | pipeline | version | warm-up s | RSS after warm-up MB | peak RSS MB | query ms (mean) | answers |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['size']} | {row['pipeline']} | {row['version']} | {row['warm_up_s']} | "
                     f"{row['rss_after_warm_up_mb']} | {row['peak_rss_mb']} | {row['query_ms_mean']} | "
                     f"`{row['answers_sha256']}` |")
    (results / "rules_startup.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
