"""BM25 recall with bm25s: the ``bm25`` index component and the ``recall.bm25`` stage.

Scores come from bm25s (Lucene variant by default, k1=1.5, b=0.75). Top-k selection is done
here rather than by bm25s so that it is deterministic (ties break on doc_id) and honours the
prefilter mask: masked documents score zero and never take a recall slot.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import Field

from engine.errors import SieveIndexError
from engine.index import ComponentSettings, Document, IndexComponent, Progress
from engine.model import Candidate, Decision, Query, ScoreEntry
from engine.registry import register_index_component, register_stage
from engine.stage import Explanation, Port, RecentNotes, Resources, Stage, StageContext, StageParams, StageResult
from stages.text import Tokenizer, TokenizerSettings

TOKENIZER_FILE = "tokenizer.json"

# What bm25s computes for each method (bm25s/scoring.py; Kamphuis et al., ECIR 2020), as the explanation states it.
# N documents, df(t) of them holding t, tf its count in the document, dl the document's length in terms.
_NORM = "(1-b+b*dl/avgdl)"
FORMULAS = {
    "lucene": f"idf(t) * tf / (tf + k1*{_NORM}), idf(t) = ln(1 + (N-df+0.5)/(df+0.5))",
    "robertson": f"idf(t) * tf / (tf + k1*{_NORM}), idf(t) = ln((N-df+0.5)/(df+0.5)), "
    "0 for a term in more than about half the documents",
    "atire": f"idf(t) * tf*(k1+1) / (tf + k1*{_NORM}), idf(t) = ln(N/df), 0 for a term in every document",
    "bm25l": f"idf(t) * (k1+1)*(c+delta) / (k1+c+delta), c = tf/{_NORM}, idf(t) = ln((N+1)/(df+0.5)), "
    "delta = {delta}; a query term the document lacks still scores idf(t)*(k1+1)*delta/(k1+delta)",
    "bm25+": f"idf(t) * ((k1+1)*tf / (k1*{_NORM} + tf) + delta), idf(t) = ln((N+1)/df), delta = {{delta}}; "
    "a query term the document lacks still scores idf(t)*delta",
}


# The largest k1: far above any tuned value (0.9 to 2; tuning grids stop near 4). Already at 1000 a term's weight is
# close to linear in tf / norm for the term counts documents have (tf << k1 * norm), so a larger k1 would change little
# but the scale; and every score stays far inside the float32 score matrix's range: atire, bm25l and bm25+ multiply by
# k1 + 1, so a query term adds at most idf * (k1 + 1) < 30 * 1001 (k1 = 1e308 made every score inf; above 3.4e38, k1
# itself is inf in float32).
K1_MAX = 1000


class BM25IndexSettings(ComponentSettings):
    """BM25 over the documents' terms (bm25s), which recall.bm25 searches."""

    tokenizer: TokenizerSettings = Field(
        default_factory=TokenizerSettings,
        description="how text becomes terms; recorded in the index, and queries are tokenised the same way",
    )
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = Field(
        "lucene", description="the BM25 variant (bm25s; Kamphuis et al., ECIR 2020); each explanation states its "
        "formula",
    )
    k1: float = Field(
        1.5, ge=0, le=K1_MAX, description="term-frequency saturation: 0 ignores how often a term occurs, higher values "
        f"let repeats count for longer (usually 0.9 to 2; at most {K1_MAX:g})",
    )
    b: float = Field(
        0.75, ge=0, le=1, description="document-length normalisation: 0 none, 1 full (a long document's term "
        "counts weigh less)",
    )
    fields: tuple[str, ...] = Field(("title", "text"), min_length=1, description="fields indexed, joined")


