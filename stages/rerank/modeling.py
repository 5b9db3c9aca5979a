"""Cross-encoder plumbing shared by training and the rerank stage: pair encoding, heads, precision.

Pairs are tokenised *without* library truncation and cut here, so the caller learns how many query and
document tokens were dropped (truncation is recorded, never silent). A long document is tokenised as a prefix
long enough for what is kept (the cost does not grow with its length), so its total is then a lower bound.
The segment positions come from the fast tokenizer's ``sequence_ids``, so the same code serves a
BERT template (``[CLS] q [SEP] d [SEP]``) and an XLM-R one (``<s> q </s></s> d </s>``).

Heads:
- ``sequence_classification``: the model's own logit (any HF cross-encoder, e.g. bge-reranker).
- ``segment_cosine``: ``scale * cos(mean(query-segment states), mean(document-segment states))``
  of the jointly encoded pair; no new parameters, so it starts from a bi-encoder's semantics.

torch is imported inside functions only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

SEGMENT_COSINE = "segment_cosine"
SEQUENCE_CLASSIFICATION = "sequence_classification"
DEFAULT_SCALE = 20.0
DEFAULT_MAX_QUERY_TOKENS = 64
# A long document is tokenised first as a prefix of this many characters per token the pair may keep (English runs
# at 4 to 5 characters a token; numbers and symbols fewer), and at least MIN_PREFIX_CHARS: one tokenisation almost
# always suffices, and a prefix too short is doubled.
PREFIX_CHARS_PER_TOKEN = 8
MIN_PREFIX_CHARS = 2048


@dataclass(frozen=True)
class EncodedPair:
    """One (query, document) pair as model input, and what was cut to make it fit."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...] | None
    query_positions: tuple[int, int]  # [start, end) of the query segment
    document_positions: tuple[int, int]  # [start, end) of the document segment
    query_tokens: int  # before any cut
    document_tokens: int  # before any cut; a lower bound unless document_tokens_exact
    query_cut: int
    document_cut: int  # > 0 when the document was cut; a lower bound unless document_tokens_exact
    chunk: int = 0  # which chunk of the document (long-document mode)
    chunk_start: int = 0  # first document token of this chunk
    document_tokens_exact: bool = True  # False: a prefix of a long document was tokenised, not the whole text

    def __len__(self) -> int:
        return len(self.input_ids)


def _segment_span(sequence_ids: Sequence[int | None], which: int) -> tuple[int, int]:
    positions = [i for i, s in enumerate(sequence_ids) if s == which]
    if not positions:
        # An empty segment sits right after the specials that precede it.
        return (0, 0)
    return (positions[0], positions[-1] + 1)


def _slice(
    ids: list[int],
    types: list[int] | None,
    query_span: tuple[int, int],
    doc_span: tuple[int, int],
    query_keep: int,
    doc_start: int,
    doc_keep: int,
) -> tuple[tuple[int, ...], tuple[int, ...] | None, tuple[int, int], tuple[int, int]]:
    """Keep ``query_keep`` query tokens and document tokens [doc_start, doc_start+doc_keep)."""
    q0, q1 = query_span
    d0, d1 = doc_span
    keep = list(range(0, q0)) + list(range(q0, q0 + query_keep)) + list(range(q1, d0))
    new_d0 = len(keep)
    keep += list(range(d0 + doc_start, d0 + doc_start + doc_keep))
    new_d1 = len(keep)
    keep += list(range(d1, len(ids)))
    new_ids = tuple(ids[i] for i in keep)
    new_types = tuple(types[i] for i in keep) if types is not None else None
    return new_ids, new_types, (q0, q0 + query_keep), (new_d0, new_d1)


