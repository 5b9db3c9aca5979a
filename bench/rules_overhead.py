"""Rule overhead: what `rules.prefilter` + `rules.override` cost per query, against a baseline.

Corpus: the full SciFact corpus (5,183 documents) with synthetic, seeded metadata added to every
document (acl, jurisdiction, date, source, status, doc_type, audience, drugs) so the rules have
something to read. Queries: the first ``--queries`` SciFact test queries. Rules: the shape of the
medical example pack (configs/medical) — ACL with public values, jurisdiction, exclude with a
query condition, keyword block-list, source allow-list, a date window relative to as_of; pins
with query conditions and a validity window, a bury, boosts/demotes (static and query-dependent,
one `value_from`), an expression-based exclude.

Measured in the same run, queries alternating between the two pipelines:

- baseline: ``recall.bm25 (top_k 200) -> select.top_k 10``
- rules:    ``rules.prefilter -> recall.bm25 (top_k 200, masked) -> rules.override -> select.top_k 10``

and, to isolate the rule evaluation itself, each rule stage's ``run`` called directly on the same
query with 200 incoming candidates (the baseline's BM25 output), no executor around it.

Usage: .venv/bin/python bench/rules_overhead.py [--queries 100] [--repeats 3]
Writes bench/results/rules_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench._common import host, run_record, write_results  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "scifact"
AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)

ACCESS = """\
version: 1
kind: prefilter
strictness: lenient
rules:
  - {id: acl, action: acl, public: [public]}
  - {id: jurisdiction, action: jurisdiction, global: [global]}
  - id: hide-drafts
    action: exclude
    when: {not: {field: user.roles, op: contains, value: guideline-editor}}
    match: {field: doc.status, op: eq, value: draft}
  - id: patient-level-data
    action: exclude
    when: {not: {field: user.groups, op: contains, value: pharmacovigilance}}
    match: {field: doc.text, op: contains_any, value: [patient-level data, unredacted, identifiable]}
  - id: trusted-sources
    action: include
    match: {field: doc.source, op: in, value: [nice, fda, ema, who, cochrane, journal, sponsor]}
  - {id: retention, action: date_range, on_or_after: as_of - 15y, missing: allow}
"""

OVERRIDES = """\
version: 1
kind: override
strictness: lenient
rules:
  - id: pin-alert
    action: pin
    docs: [{pin_a}]
    position: 1
    priority: 10
    from: 2025-01-01
    until: 2025-12-31
    when: {{any: [{{field: query.effective, op: contains_any, value: [cell, gene, cancer, protein]}}]}}
  - id: pin-second
    action: pin
    docs: [{pin_b}]
    position: 3
    when: {{field: query.effective, op: regex, value: '\\b(risk|treatment|therapy)\\b'}}
  - {{id: bury-superseded, action: bury, match: {{field: doc.status, op: eq, value: superseded}}}}
  - id: boost-current-guidelines
    action: boost
    factor: 1.25
    match: {{all: [{{field: doc.doc_type, op: in, value: [guideline, safety_alert]}}, {{field: doc.status, op: eq, value: current}}]}}
  - id: demote-leaflets-for-clinicians
    action: demote
    factor: 0.6
    when: {{field: user.roles, op: contains, value: clinician}}
    match: {{field: doc.audience, op: eq, value: public}}
  - id: boost-asked-drug
    action: boost
    factor: 1.5
    match: {{field: doc.drugs, op: contains_any, value_from: query.entities.DRUG}}
  - id: exclude-off-label-for-patients
    action: exclude
    when: {{field: user.roles, op: contains, value: patient}}
    match: {{expr: "'off-label' in doc.text|lower"}}
  - id: boost-strong-lexical
    action: boost
    add: 0.5
    match: {{field: score.bm25, op: ge, value: 20}}
