"""``sieve train-reranker``: fine-tune a cross-encoder on labelled pairs with BM25 hard negatives.

Data: a BEIR directory (corpus.jsonl, queries, qrels/<split>.tsv) or a feedback JSONL
(``{"query": ..., "doc_id": ..., "helpful": true|false}``) with the BEIR corpus for the text.
Every (query, positive) pair becomes a group of 1 positive + N negatives; negatives are the
documents the user marked unhelpful first, then BM25 hard negatives sampled from the query's
top ``mine_depth`` (the project's own tokenizer and bm25s, as the ``recall.bm25`` stage uses).

Loss: softmax cross-entropy over each group (the positive is class 0). AdamW, linear warm-up
over the first 10% of steps then linear decay, gradient clipping at 1.0, bf16 autocast where the
CPU has native bf16 (fp32 otherwise; CUDA uses bf16 autocast). The default head is
``segment_cosine`` (see :mod:`stages.rerank.modeling`): measured on SciFact it beats a new
[CLS] head trained from a bi-encoder start (0.722 vs 0.647 nDCG@10 after one epoch).

Reproducible: one seed drives python, numpy and torch; data order, negative sampling and the
held-out split are deterministic functions of it. A held-out part of the *training* split
(``dev_fraction``) chooses the epoch and the fusion weight with BM25; the test split is never read.

The saved directory is a standard HF model (config, tokenizer, fp16 safetensors) plus
``sieve_model.json`` (head, scale, recipe, data, metrics) and a human README.md model card.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from engine.errors import ModelLoadError, SieveError
from engine.paths import nearest_existing_parent
from stages.rerank.modeling import (
    DEFAULT_MAX_QUERY_TOKENS,
    DEFAULT_SCALE,
    SEGMENT_COSINE,
    SEQUENCE_CLASSIFICATION,
    collate,
    cpu_has_native_bf16,
    cpu_model_name,
    encode_pairs,
    forward_scores,
)

SIEVE_MODEL_FORMAT = "sieve.reranker/1"
DEFAULT_BASE = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (recorded in the model card)."""

    base: str = DEFAULT_BASE
    data: str | None = None
    split: str = "train"
    feedback: str | None = None
    out: str = "models/reranker"
    head: str = SEGMENT_COSINE
    scale: float = DEFAULT_SCALE
    epochs: int = 1
    negatives: int = 7
    mine_depth: int = 30
    groups_per_step: int = 2
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_length: int = 256
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS
    seed: int = 13
    dev_fraction: float = 0.0
    dev_depth: int = 30
    precision: str = "auto"  # auto | fp32 | bf16
    max_steps: int | None = None  # stop early (tests, smoke runs)
    threads: int | None = None


@dataclass
class Group:
    query_id: str
    query: str
    positive: str  # doc_id
    negatives: list[str] = field(default_factory=list)  # explicit (user-marked) negatives first


@dataclass
class TrainingData:
    """Texts by doc_id, training groups, and the held-out queries with their judgements."""

    documents: dict[str, str]
    groups: list[Group]
    explicit_negatives: dict[str, list[str]]
    dev_queries: dict[str, str]
    dev_qrels: dict[str, dict[str, int]]
    source: dict[str, Any]


# --------------------------------------------------------------------------- data


def _document_text(title: str, text: str) -> str:
    return f"{title} {text}".strip() if title else text