@register_index_component
class BM25Component(IndexComponent):
    name = "bm25"
    Settings = BM25IndexSettings

    def build(
        self, documents: Sequence[Document], out_dir: Path, settings: ComponentSettings, progress: Progress
    ) -> dict[str, Any]:
        """bm25s's index of the documents, built without holding their tokens or a list of id lists: each batch's
        terms become an int32 array (ids in order of first appearance, renumbered once the vocabulary is sorted),
        and the score matrix is filled column by column as bm25s's ``index`` computes it (the same files, byte for
        byte; tests/engine/test_index_build_memory.py checks it against ``bm25s.BM25.index``)."""
        import bm25s
        import numpy as np

        assert isinstance(settings, BM25IndexSettings)
        tokenizer = Tokenizer(settings.tokenizer)
        total = len(documents)
        first_seen: dict[str, int] = {}  # term -> provisional id, in order of first appearance
        batches: list[tuple[Any, Any]] = []  # (provisional ids of a batch's terms, int32; each document's length)
        ids: list[int] = []
        lengths: list[int] = []
        number = first_seen.setdefault
        for doc in documents:
            tokens = tokenizer.tokenize(doc.content(settings.fields))
            ids.extend([number(t, len(first_seen)) for t in tokens])
            lengths.append(len(tokens))
            if len(lengths) == _BATCH:
                batches.append((np.asarray(ids, dtype=np.int32), np.asarray(lengths, dtype=np.int64)))
                progress("bm25 tokenise", len(lengths), total)
                ids, lengths = [], []
        if lengths:
            batches.append((np.asarray(ids, dtype=np.int32), np.asarray(lengths, dtype=np.int64)))
            progress("bm25 tokenise", len(lengths), total)
        del ids, lengths
        # the vocabulary in sorted order: bm25s orders it by iterating a set (PYTHONHASHSEED), so two builds of one
        # corpus wrote other column orders and other bytes; the empty token "" last, as bm25s adds it
        words = sorted(first_seen.keys() - {""})
        column_of = np.empty(len(first_seen), dtype=np.int32)  # provisional id -> column
        column_of[np.fromiter((first_seen[w] for w in words), dtype=np.int64, count=len(words))] = np.arange(
            len(words), dtype=np.int32)
        if "" in first_seen:
            column_of[first_seen[""]] = len(words)
        del first_seen
        vocab = {token: column for column, token in enumerate(words)}
        vocab[""] = len(vocab)
        del words
        retriever = bm25s.BM25(k1=settings.k1, b=settings.b, method=settings.method)
        retriever.scores, retriever.nonoccurrence_array = _score_matrix(retriever, batches, column_of, len(vocab))
        retriever.vocab_dict = vocab
        retriever.save(str(out_dir), show_progress=False)
        (out_dir / TOKENIZER_FILE).write_text(settings.tokenizer.model_dump_json(indent=2), encoding="utf-8")
        doc_lengths = np.concatenate([lengths for _, lengths in batches]) if batches else np.zeros(0, np.int64)
        return {
            "library": f"bm25s {bm25s.__version__}",
            "vocab_size": len(retriever.vocab_dict),
            "avg_doc_terms": round(int(doc_lengths.sum()) / max(1, len(doc_lengths)), 2),
            "empty_documents": int((doc_lengths == 0).sum()),
        }


_BATCH = 1000  # documents tokenised, then scored, at a time


def _document_terms(ids: Any, lengths: Any, vocab_size: int) -> tuple[Any, Any, Any]:
    """A batch's (document in the batch, term, count) for each distinct term of each document, ordered by document
    then term."""
    import numpy as np

    local = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    keys, counts = np.unique(local * vocab_size + ids, return_counts=True)
    return keys // vocab_size, (keys % vocab_size).astype(np.int32), counts


