"""Bi-encoder text embeddings: one loaded model per process, shared by the dense index and stages.

The model and tokenizer are loaded through FlagEmbedding's ``FlagModel`` (any Hugging Face
encoder: all-MiniLM-L6-v2, bge-small, bge-m3, a local directory), and its ``pooling`` defines
``cls`` and ``mean`` pooling. The batching loop is ours rather than ``FlagModel.encode``, because
that one retries a smaller batch after *any* RuntimeError (silently, and forever once the batch
reaches 0), runs its longest batch twice, prints tqdm bars, and truncates without telling anyone.
Here texts are tokenised once without truncation, so every cut is counted, then cut to
``max_length``, sorted by length, padded per batch and run under ``torch.inference_mode``;
vectors are L2-normalised, so an inner product is a cosine. A parity test checks the vectors
against ``FlagModel.encode_corpus`` and sentence-transformers. An index build embeds its corpus with
``embed_corpus``: batches cut by the texts' content (``corpus_batches``), each kept in the build cache
under the sha256 of the model's identity and the batch's token ids, so a resumed or incremental build
reuses exactly the vectors a fresh one would compute.

torch and FlagEmbedding are imported inside functions only (importing FlagEmbedding takes ~8 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from engine.cache import LRUCache
from engine.errors import MissingDependencyError, ModelLoadError, SieveError
from engine.index import content_defined_batches
from engine.stage import GraphIssue
from engine.models import (ModelFiles, ResolvedModel, check_vocabulary, load_failure, quiet_transformers,
                           tokenizer_hash, torch_fork_guard, weights_hash)

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
Pooling = Literal["auto", "cls", "mean"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
EMBED_CHUNK = 8192  # texts tokenised and length-sorted together when embedding a corpus
# How a corpus is cut into batches (recorded in the dense manifest; a new way gets a new name): see corpus_batches
CORPUS_BATCHING = "content-defined/1"
# The code running (read as it is imported): part of a build cache entry's key, so new code never reuses old entries
_CODE_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def input_digest(encoding: dict[str, list[int]]) -> bytes:
    """The sha256 of one text's model input (its token ids, and the other arrays the model is given)."""
    import numpy as np

    digest = hashlib.sha256()
    for key in sorted(encoding):
        digest.update(key.encode() + b"\0")
        digest.update(np.asarray(encoding[key], dtype="<i4").tobytes())
    return digest.digest()


def corpus_batches(kept_tokens: Sequence[int], digests: Sequence[bytes], batch_size: int) -> list[list[int]]:
    """The batches (positions into ``digests``) a corpus is embedded in, from the inputs alone (never from their rows).

    Inputs are ordered longest first (little padding), then by digest, and cut by :func:`content_defined_batches`.
    Its ends are content-defined, so a changed, added or removed document alters the batch it leaves and the one it
    joins, and a few after them until the ends fall where they fell before, never the rest: what a build cache holds
    for those is exactly what a fresh build computes (a text's vector can differ in its last bits with its batch).
    On SciFact at batch_size 32 (bench/index_resume.py): 25.5 texts a batch, no measurable cost in model time against
    fixed batches of 32; a rebuild after 1% of the documents changed finds 52% of the texts in the cache (fixed
    batches: 23%), after 0.1% changed 93%, after 1% added or removed 66% (fixed: 5% and 3%)."""
    order = sorted(range(len(digests)), key=lambda i: (-kept_tokens[i], digests[i]))
    return list(content_defined_batches(((position, digests[position]) for position in order), batch_size))


def detect_pooling(directory: Path) -> str | None:
    """The pooling a sentence-transformers model directory declares (``1_Pooling/config.json``)."""
    pooling_dirs: list[Path] = []
    modules_file = directory / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            modules = []
        for module in modules if isinstance(modules, list) else []:
            if isinstance(module, dict) and str(module.get("type", "")).endswith("Pooling"):
                pooling_dirs.append(directory / str(module.get("path", "")))
    pooling_dirs.append(directory / "1_Pooling")
    for pooling_dir in pooling_dirs:
        config_file = pooling_dir / "config.json"
        if not config_file.is_file():
            continue
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if config.get("pooling_mode_cls_token"):
            return "cls"
        if config.get("pooling_mode_mean_tokens"):
            return "mean"
        modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
        raise ModelLoadError(
            f"{config_file} asks for pooling {', '.join(modes) or 'none'}; Sieve supports cls and mean "
            "(set `pooling:` explicitly to use one of them)"
        )
    return None


