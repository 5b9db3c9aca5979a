"""Several users, one process: state one query left behind must not change another's answer or trace.

- rules.override memoises a query-independent target condition's evidence per (rule, document), but not an
  evaluation that failed: that failure was this query's (a pattern over its time limit on a busy process);
- the dense embedder's tokenize() is called by concurrent queries outside the model's lock, and the fast tokenizer's
  truncation setting is shared: every thread gets what one thread alone gets.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from engine.compiler import compile_file
from engine.model import UserContext
from engine.pipeline import Pipeline

AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)
GUIDANCE = "type 2 diabetes metformin guidance"

OVERRIDES = r"""version: 1
kind: override
rules:
  - id: boost-guidance-titles
    action: boost
    factor: 1.5
    match: {field: doc.title, op: regex, value: '\b(guidance|guideline)\b'}
"""


def _override_pipeline(tmp_path: Path, index: Path, include_query_text: bool = True) -> Pipeline:
    (tmp_path / "overrides.yaml").write_text(OVERRIDES, encoding="utf-8")
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"version: 1\nindex: {index}\nstages:\n"
                      "  - {id: bm25, type: recall.bm25, params: {top_k: 20}}\n"
                      "  - {id: overrides, type: rules.override, inputs: [bm25], params: {rules: overrides.yaml}}\n"
                      "output: overrides\n"
                      f"trace: {{log: null, include_query_text: {str(include_query_text).lower()}}}\n",
                      encoding="utf-8")
    pipeline = Pipeline(compile_file(config))
    pipeline.warm_up()
    return pipeline


def _firing(pipeline: Pipeline, user_id: str, doc_id: str) -> dict:
    result = pipeline.run(pipeline.make_query(GUIDANCE, user=UserContext(user_id=user_id), as_of=AS_OF))
    stage = next(s for s in result.trace["stages"] if s["id"] == "overrides")
    return next(f for f in stage["details"]["firings"] if f["doc_id"] == doc_id)


def test_evidence_that_failed_to_evaluate_is_not_memoised_for_later_queries(tmp_path, medical_bm25, monkeypatch):
    """One timeout while user a's firing records were written (injected once: what a GIL stall produced) left every
    later user's record for that document with no evidence, for the life of the process."""
    import rules.conditions as conditions
    from rules.expressions import PatternTimeout

    pipeline = _override_pipeline(tmp_path, medical_bm25)
    real = conditions.bounded_search
    armed = [True]

    def times_out_once(pattern, text):
        if armed[0] and "guidance" in text.lower():
            armed[0] = False
            raise PatternTimeout(pattern, len(text))
        return real(pattern, text)

    monkeypatch.setattr(conditions, "bounded_search", times_out_once)
    first = _firing(pipeline, "a", "med-002")
    assert not armed[0], "the injected timeout was not reached: med-002 must fire for this query"
    later = {user: _firing(pipeline, user, "med-002") for user in ("b", "c")}
    expected = [{"field": "doc.title", "op": "regex", "matched": "guidance"}]
    assert {user: record["match"] for user, record in later.items()} == {"b": expected, "c": expected}
    assert not any("match_error" in record for record in later.values())
    # user a's rule fired (its condition was judged over the corpus at warm-up); only what it matched is missing,
    # and the record says why
    assert first["match"] == [] and first["effect"].startswith("boost")
    assert first["match_error"].startswith("what its target condition matched could not be collected: the pattern "
                                           "'\\\\b(guidance|guideline)\\\\b' ran over 250 ms")


def test_a_missing_evidence_reason_quotes_no_query_text_where_traces_may_not_hold_it(tmp_path, medical_bm25,
                                                                                      monkeypatch):
    import rules.conditions as conditions
    from rules.expressions import ExpressionRuntimeError

    pipeline = _override_pipeline(tmp_path, medical_bm25, include_query_text=False)

    def fails(pattern, text):
        raise ExpressionRuntimeError(f"failed on {text!r}", "the pattern failed")

    monkeypatch.setattr(conditions, "bounded_search", fails)
    record = _firing(pipeline, "a", "med-002")
    assert record["match_error"] == ("what its target condition matched could not be collected: the pattern failed "
                                     "(the message is withheld: it may quote the query, and include_query_text is "
                                     "false)")


def test_concurrent_tokenisations_of_long_and_short_texts_each_get_what_one_thread_alone_gets():
    """8 threads mixing a text far over max_length with short ones, on the packaged all-MiniLM-L6-v2 tokenizer: one
    thread's truncation setting was seen by another (2,432 of 20,000 long texts came back uncut, or cut but counted
    as whole)."""
    from engine.models import resolve_model
    from stages.embedding import load_embedder

    embedder = load_embedder(resolve_model("sentence-transformers/all-MiniLM-L6-v2"), pooling="mean", device="cpu",
                             precision="fp32")
    max_length = 256
    long_text = " ".join(["metformin lactic acidosis kidney function eGFR dose adjustment"] * 60)
    texts = [long_text, "Is metformin safe for patients with kidney disease?", "semaglutide", long_text[:900]]

    def signature(text: str) -> tuple:
        encoded = embedder.tokenize([text], max_length)
        return encoded.full_tokens[0], encoded.kept_tokens[0], tuple(encoded.encodings[0]["input_ids"])

    alone = {text: signature(text) for text in texts}
    assert alone[long_text][0] > 800 and alone[long_text][1] == max_length  # cut, and counted before the cut
    start = threading.Barrier(8)

    def run(worker: int) -> list[tuple]:
        start.wait()
        return [(text, signature(text)) for i in range(200) for text in [texts[(worker + i) % len(texts)]]]

    with ThreadPoolExecutor(8) as pool:
        seen = [pair for pairs in pool.map(run, range(8)) for pair in pairs]
    wrong = [(text[:20], got[:2]) for text, got in seen if got != alone[text]]
    assert wrong == [], f"{len(wrong)} of {len(seen)} tokenisations differ from one thread's: {wrong[:3]}"
