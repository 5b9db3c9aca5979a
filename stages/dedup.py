"""``dedup.near_duplicate``: drop near-duplicates of better-ranked candidates; optional MMR diversity.

Candidates are visited in their input order (best first). A candidate whose similarity to an
already kept one reaches ``threshold`` is dropped with reason ``near_duplicate`` and the detail
``duplicate_of=<survivor>``; the survivor (the best-ranked of the group, since it was kept first)
lists what it absorbed in the trace (``details.absorbed``). A candidate is compared with
survivors only, so a chain a~b~c with a !~ c keeps a and c.

Similarity:
- ``embedding``: cosine of unit vectors. The index's dense vectors are reused when it has a dense
  component (no model is loaded); otherwise the candidates' text is embedded with
  :mod:`stages.embedding` (default all-MiniLM-L6-v2) and cached per row.
- ``minhash``: estimated Jaccard similarity of word ``shingle_size``-gram sets, MinHash signatures
  equal to ``datasketch``'s affine32 ones (``num_perm`` permutations, fixed seed, so runs are deterministic).
  They are read from the index's ``minhash`` component when it was built with the stage's settings (fields,
  shingle_size, num_perm, seed) and the shingling this version uses; otherwise they are computed for all uncached
  candidates in one batch (``minhash_signatures``) and cached per row. The details say which (``signatures``).

The default threshold (0.95 cosine) was measured on SciFact (``bench/dedup_threshold.py``): the
client's 0.7 would remove distinct relevant abstracts that merely share a topic.

With ``mmr_lambda`` set, the survivors are then re-ordered by Maximal Marginal Relevance::

    mmr(d) = lambda * rel(d) - (1 - lambda) * max over already selected s of sim(d, s)

``rel`` is the current score min-max normalised over the survivors (a tied list: 1.0). Each
reordered candidate gets a ledger entry (signal ``mmr``) whose value is its MMR value when it was
selected. Without MMR the stage only drops: it writes no ledger entry.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import operator
import re
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from engine.cache import LRUCache
from engine.errors import SieveIndexError, StageError
from engine.index import ComponentSettings, Document, IndexComponent, Progress
from engine.model import Candidate, Decision, Drop, Query, ScoreEntry
from engine.models import resolve_model
from engine.registry import register_index_component, register_stage
from engine.stage import (Explanation, GraphIssue, GraphView, Port, RecentNotes, Resources, Stage, StageContext,
                          StageNode, StageParams, StageResult)
from stages.text import HAN_RANGES

DEFAULT_COSINE_THRESHOLD = 0.95
MINHASH_SCHEME = "affine32"  # datasketch >= 2.0's scheme, reproduced by minhash_signatures: an upgrade cannot change them
# A Han character is a token of its own (Chinese has no spaces: a clause was one "word", so one changed character
# made two reprints share no shingle); other word characters run together as words
_HAN_CHARS = HAN_RANGES + "\U00020000-\U0002fa1f"  # and the supplementary planes' extensions
WORD = re.compile(f"[{_HAN_CHARS}]|[^\\W{_HAN_CHARS}]+", re.UNICODE)


# Similarities within this of the threshold reach it: float32 cosines of identical vectors come out at 0.99999994,
# so `threshold: 1.0` (exact duplicates only) removed nothing.
SIMILARITY_TOLERANCE = 1e-6


class DedupParams(StageParams):
    method: Literal["embedding", "minhash"] = Field(
        "embedding", description="embedding: cosine of dense vectors; minhash: estimated Jaccard of word shingles"
    )
    threshold: float = Field(
        DEFAULT_COSINE_THRESHOLD, gt=0, le=1,
        description="a candidate this similar (cosine or Jaccard) to a better-ranked kept one is dropped",
    )
    window: int | None = Field(None, ge=1, le=100_000, description="only the first N candidates are compared; None: all")
    vectors: Literal["auto", "index", "embed"] = Field(
        "auto", description="embedding: index = the dense component's vectors; embed = embed the text; auto: index if present"
    )
    component: str = Field("dense", description="which dense component's vectors to reuse")
    model: str | None = Field(None, description="embedding model when embedding text; None: all-MiniLM-L6-v2")
    fields: tuple[str, ...] = Field(("title", "text"), min_length=1, description="document fields compared (minhash, embed)")
    shingle_size: int = Field(3, ge=1, le=20, description="words per shingle (minhash)")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (minhash)")
    seed: int = Field(1, ge=0, le=2**32 - 1, description="MinHash seed (minhash; numpy draws the permutations from it)")
    mmr_lambda: float | None = Field(
        None, ge=0, le=1, description="re-order survivors by MMR with this relevance weight; None: no MMR"
    )
    mmr_top: int | None = Field(None, ge=1, le=100_000, description="how many survivors MMR orders; None: all")

    @model_validator(mode="after")
    def _consistent(self) -> "DedupParams":
        if self.method == "minhash" and (self.vectors != "auto" or self.model is not None):
            raise ValueError("vectors and model apply to method: embedding only")
        if self.mmr_top is not None and self.mmr_lambda is None:
            raise ValueError("mmr_top needs mmr_lambda")
        return self


_BLAS: list[Any] = []  # threadpoolctl's controller of the BLAS libraries numpy loaded, made at the first product
_BLAS_LOCK = threading.RLock()  # reentrant: a product inside another holds it already


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Numpy's BLAS on one thread for the block: the similarity product of a few hundred vectors takes 0.2 ms, but with
    OpenBLAS handing it to its threads while torch's thread pool holds the cores it took 8 ms on 3 queries of 4 (the
    hand-off stalls). One thread gives the same bits (``bench/dedup_blas.py``). The limit is process-wide while it
    lasts, so products hold a lock: two overlapping ones would restore each other's limit."""
    with _BLAS_LOCK:
        if not _BLAS:
            from threadpoolctl import ThreadpoolController

            _BLAS.append(ThreadpoolController())
        with _BLAS[0].limit(limits=1, user_api="blas"):
            yield