def declared_max_length(directory: Path) -> int | None:
    """``max_seq_length`` from a sentence-transformers ``sentence_bert_config.json``, if present."""
    config_file = directory / "sentence_bert_config.json"
    if not config_file.is_file():
        return None
    try:
        value = json.loads(config_file.read_text(encoding="utf-8")).get("max_seq_length")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def _hub_snapshot(hub_id: str) -> Path | None:
    """The local snapshot directory of a hub model after the loading library fetched it."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # noqa: BLE001 - a lookup in a local cache; absence is an answer
        return None
    return Path(found).parent if isinstance(found, str) else None


@dataclass(frozen=True)
class EncodedTexts:
    """Token ids ready for the model, and how long each text was before the cut."""

    encodings: list[dict[str, list[int]]]
    full_tokens: list[int]  # tokens each text had, special tokens included, before truncation
    kept_tokens: list[int]  # tokens fed to the model
    unknown_tokens: list[int] = field(default_factory=list)  # of those, the model's unknown token ([UNK])

    @property
    def truncated(self) -> list[int]:
        """Positions of texts that were cut."""
        return [i for i, (full, kept) in enumerate(zip(self.full_tokens, self.kept_tokens)) if full > kept]


class Embedder:
    """A loaded bi-encoder: tokenizer, model, pooling, device and precision. Thread-safe."""

    def __init__(self, resolved: ResolvedModel, pooling: str, device: str, precision: str,
                 tokenizer_sha256: str | None = None):
        """``tokenizer_sha256``: the hash of the model directory's tokenizer files when the caller has it (else
        read here)."""
        try:
            import torch
        except ImportError:
            raise MissingDependencyError("torch", "torch", "dense embeddings") from None
        try:
            from FlagEmbedding import FlagModel
        except ImportError:
            raise MissingDependencyError("FlagEmbedding", "FlagEmbedding", "dense embeddings") from None
        torch_fork_guard(torch)
        self.torch = torch
        self.resolved = resolved
        device, precision = device_and_precision(device, precision, f"embedding model '{resolved.name}'")
        self.device = device
        self.precision = precision
        with quiet_transformers():
            try:
                flag = FlagModel(
                    resolved.location,
                    pooling_method="cls" if pooling == "auto" else pooling,
                    normalize_embeddings=True,
                    use_fp16=precision == "fp16",
                    devices=[device],
                )
            except Exception as exc:  # noqa: BLE001 - any library failure becomes a located ModelLoadError
                raise ModelLoadError(
                    f"cannot load embedding model '{resolved.name}' from {resolved.location}: "
                    f"{load_failure(resolved.location, exc)}"
                ) from None
        self.flag = flag
        self.tokenizer = flag.tokenizer
        self.model = flag.model
        check_vocabulary(self.tokenizer, self.model, f"embedding model '{resolved.name}'", resolved.location)
        local_dir = Path(resolved.location) if resolved.source != "hub" else _hub_snapshot(resolved.location)
        self.local_dir = local_dir
        if pooling == "auto":
            detected = detect_pooling(local_dir) if local_dir is not None else None
            if detected is None:
                raise ModelLoadError(
                    f"embedding model '{resolved.name}' does not declare its pooling (no sentence-transformers "
                    "1_Pooling/config.json), so it may not be an embedding model at all (a cross-encoder?); for an "
                    "embedding model, set its pooling where it is configured (the index's dense settings: `pooling: "
                    "cls` for bge models, `mean` for all-MiniLM/mpnet sentence-transformers models)"
                )
            pooling = detected
        self.pooling = pooling
        flag.pooling_method = pooling
        self.weights_sha256 = resolved.weights_sha256
        if self.weights_sha256 is None and local_dir is not None:
            self.weights_sha256 = weights_hash(local_dir)
        self.tokenizer_sha256 = tokenizer_sha256 or tokenizer_hash(local_dir)
        self.files = ModelFiles(local_dir, f"embedding model '{resolved.name}'")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ModelLoadError(
                f"embedding model '{resolved.name}' has no fast tokenizer (tokenizer.json); Sieve needs one to count "
                "what it truncates"
            )
        config = self.model.config
        self.dimension = int(getattr(config, "hidden_size", 0) or 0)
        tokenizer_limit = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        if tokenizer_limit <= 0 or tokenizer_limit > 1_000_000:  # "unlimited" sentinel of some tokenizers
            tokenizer_limit = 512
        position_limit = int(getattr(config, "max_position_embeddings", 0) or tokenizer_limit)
        if getattr(config, "model_type", "") in ("xlm-roberta", "roberta", "camembert"):
            position_limit -= 2  # RoBERTa-style positions start after the padding index
        self.model_limit = min(tokenizer_limit, position_limit)
        declared = declared_max_length(local_dir) if local_dir is not None else None
        self.default_max_length = min(declared, self.model_limit) if declared is not None else self.model_limit
        try:
            self.model.to(device)
            if precision == "fp32":
                self.model.float()
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            raise ModelLoadError(f"cannot move embedding model '{resolved.name}' to {device}: {exc}") from None
        self.model.eval()
        self.lock = threading.Lock()
        # A fast tokenizer's call switches truncation on its shared Rust tokenizer (enable_truncation/no_truncation)
        # and then encodes: two threads tokenising at once see each other's setting. Only tokenize() takes this lock,
        # and takes no other under it (embed_corpus calls it under the model's lock, never the reverse): no deadlock.
        self._tokenizer_lock = threading.Lock()
        self._query_cache: LRUCache[tuple[str, int], tuple[Any, int, int]] = LRUCache(256, per_asker=True)

    # ------------------------------------------------------------------ identity

    def identity(self) -> dict[str, Any]:
        return {
            "model": self.resolved.name,
            "source": self.resolved.source,
            "location": self.resolved.location,
            "weights_sha256": self.weights_sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "architecture": (getattr(self.model.config, "architectures", None) or [type(self.model).__name__])[0],
            "pooling": self.pooling,
            "normalized": True,
            "dimension": self.dimension,
            "device": self.device,
            "precision": self.precision,
            **({"threads": self.torch.get_num_threads()} if self.device == "cpu" else {}),
        }

    def check_max_length(self, max_length: int | None, what: str) -> int:
        """``max_length`` as given (None: the model's declared one), refused beyond the model's limit."""
        if max_length is None:
            return self.default_max_length
        if max_length > self.model_limit:
            raise ModelLoadError(
                f"{what} {max_length} exceeds what '{self.resolved.name}' can read ({self.model_limit} tokens)"
            )
        return max_length

    # ------------------------------------------------------------------ encoding

    def tokenize(self, texts: Sequence[str], max_length: int) -> EncodedTexts:
        """Token ids for ``texts`` cut to ``max_length``, with the count before the cut. Thread-safe: the tokenizer's
        truncation setting is shared state, so its calls are serialised (by a lock of their own, not the model's)."""
        with self._tokenizer_lock:
            full = self.tokenizer(list(texts), truncation=False, verbose=False)
            keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in full]
            encodings = [{k: full[k][i] for k in keys} for i in range(len(texts))]
            full_tokens = [len(e["input_ids"]) for e in encodings]
            long_positions = [i for i, n in enumerate(full_tokens) if n > max_length]
            if long_positions:
                # Let the tokenizer cut (it keeps the closing special token), so the model sees what
                # its own truncation would give it.
                cut = self.tokenizer([texts[i] for i in long_positions], truncation=True, max_length=max_length)
                for j, i in enumerate(long_positions):
                    encodings[i] = {k: cut[k][j] for k in keys}
        unk = self.tokenizer.unk_token_id
        unknown = [0 if unk is None else e["input_ids"].count(unk) for e in encodings]
        return EncodedTexts(encodings, full_tokens, [len(e["input_ids"]) for e in encodings], unknown)

    @cached_property
    def special_tokens(self) -> int:
        """Special tokens the tokenizer adds to one text ([CLS] and [SEP]: 2)."""
        return int(self.tokenizer.num_special_tokens_to_add(pair=False))

    def _autocast(self):  # type: ignore[no-untyped-def]
        if self.precision == "bf16":
            return self.torch.autocast(device_type=self.device, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, encodings: Sequence[dict[str, list[int]]]) -> Any:
        """Unit vectors (numpy float32) of one batch of token ids, padded to its longest; the caller holds the lock,
        inference mode and autocast."""
        torch = self.torch
        features = {key: [encoding[key] for encoding in encodings] for key in encodings[0]}
        try:
            batch = self.tokenizer.pad(features, padding=True, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self.model(**batch, return_dict=True).last_hidden_state
            pooled = self.flag.pooling(hidden, batch["attention_mask"]).float()
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        except Exception as exc:  # noqa: BLE001 - classified and re-raised with context
            if "out of memory" in str(exc).lower():
                longest = max(len(encoding["input_ids"]) for encoding in encodings)
                raise SieveError(
                    f"out of memory embedding a batch of {len(encodings)} texts (up to {longest} tokens) on "
                    f"{self.device}; lower batch_size or max_length"
                ) from exc
            raise SieveError(
                f"embedding with '{self.resolved.name}' failed on {self.device}: {type(exc).__name__}: {exc}"
            ) from exc
        return pooled.cpu().numpy()

    def embed_encoded(
        self, encoded: EncodedTexts, batch_size: int, progress: Callable[[int], None] | None = None
    ) -> Any:
        """Unit-length float32 vectors (numpy, one row per text, in input order)."""
        import numpy as np

        torch = self.torch
        count = len(encoded.encodings)
        vectors = np.zeros((count, self.dimension), dtype=np.float32)
        if count == 0:
            return vectors
        order = sorted(range(count), key=lambda i: (-encoded.kept_tokens[i], i))
        torch_fork_guard(torch)
        with self.lock, torch.inference_mode(), self._autocast():
            for start in range(0, count, batch_size):
                chunk = order[start : start + batch_size]
                vectors[chunk] = self._forward([encoded.encodings[i] for i in chunk])
                if progress is not None:
                    progress(len(chunk))
        return vectors

    def embed(
        self,
        texts: Sequence[str],
        *,
        max_length: int,
        batch_size: int,
        progress: Callable[[int], None] | None = None,
        chunk: int = EMBED_CHUNK,
    ) -> tuple[Any, list[int], list[int], list[int]]:
        """Unit vectors for ``texts``, with each text's token count before and after the cut and how many of the
        kept tokens are the model's unknown token.

        Each distinct text is embedded once and its vector reused for every repeat of it: run again,
        a repeat could share a batch padded to another width and come out a few ulps apart, and
        documents with the same text would no longer tie. Distinct texts are tokenised and
        length-sorted ``chunk`` at a time, so a corpus of millions never holds all its token ids in
        Python lists at once. ``progress`` counts repeats too, once every distinct text is done.
        """
        import numpy as np

        slot_of: dict[str, int] = {}  # distinct text -> its position among the distinct texts
        slot_list: list[int] = []  # each text's slot
        first_list: list[int] = []  # each slot's first row
        for row, text in enumerate(texts):
            slot = slot_of.setdefault(text, len(slot_of))
            if slot == len(first_list):
                first_list.append(row)
            slot_list.append(slot)
        distinct = list(slot_of)
        del slot_of
        slots = np.asarray(slot_list, dtype=np.int64)
        first_row = np.asarray(first_list, dtype=np.int64)
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        full_tokens = np.zeros(len(distinct), dtype=np.int64)
        kept_tokens = np.zeros(len(distinct), dtype=np.int64)
        unknown_tokens = np.zeros(len(distinct), dtype=np.int64)
        for start in range(0, len(distinct), chunk):
            encoded = self.tokenize(distinct[start : start + chunk], max_length)
            stop = start + len(encoded.encodings)
            vectors[first_row[start:stop]] = self.embed_encoded(encoded, batch_size, progress)
            full_tokens[start:stop] = encoded.full_tokens
            kept_tokens[start:stop] = encoded.kept_tokens
            unknown_tokens[start:stop] = encoded.unknown_tokens
        repeats = np.flatnonzero(first_row[slots] != np.arange(len(texts)))
        if repeats.size:
            vectors[repeats] = vectors[first_row[slots[repeats]]]
            if progress is not None:
                progress(int(repeats.size))
        return vectors, full_tokens[slots].tolist(), kept_tokens[slots].tolist(), unknown_tokens[slots].tolist()

    def cache_identity(self, max_length: int) -> dict[str, Any] | None:
        """Everything besides a batch's token ids that decides its vectors, bit for bit: the build cache's key (None:
        the weights cannot be identified, so nothing is cached). The location is left out (the same files elsewhere
        give the same vectors); the library versions, CPU instruction set and thread count are in, since each can
        change the last bits."""
        import transformers

        torch = self.torch
        if self.weights_sha256 is None:
            return None
        config_file = self.local_dir / "config.json" if self.local_dir is not None else None
        if config_file is not None and config_file.is_file():
            config_sha256 = hashlib.sha256(config_file.read_bytes()).hexdigest()
        else:
            config = {k: v for k, v in self.model.config.to_dict().items() if k not in ("_name_or_path",)}
            config_sha256 = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        device: dict[str, Any] = {"type": self.device, "threads": torch.get_num_threads()}
        if self.device == "cuda":
            device.update(name=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                          cudnn=torch.backends.cudnn.version())
        else:
            device["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        from engine import __version__

        return {
            "what": "document embeddings", "batching": CORPUS_BATCHING, "engine": __version__,
            "code": _CODE_SHA256,
            "weights_sha256": self.weights_sha256, "config_sha256": config_sha256,
            "architecture": (getattr(self.model.config, "architectures", None) or [type(self.model).__name__])[0],
            "attention": getattr(self.model.config, "_attn_implementation", None),
            "pooling": self.pooling, "normalized": True, "dimension": self.dimension, "max_length": max_length,
            "precision": self.precision, "device": device,
            "torch": torch.__version__, "transformers": transformers.__version__,
        }

    def embed_corpus(
        self,
        texts: Sequence[str],
        *,
        max_length: int,
        batch_size: int,
        progress: Callable[[int], None] | None = None,
        cache: Any = None,
        chunk: int = EMBED_CHUNK,
    ) -> tuple[Any, list[int], list[int], list[int]]:
        """As :meth:`embed`, for an index build: unit vectors for ``texts`` with each one's token counts (before the
        cut, kept, unknown to the model), in batches cut by :func:`corpus_batches`, each kept in ``cache`` (an
        ``engine.index.BuildCacheSection``, or None) under the sha256 of :meth:`cache_identity` and its inputs' token
        ids, and taken from there when a build runs again. Texts with the same token ids share one vector. The vectors
        are the same, bit for bit, with or without a cache and whatever it held: an entry is reused only for the very
        batch it was computed for, and checked when read (a damaged one is recomputed).

        Token ids are counted ``chunk`` texts at a time and tokenised again per batch (cheap next to the model), so a
        corpus of millions never holds all of them at once. ``progress`` counts texts, repeats included."""
        import numpy as np

        input_of_text: dict[str, int] = {}  # distinct text -> its model input
        input_of: dict[bytes, int] = {}  # an input's digest -> its position among the distinct inputs
        text_of_input: list[str] = []  # each input's first text
        digests: list[bytes] = []
        full_tokens: list[int] = []
        kept_tokens: list[int] = []
        unknown_tokens: list[int] = []
        row_input = np.zeros(len(texts), dtype=np.int64)
        pending: list[str] = []

        def count(batch: list[str]) -> None:
            encoded = self.tokenize(batch, max_length)
            for text, encoding, full, kept, unknown in zip(batch, encoded.encodings, encoded.full_tokens,
                                                          encoded.kept_tokens, encoded.unknown_tokens):
                digest = input_digest(encoding)
                position = input_of.setdefault(digest, len(input_of))
                if position == len(digests):
                    digests.append(digest)
                    text_of_input.append(text)
                    full_tokens.append(full)
                    kept_tokens.append(kept)
                    unknown_tokens.append(unknown)
                input_of_text[text] = position

        # rows are walked once: a text not seen before waits in ``pending`` until a chunk of them is tokenised
        waiting: dict[str, list[int]] = {}
        for row, text in enumerate(texts):
            if text in input_of_text:
                row_input[row] = input_of_text[text]
                continue
            rows = waiting.get(text)
            if rows is None:
                waiting[text] = rows = []
                pending.append(text)
            rows.append(row)
            if len(pending) >= chunk:
                count(pending)
                for waited in pending:
                    row_input[waiting.pop(waited)] = input_of_text[waited]
                pending = []
        if pending:
            count(pending)
            for waited in pending:
                row_input[waiting.pop(waited)] = input_of_text[waited]
        del input_of_text, input_of, waiting

        identity = self.cache_identity(max_length) if cache is not None else None
        vectors = np.zeros((len(digests), self.dimension), dtype=np.float32)
        torch = self.torch
        torch_fork_guard(torch)
        with self.lock, torch.inference_mode(), self._autocast():
            for batch in corpus_batches(kept_tokens, digests, batch_size):
                key = cache.key(identity, [digests[i] for i in batch]) if identity is not None else None
                if key is not None:
                    found = cache.get(key, len(batch), lambda payload: self._decode_vectors(payload, len(batch)))
                    if found is not None:
                        vectors[batch] = found
                        if progress is not None:
                            progress(len(batch))
                        continue
                encoded = self.tokenize([text_of_input[i] for i in batch], max_length)
                if [input_digest(e) for e in encoded.encodings] != [digests[i] for i in batch]:
                    raise SieveError(f"the tokenizer of '{self.resolved.name}' gave other token ids for the same "
                                     "texts on a second pass; cannot embed reproducibly")
                computed = self._forward(encoded.encodings)
                vectors[batch] = computed
                if key is not None:
                    cache.put(key, np.ascontiguousarray(computed, dtype="<f4").tobytes(), len(batch))
                if progress is not None:
                    progress(len(batch))
        if len(digests) == len(texts):  # every text its own input, in row order: no copy
            by_row = vectors
        else:
            by_row = vectors[row_input]
            if progress is not None:
                progress(len(texts) - len(digests))
        counts = [np.asarray(values, dtype=np.int64)[row_input].tolist()
                  for values in (full_tokens, kept_tokens, unknown_tokens)]
        return by_row, counts[0], counts[1], counts[2]

    def _decode_vectors(self, payload: bytes, rows: int) -> Any:
        """A cache entry's vectors (rows x dimension float32), or ValueError when it holds another shape."""
        import numpy as np

        expected = rows * self.dimension * 4
        if len(payload) != expected:
            raise ValueError(f"{len(payload)} bytes where {rows} vectors of {self.dimension} take {expected}")
        return np.frombuffer(payload, dtype="<f4").reshape(rows, self.dimension)

    def embed_query(self, text: str, *, instruction: str | None, max_length: int) -> tuple[Any, int, int, int]:
        """(unit vector, tokens before the cut, tokens kept, of those unknown to the model) for a query; recent
        queries are cached."""
        full_text = f"{instruction}{text}" if instruction else text
        key = (full_text, max_length)
        cached = self._query_cache.get(key)
        if cached is not None:
            return cached
        encoded = self.tokenize([full_text], max_length)
        vector = self.embed_encoded(encoded, batch_size=1)[0]
        result = (vector, encoded.full_tokens[0], encoded.kept_tokens[0], encoded.unknown_tokens[0])
        self._query_cache.put(key, result)
        return result


def device_and_precision(device: str, precision: str, what: str,
                         cpu_precision: Callable[[], str] = lambda: "fp32") -> tuple[str, str]:
    """``auto`` resolved on this machine (CUDA when present; fp16 on CUDA, ``cpu_precision()`` on CPU); ModelLoadError
    for what this machine cannot do (``cuda`` without CUDA, fp16 on a CPU). Said before an index build's first
    component, too."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"{what}: device 'cuda' was asked for but CUDA is not available")
    if precision == "auto":
        precision = "fp16" if device == "cuda" else cpu_precision()
    if precision == "fp16" and device == "cpu":
        raise ModelLoadError(f"{what}: fp16 is not supported on CPU; use fp32 or bf16")
    return device, precision


def fp16_on_cpu(device: str, precision: str) -> None:
    """ValueError for a config asking for fp16 on the CPU, which no machine runs (a model validator's check)."""
    if device == "cpu" and precision == "fp16":
        raise ValueError("precision fp16 runs on CUDA only, and device is cpu: use fp32 or bf16 on the CPU (or "
                         "device: auto, which runs fp16 where CUDA is present)")


def unrunnable_here(device: str, precision: str, what: str) -> list[GraphIssue]:
    """For ``sieve validate``, which loads no model: a warning, located at the setting, when a model set to
    ``device``/``precision`` would fail to load on this machine (``cuda``, or fp16, without CUDA). torch is imported
    only when one of them asks for CUDA."""

    if device != "cuda" and precision != "fp16":
        return []  # auto and the CPU settings run anywhere
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return []  # no torch here at all: loading says so (MissingDependencyError), whatever the device
    try:
        device_and_precision(device, precision, what)
    except ModelLoadError as exc:
        return [GraphIssue(f"{exc}: the stage will fail to load on this machine",
                           ("params", "device" if device == "cuda" else "precision"), "warning")]
    return []


_embedders: dict[tuple[str, str | None, str | None, str, str, str], Embedder] = {}
_embedders_lock = threading.Lock()


def load_embedder(resolved: ResolvedModel, *, pooling: str, device: str, precision: str) -> Embedder:
    """The process-wide embedder for this model (weights and tokenizer), pooling, device and precision (loaded
    once; a tokenizer swapped since is another embedder)."""
    local = Path(resolved.location) if resolved.source != "hub" else None
    tokenizer = tokenizer_hash(local)
    key = (resolved.location, resolved.weights_sha256, tokenizer, pooling, device, precision)
    with _embedders_lock:
        found = _embedders.get(key)
        if found is None:
            found = Embedder(resolved, pooling, device, precision, tokenizer_sha256=tokenizer)
            _embedders[key] = found
        return found
