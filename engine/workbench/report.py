"""``sieve report``: one trace as a static, self-contained HTML page.

The page is rendered from ``engine/templates/report.html.j2`` (package data) with autoescaping on:
document ids, rule names and query text are data, never markup. No script, no external asset:
styles are inline, score bars are CSS widths, the stage timeline is inline SVG, and a print
stylesheet keeps it readable on paper (explanation trees open, colours kept, no split rows).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from engine import __version__
from engine.console import written_out
from engine.errors import SieveError, TraceError
from engine.workbench.inspect import dedup_merges, rules_fired, score_parts

def visible(text: str) -> str:
    """``text`` with every character that reorders or hides text written out as ``[U+XXXX]``
    (``engine.console.hidden``: bidi overrides, zero-width characters, soft hyphens, tag characters, Hangul fillers,
    control characters...): in an id or title they make it read as something else (U+202E turns "fdp.exe" around,
    ``med-0\u00ad03`` reads as ``med-003``). Line breaks and tabs are kept."""
    return written_out(text, lambda char: f"[U+{ord(char):04X}]")

# Tableau 10, each colour darkened until it has 3:1 contrast against the bar's track (#f4f6fa, WCAG 1.4.11), the
# light pink replaced by a dark magenta (darkened, it read as the red)
PALETTE = ("#4C78A8", "#DB7109", "#529F49", "#E45756", "#4E9993", "#B279A2", "#C2185B", "#9D755D", "#9A8B85", "#AA8B0F")
MAX_DROPS_PER_STAGE = 200


def _colour(label: str, assigned: dict[str, str]) -> str:
    """A colour per signal label, in order of first appearance, never one another label of the report has: the
    palette, then hues spread by the golden angle (the bars separate adjacent segments, the text line under each bar
    names every part, so colour is never the only key)."""
    if label not in assigned:
        count = len(assigned)
        if count < len(PALETTE):
            assigned[label] = PALETTE[count]
        else:
            hue = (count - len(PALETTE)) * 137.508 % 360
            lightness = (30, 24)[(count - len(PALETTE)) % 2]  # 3:1 or more against the track whatever the hue
            assigned[label] = f"hsl({hue:.1f}, 62%, {lightness}%)"
    return assigned[label]


def _short(label: str, limit: int = 60) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


PIN_WITHOUT_RULE = re.compile(r"by an override rule in stage '(?P<stage>[^']*)' \(named in the stage's trace details\)")


def _name_pin_rules(node: Any, firings: list[dict[str, Any]]) -> Any:
    """For traces written before the override stage named its pin rules: the explanation tree with "pinned ... by an
    override rule (named in the stage's trace details)" naming the rule, from the stage's firings on this document."""
    if not isinstance(node, dict):
        return node
    description = node.get("description")
    if isinstance(description, str):
        def name(found: re.Match[str]) -> str:
            rules = [f.get("rule") for f in firings if f.get("stage") == found.group("stage") and f.get("action") == "pin"]
            if len(rules) != 1:
                return found.group(0)
            return f"by override rule '{rules[0]}' in stage '{found.group('stage')}'"

        description = PIN_WITHOUT_RULE.sub(name, description)
    details = node.get("details")
    return {**node, "description": description,
            **({"details": [_name_pin_rules(child, firings) for child in details]} if isinstance(details, list) else {})}


def _identity_rows(models: list[Any]) -> list[dict[str, Any]]:
    """One row per recorded stage identity: what it is, where it came from, and every content hash it records
    (weights, rule file, and nested ones: a rewrite's glossary, an entity stage's gazetteer, a cascade's light
    model)."""
    rows = []
    for model in models:
        if not isinstance(model, dict):
            continue
        hashes = []
        for key, label in (("weights_sha256", "weights"), ("sha256", "file")):
            if isinstance(model.get(key), str):
                hashes.append({"label": label, "sha256": model[key]})
        for key, value in model.items():
            if isinstance(value, dict):
                digest = value.get("sha256") or value.get("weights_sha256")
                if isinstance(digest, str):
                    where = value.get("file") or value.get("model") or ""
                    hashes.append({"label": f"{key}" + (f" ({Path(str(where)).name})" if where else ""),
                                   "sha256": digest})
        rows.append({
            "stage": model.get("stage"), "name": model.get("model") or model.get("rules_file") or "-",
            "source": model.get("source") or model.get("kind") or "-", "hashes": hashes,
            "device": model.get("device") or "-", "precision": model.get("precision") or "-",
            "scale": model.get("scale"),
        })
    return rows


def _history(query: dict[str, Any]) -> list[str]:
    """The conversation's earlier turns as shown: their text, or their sha256 when the text is not stored."""
    if isinstance(query.get("history"), list):
        return [str(turn) for turn in query["history"]]
    hashes = query.get("history_sha256")
    if isinstance(hashes, list):
        return [f"(text not stored; sha256 {digest})" for digest in hashes]
    count = query.get("history_turns") or 0
    return ["(text not stored)"] * int(count) if isinstance(count, int) else []


def _evidence_text(item: Any) -> str:
    """One item of a ``when``'s evidence as a line: ``query.text contains: matched 'vitamin'``, ``not ...``, ``expr ...``."""
    if not isinstance(item, dict):
        return str(item)
    if "field" in item:
        rest = ", ".join(f"{key} {json.dumps(value, ensure_ascii=False)}" for key, value in item.items()
                         if key not in ("field", "op"))
        return f"{item['field']} {item.get('op', '')}".rstrip() + (f": {rest}" if rest else "")
    return "; ".join(f"{key} {value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}"
                     for key, value in item.items())


def _ranked(output: Any) -> dict[Any, tuple[int, Any]]:
    """A stage's recorded output (``[[doc_id, score], ...]``, in rank order) as doc_id -> (rank, score)."""
    ranked: dict[Any, tuple[int, Any]] = {}
    for rank, entry in enumerate(output or [], start=1):
        if isinstance(entry, (list, tuple)) and len(entry) == 2:
            ranked.setdefault(entry[0], (rank, entry[1]))
    return ranked


def _rewrite_basis(details: dict[str, Any]) -> dict[str, Any]:
    """What a rewrite stage changed and on what basis (its trace details): each replacement with the heuristic and
    the antecedent (turn, salience), each glossary entry applied, the language read; parts of a change in turn."""
    def changes(items: Any, depth: int = 0) -> list[dict[str, Any]]:
        rows = []
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            antecedent = item.get("antecedent") if isinstance(item.get("antecedent"), dict) else {}
            rows.append({"depth": depth, "kind": item.get("kind"), "original": item.get("original"),
                         "replacement": item.get("replacement"), "heuristic": item.get("heuristic"),
                         "turn": antecedent.get("turn"), "salience": antecedent.get("salience")})
            rows.extend(changes(item.get("parts"), depth + 1))
        return rows

    glossary = [hit for hit in details.get("glossary") or [] if isinstance(hit, dict)]
    return {"changes": changes(details.get("replacements")), "glossary": glossary, "language": details.get("language"),
            "glossary_file": details.get("glossary_file") if isinstance(details.get("glossary_file"), dict) else None}


def _quoted(ids: list[Any]) -> str:
    return ", ".join(f"'{i}'" for i in ids)


def _written_stages(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage entries of the config that ran (``config.resolved``: as written, merged onto its bases, with the
    ``--set`` overrides; disabled stages included)."""
    resolved = config.get("resolved") if isinstance(config.get("resolved"), dict) else {}
    stages = resolved.get("stages") if isinstance(resolved.get("stages"), list) else []
    return [s for s in stages if isinstance(s, dict) and isinstance(s.get("id"), str)]


def _disabled_rows(trace: dict[str, Any], written: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stages the config switched off (``enabled: false``), which the trace's ``stages`` leave out: per stage its
    type, its inputs and readers as the config wrote them, and what its readers read in its place (the trace's
    ``disabled``; a trace written before it was recorded: the resolved config's ``enabled: false``, readers unknown).
    ``after``: the position in the trace's stages after which the row belongs (after the last stage read in its
    place, -1: first), so that the table reads in the order the stages ran."""
    by_id = {s["id"]: s for s in written}
    recorded = trace.get("disabled")
    if isinstance(recorded, dict):
        instead: dict[str, list[Any] | None] = {
            str(sid): (list(value) if isinstance(value, (list, tuple)) else None) for sid, value in recorded.items()}
    else:
        instead = {s["id"]: None for s in written if s.get("enabled") is False}
    ran = [s.get("id") for s in trace.get("stages", [])]
    order = {sid: k for k, sid in enumerate(by_id)}
    rows = []
    for sid in sorted(instead, key=lambda name: order.get(name, len(order))):
        entry = by_id.get(sid, {})
        inputs = list(entry.get("inputs") or [])
        read_instead = instead[sid]
        readers = [s["id"] for s in written if sid in (s.get("inputs") or [])]
        who = f"its readers ({', '.join(readers)})" if readers else "its readers"
        if read_instead is None:
            effect = "what reads it reads its input in its place"
        elif not readers and not read_instead:
            effect = "nothing reads it"
        elif read_instead:
            effect = f"{who} read {_quoted(read_instead)} in its place"
        else:
            effect = f"{who} read no stage in its place (the query as asked)"
        anchors = [ran.index(i) for i in (read_instead if read_instead is not None else inputs) if i in ran]
        rows.append({"id": sid, "type": entry.get("type") or "-", "inputs": inputs, "readers": readers,
                     "instead": read_instead, "effect": effect, "after": max(anchors, default=-1),
                     "when": entry.get("when")})
    return rows


def report_context(trace: dict[str, Any], source: Any = None) -> dict[str, Any]:
    """Everything the template shows, computed from the trace (no pipeline, index or model needed)."""
    total_ms = float((trace.get("timing_ms") or {}).get("total") or 0.0)
    stages = []
    span = max([total_ms] + [float(s.get("started_ms", 0)) + float(s.get("duration_ms", 0)) for s in trace.get("stages", [])]) or 1.0
    for stage in trace.get("stages", []):
        drops = stage.get("drops", [])
        stages.append({
            "id": stage.get("id"), "type": stage.get("type"), "inputs": stage.get("inputs", []),
            "status": stage.get("status", "ok"), "error": stage.get("error"), "when": stage.get("when"),
            "evidence": [_evidence_text(item) for item in ((stage.get("when") or {}).get("evidence") or [])],
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
             "width": 100.0 * p["value"] / widest, "colour": _colour(p["label"], colours)}
            for p in parts if p["value"] > 0
        ]
        negatives = [p for p in parts if p["value"] <= 0]
        document = record.get("document") or {}
        fired = rules_fired(trace, record["doc_id"])
        results.append({
            "rank": record["rank"], "doc_id": record["doc_id"], "score": record["score"],
            "title": document.get("title") or "", "segments": segments, "negatives": negatives,
            "ledger": record.get("ledger", []), "explanation": _name_pin_rules(record.get("explanation"), fired),
            "rules": fired, "merged": dedup_merges(trace, record["doc_id"]),
        })
    firings = []
    prefilter_rules = []
    inactive_rules = []
    resolved_dates = []
    drops = []
    drops_left_out = []
    outputs = {stage.get("id"): stage.get("output") or [] for stage in trace.get("stages", [])}
    for stage in trace.get("stages", []):
        details = stage.get("details") or {}
        for firing in details.get("firings", []) or []:
            evidence = [_evidence_text(item) for key in ("when", "match") for item in firing.get(key) or []]
            firings.append({"stage": stage["id"], **firing, "evidence": evidence})
        for rule in details.get("rules", []) if isinstance(details.get("rules"), list) else []:
            if isinstance(rule, dict) and "rule" in rule:
                prefilter_rules.append({"stage": stage["id"], **rule})
        inactive = details.get("inactive_rules")
        for rule, reason in inactive.items() if isinstance(inactive, dict) else []:
            inactive_rules.append({"stage": stage["id"], "rule": rule, "reason": reason})
        dates = details.get("resolved_dates")
        for rule, tests in dates.items() if isinstance(dates, dict) else []:
            for test, moment in tests.items() if isinstance(tests, dict) else []:
                resolved_dates.append({"stage": stage["id"], "rule": rule, "test": test, "moment": moment})
        stage_drops = stage.get("drops", [])
        # what the stage received, for the score and rank a drop had there (a top-k drop's detail is only k=N)
        received = _ranked(outputs.get(stage.get("inputs", [None])[0]) if len(stage.get("inputs", [])) == 1 else [])
        for drop in stage_drops[:MAX_DROPS_PER_STAGE]:
            drops.append({"stage": stage["id"], **drop, "received": received.get(drop.get("doc_id"))})
        if len(stage_drops) > MAX_DROPS_PER_STAGE:
            drops_left_out.append({"stage": stage["id"], "total": len(stage_drops), "shown": MAX_DROPS_PER_STAGE})
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
        rewrites.append({"stage": stage["id"], "rewritten": shown, **_rewrite_basis(stage.get("details") or {})})
    config = trace.get("config") or {}
    written = _written_stages(config)
    disabled = _disabled_rows(trace, written)
    # the stage table: the stages that ran, in the order they ran, each disabled one after what its readers read
    off = {row["id"] for row in disabled}
    inputs_written = {entry["id"]: list(entry.get("inputs") or []) for entry in written}
    rows: list[dict[str, Any]] = [{"disabled": True, **row} for row in disabled if row["after"] == -1]
    for position, stage in enumerate(stages):
        # the disabled stages this one was written to read, whose places its recorded inputs took
        rows.append({"disabled": False, **stage, "read_for": [i for i in inputs_written.get(stage["id"], []) if i in off]})
        rows.extend({"disabled": True, **row} for row in disabled if row["after"] == position)
    bases = [base for base in config.get("extends") or [] if isinstance(base, dict)]
    settings = [str(setting) for setting in config.get("set") or []]
    return {
        "trace": trace, "renderer_version": __version__, "query": query, "config": config,
        "index": trace.get("index") or {},
        "bases": bases, "settings": settings, "disabled": disabled, "stage_rows": rows,
        "warnings": [str(w) for w in trace.get("warnings") or []],
        "models": trace.get("models", []), "stages": stages, "total_ms": total_ms, "results": results,
        "legend": list(colours.items()), "firings": firings, "prefilter_rules": prefilter_rules, "drops": drops,
        "inactive_rules": inactive_rules, "resolved_dates": resolved_dates, "drops_left_out": drops_left_out,
        "glossary_hits": [{"stage": r["stage"], **hit} for r in rewrites for hit in r["glossary"]],
        "max_drops": MAX_DROPS_PER_STAGE,
        "rewrites": rewrites, "identities": _identity_rows(trace.get("models", [])), "history": _history(query),
        "source": source,
    }


def _finalize(value: Any) -> Any:
    """Every value the template prints, text with its invisible characters made visible (before escaping)."""
    from markupsafe import Markup

    if isinstance(value, str) and not isinstance(value, Markup):
        return visible(value)
    return value


def _css_string(value: Any) -> Any:
    """``value`` as a CSS string literal for the page's <style> (the print header): every character but letters,
    digits, space and ``.,:;_-`` as a CSS escape, so that nothing in it can end the string or the style element."""
    from markupsafe import Markup

    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;_-")
    text = visible(str(value))  # a bidi override in a trace id must not reach the printed page either
    return Markup('"' + "".join(char if char in safe else f"\\{ord(char):06x}" for char in text) + '"')


def render_report(trace: dict[str, Any], source: Any = None) -> str:
    """The HTML page for one trace; ``source`` (``engine.trace.TraceSource``): whether the trace is vouched for by
    its log, shown at the top (an unverified one in a banner)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, TemplateNotFound

    if not isinstance(trace, dict) or "stages" not in trace:
        raise TraceError("not a Sieve trace: it has no stages")
    environment = Environment(
        loader=PackageLoader("engine", "templates"), autoescape=True, undefined=StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
    )
    environment.filters["num"] = lambda value, digits=4: "-" if value is None else f"{float(value):.{digits}g}"
    environment.filters["css_string"] = _css_string
    try:
        template = environment.get_template("report.html.j2")
    except TemplateNotFound:
        raise SieveError("the report template engine/templates/report.html.j2 is missing from this installation") from None
    return template.render(**report_context(trace, source))


def write_report(trace: dict[str, Any], out: Path, source: Any = None) -> Path:
    """Render and write atomically (a full disk leaves the previous report whole, not a cut one that a browser shows
    as if complete; a FIFO or a device is refused, not written through)."""
    from engine.trace import write_text_atomic

    html = render_report(trace, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, html)
    return out