def load_training_data(config: TrainConfig) -> TrainingData:
    """Read the BEIR split or the feedback file; split off the held-out queries (by seed)."""
    from engine.evaluation import load_beir
    from engine.index import read_corpus

    if config.data is None:
        raise SieveError("train-reranker needs --data DIR (a BEIR directory with corpus.jsonl)")
    data_dir = Path(config.data)
    corpus = read_corpus(data_dir / "corpus.jsonl")
    documents = {d.doc_id: _document_text(d.title, d.text) for d in corpus}
    queries: dict[str, str] = {}
    positives: dict[str, list[str]] = {}
    explicit_negatives: dict[str, list[str]] = {}
    source: dict[str, Any] = {"corpus": str(data_dir / "corpus.jsonl"), "corpus_documents": len(documents)}
    if config.feedback is not None:
        queries, positives, explicit_negatives = _read_feedback(Path(config.feedback), documents)
        source.update({"feedback": str(config.feedback), "feedback_sha256": _sha256(Path(config.feedback))})
    else:
        beir = load_beir(data_dir, config.split)
        queries = beir.queries
        for qid, judged in beir.qrels.items():
            docs = sorted(d for d, rel in judged.items() if rel > 0)
            missing = [d for d in docs if d not in documents]
            if missing:
                raise SieveError(f"qrels/{config.split}.tsv names document '{missing[0]}' that the corpus lacks")
            if docs:
                positives[qid] = docs
        qrels_path = data_dir / "qrels" / f"{config.split}.tsv"
        source.update({"split": config.split, "qrels": str(qrels_path), "qrels_sha256": _sha256(qrels_path)})
    query_ids = sorted(q for q in queries if positives.get(q))
    if not query_ids:
        raise SieveError("no training query has a positive (relevant / helpful) document")
    dev_ids: list[str] = []
    if config.dev_fraction > 0:
        shuffled = list(query_ids)
        random.Random(config.seed).shuffle(shuffled)
        dev_count = max(1, round(len(shuffled) * config.dev_fraction))
        if dev_count >= len(shuffled):
            raise SieveError(f"dev_fraction {config.dev_fraction} leaves no training queries")
        dev_ids = sorted(shuffled[:dev_count])
    dev_set = set(dev_ids)
    groups = [
        Group(qid, queries[qid], doc_id, list(explicit_negatives.get(qid, [])))
        for qid in query_ids
        if qid not in dev_set
        for doc_id in positives[qid]
    ]
    dev_queries = {qid: queries[qid] for qid in dev_ids}
    dev_qrels = {qid: {d: 1 for d in positives[qid]} for qid in dev_ids}
    source.update({
        "train_queries": len(query_ids) - len(dev_ids),
        "train_groups": len(groups),
        "dev_queries": len(dev_ids),
    })
    return TrainingData(documents, groups, explicit_negatives, dev_queries, dev_qrels, source)


