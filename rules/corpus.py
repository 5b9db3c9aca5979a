"""The corpus as rules see it: documents by index row, with per-field columns built once.

Prefilter rules are evaluated over the whole corpus for every query, so they must cost numpy
operations, not a Python loop over documents. A field is *factorised* once (each row gets the
code of its distinct value) and a test then runs once per distinct value — a handful for
``acl``, ``jurisdiction`` or ``source`` — and is spread over all rows with one gather. Date and
number comparisons use a float column (NaN where missing). Columns are built lazily, once per
process, under a lock.

:meth:`DocumentTable.undecidable` lists, once per field, the documents a rule cannot judge: a
nested path through a value that is not a mapping, a value that is not a date (or a number) for an
ordered comparison, an access value that is neither a string nor a list of strings. Prefilter
rules deny those documents (fail closed); ``sieve rules check --index`` reports them.
:meth:`DocumentTable.profile` says which shapes (a string, a list...) and which types of plain values a
field holds, and how often, for the findings on fields whose export mixes them.
"""

from __future__ import annotations

import json
import math
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from rules.conditions import MISSING, _number, doc_field, doc_path_problem, kind_of, shape_of
from rules.expressions import parse_date

if TYPE_CHECKING:
    import numpy as np

    from engine.index import Document, Index


def _key(value: Any) -> Any:
    """A hashable stand-in for a metadata value (lists become tuples, mappings canonical JSON)."""
    if isinstance(value, list):
        return ("__list__",) + tuple(_key(v) for v in value)
    if isinstance(value, Mapping):
        return ("__map__", json.dumps(value, sort_keys=True, default=str))
    return (type(value).__name__, value)  # 1, 1.0 and True stay distinct


_MISSING_KEY = ("__missing__",)
# Columns that hold every document's own text: kept only while a stage needs them (see DocumentTable.release)
TEXT_COLUMNS = ("doc.title", "doc.text")
_READ_AHEAD = 512  # rows read at once when documents are walked in row order
_CACHED_DOCUMENTS = 4096


class _Factorizer:
    """Builds one field's column (code per row, distinct values) as documents stream past."""

    __slots__ = ("path", "nested", "codes", "index", "uniques", "problems")

    def __init__(self, path: str):
        self.path = path
        self.nested = path.count(".") >= 2
        self.codes: list[int] = []
        self.index: dict[Any, int] = {}
        self.uniques: list[Any] = []
        self.problems: dict[int, str] = {}  # row -> why the nested path cannot be read there

    def add(self, document: "Document") -> None:
        value = doc_field(document, self.path)
        if value is MISSING:
            key: Any = _MISSING_KEY
        elif type(value) is str:  # the common case; a str key never equals the tuples _key makes
            key = value
        else:
            key = _key(value)
        code = self.index.get(key)
        if code is None:
            code = self.index[key] = len(self.uniques)
            self.uniques.append(value)
        if self.nested:
            problem = doc_path_problem(document, self.path)
            if problem is not None:
                self.problems[len(self.codes)] = problem
        self.codes.append(code)

    def column(self) -> "tuple[np.ndarray, list[Any]]":
        import numpy as np

        codes = np.array(self.codes, dtype=np.int32)
        codes.setflags(write=False)
        return codes, self.uniques