def shingles(text: str, size: int) -> set[str]:
    """Word ``size``-grams of a case-folded, NFC-normalised text (the whole text if it has fewer words); in Chinese
    (Han) text each character counts as a word, so these are character ``size``-grams there."""
    words = WORD.findall(unicodedata.normalize("NFC", text).casefold())
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def shingle_bytes(text: str, size: int) -> set[bytes]:
    """The UTF-8 bytes of ``shingles(text, size)`` (a shingle's words are joined by one space, so joining the
    words' bytes gives the same bytes as encoding the joined shingle)."""
    words = [word.encode("utf-8") for word in WORD.findall(unicodedata.normalize("NFC", text).casefold())]
    if len(words) <= size:
        return {b" ".join(words)} if words else set()
    return set(map(b" ".join, zip(*(words[i:] for i in range(size)))))


# MurmurHash3's 32-bit finalizer, which datasketch's affine32 scheme applies to each input hash before permuting
_FMIX32 = ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None))
# Shingles hashed and permuted per array operation: a chunk's (shingles x num_perm) uint32 block stays a few MiB
_SHINGLES_PER_CHUNK = 8192


@functools.lru_cache(maxsize=8)
def minhash_permutations(num_perm: int, seed: int) -> tuple[Any, Any]:
    """The ``a`` (odd) and ``b`` of datasketch's affine32 permutations ``h -> a * h + b mod 2**32``, drawn as
    datasketch 2.0 draws them (``numpy.random.RandomState(seed)``, all ``a`` then all ``b``)."""
    import numpy as np

    generator = np.random.RandomState(seed)
    a = generator.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = generator.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    a.flags.writeable = False
    b.flags.writeable = False
    return a, b