def _score_matrix(retriever: Any, batches: list[tuple[Any, Any]], column_of: Any, vocab_size: int) -> tuple[dict[str, Any], Any]:
    """bm25s's score matrix (``retriever.scores``: a documents x terms CSC matrix) and non-occurrence array, equal to
    what ``retriever.index((id lists, vocab))`` computes (bm25s/__init__.py ``build_index_from_ids``: document
    frequencies, idf, one score per distinct term of each document, ``scipy.sparse.csc_matrix``), from the batches'
    term ids instead of one Python list of id lists (some 30 bytes a term). The scores are bm25s's own functions
    over a batch's terms at once; the columns are filled in document order, as scipy's conversion orders them.
    Each batch's ids are renumbered to columns in place and dropped once scored."""
    import numpy as np
    from bm25s import scoring

    n_docs = sum(len(lengths) for _, lengths in batches)
    doc_frequencies = np.zeros(vocab_size, dtype=np.int64)
    for position, (ids, lengths) in enumerate(batches):
        ids = column_of[ids]
        batches[position] = (ids, lengths)
        doc_frequencies += np.bincount(_document_terms(ids, lengths, vocab_size)[1], minlength=vocab_size)
    avg_doc_len = (np.concatenate([lengths for _, lengths in batches]) if batches else np.zeros(0, np.int64)).mean()
    frequencies = dict(enumerate(doc_frequencies.tolist()))
    idf_of = scoring._select_idf_scorer(retriever.idf_method)
    calculate_tfc = scoring._select_tfc_scorer(retriever.method)
    nonoccurrence = None
    if retriever.method in retriever.methods_requiring_nonoccurrence:
        nonoccurrence = scoring._build_nonoccurrence_array(
            doc_frequencies=frequencies, n_docs=n_docs, compute_idf_fn=idf_of, calculate_tfc_fn=calculate_tfc,
            l_d=avg_doc_len, l_avg=avg_doc_len, k1=retriever.k1, b=retriever.b, delta=retriever.delta,
            dtype=retriever.dtype,
        )
    idf = scoring._build_idf_array(doc_frequencies=frequencies, n_docs=n_docs, compute_idf_fn=idf_of,
                                   dtype=retriever.dtype)
    del frequencies
    nnz = int(doc_frequencies.sum())
    # the dtypes bm25s's CSC builders give: its own (csc_backend "numpy", the default) int64 column pointers and
    # rows of its int_dtype; scipy's int32 both, unless the matrix is too large
    if retriever.csc_backend == "numpy":
        indptr_dtype, index_dtype = np.dtype(np.int64), np.dtype(retriever.int_dtype)
    else:
        fits = max(nnz, n_docs, vocab_size) <= np.iinfo(np.int32).max
        indptr_dtype = index_dtype = np.dtype(np.int32 if fits else np.int64)
    indptr = np.zeros(vocab_size + 1, dtype=indptr_dtype)
    np.cumsum(doc_frequencies, out=indptr[1:])
    del doc_frequencies
    data = np.empty(nnz, dtype=retriever.dtype)
    indices = np.empty(nnz, dtype=index_dtype)
    next_free = indptr[:-1].astype(np.int64)  # each column's next slot
    first_row = 0
    for position, (ids, lengths) in enumerate(batches):
        batches[position] = (None, lengths)
        local, terms, counts = _document_terms(ids, lengths, vocab_size)
        del ids
        if not len(terms):  # a batch of documents without terms
            first_row += len(lengths)
            continue
        tf = counts.astype(retriever.dtype)
        scores = _term_scores(calculate_tfc, tf, local, lengths, terms, idf, nonoccurrence, avg_doc_len, retriever)
        order = np.argsort(terms, kind="stable")  # by column, documents still in order within one
        terms = terms[order]
        starts = np.flatnonzero(np.concatenate(([True], terms[1:] != terms[:-1])))
        run = np.diff(np.append(starts, len(terms)))
        slots = next_free[terms] + (np.arange(len(terms)) - np.repeat(starts, run))
        data[slots] = scores[order]
        indices[slots] = local[order] + first_row
        next_free[terms[starts]] += run
        first_row += len(lengths)
    return {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}, nonoccurrence


@functools.cache
def _array_lengths_match_scalar() -> bool:
    """Whether NumPy promotes a float64 scalar with a float32 array to float64 (NEP 50, NumPy 2). bm25s scores each
    document with its length as a scalar, so a whole batch's lengths as an array give the same float64 values only
    then; under NumPy 1's value-based casting each document is scored on its own, as bm25s does."""
    import numpy as np

    return bool((np.float64(1.0) + np.ones(1, dtype=np.float32)).dtype == np.float64)