def _read_feedback(
    path: Path, documents: dict[str, str]
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, list[str]]]:
    """Feedback lines -> queries (id = sha256 of the text), helpful and unhelpful doc ids."""
    if not path.is_file():
        raise SieveError(f"feedback file not found: {path}")
    queries: dict[str, str] = {}
    helpful: dict[str, set[str]] = {}
    unhelpful: dict[str, set[str]] = {}
    problems: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{number}: not JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                problems.append(f"{path}:{number}: expected an object with query, doc_id, helpful")
                continue
            query, doc_id, verdict = record.get("query"), record.get("doc_id"), record.get("helpful")
            if not isinstance(query, str) or not query.strip():
                problems.append(f"{path}:{number}: 'query' must be a non-empty string")
            elif not isinstance(doc_id, (str, int)) or str(doc_id) not in documents:
                problems.append(f"{path}:{number}: 'doc_id' {doc_id!r} is not in the corpus")
            elif not isinstance(verdict, bool):
                problems.append(f"{path}:{number}: 'helpful' must be true or false")
            else:
                qid = hashlib.sha256(query.encode("utf-8")).hexdigest()[:16]
                queries[qid] = query
                (helpful if verdict else unhelpful).setdefault(qid, set()).add(str(doc_id))
            if len(problems) >= 20:
                break
    if problems:
        raise SieveError("the feedback file has errors:\n" + "\n".join(problems))
    for qid in helpful:  # a document marked both ways counts as helpful
        unhelpful.get(qid, set()).difference_update(helpful[qid])
    return (
        queries,
        {q: sorted(d) for q, d in helpful.items()},
        {q: sorted(d) for q, d in unhelpful.items()},
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class BM25Miner:
    """BM25 over the corpus with the project's tokenizer (same defaults as ``recall.bm25``)."""

    def __init__(self, documents: dict[str, str]):
        import bm25s

        from stages.text import Tokenizer, TokenizerSettings

        self.doc_ids = sorted(documents)
        self.tokenizer = Tokenizer(TokenizerSettings())
        self.retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        self.retriever.index([self.tokenizer.tokenize(documents[d]) for d in self.doc_ids], show_progress=False)
        self.vocab = self.retriever.vocab_dict

    def top(self, query: str, depth: int) -> list[tuple[str, float]]:
        """The ``depth`` best documents, ties on doc_id (like the recall stage)."""
        import numpy as np

        terms = [t for t in self.tokenizer.tokenize(query) if t in self.vocab]
        if not terms:
            return []
        scores = self.retriever.get_scores(terms)
        rows = np.flatnonzero(scores > 0)
        order = sorted(rows.tolist(), key=lambda r: (-float(scores[r]), self.doc_ids[r]))[:depth]
        return [(self.doc_ids[r], float(scores[r])) for r in order]


def mine_candidates(
    data: TrainingData, miner: BM25Miner, depth: int, positives_of: dict[str, set[str]]
) -> dict[str, list[str]]:
    """Per training query: BM25 top-``depth`` documents that are not positives."""
    pools: dict[str, list[str]] = {}
    for group in data.groups:
        if group.query_id in pools:
            continue
        positives = positives_of[group.query_id]
        pools[group.query_id] = [d for d, _ in miner.top(group.query, depth) if d not in positives]
    return pools


def epoch_groups(
    data: TrainingData,
    pools: dict[str, list[str]],
    positives_of: dict[str, set[str]],
    negatives: int,
    seed: int,
    epoch: int,
) -> tuple[list[tuple[Group, list[str]]], int]:
    """This epoch's (group, negatives) in training order; deterministic in (seed, epoch).

    Negatives: the user's unhelpful documents first, then a sample of the BM25 pool; if the pool
    is too small, random corpus documents fill the group (their count is returned).
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    all_ids = sorted(data.documents)
    filled_randomly = 0
    result = []
    for group in data.groups:
        chosen = list(group.negatives[:negatives])
        pool = [d for d in pools[group.query_id] if d not in chosen]
        take = min(negatives - len(chosen), len(pool))
        chosen += rng.sample(pool, take)
        while len(chosen) < negatives:
            candidate = all_ids[rng.randrange(len(all_ids))]
            if candidate not in chosen and candidate not in positives_of[group.query_id]:
                chosen.append(candidate)
                filled_randomly += 1
        result.append((group, chosen))
    rng.shuffle(result)
    return result, filled_randomly


# --------------------------------------------------------------------------- model


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_base(base: str, head: str) -> tuple[Any, Any, dict[str, Any]]:
    """Tokenizer and model to fine-tune, plus the base model's identity."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from engine.models import load_failure, quiet_transformers, resolve_model

    resolved = resolve_model(base, purpose="train-reranker --base")
    try:
        with quiet_transformers():  # the new classification head is expected: no 'MISSING' table
            tokenizer = AutoTokenizer.from_pretrained(resolved.location)
            if head == SEGMENT_COSINE:
                model = AutoModel.from_pretrained(resolved.location, dtype=torch.float32, add_pooling_layer=False)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    resolved.location, dtype=torch.float32, num_labels=1
                )
    except Exception as exc:  # noqa: BLE001 - any library failure becomes a named ModelLoadError
        raise ModelLoadError(
            f"train-reranker: cannot load base model '{base}' from {resolved.location}: {load_failure(resolved.location, exc)}"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"train-reranker: base model '{base}' has no fast tokenizer (tokenizer.json)")
    return tokenizer, model, resolved.to_dict()


