"""Concurrency audit: what threads sharing one Pipeline see. Each test says what happened before ("before:")."""

from __future__ import annotations

import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

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


def test_resources_shared_by_two_pipelines_load_a_thing_once_whichever_thread_asks(tmp_path):
    """F6. before: the check and the load were not under a lock: two pipelines sharing resources (sieve sweep's),
    warmed from two threads at once, loaded the same index or model twice and held different objects."""
    from engine.stage import Resources

    first = Resources(None, tmp_path)
    second = first.sharing()
    loads: list[int] = []
    start = threading.Barrier(8)

    def load() -> object:
        loads.append(1)
        time.sleep(0.05)  # a model loading: long enough for every other thread to ask meanwhile
        return object()

    found: list[object] = []

    def ask(resources: Resources) -> None:
        start.wait()
        found.append(resources.shared("model", load))

    threads = [threading.Thread(target=ask, args=(first if n % 2 else second,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1 and len({id(thing) for thing in found}) == 1


def test_the_fold_cache_is_bounded_by_what_its_entries_cost(monkeypatch):
    """F5. before: bounded by the characters kept alone, 2 million short texts took 448 MB before it started again;
    and its count was kept by threads without a lock."""
    import engine.textform as textform

    monkeypatch.setattr(textform, "_KEPT_MAX_BYTES", 100_000)
    monkeypatch.setattr(textform, "_KEPT", {})
    monkeypatch.setattr(textform, "_kept_bytes", 0)

    def fold(part: int) -> None:
        for n in range(2000):
            assert textform.comparable(f"Ab{part}-{n}") == f"ab{part}-{n}"

    threads = [threading.Thread(target=fold, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kept = textform._KEPT
    assert 0 < len(kept) <= 100_000 // textform._KEPT_ENTRY_BYTES
    assert textform._kept_bytes == sum(len(key[0]) + len(value) + textform._KEPT_ENTRY_BYTES
                                       for key, value in kept.items())


def _containers(value: object, path: str, found: dict[int, str]) -> dict[int, str]:
    if isinstance(value, (dict, list)):
        found.setdefault(id(value), path)
        for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
            _containers(item, f"{path}.{key}" if isinstance(value, dict) else f"{path}[{key}]", found)
    return found


def test_each_trace_is_its_own_a_caller_may_edit_it(tmp_path):
    """F4. before: traces shared their config (the pipeline's own compiled.canonical), their index record's parts, a
    rule stage's warnings and override firings' evidence with other traces: a caller redacting one trace in place
    changed other users' traces, the ones still to be logged included, and what replay compares with."""
    from engine.index import build_index

    root = Path(__file__).resolve().parents[2]
    index = tmp_path / "index"
    build_index(root / "examples" / "medical" / "corpus.jsonl", index, {"bm25": {}})
    rules = root / "configs" / "medical"
    config = tmp_path / "p.yaml"
    config.write_text(
        f"version: 1\nindex: {index}\nstages:\n"
        f"  - {{id: access, type: rules.prefilter, params: {{rules: {rules / 'access.yaml'}}}}}\n"
        "  - {id: bm25, type: recall.bm25, inputs: [access], params: {top_k: 20}}\n"
        f"  - {{id: overrides, type: rules.override, inputs: [bm25], params: {{rules: {rules / 'overrides.yaml'}}}}}\n"
        "  - {id: final, type: select.top_k, inputs: [overrides], params: {k: 5}}\n"
        "output: final\ntrace: {log: null}\n", encoding="utf-8")
    pipeline = Pipeline.from_file(config)
    asked = [("metformin kidney disease", {"user_id": "a", "roles": ["clinician"], "jurisdictions": ["US"]}),
             ("metformin kidney disease", {"user_id": "b", "roles": ["clinician"], "jurisdictions": ["US"]}),
             ("insulin dosing", {"user_id": "c", "roles": ["patient"], "jurisdictions": ["EU"]})]
    traces = [pipeline.search(text, user=user, as_of=datetime(2025, 6, 1, tzinfo=timezone.utc), log=False).trace for text, user in asked]
    assert any(f.get("match") for s in traces[0]["stages"] if s["id"] == "overrides"
               for f in (s.get("details") or {}).get("firings", []))  # evidence is there to be shared, or not
    first = _containers(traces[0], "trace", {})
    for other in traces[1:]:
        shared = sorted(path for key, path in _containers(other, "trace", {}).items() if key in first)
        assert not shared, shared[:10]
    assert traces[0]["config"]["resolved"] == pipeline.compiled.canonical
    owned = {**_containers(pipeline.compiled.canonical, "canonical", {}),  # the first trace shares nothing with the
             **_containers(pipeline.resources.index.manifest, "manifest", {})}  # pipeline either (review of this change)
    assert not [path for key, path in first.items() if key in owned]
