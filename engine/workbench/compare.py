"""``sieve compare``: two pipelines (or two saved TREC runs) on the same judged queries.

Per metric: the two means, the difference, and two paired significance tests over queries —
Student's paired t-test (``scipy.stats.ttest_rel``) and a paired randomisation test
(``scipy.stats.permutation_test`` with ``permutation_type="samples"``: each query's pair of scores
is swapped at random, 10,000 resamples, two-sided, fixed seed; exact when there are few queries).
Per query: wins, losses and ties. For the queries whose nDCG@10 changed most, a document-level
diff: each document that moved in either top 10, its ranks, its judgement and why it moved, read
from the two pipelines' traces (weighted signal contributions, ledger scores, rules fired, dedup
merges, and for a document one side did not return, that side's why-not verdict).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.console import written_out
from engine.errors import SieveError
from engine.evaluation import (aggregate, coverage_warnings, index_membership, judgement_coverage, load_beir,
                               natural_key, per_query_metrics, read_trec_run, trec_order)
from engine.workbench.evaluate import measures_for, ordered_metric_names

PRIMARY_METRIC = "ndcg_cut_10"
TIE_TOLERANCE = 1e-9
PERMUTATION_RESAMPLES = 10_000
PERMUTATION_SEED = 20261122
CONFIG_SUFFIXES = (".yaml", ".yml")


@dataclass
class Side:
    """One side of a comparison: its run, where it came from, and the config that can explain it."""

    label: str
    run: dict[str, dict[str, float]]
    source: str  # "config" or "run"
    config: Path | None
    index_path: Path | None = None


@dataclass
class MetricComparison:
    metric: str
    mean_a: float
    mean_b: float
    delta: float
    t_test_p: float | None
    randomisation_p: float | None
    wins: int  # queries where B beats A
    losses: int
    ties: int


@dataclass
class DocMove:
    doc_id: str
    rank_a: int | None
    rank_b: int | None
    relevance: int
    reasons: list[str] = field(default_factory=list)


@dataclass
class QueryDiff:
    qid: str
    text: str
    score_a: float
    score_b: float
    moves: list[DocMove]
    note: str | None = None


@dataclass
class Comparison:
    a: Side
    b: Side
    dataset: str
    split: str
    queries: int
    metrics: list[MetricComparison]
    per_query: dict[str, dict[str, tuple[float, float]]]
    diffs: list[QueryDiff]
    warnings: list[str] = field(default_factory=list)  # e.g. a run that ranks only some judged queries
    qrels_format: str | None = None
    judgements: dict[str, Any] = field(default_factory=dict)  # evaluation.judgement_coverage, per side for the runs

    def to_json(self) -> dict[str, Any]:
        return {
            "a": {"label": self.a.label, "source": self.a.source, "config": str(self.a.config) if self.a.config else None},
            "b": {"label": self.b.label, "source": self.b.source, "config": str(self.b.config) if self.b.config else None},
            "dataset": self.dataset, "split": self.split, "queries": self.queries,
            "tests": {
                "t_test": "paired Student's t-test over queries (scipy.stats.ttest_rel), two-sided",
                "randomisation": f"paired randomisation test (scipy.stats.permutation_test, permutation_type='samples', "
                                 f"{PERMUTATION_RESAMPLES} resamples, seed {PERMUTATION_SEED}), two-sided, mean difference",
            },
            "qrels_format": self.qrels_format,
            "judgements": self.judgements,
            "warnings": self.warnings,
            "metrics": [m.__dict__ for m in self.metrics],
            "most_changed": [
                {"qid": d.qid, "text": d.text, PRIMARY_METRIC + "_a": d.score_a, PRIMARY_METRIC + "_b": d.score_b,
                 "note": d.note, "moves": [m.__dict__ for m in d.moves]}
                for d in self.diffs
            ],
        }


def is_config(path: Path) -> bool:
    return path.suffix.lower() in CONFIG_SUFFIXES


def paired_tests(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """(t-test p, randomisation p) for paired samples; None where a test is undefined (no variance)."""
    import numpy as np
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2:
        return None, None
    differences = y - x
    if np.allclose(differences, 0.0, atol=TIE_TOLERANCE):
        return 1.0, 1.0
    t_p: float | None = float(stats.ttest_rel(y, x).pvalue)
    if t_p is not None and math.isnan(t_p):
        t_p = None
    result = stats.permutation_test(
        (x, y), lambda u, v, axis=-1: np.mean(v - u, axis=axis), permutation_type="samples",
        n_resamples=PERMUTATION_RESAMPLES, alternative="two-sided", vectorized=True,
        random_state=np.random.default_rng(PERMUTATION_SEED),
    )
    return t_p, float(result.pvalue)


def compare_metrics(per_a: dict[str, dict[str, float]], per_b: dict[str, dict[str, float]]) -> list[MetricComparison]:
    qids = sorted(per_a)
    names = ordered_metric_names(list(next(iter(per_a.values())).keys())) if per_a else []
    mean_a, mean_b = aggregate(per_a), aggregate(per_b)
    rows = []
    for name in names:
        a = [per_a[q][name] for q in qids]
        b = [per_b[q][name] for q in qids]
        t_p, r_p = paired_tests(a, b)
        wins = sum(1 for x, y in zip(a, b) if y - x > TIE_TOLERANCE)
        losses = sum(1 for x, y in zip(a, b) if x - y > TIE_TOLERANCE)
        rows.append(MetricComparison(name, mean_a[name], mean_b[name], mean_b[name] - mean_a[name], t_p, r_p,
                                     wins, losses, len(qids) - wins - losses))
    return rows


def _ranks(run_for_query: dict[str, float]) -> dict[str, int]:
    """Each document's rank as trec_eval sees it (ties by document id descending, :func:`trec_order`)."""
    return {doc_id: rank for rank, (doc_id, _) in enumerate(trec_order(run_for_query), start=1)}


