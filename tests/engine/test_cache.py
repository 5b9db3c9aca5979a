"""engine.cache.LRUCache: the bounded cache every stage keeps."""

from __future__ import annotations

import threading

import pytest

from engine.cache import LRUCache


def test_keeps_the_most_recently_used_up_to_capacity():
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # reading "a" makes "b" the oldest
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2
    cache.put("a", 10)  # a new value for a key replaces it, without growing
    assert cache.get("a") == 10 and len(cache) == 2


def test_get_many_returns_the_hits_and_refreshes_them():
    cache: LRUCache[int, str] = LRUCache(3)
    for row in (1, 2, 3):
        cache.put(row, str(row))
    assert cache.get_many([3, 1, 7]) == {3: "3", 1: "1"}
    cache.put(4, "4")  # 2 was the least recently used
    assert cache.get_many([1, 2, 3, 4]) == {1: "1", 3: "3", 4: "4"}


def test_capacity_zero_keeps_nothing_and_negative_is_refused():
    cache: LRUCache[str, int] = LRUCache(0)
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        LRUCache(-1)


def test_threads_share_it_without_exceeding_capacity():
    cache: LRUCache[tuple[int, int], int] = LRUCache(100)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for i in range(2000):
                cache.put((thread, i), i)
                cache.get((thread, i - 1))
                cache.get_many([(thread, i - 2), (thread, i - 3)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(cache) == 100


def test_a_per_asker_cache_keeps_each_askers_entries_apart():
    """Caches keyed by what a user asked are per asker (a hit's latency must not tell one user that another asked
    the same text); other caches, and code outside a query run, share one partition."""
    from engine.cache import asked_by

    asked, shared = LRUCache(4, per_asker=True), LRUCache(4)
    with asked_by(("banker",)):
        asked.put("acme merger", 1)
        shared.put("acme merger", 1)
        assert asked.get("acme merger") == 1 and asked.get_many(["acme merger", "x"]) == {"acme merger": 1}
    with asked_by(("eve",)):
        assert asked.get("acme merger") is None and asked.get_many(["acme merger"]) == {}
        assert shared.get("acme merger") == 1
    assert asked.get("acme merger") is None  # outside any run: an asker of its own
    with asked_by(("banker",)):
        assert asked.get("acme merger") == 1