def _term_scores(calculate_tfc: Any, tf: Any, local: Any, lengths: Any, terms: Any, idf: Any, nonoccurrence: Any,
                 avg_doc_len: Any, retriever: Any) -> Any:
    """Each (document, term)'s score as bm25s's ``_build_scores_and_indices_for_matrix`` computes it (in float64
    where NumPy promotes to it, stored as the matrix's dtype)."""
    import numpy as np

    if _array_lengths_match_scalar():
        tfc = calculate_tfc(tf_array=tf, l_d=lengths[local], l_avg=avg_doc_len, k1=retriever.k1, b=retriever.b,
                            delta=retriever.delta)
        scores = idf[terms] * tfc
        if retriever.method in ("bm25l", "bm25+"):
            scores -= nonoccurrence[terms]
        return scores.astype(retriever.dtype)
    scores = np.empty(len(tf), dtype=retriever.dtype)
    bounds = np.searchsorted(local, np.arange(len(lengths) + 1))
    for doc in range(len(lengths)):
        start, end = int(bounds[doc]), int(bounds[doc + 1])
        if start == end:
            continue
        tfc = calculate_tfc(tf_array=tf[start:end], l_d=int(lengths[doc]), l_avg=avg_doc_len, k1=retriever.k1,
                            b=retriever.b, delta=retriever.delta)
        doc_scores = idf[terms[start:end]] * tfc
        if retriever.method in ("bm25l", "bm25+"):
            doc_scores -= nonoccurrence[terms[start:end]]
        scores[start:end] = doc_scores
    return scores