"""


def machine() -> dict[str, Any]:
    import numpy

    return host(numpy=numpy.__version__, platform=platform.platform())


def synthetic_corpus(target: Path, seed: int = 0) -> list[str]:
    """SciFact with seeded metadata on every document; returns the doc ids in order."""
    rng = random.Random(seed)
    ids = []
    with open(DATA / "corpus.jsonl", encoding="utf-8") as source, open(target, "w", encoding="utf-8") as out:
        for line in source:
            record = json.loads(line)
            ids.append(str(record["_id"]))
            roll = rng.random()
            if roll < 0.80:
                record["acl"] = ["public"]
            elif roll < 0.95:
                record["acl"] = rng.sample(["trial-investigators", "pharmacovigilance", "clinicians", "editors"], 2)
            # else: no ACL at all (visible: default_deny is off)
            record["jurisdiction"] = rng.choice(["US", "UK", "EU", "global", "global", "global"])
            if rng.random() > 0.05:
                record["date"] = f"{rng.randint(2003, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
            record["source"] = rng.choice(["nice", "fda", "ema", "who", "cochrane", "journal", "journal", "sponsor", "forum"])
            record["status"] = rng.choices(["current", "superseded", "draft"], weights=[85, 10, 5])[0]
            record["doc_type"] = rng.choice(["guideline", "safety_alert", "review", "trial_report", "label"])
            record["audience"] = rng.choice(["clinician", "clinician", "public"])
            record["drugs"] = rng.sample(["metformin", "insulin", "warfarin", "statin", "semaglutide", "aspirin"],
                                         rng.randint(0, 2))
            out.write(json.dumps(record) + "\n")
    return ids


def write_pipelines(root: Path, doc_ids: list[str]) -> tuple[Path, Path]:
    (root / "access.yaml").write_text(ACCESS, encoding="utf-8")
    (root / "overrides.yaml").write_text(OVERRIDES.format(pin_a=doc_ids[10], pin_b=doc_ids[2000]), encoding="utf-8")
    baseline = root / "baseline.yaml"
    baseline.write_text(
        "version: 1\nindex: index\ntrace: {log: null, explain: false}\nexecutor: {max_workers: 1}\nstages:\n"
        "  - {id: bm25, type: recall.bm25, params: {top_k: 200}}\n"
        "  - {id: final, type: select.top_k, inputs: [bm25], params: {k: 10}}\n", encoding="utf-8")
    with_rules = root / "rules.yaml"
    with_rules.write_text(
        "version: 1\nindex: index\ntrace: {log: null, explain: false}\nexecutor: {max_workers: 1}\nstages:\n"
        "  - {id: access, type: rules.prefilter, params: {rules: access.yaml}}\n"
        "  - {id: bm25, type: recall.bm25, inputs: [access], params: {top_k: 200}}\n"
        "  - {id: rules, type: rules.override, inputs: [bm25], params: {rules: overrides.yaml}}\n"
        "  - {id: final, type: select.top_k, inputs: [rules], params: {k: 10}}\n", encoding="utf-8")
    return baseline, with_rules


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values), 4), "p95_ms": round(percentile(values, 0.95), 4),
            "mean_ms": round(statistics.fmean(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the queries (after one warm-up pass)")
    args = parser.parse_args()

    from engine.compiler import compile_file
    from engine.index import build_index
    from engine.model import Candidate, Query, ScoreEntry, UserContext
    from engine.pipeline import Pipeline
    from engine.stage import StageContext

    info = machine()
    print("machine:", json.dumps(info))
    queries = [json.loads(line)["text"] for line in (DATA / "queries.jsonl").read_text().splitlines()[: args.queries]]
    users = [
        UserContext(roles=("clinician",), groups=("clinicians",), jurisdictions=("US",)),
        UserContext(roles=("patient",), jurisdictions=("UK",)),
        UserContext(roles=("guideline-editor",), groups=("editors", "pharmacovigilance"), jurisdictions=("EU", "US")),
    ]
    with tempfile.TemporaryDirectory(prefix="sieve-bench-rules-") as scratch:
        root = Path(scratch)
        doc_ids = synthetic_corpus(root / "corpus.jsonl")
        began = time.perf_counter()
        build_index(root / "corpus.jsonl", root / "index", {"bm25": {}})
        index_s = time.perf_counter() - began
        baseline_path, rules_path = write_pipelines(root, doc_ids)
        baseline = Pipeline(compile_file(baseline_path))
        with_rules = Pipeline(compile_file(rules_path))
        baseline.warm_up()
        began = time.perf_counter()
        resources = with_rules.warm_up()
        warm_up_s = time.perf_counter() - began
        prefilter = with_rules.compiled.stages["access"]
        override = with_rules.compiled.stages["rules"]

        def make(i: int, pipeline: Pipeline) -> Query:
            query = pipeline.make_query(queries[i], user=users[i % len(users)], as_of=AS_OF)
            if i % 2 == 0:
                query = query.model_copy(update={"entities": ({"text": "metformin", "label": "DRUG"},)})
            return query

        totals: dict[str, list[float]] = {"baseline": [], "rules": []}
        stage_ms: dict[str, list[float]] = {"access": [], "rules": []}
        direct: dict[str, list[float]] = {"prefilter": [], "override": [], "both": []}
        incoming_sizes: list[int] = []
        firing_counts: list[int] = []
        for repeat in range(args.repeats + 1):
            timed = repeat > 0
            for i in range(len(queries)):
                order = [("baseline", baseline), ("rules", with_rules)] if i % 2 == 0 else [("rules", with_rules), ("baseline", baseline)]
                outputs = {}
                for name, pipeline in order:
                    query = make(i, pipeline)
                    t0 = time.perf_counter()
                    outputs[name] = pipeline.run(query)
                    if timed:
                        totals[name].append((time.perf_counter() - t0) * 1000.0)
                if timed:
                    for record in outputs["rules"].trace["stages"]:
                        if record["id"] in stage_ms:
                            stage_ms[record["id"]].append(record["duration_ms"])
                # the rule stages alone, on the same query, with 200 incoming candidates
                query = make(i, with_rules)
                bm25_200 = next(s for s in outputs["baseline"].trace["stages"] if s["id"] == "bm25")["output"]
                candidates = [Candidate(doc_id, resources.index.row_of(doc_id), (ScoreEntry("bm25", "bm25", score, rank),))
                              for rank, (doc_id, score) in enumerate(bm25_200, start=1)]
                t0 = time.perf_counter()
                mask_result = prefilter.run(StageContext("access", query, [], None, resources))
                t1 = time.perf_counter()
                override_result = override.run(StageContext("rules", query, [candidates], mask_result.mask, resources))
                t2 = time.perf_counter()
                if timed:
                    incoming_sizes.append(len(candidates))
                    firing_counts.append(len(override_result.details["firings"]))
                    direct["prefilter"].append((t1 - t0) * 1000.0)
                    direct["override"].append((t2 - t1) * 1000.0)
                    direct["both"].append((t2 - t0) * 1000.0)

    payload: dict[str, Any] = {
        **run_record("rules_overhead"),
        "machine": info,
        "corpus": {"documents": len(doc_ids), "source": "SciFact corpus + seeded synthetic metadata"},
        "queries": len(queries),
        "repeats": args.repeats,
        "incoming_candidates_median": statistics.median(incoming_sizes),
        "override_firings_traced_median": statistics.median(firing_counts),
        "index_build_s": round(index_s, 2),
        "rules_warm_up_s": round(warm_up_s, 3),
        "direct": {k: summary(v) for k, v in direct.items()},
        "in_pipeline_stage": {k: summary(v) for k, v in stage_ms.items()},
        "pipeline_total": {k: summary(v) for k, v in totals.items()},
    }
    payload["pipeline_overhead_median_ms"] = round(
        payload["pipeline_total"]["rules"]["median_ms"] - payload["pipeline_total"]["baseline"]["median_ms"], 4)
    d, s, t = payload["direct"], payload["in_pipeline_stage"], payload["pipeline_total"]
    load = info.get("load_average_at_start")
    markdown = f"""# Rule overhead (rules.prefilter + rules.override)

