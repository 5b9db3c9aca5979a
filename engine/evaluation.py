"""Evaluation on BEIR-format data with pytrec_eval (trec_eval's own code, not hand-rolled).

Used by ``bench/`` scripts and by ``sieve eval``. Metric names follow pytrec_eval's spelling
(``ndcg_cut_10``, ``recall_100``, ``map``, ``recip_rank``); MRR@10 is ``recip_rank`` on the run
cut at 10 and is reported as ``mrr_10``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import MissingDependencyError, QueryError, SieveError

DEFAULT_MEASURES = ("ndcg_cut.10", "recall.100", "map", "recip_rank")


@dataclass
class BeirData:
    """A BEIR data set split: where the corpus is, the queries that have judgements, the qrels."""

    directory: Path
    split: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    @property
    def corpus(self) -> Path:
        return self.directory / "corpus.jsonl"


def load_beir(directory: str | Path, split: str = "test") -> BeirData:
    """Read ``qrels/<split>.tsv`` and the matching queries (``queries_<split>.jsonl`` or ``queries.jsonl``)."""
    directory = Path(directory)
    qrels_path = directory / "qrels" / f"{split}.tsv"
    if qrels_path.is_dir():
        raise SieveError(f"no judgements for split '{split}': {qrels_path} is a directory, not a file")
    if not qrels_path.is_file():
        raise SieveError(f"no judgements for split '{split}': {qrels_path} does not exist")
    qrels: dict[str, dict[str, int]] = {}
    with _text_file(qrels_path) as handle:
        reader = csv.reader(handle, delimiter="\t")
        for number, row in enumerate(reader, start=1):
            if number == 1 and row and row[0] == "query-id":
                continue
            if len(row) < 3:
                raise SieveError(f"{qrels_path}:{number}: expected query-id, corpus-id, score")
            try:
                qrels.setdefault(row[0], {})[row[1]] = int(row[2])
            except ValueError:
                raise SieveError(f"{qrels_path}:{number}: score must be an integer, got {row[2]!r}") from None
    if not qrels:
        raise SieveError(f"no judged queries in {qrels_path}: the file has no query-id, corpus-id, score rows")
    queries_path = directory / f"queries_{split}.jsonl"
    if not queries_path.is_file():
        queries_path = directory / "queries.jsonl"
    if not queries_path.is_file():
        raise SieveError(f"no queries for split '{split}': neither queries_{split}.jsonl nor queries.jsonl in {directory}")
    queries: dict[str, str] = {}
    with _text_file(queries_path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                qid, text = str(record["_id"]), record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SieveError(f"{queries_path}:{number}: expected a JSON object with _id and text") from None
            if qid in qrels:
                queries[qid] = text
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise SieveError(f"{len(missing)} judged queries have no text in {queries_path} (e.g. {missing[0]})")
    return BeirData(directory, split, dict(sorted(queries.items(), key=lambda kv: kv[0])), qrels)


@dataclass
class RunOutput:
    """Scores per query (a TREC run), latencies overall and per stage."""

    run: dict[str, dict[str, float]]
    latency_ms: list[float] = field(default_factory=list)
    stage_latency_ms: dict[str, list[float]] = field(default_factory=dict)


def run_pipeline(
    pipeline: Any,
    queries: dict[str, str],
    progress: Callable[[int], None] | None = None,
    trace_log: Path | None = None,
) -> RunOutput:
    """Run every query through a warmed-up :class:`engine.pipeline.Pipeline`.

    Ranks are turned into strictly decreasing run scores so that trec_eval (which sorts by score)
    sees exactly the pipeline's order, pins and ties included. With ``trace_log``, every query's
    trace is appended to that hash-chained log (after its latency is taken); without, none is written.
    """
    pipeline.warm_up()
    output = RunOutput(run={})
    for qid, text in queries.items():
        began = time.perf_counter()
        try:
            result = pipeline.search(text)
        except QueryError as exc:
            raise QueryError(f"query {qid}: {exc}") from None
        output.latency_ms.append((time.perf_counter() - began) * 1000.0)
        if trace_log is not None:
            pipeline.log_trace(result.trace, trace_log)
        for stage in result.trace["stages"]:
            output.stage_latency_ms.setdefault(stage["id"], []).append(stage["duration_ms"])
        total = len(result.results)
        output.run[qid] = {c.doc_id: float(total - rank) for rank, c in enumerate(result.results)}
        if progress is not None:
            progress(1)
    return output


def _pytrec_eval():  # type: ignore[no-untyped-def]
    try:
        import pytrec_eval
    except ImportError:
        raise MissingDependencyError("pytrec_eval", "pytrec-eval-terrier", "evaluation") from None
    return pytrec_eval


def cut_run(run: dict[str, dict[str, float]], depth: int) -> dict[str, dict[str, float]]:
    """Keep each query's ``depth`` best documents (by score, ties on doc_id, like trec_eval)."""
    return {
        qid: dict(sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))[:depth]) for qid, docs in run.items()
    }


