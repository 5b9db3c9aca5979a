"""dedup.near_duplicate with method: minhash signs all uncached candidates in one batch (``minhash_signatures``,
numpy) instead of one datasketch MinHash per document: the signatures must stay datasketch's, value for value, so
results and traces do not change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash

from engine.index import Index
from engine.pipeline import Pipeline
from stages import dedup
from stages.dedup import minhash_signatures, shingle_bytes, shingles

ROOT = Path(__file__).resolve().parents[2]
SCIFACT_CORPUS = ROOT.parent / "shared" / "data" / "scifact" / "corpus.jsonl"
MINI_CORPUS = ROOT / "examples" / "scifact-mini" / "corpus.jsonl"

EDGE_TEXTS = [
    "", " ", "...", "—", "one", "two words", "exactly three words", "Metformin lowers blood glucose.",
    "二甲双胍可能引起乳酸性酸中毒，肾功能不全者慎用。", "二甲双胍可能引起乳酸酸中毒，肾功能不全者慎用。", "metformin 二甲双胍",
    "特斯拉（TSLA）发布财报 and an English sentence inside a Chinese document.", "𠀀𠀁𠀂 supplementary-plane Han",
    "café cafe\u0301 CAFÉ Straße STRASSE", "ＨＩＶ ﬁbrosis", "a a a a a a a a", "x " * 5000,
]


def scifact_texts(count: int) -> list[str]:
    path = SCIFACT_CORPUS if SCIFACT_CORPUS.is_file() else MINI_CORPUS
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            texts.append(" ".join(part for part in (record.get("title"), record.get("text")) if part))
            if len(texts) == count:
                break
    return texts


def datasketch_signature(text: str, shingle_size: int, num_perm: int, seed: int) -> list[int] | None:
    """What the stage computed before: datasketch's MinHash of the sorted shingles' UTF-8 bytes (None: no shingle)."""
    grams = sorted(shingles(text, shingle_size))
    if not grams:
        return None
    sketch = MinHash(num_perm=num_perm, seed=seed, scheme=dedup.MINHASH_SCHEME)
    sketch.update_batch([g.encode("utf-8") for g in grams])
    return [int(v) for v in sketch.hashvalues]


@pytest.mark.parametrize("shingle_size, num_perm, seed", [(3, 128, 1), (1, 16, 0), (2, 64, 12345), (5, 256, 7),
                                                          (20, 1024, 2**31 + 5)])
def test_signatures_equal_datasketch(shingle_size, num_perm, seed):
    texts = scifact_texts(150) + EDGE_TEXTS
    signatures, empty = minhash_signatures(texts, shingle_size, num_perm, seed)
    assert signatures.shape == (len(texts), num_perm) and signatures.dtype == np.uint32
    for position, text in enumerate(texts):
        expected = datasketch_signature(text, shingle_size, num_perm, seed)
        if expected is None:
            assert empty[position] and not signatures[position].any(), text
        else:
            assert not empty[position] and signatures[position].tolist() == expected, text[:60]
    assert empty.sum() == 4  # "", " ", "...", "—"


def test_signatures_do_not_depend_on_the_batch_or_chunking(monkeypatch):
    """A document's signature is the same alone, in any batch, and whatever the chunk size cuts through."""
    texts = scifact_texts(40) + EDGE_TEXTS
    together, empty = minhash_signatures(texts, 3, 128, 1)
    alone = [minhash_signatures([t], 3, 128, 1)[0][0] for t in texts]
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))
    for chunk in (1, 7, 211, 100_000):
        monkeypatch.setattr(dedup, "_SHINGLES_PER_CHUNK", chunk)
        again, empty_again = minhash_signatures(texts, 3, 128, 1)
        assert np.array_equal(again, together) and np.array_equal(empty_again, empty)
    assert minhash_signatures([], 3, 128, 1)[0].shape == (0, 128)


def test_shingle_bytes_are_the_encoded_shingles():
    for text in scifact_texts(50) + EDGE_TEXTS:
        for size in (1, 3, 4):
            assert shingle_bytes(text, size) == {g.encode("utf-8") for g in shingles(text, size)}