class LoadedBM25:
    """A bm25s retriever plus the tokenizer it was built with, shared by every stage using it."""

    def __init__(self, directory: Path, entry: dict[str, Any]):
        import bm25s

        try:
            self.retriever = bm25s.BM25.load(str(directory), show_progress=False)
            recorded = json.loads((directory / TOKENIZER_FILE).read_text(encoding="utf-8"))
            # built before these settings: queries are tokenised as its documents were (and warm-up says so)
            self.predates_normalization = isinstance(recorded, dict) and "normalization" not in recorded
            if isinstance(recorded, dict):
                recorded.setdefault("normalization", "nfc")
                recorded.setdefault("segmentation", "precise")
            tokenizer_settings = TokenizerSettings.model_validate(recorded)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise SieveIndexError(f"BM25 component at {directory} cannot be loaded: {exc}") from None
        self.tokenizer = Tokenizer(tokenizer_settings)
        self.vocab: dict[str, int] = self.retriever.vocab_dict
        self.settings = entry.get("settings", {})
        self._columns_sorted = self._check_sorted_columns()

    def _check_sorted_columns(self) -> bool:
        """Whether every column's document rows are increasing (what ``term_score`` searches)."""
        import numpy as np

        matrix = self.retriever.scores
        starts = np.flatnonzero(np.diff(matrix["indices"]) <= 0) + 1  # where the rows stop increasing
        return bool(np.isin(starts, matrix["indptr"]).all())

    def _column(self, term: str) -> int | None:
        column = self.vocab.get(term)
        if column is None or column >= len(self.retriever.scores["indptr"]) - 1:
            return None  # unknown, or bm25s's placeholder "" token
        return column

    def matching(self, terms: Sequence[str]) -> Any:
        """A boolean per document: whether it holds any of ``terms`` (the score matrix's columns). Not
        ``score > 0``: under bm25l and bm25+ every document scores for a term it lacks, and under robertson
        and atire a term in most documents scores 0 where it occurs."""
        import numpy as np

        matrix = self.retriever.scores
        found = np.zeros(int(matrix["num_docs"]), dtype=bool)
        for column in {self._column(t) for t in terms} - {None}:
            found[matrix["indices"][int(matrix["indptr"][column]) : int(matrix["indptr"][column + 1])]] = True
        return found

    def holds(self, term: str, row: int) -> bool:
        """Whether document ``row`` holds ``term``."""
        column = self._column(term)
        if column is None:
            return False
        matrix = self.retriever.scores
        rows = matrix["indices"][int(matrix["indptr"][column]) : int(matrix["indptr"][column + 1])]
        return bool((rows == row).any())

    def holding(self, term: str, rows: Any) -> Any:
        """Whether each of ``rows`` (an int array) holds ``term``: :meth:`holds` for many documents at once."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        column = self._column(term)
        if column is None:
            return np.zeros(len(rows), dtype=bool)
        matrix = self.retriever.scores
        return np.isin(rows, matrix["indices"][int(matrix["indptr"][column]) : int(matrix["indptr"][column + 1])])

    def absent_score(self, term: str) -> float:
        """What ``term`` adds to a document that lacks it: 0 but under bm25l and bm25+ (non-occurrence)."""
        column = self._column(term)
        array = getattr(self.retriever, "nonoccurrence_array", None)
        return 0.0 if column is None or array is None else float(array[column])

    def term_scores(self, term: str, rows: Any) -> Any:
        """One term's BM25 contribution to each of ``rows`` (an int array): lookups in the term's
        column of the precomputed score matrix (plus, under bm25l and bm25+, the score of a term
        the document lacks, which the matrix stores its entries net of), equal to
        ``get_scores([term])[rows]`` without scoring the whole corpus."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        column = self._column(term)
        if column is None:
            return np.zeros(len(rows), dtype=np.float32)
        if not self._columns_sorted:
            return self.retriever.get_scores([term])[rows]
        absent = np.float32(self.absent_score(term))
        stored, _ = self._stored(column, rows)
        return stored + absent if absent else stored

    def _stored(self, column: int, rows: Any) -> tuple[Any, Any]:
        """A sorted column's stored scores at ``rows`` (an int64 array; 0 where a row lacks the term, float32) and
        which rows hold the term: one binary search of the column for all of them."""
        import numpy as np

        matrix = self.retriever.scores
        start, end = int(matrix["indptr"][column]), int(matrix["indptr"][column + 1])
        if end == start:
            return np.zeros(len(rows), dtype=np.float32), np.zeros(len(rows), dtype=bool)
        column_rows = matrix["indices"][start:end]
        at = column_rows.searchsorted(rows)  # past the end where a row is above every holder: clipped
        found = column_rows.take(at, mode="clip") == rows
        return np.where(found, matrix["data"].take(at + start, mode="clip"), 0.0).astype(np.float32), found

    def term_score_matrix(self, terms: Sequence[str], rows: Any) -> tuple[Any, Any]:
        """``term_scores`` of several terms for the same ``rows`` at once, as a rows x terms float32 array (the
        same values, column by column), and whether each row holds each term (:meth:`holding`). What the
        explanations of a search's documents need, in a few array operations per term."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        scores = np.zeros((len(terms), len(rows)), dtype=np.float32)  # term by term, transposed on return
        held = np.zeros((len(terms), len(rows)), dtype=bool)
        for j, term in enumerate(terms):
            column = self._column(term)
            if column is None:
                continue
            if not self._columns_sorted:
                scores[j] = self.term_scores(term, rows)
                held[j] = self.holding(term, rows)
                continue
            scores[j], held[j] = self._stored(column, rows)
            absent = self.absent_score(term)
            if absent:
                scores[j] += np.float32(absent)
        return scores.T, held.T


_LACKS = " (not in the document: the method's non-occurrence score)"


def _term_description(term: str, count: int) -> str:
    """How an explanation names a query term (``count``: how often the query holds it)."""
    return f"term '{term}'" + (f" x{count} (repeated in the query)" if count > 1 else "")


class _QueryTerms:
    """The term nodes of the explanations of the documents one search returned, computed for all of them at once.

    ``run`` keeps the query's known terms and the rows it returned; the first ``details`` computes, row-major over
    (returned document, distinct term in order of first appearance) and only for the terms that add to the
    document's score, each one's contribution times its count in the query (float64: the same value as the Python
    product of the float32 lookup and the count) and its description (under bm25l and bm25+, saying when the
    document lacks the term); ``bounds`` delimit each document's. A search whose documents are never explained
    (``trace.explain`` off) costs nothing more. Thread-safe: made whole, then set in one assignment (two threads
    may both make them, alike), and never changed.
    """

    __slots__ = ("_bm25", "_terms", "_rows", "_made")

    def __init__(self, bm25: LoadedBM25, terms: Counter[str], rows: list[int]) -> None:
        self._bm25, self._terms, self._rows = bm25, terms, rows
        self._made: tuple[dict[int, int], list[int], list[float], list[str]] | None = None

    def _make(self) -> tuple[dict[int, int], list[int], list[float], list[str]]:
        import numpy as np

        bm25, terms, rows = self._bm25, self._terms, self._rows
        described = [_term_description(term, count) for term, count in terms.items()]
        contributions, held = bm25.term_score_matrix(list(terms), rows)
        weighted = contributions.astype(np.float64) * np.asarray(list(terms.values()), dtype=np.float64)
        adds = weighted > 0
        cells = adds.nonzero()  # (document, term) of each term node, row-major
        which = cells[1]  # its description: the term's, or the one saying the document lacks it (bm25l, bm25+)
        if getattr(bm25.retriever, "nonoccurrence_array", None) is not None:
            absent = np.asarray([bool(bm25.absent_score(term)) for term in terms], dtype=bool)
            which = which + len(terms) * (absent[which] & ~held[cells])
        bounds = [0, *np.cumsum(adds.sum(axis=1)).tolist()]
        descriptions = np.asarray(described + [d + _LACKS for d in described], dtype=object)[which]
        return dict(zip(rows, range(len(rows)))), bounds, weighted[cells].tolist(), descriptions.tolist()

    def details(self, row: int) -> tuple[Explanation, ...] | None:
        """The term nodes of document ``row``'s explanation; None for a row the search did not return."""
        made = self._made
        if made is None:
            made = self._made = self._make()
        position, bounds, values, descriptions = made
        at = position.get(row)
        if at is None:
            return None
        start, stop = bounds[at], bounds[at + 1]
        return tuple(map(Explanation, values[start:stop], descriptions[start:stop]))


