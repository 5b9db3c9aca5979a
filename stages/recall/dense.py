"""Dense recall with faiss: the ``dense`` index component and the ``recall.dense`` stage.

Documents are embedded by a bi-encoder (default ``sentence-transformers/all-MiniLM-L6-v2``, mean
pooling, no query instruction; see :mod:`stages.embedding`), L2-normalised, and stored in faiss:
an exact ``IndexFlatIP`` up to ``hnsw_above`` documents, an HNSW graph above that. The manifest
records the model (name, source, weights sha256), pooling, lengths, dimension and index type.
Documents with the same text share one embedding, bit for bit, so they tie and rank by doc_id.

The stage embeds the query with the same model (a different one is refused: the vectors would
live in another space), searches with the prefilter mask *inside* faiss (an ``IDSelectorBitmap``),
so a masked document never takes a slot, and breaks score ties on doc_id. torch, FlagEmbedding
and faiss are imported in ``build``/``warm_up`` only.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field, model_validator

from engine.errors import MissingDependencyError, ModelLoadError, SieveIndexError
from engine.index import BuildCacheSection, ComponentSettings, Document, IndexComponent, Progress
from engine.model import Candidate, Decision, Query, ScoreEntry
from engine.models import ResolvedModel, missing_model_path, resolve_model
from engine.registry import register_index_component, register_stage
from engine.stage import (Explanation, GraphIssue, GraphView, Port, Resources, Stage, StageContext, StageNode, StageParams,
                          StageResult)
from stages.embedding import (
    CORPUS_BATCHING,
    DEFAULT_EMBEDDING_MODEL,
    Device,
    Embedder,
    Pooling,
    Precision,
    device_and_precision,
    fp16_on_cpu,
    load_embedder,
    unrunnable_here,
)

VECTORS_FILE = "vectors.faiss"
TOKENS_FILE = "token_counts.npy"
META_FILE = "dense.json"
FLAT = "IndexFlatIP"
HNSW = "IndexHNSWFlat"
ADD_CHUNK = 10_000


def _faiss():  # type: ignore[no-untyped-def]
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError("faiss", "faiss-cpu", "dense recall") from None
    return faiss


class DenseIndexSettings(ComponentSettings):
    model: str = Field(DEFAULT_EMBEDDING_MODEL, description="embedding model: path, packaged name or hub id")
    pooling: Pooling = Field(
        "auto", description="auto: what the model declares (sentence-transformers 1_Pooling); cls or mean"
    )
    query_instruction: str | None = Field(
        None, description="prefix for queries, e.g. bge-en-v1.5's 'Represent this sentence for searching relevant passages: '"
    )
    max_length: int | None = Field(
        None, ge=8, le=32_768, description="document tokens embedded; None: the model's declared max_seq_length"
    )
    query_max_length: int | None = Field(None, ge=4, le=32_768, description="query tokens; None: max_length")
    batch_size: int = Field(
        32, ge=1, le=4096, description="most texts per forward pass (32 suits 2 CPU cores); a batch holds half to all "
        "of that, ending where its texts' content says, so that a rebuild can reuse a build cache's batches"
    )
    fields: tuple[str, ...] = Field(("title", "text"), min_length=1, description="document fields embedded, joined")
    device: Device = Field("auto", description="auto: CUDA when present, else CPU")
    precision: Precision = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    hnsw_above: int = Field(200_000, ge=0, description="exact IndexFlatIP up to this many documents, HNSW above")
    hnsw_m: int = Field(32, ge=4, le=512, description="HNSW neighbours per node (M)")
    hnsw_ef_construction: int = Field(200, ge=8, le=100_000, description="HNSW efConstruction")
    hnsw_ef_search: int = Field(128, ge=1, le=100_000, description="HNSW efSearch default (a stage may override)")

    @model_validator(mode="after")
    def _runnable(self) -> "DenseIndexSettings":
        fp16_on_cpu(self.device, self.precision)
        return self


def _resolve(name: str, base_dir: Path | None, purpose: str) -> ResolvedModel:
    return resolve_model(name, base_dir=base_dir, purpose=purpose)


@register_index_component
class DenseComponent(IndexComponent):
    """Every document's embedding by a bi-encoder, in a faiss index, which recall.dense searches and dedup reuses."""

    name = "dense"
    Settings = DenseIndexSettings
    uses_build_cache = True  # the embeddings, a batch per entry (see Embedder.embed_corpus)

    @classmethod
    def check_files(cls, settings: ComponentSettings) -> list[tuple[tuple[str, ...], str]]:
        """The model found (a directory with its files, a packaged copy, or the hub's cache when offline), not
        loaded: a wrong path is said before any component runs, not after an entities build."""
        assert isinstance(settings, DenseIndexSettings)
        try:
            _resolve(settings.model, Path.cwd(), "dense index model")
        except ModelLoadError as exc:
            return [(("model",), str(exc))]
        try:  # what this machine cannot run: said before BM25 and entities are built, not after
            device_and_precision(settings.device, settings.precision, "dense index model")
        except ModelLoadError as exc:
            return [(("precision" if "fp16" in str(exc) else "device",), str(exc))]
        return []

    def build(
        self, documents: Sequence[Document], out_dir: Path, settings: ComponentSettings, progress: Progress,
        cache: BuildCacheSection | None = None,
    ) -> dict[str, Any]:
        import numpy as np

        assert isinstance(settings, DenseIndexSettings)
        faiss = _faiss()
        resolved = _resolve(settings.model, Path.cwd(), "dense index model")
        embedder = load_embedder(resolved, pooling=settings.pooling, device=settings.device, precision=settings.precision)
        max_length = embedder.check_max_length(settings.max_length, "dense max_length")
        query_max_length = embedder.check_max_length(
            settings.query_max_length if settings.query_max_length is not None else max_length, "dense query_max_length"
        )
        texts = [doc.content(settings.fields) for doc in documents]
        vectors, full_tokens, kept_tokens, unknown_tokens = embedder.embed_corpus(
            texts,
            max_length=max_length,
            batch_size=settings.batch_size,
            progress=lambda n: progress("dense embed", n, len(texts)),
            cache=cache,
        )
        dimension = vectors.shape[1]
        count = len(documents)
        hnsw: dict[str, Any] | None = None
        if count > settings.hnsw_above:
            index = faiss.IndexHNSWFlat(dimension, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = settings.hnsw_ef_construction
            index.hnsw.efSearch = settings.hnsw_ef_search
            hnsw = {"m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction,
                    "ef_search": settings.hnsw_ef_search}
        else:
            index = faiss.IndexFlatIP(dimension)
        for start in range(0, count, ADD_CHUNK):
            block = vectors[start : start + ADD_CHUNK]
            index.add(block)
            progress("dense faiss add", len(block), count)
        try:
            faiss.write_index(index, str(out_dir / VECTORS_FILE))
        except RuntimeError as exc:  # faiss's C++ write error: a full disk, a file size limit
            reason = str(exc).rsplit("(", 1)[-1].rstrip(") \n") if "(" in str(exc) else str(exc)
            raise OSError(errno.EIO, f"writing {VECTORS_FILE} failed: {reason}") from exc
        token_counts = np.asarray(full_tokens, dtype=np.int32)
        np.save(out_dir / TOKENS_FILE, token_counts)
        truncated = sum(1 for full, kept in zip(full_tokens, kept_tokens) if full > kept)
        identity = embedder.identity()
        recorded = {
            "library": f"faiss {faiss.__version__}",
            "index_type": HNSW if hnsw is not None else FLAT,
            "metric": "inner_product",
            "dimension": int(dimension),
            "count": int(count),
            "hnsw": hnsw,
            "model": {
                "name": resolved.name,
                "source": resolved.source,
                "location": resolved.location,
                "weights_sha256": embedder.weights_sha256,
                "tokenizer_sha256": embedder.tokenizer_sha256,
                "architecture": identity["architecture"],
            },
            "pooling": embedder.pooling,
            "normalized": True,
            "batching": CORPUS_BATCHING,
            "query_instruction": settings.query_instruction,
            "max_length": max_length,
            "query_max_length": query_max_length,
            "fields": list(settings.fields),
            "device": embedder.device,
            "precision": embedder.precision,
            "truncated_documents": truncated,
            "max_document_tokens": int(token_counts.max()) if count else 0,
            "empty_documents": sum(1 for t in texts if not t.strip()),
            "duplicate_texts": len(texts) - len(set(texts)),  # repeats of an earlier text: they reuse its vector
            # the share of the embedded tokens the model does not know ([UNK]): text in a script or language it was
            # not trained on (Chinese for an English model) is embedded as next to nothing
            "unknown_token_share": round(sum(unknown_tokens) / max(1, sum(kept_tokens) - embedder.special_tokens
                                                                   * count), 4),
            # no timing here: the manifest is the same for the same corpus and settings (build.json has the time)
        }
        (out_dir / META_FILE).write_text(json.dumps(recorded, indent=2, sort_keys=True), encoding="utf-8")
        return recorded


_FAISS_READ_LOCK = threading.Lock()


def _read_faiss(path: Path) -> Any:
    """``faiss.read_index``, no array in it allowed more bytes than the file holds: faiss sizes each array by the
    length written before it and fills it before it finds the file short, so a 50 KB file declaring 2^31 floats
    took 9 GB (2^33: an out-of-memory kill). The limit is the process's, so it is set and put back under a lock."""
    faiss = _faiss()
    if not hasattr(faiss, "set_deserialization_vector_byte_limit"):  # an older faiss has no such limit: read as is
        return faiss.read_index(str(path))
    size = path.stat().st_size
    with _FAISS_READ_LOCK:
        previous = faiss.get_deserialization_vector_byte_limit()
        faiss.set_deserialization_vector_byte_limit(max(size, 1))
        try:
            return faiss.read_index(str(path))
        finally:
            faiss.set_deserialization_vector_byte_limit(previous)


class LoadedDenseIndex:
    """A faiss index plus per-document token counts, shared by every stage that searches it."""

    def __init__(self, directory: Path, entry: dict[str, Any]):
        import numpy as np

        try:
            self.index = _read_faiss(directory / VECTORS_FILE)
            self.token_counts = np.load(directory / TOKENS_FILE)
        except (OSError, RuntimeError, ValueError, MemoryError) as exc:
            raise SieveIndexError(f"dense component at {directory} cannot be loaded: "
                                  f"{exc or type(exc).__name__}") from None
        self.entry = entry
        self.kind = entry.get("index_type", FLAT)
        self.hnsw = self.kind == HNSW
        if self.hnsw:
            # Exact search over the same stored vectors, for masks too selective for the graph.
            self.exact = _faiss().downcast_index(self.index.storage)
        else:
            self.exact = self.index

    @property
    def count(self) -> int:
        return int(self.index.ntotal)


class DenseParams(StageParams):
    top_k: int = Field(100, ge=1, le=100_000, description="how many candidates to recall")
    query: Literal["effective", "original"] = Field(
        "effective", description="effective: the rewritten query when a rewrite ran; original: as asked"
    )
    component: str = Field("dense", description="which dense component of the index to search")
    model: str | None = Field(
        None, description="None: the model the index was built with; a name given here must be that same model"
    )
    device: Device = Field("auto", description="auto: CUDA when present, else CPU")
    precision: Precision = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    ef_search: int | None = Field(None, ge=1, le=100_000, description="HNSW efSearch; None: the index's setting")

    @model_validator(mode="after")
    def _runnable(self) -> "DenseParams":
        fp16_on_cpu(self.device, self.precision)
        return self


@register_stage
class DenseRecall(Stage):
    """Dense recall: the query's embedding against the index's vectors, honouring the prefilter mask."""

    type_name = "recall.dense"
    version = 1
    Params = DenseParams
    produces = Port.CANDIDATES
    accepts = frozenset({Port.QUERY, Port.MASK})
    min_candidate_inputs = 0
    max_candidate_inputs = 0
    signal = "dense"
    summary = "dense recall: bi-encoder embeddings searched with faiss"
    params: DenseParams

    def __init__(self, stage_id: str, params: StageParams):
        super().__init__(stage_id, params)
        self._embedder: Embedder | None = None
        self._dense: LoadedDenseIndex | None = None

    @classmethod
    def check_graph(cls, node: StageNode, graph: GraphView) -> list[GraphIssue]:
        params = node.params
        assert isinstance(params, DenseParams)
        missing = missing_model_path(params.model, graph.base_dir) if params.model is not None else None
        return ([GraphIssue(missing, ("params", "model"), "warning")] if missing is not None else []) + \
            unrunnable_here(params.device, params.precision, "recall.dense query model")

    # ------------------------------------------------------------------ warm-up

    def warm_up_warnings(self) -> list[str]:
        if self.params.ef_search is not None and self._dense is not None and self._dense.kind != HNSW:
            return [f"ef_search: {self.params.ef_search} is set, but the index's '{self.params.component}' component "
                    f"is a {self._dense.kind} index, searched exactly: ef_search applies only to an HNSW index "
                    "(an index of more than the dense setting hnsw_above documents, 200,000 by default)"]
        return []

    def warm_up(self, resources: Resources) -> None:
        index = resources.require_index(self.id)
        directory, entry = index.component(self.params.component, self.id)
        recorded = entry.get("model")
        if not isinstance(recorded, dict) or "name" not in recorded:
            raise SieveIndexError(f"index {index.path}: the '{self.params.component}' component records no model")
        purpose = "query model"  # the pipeline names the stage (stage 'id' (recall.dense@1): ...)
        if self.params.model is not None:
            resolved = _resolve(self.params.model, resources.base_dir, purpose)
        elif recorded.get("source") == "path" and Path(recorded.get("location", "")).is_dir():
            resolved = _resolve(recorded["location"], None, purpose)
            resolved = ResolvedModel(recorded["name"], resolved.location, resolved.source, resolved.weights_sha256)
        else:
            resolved = _resolve(recorded["name"], resources.base_dir, purpose)
        expected = recorded.get("weights_sha256")
        if resolved.weights_sha256 is not None and expected is not None and resolved.weights_sha256 != expected:
            raise self._mismatch(index.path, recorded, resolved, resolved.weights_sha256)
        pooling = entry.get("pooling", "auto")
        key = f"dense-model:{resolved.location}:{pooling}:{self.params.device}:{self.params.precision}"
        embedder: Embedder = resources.shared(
            key,
            lambda: load_embedder(resolved, pooling=pooling, device=self.params.device, precision=self.params.precision),
        )
        if expected is not None and embedder.weights_sha256 is not None and embedder.weights_sha256 != expected:
            raise self._mismatch(index.path, recorded, resolved, embedder.weights_sha256)
        tokenizer = recorded.get("tokenizer_sha256")  # recorded by indexes built since 0.11.0
        if tokenizer is not None and embedder.tokenizer_sha256 is not None and embedder.tokenizer_sha256 != tokenizer:
            raise ModelLoadError(
                f"stage '{self.id}': the index at {index.path} was embedded with '{recorded['name']}' whose tokenizer "
                f"and config (sha256 {tokenizer[:12]}) are not the ones at {resolved.location} now (sha256 "
                f"{embedder.tokenizer_sha256[:12]}), over the same weights: a query would be cut into other tokens "
                "than the documents were; restore the model's tokenizer files, or rebuild the index")
        self._dense = resources.shared(f"dense-index:{directory}", lambda: LoadedDenseIndex(directory, entry))
        if self._dense.count != index.doc_count:
            raise SieveIndexError(
                f"index {index.path}: the dense component has {self._dense.count} vectors but the document store "
                f"has {index.doc_count} documents; rebuild the index"
            )
        if embedder.dimension != self._dense.index.d:
            raise SieveIndexError(
                f"index {index.path}: vectors have dimension {self._dense.index.d} but '{resolved.name}' "
                f"embeds into {embedder.dimension}; rebuild the index"
            )
        self._embedder = embedder
        self._doc_ids = index.doc_ids()
        self._entry = entry
        self._query_max_length = int(entry.get("query_max_length") or embedder.default_max_length)
        self._instruction = entry.get("query_instruction")

    def _mismatch(self, path: Path, recorded: dict[str, Any], resolved: ResolvedModel, found: str) -> ModelLoadError:
        return ModelLoadError(
            f"stage '{self.id}': the index at {path} was embedded with '{recorded['name']}' (weights sha256 "
            f"{str(recorded.get('weights_sha256'))[:12]}), but '{resolved.name}' resolves to {resolved.location} "
            f"(weights sha256 {found[:12]}); query vectors would live in a different space. "
            + ("Drop `model:` from the stage (the index's own model is then used), or rebuild the index with this "
               "model" if self.params.model is not None else
               "Install or point to the model the index was built with, or rebuild the index with this one")
        )

    # ------------------------------------------------------------------ running

    def _query_text(self, query: Query) -> str:
        return query.text if self.params.query == "original" else query.effective_text

    def run(self, ctx: StageContext) -> StageResult:
        import numpy as np

        if self._embedder is None or self._dense is None:
            raise SieveIndexError(f"stage '{self.id}' was not warmed up")
        faiss = _faiss()
        dense = self._dense
        doc_ids = self._doc_ids
        corpus_size = dense.count
        changed = self._embedder.files.changed()  # a model replaced under a long-running process: said, not loaded
        decisions: list[Decision] = [changed] if changed is not None else []
        details: dict[str, Any] = {"index_type": dense.kind}

        began = time.perf_counter()
        vector, query_tokens, kept_tokens, unknown = self._embedder.embed_query(
            self._query_text(ctx.query), instruction=self._instruction, max_length=self._query_max_length
        )
        embed_ms = (time.perf_counter() - began) * 1000.0
        details["query_tokens"] = query_tokens
        words = kept_tokens - self._embedder.special_tokens
        if unknown and unknown * 2 >= words:
            details["unknown_query_tokens"] = unknown
            decisions.append(Decision(
                "unknown_query_tokens",
                f"{unknown} of the query's {words} tokens are unknown to the embedding model (a script or language "
                "it was not trained on, e.g. Chinese for an English model): its dense similarities say little",
            ))
        if query_tokens > kept_tokens:
            decisions.append(Decision(
                "query_truncated",
                f"the query has {query_tokens} tokens; the first {kept_tokens} were embedded (query_max_length)",
            ))

        k = self.params.top_k
        if k > corpus_size:
            decisions.append(Decision("k_clamped", f"top_k {k} exceeds the corpus size {corpus_size}; using {corpus_size}"))
            k = corpus_size
        bitmap = None
        allowed_count = corpus_size
        if ctx.mask is not None:
            allowed = np.asarray(ctx.mask.allowed, dtype=bool)
            if allowed.shape != (corpus_size,):
                raise SieveIndexError(
                    f"stage '{self.id}': the document mask covers {allowed.size} rows but the index has {corpus_size}"
                )
            allowed_count = int(allowed.sum())
            details["masked_out"] = corpus_size - allowed_count
            bitmap = np.packbits(allowed, bitorder="little")
        if allowed_count == 0:
            decisions.append(Decision("all_masked", "the prefilter mask allows no document; nothing recalled"))
            return StageResult(candidates=[], decisions=decisions, details=details, timings_ms={"embed_query": embed_ms})
        if allowed_count < k:
            decisions.append(Decision(
                "fewer_allowed", f"only {allowed_count} documents pass the prefilter mask (top_k {k})"
            ))
            k = allowed_count

        began = time.perf_counter()
        query_matrix = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        rows, scores, searched = self._search(faiss, dense, query_matrix, k, allowed_count, bitmap, exact=False)
        if dense.hnsw and len(rows) < k:
            # The graph walk under a selective mask can run out of reachable allowed nodes: search
            # the same vectors exactly rather than return fewer than the mask allows.
            decisions.append(Decision(
                "hnsw_exact_fallback",
                f"HNSW returned {len(rows)} of {k} allowed documents under the mask; searched exactly instead",
            ))
            rows, scores, searched = self._search(faiss, dense, query_matrix, k, allowed_count, bitmap, exact=True)
        search_ms = (time.perf_counter() - began) * 1000.0
        details["searched_k"] = searched

        order = sorted(range(len(rows)), key=lambda i: (-scores[i], doc_ids[rows[i]]))[:k]
        candidates = [
            Candidate(doc_ids[rows[i]], rows[i], (ScoreEntry(self.id, "dense", scores[i], rank),))
            for rank, i in enumerate(order, start=1)
        ]
        return StageResult(
            candidates=candidates,
            decisions=decisions,
            details=details,
            timings_ms={"embed_query": embed_ms, "faiss_search": search_ms},
        )

    def _search(
        self, faiss: Any, dense: LoadedDenseIndex, query: Any, k: int, allowed_count: int, bitmap: Any, exact: bool
    ) -> tuple[list[int], list[float], int]:
        """Rows and scores of the best ``k`` allowed documents, plus every document tied with the k-th.

        faiss orders equal scores by row; the stage orders them by doc_id, so the search widens
        until the last returned score is below the k-th (or every allowed document is in).
        """
        index = dense.exact if exact else dense.index
        selector = faiss.IDSelectorBitmap(bitmap) if bitmap is not None else None
        fetch = min(allowed_count, k + 8)
        while True:
            if dense.hnsw and not exact:
                ef = self.params.ef_search if self.params.ef_search is not None else (dense.entry.get("hnsw") or {}).get("ef_search", 128)
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(int(ef), fetch))
            else:
                params = faiss.SearchParameters(sel=selector) if selector is not None else None
            try:
                distances, labels = index.search(query, fetch, params=params)
            except RuntimeError as exc:
                raise SieveIndexError(f"stage '{self.id}': faiss search failed: {exc}") from None
            found = [(int(row), float(score)) for row, score in zip(labels[0], distances[0]) if row >= 0]
            if len(found) < k or fetch >= allowed_count or found[-1][1] < found[k - 1][1]:
                break
            fetch = min(allowed_count, fetch * 2)
        return [r for r, _ in found], [s for _, s in found], fetch

    # ------------------------------------------------------------------ explanation and identity

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        entry = self._entry if self._dense is not None else {}
        model = entry.get("model", {})
        if entry.get("index_type") == HNSW:
            hnsw = entry.get("hnsw") or {}
            ef = self.params.ef_search if self.params.ef_search is not None else hnsw.get("ef_search")
            search = f"approximate search (faiss HNSW, M={hnsw.get('m')}, efSearch={ef})"
        else:
            search = f"exact search over {entry.get('count')} vectors (faiss IndexFlatIP)"
        instruction = " (query prefixed with the model's instruction)" if entry.get("query_instruction") else ""
        description = (
            f"cosine similarity cos(q, d) = q . d of L2-normalised {entry.get('pooling')}-pooled embeddings from "
            f"'{model.get('name')}' (weights sha256 {str(model.get('weights_sha256'))[:12]}){instruction}; "
            f"{search}; rank {rank} in stage '{self.id}'"
        )
        details = []
        if self._dense is not None:
            tokens = int(self._dense.token_counts[candidate.row])
            limit = int(entry.get("max_length") or 0)
            if limit and tokens > limit:
                details.append(Explanation(
                    float(limit), f"document tokens embedded: the first {limit} of {tokens} (truncated at max_length)"
                ))
        return Explanation(value, description, tuple(details))

    def identity(self) -> dict[str, Any] | None:
        if self._embedder is None:
            return {"model": self.params.model, "loaded": False}
        return {**self._embedder.identity(), "index_type": self._dense.kind if self._dense else None}
