"""The one in-memory cache the stages keep: a bounded, thread-safe least-recently-used map.

Stages cache what is costly and does not change under an open index or a loaded model (query
embeddings, query entities, cross-encoder scores, per-document vectors, discourse models per
conversation prefix, notes for ``explain``). Each holds at most ``capacity`` entries; reading an
entry makes it the most recent; ``capacity`` 0 keeps nothing. ``None`` is not a storable value:
``get`` returns it for a miss.

A cache keyed by what a user asked (a query's text, its conversation) is made ``per_asker``: its entries are kept
apart per asker (:func:`asked_by`, which ``Pipeline.run`` sets from the query's user), so that how fast one user's
query is answered never tells whether another user asked the same text (a cache hit on a server is a few
milliseconds against tens: a wall-crossed banker's question seen by a salesman). What one user asks repeatedly,
and every query of a batch or an evaluation (one default user), still hits.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


# Who is asking the query being run (``UserContext.asker()``; "" outside a query run): per_asker caches' partition
_ASKER: ContextVar[Hashable] = ContextVar("sieve_asker", default="")


@contextlib.contextmanager
def asked_by(asker: Hashable) -> Iterator[None]:
    """Within the block (and the stage threads a pipeline run copies its context to), per_asker caches keep and
    find entries under ``asker``."""
    token = _ASKER.set(asker)
    try:
        yield
    finally:
        _ASKER.reset(token)


class LRUCache(Generic[K, V]):
    """Bounded least-recently-used map, safe to share between threads. ``per_asker``: entries are kept apart per
    asker (:func:`asked_by`), for a cache keyed by what a user asked."""

    def __init__(self, capacity: int, *, per_asker: bool = False):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, not {capacity}")
        self.capacity = capacity
        self.per_asker = per_asker
        self._items: OrderedDict[Any, V] = OrderedDict()
        self._lock = threading.Lock()

    def _key(self, key: K) -> Any:
        return (_ASKER.get(), key) if self.per_asker else key

    def get(self, key: K) -> V | None:
        stored = self._key(key)
        with self._lock:
            value = self._items.get(stored)
            if value is not None:
                self._items.move_to_end(stored)
            return value

    def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        """The cached entries among ``keys`` (one lock for all of them)."""
        asker = _ASKER.get() if self.per_asker else None
        items = self._items
        with self._lock:
            if asker is None:
                found = {key: items[key] for key in keys if key in items}
                for key in found:
                    items.move_to_end(key)
            else:
                found = {key: items[(asker, key)] for key in keys if (asker, key) in items}
                for key in found:
                    items.move_to_end((asker, key))
            return found

    def put(self, key: K, value: V) -> None:
        if self.capacity == 0:
            return
        stored = self._key(key)
        with self._lock:
            self._items[stored] = value
            self._items.move_to_end(stored)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