def per_query_metrics(
    run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], measures: Iterable[str] = DEFAULT_MEASURES
) -> dict[str, dict[str, float]]:
    """pytrec_eval per-query figures; queries the run lacks score 0 (as trec_eval -c would)."""
    pytrec_eval = _pytrec_eval()
    measures = set(measures)
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, measures)
    scores = evaluator.evaluate({qid: run.get(qid, {}) for qid in qrels})
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(
        {qid: docs for qid, docs in cut_run(run, 10).items()}
    )
    names = sorted(next(iter(scores.values())).keys()) if scores else []
    for qid in qrels:
        figures = scores.setdefault(qid, {name: 0.0 for name in names})
        figures["mrr_10"] = mrr.get(qid, {}).get("recip_rank", 0.0)
    return scores


def aggregate(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over queries."""
    if not per_query:
        return {}
    names = sorted(next(iter(per_query.values())).keys())
    return {name: statistics.fmean(q.get(name, 0.0) for q in per_query.values()) for name in names}


def evaluate_run(
    run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], measures: Iterable[str] = DEFAULT_MEASURES
) -> dict[str, float]:
    return aggregate(per_query_metrics(run, qrels, measures))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def write_trec_run(run: dict[str, dict[str, float]], path: str | Path, tag: str = "sieve") -> None:
    """Save a run in TREC format (qid Q0 docid rank score tag)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for qid in sorted(run):
            ranked = sorted(run[qid].items(), key=lambda kv: (-kv[1], kv[0]))
            for rank, (doc_id, score) in enumerate(ranked, start=1):
                handle.write(f"{qid} Q0 {doc_id} {rank} {score:.6f} {tag}\n")


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    path = Path(path)
    if path.is_dir():
        raise SieveError(f"run file {path} is a directory, not a file")
    if not path.is_file():
        raise SieveError(f"run file not found: {path}")
    run: dict[str, dict[str, float]] = {}
    with _text_file(path) as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise SieveError(f"{path}:{number}: a TREC run line has 6 fields (qid Q0 docid rank score tag)")
            try:
                score = float(parts[4])
                int(parts[3])
            except ValueError:
                raise SieveError(f"{path}:{number}: rank {parts[3]!r} must be an integer and score {parts[4]!r} a "
                                 "number") from None
            if not math.isfinite(score):
                raise SieveError(f"{path}:{number}: score {parts[4]!r} is not a finite number")
            run.setdefault(parts[0], {})[parts[2]] = score
    if not run:
        raise SieveError(f"run file {path} holds no ranked documents")
    return run


@contextlib.contextmanager
def _text_file(path: Path) -> Iterator[Any]:
    """``path`` opened as UTF-8 text; a byte that is not UTF-8 is a SieveError naming the file and line."""
    with open(path, encoding="utf-8") as handle:
        try:
            yield handle
        except UnicodeDecodeError:
            raw = path.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:  # the offset in the whole file, not in the chunk being read
                line = raw.count(b"\n", 0, exc.start) + 1
                raise SieveError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
            raise