def choose_precision(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _autocast(device: str, precision: str):  # type: ignore[no-untyped-def]
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def score_pairs(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    head: str,
    scale: float,
    max_length: int,
    batch_size: int = 32,
    device: str = "cpu",
    precision: str = "fp32",
) -> list[float]:
    """Inference scores in input order (length-sorted batches, dynamic padding)."""
    import torch

    if not pairs:
        return []
    encoded = [e[0] for e in encode_pairs(tokenizer, [q for q, _ in pairs], [d for _, d in pairs], max_length)]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    scores = [0.0] * len(pairs)
    model.eval()
    with torch.inference_mode(), _autocast(device, precision):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([encoded[i] for i in chunk], tokenizer.pad_token_id, head == SEGMENT_COSINE)
            batch = {k: v.to(device) for k, v in batch.items()}
            values = forward_scores(model, batch, head, scale).float().cpu().tolist()
            for i, value in zip(chunk, values):
                scores[i] = value
    return scores


# --------------------------------------------------------------------------- evaluation on held-out train queries


def _minmax(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high - low <= 0:
        return [1.0 for _ in values]
    return [(v - low) / (high - low) for v in values]


def evaluate_dev(
    model: Any,
    tokenizer: Any,
    data: TrainingData,
    miner: BM25Miner,
    config: TrainConfig,
    device: str,
    precision: str,
) -> dict[str, Any]:
    """nDCG@10 on the held-out queries: BM25, rerank alone, and min-max fusion over a weight grid."""
    from engine.evaluation import evaluate_run

    bm25_run: dict[str, dict[str, float]] = {}
    rerank_run: dict[str, dict[str, float]] = {}
    for qid, text in data.dev_queries.items():
        hits = miner.top(text, config.dev_depth)
        if not hits:
            continue
        bm25_run[qid] = dict(hits)
        values = score_pairs(
            model, tokenizer, [(text, data.documents[d]) for d, _ in hits],
            head=config.head, scale=config.scale, max_length=config.max_length, device=device, precision=precision,
        )
        rerank_run[qid] = {d: v for (d, _), v in zip(hits, values)}
    metrics = {"bm25": evaluate_run(bm25_run, data.dev_qrels)["ndcg_cut_10"],
               "rerank": evaluate_run(rerank_run, data.dev_qrels)["ndcg_cut_10"]}
    grid = []
    for step in range(0, 21):
        weight = step / 20
        fused: dict[str, dict[str, float]] = {}
        for qid in rerank_run:
            docs = list(bm25_run[qid])
            b = _minmax([bm25_run[qid][d] for d in docs])
            r = _minmax([rerank_run[qid][d] for d in docs])
            fused[qid] = {d: weight * rv + (1 - weight) * bv for d, bv, rv in zip(docs, b, r)}
        grid.append((weight, evaluate_run(fused, data.dev_qrels)["ndcg_cut_10"]))
    best_weight, best_value = max(grid, key=lambda wv: (round(wv[1], 6), wv[0]))
    return {
        "queries": len(data.dev_queries),
        "depth": config.dev_depth,
        "ndcg_cut_10": {k: round(v, 4) for k, v in metrics.items()},
        "fusion": {
            "normalize": "minmax",
            "weights": {"rerank": best_weight, "bm25": round(1 - best_weight, 2)},
            "ndcg_cut_10": round(best_value, 4),
            "grid": [[w, round(v, 4)] for w, v in grid],
        },
    }


# --------------------------------------------------------------------------- training


Log = Callable[[str], None]


def check_output_directory(out: Path) -> None:
    """Refuse, before training, an --out that is a file, lies under a file, or is a non-empty directory other
    than an earlier model of ``sieve train-reranker`` (which is replaced): a user's files are never overwritten."""
    if out.exists() and not out.is_dir():
        raise SieveError(f"--out {out} is a file; give a directory for the model")
    parent = nearest_existing_parent(out.absolute())
    if parent is not None and not parent.is_dir():
        raise SieveError(f"--out {out}: {parent} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "sieve_model.json").is_file():
        raise SieveError(f"--out {out} is a directory with other files in it (no sieve_model.json: not a model "
                         "this command wrote); choose a new or empty directory")


def train(config: TrainConfig, log: Log = print, command: str | None = None) -> dict[str, Any]:
    """Run the recipe; write the model directory; return the model card (``sieve_model.json``)."""
    import torch

    if config.head not in (SEGMENT_COSINE, SEQUENCE_CLASSIFICATION):
        raise SieveError(f"--head must be {SEGMENT_COSINE} or {SEQUENCE_CLASSIFICATION}, got {config.head!r}")
    for name, value, low in (("epochs", config.epochs, 1), ("negatives", config.negatives, 1),
                             ("max_length", config.max_length, 16), ("groups_per_step", config.groups_per_step, 1)):
        if value < low:
            raise SieveError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    check_output_directory(Path(config.out))
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    began = time.perf_counter()
    seed_everything(config.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = choose_precision(config.precision, device)

    log(f"loading data from {config.data} ({'feedback ' + str(config.feedback) if config.feedback else 'split ' + config.split})")
    data = load_training_data(config)
    log(f"{len(data.groups)} groups from {data.source['train_queries']} queries; {len(data.dev_queries)} held out")
    miner = BM25Miner(data.documents)
    positives_of: dict[str, set[str]] = {}
    for group in data.groups:
        positives_of.setdefault(group.query_id, set()).add(group.positive)
    pools = mine_candidates(data, miner, config.mine_depth, positives_of)

    tokenizer, model, base_identity = load_base(config.base, config.head)
    model.to(device)
    steps_per_epoch = math.ceil(len(data.groups) / config.groups_per_step)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = max(1, round(total_steps * config.warmup_fraction))
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    parameters = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup_steps if step < warmup_steps
        else max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps)),
    )
    log(f"device {device}, precision {precision}, threads {torch.get_num_threads()}, "
        f"{total_steps} steps ({warmup_steps} warm-up), head {config.head}")

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    step = 0
    losses: list[float] = []
    truncated_pairs = 0
    seen_pairs = 0
    random_fill = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        ordered, filled = epoch_groups(data, pools, positives_of, config.negatives, config.seed, epoch)
        random_fill += filled
        epoch_losses: list[float] = []
        epoch_began = time.perf_counter()
        for start in range(0, len(ordered), config.groups_per_step):
            if config.max_steps is not None and step >= config.max_steps:
                break
            chunk = ordered[start : start + config.groups_per_step]
            queries, docs = [], []
            for group, negatives in chunk:
                for doc_id in [group.positive, *negatives]:
                    queries.append(group.query)
                    docs.append(data.documents[doc_id])
            encoded = [e[0] for e in encode_pairs(tokenizer, queries, docs, config.max_length,
                                                    max_query_tokens=config.max_query_tokens)]
            truncated_pairs += sum(1 for e in encoded if e.document_cut or e.query_cut)
            seen_pairs += len(encoded)
            batch = collate(encoded, tokenizer.pad_token_id, config.head == SEGMENT_COSINE)
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(device, precision):
                scores = forward_scores(model, batch, config.head, config.scale)
            logits = scores.float().view(len(chunk), 1 + config.negatives)
            loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(chunk), dtype=torch.long, device=device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_losses.append(float(loss.item()))
            losses.append(float(loss.item()))
            if step % 20 == 0 or step == 1:
                elapsed = time.perf_counter() - epoch_began
                done = start // config.groups_per_step + 1
                log(f"epoch {epoch} step {step}/{total_steps} loss {sum(epoch_losses[-20:]) / len(epoch_losses[-20:]):.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {elapsed / done:.2f}s/step")
        record: dict[str, Any] = {
            "epoch": epoch,
            "steps": step,
            "mean_loss": round(sum(epoch_losses) / max(1, len(epoch_losses)), 4),
            "seconds": round(time.perf_counter() - epoch_began, 1),
        }
        if data.dev_queries:
            dev_began = time.perf_counter()
            record["dev"] = evaluate_dev(model, tokenizer, data, miner, config, device, precision)
            record["dev"]["seconds"] = round(time.perf_counter() - dev_began, 1)
            log(f"epoch {epoch} held-out nDCG@10: {record['dev']['ndcg_cut_10']}, "
                f"fusion {record['dev']['fusion']['weights']} -> {record['dev']['fusion']['ndcg_cut_10']}")
        else:
            log(f"epoch {epoch} done, mean loss {record['mean_loss']}")
        history.append(record)
        better = best is None or (
            data.dev_queries and record["dev"]["ndcg_cut_10"]["rerank"] > best["dev"]["ndcg_cut_10"]["rerank"]
        ) or not data.dev_queries
        if better:
            best = record
            card = _model_card(config, base_identity, data, history, best, precision, device,
                               time.perf_counter() - began, command, truncated_pairs, seen_pairs, random_fill)
            save_model(model, tokenizer, Path(config.out), card)
            log(f"saved epoch {epoch} to {config.out}")
        else:
            card_path = Path(config.out) / "sieve_model.json"
            card = json.loads(card_path.read_text(encoding="utf-8"))
            card["training"]["history"] = history
            card["training"]["seconds"] = round(time.perf_counter() - began, 1)
            _write_card(Path(config.out), card)
        if config.max_steps is not None and step >= config.max_steps:
            break
    card = json.loads((Path(config.out) / "sieve_model.json").read_text(encoding="utf-8"))
    card["training"]["seconds"] = round(time.perf_counter() - began, 1)
    card["training"]["history"] = history
    _write_card(Path(config.out), card)
    log(f"done in {card['training']['seconds']:.0f}s; model in {config.out}")
    return card


def _model_card(
    config: TrainConfig,
    base_identity: dict[str, Any],
    data: TrainingData,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    precision: str,
    device: str,
    seconds: float,
    command: str | None,
    truncated_pairs: int,
    seen_pairs: int,
    random_fill: int,
) -> dict[str, Any]:
    import torch
    import transformers

    from engine import __version__

    metrics: dict[str, Any] = {}
    fusion = None
    if "dev" in best:
        metrics["held_out_train"] = {
            "what": f"nDCG@10 reranking BM25 top-{best['dev']['depth']} on {best['dev']['queries']} "
                    "queries held out of the training split (never the test split)",
            **best["dev"]["ndcg_cut_10"],
            "fused_with_bm25": best["dev"]["fusion"]["ndcg_cut_10"],
        }
        fusion = {k: best["dev"]["fusion"][k] for k in ("normalize", "weights")}
    return {
        "format": SIEVE_MODEL_FORMAT,
        "kind": "cross_encoder",
        "head": config.head,
        "scale": config.scale if config.head == SEGMENT_COSINE else None,
        "max_length": config.max_length,
        "max_query_tokens": config.max_query_tokens,
        "base_model": base_identity,
        "data": data.source,
        "recipe": {k: v for k, v in asdict(config).items() if k not in ("out", "data", "feedback", "base", "threads")},
        "seed": config.seed,
        "selected_epoch": best["epoch"],
        "fusion": fusion,
        "metrics": metrics,
        "training": {
            "command": command,
            "seconds": round(seconds, 1),
            "device": device,
            "cpu": cpu_model_name(),
            "torch_threads": torch.get_num_threads(),
            "precision": precision,
            "truncated_pairs": truncated_pairs,
            "pairs_seen": seen_pairs,
            "random_negatives_filled": random_fill,
            "history": history,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"sieve": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]},
        },
        "saved_dtype": "float16",
    }


