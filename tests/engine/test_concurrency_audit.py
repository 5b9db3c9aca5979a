"""Concurrency audit: what threads sharing one Pipeline see. Each test says what happened before ("before:")."""

from __future__ import annotations

import threading
import time
import traceback

from engine.errors import SieveError
from engine.pipeline import Pipeline


def test_closing_a_pipeline_under_running_queries_gives_them_sieve_errors_only(write_config, bm25_index):
    """F2. before: every query in flight when close() came died with a bare AssertionError (16 of 16 in the audit's
    run), although every error Sieve raises is a SieveError; one started after got "this Pipeline was closed"."""
    config = write_config(f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                          "output: bm25\ntrace: {log: null}\n")
    queries = ["cells", "immune response", "protein folding", "gene expression in mice"]
    outcomes: dict[str, int] = {}
    others: list[str] = []
    lock = threading.Lock()
    for trial in range(3):
        pipeline = Pipeline.from_file(config)
        pipeline.warm_up()
        stop = threading.Event()

        def work(offset: int) -> None:
            position = offset
            while not stop.is_set():
                try:
                    pipeline.search(queries[position % len(queries)], log=False)
                    kind = "ok"
                except SieveError:
                    kind = "SieveError"
                except BaseException as exc:  # noqa: BLE001 (what the test is looking for)
                    kind = type(exc).__name__
                    others.append("".join(traceback.format_exception(exc))[-800:])
                with lock:
                    outcomes[kind] = outcomes.get(kind, 0) + 1
                position += 1

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5 + 0.2 * trial)
        pipeline.close()
        time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join()
    assert not others, others[0]
    assert outcomes.get("ok") and outcomes.get("SieveError"), outcomes
