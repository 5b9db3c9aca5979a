"""``rerank.cross_encoder``: rescore the top of a candidate list with a cross-encoder.

Two kinds of model:
- any Hugging Face sequence-classification cross-encoder (bge-reranker-base/large/v2-m3, or a
  local directory), loaded through FlagEmbedding's ``FlagReranker``;
- Sieve's own ``segment_cosine`` models (``sieve train-reranker``), recognised by the
  ``sieve_model.json`` they carry.

Inference is our own loop over the loaded model (not ``FlagReranker.compute_score``): batched
tokenizer calls that read a long document only as far as the pair needs, length-sorted batches with
dynamic padding, ``torch.inference_mode``, bf16 autocast on CPUs with native bf16, fp16 on CUDA.
Every cut is recorded in the trace (which documents, at least how many tokens); with
``long_documents: chunks`` a long document is scored as overlapping windows and keeps its best
window (recorded too). ``max_query_tokens`` left unset is the model card's (what it was trained with).

Candidates beyond ``window`` are not scored: they keep their input order beneath the reranked
ones and get no ``rerank`` ledger entry. torch and FlagEmbedding are imported in ``warm_up``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from engine.cache import LRUCache
from engine.errors import DeadlineExceeded, MissingDependencyError, ModelLoadError, SieveError
from engine.models import (ModelFiles, check_vocabulary, load_failure, missing_model_path, model_card,
                           quiet_transformers, resolve_model, tokenizer_hash, torch_fork_guard, weights_hash)
from engine.model import Candidate, Decision, Query, ScoreEntry
from engine.registry import register_stage
from engine.stage import (
    Explanation,
    GraphIssue,
    GraphView,
    Port,
    RecentNotes,
    Resources,
    Stage,
    StageContext,
    StageNode,
    StageParams,
    StageResult,
    check_deadline,
    deadline_remaining,
)
from stages.embedding import device_and_precision, fp16_on_cpu, unrunnable_here
from stages.rerank.modeling import (
    DEFAULT_MAX_QUERY_TOKENS,
    DEFAULT_SCALE,
    SEGMENT_COSINE,
    SEQUENCE_CLASSIFICATION,
    EncodedPair,
    collate,
    cpu_has_native_bf16,
    encode_pairs,
    forward_scores,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = "models/sieve-reranker-scifact-minilm"
_NO_SHIPPED_MODEL = (f"the shipped reranker ({DEFAULT_MODEL_DIR}, the default `model:`) comes with a checkout of Sieve, "
                     "not with an installed package: set the stage's `model:` to a model directory or hub id, or "
                     "install Sieve from its checkout (pip install -e .)")
# How traces and explanations name the shipped model: not its absolute path, which is where this checkout lies (a
# trace replayed from a moved checkout or on an auditor's machine differed by that path alone); its files are
# identified by weights_sha256 and tokenizer_sha256, and where they lie is the identity's `location`
SHIPPED_MODEL_NAME = f"{DEFAULT_MODEL_DIR} (shipped)"
DEFAULT_SEQUENCE_CLASSIFICATION_MAX_LENGTH = 512


class CascadeParams(StageParams):
    """Full model for the first ``full_top`` candidates of the window, a light one (or none) below."""

    full_top: int = Field(..., ge=1, le=10_000, description="how many of the window the full model scores")
    light_model: str | None = Field(
        None, description="model for the rest of the window; None: the rest keep their input order unscored"
    )
    light_batch_size: int = Field(
        64, ge=1, le=4096, description="pairs per forward pass of the light model (batch_size is the full model's)"
    )


class CrossEncoderParams(StageParams):
    model: str | None = Field(
        None,
        description=f"path, packaged name or hub id; None: the shipped model ({DEFAULT_MODEL_DIR} in the repository)",
    )
    window: int = Field(100, ge=1, le=10_000, description="rerank the top N candidates; the rest keep their order below")
    batch_size: int = Field(32, ge=1, le=4096, description=(
        "query-document pairs (chunks, with long_documents: chunks) per forward pass of the model: larger is faster "
        "on a GPU and needs more memory (on out-of-memory see oom_backoff); a deadline is checked between batches. "
        "Under bf16 or fp16 a pair's score depends in its last digits on the pairs padded with it, so changing "
        "batch_size can reorder near-ties (fp32: last bits only); keep it fixed where replays must be identical"))
    max_length: int | None = Field(
        None, ge=16, le=8192,
        description="tokens per pair; None: the model card's (Sieve models) or 512 capped by the tokenizer's limit",
    )
    max_query_tokens: int | None = Field(
        None, ge=1, le=8192,
        description=f"query tokens kept when a pair must be cut; None: the model card's (Sieve models), else "
                    f"{DEFAULT_MAX_QUERY_TOKENS}",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp16 on CUDA; bf16 on CPUs with native bf16, else fp32"
    )
    fields: tuple[str, ...] = Field(("title", "text"), min_length=1, description="document fields joined as the text")
    query: Literal["effective", "original"] = Field(
        "effective", description="effective: the rewritten query when a rewrite ran; original: as asked"
    )
    long_documents: Literal["truncate", "chunks"] = Field(
        "truncate", description="truncate: cut at max_length (recorded); chunks: overlapping windows, max over them"
    )
    chunk_overlap: int = Field(64, ge=0, le=4096, description="tokens shared by consecutive chunks")
    max_chunks: int = Field(8, ge=1, le=256, description="chunks per document at most (what lies beyond is cut, recorded)")
    cascade: CascadeParams | None = Field(None, description=(
        "a cheaper window: the full model scores the first full_top candidates, light_model the rest (its scores "
        "kept below the full model's) or nothing; full_top must be smaller than window. None: the full model "
        "scores the whole window"))
    cache_size: int = Field(10_000, ge=0, le=10_000_000, description=(
        "scores kept in an in-memory LRU, about (whole windows: a repeated query and window is served from it; "
        "0: no cache)"))
    oom_backoff: bool = Field(
        False, description="on out-of-memory, halve the batch size and retry (recorded in the trace); off: fail"
    )

    @model_validator(mode="after")
    def _check(self) -> "CrossEncoderParams":
        if self.cascade is not None and self.cascade.full_top >= self.window:
            raise ValueError(
                f"cascade.full_top ({self.cascade.full_top}) must be smaller than window ({self.window}); "
                "otherwise the light model scores nothing"
            )
        if self.max_length is not None and self.long_documents == "chunks" and self.chunk_overlap >= self.max_length // 2:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be less than half of max_length ({self.max_length})")
        fp16_on_cpu(self.device, self.precision)
        return self


# --------------------------------------------------------------------------- loaded models


@dataclass
class PairScore:
    score: float
    document_tokens: int  # a lower bound: a long document's prefix is tokenised, not its whole text
    document_cut: int  # > 0 when the document was cut; a lower bound of the tokens cut
    query_cut: int
    chunks: int = 1
    best_chunk: int = 0
    best_chunk_start: int = 0


def _checkpoint_keys(directory: Path) -> set[str] | None:
    """The tensor names of a local safetensors checkpoint (sharded or not), read from its header only; None
    when the weights are in another format."""
    index = directory / "model.safetensors.index.json"
    try:
        if index.is_file():
            return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
        single = directory / "model.safetensors"
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as handle:
                return set(handle.keys())
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is a load error, named
        raise ModelLoadError(f"rerank.cross_encoder: cannot read the checkpoint in {directory}: "
                             f"{type(exc).__name__}: {exc}") from None
    return None


class LoadedReranker:
    """A cross-encoder ready for inference: model, tokenizer, scoring head, device, precision."""

    def __init__(self, name: str, base_dir: Path, device: str, precision: str, max_length: int | None,
                 shown_as: str | None = None):

        try:
            import torch
        except ImportError:
            raise MissingDependencyError("torch", "torch", "the cross-encoder reranker") from None
        torch_fork_guard(torch)
        self.torch = torch
        resolved = resolve_model(name, base_dir=base_dir, purpose="rerank.cross_encoder model")
        if shown_as is not None:  # the name traces give it (the shipped model's: not a path of this machine)
            resolved = replace(resolved, name=shown_as)
        self.resolved = resolved
        self.device, self.precision = device_and_precision(
            device, precision, "rerank.cross_encoder", cpu_precision=lambda: "bf16" if cpu_has_native_bf16() else "fp32")
        # seconds per padded token of a forward pass on this CPU (a running average), to see whether a batch
        # would end past a query's deadline before starting it; None until two batches have been timed (the
        # process's first forward pass is slow: it is not counted)
        self._seconds_per_cell: float | None = None
        self._timed_batches = 0
        self._warmed = False
        card = model_card(Path(resolved.location)) if resolved.source != "hub" else None
        self.card = card
        self.head = (card or {}).get("head") or SEQUENCE_CLASSIFICATION
        if self.head not in (SEGMENT_COSINE, SEQUENCE_CLASSIFICATION):
            raise ModelLoadError(f"rerank.cross_encoder: {resolved.location}/sieve_model.json names an unknown head '{self.head}'")
        self.scale = float((card or {}).get("scale") or DEFAULT_SCALE)
        card_query_tokens = (card or {}).get("max_query_tokens")
        if card_query_tokens is not None and (type(card_query_tokens) is not int or card_query_tokens < 1):
            raise ModelLoadError(f"rerank.cross_encoder: {resolved.location}/sieve_model.json: max_query_tokens "
                                 f"must be a positive integer, not {card_query_tokens!r}")
        # what the model was trained with, used when the stage's config does not set max_query_tokens
        self.max_query_tokens = card_query_tokens if card_query_tokens is not None else DEFAULT_MAX_QUERY_TOKENS
        self.max_query_tokens_from = "model card" if card_query_tokens is not None else "default"
        recorded = (card or {}).get("weights_hash")  # written by train-reranker since cards record it
        if recorded is not None and resolved.weights_sha256 is not None and recorded != resolved.weights_sha256:
            raise ModelLoadError(
                f"rerank.cross_encoder: the weights in {resolved.location} are not the ones its sieve_model.json "
                f"describes (weights hash {resolved.weights_sha256}, the card records {recorded}): the card's head "
                "and scale would score with the wrong model (a copy or save that did not finish?); retrain, or "
                "restore the directory"
            )
        with quiet_transformers():
            if self.head == SEGMENT_COSINE:
                self._load_segment_cosine()
            else:
                self._load_flag_reranker()
        if not getattr(self.tokenizer, "is_fast", False):
            raise ModelLoadError(
                f"rerank.cross_encoder: the tokenizer of '{name}' is not a fast tokenizer (no tokenizer.json); "
                "Sieve needs one to record exactly what it truncates"
            )
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None) or DEFAULT_SEQUENCE_CLASSIFICATION_MAX_LENGTH
        position_limit = getattr(self.model.config, "max_position_embeddings", None) or tokenizer_limit
        if self.head == SEQUENCE_CLASSIFICATION and getattr(self.model.config, "model_type", "") in ("xlm-roberta", "roberta"):
            position_limit -= 2  # RoBERTa-style positions start after the padding index
        self.model_limit = int(min(tokenizer_limit, position_limit))
        default_length = (card or {}).get("max_length") or DEFAULT_SEQUENCE_CLASSIFICATION_MAX_LENGTH
        self.max_length = int(min(max_length if max_length is not None else default_length, self.model_limit))
        self.max_length_requested = max_length
        if resolved.weights_sha256 is not None:
            self.weights_sha256 = resolved.weights_sha256
        else:
            self.weights_sha256 = _hub_weights_hash(resolved.location)
        local = resolved.location if Path(resolved.location).is_dir() else None
        self.tokenizer_sha256 = tokenizer_hash(local)
        self.files = ModelFiles(local, f"cross-encoder '{resolved.name}'")
        self.key = f"{self.weights_sha256 or resolved.location}:{self.tokenizer_sha256}:{self.head}:{self.scale}"
        self.lock = threading.Lock()

    def _load_segment_cosine(self) -> None:
        torch = self.torch
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise MissingDependencyError("transformers", "transformers", "the cross-encoder reranker") from None
        location = self.resolved.location
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location)
            # float32 explicitly: the weights are stored as fp16 and "auto" would keep them so on CPU.
            try:
                self.model = AutoModel.from_pretrained(location, dtype=torch.float32, add_pooling_layer=False)
            except TypeError:  # an architecture without a pooler option
                self.model = AutoModel.from_pretrained(location, dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - any library failure becomes a located ModelLoadError
            raise ModelLoadError(
                f"rerank.cross_encoder: cannot load the segment_cosine model at {location}: {load_failure(location, exc)}"
            ) from None
        check_vocabulary(self.tokenizer, self.model, "rerank.cross_encoder", location)
        self._place()

    def _load_flag_reranker(self) -> None:
        try:
            from FlagEmbedding import FlagReranker
        except ImportError:
            raise MissingDependencyError("FlagEmbedding", "FlagEmbedding", "the cross-encoder reranker") from None
        location = self.resolved.location
        keys = _checkpoint_keys(Path(location)) if self.resolved.source != "hub" else None
        if keys is not None and not any(part in ("classifier", "score") for key in keys for part in key.split(".")[:2]):
            raise ModelLoadError(
                f"rerank.cross_encoder: '{self.resolved.name}' ({location}) has no trained classification head in its "
                "checkpoint (no classifier weights): transformers would add a random one and the scores would mean "
                "nothing. Is it an encoder rather than a cross-encoder? (A Sieve-trained model carries sieve_model.json.)"
            )
        try:
            reranker = FlagReranker(location, use_fp16=self.precision == "fp16", devices=[self.device])
        except Exception as exc:  # noqa: BLE001 - any library failure becomes a located ModelLoadError
            raise ModelLoadError(
                f"rerank.cross_encoder: FlagReranker cannot load '{self.resolved.name}' from {location}: "
                f"{load_failure(location, exc)}"
            ) from None
        num_labels = getattr(reranker.model.config, "num_labels", 1)
        if num_labels != 1:
            raise ModelLoadError(
                f"rerank.cross_encoder: '{self.resolved.name}' has {num_labels} output labels; a reranker has 1 "
                "(is it a classifier rather than a cross-encoder?)"
            )
        self.flag_reranker = reranker
        self.tokenizer = reranker.tokenizer
        self.model = reranker.model
        check_vocabulary(self.tokenizer, self.model, "rerank.cross_encoder", location)
        self._place()

    def _place(self) -> None:
        torch = self.torch
        try:
            self.model.to(self.device)
            if self.precision == "fp16":
                self.model.half()
            else:  # fp32, and bf16 (autocast over fp32 weights: weights stored as fp16 must not stay fp16)
                self.model.float()
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            raise ModelLoadError(f"rerank.cross_encoder: cannot move the model to {self.device}: {exc}") from None
        self.model.eval()

    def identity(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "model": self.resolved.name,
            "source": self.resolved.source,
            "location": self.resolved.location,
            "weights_sha256": self.weights_sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "kind": self.head,
            "architecture": (getattr(config, "architectures", None) or [type(self.model).__name__])[0],
            "device": self.device,
            "precision": self.precision,
            # on a CPU, bf16 scores can differ in their last digits with torch's thread count: replay names it
            **({"threads": self.torch.get_num_threads()} if self.device == "cpu" else {}),
            "max_length": self.max_length,
            **({"scale": self.scale} if self.head == SEGMENT_COSINE else {}),
        }

    def formula(self) -> str:
        if self.head == SEGMENT_COSINE:
            return (f"{self.scale:g} x cos(mean of query-segment token states, mean of document-segment token "
                    f"states) of the jointly encoded pair (at most {self.max_length} tokens)")
        return f"sequence-classification logit of the jointly encoded pair (at most {self.max_length} tokens)"

    def _autocast(self):  # type: ignore[no-untyped-def]
        import contextlib

        if self.precision == "bf16":
            return self.torch.autocast(device_type=self.device, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def score_encoded(self, encoded: Sequence[EncodedPair], batch_size: int) -> list[float]:
        """Scores in input order: length-sorted batches, padded to each batch's longest pair."""
        torch = self.torch
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
        scores = [0.0] * len(encoded)
        with_segments = self.head == SEGMENT_COSINE
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        pinned = self.device != "cpu"
        outputs = []
        batches = [[encoded[i] for i in order[start : start + batch_size]]
                   for start in range(0, len(order), batch_size)]
        cost = [len(members) * max(len(m) for m in members) for members in batches]  # tokens after padding
        rest = sum(cost)  # the cost of the batches not yet run
        torch_fork_guard(torch)
        with torch.inference_mode(), self._autocast():
            for members, cells in zip(batches, cost):
                # under a query deadline (executor.deadline_ms): stop between batches, and do not go on when the
                # rest is expected to end past it (a CPU forward pass cannot be interrupted, and the scores of an
                # unfinished window are discarded: better to stop before spending the budget)
                expected = rest * self._seconds_per_cell if self._seconds_per_cell is not None else 0.0
                rest -= cells
                try:
                    check_deadline(expected)
                except DeadlineExceeded:
                    if expected and self._seconds_per_cell is not None:
                        self._seconds_per_cell *= 0.9  # an estimate that cuts every query must not stick forever
                    raise
                began = time.perf_counter()
                batch = collate(members, pad_id, with_segments)
                if pinned:
                    batch = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
                outputs.append(forward_scores(self.model, batch, self.head, self.scale).float())
                if not pinned:  # on a GPU the call returns before the work is done: no estimate from it
                    measured = (time.perf_counter() - began) / cells
                    self._timed_batches += 1
                    if self._timed_batches > 1:
                        previous = self._seconds_per_cell
                        self._seconds_per_cell = measured if previous is None else 0.7 * previous + 0.3 * measured
            # One copy back at the end: no synchronisation per batch, so on a GPU the next batch is
            # collated while the previous one runs.
            values = torch.cat(outputs).cpu().tolist()
        for i, value in zip(order, values):
            scores[i] = value
        return scores

    def warm(self) -> None:
        """One forward pass on a dummy pair, once per loaded model: a process's first pass is several times slower
        (lazy initialisation in torch), and it is paid at warm-up instead of by the first query (and its deadline)."""
        with self.lock:
            if self._warmed:
                return
            self.score("warm up", ["warm up"], batch_size=1, max_query_tokens=8, chunk_overlap=None, max_chunks=1,
                       oom_backoff=False, events=[])
            self._warmed = True

    def score(
        self,
        query: str,
        documents: Sequence[str],
        *,
        batch_size: int,
        max_query_tokens: int,
        chunk_overlap: int | None,
        max_chunks: int,
        oom_backoff: bool,
        events: list[dict[str, Any]],
    ) -> list[PairScore]:
        """Score ``documents`` against ``query``; returns one record per document, in order."""
        if not documents:
            return []
        torch = self.torch
        groups = encode_pairs(
            self.tokenizer, [query] * len(documents), list(documents), self.max_length,
            max_query_tokens=max_query_tokens, chunk_overlap=chunk_overlap, max_chunks=max_chunks,
        )
        flat = [pair for group in groups for pair in group]
        size = batch_size
        while True:
            try:
                values = self.score_encoded(flat, size)
                break
            except DeadlineExceeded:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised with context
                out_of_memory = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
                if out_of_memory and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if out_of_memory and oom_backoff and size > 1:
                    events.append({"event": "oom_backoff", "batch_size": size, "retry_with": size // 2})
                    size //= 2
                    continue
                if out_of_memory:
                    raise SieveError(
                        f"out of memory scoring {len(flat)} pairs at batch_size {size} on {self.device}; "
                        "lower batch_size or window, or set oom_backoff: true"
                    ) from exc
                raise SieveError(f"cross-encoder inference failed on {self.device}: {type(exc).__name__}: {exc}") from exc
        results: list[PairScore] = []
        position = 0
        for group in groups:
            group_scores = values[position : position + len(group)]
            position += len(group)
            best = max(range(len(group)), key=lambda i: (group_scores[i], -i))
            first = group[0]
            results.append(PairScore(
                score=group_scores[best],
                document_tokens=first.document_tokens,
                document_cut=group[-1].document_cut,
                query_cut=first.query_cut,
                chunks=len(group),
                best_chunk=group[best].chunk,
                best_chunk_start=group[best].chunk_start,
            ))
        return results


def _hub_weights_hash(hub_id: str) -> str | None:
    """After a hub download: the sha256 of the cached snapshot's weights (None if not found)."""
    try:
        from huggingface_hub import try_to_load_from_cache


        config_path = try_to_load_from_cache(hub_id, "config.json")
        if isinstance(config_path, str):
            return weights_hash(Path(config_path).parent)
    except Exception:  # noqa: BLE001 - identity is best effort; the trace then shows None
        return None
    return None


# --------------------------------------------------------------------------- the stage


@register_stage
class CrossEncoderRerank(Stage):
    """Rescore the top ``window`` candidates with a cross-encoder; the rest keep their order below."""

    type_name = "rerank.cross_encoder"
    version = 1
    Params = CrossEncoderParams
    produces = Port.CANDIDATES
    accepts = frozenset({Port.CANDIDATES})
    min_candidate_inputs = 1
    max_candidate_inputs = 1
    signal = "rerank"
    summary = "cross-encoder rerank of the top candidates (FlagReranker models or Sieve segment_cosine)"
    params: CrossEncoderParams

    def __init__(self, stage_id: str, params: StageParams):
        super().__init__(stage_id, params)
        self._model: LoadedReranker | None = None
        self._light: LoadedReranker | None = None
        # a window's scores keyed by (model variant, query text, the window's document contents): a score depends
        # in its last digits on the batch it was computed in (padding), so only the same window is served from
        # the cache, and a cached answer is exactly what a fresh run (a replay) computes
        self._cache: LRUCache[tuple[str, str, str], dict[str, PairScore]] = LRUCache(
            max(1, self.params.cache_size // self.params.window) if self.params.cache_size else 0, per_asker=True)
        self._notes = RecentNotes()  # query text -> doc_id -> note

    # ------------------------------------------------------------------ compile time

    @classmethod
    def check_graph(cls, node: StageNode, graph: GraphView) -> Sequence[GraphIssue]:
        """Warn when a select.top_k downstream has k larger than the window (unreranked results), and when the
        window is larger than what the stage can receive (a wider window then changes nothing)."""
        params = node.params
        assert isinstance(params, CrossEncoderParams)
        issues = []
        for path, name in ((("params", "model"), params.model),
                           (("params", "cascade", "light_model"), params.cascade.light_model if params.cascade else None)):
            missing = missing_model_path(name, graph.base_dir) if name is not None else None
            if missing is not None:
                issues.append(GraphIssue(missing, path, "warning"))
        if params.model is None and not (REPO_ROOT / DEFAULT_MODEL_DIR).is_dir():
            issues.append(GraphIssue(f"{_NO_SHIPPED_MODEL}: the stage will fail to load", ("params",), "warning"))
        issues.extend(unrunnable_here(params.device, params.precision, "rerank.cross_encoder"))
        unused = [(f, "applies only with long_documents: chunks") for f in ("chunk_overlap", "max_chunks")
                  if f in params.model_fields_set and params.long_documents == "truncate"]
        if params.cascade is not None and params.cascade.light_model is None and \
                "light_batch_size" in params.cascade.model_fields_set:
            unused.append(("cascade.light_batch_size", "applies only with a cascade.light_model"))
        for name, why in unused:  # accepted and silently ignored, an analyst expects it to do something
            issues.append(GraphIssue(f"{name} is set but not used: it {why}", ("params", *name.split(".")), "warning"))
        bounds = [graph.most_candidates(i) for i in node.inputs]
        received = sum(bounds) if None not in bounds else None  # type: ignore[arg-type]
        if received is not None and params.window > received:
            issues.append(GraphIssue(
                f"window={params.window}, but the stages before this one pass on at most {received} candidates: it "
                f"reranks {received}, and any window from {received} up gives the same ranking (to rerank more, "
                "raise top_k upstream)",
                ("params", "window"),
                "warning",
            ))
        for other in graph.nodes():
            if other.cls.type_name != "select.top_k" or node.id not in {a.id for a in graph.ancestors(other.id)}:
                continue
            k = getattr(other.params, "k", None)
            if k is None or k <= params.window:
                continue
            # A warning, not an error: ranks below the window keep their input order by design
            # (cheap deep lists), but it is rarely what an analyst means.
            only_this = _fed_only_by(graph, other.id, node.id)
            consequence = (f"ranks {params.window + 1}-{k} keep their input order, unreranked" if only_this
                           else "results beyond the window may be unreranked")
            issues.append(GraphIssue(
                f"select.top_k '{other.id}' returns k={k} results but this stage reranks only window="
                f"{params.window}; {consequence} (raise window to at least {k})",
                ("params", "window"),
                "warning",
            ))
        return issues

    # ------------------------------------------------------------------ warm-up

    def _model_name(self) -> str:
        """Where the model is loaded from: the config's `model:`, else the shipped model's directory."""
        return self.params.model if self.params.model is not None else str(REPO_ROOT / DEFAULT_MODEL_DIR)

    def _shown_name(self) -> str:
        """The model as traces and explanations name it: the config's `model:`, else the shipped model by name."""
        return self.params.model if self.params.model is not None else SHIPPED_MODEL_NAME

    def warm_up(self, resources: Resources) -> None:
        self._index = resources.require_index(self.id)
        params = self.params
        name = self._model_name()
        base_dir = resources.base_dir
        if params.model is None and not (REPO_ROOT / DEFAULT_MODEL_DIR).is_dir():
            raise ModelLoadError(f"stage '{self.id}': {_NO_SHIPPED_MODEL}")

        def load(model_name: str, shown_as: str | None = None) -> LoadedReranker:
            return LoadedReranker(model_name, base_dir, params.device, params.precision, params.max_length, shown_as)

        # the name traces give it is part of the key: a config naming the shipped directory by its path is recorded so
        key = (f"cross_encoder:{name}:{self._shown_name()}:{base_dir}:{params.device}:{params.precision}:"
               f"{params.max_length}")
        self._model = resources.shared(key, lambda: load(name, self._shown_name()))
        self._model.warm()
        if params.long_documents == "chunks" and params.chunk_overlap >= self._model.max_length // 2:
            raise ModelLoadError(
                f"stage '{self.id}': chunk_overlap {params.chunk_overlap} must be less than half of the "
                f"model's max_length {self._model.max_length}"
            )
        if params.cascade is not None and params.cascade.light_model is not None:
            light = params.cascade.light_model
            light_key = f"cross_encoder:{light}:{base_dir}:{params.device}:{params.precision}:{params.max_length}"
            try:
                self._light = resources.shared(light_key, lambda: load(light))
            except ModelLoadError as exc:  # say it is the cascade's light model, not the main one
                raise ModelLoadError(f"cascade.light_model: {exc}") from exc
            self._light.warm()

    # ------------------------------------------------------------------ running

    def _query_tokens(self, model: LoadedReranker) -> tuple[int, str]:
        """``max_query_tokens`` for ``model`` and where it comes from: the config, else the model card, else the
        default."""
        if self.params.max_query_tokens is not None:
            return self.params.max_query_tokens, "config"
        return model.max_query_tokens, model.max_query_tokens_from

    def _score_with(
        self,
        model: LoadedReranker,
        query_text: str,
        items: list[tuple[Candidate, str, str]],
        batch_size: int,
        hits: list[str],
        events: list[dict[str, Any]],
    ) -> dict[str, PairScore]:
        """Scores by doc_id, from the cache where possible."""
        params = self.params
        chunking = params.long_documents == "chunks"
        max_query_tokens, _ = self._query_tokens(model)
        variant = f"{model.key}:{model.max_length}:{max_query_tokens}:" + (
            f"chunks{params.chunk_overlap}x{params.max_chunks}" if chunking else "truncate"
        )
        window = hashlib.sha256("\x00".join([str(batch_size), *(digest for _, _, digest in items)]).encode()).hexdigest()
        cached = self._cache.get((variant, query_text, window))
        if cached is not None:
            hits.extend(candidate.doc_id for candidate, _, _ in items)
            return {candidate.doc_id: cached[digest] for candidate, _, digest in items}
        found: dict[str, PairScore] = {}
        if items:
            remaining = deadline_remaining()  # under a query deadline, wait for the model no longer than it allows
            if not (model.lock.acquire() if remaining is None else model.lock.acquire(timeout=max(remaining, 0.0))):
                raise DeadlineExceeded("waiting for the model, which other queries held, ran past the deadline")
            try:
                scored = model.score(
                    query_text, [text for _, text, _ in items], batch_size=batch_size,
                    max_query_tokens=max_query_tokens,
                    chunk_overlap=params.chunk_overlap if chunking else None,
                    max_chunks=params.max_chunks, oom_backoff=params.oom_backoff, events=events,
                )
            finally:
                model.lock.release()
            by_digest = {}
            for (candidate, _, digest), result in zip(items, scored):
                found[candidate.doc_id] = result
                by_digest[digest] = result
            self._cache.put((variant, query_text, window), by_digest)
        return found

    def run(self, ctx: StageContext) -> StageResult:
        if self._model is None:
            raise SieveError(f"stage '{self.id}' was not warmed up")
        params = self.params
        (incoming,) = ctx.inputs
        query_text = ctx.query.text if params.query == "original" else ctx.query.effective_text
        window = incoming[: params.window]
        rest = incoming[params.window :]
        # a model replaced under a long-running process (the cascade's light one too): said, not loaded
        decisions: list[Decision] = [changed for changed in (
            self._model.files.changed(), self._light.files.changed() if self._light is not None else None)
            if changed is not None]
        details: dict[str, Any] = {"window": params.window, "input": len(incoming)}
        if not window:
            decisions.append(Decision("empty_input", "no candidates to rerank"))
            return StageResult(candidates=[], decisions=decisions, details=details)

        began = time.perf_counter()
        documents = self._index.documents.get([c.row for c in window])
        items = []
        empty = []
        for candidate in window:
            text = documents[candidate.row].content(params.fields)
            if not text.strip():
                empty.append(candidate.doc_id)
            items.append((candidate, text, hashlib.sha256(text.encode("utf-8")).hexdigest()))
        if empty:
            decisions.append(Decision(
                "empty_document", f"{len(empty)} documents have no text in fields {list(params.fields)}; "
                "scored with an empty document", {"doc_ids": empty},
            ))
        fetched_ms = (time.perf_counter() - began) * 1000.0

        full_items, light_items = items, []
        if params.cascade is not None:
            full_items, light_items = items[: params.cascade.full_top], items[params.cascade.full_top :]
        hits: list[str] = []
        events: list[dict[str, Any]] = []
        began = time.perf_counter()
        full = self._score_with(self._model, query_text, full_items, params.batch_size, hits, events)
        full_ms = (time.perf_counter() - began) * 1000.0
        timings = {"fetch_documents": fetched_ms, "full_model": full_ms}

        light: dict[str, PairScore] = {}
        light_offset = 0.0
        unscored: list[Candidate] = []
        if light_items:
            if self._light is None:
                unscored = [c for c, _, _ in light_items]
            else:
                began = time.perf_counter()
                light = self._score_with(
                    self._light, query_text, light_items, params.cascade.light_batch_size, hits, events  # type: ignore[union-attr]
                )
                timings["light_model"] = (time.perf_counter() - began) * 1000.0
                # Keep the light tier strictly below the full tier: shift it, record the shift.
                lowest_full = min(s.score for s in full.values())
                highest_light = max(s.score for s in light.values())
                if highest_light >= lowest_full:
                    light_offset = lowest_full - highest_light - 1.0

        ranked_full = sorted(full_items, key=lambda it: (-full[it[0].doc_id].score, it[0].doc_id))
        ranked_light = sorted(light_items, key=lambda it: (-light[it[0].doc_id].score, it[0].doc_id)) if light else []
        output: list[Candidate] = []
        for tier, ranked_items, scores, offset in (("full", ranked_full, full, 0.0), ("light", ranked_light, light, light_offset)):
            for candidate, _, _ in ranked_items:
                value = scores[candidate.doc_id].score + offset
                output.append(candidate.with_score(ScoreEntry(self.id, "rerank", float(value), len(output) + 1)))
        output.extend(unscored)
        output.extend(rest)

        scored_all = {**full, **light}
        characters = {candidate.doc_id: len(text) for candidate, text, _ in items}
        # Token counts are lower bounds: of a long document only a prefix long enough for what is kept is tokenised.
        truncated = [
            {"doc_id": doc_id, "document_chars": characters[doc_id], "document_tokens_at_least": s.document_tokens,
             "cut_tokens_at_least": s.document_cut}
            for doc_id, s in scored_all.items() if s.document_cut > 0
        ]
        query_cut = max((s.query_cut for s in scored_all.values()), default=0)
        max_query_tokens, max_query_tokens_from = self._query_tokens(self._model)
        details.update({
            "reranked": len(scored_all),
            "passed_through": len(unscored) + len(rest),
            "max_length": self._model.max_length,
            "max_query_tokens": max_query_tokens,
            "max_query_tokens_from": max_query_tokens_from,
            "truncated": {"count": len(truncated), "documents": sorted(truncated, key=lambda t: t["doc_id"])},
            # (not how many windows the cache holds: that counts other users' questions)
            "cache": {"hits": len(hits), "misses": len(scored_all) - len(hits), "hit_doc_ids": sorted(hits)},
        })
        if query_cut:
            details["query_tokens_cut"] = query_cut
            decisions.append(Decision("query_truncated", f"the query was cut by {query_cut} tokens to "
                                      f"max_query_tokens={max_query_tokens} ({max_query_tokens_from})"))
        if truncated:
            # The pair overflows, not necessarily the document: one shorter than max_length is cut when the query
            # and the special tokens leave it less room.
            how = (f"cut beyond their last chunk to fit {params.max_chunks} chunks of"
                   if params.long_documents == "chunks" else "cut at their end to fit")
            decisions.append(Decision(
                "documents_truncated",
                f"{len(truncated)} of {len(scored_all)} documents {how} max_length {self._model.max_length} "
                "with the query",
            ))
        if params.long_documents == "chunks":
            details["chunked"] = sorted(
                ({"doc_id": d, "chunks": s.chunks, "best_chunk": s.best_chunk, "best_chunk_start_token": s.best_chunk_start}
                 for d, s in scored_all.items() if s.chunks > 1),
                key=lambda c: c["doc_id"],
            )
        if params.cascade is not None:
            details["cascade"] = {
                "full_top": params.cascade.full_top,
                "full_scored": len(full),
                "light_model": self._light.resolved.name if self._light is not None else None,
                "light_scored": len(light),
                **({"light_max_query_tokens": self._query_tokens(self._light)[0]} if self._light is not None else {}),
                "light_offset": light_offset,
                "unscored": [c.doc_id for c in unscored],
            }
        if events:
            details["oom_events"] = events
            decisions.append(Decision("oom_backoff", f"batch size halved {len(events)} time(s) after out-of-memory",
                                      {"events": events}))
        self._remember(query_text, full, light, light_offset, hits)
        return StageResult(candidates=output, decisions=decisions, details=details, timings_ms=timings)

    def _remember(self, query_text: str, full: dict[str, PairScore], light: dict[str, PairScore],
                  light_offset: float, hits: list[str]) -> None:
        """Per-document notes for ``explain`` (which model, cut tokens, chunk), for recent queries."""
        hit_set = set(hits)
        notes = {}
        for tier, scores in (("full", full), ("light", light)):
            for doc_id, s in scores.items():
                notes[doc_id] = {"tier": tier, "raw": s.score, "offset": light_offset if tier == "light" else 0.0,
                                 "cut": s.document_cut, "tokens": s.document_tokens, "chunks": s.chunks,
                                 "best_chunk": s.best_chunk, "chunk_start": s.best_chunk_start,
                                 "cached": doc_id in hit_set}
        self._notes.put(query_text, notes)

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        assert self._model is not None
        query_text = query.text if self.params.query == "original" else query.effective_text
        note = (self._notes.get(query_text) or {}).get(candidate.doc_id)
        model = self._model
        if note is not None and note["tier"] == "light" and self._light is not None:
            model = self._light
        description = (f"cross-encoder {model.resolved.name} ({model.head}): {model.formula()}; "
                       f"rank {rank} in stage '{self.id}'")
        if note is None:
            return Explanation(value, description)
        details = []
        if note["tier"] == "light":
            details.append(Explanation(note["raw"], "light-model score (cascade: below the full model's top "
                                       f"{self.params.cascade.full_top if self.params.cascade else '?'})"))
            if note["offset"]:
                details.append(Explanation(note["offset"], "shift keeping the light tier below the full tier"))
        if note["cut"]:
            details.append(Explanation(float(note["cut"]), (
                f"document tokens not seen, at least (the document has at least {note['tokens']}; cut to fit "
                f"max_length {model.max_length} with the query)")))
        if note["chunks"] > 1:
            details.append(Explanation(float(note["best_chunk"]),
                                       f"best of {note['chunks']} chunks (max over chunks), starting at document "
                                       f"token {note['chunk_start']}"))
        return Explanation(value, description, tuple(details))  # served from the cache or not: the same tree

    def identity(self) -> dict[str, Any] | None:
        if self._model is None:
            return {"model": self._shown_name(), "loaded": False}
        identity = self._model.identity()
        if self._light is not None:
            identity["cascade_light"] = self._light.identity()
        return identity


def _fed_only_by(graph: GraphView, stage_id: str, source_id: str) -> bool:
    """True when ``stage_id``'s candidates come from ``source_id`` through single-input stages only."""
    current = graph.node(stage_id)
    while True:
        candidate_inputs = [i for i in current.inputs if graph.node(i).cls.produces is Port.CANDIDATES]
        if len(candidate_inputs) != 1:
            return False
        if candidate_inputs[0] == source_id:
            return True
        current = graph.node(candidate_inputs[0])