def splits_at_spaces(tokenizer: Any) -> bool:
    """True when the tokenizer's pre-tokenizer always ends a piece at a space (BERT, WordPiece/BPE ``Whitespace``,
    SentencePiece ``Metaspace``, byte-level BPE): then the tokens of ``text[:j]``, where ``text[j]`` is a space after
    a non-space, are exactly the first tokens of ``text``, and a long document can be tokenised as a prefix."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre_tokenizer = getattr(backend, "pre_tokenizer", None)
    if pre_tokenizer is None:
        return False
    try:
        spec = json.loads(pre_tokenizer.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return False
    return _spec_splits_at_spaces(spec)


def _spec_splits_at_spaces(spec: Any) -> bool:
    if not isinstance(spec, dict):
        return False
    kind = spec.get("type")
    if kind in ("BertPreTokenizer", "Whitespace", "WhitespaceSplit"):
        return True
    if kind == "Metaspace":
        return spec.get("split", True) is True
    if kind == "ByteLevel":
        return spec.get("use_regex", True) is True
    if kind == "Sequence":  # later pre-tokenizers only split further
        return any(_spec_splits_at_spaces(part) for part in spec.get("pretokenizers") or [])
    return False


def _prefix_before_space(text: str, limit: int) -> str:
    """The longest ``text[:j]`` with ``j <= limit``, ``text[j]`` a space and ``text[j - 1]`` no whitespace; "" if none.

    Whitespace before the cut is left out too: a normalizer may turn a newline or a control character into a space
    or drop it, and a prefix ending in one could tokenise differently from the same place in the whole text."""
    cut = text.rfind(" ", 0, limit + 1)
    while cut > 0 and text[cut - 1].isspace():
        cut = text.rfind(" ", 0, cut)
    return text[:cut] if cut > 0 else ""


def document_tokens_read(max_length: int, chunk_overlap: int | None, max_chunks: int) -> int:
    """At most how many document tokens a pair keeps: ``max_length`` when truncating, ``max_chunks`` windows with
    ``chunk_overlap`` when chunking (what sizes the prefix ``encode_pairs`` tokenises first)."""
    if chunk_overlap is None:
        return max_length
    return max_length + (max_chunks - 1) * max(1, max_length - chunk_overlap)


def encode_pairs(
    tokenizer: Any,
    queries: Sequence[str],
    documents: Sequence[str],
    max_length: int,
    *,
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
    chunk_overlap: int | None = None,
    max_chunks: int = 8,
) -> list[list[EncodedPair]]:
    """Encode pairs, cutting to ``max_length``; one list per pair (several when chunking).

    Cutting policy: the query keeps at most ``max_query_tokens`` tokens when the pair is too long;
    the document then loses tokens from its end. With ``chunk_overlap`` set, a long document is
    instead split into overlapping windows (at most ``max_chunks``; what lies beyond is cut).

    Cost: a document longer than ``PREFIX_CHARS_PER_TOKEN`` characters per token it may keep (at least
    ``MIN_PREFIX_CHARS``) is tokenised as a prefix ending before a space, doubled until it yields more tokens than
    are kept, else the whole text; so the cost does not grow with the document's length. The pairs are the ones
    the whole text gives, token for token; only the document's total (``document_tokens``, ``document_cut``) is
    then a lower bound (``document_tokens_exact`` False). A tokenizer that may join words across a space
    (``splits_at_spaces`` False) reads whole texts.
    """
    queries, documents = list(queries), list(documents)
    prefix_chars = max(MIN_PREFIX_CHARS,
                       PREFIX_CHARS_PER_TOKEN * document_tokens_read(max_length, chunk_overlap, max_chunks))
    # characters read of each document; None: the whole text
    limits: list[int | None] = [prefix_chars if splits_at_spaces(tokenizer) else None] * len(documents)
    results: list[list[EncodedPair] | None] = [None] * len(documents)
    pending = list(range(len(documents)))
    while pending:
        texts = []
        for index in pending:
            limit = limits[index]
            if limit is not None and limit >= len(documents[index]):
                limits[index] = limit = None
            texts.append(documents[index] if limit is None else _prefix_before_space(documents[index], limit))
        encoded = tokenizer(
            [queries[index] for index in pending],
            texts,
            add_special_tokens=True,
            truncation=False,
            padding=False,
            return_attention_mask=False,
            verbose=False,
        )
        short = []
        for row, index in enumerate(pending):
            pairs = _cut_pair(encoded, row, max_length, max_query_tokens, chunk_overlap, max_chunks,
                              whole=limits[index] is None)
            if pairs is None:  # the prefix ends before what is kept: read twice as much
                limits[index] = 2 * limits[index]  # type: ignore[operator]
                short.append(index)
            else:
                results[index] = pairs
        pending = short
    return results  # type: ignore[return-value]


def _cut_pair(
    encoded: Any,
    row: int,
    max_length: int,
    max_query_tokens: int,
    chunk_overlap: int | None,
    max_chunks: int,
    *,
    whole: bool,
) -> list[EncodedPair] | None:
    """The pair (or its chunks) of ``encoded``'s row ``row``; ``whole`` False: the row holds a prefix of the
    document, and None says it is too short to give what the whole text would."""
    ids = list(encoded["input_ids"][row])
    types = list(encoded["token_type_ids"][row]) if "token_type_ids" in encoded else None
    sequence_ids = encoded.sequence_ids(row)
    query_span = _segment_span(sequence_ids, 0)
    doc_span = _segment_span(sequence_ids, 1)
    if doc_span == (0, 0):
        doc_span = (len(ids) - 1, len(ids) - 1)
    query_tokens = query_span[1] - query_span[0]
    doc_tokens = doc_span[1] - doc_span[0]
    specials = len(ids) - query_tokens - doc_tokens
    overflow = len(ids) - max_length
    if whole and overflow <= 0:
        return [EncodedPair(tuple(ids), tuple(types) if types is not None else None, query_span, doc_span,
                            query_tokens, doc_tokens, 0, 0)]
    query_keep = min(query_tokens, max_query_tokens)
    room = max_length - specials - query_keep
    if room < 1:  # absurdly small max_length: keep one document token, cut the query further
        query_keep = max(0, max_length - specials - 1)
        room = max(0, max_length - specials - query_keep)
    query_cut = query_tokens - query_keep
    stride = max(1, room - chunk_overlap) if chunk_overlap is not None else 0
    if not whole:
        # The whole text has at least doc_tokens tokens. More than the pair keeps (more than the chunks reach):
        # then it is cut as the prefix is, the same tokens kept; else the cut may lie beyond the prefix.
        kept_at_most = room if chunk_overlap is None else room + (max_chunks - 1) * stride
        if doc_tokens <= kept_at_most:
            return None
    if chunk_overlap is None or doc_tokens <= room:
        doc_keep = min(doc_tokens, room)
        new = _slice(ids, types, query_span, doc_span, query_keep, 0, doc_keep)
        return [EncodedPair(new[0], new[1], new[2], new[3], query_tokens, doc_tokens, query_cut, doc_tokens - doc_keep,
                            document_tokens_exact=whole)]
    chunks = []
    start = 0
    while len(chunks) < max_chunks:
        keep = min(room, doc_tokens - start)
        new = _slice(ids, types, query_span, doc_span, query_keep, start, keep)
        covered_to = start + keep
        chunks.append((new, start, covered_to))
        if covered_to >= doc_tokens:
            break
        start += stride
    uncovered = doc_tokens - chunks[-1][2]
    return [EncodedPair(n[0], n[1], n[2], n[3], query_tokens, doc_tokens, query_cut, uncovered, i, s,
                        document_tokens_exact=whole)
            for i, (n, s, _) in enumerate(chunks)]


def collate(pairs: Sequence[EncodedPair], pad_token_id: int, with_segments: bool) -> dict[str, Any]:
    """Pad a batch to its longest member (dynamic padding); segment masks for segment_cosine."""
    import torch

    width = max(len(p) for p in pairs)
    count = len(pairs)
    input_ids = torch.full((count, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((count, width), dtype=torch.long)
    has_types = pairs[0].token_type_ids is not None
    types = torch.zeros((count, width), dtype=torch.long) if has_types else None
    query_mask = torch.zeros((count, width), dtype=torch.float32) if with_segments else None
    doc_mask = torch.zeros((count, width), dtype=torch.float32) if with_segments else None
    for row, pair in enumerate(pairs):
        length = len(pair)
        input_ids[row, :length] = torch.tensor(pair.input_ids, dtype=torch.long)
        attention[row, :length] = 1
        if types is not None and pair.token_type_ids is not None:
            types[row, :length] = torch.tensor(pair.token_type_ids, dtype=torch.long)
        if with_segments:
            query_mask[row, pair.query_positions[0] : pair.query_positions[1]] = 1.0
            doc_mask[row, pair.document_positions[0] : pair.document_positions[1]] = 1.0
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
    if types is not None:
        batch["token_type_ids"] = types
    if with_segments:
        batch["query_mask"] = query_mask
        batch["document_mask"] = doc_mask
    return batch


def segment_cosine_scores(hidden: Any, query_mask: Any, document_mask: Any, scale: float) -> Any:
    """``scale * cos(mean query-segment state, mean document-segment state)``, in float32."""
    import torch

    hidden = hidden.float()
    query = (hidden * query_mask.unsqueeze(-1)).sum(1) / query_mask.sum(1, keepdim=True).clamp(min=1.0)
    document = (hidden * document_mask.unsqueeze(-1)).sum(1) / document_mask.sum(1, keepdim=True).clamp(min=1.0)
    return scale * torch.nn.functional.cosine_similarity(query, document, dim=-1)


def forward_scores(model: Any, batch: dict[str, Any], head: str, scale: float) -> Any:
    """Scores for a collated batch (one per row), float32."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if head == SEGMENT_COSINE:
        hidden = model(**inputs, return_dict=True).last_hidden_state
        return segment_cosine_scores(hidden, batch["query_mask"], batch["document_mask"], scale)
    return model(**inputs, return_dict=True).logits.view(-1).float()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower."""
    if os.environ.get("SIEVE_CPU_BF16") in ("0", "1"):  # explicit override for experiments
        return os.environ["SIEVE_CPU_BF16"] == "1"
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"