def save_model(model: Any, tokenizer: Any, out: Path, card: dict[str, Any]) -> None:
    """Standard HF directory with fp16 safetensors, plus sieve_model.json and README.md."""
    import copy

    import torch

    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to("cpu").to(torch.float16)
    half.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del half
    _write_card(out, card)


def _write_card(out: Path, card: dict[str, Any]) -> None:
    (out / "sieve_model.json").write_text(json.dumps(card, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    (out / "README.md").write_text(render_readme(card), encoding="utf-8")


def render_readme(card: dict[str, Any]) -> str:
    """The human model card, generated from ``sieve_model.json`` so the two never disagree."""
    recipe = card["recipe"]
    data = card["data"]
    training = card["training"]
    lines = [
        f"# Sieve cross-encoder reranker ({card['head']})",
        "",
        "Trained by `sieve train-reranker`. Load it with the `rerank.cross_encoder` stage "
        "(it reads `sieve_model.json` to pick the scoring head).",
        "",
        "## What it computes",
        "",
    ]
    if card["head"] == SEGMENT_COSINE:
        lines.append(
            f"The query and document are encoded jointly (`[CLS] query [SEP] document [SEP]`, at most "
            f"{card['max_length']} tokens, the query at most {card['max_query_tokens']}); the score is "
            f"`{card['scale']} x cos(mean of the query-segment token states, mean of the document-segment "
            "token states)`. No parameters beyond the encoder's. Scores lie in "
            f"[-{card['scale']}, {card['scale']}]; only their order within a query is meaningful."
        )
    else:
        lines.append("The score is the logit of a one-output sequence-classification head over the pair.")
    lines += [
        "",
        "## Base model and data",
        "",
        f"- Base: `{card['base_model']['name']}` (weights sha256 `{card['base_model'].get('weights_sha256')}`)",
        f"- Corpus: `{data.get('corpus')}` ({data.get('corpus_documents')} documents)",
    ]
    if "split" in data:
        lines.append(f"- Judgements: split `{data['split']}` (`{data.get('qrels')}`, sha256 `{data.get('qrels_sha256')}`)")
    if "feedback" in data:
        lines.append(f"- Feedback: `{data['feedback']}` (sha256 `{data.get('feedback_sha256')}`)")
    lines += [
        f"- {data.get('train_groups')} training groups from {data.get('train_queries')} queries; "
        f"{data.get('dev_queries')} queries of the same split held out for choosing the epoch and fusion weight",
        "",
        "## Recipe",
        "",
        f"Each group is 1 positive + {recipe['negatives']} negatives (BM25 hard negatives sampled from the "
        f"top {recipe['mine_depth']}, resampled each epoch); softmax cross-entropy over the group; AdamW "
        f"(lr {recipe['learning_rate']}, weight decay {recipe['weight_decay']}), linear warm-up over "
        f"{int(recipe['warmup_fraction'] * 100)}% of the steps then linear decay; {recipe['groups_per_step']} "
        f"groups per step; {recipe['epochs']} epoch(s), epoch {card['selected_epoch']} kept; seed {card['seed']}; "
        f"precision {training['precision']} on {training['device']} ({training['cpu']}, "
        f"{training['torch_threads']} threads). Weights saved as float16.",
        "",
        f"Training took {training['seconds'] / 60:.1f} minutes. {training['truncated_pairs']} of "
        f"{training['pairs_seen']} training pairs were cut to {card['max_length']} tokens.",
        "",
        "Command:",
        "",
        "```",
        f"{training.get('command') or '(not recorded)'}",
        "```",
        "",
        "## Metrics",
        "",
    ]
    metrics = card.get("metrics") or {}
    if not metrics:
        lines.append("No evaluation was run.")
    for name, figures in metrics.items():
        what = figures.get("what", "")
        values = ", ".join(f"{k} {v}" for k, v in figures.items() if k != "what")
        lines.append(f"- **{name}**: {values}" + (f" — {what}" if what else ""))
    if card.get("fusion"):
        weights = card["fusion"]["weights"]
        lines += ["", f"Fusion weights chosen on the held-out training queries ({card['fusion']['normalize']}): "
                  + ", ".join(f"{k} {v}" for k, v in weights.items())]
    history = training.get("history") or []
    if history:
        lines += ["", "| epoch | mean loss | held-out rerank nDCG@10 | fused | minutes |", "|---|---|---|---|---|"]
        for record in history:
            dev = record.get("dev") or {}
            lines.append(
                f"| {record['epoch']} | {record['mean_loss']} | {dev.get('ndcg_cut_10', {}).get('rerank', '-')} | "
                f"{dev.get('fusion', {}).get('ndcg_cut_10', '-')} | {record['seconds'] / 60:.1f} |"
            )
    lines += [
        "",
        "## Limits",
        "",
        "Trained on scientific claims vs abstracts (English); expect less on other domains. "
        "Text beyond the token limit is not seen (the stage records every cut). Scores are not "
        "probabilities; calibrate or min-max normalise before fusing.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def train_reranker(
    data: Annotated[Path, typer.Option("--data", help="BEIR directory (corpus.jsonl, queries, qrels/<split>.tsv)")],
    out: Annotated[Path, typer.Option("--out", help="directory to write the trained model to")],
    base: Annotated[str, typer.Option("--base", help="encoder to start from: path, packaged name or hub id")] = DEFAULT_BASE,
    split: Annotated[str, typer.Option("--split", help="qrels split to train on (never the test split)")] = "train",
    feedback: Annotated[Optional[Path], typer.Option("--feedback", help="feedback JSONL instead of qrels: {query, doc_id, helpful}")] = None,
    head: Annotated[str, typer.Option("--head", help="segment_cosine (default) or sequence_classification")] = SEGMENT_COSINE,
    scale: Annotated[float, typer.Option("--scale", help="segment_cosine: scale of the cosine")] = DEFAULT_SCALE,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 1,
    negatives: Annotated[int, typer.Option("--negatives", min=1, help="hard negatives per positive")] = 7,
    mine_depth: Annotated[int, typer.Option("--mine-depth", min=1, help="sample negatives from the BM25 top N")] = 30,
    groups_per_step: Annotated[int, typer.Option("--groups-per-step", min=1)] = 2,
    learning_rate: Annotated[float, typer.Option("--lr")] = 2e-5,
    max_length: Annotated[int, typer.Option("--max-length", min=16)] = 256,
    seed: Annotated[int, typer.Option("--seed")] = 13,
    dev_fraction: Annotated[float, typer.Option("--dev-fraction", min=0.0, max=0.5, help="share of training queries held out to pick the epoch and fusion weight")] = 0.0,
    dev_depth: Annotated[int, typer.Option("--dev-depth", min=1, help="BM25 depth reranked on held-out queries")] = 30,
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 where native, else fp32), fp32 or bf16")] = "auto",
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="stop after this many steps")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads")] = None,
    allow_test_split: Annotated[bool, typer.Option("--allow-test-split", help="train on a split named 'test' anyway")] = False,
) -> None:
    """Fine-tune a cross-encoder from labelled pairs or feedback, with BM25 hard negatives."""
    if split == "test" and feedback is None and not allow_test_split:
        raise SieveError("refusing to train on the test split: the test set's metrics would mean nothing; pass "
                         "--allow-test-split if this data set's 'test' split is not used to evaluate")
    if precision not in ("auto", "fp32", "bf16"):
        raise SieveError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    config = TrainConfig(
        base=base, data=str(data), split=split, feedback=str(feedback) if feedback is not None else None,
        out=str(out), head=head, scale=scale, epochs=epochs, negatives=negatives, mine_depth=mine_depth,
        groups_per_step=groups_per_step, learning_rate=learning_rate, max_length=max_length, seed=seed,
        dev_fraction=dev_fraction, dev_depth=dev_depth, precision=precision, max_steps=max_steps, threads=threads,
    )
    program = "python -m stages.rerank.train" if sys.argv[0].endswith("train.py") else "sieve train-reranker"
    command = " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])
    train(config, log=lambda line: typer.echo(line, err=True), command=command)


if __name__ == "__main__":  # python -m stages.rerank.train ... (before the CLI registers it)
    typer.run(train_reranker)
