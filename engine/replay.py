"""Replay a traced query: same config (embedded in the trace), same index, same ``as_of``.

The replay reports whether the ranking is identical: the same documents in the same order with
the same scores. An index whose manifest changed since the trace is reported, not silently used.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.compiler import compile_data
from engine.errors import TraceError
from engine.model import Query, UserContext
from engine.pipeline import Pipeline


def _recorded_query(trace: dict[str, Any], query_text: str | None) -> Query:
    recorded = trace.get("query") or {}
    text = recorded.get("text")
    if text is None:
        if query_text is None:
            raise TraceError(
                "this trace stores only the query's sha256 (trace.include_query_text is off); "
                "pass the original text with --query"
            )
        text = query_text
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != recorded.get("text_sha256"):
        raise TraceError("the query text does not match the sha256 recorded in the trace")
    try:
        return Query(
            text=text,
            history=tuple(recorded.get("history") or ()),
            user=UserContext.model_validate(recorded.get("user") or {}),
            as_of=datetime.fromisoformat(recorded["as_of"]),
            language=recorded.get("language"),
        )
    except (KeyError, ValueError) as exc:
        raise TraceError(f"the trace's query record is malformed: {exc}") from None


def replay_trace(
    trace: dict[str, Any], *, index_path: Path | None = None, query_text: str | None = None
) -> dict[str, Any]:
    """Re-run the trace's query; returns a report with ``identical`` and any differences."""
    config = trace.get("config") or {}
    if "resolved" not in config:
        raise TraceError("the trace has no embedded configuration to replay")
    compiled = compile_data(
        config["resolved"], label=f"<config in trace {trace.get('trace_id')}>", base_dir=Path(config.get("dir", "."))
    )
    differences: list[str] = []
    if compiled.config_sha256 != config.get("sha256"):
        differences.append(
            f"config sha256 differs: trace {config.get('sha256', '?')[:12]}, now {compiled.config_sha256[:12]}"
        )
    recorded_index = trace.get("index") or {}
    if index_path is None and recorded_index.get("path"):
        index_path = Path(recorded_index["path"])
    pipeline = Pipeline(compiled, index_path=index_path)
    query = _recorded_query(trace, query_text)
    result = pipeline.run(query)
    now_index = result.trace.get("index") or {}
    if recorded_index.get("manifest_sha256") != now_index.get("manifest_sha256"):
        differences.append(
            "index manifest differs: trace "
            f"{str(recorded_index.get('manifest_sha256'))[:12]}, now {str(now_index.get('manifest_sha256'))[:12]}"
        )
    differences.extend(_model_differences(trace.get("models") or [], result.trace.get("models") or []))
    before = [(r["doc_id"], r["score"]) for r in trace.get("results", [])]
    after = [(r["doc_id"], r["score"]) for r in result.trace["results"]]
    if len(before) != len(after):
        differences.append(f"{len(before)} results in the trace, {len(after)} now")
    for rank, (old, new) in enumerate(zip(before, after), start=1):
        if old[0] != new[0]:
            differences.append(f"rank {rank}: trace has {old[0]}, replay has {new[0]}")
        elif old[1] != new[1]:
            differences.append(f"rank {rank} ({old[0]}): score {old[1]!r} in the trace, {new[1]!r} now")
    ranking_identical = [d for d, _ in before] == [d for d, _ in after]
    return {
        "trace_id": trace.get("trace_id"),
        "identical": not differences,
        "ranking_identical": ranking_identical,
        "compared": len(before),
        "differences": differences,
        "config_sha256": compiled.config_sha256,
        "index_manifest_sha256": now_index.get("manifest_sha256") or "",
        "replay_trace_id": result.trace["trace_id"],
    }


MODEL_FIELDS = ("weights_sha256", "device", "precision", "max_length")


def _model_differences(recorded: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    """How each stage's model differs between the trace and the replay: other weights, or the same
    weights run differently (``device``/``precision: auto`` resolve per machine: bf16 on a CPU with
    native bf16, fp16 on CUDA), which changes scores in their last digits."""
    current = {m.get("stage"): m for m in now}
    differences = []
    for model in recorded:
        stage = model.get("stage")
        other = current.get(stage)
        if other is None:
            differences.append(f"stage '{stage}' recorded a model ({model.get('model')}); the replay used none")
            continue
        changed = [f"{field} {model.get(field)!r} -> {other.get(field)!r}" for field in MODEL_FIELDS
                   if model.get(field) != other.get(field)]
        if changed:
            hint = ("; pin device and precision in the config for bit-identical replays across machines"
                    if any(c.startswith(("device", "precision")) for c in changed) else "")
            differences.append(f"model of stage '{stage}' differs: {', '.join(changed)}{hint}")
    return differences
