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
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
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


class DocumentTable:
    """Documents of an index by row, plus lazily built columns over them."""

    def __init__(self, documents: Iterable["Document"]):
        self.documents: list["Document"] = list(documents)
        self.size = len(self.documents)
        self.doc_ids = [d.doc_id for d in self.documents]
        self.row_of = {doc_id: row for row, doc_id in enumerate(self.doc_ids)}
        keys: set[str] = set()
        for document in self.documents:
            keys.update(k for k, v in document.metadata.items() if v is not None)
        self.metadata_keys = frozenset(keys)
        self._factorized: dict[str, tuple["np.ndarray", list[Any]]] = {}
        self._numeric: dict[tuple[str, bool], "np.ndarray | None"] = {}
        self._undecidable: dict[tuple[str, str], tuple["np.ndarray", list[tuple[int, str]]]] = {}
        self._profiles: dict[str, FieldProfile] = {}
        self._static: "weakref.WeakKeyDictionary[Any, tuple[np.ndarray, list[tuple[int, str]]]]" = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    @classmethod
    def from_index(cls, index: "Index") -> "DocumentTable":
        return cls(index.documents.iter_documents())

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
        return any(doc_field(d, path) not in (MISSING, None) for d in self.documents)

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
        return [doc_field(d, path) for d in self.documents]

    def factorized(self, path: str) -> tuple["np.ndarray", list[Any]]:
        """(code of each row's value, the distinct values) for ``doc.<...>``; missing is a value too."""
        cached = self._factorized.get(path)
        if cached is not None:
            return cached
        import numpy as np

        with self._lock:
            cached = self._factorized.get(path)
            if cached is None:
                codes = np.empty(self.size, dtype=np.int32)
                index: dict[Any, int] = {}
                uniques: list[Any] = []
                for row, document in enumerate(self.documents):
                    value = doc_field(document, path)
                    key = ("__missing__",) if value is MISSING else _key(value)
                    code = index.get(key)
                    if code is None:
                        code = index[key] = len(uniques)
                        uniques.append(value)
                    codes[row] = code
                cached = self._factorized[path] = (codes, uniques)
        return cached

    def numeric(self, path: str, *, dates: bool) -> "np.ndarray | None":
        """Float column (epoch seconds for dates), NaN where missing or unparsable.

        None when some document holds a list for this field (the generic path handles "any element").
        """
        key = (path, dates)
        if key in self._numeric:
            return self._numeric[key]
        import numpy as np

        with self._lock:
            if key not in self._numeric:
                column = np.full(self.size, np.nan, dtype=np.float64)
                result: "np.ndarray | None" = column
                for row, document in enumerate(self.documents):
                    value = doc_field(document, path)
                    if value is MISSING or value is None:
                        continue
                    if isinstance(value, (list, tuple, Mapping)):
                        result = None
                        break
                    column[row] = _to_float(value, dates)
                self._numeric[key] = result
        return self._numeric[key]

    def undecidable(self, path: str, mode: str) -> "tuple[np.ndarray, list[tuple[int, str]]]":
        """The rows whose ``doc.<...>`` value a rule cannot judge, and why (``(row, reason)`` each).

        ``mode``: ``path`` (only a nested path through a value that is not a mapping), ``date`` (also a
        present value with an element that is not an ISO date), ``number`` (an element that is not a
        number; true/false is not one), ``values`` (an access value: anything but a string or a list of
        strings and numbers, e.g. a mapping or a nested list). Missing and null values are not
        undecidable (rules say what missing means); neither is an empty list. Cached per process.
        """
        key = (path, mode)
        cached = self._undecidable.get(key)
        if cached is not None:
            return cached
        import numpy as np

        with self._lock:
            cached = self._undecidable.get(key)
            if cached is None:
                rows = np.zeros(self.size, dtype=bool)
                reasons: list[tuple[int, str]] = []
                nested = path.startswith("doc.") and path.count(".") >= 2
                for row, document in enumerate(self.documents):
                    problem = doc_path_problem(document, path) if nested else None
                    if problem is None and mode != "path":
                        problem = _value_problem(doc_field(document, path), mode)
                    if problem is not None:
                        rows[row] = True
                        reasons.append((row, f"{path} of '{document.doc_id}': {problem}"))
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
        found: set[str] = set()

        def walk(value: Any, prefix: str, level: int) -> None:
            if not isinstance(value, Mapping):
                return
            for key, inner in value.items():
                name = f"{prefix}.{key}"
                if level == depth:
                    if inner is not None:
                        found.add(name)
                else:
                    walk(inner, name, level + 1)

        for document in self.documents:
            walk(document.metadata, "doc", 1)
        return sorted(found)

    def unparsable_dates(self, path: str, limit: int = 3) -> tuple[int, list[str]]:
        """How many documents hold a value for ``path`` that is not a date, and a few of their ids."""
        count, examples = 0, []
        for document in self.documents:
            value = doc_field(document, path)
            if value is MISSING or value is None:
                continue
            values = value if isinstance(value, list) else [value]
            if any(parse_date(v) is None for v in values):
                count += 1
                if len(examples) < limit:
                    examples.append(document.doc_id)
        return count, examples


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
    import math

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
