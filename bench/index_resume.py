"""Resumable and incremental dense index builds: what the build cache saves, against a build without one, in one run.

On a slice of the SciFact corpus, with the dense component's defaults (all-MiniLM-L6-v2, max_length 256, batch_size
32) on the CPU, each in a process that has loaded the model first (the model load is not timed):

- the code before the build cache (``--baseline``, a ``git archive``): a fresh build, for the content-defined
  batching's cost or gain against the old fixed batches of 32;
- this checkout without a cache (``cache=False``, the baseline): a fresh build of the corpus, and one of the corpus with
  1% of its documents changed (a title edited, so that its token ids change);
- this checkout with a cache: a fresh build into an empty cache (the cost of writing it), a build interrupted (Ctrl-C)
  half-way through the embeddings and then run again (resumed), and the changed corpus built against the full cache
  (the incremental rebuild): wall and CPU seconds, batches and texts reused or computed;

and checks that the resumed and incremental indexes equal, file for file, the fresh builds without a cache.

    .venv/bin/python bench/index_resume.py                       # 500 documents: about 10 minutes on 2 cores
    .venv/bin/python bench/index_resume.py --docs 1000 --changed 0.01
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, ROOT, SCIFACT, machine, machine_line, write_results

BASELINE = "9729e46"  # the last commit before the build cache
COMPONENTS = {"dense": {}}

# Runs in a fresh interpreter with the tree measured first on the path; prints one JSON line per build.
WORKER = r'''
import json, sys, time
from pathlib import Path
from engine.index import build_index
from engine.models import resolve_model
from stages.embedding import DEFAULT_EMBEDDING_MODEL, load_embedder

plan = json.loads(sys.argv[1])
load_embedder(resolve_model(DEFAULT_EMBEDDING_MODEL), pooling="auto", device="auto", precision="auto")  # not timed


class StopHalfWay:
    def __init__(self, total):
        self.total, self.done = total, 0

    def __call__(self, task, advance, total):
        if task == "dense embed":
            self.done += advance
            if self.done * 2 >= self.total:
                raise KeyboardInterrupt


for step in plan:
    kwargs = {k: (False if v is False else Path(v)) for k, v in step.get("kwargs", {}).items()}
    progress = StopHalfWay(step["docs"]) if step.get("interrupt") else (lambda *a: None)
    began_wall, began_cpu = time.perf_counter(), time.process_time()
    interrupted = False
    try:
        build_index(Path(step["corpus"]), Path(step["out"]), step["components"], progress, **kwargs)
    except KeyboardInterrupt:
        interrupted = True
    record = {"name": step["name"], "wall_s": round(time.perf_counter() - began_wall, 2),
              "cpu_s": round(time.process_time() - began_cpu, 2), "interrupted": interrupted}
    info = Path(step["out"]) / "build.json"
    if not interrupted and info.is_file():
        record["build_cache"] = json.loads(info.read_text()).get("build_cache")
    print(json.dumps(record), flush=True)
'''


def run_plan(tree: Path, plan: list[dict]) -> dict[str, dict]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(plan)], cwd=tree, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"the builds in {tree} failed:\n{done.stderr[-4000:]}")
    records = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            records[record["name"]] = record
            print(f"  {record['name']}: {record['wall_s']} s wall, {record['cpu_s']} s CPU", flush=True)
    return records


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "build.json"}


def vectors_of(index: Path):  # type: ignore[no-untyped-def]
    import faiss

    stored = faiss.read_index(str(index / "dense" / "vectors.faiss"))
    return stored.reconstruct_n(0, stored.ntotal)


def write_slice(source: Path, out: Path, docs: int, changed_share: float) -> tuple[Path, Path, list[str]]:
    """The first ``docs`` documents of ``source``, and the same with ``changed_share`` of them edited (seeded)."""
    import random

    records = []
    with open(source, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                records.append(json.loads(line))
                if len(records) == docs:
                    break
    changed_rows = sorted(random.Random(0).sample(range(len(records)), max(1, round(len(records) * changed_share))))
    changed = [dict(r) for r in records]
    for row in changed_rows:
        changed[row]["title"] = "Revised: " + (changed[row].get("title") or "")
    paths = []
    for name, rows in (("corpus", records), ("changed", changed)):
        directory = out / name
        directory.mkdir(parents=True)
        (directory / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(directory)
    return paths[0], paths[1], [records[r]["_id"] for r in changed_rows]


def batching_reuse(source: Path, batch_sizes: tuple[int, ...] = (32, 16, 8), max_length: int = 256) -> dict:
    """What share of the texts a rebuild finds in the cache after a change to the whole corpus at ``source``, exactly
    (a cached batch is reused when its inputs are the very same: only token ids are needed, no model run), for the
    content-defined batches at each batch size and, for comparison, for fixed batches of 32 in the same order."""
    import random

    from engine.index import iter_corpus
    from engine.models import resolve_model
    from stages.embedding import DEFAULT_EMBEDDING_MODEL, corpus_batches, input_digest, load_embedder

    embedder = load_embedder(resolve_model(DEFAULT_EMBEDDING_MODEL), pooling="auto", device="cpu", precision="auto")
    texts = [doc.content() for doc in iter_corpus(source)]

    def inputs(corpus: list[str]) -> tuple[list[int], list[bytes]]:
        encoded = embedder.tokenize(corpus, max_length)
        return encoded.kept_tokens, [input_digest(e) for e in encoded.encodings]

    def fixed(kept: list[int], digests: list[bytes], size: int) -> list[list[int]]:
        order = sorted(range(len(digests)), key=lambda i: (-kept[i], digests[i]))
        return [order[s : s + size] for s in range(0, len(order), size)]

    rng = random.Random(0)
    corpora = {"before": texts}
    for share in (0.01, 0.001):
        edited = list(texts)
        for row in rng.sample(range(len(texts)), max(1, round(len(texts) * share))):
            edited[row] = "Revised: " + edited[row]
        corpora[f"{share:.1%} edited"] = edited
    corpora["1% added"] = texts + ["New: " + t for t in rng.sample(texts, round(len(texts) * 0.01))]
    removed = set(rng.sample(range(len(texts)), round(len(texts) * 0.01)))
    corpora["1% removed"] = [t for i, t in enumerate(texts) if i not in removed]
    tokenised = {name: inputs(corpus) for name, corpus in corpora.items()}
    schemes = [(f"content-defined, batch_size {size}", corpus_batches, size) for size in batch_sizes]
    schemes.append(("fixed batches of 32, same order", fixed, 32))
    result: dict = {"documents": len(texts), "max_length": max_length, "schemes": {}}
    for label, how, size in schemes:
        def batches(name: str) -> list[tuple[bytes, ...]]:
            kept, digests = tokenised[name]
            return [tuple(digests[i] for i in batch) for batch in how(kept, digests, size)]

        cached = set(batches("before"))
        entry = {"batches": len(cached), "mean_texts": round(len(texts) / len(cached), 1)}
        for name in corpora:
            if name != "before":
                after = batches(name)
                entry[name] = round(sum(len(b) for b in after if b in cached) / sum(len(b) for b in after), 3)
        result["schemes"][label] = entry
    return result


def batch_throughput(source: Path, texts_count: int = 96, rounds: int = 2) -> dict:
    """Texts embedded per CPU second in batches of 32, 16 and 8 (texts of the full 256 tokens, the same ones for each,
    alternating): what smaller batches cost on this machine."""
    from engine.index import iter_corpus
    from engine.models import resolve_model
    from stages.embedding import DEFAULT_EMBEDDING_MODEL, EncodedTexts, load_embedder

    embedder = load_embedder(resolve_model(DEFAULT_EMBEDDING_MODEL), pooling="auto", device="cpu", precision="auto")
    encoded = embedder.tokenize([doc.content() for _, doc in zip(range(2000), iter_corpus(source))], 256)
    rows = [i for i, kept in enumerate(encoded.kept_tokens) if kept == 256][:texts_count]
    sample = EncodedTexts([encoded.encodings[i] for i in rows], [encoded.full_tokens[i] for i in rows],
                          [encoded.kept_tokens[i] for i in rows])
    embedder.embed_encoded(sample, 32)  # warm
    seconds: dict[str, float] = {"32": 0.0, "16": 0.0, "8": 0.0}
    for _ in range(rounds):
        for size in seconds:
            began = time.process_time()
            embedder.embed_encoded(sample, int(size))
            seconds[size] += time.process_time() - began
    return {"texts": len(rows), "rounds": rounds,
            "texts_per_cpu_s": {size: round(len(rows) * rounds / s, 2) for size, s in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=500, help="documents from the start of the SciFact corpus")
    parser.add_argument("--changed", type=float, default=0.01, help="share of documents edited for the incremental run")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the code before the build cache")
    parser.add_argument("--name", default="index_resume", help="results file name (bench/results/NAME.{json,md})")
    parser.add_argument("--render", action="store_true", help="only write NAME.md again from NAME.json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text(encoding="utf-8"))
        (RESULTS / f"{args.name}.md").write_text(markdown(saved).rstrip() + "\n", encoding="utf-8")
        return
    info = machine()
    print(machine_line(info), flush=True)
    work = Path(tempfile.mkdtemp(prefix="sieve-index-resume-"))
    try:
        corpus, changed, changed_ids = write_slice(SCIFACT / "corpus.jsonl", work, args.docs, args.changed)
        old_tree = work / "baseline"
        old_tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)

        def step(name: str, source: Path, out: str | None = None, **extra) -> dict:
            return {"name": name, "corpus": str(source), "out": str(work / (out or name)), "components": COMPONENTS,
                    "docs": args.docs, **extra}

        print(f"baseline code ({args.baseline}):", flush=True)
        old = run_plan(old_tree, [step("before_cache_fresh", corpus)])
        print("this checkout:", flush=True)
        cache = str(work / "cache")
        new = run_plan(ROOT, [
            step("no_cache_fresh", corpus, kwargs={"cache": False}),
            step("cache_fresh", corpus, kwargs={"cache": cache}),
            step("interrupted_at_half", corpus, interrupt=True),
            step("resumed", corpus, out="interrupted_at_half"),  # the same command again: the cache it left
            step("no_cache_changed", changed, kwargs={"cache": False}),
            step("incremental_changed", changed, kwargs={"cache": cache}),
        ])
        identical_resumed = files_of(work / "interrupted_at_half") == files_of(work / "no_cache_fresh")
        identical_incremental = files_of(work / "incremental_changed") == files_of(work / "no_cache_changed")
        identical_cache_fresh = files_of(work / "cache_fresh") == files_of(work / "no_cache_fresh")
        import numpy as np

        old_delta = float(np.abs(vectors_of(work / "before_cache_fresh") - vectors_of(work / "no_cache_fresh")).max())
        print("batching: what a rebuild of the whole SciFact corpus would reuse", flush=True)
        reuse = batching_reuse(SCIFACT / "corpus.jsonl")
        print("the model's throughput by batch size", flush=True)
        cost = batch_throughput(SCIFACT / "corpus.jsonl")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def counts(record: dict) -> dict:
        return (record.get("build_cache") or {}).get("sections", {}).get("dense", {})

    resumed_total = {key: round(new["interrupted_at_half"][key] + new["resumed"][key], 2) for key in ("wall_s", "cpu_s")}
    incremental = counts(new["incremental_changed"])
    texts = incremental["items_reused"] + incremental["items_computed"]
    cold = counts(new["cache_fresh"])
    payload = {
        "machine": info,
        "corpus": {"source": str(SCIFACT / "corpus.jsonl"), "documents": args.docs, "changed": len(changed_ids),
                   "changed_ids": changed_ids, "change": "title prefixed with 'Revised: '"},
        "components": COMPONENTS,
        "baseline_revision": args.baseline,
        "runs": {**old, **new},
        "batches": {"count": cold["batches_computed"], "mean_texts": round(cold["items_computed"] / cold["batches_computed"], 1)},
        "resumed_total": resumed_total,
        "resumed_reused": counts(new["resumed"]),
        "incremental_reused": incremental,
        "incremental_reused_share": round(incremental["items_reused"] / texts, 3),
        "identical": {"resumed_vs_fresh": identical_resumed, "incremental_vs_fresh": identical_incremental,
                      "cache_fresh_vs_no_cache": identical_cache_fresh},
        "baseline_code_max_vector_difference": old_delta,
        "batching_reuse_full_corpus": reuse,
        "batch_cost": cost,
    }
    write_results(args.name, payload, markdown(payload))
    print(markdown(payload))


def markdown(payload: dict) -> str:
    runs, reuse, cost = payload["runs"], payload["batching_reuse_full_corpus"], payload["batch_cost"]
    corpus, baseline = payload["corpus"], payload["baseline_revision"]
    identical = payload["identical"]

    def counts(record: dict) -> dict:
        return (record.get("build_cache") or {}).get("sections", {}).get("dense", {})

    def row(label: str, record: dict, note: str = "") -> str:
        return f"| {label} | {record['wall_s']} | {record['cpu_s']} | {note} |"

    cold, resumed, incremental = (counts(runs[name]) for name in ("cache_fresh", "resumed", "incremental_changed"))
    texts = incremental["items_reused"] + incremental["items_computed"]
    changes = [c for c in next(iter(reuse["schemes"].values())) if "%" in c]
    speed = cost["texts_per_cpu_s"]
    return "\n".join([
        f"# Resumable and incremental index builds: {corpus['documents']} SciFact abstracts, dense "
        "(all-MiniLM-L6-v2, defaults)",
        "",
        f"Machine: {machine_line(payload['machine'])}.",
        "",
        "Each build in a process that loaded the model first (not timed); CPU seconds are the process's, all threads. "
        "On these shared cores CPU seconds vary by about 10% from run to run with the other work on the machine, and "
        "wall seconds by more (up to a third): smaller differences are noise. Baseline code: "
        f"`git archive {baseline}` (before the build cache: fixed batches of 32 in length order).",
        "",
        "| build | wall s | CPU s | from the cache |",
        "|---|---:|---:|---|",
        row(f"before the cache ({baseline}), fresh", runs["before_cache_fresh"], "(no cache)"),
        row("**no cache (baseline)**, fresh", runs["no_cache_fresh"], "(no cache)"),
        row("cache, fresh (empty cache: the cost of writing it)", runs["cache_fresh"],
            f"0 of {cold['batches_computed']} batches (mean {payload['batches']['mean_texts']} texts a batch)"),
        row("cache, interrupted at 50% (Ctrl-C)", runs["interrupted_at_half"], "—"),
        row("cache, run again: resumed", runs["resumed"],
            f"{resumed['batches_reused']} of {resumed['batches_reused'] + resumed['batches_computed']} batches, "
            f"{resumed['items_reused']} of {resumed['items_reused'] + resumed['items_computed']} texts"),
        row("**interrupted + resumed, total**", payload["resumed_total"], "vs the uninterrupted fresh builds above"),
        row(f"no cache, {corpus['changed']} documents changed", runs["no_cache_changed"], "(no cache)"),
        row(f"**cache, {corpus['changed']} documents changed: incremental**", runs["incremental_changed"],
            f"{incremental['batches_reused']} of {incremental['batches_reused'] + incremental['batches_computed']} "
            f"batches, {incremental['items_reused']} of {texts} texts ({payload['incremental_reused_share']:.1%})"),
        "",
        f"Changed: {corpus['changed']} documents ({corpus['changed'] / corpus['documents']:.0%}), {corpus['change']}. "
        "Index files identical (every file but build.json): resumed vs fresh without a cache: "
        f"**{'yes' if identical['resumed_vs_fresh'] else 'NO'}**; incremental vs a fresh build of the changed corpus: "
        f"**{'yes' if identical['incremental_vs_fresh'] else 'NO'}**; a fresh build with a cache vs without: "
        f"**{'yes' if identical['cache_fresh_vs_no_cache'] else 'NO'}**. The baseline code's vectors differ from these "
        f"by at most {payload['baseline_code_max_vector_difference']:.2e} (other batches, other padding: the last bits).",
        "",
        f"What a rebuild would find in the cache, over all {reuse['documents']:,} SciFact abstracts (exact: a batch is "
        "reused when its token ids are the very same, so no model run is needed to count it), share of the texts "
        "(seeded draws of the documents changed):",
        "",
        "| batches | texts a batch | " + " | ".join(changes) + " |",
        "|---|---:|" + "---:|" * len(changes),
        *[f"| {label} | {entry['mean_texts']} | " + " | ".join(f"{entry[c]:.1%}" for c in changes) + " |"
          for label, entry in reuse["schemes"].items()],
        "",
        "A smaller dense `batch_size` makes more of a rebuild reusable. What it costs in model throughput depends on the "
        f"machine: in this run, texts of 256 tokens per CPU second in batches of 32: {speed['32']}, 16: {speed['16']}, "
        f"8: {speed['8']} ({cost['texts']} texts, {cost['rounds']} rounds, alternating; on a GPU, not measured here, "
        "small batches leave more of it idle).",
        "",
        f"Command: `{payload.get('command', '.venv/bin/python bench/index_resume.py')}`",
    ])


if __name__ == "__main__":
    main()