class _TermContributions:
    """The term nodes of the explanations of the documents a recent query returned.

    ``run`` fills it; ``explain``, called once per returned document, reads its row of the query's term nodes
    (made for all the documents at once) instead of tokenising the query and looking every term up again. Bounded,
    thread-safe (RecentNotes); the note the last explanation read is kept at hand for the next ones, which are
    mostly of the same query (the same Query object: a Query is frozen, so its text is the same).
    """

    def __init__(self) -> None:
        self._entries = RecentNotes()  # query text -> _QueryTerms
        self._last: tuple[Query, _QueryTerms] | None = None  # replaced whole, never changed: safe to share

    def put(self, text: str, notes: _QueryTerms) -> None:
        self._entries.put(text, notes)

    def details(self, query: Query, text_of: Callable[[Query], str], row: int) -> tuple[Explanation, ...] | None:
        """Document ``row``'s term nodes from the notes of a search for ``query``'s text (``text_of``: the stage's
        key); None where no kept search returned it."""
        last = self._last
        if last is not None and last[0] is query:
            found = last[1].details(row)
            if found is not None:
                return found
        entry = self._entries.get(text_of(query))
        if entry is None:
            return None
        self._last = (query, entry)
        return entry.details(row)


class BM25Params(StageParams):
    top_k: int = Field(100, ge=1, le=100_000, description="how many candidates to recall")
    query: Literal["effective", "original", "both"] = Field(
        "effective",
        description="effective: the rewritten query when a rewrite ran; original: as asked; both: the terms as "
        "asked plus the terms only the rewrite has (each added once)",
    )
    component: str = Field("bm25", description="which bm25 component of the index to search")


