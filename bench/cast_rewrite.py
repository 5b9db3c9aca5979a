"""Conversational query rewriting on TREC CAsT 2019/2020: exact match and token F1 against the gold rewrite.

For every turn of ``shared/data/cast/rewrites_2019_2020.jsonl`` (the earlier questions of the
conversation as history, as the stage sees them in production) this compares with the manual
gold rewrite:

- the raw question (the baseline of the same run);
- the organisers' automatic neural rewrite (2020 only: the file has no such field for 2019);
- ``rewrite.coreference`` with its default parameters, run through the stage (``Stage.run``).

Normalisation, as for the published figures: lower-case, delete punctuation characters (Unicode
category P*, so "what's" -> "whats"), collapse whitespace. Exact match compares the normalised
strings; token F1 is SQuAD-style (multiset overlap of whitespace tokens). Scores are averaged
over turns, per split: 2019, 2020, and 2020 halved by conversation into a development half (even
positions) and a held-out half (odd positions, never inspected).

    .venv/bin/python bench/cast_rewrite.py [--data ../shared/data/cast/rewrites_2019_2020.jsonl]
                                           [--errors 2019|2020-dev] [--limit N]

Writes ``bench/results/cast_rewrite.json`` and ``bench/results/cast_rewrite.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import unicodedata
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench._common import host, run_record, write_results  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cast" / "rewrites_2019_2020.jsonl"
# Published reference figures (shared/data/README.md): raw question and organisers' rewrite vs gold.
PUBLISHED = {
    ("raw", 2019): {"em": 0.288, "f1": 0.818},
    ("raw", 2020): {"em": 0.139, "f1": 0.734},
    ("organisers", 2020): {"em": 0.213, "f1": 0.775},
}


def normalise(text: str) -> str:
    """Lower-case, delete punctuation (Unicode P*), collapse whitespace."""
    kept = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalise(prediction) == normalise(gold))


def token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalise(prediction).split(), normalise(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def load_turns(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def machine() -> dict[str, Any]:
    import spacy

    return host(spacy=spacy.__version__)


def make_stage() -> Any:
    """The stage with its default parameters (English and Chinese loaded, as in production)."""
    import stages  # noqa: F401  (registers the stage types)
    from engine.registry import resolve_stage
    from engine.stage import Resources

    cls = resolve_stage("rewrite.coreference")
    stage = cls("rewrite", cls.Params())
    began = time.perf_counter()
    stage.warm_up(Resources(None, ROOT))
    return stage, time.perf_counter() - began


def run_stage(stage: Any, turns: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
    """Our rewrite of every turn and the stage's wall time per turn (ms), through ``Stage.run``."""
    from engine.model import Query
    from engine.stage import Resources, StageContext

    resources = Resources(None, ROOT)
    as_of = datetime(2020, 1, 1, tzinfo=timezone.utc)
    outputs, costs = [], []
    for turn in turns:
        query = Query.create(turn["raw"], history=[c["q"] for c in turn["context"]], as_of=as_of)
        began = time.perf_counter()
        result = stage.run(StageContext("rewrite", query, [], None, resources, trace_text=True))
        costs.append((time.perf_counter() - began) * 1000.0)
        outputs.append(result.query.effective_text)
    return outputs, costs


SPLIT_ROLES = {
    "2019": "development (heuristics and weights)",
    "2020": "all of 2020 (half of it was development data)",
    "2020-dev": "development (inspected while building the heuristics)",
    "2020-held-out": "held out (never inspected)",
}


def splits(turns: list[dict[str, Any]], limit: int | None) -> dict[str, list[dict[str, Any]]]:
    """2019; 2020; and 2020 halved by conversation: even positions for development, odd ones held out."""
    by_year = {year: [t for t in turns if t["year"] == year][:limit] for year in (2019, 2020)}
    conversations = sorted({t["conv_id"] for t in by_year[2020]}, key=int)
    development = set(conversations[0::2])
    return {
        "2019": by_year[2019],
        "2020": by_year[2020],
        "2020-dev": [t for t in by_year[2020] if t["conv_id"] in development],
        "2020-held-out": [t for t in by_year[2020] if t["conv_id"] not in development],
    }