def minhash_signatures(texts: Sequence[str], shingle_size: int, num_perm: int, seed: int) -> tuple[Any, Any]:
    """MinHash signatures (len(texts) x num_perm, uint32) of the texts' shingles, equal value for value to
    datasketch's ``MinHash(num_perm=num_perm, seed=seed, scheme="affine32")`` updated with the shingles' UTF-8 bytes,
    and which texts have no shingle (their row is zeros).

    All texts at once: each shingle is hashed as datasketch hashes it (the first 4 bytes of its SHA-1, little
    endian), then the hashes of every text go through the MurmurHash3 finalizer and the ``num_perm`` permutations as
    one (shingles x num_perm) array operation per chunk, and each text's minima come from ``minimum.reduceat``
    over its run of rows (datasketch does this per text, behind a per-text MinHash object)."""
    import numpy as np

    sha1 = hashlib.sha1
    digest = operator.methodcaller("digest")
    counts = np.zeros(len(texts), dtype=np.int64)
    digests: list[bytes] = []
    for position, text in enumerate(texts):
        grams = shingle_bytes(text, shingle_size)
        counts[position] = len(grams)
        digests.extend(map(digest, map(sha1, grams)))
    signatures = np.zeros((len(texts), num_perm), dtype=np.uint32)
    empty = counts == 0
    if not digests:
        return signatures, empty
    # 20-byte SHA-1 digests back to back: every fifth little-endian uint32 is a digest's first 4 bytes
    hashes = np.frombuffer(b"".join(digests), dtype="<u4")[::5].astype(np.uint32)
    for shift, multiplier in _FMIX32:
        hashes ^= hashes >> np.uint32(shift)
        if multiplier is not None:
            hashes *= np.uint32(multiplier)  # wraps modulo 2**32, as in datasketch
    a, b = minhash_permutations(num_perm, seed)
    filled = np.flatnonzero(~empty)
    ends = np.cumsum(counts[filled])
    starts = ends - counts[filled]
    minima = np.full((filled.size, num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    for low in range(0, int(ends[-1]), _SHINGLES_PER_CHUNK):
        high = min(low + _SHINGLES_PER_CHUNK, int(ends[-1]))
        first = int(np.searchsorted(ends, low, side="right"))  # the texts with shingles in [low, high)
        last = int(np.searchsorted(starts, high, side="left"))
        permuted = np.multiply.outer(hashes[low:high], a)
        permuted += b
        segment_starts = np.maximum(starts[first:last], low) - low
        np.minimum(minima[first:last], np.minimum.reduceat(permuted, segment_starts, axis=0), out=minima[first:last])
    signatures[filled] = minima
    return signatures, empty


# --------------------------------------------------------------------------- index component

MINHASH_COMPONENT = "minhash"
SIGNATURES_FILE = "signatures.npy"  # (documents x num_perm) little-endian uint32 by row; an empty text's row: zeros
EMPTY_FILE = "empty.npy"  # (documents,) bool: which texts have no shingle
_SIGN_BATCH = 1000  # documents read and signed at a time while building


def shingling() -> dict[str, str]:
    """What decides a text's shingles besides the settings, recorded with the index's signatures: the text form
    (NFC, case-folded), the word pattern (Han characters as words) and the Unicode database that NFC, case folding
    and ``\\w`` follow. Signatures made under another are not this version's, so the stage does not use them."""
    return {"text": "nfc casefold", "words_sha256": hashlib.sha256(WORD.pattern.encode("utf-8")).hexdigest()[:16],
            "unicode": unicodedata.unidata_version}


class MinHashIndexSettings(ComponentSettings):
    fields: tuple[str, ...] = Field(("title", "text"), min_length=1, description="document fields signed, joined")
    shingle_size: int = Field(3, ge=1, le=20, description="words per shingle")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    seed: int = Field(1, ge=0, le=2**32 - 1, description="MinHash seed")


@register_index_component
class MinHashComponent(IndexComponent):
    """Every document's MinHash signature, signed once when the index is built, for dedup.near_duplicate.

    The stage reads them under ``method: minhash`` when its fields, shingle_size, num_perm and seed are the ones the
    index was built with (and the shingling is this version's); otherwise it signs each candidate per query, and says
    so at warm-up."""

    name = MINHASH_COMPONENT
    Settings = MinHashIndexSettings

    def build(
        self, documents: Sequence[Document], out_dir: Path, settings: ComponentSettings, progress: Progress
    ) -> dict[str, Any]:
        import numpy as np

        assert isinstance(settings, MinHashIndexSettings)
        count = len(documents)
        empty = np.zeros(count, dtype=bool)
        # written a batch at a time into the file (a 250k corpus at 128 permutations is 128 MB)
        signatures = np.lib.format.open_memmap(out_dir / SIGNATURES_FILE, mode="w+", dtype="<u4",
                                               shape=(count, settings.num_perm))
        start = 0
        texts: list[str] = []

        def sign() -> None:
            nonlocal start, texts
            block, block_empty = minhash_signatures(texts, settings.shingle_size, settings.num_perm, settings.seed)
            signatures[start : start + len(texts)] = block
            empty[start : start + len(texts)] = block_empty
            start += len(texts)
            progress("minhash", len(texts), count)
            texts = []

        for document in documents:
            texts.append(document.content(settings.fields))
            if len(texts) == _SIGN_BATCH:
                sign()
        if texts:
            sign()
        signatures.flush()
        del signatures
        np.save(out_dir / EMPTY_FILE, empty)
        return {"scheme": MINHASH_SCHEME, "shingling": shingling(), "documents": count,
                "empty_documents": int(empty.sum())}


class LoadedMinHashSignatures:
    """An index's signatures (memory-mapped) and empty-text flags, checked against the manifest when opened."""

    def __init__(self, directory: Path, settings: MinHashIndexSettings, expected_rows: int):
        import numpy as np

        try:
            self.signatures = np.load(directory / SIGNATURES_FILE, mmap_mode="r", allow_pickle=False)
            self.empty = np.load(directory / EMPTY_FILE, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise SieveIndexError(f"the minhash component at {directory} cannot be loaded: {exc}; rebuild the "
                                  "index") from None
        expected = (np.dtype("<u4"), (expected_rows, settings.num_perm), np.dtype(bool), (expected_rows,))
        found = (self.signatures.dtype, self.signatures.shape, self.empty.dtype, self.empty.shape)
        if found != expected:
            raise SieveIndexError(
                f"the minhash component at {directory} holds {SIGNATURES_FILE} of {found[0]} {found[1]} and "
                f"{EMPTY_FILE} of {found[2]} {found[3]}, but the index has {expected_rows} documents signed with "
                f"{settings.num_perm} permutations ({expected[0]}, and bool); rebuild the index"
            )

    def rows(self, rows: list[int]) -> tuple[Any, Any]:
        """Signatures (n x num_perm, uint32, in memory) and empty flags of the documents at ``rows``."""
        import numpy as np

        positions = np.asarray(rows, dtype=np.intp)
        return np.asarray(self.signatures[positions], dtype=np.uint32), self.empty[positions]


def index_signatures_mismatch(entry: dict[str, Any], params: "DedupParams") -> str | None:
    """Why the index's ``minhash`` component (manifest ``entry``) cannot stand in for signing with ``params``
    (None: its signatures are the ones the stage would compute)."""
    try:
        built = MinHashIndexSettings.model_validate(entry.get("settings"))
    except ValidationError:
        return "records no valid settings"
    wanted = MinHashIndexSettings(fields=params.fields, shingle_size=params.shingle_size, num_perm=params.num_perm,
                                  seed=params.seed)
    differing = [name for name in MinHashIndexSettings.model_fields if getattr(built, name) != getattr(wanted, name)]
    if differing:
        def show(settings: MinHashIndexSettings) -> str:
            return ", ".join(f"{name} {_setting(getattr(settings, name))}" for name in differing)

        return f"was built with {show(built)}, and this stage has {show(wanted)}"
    if entry.get("scheme") != MINHASH_SCHEME:
        return f"holds signatures of scheme {entry.get('scheme')!r}, not {MINHASH_SCHEME}"
    if entry.get("shingling") != shingling():
        return (f"read its texts into shingles as {entry.get('shingling')}, and this version of Sieve reads them as "
                f"{shingling()} (another word pattern or Unicode database)")
    return None


def _setting(value: Any) -> str:
    return "[" + ", ".join(value) + "]" if isinstance(value, tuple) else str(value)


@register_stage
class NearDuplicateFilter(Stage):
    """Drop near-duplicates (embedding cosine or MinHash Jaccard), keeping the best-ranked; optional MMR."""

    type_name = "dedup.near_duplicate"
    version = 1
    Params = DedupParams
    produces = Port.CANDIDATES
    accepts = frozenset({Port.CANDIDATES, Port.QUERY, Port.MASK})
    signal = None
    summary = "near-duplicate removal (embedding cosine or MinHash), survivor records what it absorbed; optional MMR"
    params: DedupParams

    @classmethod
    def signal_for(cls, params: StageParams | None) -> str | None:
        """With MMR the stage scores (an ``mmr`` ledger entry per ordered survivor); without, it only drops."""
        return "mmr" if isinstance(params, DedupParams) and params.mmr_lambda is not None else None

    @classmethod
    def check_graph(cls, node: StageNode, graph: GraphView) -> Sequence[GraphIssue]:
        """Warn about MinHash's settings under method: embedding: accepted, but unused (the reverse, vectors or
        model under minhash, is refused by the params)."""
        params = node.params
        assert isinstance(params, DedupParams)
        unused = ([f for f in ("shingle_size", "num_perm", "seed") if f in params.model_fields_set]
                  if params.method == "embedding" else [])
        return [GraphIssue(f"{name} is set but not used: it applies only with method: minhash", ("params", name),
                           "warning") for name in unused]

    def __init__(self, stage_id: str, params: StageParams):
        super().__init__(stage_id, params)
        self._index: Any = None
        self._dense: Any = None
        self._embedder: Any = None
        self._cache: LRUCache[int, Any] = LRUCache(50_000)  # row -> vector or signature (fixed under an open index)
        self._notes = RecentNotes()
        self._source = ""
        self._index_signatures: LoadedMinHashSignatures | None = None  # the index's minhash component, when usable
        self._warnings: list[str] = []

    def warm_up(self, resources: Resources) -> None:
        p = self.params
        index = resources.require_index(self.id)
        self._index = index
        self._index_signatures = None
        self._warnings = []
        if p.method == "minhash":
            self._check_fields(index)
            # the values are datasketch's (affine32), computed here without it (minhash_signatures) or read from the
            # index; the trace names the scheme as before, so traces replay unchanged
            self._source = (f"MinHash (datasketch, {MINHASH_SCHEME}, {p.num_perm} permutations, seed {p.seed}) of word"
                            f" {p.shingle_size}-grams")
            entry = index.manifest["components"].get(MINHASH_COMPONENT)
            if entry is None:
                return
            mismatch = index_signatures_mismatch(entry, p)
            if mismatch is not None:
                self._warnings.append(
                    f"the index's {MINHASH_COMPONENT} component {mismatch}: its signatures are not used, and each "
                    "candidate not in the cache is signed per query (about 0.32 ms a document); build the index with "
                    f"the stage's settings ({MINHASH_COMPONENT}: {{fields: {_setting(p.fields)}, shingle_size: "
                    f"{p.shingle_size}, num_perm: {p.num_perm}, seed: {p.seed}}}) or give the stage the index's")
                return
            directory, entry = index.component(MINHASH_COMPONENT, self.id)
            settings = MinHashIndexSettings.model_validate(entry["settings"])
            self._index_signatures = resources.shared(
                f"minhash-signatures:{directory}",
                lambda: LoadedMinHashSignatures(directory, settings, index.doc_count))
            return
        has_dense = p.component in index.manifest["components"]
        if p.vectors == "index" or (p.vectors == "auto" and has_dense):
            from stages.recall.dense import LoadedDenseIndex

            directory, entry = index.component(p.component, self.id)
            if p.model is not None:
                raise SieveIndexError(
                    f"stage '{self.id}': `model` is set, but the vectors come from the index's '{p.component}' "
                    "component; set vectors: embed to embed with another model"
                )
            self._dense = resources.shared(f"dense-index:{directory}", lambda: LoadedDenseIndex(directory, entry))
            model = entry.get("model", {})
            self._source = (f"cosine of the index's '{p.component}' vectors ({model.get('name')}, weights sha256 "
                            f"{str(model.get('weights_sha256'))[:12]})")
            return
        from stages.embedding import DEFAULT_EMBEDDING_MODEL, load_embedder

        self._check_fields(index)
        resolved = resolve_model(p.model if p.model is not None else DEFAULT_EMBEDDING_MODEL,
                                 base_dir=resources.base_dir, purpose=f"dedup.near_duplicate stage '{self.id}'")
        self._embedder = resources.shared(
            f"dedup-model:{resolved.location}", lambda: load_embedder(resolved, pooling="auto", device="auto", precision="auto")
        )
        self._source = f"cosine of '{resolved.name}' embeddings of {'+'.join(p.fields)} (weights sha256 {str(resolved.weights_sha256)[:12]})"

    def _check_fields(self, index: Any) -> None:
        """A warning for each of ``fields`` none of the index's first documents has (a typo reads as empty text)."""
        from stages.fields import absent_fields

        fields = self.params.fields
        absent, names, read = absent_fields(index, fields)
        if not absent:
            return
        effect = ("so every document's text is empty: nothing is compared and nothing dropped"
                  if len(absent) == len(fields) else "so it adds nothing to the text compared")
        for name, hint in absent.items():
            self._warnings.append(f"fields: '{name}' is in none of the index's first {read} documents{hint}, {effect}; "
                                  f"fields they have: {', '.join(names)}")

    def warm_up_warnings(self) -> list[str]:
        return list(self._warnings)

    def identity(self) -> dict[str, Any] | None:
        if self._embedder is not None:
            return {**self._embedder.identity(), "use": "dedup"}
        return None

    # ------------------------------------------------------------------ similarity

    def similarity_matrix(self, rows: list[int]) -> Any:
        """Pairwise similarity (n x n float64) of the documents at ``rows``, by the configured method."""
        import numpy as np

        if not rows:
            return np.zeros((0, 0))
        if self.params.method == "minhash":
            signatures, empty = self._signatures(rows)
            # 32-bit hash values compared as uint32: half the memory traffic of uint64, same result
            equal = signatures[:, None, :] == signatures[None, :, :]
            similarity = equal.sum(axis=2, dtype=np.uint16) / signatures.shape[1]
            if empty.any():  # an empty text shares nothing with anything, not even another empty text
                similarity[empty, :] = 0.0
                similarity[:, empty] = 0.0
                similarity[empty, empty] = 1.0
            return similarity
        vectors = self._vectors(rows)
        with one_blas_thread():
            return np.clip(vectors @ vectors.T, -1.0, 1.0).astype(np.float64)

    def _texts(self, rows: list[int]) -> dict[int, str]:
        documents = self._index.documents.get(rows)
        return {row: documents[row].content(self.params.fields) for row in rows}

    def _vectors(self, rows: list[int]) -> Any:
        import numpy as np

        if self._dense is not None:
            ids = np.asarray(rows, dtype=np.int64)
            try:
                return np.asarray(self._dense.exact.reconstruct_batch(ids), dtype=np.float32)
            except RuntimeError as exc:
                raise StageError(self.id, self.qualified_name(), f"cannot read vectors from the dense index: {exc}") from None
        cached = self._cache.get_many(rows)
        missing = [r for r in dict.fromkeys(rows) if r not in cached]
        if missing:
            texts = self._texts(missing)
            embedder = self._embedder
            vectors, *_ = embedder.embed([texts[r] for r in missing], max_length=embedder.default_max_length, batch_size=32)
            for row, vector in zip(missing, vectors):
                self._cache.put(row, vector)
                cached[row] = vector
        return np.stack([cached[r] for r in rows]).astype(np.float32)

    def _signatures(self, rows: list[int]) -> tuple[Any, Any]:
        """MinHash signatures (n x num_perm, uint32) of the documents at ``rows``, and which of them have an
        empty text (their row is zeros). From the index's signatures when it has usable ones; otherwise the documents
        not in the cache are read in one query and signed together."""
        import numpy as np

        if self._index_signatures is not None:
            return self._index_signatures.rows(rows)
        p = self.params
        cached = self._cache.get_many(rows)
        missing = [r for r in dict.fromkeys(rows) if r not in cached]
        if missing:
            texts = self._texts(missing)
            signatures, empty = minhash_signatures([texts[row] for row in missing], p.shingle_size, p.num_perm, p.seed)
            for position, row in enumerate(missing):
                # an empty text's marker is a zero-length signature
                cached[row] = signatures[position, :0].copy() if empty[position] else signatures[position].copy()
                self._cache.put(row, cached[row])
        empty = np.asarray([cached[r].size == 0 for r in rows], dtype=bool)
        blank = np.zeros(p.num_perm, dtype=np.uint32)
        return np.stack([blank if cached[r].size == 0 else cached[r] for r in rows]), empty

    # ------------------------------------------------------------------ running

    def run(self, ctx: StageContext) -> StageResult:
        import numpy as np

        p = self.params
        (incoming,) = ctx.inputs
        compared = incoming if p.window is None else incoming[: p.window]
        beyond = incoming[len(compared):]
        decisions: list[Decision] = []
        began = time.perf_counter()
        similarity = self.similarity_matrix([c.row for c in compared])
        similarity_ms = (time.perf_counter() - began) * 1000.0
        drops: list[Drop] = []
        absorbed: dict[str, list[list[Any]]] = {}
        measure = "Jaccard" if p.method == "minhash" else "cosine"
        # Greedy in rank order: a candidate goes if it is at least `threshold` similar to a better-ranked
        # survivor. Only a candidate with some better-ranked document over the threshold can go, so the
        # loop visits those few; everything else is kept without looking.
        n = len(compared)
        over = np.tril(similarity >= p.threshold - SIMILARITY_TOLERANCE, k=-1)
        kept = np.ones(n, dtype=bool)
        for position in np.flatnonzero(over.any(axis=1)).tolist():
            if not over[position, :position][kept[:position]].any():
                continue
            against = np.where(kept[:position], similarity[position, :position], -np.inf)
            best = int(np.argmax(against))  # the most similar survivor; ties: the better-ranked one
            value = float(against[best])
            kept[position] = False
            survivor = compared[best]
            candidate = compared[position]
            drops.append(Drop(candidate.doc_id, "near_duplicate",
                              f"duplicate_of={survivor.doc_id} ({measure} {value:.4f} >= {p.threshold:g})"))
            absorbed.setdefault(survivor.doc_id, []).append([candidate.doc_id, round(value, 6)])
        kept_positions = np.flatnonzero(kept).tolist()
        survivors = [compared[i] for i in kept_positions]
        mmr_notes: dict[str, tuple[float, float, float]] = {}
        if p.mmr_lambda is not None and survivors:
            survivors = self._mmr(survivors, similarity[np.ix_(kept_positions, kept_positions)], mmr_notes)
        output = survivors + list(beyond)
        if beyond:
            decisions.append(Decision("beyond_window", f"{len(beyond)} candidates after the first {p.window} were "
                                      "not compared and pass through"))
        details: dict[str, Any] = {
            "method": p.method, "threshold": p.threshold, "similarity": self._source,
            "compared": len(compared), "dropped": len(drops), "absorbed": absorbed,
        }
        if p.method == "minhash":  # read from the index's minhash component, or signed here
            details["signatures"] = "index" if self._index_signatures is not None else "computed"
        if p.mmr_lambda is not None:
            details["mmr"] = {"lambda": p.mmr_lambda, "ordered": len(mmr_notes)}
        self._notes.put_for(ctx.query, {"absorbed": absorbed, "mmr": mmr_notes})
        return StageResult(candidates=output, drops=drops, decisions=decisions, details=details,
                           timings_ms={"similarity": similarity_ms})

    def _mmr(self, survivors: list[Candidate], similarity: Any, notes: dict[str, tuple[float, float, float]]) -> list[Candidate]:
        """Greedy MMR over the first ``mmr_top`` survivors; each gets an ``mmr`` ledger entry."""
        import numpy as np

        p = self.params
        lam = float(p.mmr_lambda)  # type: ignore[arg-type]
        top = len(survivors) if p.mmr_top is None else min(p.mmr_top, len(survivors))
        pool = survivors[:top]
        scores = np.asarray([c.score for c in pool], dtype=np.float64)
        span = scores.max() - scores.min()
        relevance = np.ones_like(scores) if span == 0 else (scores - scores.min()) / span
        # redundancy[i]: max similarity of pool[i] to the documents selected so far, kept up to date with
        # one vector maximum per step (O(top^2) in all, not a max over the selected set per step).
        redundancy = np.zeros(top)
        gain = lam * relevance  # -inf once selected, so no mask is rebuilt per step
        values = np.empty(top)
        ordered: list[Candidate] = []
        for _ in range(top):
            np.multiply(redundancy, -(1.0 - lam), out=values)
            values += gain
            position = int(np.argmax(values))  # ties go to the better-ranked input (the lowest position)
            gain[position] = -np.inf
            candidate = pool[position]
            value = float(values[position])
            notes[candidate.doc_id] = (value, float(relevance[position]), float(redundancy[position]))
            ordered.append(candidate.with_score(ScoreEntry(self.id, "mmr", value, len(ordered) + 1)))
            np.maximum(redundancy, similarity[:top, position], out=redundancy)
        return ordered + survivors[top:]

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        """Written for MMR entries (the only ledger entries this stage makes)."""
        lam = self.params.mmr_lambda
        description = (f"MMR: {lam:g} x rel - {1 - (lam or 0):g} x max sim to already selected ({self._source}); "
                       f"rank {rank} in stage '{self.id}'")
        found = self._notes.get_for(query)
        if found is None:
            return Explanation(value, description)
        details = []
        note = found["mmr"].get(candidate.doc_id)
        if note is not None:
            details.append(Explanation(note[1], "rel: current score min-max normalised over the survivors"))
            details.append(Explanation(note[2], "max similarity to the documents selected before it"))
        for doc_id, similarity in found["absorbed"].get(candidate.doc_id, []):
            details.append(Explanation(similarity, f"absorbed near-duplicate '{doc_id}'"))
        return Explanation(value, description, tuple(details))
