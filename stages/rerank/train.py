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
held-out split are deterministic functions of it. A held-out part of the *training* data
(``dev_fraction``) chooses the epoch and the fusion weight with BM25 (so its figures are optimistic).
The test split is not trained on unless ``allow_test_split`` says so (also for feedback queries that
are test-split queries: the test queries are read only to find those); the card records which.

The saved directory is a standard HF model (config, tokenizer, fp16 safetensors) plus
``sieve_model.json`` (head, scale, recipe, data, metrics, progress, the weights' hash) and a human
README.md model card. Every save writes the whole directory beside ``--out`` and swaps it in by
rename: an interruption leaves the previous model or the last saved epoch (``"complete": false``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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
MAX_QUERY_CHARS = 4096  # the pipeline's default limits.max_query_chars: a longer feedback query is refused
MAX_FEEDBACK_LINE_BYTES = 256 * 1024  # one record: a query of MAX_QUERY_CHARS (escaped), a doc_id and a verdict
MAX_FEEDBACK_PROBLEMS = 20
DOCUMENT_CHARS_PER_TOKEN = 64  # document text past max_length x this many characters is never tokenized
WEIGHTS_HASH_METHOD = ("engine.models.weights_hash: sha256 over each weight file's name and sha256 "
                       "(not the sha256sum of one file)")


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
    allow_test_split: bool = False  # train on the test split / on feedback queries that are test queries


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


def _same_text_key(text: str) -> str:
    """Two queries are 'the same text' when they differ only in case and whitespace."""
    return " ".join(text.split()).casefold()


def load_training_data(config: TrainConfig) -> TrainingData:
    """Read the BEIR split or the feedback file; split off the held-out queries (by seed)."""
    from engine.evaluation import load_beir
    from engine.index import read_corpus

    if config.data is None:
        raise SieveError("train-reranker needs --data DIR (a BEIR directory with corpus.jsonl)")
    data_dir = Path(config.data).absolute()
    corpus_file = data_dir / "corpus.jsonl"
    corpus = read_corpus(corpus_file)
    documents = {d.doc_id: _document_text(d.title, d.text) for d in corpus}
    document_chars = config.max_length * DOCUMENT_CHARS_PER_TOKEN
    cut_documents = 0
    for doc_id, text in documents.items():  # text past this cannot fit in max_length tokens: never tokenized
        if len(text) > document_chars:
            documents[doc_id] = text[:document_chars]
            cut_documents += 1
    queries: dict[str, str] = {}
    positives: dict[str, list[str]] = {}
    explicit_negatives: dict[str, list[str]] = {}
    source: dict[str, Any] = {"corpus": str(corpus_file), "corpus_sha256": _sha256(corpus_file),
                              "corpus_documents": len(documents)}
    if cut_documents:
        source["documents_cut_to_chars"] = {"chars": document_chars, "documents": cut_documents}
    if config.feedback is not None:
        feedback_path = Path(config.feedback).absolute()
        queries, positives, explicit_negatives, counts = _read_feedback(feedback_path, documents)
        source.update({"feedback": str(feedback_path), "feedback_sha256": _sha256(feedback_path),
                       "feedback_records": counts})
        source.update(_test_queries_in_feedback(data_dir, queries, config.allow_test_split))
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
        queries_path = Path(beir.queries_path).absolute()
        source.update({"split": config.split, "qrels": str(qrels_path), "qrels_sha256": _sha256(qrels_path),
                       "queries": str(queries_path), "queries_sha256": _sha256(queries_path)})
        if config.split == "test":
            source["test_split_trained_on"] = True
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


def _test_queries_in_feedback(data_dir: Path, queries: dict[str, str], allow: bool) -> dict[str, Any]:
    """Refuse feedback queries that are the data set's test-split queries (same text) unless ``allow``."""
    from engine.evaluation import load_beir

    if not (data_dir / "qrels" / "test.tsv").is_file():
        return {"test_split_checked": False}
    test = load_beir(data_dir, "test")
    test_texts = {_same_text_key(t) for t in test.queries.values()}
    shared = sorted(q for q in queries.values() if _same_text_key(q) in test_texts)
    if shared and not allow:
        raise SieveError(
            f"{len(shared)} of the {len(queries)} feedback queries are test-split queries of {data_dir} (same text, "
            f"e.g. {shared[0][:80]!r}): training on them makes the test metrics meaningless; remove them, or pass "
            "--allow-test-split if this data set's test split is not used to evaluate"
        )
    return {"test_split_checked": True, "test_queries_in_feedback": len(shared)}


def _feedback_lines(path: Path, problems: list[str]) -> Iterator[tuple[int, str]]:
    """(line number, text) of the file's non-blank lines; a line that is too long or not UTF-8 is a problem."""
    with open(path, "rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_FEEDBACK_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_FEEDBACK_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line without keeping it
                    raw = handle.readline(1 << 20)
                problems.append(f"{path}:{number}: line longer than {MAX_FEEDBACK_LINE_BYTES} bytes "
                                "(a record is one query, a doc_id and a verdict)")
                yield number, ""
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
                                "of the line); save the file as UTF-8")
                yield number, ""
                continue
            yield number, text


def _read_feedback(
    path: Path, documents: dict[str, str]
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, list[str]], dict[str, Any]]:
    """Feedback lines -> queries (id = sha256 of the text), helpful and unhelpful doc ids, and the counts of what
    was collapsed, resolved or dropped (recorded in the model card)."""
    if not path.is_file():
        raise SieveError(f"feedback file not found: {path}")
    queries: dict[str, str] = {}
    verdicts: dict[tuple[str, str], set[bool]] = {}
    problems: list[str] = []
    records = duplicates = 0
    try:
        for number, line in _feedback_lines(path, problems):
            if len(problems) >= MAX_FEEDBACK_PROBLEMS:
                problems.append(f"(stopped after {MAX_FEEDBACK_PROBLEMS} problems)")
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                problems.append(f"{path}:{number}: not JSON ({getattr(exc, 'msg', 'nested too deeply')})")
                continue
            if not isinstance(record, dict):
                problems.append(f"{path}:{number}: expected an object with query, doc_id, helpful")
                continue
            query, doc_id, verdict = record.get("query"), record.get("doc_id"), record.get("helpful")
            if not isinstance(query, str) or not query.strip():
                problems.append(f"{path}:{number}: 'query' must be a non-empty string")
            elif len(query) > MAX_QUERY_CHARS:
                problems.append(f"{path}:{number}: 'query' is {len(query)} characters long; the limit is "
                                f"{MAX_QUERY_CHARS} (the pipeline's default max_query_chars)")
            elif not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or str(doc_id) not in documents:
                shown = doc_id if not isinstance(doc_id, str) or len(doc_id) <= 80 else doc_id[:80] + "..."
                problems.append(f"{path}:{number}: 'doc_id' {shown!r} is not in the corpus")
            elif not isinstance(verdict, bool):
                problems.append(f"{path}:{number}: 'helpful' must be true or false")
            else:
                records += 1
                qid = hashlib.sha256(query.encode("utf-8")).hexdigest()[:16]
                queries[qid] = query
                seen = verdicts.setdefault((qid, str(doc_id)), set())
                if verdict in seen:
                    duplicates += 1
                seen.add(verdict)
    except OSError as exc:
        raise SieveError(f"cannot read the feedback file {path}: {exc.strerror or exc}") from None
    if problems:
        raise SieveError("the feedback file has errors:\n" + "\n".join(problems))
    if not records:
        raise SieveError(f"the feedback file {path} holds no records (it is empty or only blank lines); each line is "
                         '{"query": ..., "doc_id": ..., "helpful": true|false}')
    helpful: dict[str, set[str]] = {}
    unhelpful: dict[str, set[str]] = {}
    conflicts = 0
    for (qid, doc_id), seen in verdicts.items():
        if len(seen) == 2:
            conflicts += 1  # marked both ways: counts as helpful
        (helpful if True in seen else unhelpful).setdefault(qid, set()).add(doc_id)
    without_positive = sorted(q for q in queries if q not in helpful)
    counts = {
        "records": records,
        "queries": len(queries),
        "pairs": len(verdicts),
        "duplicates_collapsed": duplicates,
        "conflicting_pairs": conflicts,
        "conflict_resolution": "a document marked both helpful and unhelpful for a query counts as helpful",
        "queries_dropped_without_helpful": len(without_positive),
    }
    return (
        queries,
        {q: sorted(d) for q, d in helpful.items()},
        {q: sorted(d) for q, d in unhelpful.items()},
        counts,
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

# Files a model directory written by this command (or a Hugging Face save) may hold; anything else in --out is a
# user's file, and the directory is not replaced.
MODEL_FILE_NAMES = frozenset({
    "sieve_model.json", "README.md", "config.json", "generation_config.json", "model.safetensors",
    "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
    "sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "chat_template.jinja",
})
_MAX_CARD_BYTES = 16 << 20


def _is_model_file(name: str) -> bool:
    import re

    return name in MODEL_FILE_NAMES or re.fullmatch(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors", name) is not None


def _not_a_model(directory: Path) -> str | None:
    """Why ``directory`` is not a model this command wrote, that a new one may replace (None: it is one)."""
    try:
        entries = sorted(directory.iterdir())
        card_path = directory / "sieve_model.json"
        if not card_path.is_file():
            return "no sieve_model.json"
        if card_path.stat().st_size > _MAX_CARD_BYTES:
            return "its sieve_model.json is far larger than a model card"
        card = json.loads(card_path.read_bytes())
    except OSError as exc:
        return f"it cannot be read: {exc.strerror or exc}"
    except (ValueError, RecursionError):
        return "its sieve_model.json is not valid JSON"
    if not isinstance(card, dict) or card.get("format") != SIEVE_MODEL_FORMAT:
        return f"its sieve_model.json is not a Sieve model card (no \"format\": \"{SIEVE_MODEL_FORMAT}\")"
    for entry in entries:
        if entry.is_symlink() or not entry.is_file() or not _is_model_file(entry.name):
            return f"it holds {entry.name}, which is not a file of a model"
    return None


def _staging_path(out: Path) -> Path:
    """The directory a save is written into, beside ``out`` (the name ``engine.index`` gives its staging
    directories, so that leftovers of killed processes are recognised and removed the same way)."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"


def _probe_writable(out: Path) -> None:
    """Create (then remove) a staging directory beside ``out`` and any missing parents: an --out that cannot be
    written is found before training, not after it."""
    staging = _staging_path(out)
    created: list[Path] = []
    try:
        for directory in [p for p in reversed(staging.parents) if not p.exists()] + [staging]:
            try:
                directory.mkdir()
            except OSError as exc:
                raise SieveError(f"cannot write the model to --out {out}: cannot create {directory}: "
                                 f"{exc.strerror or exc}") from None
            created.append(directory)
    finally:
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:
                pass


def check_output_directory(out: Path, base: str | None = None) -> dict[str, Any] | None:
    """Refuse, before training, an --out that is a file, lies under a file, is the --base model, cannot be
    written, or is a non-empty directory other than a model of ``sieve train-reranker`` (a valid Sieve card and
    only model files): a user's files are never overwritten. Returns the card of the model --out holds, which the
    first save replaces (None: --out is new or empty)."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise SieveError(f"--out {out} is a file; give a directory for the model")
    parent = nearest_existing_parent(out)
    if parent is not None and not parent.is_dir():
        raise SieveError(f"--out {out}: {parent} is a file, not a directory")
    if base is not None and Path(base).exists() and Path(base).resolve() == out.resolve():
        raise SieveError(f"--out {out} is the --base model: training would replace the model it starts from; "
                         "choose another --out")
    previous = None
    if out.is_dir() and any(out.iterdir()):
        why = _not_a_model(out)
        if why is not None:
            raise SieveError(f"--out {out} is a directory with other files in it, not a model this command wrote "
                             f"({why}); choose a new or empty directory")
        previous = json.loads((out / "sieve_model.json").read_bytes())
    _probe_writable(out)
    return previous


def _match_umask(directory: Path) -> None:
    """Give every saved file the mode a new file gets here (safetensors writes its file 0600, the rest 0644)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` with ``staging`` (:func:`engine.index.swap_directory`: a crash leaves the previous model or
    the new one, never a mix; the previous model's files go with it)."""
    from engine.index import swap_directory

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _not_a_model(out) is not None)):
        raise SieveError(f"--out {out} changed during training and is no longer a model this command wrote; "
                         f"nothing was replaced (the new model was not kept)")
    swap_directory(staging, out)


def _publish(out: Path, card: dict[str, Any], fill: Callable[[Path], None]) -> dict[str, Any]:
    """Write a whole model directory (``fill`` puts the weights and tokenizer in; then the card, which records
    the weights' hash, and README.md) into a staging directory beside ``out`` and swap it in. Returns the card."""
    from engine.index import _remove_stale_builds
    from engine.models import weights_hash

    out = Path(os.path.abspath(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(out)
        staging = _staging_path(out)
        staging.mkdir()
    except OSError as exc:
        raise SieveError(f"cannot write the model to {out}: {exc.strerror or exc}") from None
    try:
        fill(staging)
        card = {**card, "weights_hash": weights_hash(staging), "weights_hash_method": WEIGHTS_HASH_METHOD}
        _write_card(staging, card)
        _match_umask(staging)
        _swap_in(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        where = f"{exc.filename}: " if exc.filename else ""
        raise SieveError(f"cannot write the model to {out}: {where}{exc.strerror or exc}; any previous model "
                         "there is unchanged") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def save_model(model: Any, tokenizer: Any, out: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Standard HF directory with fp16 safetensors, plus sieve_model.json and README.md, swapped in whole."""

    def fill(staging: Path) -> None:
        import copy

        import torch

        from engine.models import quiet_transformers

        half = copy.deepcopy(model).to("cpu").to(torch.float16)
        with quiet_transformers():  # no 'Writing model shards' bar between the log lines
            half.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        del half

    return _publish(out, card, fill)


def update_card(out: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Swap in a new card (and README) for the weights ``out`` holds (hard links, else copies, of its files)."""
    source = Path(os.path.abspath(out))

    def fill(staging: Path) -> None:
        for entry in source.iterdir():
            if entry.name in ("sieve_model.json", "README.md"):
                continue
            try:
                os.link(entry, staging / entry.name)
            except OSError:
                shutil.copy2(entry, staging / entry.name)

    return _publish(out, card, fill)


def _write_card(out: Path, card: dict[str, Any]) -> None:
    (out / "sieve_model.json").write_text(json.dumps(card, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    (out / "README.md").write_text(render_readme(card), encoding="utf-8")


def _validate(config: TrainConfig) -> None:
    if config.head not in (SEGMENT_COSINE, SEQUENCE_CLASSIFICATION):
        raise SieveError(f"--head must be {SEGMENT_COSINE} or {SEQUENCE_CLASSIFICATION}, got {config.head!r}")
    for name, value, low in (("epochs", config.epochs, 1), ("negatives", config.negatives, 1),
                             ("max_length", config.max_length, 16), ("groups_per_step", config.groups_per_step, 1)):
        if value < low:
            raise SieveError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if not isinstance(config.learning_rate, (int, float)) or not math.isfinite(config.learning_rate) \
            or config.learning_rate <= 0:
        raise SieveError(f"--lr must be a finite number above 0, got {config.learning_rate}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed <= 2**32 - 1:
        raise SieveError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {config.seed}")
    if config.head == SEGMENT_COSINE and (not math.isfinite(config.scale) or config.scale <= 0):
        raise SieveError(f"--scale must be a finite number above 0, got {config.scale} (at 0 every score is 0 and "
                         "nothing is learned)")
    if config.split == "test" and not config.allow_test_split:
        raise SieveError("refusing to train on the test split: the test set's metrics would mean nothing; pass "
                         "--allow-test-split if this data set's 'test' split is not used to evaluate")
    if config.feedback is not None and config.split not in ("train", "test"):
        raise SieveError(f"--split {config.split!r} does not apply with --feedback (the feedback file is the "
                         "training data)")


def command_line(config: TrainConfig) -> str:
    """A ``sieve train-reranker`` command that reruns ``config`` (input paths absolute)."""
    default = TrainConfig()

    def path(value: str) -> str:
        return os.path.abspath(value)

    args = ["sieve", "train-reranker", "--data", path(str(config.data)), "--out", path(config.out)]
    base = path(config.base) if Path(config.base).exists() else config.base
    args += ["--base", base]
    if config.feedback is not None:
        args += ["--feedback", path(config.feedback)]
    options = (("split", "--split"), ("head", "--head"), ("scale", "--scale"), ("epochs", "--epochs"),
               ("negatives", "--negatives"), ("mine_depth", "--mine-depth"), ("groups_per_step", "--groups-per-step"),
               ("learning_rate", "--lr"), ("max_length", "--max-length"), ("seed", "--seed"),
               ("dev_fraction", "--dev-fraction"), ("dev_depth", "--dev-depth"), ("precision", "--precision"),
               ("max_steps", "--max-steps"), ("threads", "--threads"))
    for name, option in options:
        value = getattr(config, name)
        if value is not None and (value != getattr(default, name) or name in ("epochs", "seed")):
            args += [option, str(value)]
    if config.allow_test_split:
        args.append("--allow-test-split")
    return " ".join(shlex.quote(a) for a in args)


def train(config: TrainConfig, log: Log = print, command: str | None = None) -> dict[str, Any]:
    """Run the recipe; write the model directory; return the model card (``sieve_model.json``).

    Every save writes the whole directory beside --out and swaps it in (:func:`save_model`): an interruption leaves
    the previous model or the last saved epoch, whose card says ``"complete": false`` until the run ends."""
    import torch

    from engine.index import _TerminationAsExit

    _validate(config)
    out = Path(os.path.abspath(config.out))
    previous = check_output_directory(out, config.base)
    if previous is not None:
        log(f"--out {out} holds a model of sieve train-reranker (epoch {previous.get('selected_epoch')}, "
            f"{(previous.get('training') or {}).get('command') or 'command not recorded'}): it is replaced when the "
            "first epoch is saved, and stays as it is until then")
    if command is None:
        command = command_line(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    began = time.perf_counter()
    seed_everything(config.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = choose_precision(config.precision, device)

    log(f"loading data from {config.data} ({'feedback ' + str(config.feedback) if config.feedback else 'split ' + config.split})")
    data = load_training_data(config)
    counts = data.source.get("feedback_records")
    if counts:
        log(f"feedback: {counts['records']} records, {counts['queries']} queries; "
            f"{counts['queries_dropped_without_helpful']} queries dropped (no helpful document), "
            f"{counts['duplicates_collapsed']} duplicate records collapsed, {counts['conflicting_pairs']} "
            "documents marked both helpful and unhelpful for a query (counted as helpful)")
    if data.source.get("test_queries_in_feedback"):
        log(f"warning: {data.source['test_queries_in_feedback']} feedback queries are test-split queries "
            "(--allow-test-split); the card records it")
    log(f"{len(data.groups)} groups from {data.source['train_queries']} queries; {len(data.dev_queries)} held out")
    miner = BM25Miner(data.documents)
    positives_of: dict[str, set[str]] = {}
    for group in data.groups:
        positives_of.setdefault(group.query_id, set()).add(group.positive)
    pools = mine_candidates(data, miner, config.mine_depth, positives_of)

    tokenizer, model, base_identity = load_base(config.base, config.head)
    model.to(device)
    steps_per_epoch = math.ceil(len(data.groups) / config.groups_per_step)
    full_steps = steps_per_epoch * config.epochs
    total_steps = full_steps
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
    saved: dict[str, Any] | None = None  # the card of what --out holds from this run
    step = 0
    losses: list[float] = []
    truncated_pairs = 0
    seen_pairs = 0
    random_fill = 0
    epoch = 0

    def card_now(complete: bool) -> dict[str, Any]:
        assert best is not None
        progress = {"complete": complete, "epochs_done": len(history), "epochs_planned": config.epochs,
                    "steps_done": step, "steps_planned": full_steps,
                    "cut_by_max_steps": config.max_steps is not None and step < full_steps and step >= config.max_steps}
        return _model_card(config, base_identity, data, history, best, precision, device,
                           time.perf_counter() - began, command, truncated_pairs, seen_pairs, random_fill, progress)

    with _TerminationAsExit():  # SIGTERM raises SystemExit: a save in progress is discarded, the message says so
        try:
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
                    loss = torch.nn.functional.cross_entropy(
                        logits, torch.zeros(len(chunk), dtype=torch.long, device=device))
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
                        log(f"epoch {epoch} step {step}/{total_steps} loss "
                            f"{sum(epoch_losses[-20:]) / len(epoch_losses[-20:]):.4f} "
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
                last = epoch == config.epochs or (config.max_steps is not None and step >= config.max_steps)
                if better:
                    best = record
                    saved = save_model(model, tokenizer, out, card_now(complete=last))
                    log(f"saved epoch {epoch} to {out}")
                else:
                    saved = update_card(out, card_now(complete=last))
                if last:
                    break
        except (KeyboardInterrupt, SystemExit):
            what = "interrupted" if epoch == 0 else f"interrupted in epoch {epoch} of {config.epochs}"
            if saved is None:
                log(f"{what}: no epoch was saved; {out} "
                    + ("still holds the previous model" if previous is not None else "was not written"))
            else:
                progress = saved["training"]
                state = ("the finished run" if progress.get("complete")
                         else f"epoch {saved['selected_epoch']}, saved after epoch {progress['epochs_done']} of "
                              f"{config.epochs}; its card says \"complete\": false")
                log(f"{what}: {out} holds {state}")
            raise
    assert saved is not None
    log(f"done in {saved['training']['seconds']:.0f}s; model in {out}")
    return saved


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
    progress: dict[str, Any] | None = None,
) -> dict[str, Any]:
    import torch
    import transformers

    from engine import __version__

    progress = progress or {"complete": True}
    metrics: dict[str, Any] = {}
    fusion = None
    if "dev" in best:
        metrics["held_out_train"] = {
            "what": f"nDCG@10 reranking BM25 top-{best['dev']['depth']} on {best['dev']['queries']} "
                    f"queries held out of {_training_data_phrase(data.source)}; these queries also chose the "
                    "epoch and the fusion weight, so the figures are optimistic",
            **best["dev"]["ndcg_cut_10"],
            "fused_with_bm25": best["dev"]["fusion"]["ndcg_cut_10"],
        }
        fusion = {k: best["dev"]["fusion"][k] for k in ("normalize", "weights")}
    excluded = {"out", "data", "feedback", "base", "threads"} | ({"split"} if config.feedback is not None else set())
    base = {k: v for k, v in base_identity.items() if k != "weights_sha256"}
    base["weights_hash"] = base_identity.get("weights_sha256")
    base["weights_hash_method"] = WEIGHTS_HASH_METHOD
    return {
        "format": SIEVE_MODEL_FORMAT,
        "kind": "cross_encoder",
        "head": config.head,
        "scale": config.scale if config.head == SEGMENT_COSINE else None,
        "max_length": config.max_length,
        "max_query_tokens": config.max_query_tokens,
        "base_model": base,
        "data": data.source,
        "recipe": {k: v for k, v in asdict(config).items() if k not in excluded},
        "seed": config.seed,
        "selected_epoch": best["epoch"],
        "fusion": fusion,
        "metrics": metrics,
        "training": {
            **progress,
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
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished_at": (datetime.now(timezone.utc).isoformat(timespec="seconds")
                            if progress.get("complete") else None),
            "versions": {"sieve": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]},
        },
        "saved_dtype": "float16",
    }


def _training_data_phrase(source: dict[str, Any]) -> str:
    """What the training queries were, in words true of this card's data."""
    if "feedback" in source:
        shared = source.get("test_queries_in_feedback")
        tail = (f"; {shared} of its queries are test-split queries (--allow-test-split)" if shared
                else "; none of its queries is a test-split query" if source.get("test_split_checked")
                else "; no test split was found to check it against")
        return f"the feedback file{tail}"
    split = source.get("split", "train")
    if split == "test":
        return "the test split (trained on with --allow-test-split: not an independent evaluation)"
    return f"the '{split}' split (the test split was not read)"


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
    ]
    status = _status_line(card)
    if status:
        lines += [status, ""]
    lines += [
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
        f"- Base: `{card['base_model']['name']}` ({_base_hash_phrase(card['base_model'])})",
        f"- Corpus: `{data.get('corpus')}` ({data.get('corpus_documents')} documents"
        + (f", sha256 `{data['corpus_sha256']}`" if data.get("corpus_sha256") else "") + ")",
    ]
    if data.get("documents_cut_to_chars"):
        cut = data["documents_cut_to_chars"]
        lines.append(f"- {cut['documents']} documents longer than {cut['chars']} characters were cut there before "
                     "tokenizing (that much text cannot fit in the token limit)")
    if "split" in data:
        lines.append(f"- Judgements: split `{data['split']}` (`{data.get('qrels')}`, sha256 `{data.get('qrels_sha256')}`)")
        if data.get("queries"):
            lines.append(f"- Queries: `{data['queries']}` (sha256 `{data.get('queries_sha256')}`)")
    if "feedback" in data:
        lines.append(f"- Feedback: `{data['feedback']}` (sha256 `{data.get('feedback_sha256')}`)")
        counts = data.get("feedback_records")
        if counts:
            lines.append(
                f"- Feedback records: {counts['records']} ({counts['queries']} queries); "
                f"{counts['queries_dropped_without_helpful']} queries dropped for having no helpful document; "
                f"{counts['duplicates_collapsed']} duplicate records collapsed; {counts['conflicting_pairs']} "
                f"documents marked both ways ({counts['conflict_resolution']})"
            )
    held_from = ("the feedback file's queries" if "feedback" in data
                 else f"the queries of split `{data.get('split', 'train')}`")
    lines += [
        f"- {data.get('train_groups')} training groups from {data.get('train_queries')} queries; "
        f"{data.get('dev_queries')} of {held_from} held out for choosing the epoch and fusion weight",
        f"- Test split: {_test_split_phrase(card)}",
        "",
        "## Recipe",
        "",
        f"Each group is 1 positive + {recipe['negatives']} negatives (BM25 hard negatives sampled from the "
        f"top {recipe['mine_depth']}, resampled each epoch); softmax cross-entropy over the group; AdamW "
        f"(lr {recipe['learning_rate']}, weight decay {recipe['weight_decay']}), linear warm-up over "
        f"{int(recipe['warmup_fraction'] * 100)}% of the steps then linear decay; {recipe['groups_per_step']} "
        f"groups per step; {recipe['epochs']} epoch(s), epoch {card['selected_epoch']} kept; seed {card['seed']}; "
        f"precision {training['precision']} on {training['device']} ({training['cpu']}, "
        f"{training['torch_threads']} threads). Weights saved as float16."
        + (f" Stopped by --max-steps {recipe.get('max_steps')} after {training.get('steps_done')} of "
           f"{training.get('steps_planned')} steps." if training.get("cut_by_max_steps") else ""),
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
                  + ", ".join(f"{k} {v}" for k, v in weights.items())
                  + ". The same queries chose the epoch and this weight, so the held-out figures are optimistic."]
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
        "Trained only on the queries of "
        + (f"the feedback file `{data['feedback']}`" if "feedback" in data else f"split `{data.get('split', 'train')}`")
        + f" over the documents of `{data.get('corpus')}`; expect less on other domains and languages. Text beyond the token limit is not seen (the stage records every "
        "cut). Scores are not probabilities; calibrate or min-max normalise before fusing.",
        "",
    ]
    return "\n".join(lines)


def _status_line(card: dict[str, Any]) -> str | None:
    training = card.get("training") or {}
    if training.get("complete") is False:
        return (f"**Unfinished run**: training stopped after epoch {training.get('epochs_done')} of "
                f"{training.get('epochs_planned')} (interrupted, or still running); this directory holds epoch "
                f"{card.get('selected_epoch')}.")
    if training.get("cut_by_max_steps"):
        return (f"**Shortened run**: stopped by --max-steps after {training.get('steps_done')} of "
                f"{training.get('steps_planned')} steps (epoch {training.get('epochs_done')} of "
                f"{training.get('epochs_planned')}).")
    return None


def _base_hash_phrase(base: dict[str, Any]) -> str:
    if base.get("weights_hash"):
        return f"weights hash `{base['weights_hash']}`: {base.get('weights_hash_method') or WEIGHTS_HASH_METHOD}"
    return f"weights hash `{base.get('weights_sha256')}`: {WEIGHTS_HASH_METHOD}"


def _test_split_phrase(card: dict[str, Any]) -> str:
    data = card["data"]
    if "feedback" in data:
        if not data.get("test_split_checked"):
            return "none in the data directory; the feedback queries were not checked against one"
        shared = data.get("test_queries_in_feedback") or 0
        return (f"{shared} feedback queries are test-split queries (same text), trained on with --allow-test-split"
                if shared else "no feedback query is a test-split query (same text)")
    if data.get("split") == "test":
        return "trained on (--allow-test-split); its metrics are not an independent evaluation"
    return "not read"


# --------------------------------------------------------------------------- CLI


def train_reranker(
    data: Annotated[Path, typer.Option("--data", help="BEIR directory (corpus.jsonl, queries, qrels/<split>.tsv)")],
    out: Annotated[Path, typer.Option("--out", help="directory to write the trained model to")],
    base: Annotated[str, typer.Option("--base", help="encoder to start from: path, packaged name or hub id")] = DEFAULT_BASE,
    split: Annotated[str, typer.Option("--split", help="qrels split to train on (never the test split)")] = "train",
    feedback: Annotated[Optional[Path], typer.Option("--feedback", help="feedback JSONL instead of qrels: {query, doc_id, helpful}")] = None,
    head: Annotated[str, typer.Option("--head", help="segment_cosine (default) or sequence_classification")] = SEGMENT_COSINE,
    scale: Annotated[float, typer.Option("--scale", help="segment_cosine: scale of the cosine")] = DEFAULT_SCALE,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="passes over the training groups")] = 1,
    negatives: Annotated[int, typer.Option("--negatives", min=1, help="hard negatives per positive")] = 7,
    mine_depth: Annotated[int, typer.Option("--mine-depth", min=1, help="sample negatives from the BM25 top N")] = 30,
    groups_per_step: Annotated[int, typer.Option("--groups-per-step", min=1, help="groups (a positive and its negatives) per optimiser step")] = 2,
    learning_rate: Annotated[float, typer.Option("--lr", help="AdamW peak learning rate (10% warm-up, then linear decay)")] = 2e-5,
    max_length: Annotated[int, typer.Option("--max-length", min=16, help="tokens of a query and document pair; longer documents are cut")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="seeds python, numpy and torch: data order, negative sampling, the dev split")] = 13,
    dev_fraction: Annotated[float, typer.Option("--dev-fraction", min=0.0, max=0.5, help="share of training queries held out to pick the epoch and fusion weight")] = 0.0,
    dev_depth: Annotated[int, typer.Option("--dev-depth", min=1, help="BM25 depth reranked on held-out queries")] = 30,
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 where native, else fp32), fp32 or bf16")] = "auto",
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="stop after this many steps")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads")] = None,
    allow_test_split: Annotated[bool, typer.Option("--allow-test-split", help="train on a split named 'test', or on feedback queries that are test-split queries, anyway (recorded in the card)")] = False,
) -> None:
    """Fine-tune a cross-encoder from labelled pairs or feedback, with BM25 hard negatives."""
    if precision not in ("auto", "fp32", "bf16"):
        raise SieveError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    config = TrainConfig(
        base=base, data=str(data), split=split, feedback=str(feedback) if feedback is not None else None,
        out=str(out), head=head, scale=scale, epochs=epochs, negatives=negatives, mine_depth=mine_depth,
        groups_per_step=groups_per_step, learning_rate=learning_rate, max_length=max_length, seed=seed,
        dev_fraction=dev_fraction, dev_depth=dev_depth, precision=precision, max_steps=max_steps, threads=threads,
        allow_test_split=allow_test_split,
    )
    train(config, log=lambda line: typer.echo(line, err=True))


if __name__ == "__main__":  # python -m stages.rerank.train ... (before the CLI registers it)
    typer.run(train_reranker)