def _record(trace: dict[str, Any] | None, doc_id: str) -> dict[str, Any] | None:
    if trace is None:
        return None
    return next((r for r in trace["results"] if r["doc_id"] == doc_id), None)


def move_reasons(doc_id: str, side_a: tuple[dict[str, Any], Any] | None, side_b: tuple[dict[str, Any], Any] | None) -> list[str]:
    """Why ``doc_id`` moved, from each side's (trace, why-not verdict): signals, ledger, rules, merges."""
    from engine.workbench.inspect import dedup_merges, rules_fired, signal_contributions

    reasons: list[str] = []
    record_a = _record(side_a[0], doc_id) if side_a else None
    record_b = _record(side_b[0], doc_id) if side_b else None
    parts_a = {p["signal"]: p for p in signal_contributions(record_a.get("explanation") or {})} if record_a else {}
    parts_b = {p["signal"]: p for p in signal_contributions(record_b.get("explanation") or {})} if record_b else {}
    if parts_b or parts_a:
        for signal in list(parts_b) + [s for s in parts_a if s not in parts_b]:
            wa = parts_a.get(signal, {}).get("weighted")
            wb = parts_b.get(signal, {}).get("weighted")
            if wa is None:
                reasons.append(f"{signal} {wb:+.3f}")
            elif wb is None:
                reasons.append(f"{signal} {wa:.3f} -> none")
            elif abs(wb - wa) > 1e-6:
                reasons.append(f"{signal} {wa:.3f} -> {wb:.3f}")
    if record_a is not None and record_b is not None:
        ledger_a = {e["stage"]: e for e in record_a["ledger"]}
        for entry in record_b["ledger"]:
            if entry["signal"] == "fused" or entry["stage"] in parts_b:
                continue
            before = ledger_a.get(entry["stage"])
            if before is None:
                reasons.append(f"{entry['stage']} {entry['value']:.4g} (rank {entry['rank']})")
            elif before["rank"] != entry["rank"]:
                reasons.append(f"{entry['stage']} rank {before['rank']} -> {entry['rank']}")
    elif record_b is not None and not parts_b:
        for entry in record_b["ledger"]:
            reasons.append(f"B {entry['stage']} {entry['value']:.4g} (rank {entry['rank']})")
    for label, side in (("A", side_a), ("B", side_b)):
        if side is None:
            continue
        trace, verdict = side
        for firing in rules_fired(trace, doc_id):
            reasons.append(f"{label}: rule `{firing['rule']}` fired ({firing.get('effect', firing.get('action'))})")
        for merge in dedup_merges(trace, doc_id):
            reasons.append(f"{label}: absorbed near-duplicate {merge['absorbed']}")
        if verdict is not None and verdict.status != "returned":
            reasons.append(f"{label}: {verdict.message}")
    return reasons