Machine: {info['cpu']}, {info['cpu_cores_usable']} usable cores, Python {info['python']}, numpy {info['numpy']};
load average at start {load} (the cores are shared with other jobs, so medians are the figure to read).

Corpus: SciFact, {len(doc_ids)} documents with seeded synthetic metadata (acl, jurisdiction, date,
source, status, doc_type, audience, drugs). {len(queries)} SciFact test queries x {args.repeats} timed passes
(after a warm-up pass), three users in rotation, half the queries carrying a DRUG entity.
Rules: 6 prefilter rules (acl, jurisdiction, exclude with a query condition, keyword block-list,
source allow-list, date window relative to as_of) and 8 override rules (2 pins with query
conditions and a window, bury, 4 boosts/demotes incl. `value_from` and a ledger-score condition, an
expression exclude) — the shape of `configs/medical`.

| measured | median ms | p95 ms |
|---|---|---|
| `rules.prefilter` run, mask over {len(doc_ids)} documents | {d['prefilter']['median_ms']:.3f} | {d['prefilter']['p95_ms']:.3f} |
| `rules.override` run, {int(payload['incoming_candidates_median'])} incoming candidates, {int(payload['override_firings_traced_median'])} firings traced (median) | {d['override']['median_ms']:.3f} | {d['override']['p95_ms']:.3f} |
| **both, per query** | **{d['both']['median_ms']:.3f}** | **{d['both']['p95_ms']:.3f}** |
| both stages as timed by the executor (trace `duration_ms`) | {s['access']['median_ms'] + s['rules']['median_ms']:.3f} | |
| baseline pipeline (bm25 top 200 -> top 10), total | {t['baseline']['median_ms']:.3f} | {t['baseline']['p95_ms']:.3f} |
| pipeline with the rule stages, total | {t['rules']['median_ms']:.3f} | {t['rules']['p95_ms']:.3f} |
| **difference of medians** | **{payload['pipeline_overhead_median_ms']:.3f}** | |

The first three rows are the rule evaluation itself. The pipeline difference adds what the
executor does for two more stages (contexts, trace records listing each stage's 200 outputs and
the rules' firings). One-off cost at warm-up (load and check both rule files, read
the {len(doc_ids)} documents into the rules' table, evaluate query-independent conditions over the
whole corpus): {payload['rules_warm_up_s']:.2f} s.

Command: `.venv/bin/python bench/rules_overhead.py --queries {args.queries} --repeats {args.repeats}`
"""
    write_results("rules_overhead", payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