class DocumentsOnDemand(Sequence["Document"]):
    """The index's documents by row, read from its document store when asked for (a few thousand kept): the
    table holds columns, not documents. Reading in row order reads ahead in blocks."""

    def __init__(self, store: Any, size: int):
        from collections import OrderedDict

        self._store = store
        self._size = size
        self._cache: "OrderedDict[int, Document]" = OrderedDict()
        self._next = 0  # the row after the last one read: asking for it reads ahead
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, row: Any) -> Any:
        if isinstance(row, slice):
            return [self[r] for r in range(*row.indices(self._size))]
        row = int(row)
        if row < 0:
            row += self._size
        if not 0 <= row < self._size:
            raise IndexError(f"row {row} out of range (0..{self._size - 1})")
        with self._lock:
            found = self._cache.get(row)
            if found is not None:
                self._cache.move_to_end(row)
                self._next = row + 1
                return found
            sequential = row == self._next
        rows = list(range(row, min(self._size, row + _READ_AHEAD))) if sequential else [row]
        self._keep(self._store.get(rows))
        with self._lock:
            self._next = row + 1
            return self._cache[row] if row in self._cache else self._store.get([row])[row]

    def __iter__(self) -> Iterator["Document"]:
        return iter(self._store.iter_documents())

    def prefetch(self, rows: Iterable[int]) -> None:
        """Read the given rows in one go (the candidates a rule is about to be evaluated on)."""
        with self._lock:
            wanted = sorted({int(r) for r in rows if int(r) not in self._cache})
        if wanted:
            self._keep(self._store.get(wanted[-_CACHED_DOCUMENTS // 2:]))

    def _keep(self, documents: "Mapping[int, Document]") -> None:
        with self._lock:
            for row, document in documents.items():
                self._cache[row] = document
                self._cache.move_to_end(row)
            while len(self._cache) > _CACHED_DOCUMENTS:
                self._cache.popitem(last=False)


class DocumentTable:
    """The corpus by index row as the rules need it: ids, per-field columns, and the documents on demand.

    Built in one pass over the documents. Given the index's document store (:meth:`from_index`), the table keeps
    columns only (a field's code per row and its distinct values) and reads a document's text and fields from the
    store when something asks for ``documents[row]`` (an expression, a trace's evidence, explain); a field no
    column was built for costs one more pass, reading that field only. Given documents without a store, it keeps
    them.
    """

    def __init__(self, documents: Iterable["Document"], fields: Iterable[str] = (), *, store: Any = None):
        kept: list["Document"] | None = [] if store is None else None
        builders = [_Factorizer(path) for path in dict.fromkeys(fields) if path.startswith("doc.")]
        doc_ids: list[str] = []
        counts: Counter[str] = Counter()
        nested: set[str] = set()
        for document in documents:
            if kept is not None:
                kept.append(document)
            doc_ids.append(document.doc_id)
            metadata = document.metadata
            for key, value in metadata.items():
                if value is not None:
                    counts[key] += 1
                    if isinstance(value, Mapping):
                        _nested_names(value, f"doc.{key}", nested)
            for builder in builders:
                builder.add(document)
        self.size = len(doc_ids)
        self.doc_ids = doc_ids
        self.row_of = {doc_id: row for row, doc_id in enumerate(doc_ids)}
        self.metadata_counts = counts  # metadata field -> documents holding a non-null value
        self.metadata_keys = frozenset(counts)
        self._nested_names = frozenset(nested)  # every doc.<a>.<b>... path holding a non-null value somewhere
        self._kept = kept
        self._store = store
        self.documents: Sequence["Document"] = kept if kept is not None else DocumentsOnDemand(store, self.size)
        self._factorized: dict[str, tuple["np.ndarray", list[Any]]] = {}
        self._path_problems: dict[str, dict[int, str]] = {}
        self._numeric: dict[tuple[str, bool], "np.ndarray | None"] = {}
        self._undecidable: dict[tuple[str, str], tuple["np.ndarray", list[tuple[int, str]]]] = {}
        self._profiles: dict[str, FieldProfile] = {}
        self._static: "weakref.WeakKeyDictionary[Any, tuple[np.ndarray, list[tuple[int, str]]]]" = (
            weakref.WeakKeyDictionary()
        )
        self._pinned: set[str] = set()
        self._lock = threading.RLock()
        self._store_columns(builders)

    @classmethod
    def from_index(cls, index: "Index", fields: Iterable[str] = ()) -> "DocumentTable":
        """One pass over the index's documents, keeping the columns of ``fields`` (``doc.<...>`` paths)."""
        return cls(index.documents.iter_documents(), fields, store=index.documents)

    def _store_columns(self, builders: list[_Factorizer]) -> None:
        for builder in builders:
            self._factorized[builder.path] = builder.column()
            self._path_problems[builder.path] = builder.problems

    def _stream(self) -> Iterable["Document"]:
        return self._kept if self._kept is not None else self._store.iter_documents()

    def ensure(self, fields: Iterable[str]) -> None:
        """Build the columns of ``fields`` that are not built yet, all in one pass over the documents."""
        with self._lock:
            builders = [_Factorizer(path) for path in dict.fromkeys(fields)
                        if path.startswith("doc.") and path not in self._factorized]
            if not builders:
                return
            for document in self._stream():
                for builder in builders:
                    builder.add(document)
            self._store_columns(builders)

    def keep_documents(self) -> None:
        """Hold every document in memory (a condition reads whole documents over the corpus for every query)."""
        with self._lock:
            if self._kept is None:
                self._kept = list(self._store.iter_documents())
                self.documents = self._kept

    def pin(self, fields: Iterable[str]) -> None:
        """Keep the columns of ``fields`` past :meth:`release` (a condition reads them per query)."""
        with self._lock:
            self._pinned.update(fields)

    def release(self) -> None:
        """Drop the columns holding every document's title or text (their query-independent tests are computed and
        kept), unless pinned; asked for again, they are read again."""
        with self._lock:
            for path in TEXT_COLUMNS:
                if path not in self._pinned and self._kept is None:
                    self._factorized.pop(path, None)
                    self._path_problems.pop(path, None)

    def has_field(self, path: str) -> bool:
        """Does at least one document have ``doc.<...>`` (non-null)?"""
        parts = path.split(".")
        if parts[0] != "doc":
            return True
        if len(parts) == 2 and parts[1] in ("id", "title", "text"):
            return True
        if parts[1] not in self.metadata_keys:
            return False
        if len(parts) == 2:
            return True
        return path in self._nested_names

    def static_vector(
        self, node: Any, compute: "Callable[[], tuple[np.ndarray, list[tuple[int, str]]]]"
    ) -> "tuple[np.ndarray, list[tuple[int, str]]]":
        """A query-independent condition's value over every document (and rows it failed on), computed once."""
        cached = self._static.get(node)
        if cached is None:
            cached = compute()
            cached[0].setflags(write=False)
            with self._lock:
                self._static[node] = cached
        return cached

    def column(self, path: str) -> list[Any]:
        codes, uniques = self.factorized(path)
        return [uniques[code] for code in codes.tolist()]

    def factorized(self, path: str) -> tuple["np.ndarray", list[Any]]:
        """(code of each row's value, the distinct values) for ``doc.<...>``; missing is a value too."""
        cached = self._factorized.get(path)
        if cached is None:
            self.ensure([path])
            cached = self._factorized[path]
        return cached

    def numeric(self, path: str, *, dates: bool) -> "np.ndarray | None":
        """Float column (epoch seconds for dates), NaN where missing or unparsable.

        None when some document holds a list for this field (the generic path handles "any element").
        """
        key = (path, dates)
        if key in self._numeric:
            return self._numeric[key]
        import numpy as np

        codes, uniques = self.factorized(path)
        with self._lock:
            if key not in self._numeric:
                result: "np.ndarray | None" = None
                if not any(isinstance(v, (list, tuple, Mapping)) for v in uniques):
                    floats = np.fromiter(
                        (math.nan if v is MISSING or v is None else _to_float(v, dates) for v in uniques),
                        dtype=np.float64, count=len(uniques))
                    result = floats[codes]
                self._numeric[key] = result
        return self._numeric[key]

    def undecidable(self, path: str, mode: str) -> "tuple[np.ndarray, list[tuple[int, str]]]":
        """The rows whose ``doc.<...>`` value a rule cannot judge, and why (``(row, reason)`` each).

        ``mode``: ``path`` (only a nested path through a value that is not a mapping), ``date`` (also a
        present value with an element that is not an ISO date), ``number`` (an element that is not a
        number; true/false is not one), ``values`` (an access value: anything but a string or a list of
        strings and numbers, e.g. a mapping or a nested list). Missing and null values are not
        undecidable (rules say what missing means); neither is an empty list. Cached per process.
        Judged once per distinct value, spread over the rows.
        """
        key = (path, mode)
        cached = self._undecidable.get(key)
        if cached is not None:
            return cached
        import numpy as np

        codes, uniques = self.factorized(path)
        with self._lock:
            cached = self._undecidable.get(key)
            if cached is None:
                nested = path.startswith("doc.") and path.count(".") >= 2
                path_problems = self._path_problems.get(path, {}) if nested else {}
                by_code = [None if mode == "path" else _value_problem(v, mode) for v in uniques]
                bad_codes = np.fromiter((p is not None for p in by_code), dtype=bool, count=len(by_code))
                rows = bad_codes[codes] if self.size else np.zeros(0, dtype=bool)
                if path_problems:
                    rows = rows.copy()
                    rows[list(path_problems)] = True
                reasons: list[tuple[int, str]] = []
                for row in np.flatnonzero(rows).tolist():
                    problem = path_problems.get(row)
                    if problem is None:
                        problem = by_code[int(codes[row])]
                    reasons.append((row, f"{path} of '{self.doc_ids[row]}': {problem}"))
                rows.setflags(write=False)
                cached = self._undecidable[key] = (rows, reasons)
        return cached

    def profile(self, path: str) -> "FieldProfile":
        """How the documents hold ``doc.<...>``: documents per shape of the value and per type of the plain
        values in it (a list's elements), each with the first document's id and value. Cached per process."""
        cached = self._profiles.get(path)
        if cached is not None:
            return cached
        import numpy as np

        codes, uniques = self.factorized(path)
        counts = np.bincount(codes, minlength=len(uniques)) if self.size else np.zeros(0, dtype=np.int64)
        first = np.unique(codes, return_index=True)[1] if self.size else np.zeros(0, dtype=np.int64)
        shapes: dict[str, Tally] = {}
        kinds: dict[str, Tally] = {}
        for code in sorted(range(len(uniques)), key=lambda c: int(first[c])):  # examples: the first documents
            value = uniques[code]
            if value is MISSING or value is None:
                continue
            count, row = int(counts[code]), int(first[code])
            _tally(shapes, shape_of(value), count, self.doc_ids[row], value)
            elements = value if isinstance(value, (list, tuple)) else [value]
            for kind in dict.fromkeys(kind_of(e) for e in elements if kind_of(e) is not None):
                example = next(e for e in elements if kind_of(e) == kind)
                _tally(kinds, kind, count, self.doc_ids[row], example)
        profile = FieldProfile(shapes, kinds)
        with self._lock:
            self._profiles[path] = profile
        return profile

    def field_names(self, path: str) -> list[str]:
        """Every ``doc.<...>`` path of the index with as many parts as ``path`` (for did-you-mean hints)."""
        depth = path.count(".")
        if depth == 1:
            return sorted(f"doc.{key}" for key in self.metadata_keys)
        return sorted(name for name in self._nested_names if name.count(".") == depth)

    def unparsable_dates(self, path: str, limit: int = 3) -> tuple[int, list[str]]:
        """How many documents hold a value for ``path`` that is not a date, and a few of their ids."""
        import numpy as np

        codes, uniques = self.factorized(path)
        bad = np.fromiter(
            (v is not MISSING and v is not None
             and any(parse_date(e) is None for e in (v if isinstance(v, list) else [v])) for v in uniques),
            dtype=bool, count=len(uniques))
        rows = np.flatnonzero(bad[codes]) if self.size else np.zeros(0, dtype=np.int64)
        return len(rows), [self.doc_ids[row] for row in rows[:limit].tolist()]


def _nested_names(value: Mapping[str, Any], prefix: str, into: set[str]) -> None:
    """Add every ``prefix.<key>...`` path under ``value`` that holds a non-null value."""
    for key, inner in value.items():
        name = f"{prefix}.{key}"
        if inner is not None:
            into.add(name)
        if isinstance(inner, Mapping):
            _nested_names(inner, name, into)


class Tally:
    """How many documents, and the first one's id and value."""

    __slots__ = ("count", "doc_id", "value")

    def __init__(self, doc_id: str, value: Any):
        self.count = 0
        self.doc_id = doc_id
        self.value = value


class FieldProfile:
    """A field's shapes (``a string``, ``a list``...) and the types of its plain values, by document count."""

    def __init__(self, shapes: dict[str, Tally], kinds: dict[str, Tally]):
        self.shapes = shapes
        self.kinds = kinds


def _tally(into: dict[str, Tally], key: str, count: int, doc_id: str, value: Any) -> None:
    tally = into.get(key)
    if tally is None:
        tally = into[key] = Tally(doc_id, value)
    tally.count += count


def _to_float(value: Any, dates: bool) -> float:
    if dates:
        parsed = parse_date(value) if isinstance(value, (str, date, datetime)) else None
        return parsed.timestamp() if parsed is not None else math.nan
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def _value_problem(value: Any, mode: str) -> str | None:
    """Why a present value cannot be judged in ``mode`` (see :meth:`DocumentTable.undecidable`), or None."""
    if value is MISSING or value is None:
        return None
    elements = value if isinstance(value, (list, tuple)) else [value]
    if mode == "values":
        if isinstance(value, Mapping):
            return "is a mapping, not a value or a list of values"
        for element in elements:
            if isinstance(element, (list, tuple, Mapping)):
                return f"holds {shape_of(element)} inside the list, not a plain value"
        return None
    for element in elements:
        if element is None:
            continue
        if mode == "date":
            ok = isinstance(element, (str, date, datetime)) and parse_date(element) is not None
        else:
            ok = _number(element) is not None
        if not ok:
            shown = repr(element) if len(repr(element)) <= 60 else repr(element)[:57] + "..."
            return f"{shown} is not {'an ISO date' if mode == 'date' else 'a number'}"
    return None