def _explain_query(side: Side, text: str, pipelines: dict[int, Any], stack: contextlib.ExitStack,
                   ) -> tuple[dict[str, Any], Any] | None:
    """Run one query through the side's config, keeping outcomes for why-not; None without a config. A side's
    pipeline is made at its first query and kept in ``pipelines`` (closed when ``stack`` closes)."""
    if side.config is None:
        return None
    from engine.compiler import compile_file
    from engine.workbench.inspect import InspectingPipeline

    pipeline = pipelines.get(id(side))
    if pipeline is None:
        pipeline = pipelines[id(side)] = stack.enter_context(
            InspectingPipeline(compile_file(side.config), index_path=side.index_path))
    result = pipeline.search(text)
    return result.trace, (pipeline, result)


def query_diffs(
    a: Side, b: Side, queries: dict[str, str], qrels: dict[str, dict[str, int]],
    per_a: dict[str, dict[str, float]], per_b: dict[str, dict[str, float]], most_changed: int, depth: int = 10,
) -> list[QueryDiff]:
    """Document-level diffs for the ``most_changed`` queries by |Δ nDCG@10| (ties on query id); the pipelines
    run to explain them are closed at the end."""
    from engine.workbench.inspect import why_not

    order = sorted(per_a, key=lambda q: (-abs(per_b[q][PRIMARY_METRIC] - per_a[q][PRIMARY_METRIC]), q))
    diffs = []
    pipelines: dict[int, Any] = {}  # by id(side): made at the side's first query, closed at the end
    with contextlib.ExitStack() as stack:
        for qid in order[:most_changed]:
            if abs(per_b[qid][PRIMARY_METRIC] - per_a[qid][PRIMARY_METRIC]) <= TIE_TOLERANCE:
                break
            ranks_a, ranks_b = _ranks(a.run.get(qid, {})), _ranks(b.run.get(qid, {}))
            shown = sorted({d for d, r in ranks_a.items() if r <= depth}
                           | {d for d, r in ranks_b.items() if r <= depth},
                           key=lambda d: (ranks_b.get(d, 10**9), ranks_a.get(d, 10**9), d))
            explained = {label: _explain_query(side, queries[qid], pipelines, stack)
                         for label, side in (("a", a), ("b", b))}
            notes = []
            for label, side, ranks in (("a", a, ranks_a), ("b", b, ranks_b)):
                got = explained[label]
                if got is not None and side.source == "run":
                    traced = [r["doc_id"] for r in got[0]["results"]][:depth]
                    recorded = [d for d, _ in sorted(ranks.items(), key=lambda kv: kv[1])][:depth]
                    if traced != recorded:
                        notes.append(f"{label.upper()}'s config does not reproduce its run file for this query "
                                     "(explanations are from a fresh run)")
            moves = []
            for doc_id in shown:
                rank_a, rank_b = ranks_a.get(doc_id), ranks_b.get(doc_id)
                if rank_a == rank_b:
                    continue
                sides = {}
                for label in ("a", "b"):
                    got = explained[label]
                    if got is None:
                        sides[label] = None
                        continue
                    trace, (pipeline, result) = got
                    returned = any(r["doc_id"] == doc_id for r in trace["results"])
                    verdict = None if returned else why_not(pipeline, result, doc_id)
                    sides[label] = (trace, verdict)
                moves.append(DocMove(doc_id, rank_a, rank_b, qrels.get(qid, {}).get(doc_id, 0),
                                     move_reasons(doc_id, sides["a"], sides["b"])))
            diffs.append(QueryDiff(qid, queries[qid], per_a[qid][PRIMARY_METRIC], per_b[qid][PRIMARY_METRIC], moves,
                                   "; ".join(notes) or None))
    return diffs