def score(predictions: list[str], turns: list[dict[str, Any]]) -> dict[str, float]:
    golds = [t["gold_rewrite"] for t in turns]
    return {
        "em": round(statistics.fmean(exact_match(p, g) for p, g in zip(predictions, golds)), 4),
        "f1": round(statistics.fmean(token_f1(p, g) for p, g in zip(predictions, golds)), 4),
        "turns": len(turns),
    }


def paired(theirs: list[str], ours: list[str], turns: list[dict[str, Any]]) -> dict[str, Any]:
    """Ours minus theirs, turn by turn: mean difference, wins / losses, paired t-test and randomisation p
    (the tests `sieve compare` uses)."""
    from engine.workbench.compare import paired_tests

    result: dict[str, Any] = {}
    for metric, function in (("em", exact_match), ("f1", token_f1)):
        a = [function(p, t["gold_rewrite"]) for p, t in zip(theirs, turns)]
        b = [function(p, t["gold_rewrite"]) for p, t in zip(ours, turns)]
        t_p, rand_p = paired_tests(a, b)
        result[metric] = {"difference": round(statistics.fmean(y - x for x, y in zip(a, b)), 4),
                          "wins": sum(1 for x, y in zip(a, b) if y > x + 1e-9),
                          "losses": sum(1 for x, y in zip(a, b) if x > y + 1e-9),
                          "t_test_p": None if t_p is None else round(t_p, 4),
                          "randomisation_p": None if rand_p is None else round(rand_p, 4)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--errors", choices=("2019", "2020-dev"),
                        help="print our misses on a development split (never on the held-out half)")
    parser.add_argument("--limit", type=int, help="only the first N turns of each year (quick checks)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write bench/results")
    args = parser.parse_args()

    info = machine()
    line = (f"{info['cpu']}, {info['cpu_cores_usable']} usable cores, Python {info['python']}, spaCy {info['spacy']}; "
            f"load average at start {info.get('load_average_at_start')}")
    print(f"Machine: {line}")
    turns = load_turns(args.data)
    stage, warm_s = make_stage()
    identity = stage.identity()
    rows: list[dict[str, Any]] = []
    per_split: dict[str, Any] = {}
    outputs: dict[str, str] = {}
    for year in (2019, 2020):
        subset = [t for t in turns if t["year"] == year][: args.limit]
        ours, costs = run_stage(stage, subset)
        outputs.update({t["turn_id"]: o for t, o in zip(subset, ours)})
        per_split[str(year)] = {"cost_ms_per_query": {"mean": round(statistics.fmean(costs), 3),
                                                      "p50": round(statistics.median(costs), 3),
                                                      "p95": round(sorted(costs)[int(0.95 * (len(costs) - 1))], 3)}}
    for name, subset in splits(turns, args.limit).items():
        ours = [outputs[t["turn_id"]] for t in subset]
        systems = {"raw question": [t["raw"] for t in subset]}
        if all("organizer_auto_rewrite" in t for t in subset):
            systems["organisers' neural rewrite"] = [t["organizer_auto_rewrite"] for t in subset]
        systems["rewrite.coreference (ours)"] = ours
        changed = sum(1 for t, o in zip(subset, ours) if o != t["raw"])
        results = {system: score(predictions, subset) for system, predictions in systems.items()}
        entry = per_split.setdefault(name, {})
        entry.update({"systems": results, "rewritten_turns": changed, "role": SPLIT_ROLES[name],
                      "conversations": sorted({t["conv_id"] for t in subset}, key=int)})
        if "organisers' neural rewrite" in systems:
            entry["ours_vs_organisers"] = paired(systems["organisers' neural rewrite"], ours, subset)
        year = int(name[:4])
        for system, result in results.items():
            key = ("raw" if system.startswith("raw") else "organisers" if system.startswith("organisers") else "ours", year)
            rows.append({"split": name, "system": system, **result,
                         "published": PUBLISHED.get(key) if name in ("2019", "2020") else None})
            print(f"{name:16s} {system:28s} EM {result['em']:.3f}  F1 {result['f1']:.3f}  ({result['turns']} turns)")
        if args.errors == name:
            for turn, output in zip(subset, ours):
                if normalise(output) != normalise(turn["gold_rewrite"]):
                    print(f"  {turn['turn_id']:6s} raw : {turn['raw']}\n         ours: {output}\n"
                          f"         gold: {turn['gold_rewrite']}")
    for year in ("2019", "2020"):
        print(f"{year} stage cost per query: {per_split[year]['cost_ms_per_query']} ms")
    if args.no_write or args.limit:
        return
    payload = {
        **run_record("cast_rewrite"),
        "machine": info,
        "data": str(args.data.name),
        "normalisation": "lower-case; delete Unicode punctuation (category P*); collapse whitespace",
        "stage": {"type": "rewrite.coreference@1", "params": stage.params.model_dump(mode="json"), "identity": identity,
                  "warm_up_s": round(warm_s, 3)},
        "tuning": "developed on 2019 and on the 2020 conversations of even position (81, 83, ..., 105); the 2020 "
                  "conversations of odd position (82, 84, ..., 104) were never inspected: the held-out half",
        "splits": per_split,
        "rows": rows,
    }
    json_path, md_path = write_results("cast_rewrite", payload, markdown(payload, line))
    print(f"wrote {json_path} and {md_path}")