@register_stage
class BM25Recall(Stage):
    """Lexical recall: BM25 over the index's bm25 component, honouring the prefilter mask."""

    type_name = "recall.bm25"
    version = 1
    Params = BM25Params
    produces = Port.CANDIDATES
    accepts = frozenset({Port.QUERY, Port.MASK})
    min_candidate_inputs = 0
    max_candidate_inputs = 0
    signal = "bm25"
    summary = "BM25 lexical recall (bm25s)"
    params: BM25Params

    def warm_up_warnings(self) -> list[str]:
        if not self._bm25.predates_normalization:
            return []
        return [f"the index's '{self.params.component}' component was built before Sieve read text in Unicode NFKC "
                "(its tokenizer records no normalization): its documents and queries are read in NFC, so full-width "
                "'ＨＩＶ' and the ligature in 'ﬁbrosis' do not match 'HIV' and 'fibrosis'; rebuild the index"]

    def warm_up(self, resources: Resources) -> None:
        index = resources.require_index(self.id)
        directory, entry = index.component(self.params.component, self.id)
        self._bm25: LoadedBM25 = resources.shared(f"bm25:{directory}", lambda: LoadedBM25(directory, entry))
        self._doc_ids = index.doc_ids()
        if len(self._doc_ids) != self._bm25.retriever.scores["num_docs"]:
            raise SieveIndexError(
                f"index {index.path}: the bm25 component has {self._bm25.retriever.scores['num_docs']} "
                f"documents but the document store has {len(self._doc_ids)}; rebuild the index"
            )
        settings = self._bm25.settings
        method = settings.get("method", "lucene")
        delta = getattr(self._bm25.retriever, "delta", 0.5)
        # every explanation's description, but for the rank between these two
        self._formula = (
            f"BM25 ({method}, k1={settings.get('k1')}, b={settings.get('b')}) "
            f"over {'+'.join(settings.get('fields', ['title', 'text']))}: "
            f"sum over query terms of {FORMULAS.get(method, FORMULAS['lucene']).format(delta=delta)}; rank ",
            f" in stage '{self.id}'",
        )

    def __init__(self, stage_id: str, params: StageParams):
        super().__init__(stage_id, params)
        self._contributions = _TermContributions()

    def _text(self, query: Query) -> str:
        """The text searched (with ``query: both``, both texts: also the key of the explanation cache)."""
        if self.params.query == "original":
            return query.text
        if self.params.query == "both" and query.effective_text != query.text:
            return f"{query.text}\n{query.effective_text}"
        return query.effective_text

    def _split_terms(self, query: Query) -> tuple[list[str], list[str]]:
        """(the terms of the text searched, the terms only the rewrite adds: ``query: both``, else none)."""
        tokenize = self._bm25.tokenizer.tokenize
        if self.params.query != "both" or query.effective_text == query.text:
            return tokenize(self._text(query)), []
        asked = tokenize(query.text)  # as asked, repetitions kept; the rewrite's new terms added once
        seen = set(asked)
        return asked, [t for t in dict.fromkeys(tokenize(query.effective_text)) if t not in seen]

    def _terms(self, query: Query) -> list[str]:
        asked, added = self._split_terms(query)
        return asked + added

    def run(self, ctx: StageContext) -> StageResult:
        import numpy as np

        asked, added = self._split_terms(ctx.query)
        terms = asked + added
        known = [t for t in terms if t in self._bm25.vocab]
        unknown = [t for t in terms if t not in self._bm25.vocab]
        rewritten = ctx.query.effective_text != ctx.query.text
        # which text was searched: as asked, the rewrite, or both (the rewrite's new terms added to the asked ones)
        searched = "asked" if not rewritten or self.params.query == "original" else (
            "both" if self.params.query == "both" else "rewritten")
        details: dict[str, Any] = {"searched": searched, "query_terms": len(terms), "unmatched_terms": len(unknown)}
        if searched == "both":
            details["terms_added_by_rewrite"] = len(added)
        if ctx.trace_text:
            details["terms"] = terms
            details["unmatched"] = unknown
            if searched == "both":
                details["added_by_rewrite"] = added
        decisions = []
        corpus_size = len(self._doc_ids)
        k = self.params.top_k
        if k > corpus_size:
            decisions.append(
                Decision("k_clamped", f"top_k {k} exceeds the corpus size {corpus_size}; using {corpus_size}")
            )
            k = corpus_size
        if not known:
            said = ("no query term occurs in the index" if terms else "the index's tokenizer keeps no word of the "
                    "query (stop words, and words its pattern does not take such as single characters, are not "
                    "indexed)")
            decisions.append(Decision("no_matching_terms", f"{said}; nothing recalled"))
            return StageResult(candidates=[], decisions=decisions, details=details)

        began = time.perf_counter()
        weight_mask = None
        if ctx.mask is not None:
            weight_mask = ctx.mask.allowed.astype(np.float32)
            details["masked_out"] = int(corpus_size - ctx.mask.allowed.sum())
        scores = self._bm25.retriever.get_scores(known, weight_mask=weight_mask)
        scored_ms = (time.perf_counter() - began) * 1000.0

        rows = self._holding(known, scores, ctx.mask)
        values = scores[rows]
        zero = int(np.count_nonzero(values <= 0))
        if zero:
            method = self._bm25.settings.get("method", "lucene")
            decisions.append(Decision(
                "zero_scores", f"{zero} of the {len(rows)} documents holding a query term score 0 (under "
                f"{method}, a term in most documents has idf 0); they are recalled, ordered by doc_id",
                {"documents": zero},
            ))
        if len(rows) > k:
            kth = np.partition(values, len(rows) - k)[len(rows) - k]
            rows = rows[values >= kth]  # keeps every tie at the boundary; cut after sorting
        doc_ids = self._doc_ids
        order = sorted(rows.tolist(), key=lambda r: (-float(scores[r]), doc_ids[r]))[:k]
        if len(order) < k:
            # Under access rules, of the documents they leave (how many masked ones hold a term is not said: that
            # would tell the user of documents they may not see)
            among = " the access rules leave" if ctx.mask is not None else ""
            said = (f"no document{among} holds a query term" if not order else
                    f"only {len(order)} document{'s' if len(order) != 1 else ''}{among} "
                    f"hold{'s' if len(order) == 1 else ''} a query term")
            decisions.append(Decision("fewer_matches", f"{said} (top_k {k})"))
        candidates = [
            Candidate(doc_ids[row], row, (ScoreEntry(self.id, "bm25", float(scores[row]), rank),))
            for rank, row in enumerate(order, start=1)
        ]
        if ctx.trace_text:  # else the explanations name no terms
            self._remember(ctx.query, known, order)
        return StageResult(
            candidates=candidates,
            decisions=decisions,
            details=details,
            timings_ms={"bm25_scoring": scored_ms},
        )

    def _remember(self, query: Query, known: list[str], order: list[int]) -> None:
        """Keep what the returned documents' explanations need (computed for all of them at the first one)."""
        self._contributions.put(self._text(query), _QueryTerms(self._bm25, Counter(known), order))

    def _holding(self, known: list[str], scores: Any, mask: Any) -> Any:
        """The rows, ascending, of the allowed documents holding a query term. Under the Lucene variant (the
        default) a document scores above 0 exactly when it holds a term (every idf is positive, and a masked
        document scores 0 through the weight mask), so the scores say it in one pass over them; the other
        variants read the term postings (bm25l and bm25+ score documents lacking a term, robertson and atire can
        score a holder 0 or below)."""
        import numpy as np

        if self._bm25.settings.get("method", "lucene") == "lucene":
            return np.flatnonzero(scores > 0)
        matching = self._bm25.matching(known)
        if mask is not None:
            matching &= mask.allowed
        return np.flatnonzero(matching)

    def explain(self, query: Query, candidate: Candidate, value: float, rank: int, trace_text: bool) -> Explanation:
        head, tail = self._formula
        formula = f"{head}{rank}{tail}"
        if not trace_text:
            return Explanation(value, formula)
        details = self._contributions.details(query, self._text, candidate.row)
        if details is None:  # explained outside the search that recalled it
            details = self._term_details(query, candidate.row)
        return Explanation(value, formula, details)

    def _term_details(self, query: Query, row: int) -> tuple[Explanation, ...]:
        """The term nodes of document ``row``'s explanation, looked up one by one (what ``_QueryTerms`` computes
        for a search's documents at once; tests/stages/test_bm25_explain.py checks they agree)."""
        counts = Counter(t for t in self._terms(query) if t in self._bm25.vocab)
        details = []
        for term, count in counts.items():
            contribution = float(self._bm25.term_scores(term, [row])[0])
            if contribution > 0:
                lacks = _LACKS if self._bm25.absent_score(term) and not self._bm25.holds(term, row) else ""
                details.append(Explanation(contribution * count, _term_description(term, count) + lacks))
        return tuple(details)