def compare(
    a: Side, b: Side, dataset: Path, *, split: str, recall_k: int, most_changed: int, limit: int | None,
    index_path: Path | None = None,
) -> Comparison:
    """Compare the two sides on the judged queries (the first ``limit`` in natural order of id). ``index_path``:
    the index whose documents the judgement coverage checks (None: not checked)."""
    if limit is not None and limit < 1:
        raise SieveError(f"--limit must be at least 1, got {limit}")
    data = load_beir(dataset, split)
    queries = data.queries
    if limit is not None:
        queries = dict(list(queries.items())[:limit])
    qrels = {qid: data.qrels[qid] for qid in queries}
    warnings = []
    with index_membership(index_path) as in_index:
        coverage = judgement_coverage({}, qrels, data.qrels, in_index)
    del coverage["run_queries_not_judged"], coverage["examples"]["run_query_not_judged"]
    judgements: dict[str, Any] = {**coverage, "index": str(index_path) if index_path is not None else None}
    warnings += coverage_warnings(coverage, index=str(index_path) if index_path is not None else None)
    for side, key in ((a, "run_queries_not_judged_a"), (b, "run_queries_not_judged_b")):
        unknown = sorted(set(side.run) - set(data.qrels), key=natural_key)
        if side.source == "run" and len(unknown) == len(side.run) and side.run:
            raise SieveError(f"run {side.label}: none of its {len(side.run)} queries is judged in {dataset} ({split}); "
                             f"e.g. query '{unknown[0]}'")
        judgements[key] = len(unknown)
        if unknown:
            warnings.append(f"run {side.label}: {len(unknown)} of its {len(side.run)} queries are not in the qrels "
                            f"(e.g. '{unknown[0]}'): they are left out of every figure")
        unranked = sorted(set(queries) - set(side.run), key=natural_key)
        if side.source == "run" and unranked:
            warnings.append(f"run {side.label} ranks nothing for {len(unranked)} of the {len(queries)} judged queries "
                            f"(e.g. '{unranked[0]}'): they score 0 for it, which the comparison counts")
    measures = measures_for(recall_k)
    per_a = per_query_metrics(a.run, qrels, measures)
    per_b = per_query_metrics(b.run, qrels, measures)
    metrics = compare_metrics(per_a, per_b)
    diffs = query_diffs(a, b, queries, qrels, per_a, per_b, most_changed)
    per_query = {q: {m: (per_a[q][m], per_b[q][m]) for m in per_a[q]} for q in per_a}
    return Comparison(a, b, str(dataset), split, len(queries), metrics, per_query, diffs, warnings,
                      data.qrels_format, judgements)


def load_run_side(path: Path, config: Path | None, index_path: Path | None) -> Side:
    return Side(path.name, read_trec_run(path), "run", config, index_path)


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


# ASCII punctuation markdown reads as syntax (emphasis, links, images, code, tables, headings, raw HTML)
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_\[\]<>!|#~&])")  # & too: `&shy;` would render as an invisible character


