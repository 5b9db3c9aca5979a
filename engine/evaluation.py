"""Evaluation on BEIR-format data with pytrec_eval (trec_eval's own code, not hand-rolled).

Used by ``bench/`` scripts and by ``sieve eval``. Metric names follow pytrec_eval's spelling
(``ndcg_cut_10``, ``recall_100``, ``map``, ``recip_rank``); MRR@10 is ``recip_rank`` on the run
cut at 10 and is reported as ``mrr_10``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import MissingDependencyError, QueryError, SieveError
from engine.strictness import a_json_kind, refused_keys, strict_object
from engine.yamlsource import NotJson, refuse_json_constant, refused_key_problem, unicode_problem

DEFAULT_MEASURES = ("ndcg_cut.10", "recall.100", "map", "recip_rank")


#: A split names a qrels file: a plain name, never a path (``--split ../qrels/test`` is refused).
SPLIT_NAME = re.compile(r"[A-Za-z0-9._-]+")

#: A relevance grade as trec_eval reads one: ASCII digits (Python's int() would also read '1_0' as 10 and the Arabic-
#: Indic or full-width digits '١', '１' as 1), within a C int (pytrec_eval stores it in one: 2^31 wraps around
#: silently, 10^20 fails inside the evaluator after every query has run).
_GRADE = re.compile(r"[-+]?0*[0-9]{1,10}")  # a C int has at most 10 digits (and int() reads at most 4,300)
GRADE_MIN, GRADE_MAX = -(2**31), 2**31 - 1

#: The two qrels layouts read (named in ``sieve eval``/``compare`` output and their JSON).
BEIR_QRELS = "BEIR (query-id, corpus-id, score)"
TREC_QRELS = "TREC (qid iter docid rel)"


@dataclass
class BeirData:
    """A BEIR data set split: where the corpus is, the queries that have judgements, the qrels.

    ``queries`` is in natural order of query id (``2`` before ``10``): ``--limit N`` takes its first N.
    """

    directory: Path
    split: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    qrels_format: str = BEIR_QRELS
    qrels_path: Path | None = None
    queries_path: Path | None = None

    @property
    def corpus(self) -> Path:
        return self.directory / "corpus.jsonl"


def natural_key(value: str) -> tuple[Any, ...]:
    """Sort key putting ``2`` before ``10`` and ``q2`` before ``q10``: runs of ASCII digits compare as numbers
    (then as text, so ``01`` and ``1`` still have a fixed order)."""
    parts = re.split(r"([0-9]+)", value)
    return (tuple(int(part) if i % 2 else part for i, part in enumerate(parts)), value)


def trec_order(docs: dict[str, float]) -> list[tuple[str, float]]:
    """A query's documents in trec_eval's order: score descending, ties by document id *descending*.

    This is trec_eval's ``comp_sim_docno`` (``strcmp(p2->docno, p1->docno)``), which pytrec_eval runs: every
    ranking Sieve derives from a run (the MRR@10 cut, written run files, compare's ranks) uses it, so a run with
    tied scores gets one order everywhere. Python compares ``str`` by code point, which is UTF-8 byte order, as
    ``strcmp`` is. Sieve's own runs have strictly decreasing scores, so the tie rule never applies to them.
    """
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def _read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], str]:
    """BEIR qrels (``query-id corpus-id score``, tab separated, optional header) or TREC qrels
    (``qid iter docid rel``: columns 0, 2 and 3); not both in one file. A line with a tab is split on tabs,
    one without on whitespace. Blank lines are skipped; a document judged twice for a query is refused."""
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    layout: tuple[int, int] | None = None  # (field count, line that set it)
    with _text_file(path) as handle:
        for number, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            row = [part.strip() for part in (text.split("\t") if "\t" in text else text.split())]
            if layout is None and row[0] == "query-id":  # BEIR's header
                continue
            if len(row) not in (3, 4):
                raise SieveError(f"{path}:{number}: expected 3 fields (BEIR: query-id, corpus-id, score) or 4 "
                                 f"(TREC: qid iter docid rel), got {len(row)}")
            if layout is None:
                layout = (len(row), number)
            elif len(row) != layout[0]:
                raise SieveError(f"{path}:{number}: {len(row)} fields, but {path}:{layout[1]} has {layout[0]}: a qrels "
                                 "file is either BEIR (3 fields) or TREC (4 fields), not both")
            qid, doc_id, grade = (row[0], row[1], row[2]) if len(row) == 3 else (row[0], row[2], row[3])
            if not qid or not doc_id:
                raise SieveError(f"{path}:{number}: empty {'query id' if not qid else 'document id'}")
            if not _GRADE.fullmatch(grade) or not GRADE_MIN <= int(grade) <= GRADE_MAX:
                raise SieveError(f"{path}:{number}: score must be an integer written in ASCII digits within "
                                 f"{GRADE_MIN}..{GRADE_MAX} (trec_eval's range), got {grade!r}")
            value = int(grade)
            seen = first_line.setdefault((qid, doc_id), number)
            if seen != number:
                raise SieveError(f"{path}:{number}: query {qid!r} judges document {doc_id!r} a second time (first at "
                                 f"{path}:{seen}); trec_eval refuses duplicate judgements")
            qrels.setdefault(qid, {})[doc_id] = value
    return qrels, TREC_QRELS if layout is not None and layout[0] == 4 else BEIR_QRELS


def _read_queries(path: Path, judged: dict[str, dict[str, int]]) -> dict[str, str]:
    """The judged queries' texts. Every line is a JSON object with a string or integer ``_id`` (unique in the
    file) and a string ``text``; a judged query's text must also be one the pipeline accepts (not empty, no
    control characters), so a bad query stops the evaluation before it starts, not when the pipeline gets to
    it. Blank lines are skipped."""
    from engine.errors import QueryError
    from engine.model import _check_text, _visible

    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    with _text_file(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:  # a key given twice is marked, not kept silently (its last value); NaN and Infinity are not JSON
                record = json.loads(line, object_pairs_hook=strict_object, parse_constant=refuse_json_constant)
            except json.JSONDecodeError:
                record = None
            except NotJson as exc:
                raise SieveError(f"{path}:{number}: not JSON ({exc})") from None
            flawed = refused_keys(record)
            if flawed:  # as sieve batch says it
                raise SieveError(f"{path}:{number}: {refused_key_problem(*flawed[0])}")
            if not isinstance(record, dict) or "_id" not in record or "text" not in record:
                raise SieveError(f"{path}:{number}: expected a JSON object with _id and text")
            raw_id, text = record["_id"], record["text"]
            if isinstance(raw_id, str) and unicode_problem(raw_id) is not None:
                raise SieveError(f"{path}:{number}: _id: {unicode_problem(raw_id)}")
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
                raise SieveError(f"{path}:{number}: _id must be a non-empty string or an integer, got "
                                 f"{a_json_kind(raw_id) if not isinstance(raw_id, str) else repr(raw_id)}")
            qid = str(raw_id)
            seen = first_line.setdefault(qid, number)
            if seen != number:
                raise SieveError(f"{path}:{number}: query id {qid!r} appears a second time (first at {path}:{seen})")
            if not isinstance(text, str):
                raise SieveError(f"{path}:{number}: query {qid}: text must be a string, got {a_json_kind(text)}")
            if qid in judged:
                try:
                    if not _visible(text):
                        raise QueryError("query is empty: give some text to search for")
                    _check_text(text, "query")
                except QueryError as exc:
                    raise SieveError(f"{path}:{number}: query {qid}: {exc}") from None
                queries[qid] = text
    return queries


def load_beir(directory: str | Path, split: str = "test") -> BeirData:
    """Read ``qrels/<split>.tsv`` (BEIR or TREC qrels) and the matching queries (``queries_<split>.jsonl`` or
    ``queries.jsonl``). Text files may start with a UTF-8 byte order mark."""
    directory = Path(directory)
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        raise SieveError(f"split must be a plain name (letters, digits, '.', '_', '-'), got {split!r}")
    if not directory.is_dir():
        raise SieveError(f"no data set at {directory}: " + ("it is a file, not a directory (a BEIR data set is a "
                         "directory holding qrels/ and queries.jsonl)" if directory.exists() else "no such directory"))
    if directory.name == "qrels" and not (directory / "qrels").is_dir():
        raise SieveError(f"{directory} is a data set's qrels directory: give the data set's own directory, "
                         f"{directory.parent}")
    qrels_path = directory / "qrels" / f"{split}.tsv"
    if qrels_path.is_dir():
        raise SieveError(f"no judgements for split '{split}': {qrels_path} is a directory, not a file")
    if not qrels_path.is_file():
        splits = sorted(p.stem for p in (directory / "qrels").glob("*.tsv") if p.is_file()) \
            if (directory / "qrels").is_dir() else []
        there = (f"; the splits there: {', '.join(splits)}" if splits
                 else f"; {directory} has no qrels/<split>.tsv at all (is it a BEIR data set?)")
        raise SieveError(f"no judgements for split '{split}': {qrels_path} does not exist{there}")
    qrels, qrels_format = _read_qrels(qrels_path)
    if not qrels:
        raise SieveError(f"no judged queries in {qrels_path}: the file has no query-id, corpus-id, score rows")
    queries_path = directory / f"queries_{split}.jsonl"
    if not queries_path.is_file():
        queries_path = directory / "queries.jsonl"
    if not queries_path.is_file():
        raise SieveError(f"no queries for split '{split}': neither queries_{split}.jsonl nor queries.jsonl in {directory}")
    queries = _read_queries(queries_path, qrels)
    missing = sorted(set(qrels) - set(queries), key=natural_key)
    if missing:
        raise SieveError(f"{len(missing)} judged queries have no text in {queries_path} (e.g. {missing[0]})")
    ordered = dict(sorted(queries.items(), key=lambda kv: natural_key(kv[0])))
    return BeirData(directory, split, ordered, qrels, qrels_format, qrels_path, queries_path)


@contextlib.contextmanager
def index_membership(index_path: str | Path | None) -> Iterator[Callable[[str], bool] | None]:
    """A doc-id membership test over the index at ``index_path`` for :func:`judgement_coverage` (None: no index,
    nothing to test); the index is closed on leaving the block."""
    if index_path is None:
        yield None
        return
    from engine.index import Index

    index = Index.open(Path(index_path), verify=False)
    try:
        yield lambda doc_id: index.row_of(doc_id) is not None
    finally:
        index.close()


def judgement_coverage(
    run: dict[str, dict[str, float]],
    qrels: dict[str, dict[str, int]],
    all_qrels: dict[str, dict[str, int]] | None = None,
    in_index: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """What the means silently include or leave out, for the report to say.

    ``qrels``: the judged queries evaluated. Those with no relevant document (no grade above 0) score 0 in every
    mean (as in BEIR and pytrec_eval); relevant documents the index lacks (``in_index``; None: not checked) count
    against recall; run queries with no judgement in ``all_qrels`` (default ``qrels``) are dropped.
    """
    all_qrels = qrels if all_qrels is None else all_qrels
    no_relevant = sorted((q for q, judged in qrels.items() if not any(g > 0 for g in judged.values())), key=natural_key)
    relevant = [(q, d) for q in sorted(qrels, key=natural_key) for d, g in sorted(qrels[q].items()) if g > 0]
    missing = None if in_index is None else [(q, d) for q, d in relevant if not in_index(d)]
    unjudged = sorted((q for q in run if q not in all_qrels), key=natural_key)
    return {
        "judged_queries": len(qrels),
        "queries_without_relevant": len(no_relevant),
        "relevant_documents": len(relevant),
        "relevant_not_in_index": None if missing is None else len(missing),
        "run_queries_not_judged": len(unjudged),
        "examples": {
            "query_without_relevant": no_relevant[0] if no_relevant else None,
            "relevant_not_in_index": {"query": missing[0][0], "doc_id": missing[0][1]} if missing else None,
            "run_query_not_judged": unjudged[0] if unjudged else None,
        },
    }


def coverage_warnings(coverage: dict[str, Any], *, index: str | None = None, run: str = "the run") -> list[str]:
    """One plain sentence per figure of :func:`judgement_coverage` that is not zero."""
    lines = []
    examples = coverage["examples"]
    if coverage["queries_without_relevant"]:
        lines.append(f"{coverage['queries_without_relevant']} of the {coverage['judged_queries']} judged queries have no "
                     f"relevant document (no grade above 0; e.g. '{examples['query_without_relevant']}'): they score 0 "
                     "in every mean, as in BEIR and pytrec_eval")
    if coverage["relevant_not_in_index"]:
        example = examples["relevant_not_in_index"]
        lines.append(f"{coverage['relevant_not_in_index']} of the {coverage['relevant_documents']} relevant documents "
                     f"are not in the index{f' {index}' if index else ''} (e.g. '{example['doc_id']}' for query "
                     f"'{example['query']}'): no run can retrieve them, and they count against recall")
    if coverage.get("run_queries_not_judged"):
        lines.append(f"{coverage['run_queries_not_judged']} queries of {run} are not in the qrels (e.g. "
                     f"'{examples['run_query_not_judged']}'): they are left out of every figure")
    return lines


@dataclass
class RunOutput:
    """Scores per query (a TREC run), latencies overall and per stage."""

    run: dict[str, dict[str, float]]
    latency_ms: list[float] = field(default_factory=list)
    stage_latency_ms: dict[str, list[float]] = field(default_factory=dict)
    degraded: int = 0  # queries that ran with a stage skipped (on_error: skip), at the deadline or on a failure
    empty: int = 0  # queries that returned no document (an access mask that allows nothing for the user, say)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # stage id -> {deadline | error: queries}
    bypassed: dict[str, int] = field(default_factory=dict)  # stage id -> queries its `when` routed past it


def run_pipeline(
    pipeline: Any,
    queries: dict[str, str],
    progress: Callable[[int], None] | None = None,
    trace_log: Path | None = None,
    context: Mapping[str, Any] | None = None,
) -> RunOutput:
    """Run every query through a warmed-up :class:`engine.pipeline.Pipeline`; ``context``: what every query is
    asked with besides its text (``user``, ``as_of``: :meth:`~engine.pipeline.Pipeline.make_query`'s keywords),
    so an access-controlled or dated pipeline is measured as a given user sees it at a fixed time.

    Ranks are turned into strictly decreasing run scores so that trec_eval (which sorts by score)
    sees exactly the pipeline's order, pins and ties included. With ``trace_log``, every query's
    trace is appended to that hash-chained log (after its latency is taken); without, none is written.
    """
    pipeline.warm_up()
    output = RunOutput(run={})
    for qid, text in queries.items():
        began = time.perf_counter()
        try:
            result = pipeline.search(text, log=False, **(context or {}))
        except QueryError as exc:
            raise QueryError(f"query {qid}: {exc}") from None
        output.latency_ms.append((time.perf_counter() - began) * 1000.0)
        if trace_log is not None:
            pipeline.log_trace(result.trace, trace_log)
        for stage in result.trace["stages"]:
            if stage.get("status") == "bypassed":  # routed past by its `when`: its latency is of the runs it made
                output.bypassed[stage["id"]] = output.bypassed.get(stage["id"], 0) + 1
                output.stage_latency_ms.setdefault(stage["id"], [])
                continue
            output.stage_latency_ms.setdefault(stage["id"], []).append(stage["duration_ms"])
            if stage.get("status") == "skipped":
                why = "deadline" if stage.get("deadline") else "error"
                counts = output.skipped.setdefault(stage["id"], {})
                counts[why] = counts.get(why, 0) + 1
        output.degraded += bool(result.degraded)
        output.empty += not result.results
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
    """Keep each query's ``depth`` best documents in trec_eval's order (:func:`trec_order`)."""
    return {qid: dict(trec_order(docs)[:depth]) for qid, docs in run.items()}


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


def _trec_field(value: str) -> bool:
    """Whether ``value`` can be one field of a whitespace-separated TREC line."""
    return bool(value) and not any(ch.isspace() for ch in value)


def _score_text(score: float) -> str:
    """Six decimals (Sieve's own rank-derived scores), or every digit where six would merge distinct scores."""
    text = f"{score:.6f}"
    return text if float(text) == score else repr(float(score))


def write_trec_run(run: dict[str, dict[str, float]], path: str | Path, tag: str = "sieve") -> None:
    """Save a run in TREC format (qid Q0 docid rank score tag), documents in trec_eval's order, atomically
    (a reader never sees half a file; through a symlink to its target; never over a FIFO or device).
    An id or tag with whitespace could not be read back: refused (SieveError) before anything is written."""
    from engine.trace import write_text_atomic

    if not _trec_field(tag):
        raise SieveError(f"run tag {tag!r} is empty or contains whitespace; a TREC run line could not hold it")
    lines = []
    for qid in sorted(run):
        if not _trec_field(qid):
            raise SieveError(f"query id {qid!r} is empty or contains whitespace; a TREC run line could not hold it")
        for rank, (doc_id, score) in enumerate(trec_order(run[qid]), start=1):
            if not _trec_field(doc_id):
                raise SieveError(f"document id {doc_id!r} (query {qid!r}) is empty or contains whitespace; a TREC "
                                 "run line could not hold it")
            lines.append(f"{qid} Q0 {doc_id} {rank} {_score_text(score)} {tag}\n")
    write_text_atomic(path, "".join(lines))


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    """A TREC run file (qid Q0 docid rank score tag). Blank lines are skipped; a document listed twice for one
    query is refused, as trec_eval does."""
    path = Path(path)
    if path.is_dir():
        raise SieveError(f"run file {path} is a directory, not a file")
    if not path.is_file():
        raise SieveError(f"run file not found: {path}")
    run: dict[str, dict[str, float]] = {}
    first_line: dict[tuple[str, str], int] = {}
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
            seen = first_line.setdefault((parts[0], parts[2]), number)
            if seen != number:
                raise SieveError(f"{path}:{number}: document {parts[2]!r} is listed a second time for query "
                                 f"{parts[0]!r} (first at {path}:{seen}); trec_eval refuses duplicate documents")
            run.setdefault(parts[0], {})[parts[2]] = score
    if not run:
        raise SieveError(f"run file {path} holds no ranked documents")
    return run


@contextlib.contextmanager
def _text_file(path: Path) -> Iterator[Any]:
    """``path`` opened as UTF-8 text, a leading byte order mark dropped; a byte that is not UTF-8 is a SieveError
    naming the file and line."""
    with open(path, encoding="utf-8-sig") as handle:
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
