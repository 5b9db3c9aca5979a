"""``sieve report``: one trace as a static, self-contained HTML page.

The page is rendered from ``engine/templates/report.html.j2`` (package data) with autoescaping on:
document ids, rule names and query text are data, never markup. No script, no external asset:
styles are inline, score bars are CSS widths, the stage timeline is inline SVG, and a print
stylesheet keeps it readable on paper (explanation trees open, colours kept, no split rows).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from engine.errors import SieveError, TraceError
from engine.workbench.inspect import dedup_merges, rules_fired, score_parts

PALETTE = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D", "#BAB0AC", "#EECA3B")
MAX_DROPS_PER_STAGE = 200


def _colour(label: str, assigned: dict[str, str]) -> str:
    """A stable colour per signal label, in order of first appearance (then by hash once the palette is used)."""
    if label not in assigned:
        if len(assigned) < len(PALETTE):
            assigned[label] = PALETTE[len(assigned)]
        else:
            assigned[label] = PALETTE[int(hashlib.sha256(label.encode()).hexdigest(), 16) % len(PALETTE)]
    return assigned[label]


def _short(label: str, limit: int = 60) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def report_context(trace: dict[str, Any]) -> dict[str, Any]:
    """Everything the template shows, computed from the trace (no pipeline, index or model needed)."""
    total_ms = float((trace.get("timing_ms") or {}).get("total") or 0.0)
    stages = []
    span = max([total_ms] + [float(s.get("started_ms", 0)) + float(s.get("duration_ms", 0)) for s in trace.get("stages", [])]) or 1.0
    for stage in trace.get("stages", []):
        drops = stage.get("drops", [])
        stages.append({
            "id": stage.get("id"), "type": stage.get("type"), "inputs": stage.get("inputs", []),
            "status": stage.get("status", "ok"), "error": stage.get("error"),
            "started_ms": float(stage.get("started_ms", 0.0)), "duration_ms": float(stage.get("duration_ms", 0.0)),
            "bar_left": 100.0 * float(stage.get("started_ms", 0.0)) / span,
            "bar_width": max(0.4, 100.0 * float(stage.get("duration_ms", 0.0)) / span),
            "input_counts": stage.get("input_counts", []),
            "output_count": len(stage["output"]) if "output" in stage else None,
            "mask": stage.get("mask"), "drops": len(drops),
            "decisions": stage.get("decisions", []), "timings": stage.get("timings_ms", {}),
        })
    colours: dict[str, str] = {}
    results = []
    widest = max([sum(max(0.0, p["value"]) for p in score_parts(r)) for r in trace.get("results", [])] + [0.0]) or 1.0
    for record in trace.get("results", []):
        parts = score_parts(record)
        segments = [
            {"label": _short(p["label"]), "full_label": p["label"], "value": p["value"], "detail": p.get("detail"),
             "width": 100.0 * p["value"] / widest, "colour": _colour(_short(p["label"]), colours)}
            for p in parts if p["value"] > 0
        ]
        negatives = [p for p in parts if p["value"] <= 0]
        document = record.get("document") or {}
        results.append({
            "rank": record["rank"], "doc_id": record["doc_id"], "score": record["score"],
            "title": document.get("title") or "", "segments": segments, "negatives": negatives,
            "ledger": record.get("ledger", []), "explanation": record.get("explanation"),
            "rules": rules_fired(trace, record["doc_id"]), "merged": dedup_merges(trace, record["doc_id"]),
        })
    firings = []
    prefilter_rules = []
    drops = []
    for stage in trace.get("stages", []):
        details = stage.get("details") or {}
        for firing in details.get("firings", []) or []:
            firings.append({"stage": stage["id"], **firing})
        for rule in details.get("rules", []) if isinstance(details.get("rules"), list) else []:
            if isinstance(rule, dict) and "rule" in rule:
                prefilter_rules.append({"stage": stage["id"], **rule})
        stage_drops = stage.get("drops", [])
        for drop in stage_drops[:MAX_DROPS_PER_STAGE]:
            drops.append({"stage": stage["id"], **drop})
        if len(stage_drops) > MAX_DROPS_PER_STAGE:
            drops.append({"stage": stage["id"], "doc_id": "…", "reason": "more",
                          "detail": f"{len(stage_drops) - MAX_DROPS_PER_STAGE} more drops in the trace"})
    query = trace.get("query") or {}
    rewrites = []
    for stage in trace.get("stages", []):
        if "query" not in stage:
            continue
        record = stage.get("query") or {}
        if "rewritten" in record:
            shown = record["rewritten"] if record["rewritten"] is not None else "(unchanged)"
        elif record.get("rewritten_sha256"):
            shown = f"(text not stored; sha256 {record['rewritten_sha256']})"
        else:
            shown = "(unchanged)"
        rewrites.append({"stage": stage["id"], "rewritten": shown})
    config = trace.get("config") or {}
    return {
        "trace": trace, "query": query, "config": config, "index": trace.get("index") or {},
        "models": trace.get("models", []), "stages": stages, "total_ms": total_ms, "results": results,
        "legend": list(colours.items()), "firings": firings, "prefilter_rules": prefilter_rules, "drops": drops,
        "rewrites": rewrites,
    }


def render_report(trace: dict[str, Any]) -> str:
    """The HTML page for one trace."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, TemplateNotFound

    if not isinstance(trace, dict) or "stages" not in trace:
        raise TraceError("not a Sieve trace: it has no stages")
    environment = Environment(
        loader=PackageLoader("engine", "templates"), autoescape=True, undefined=StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    environment.filters["num"] = lambda value, digits=4: "-" if value is None else f"{float(value):.{digits}g}"
    try:
        template = environment.get_template("report.html.j2")
    except TemplateNotFound:
        raise SieveError("the report template engine/templates/report.html.j2 is missing from this installation") from None
    return template.render(**report_context(trace))


def write_report(trace: dict[str, Any], out: Path) -> Path:
    html = render_report(trace)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