def markdown(payload: dict[str, Any], machine_line: str) -> str:
    splits_ = payload["splits"]
    held = splits_["2020-held-out"]
    ours_held = held["systems"]["rewrite.coreference (ours)"]
    organisers_held = held["systems"]["organisers' neural rewrite"]
    vs_held = held["ours_vs_organisers"]
    lines = [
        "# Conversational query rewriting on TREC CAsT 2019/2020 (exact match and token F1 vs the gold rewrite)",
        "",
        f"Machine: {machine_line}.",
        "",
        f"Data: `shared/data/cast/{payload['data']}` — 479 turns of CAsT 2019, 216 of CAsT 2020; history = the "
        "earlier questions of the conversation as asked (no system answers). Normalisation: "
        f"{payload['normalisation']}; EM and SQuAD-style token F1 averaged over turns.",
        "",
        "How the data was used: the heuristics and salience weights were developed on **2019** and on the 2020 "
        "conversations of even position (`2020-dev`: "
        f"{', '.join(splits_['2020-dev']['conversations'])}). The 2020 conversations of odd position "
        f"(`2020-held-out`: {', '.join(held['conversations'])}) were never inspected: no turn of them was read, and "
        "no change was kept or dropped by their score. That half is the honest test of 2020; the whole-2020 rows mix "
        f"it with the development half. Held-out EM / F1: 0.204 / 0.759 when the split was made (commit c2ae15a), "
        f"{ours_held['em']:.3f} / {ours_held['f1']:.3f} now. (Developed on 2019 alone, the stage had 2020 EM 0.190.) "
        "No data-set-specific word lists: every rule is English grammar (see `stages/rewrite/english.py`).",
        "",
        "| split | system | EM | F1 | published EM / F1 |",
        "|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        published = row["published"]
        reference = f"{published['em']:.3f} / {published['f1']:.3f}" if published else "—"
        lines.append(f"| {row['split']} | {row['system']} | **{row['em']:.3f}** | {row['f1']:.3f} | {reference} |")
    lines += ["", "Ours vs the organisers' neural rewrite, paired turn by turn (difference of means, turns where ours "
              "scores higher / lower, two-sided p of a paired t-test and of a paired randomisation test, as in "
              "`sieve compare`):", "", "| split | metric | ours - theirs | wins / losses | t-test p | randomisation p |",
              "|---|---|---|---|---|---|"]
    for name, data in splits_.items():
        for metric, row in data.get("ours_vs_organisers", {}).items():
            lines.append(f"| {name} | {metric.upper()} | {row['difference']:+.3f} | {row['wins']} / {row['losses']} | "
                         f"{row['t_test_p']} | {row['randomisation_p']} |")
    lines += ["", "Per-stage cost per query (`rewrite.coreference`, `Stage.run`, trace details included; history "
              "prefixes cached as in a live conversation):", "", "| year | mean ms | p50 ms | p95 ms | turns rewritten |",
              "|---|---|---|---|---|"]
    for year in ("2019", "2020"):
        data = splits_[year]
        cost = data["cost_ms_per_query"]
        lines.append(f"| {year} | {cost['mean']:.2f} | {cost['p50']:.2f} | {cost['p95']:.2f} | "
                     f"{data['rewritten_turns']} of {data['systems']['raw question']['turns']} |")
    identity = payload["stage"]["identity"] or {}
    lines += [
        "",
        "Cost is wall time on 2 shared cores. It is one spaCy parse of the new question per query: the discourse "
        "model after each history prefix is cached, so a live conversation never re-parses earlier turns (a cold "
        "query with n turns of history costs n + 1 parses).",
        "",
        "Reading the figures: exact match rewards reproducing the annotators' wording, and the gold rewrites keep "
        "or drop determiners, possessive forms (\"X's Y\" / \"the Y of X\") and topics inconsistently, so EM "
        "understates correct resolutions. Many 2020 gold rewrites take words from the system's answers, which the "
        "history here does not hold (\"Why doesn't it spoil?\" -> honey). On the held-out half the stage beats the "
        f"organisers' neural rewrite on exact match ({ours_held['em']:.3f} vs {organisers_held['em']:.3f}) and "
        f"trails it on token F1 ({ours_held['f1']:.3f} vs {organisers_held['f1']:.3f}; paired over the "
        f"{ours_held['turns']} turns neither difference is significant, p {vs_held['em']['randomisation_p']} and "
        f"{vs_held['f1']['randomisation_p']} by randomisation, but theirs has the higher F1 on "
        f"{vs_held['f1']['losses']} turns and ours on {vs_held['f1']['wins']}): that rewrite adds the topic "
        "to many questions, which earns F1 whenever the gold mentions the topic too; adding it more often here (as "
        "'of X', as 'in X', or as a compound modifier) lowered EM and F1 on both development splits, so the stage "
        "does not. Predicate ellipsis is handled (\"How about goulash?\" after \"Is chilli a stew?\" -> \"Is goulash "
        "a stew?\"; \"How about replacing it instead?\" takes the previous question's infinitive), and so are split "
        "antecedents of symmetric predicates (\"What do they have in common?\" after the keto diet ... paleo -> "
        "\"paleo and the keto diet\"). Not handled: a topic added as a place or time (\"... in Ann Arbor\": "
        "appending a first turn's place to later questions lowered 2019 EM and F1, since a place in a first turn is "
        "as often a qualifier, \"the drinking age in the US\", as the conversation's setting), the topic as a "
        "compound modifier (\"the Lyme Disease test\"), acronyms nothing in the conversation spells out "
        "(\"GDPR\").",
        "",
        "Our normalisation reproduces the published exact-match baselines exactly; our token F1 for the raw question "
        "differs from the published one by at most 0.004 (2019: 0.822 vs 0.818), presumably a tokenisation detail of "
        "the published scorer that the data's README does not state.",
    ]
    lines += [
        "",
        f"Warm-up (spaCy `{identity.get('model')}` as `{identity.get('package')}` {identity.get('model_version')}, "
        f"jieba): {payload['stage']['warm_up_s']:.1f} s, once per process.",
        "",
        f"Command: `{payload['command']}`",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
