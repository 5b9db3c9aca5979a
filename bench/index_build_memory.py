"""Peak memory and wall time of `build_index` (BM25 only), the code before the streaming build vs this checkout.

Each build runs in its own process (``os.wait4`` gives that child's peak RSS), the baseline from a ``git archive``
of ``--baseline`` (the commit before the change) on its own PYTHONPATH, the same corpus, alternating, in one run;
the two indexes are then compared file by file (everything but build.json, which holds the build time). Also
measured: a process that only imports what a build imports (the floor under any build).

    .venv/bin/python bench/scale_corpus.py 50000 build/bench/scale-50000      # the corpora (seeded, SciFact text)
    .venv/bin/python bench/scale_corpus.py 250000 build/bench/scale-250000
    .venv/bin/python bench/index_build_memory.py --corpus build/bench/scale-50000 build/bench/scale-250000

(The committed results ran on the same corpora made by the scale audit's generator, /tmp/audit-scale/data/c50000
and c250000, which bench/scale_corpus.py reproduces byte for byte.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BASELINE = "6b9e17e"  # the last commit with the in-memory build

BUILD = """
import sys
from pathlib import Path
from engine.index import build_index
build_index(Path(sys.argv[1]), Path(sys.argv[2]), {"bm25": {}})
"""
IMPORTS = """
import bm25s, numpy
import engine.index, stages.recall.bm25, stages.text
from stages.text import Tokenizer, TokenizerSettings
Tokenizer(TokenizerSettings()).tokenize("warm the stemmer and stop words up")
"""


def run(code: str, tree: Path, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter with ``tree`` first on the path; its peak RSS (MB) and wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
    began = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, *args], cwd=tree, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the build in {tree} failed (status {status})")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 2)}


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "build.json"}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def measure(corpus: Path, baseline_tree: Path, repeat: int, work: Path) -> dict:
    """Builds of one corpus with the baseline and this checkout, alternating; medians and the index comparison."""
    corpus_file = corpus / "corpus.jsonl" if corpus.is_dir() else corpus
    trees = {"before": baseline_tree, "after": ROOT}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for attempt in range(repeat):
        for label, tree in trees.items():
            out = work / f"index-{label}-{attempt}"
            runs[label].append(run(BUILD, tree, str(corpus_file), str(out)))
            print(corpus_file, label, runs[label][-1], flush=True)
    first = {label: files_of(work / f"index-{label}-0") for label in trees}
    for attempt in range(repeat):
        for label in trees:
            shutil.rmtree(work / f"index-{label}-{attempt}", ignore_errors=True)

    def median(label: str, key: str) -> float:
        values = sorted(r[key] for r in runs[label])
        return values[len(values) // 2]

    return {
        "corpus": str(corpus_file),
        "documents": sum(1 for line in open(corpus_file, "rb") if line.strip()),
        "corpus_mb": round(corpus_file.stat().st_size / 2**20, 1),
        "runs": runs,
        "before": {"peak_rss_mb": median("before", "peak_rss_mb"), "wall_s": median("before", "wall_s")},
        "after": {"peak_rss_mb": median("after", "peak_rss_mb"), "wall_s": median("after", "wall_s")},
        "index_mb": round(sum(len(b) for b in first["after"].values()) / 2**20, 1),
        "bm25_files_mb": round(sum(len(b) for n, b in first["after"].items() if n.startswith("bm25/")) / 2**20, 1),
        "index_files_identical": first["before"] == first["after"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, nargs="+", default=[Path("build/bench/scale-50000")],
                        help="corpus directories (bench/scale_corpus.py makes them)")
    parser.add_argument("--baseline", default=BASELINE, help="git commit of the code measured as the baseline")
    parser.add_argument("--repeat", type=int, default=1, help="builds of each (alternating); the figures are the medians")
    parser.add_argument("--name", default="index_build_memory", help="results file name (bench/results/NAME.{json,md})")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sieve-build-memory-"))
    try:
        baseline_tree = work / "baseline"
        baseline_tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(baseline_tree)], input=archive.stdout, check=True)
        floor = run(IMPORTS, ROOT)
        corpora = [measure(corpus, baseline_tree, args.repeat, work) for corpus in args.corpus]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": ".venv/bin/python bench/index_build_memory.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "components": ["bm25"],
        "baseline_commit": args.baseline,
        "repeat": args.repeat,
        "imports_only_rss_mb": floor["peak_rss_mb"],
        "corpora": corpora,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    rows = "\n".join(
        f"| {c['documents']:,} ({c['corpus_mb']} MB) | {c['before']['peak_rss_mb']} | **{c['after']['peak_rss_mb']}** | "
        f"{c['before']['wall_s']} | {c['after']['wall_s']} | {c['index_mb']} ({c['bm25_files_mb']}) | "
        f"{'yes' if c['index_files_identical'] else '**NO**'} |"
        for c in corpora
    )
    md = f"""# Index build memory: streaming build vs the in-memory one (BM25 only)

`{result['command']}`

Machine: {result['machine']}. Each build is a fresh process running `build_index(corpus, out, {{"bm25": {{}}}})`
(PYTHONHASHSEED=0); peak RSS of that process from `os.wait4`. Before: `git archive {args.baseline}` (every document
held as a `Document` for the whole build, every token list, then a list of id lists for `bm25s.BM25.index`). After:
this checkout (the corpus streamed into docs.sqlite, components reading it back in batches, BM25 from int32 term ids
with its score matrix filled in place). Same run, alternating, {args.repeat} build(s) of each (medians). A process
that only imports what a build imports peaks at {result['imports_only_rss_mb']} MB.

| documents (corpus.jsonl) | before: peak RSS MB | after: peak RSS MB | before: wall s | after: wall s | index MB (bm25 files) | index files byte-identical |
|---|---:|---:|---:|---:|---:|---|
{rows}

Byte-identical: every file of the two indexes, manifest.json included (all but build.json, which holds the build time).
"""
    (RESULTS / f"{args.name}.md").write_text(md, encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