def _md(value: Any) -> str:
    """``value`` as literal text on one line of markdown: line breaks and invisible characters written out
    (``engine.console.written_out``), syntax characters backslash-escaped, so that a query or a document id (a
    dataset's, a corpus's) can add no table, link, image or heading to the file."""
    return _MARKDOWN_SYNTAX.sub(r"\\\1", written_out(str(value), keep=""))


def _fence(text: str, shortest: int = 1) -> str:
    """Backticks that open and close ``text`` as code (CommonMark): longer than any run of backticks in it."""
    return "`" * max(shortest, max((len(run) for run in re.findall("`+", text)), default=0) + 1)


def _md_code(value: Any) -> str:
    """``value`` as a code span on one line (``_fence``). A span whose text starts or ends with a backtick or a space
    gets one space inside each fence, which CommonMark strips again: ``" a "`` keeps its spaces."""
    text = written_out(str(value), keep="")
    fence = _fence(text)
    pad = " " if text.strip() and (text[0] in "` " or text[-1] in "` ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def to_markdown(comparison: Comparison, command: str | None = None) -> str:
    """The comparison as a markdown document (what bench/results stores). Every text that comes from the data, the
    configs or the command line (queries, ids, labels, paths) is written as literal text (``_md``, ``_md_code``)."""
    a, b = comparison.a, comparison.b
    lines = [f"# compare: A = {_md(a.label)} vs B = {_md(b.label)}", ""]
    if command:
        fence = _fence(command, shortest=3)
        lines += [fence, written_out(command, keep=""), fence, ""]
    lines += [
        f"{_md(comparison.dataset)}, split {_md_code(comparison.split)}, {comparison.queries} judged queries"
        + (f" (qrels: {_md(comparison.qrels_format)})" if comparison.qrels_format else "") + ". "
        f"A from {_md(a.source)}" + (f" ({_md(a.config)})" if a.config else "") + f", B from {_md(b.source)}"
        + (f" ({_md(b.config)})" if b.config else "") + ".",
        "",
        "Significance: *t* = paired Student's t-test (scipy.stats.ttest_rel); *rand* = paired randomisation test "
        f"(scipy.stats.permutation_test, samples permuted within each query pair, {PERMUTATION_RESAMPLES:,} resamples, "
        f"seed {PERMUTATION_SEED}; its p-value cannot go below about {2 / (PERMUTATION_RESAMPLES + 1):.4f}); "
        "both two-sided. Wins/losses/ties count queries where B is better/worse/equal. In the document moves, "
        "`signal +x` is the signal's weighted contribution to B's fused score, `a -> b` a change between A and B, "
        "and `stage value (rank r)` a ledger score B has and A has not.",
        "",
        "| metric | A | B | Δ (B−A) | p (t) | p (rand) | B wins | B losses | ties |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in comparison.metrics:
        lines.append(f"| {m.metric} | {m.mean_a:.4f} | {m.mean_b:.4f} | {m.delta:+.4f} | {_p(m.t_test_p)} | "
                     f"{_p(m.randomisation_p)} | {m.wins} | {m.losses} | {m.ties} |")
    if comparison.diffs:
        lines += ["", f"## Most changed queries (by |Δ {PRIMARY_METRIC}|)", ""]
    for diff in comparison.diffs:
        lines += [f"### query {_md(diff.qid)}: {PRIMARY_METRIC} {diff.score_a:.3f} → {diff.score_b:.3f}", "",
                  f"> {_md(diff.text)}", ""]
        if diff.note:
            lines += [f"*{_md(diff.note)}*", ""]
        for move in diff.moves:
            judged = f"relevance {move.relevance}" if move.relevance else "not judged relevant"
            where = f"{move.rank_a if move.rank_a is not None else '—'} → {move.rank_b if move.rank_b is not None else '—'}"
            why = "; ".join(move.reasons) if move.reasons else "no explanation available (no config for this side)"
            lines.append(f"- doc {_md_code(move.doc_id)} ({judged}) moved {where}: {_md(why)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