@pytest.mark.parametrize("num_perm, threshold", [(128, 0.02), (16, 0.0625)])
def test_stage_output_and_trace_on_a_real_index_are_the_datasketch_ones(tmp_path, bm25_index, num_perm, threshold):
    """The stage on the SciFact slice: every signature is datasketch's, and the drops, survivors and details are
    the textbook greedy pass over datasketch's Jaccard estimates, as before the batching. With 16 permutations the
    estimates are sixteenths, so a candidate is often as similar to two survivors: it names the better-ranked one."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"version: 1\nindex: {bm25_index}\nstages:\n"
        "  - {id: bm25, type: recall.bm25, params: {top_k: 200}}\n"
        "  - {id: dedup, type: dedup.near_duplicate, inputs: [bm25], params: {method: minhash, "
        f"threshold: {threshold}, num_perm: {num_perm}}}}}\n"
        "output: dedup\ntrace: {log: null}\n", encoding="utf-8")
    pipeline = Pipeline.from_file(config)
    pipeline.warm_up()
    stage = pipeline.compiled.stages["dedup"]
    opened = Index.open(bm25_index)
    result = pipeline.search("metformin diabetes insulin glucose treatment")
    record = next(s for s in result.trace["stages"] if s["id"] == "dedup")
    ranked = [doc_id for doc_id, _ in next(s for s in result.trace["stages"] if s["id"] == "bm25")["output"]]
    assert len(ranked) >= 20
    rows = [opened.row_of(d) for d in ranked]
    documents = opened.documents.get(rows)
    reference = [datasketch_signature(documents[r].content(("title", "text")), 3, num_perm, 1) for r in rows]
    signatures, empty = stage._signatures(rows)
    for position, expected in enumerate(reference):
        assert (expected is None) == bool(empty[position])
        if expected is not None:
            assert signatures[position].tolist() == expected
    # the textbook greedy pass over datasketch's estimates
    sketches = [None if s is None else MinHash(num_perm=num_perm, seed=1, hashvalues=s, scheme="affine32")
                for s in reference]
    kept: list[int] = []
    drops: list[tuple[str, str]] = []
    absorbed: dict[str, list[list[object]]] = {}
    tied = 0  # drops as similar to two survivors or more
    for i, sketch in enumerate(sketches):
        similar = [(sketch.jaccard(sketches[j]) if sketch is not None and sketches[j] is not None else 0.0, j)
                   for j in kept]
        best = max((s for s in similar if s[0] >= threshold - 1e-6), key=lambda s: (s[0], -s[1]), default=None)
        tied += best is not None and sum(value == best[0] for value, _ in similar) > 1
        if best is None:
            kept.append(i)
        else:
            drops.append((ranked[i], f"duplicate_of={ranked[best[1]]}"))
            absorbed.setdefault(ranked[best[1]], []).append([ranked[i], round(best[0], 6)])
    assert drops, "the threshold should make some drops"
    assert tied or num_perm == 128, "16 permutations should give a tie to break"
    assert [d for d, _ in record["output"]] == [ranked[i] for i in kept]
    assert [(d["doc_id"], d["detail"].split()[0]) for d in record["drops"]] == drops
    details = record["details"]
    assert details["absorbed"] == absorbed
    assert details["similarity"] == f"MinHash (datasketch, affine32, {num_perm} permutations, seed 1) of word 3-grams"
    assert (details["compared"], details["dropped"]) == (len(ranked), len(drops))


def test_one_blas_thread_limits_the_product_and_restores_the_pool_even_from_many_threads():
    """The embedding similarity product runs numpy's BLAS on one thread (bench/dedup_blas.py: an 8 ms stall next to
    torch's pool, on 1 product in 10); the limit is process-wide while it lasts, so overlapping products must not
    leave it behind (each restoring the other's one thread)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from threadpoolctl import threadpool_info

    from stages.dedup import one_blas_thread

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    vectors = np.random.default_rng(0).standard_normal((200, 384)).astype(np.float32)
    with one_blas_thread():
        assert set(blas_threads()) <= {1}
        limited = vectors @ vectors.T
    assert (limited == vectors @ vectors.T).all()  # the same bits

    def product(_: int) -> None:
        with one_blas_thread():
            vectors @ vectors.T

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(product, range(200)))
    assert blas_threads() == before
