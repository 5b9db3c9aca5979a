"""A larger corpus from SciFact's text, for the scale benchmarks (index build memory, rule-stage start-up).

The 5,183 SciFact abstracts keep their ids (so SciFact's qrels and queries still apply), and N - 5,183 synthetic
documents are made of 4-12 sentences drawn from the abstracts' sentences, each with a SciFact title. Every document
gets the metadata the rule and signal stages read: ``acl`` (60 % public, else 1-3 of 20 teams), ``jurisdiction``,
``date`` (1995-2025), ``source`` and ``status`` (10 % draft or withdrawn). Seeded: the same N gives the same file.

    .venv/bin/python bench/scale_corpus.py 250000 build/bench/scale-250000

writes ``corpus.jsonl`` there, with SciFact's ``queries*.jsonl`` and ``qrels/`` copied beside it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SCIFACT  # noqa: E402

GROUPS = [f"team-{i}" for i in range(20)]
JURISDICTIONS: list[str | list[str]] = ["US", "UK", "EU", "global", ["US", "UK"]]
SOURCES = ["nice", "nhs", "fda", "ema", "ada", "who", "uspstf", "cochrane", "kdigo", "journal", "blog", "preprint"]
STATUSES = ["current"] * 18 + ["draft", "withdrawn"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("documents", type=int, help="how many documents in all (at least SciFact's 5,183)")
    parser.add_argument("out", type=Path, help="directory to write corpus.jsonl (and SciFact's queries, qrels) into")
    args = parser.parse_args()
    rng = random.Random(42)
    originals = [json.loads(line) for line in open(SCIFACT / "corpus.jsonl", encoding="utf-8")]
    if args.documents < len(originals):
        sys.exit(f"scale_corpus: at least {len(originals)} documents (SciFact's own), got {args.documents}")
    sentences = [s for d in originals for s in re.split(r"(?<=[.!?])\s+", d["text"]) if len(s) > 20]
    titles = [d["title"] for d in originals]

    def metadata() -> dict:
        acl = ["public"] if rng.random() < 0.6 else rng.sample(GROUPS, rng.randint(1, 3))
        date = f"{rng.randint(1995, 2025):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        return {"acl": acl, "jurisdiction": rng.choice(JURISDICTIONS), "date": date, "source": rng.choice(SOURCES),
                "status": rng.choice(STATUSES)}

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "corpus.jsonl", "w", encoding="utf-8") as out:
        for document in originals:
            out.write(json.dumps({**document, **metadata()}) + "\n")
        for i in range(args.documents - len(originals)):
            text = " ".join(rng.choice(sentences) for _ in range(rng.randint(4, 12)))
            out.write(json.dumps({"_id": f"syn{i}", "title": rng.choice(titles), "text": text, **metadata()}) + "\n")
    for name in ("queries.jsonl", "queries_train.jsonl"):
        if (SCIFACT / name).exists():
            shutil.copy(SCIFACT / name, args.out / name)
    shutil.copytree(SCIFACT / "qrels", args.out / "qrels", dirs_exist_ok=True)
    print(f"wrote {args.documents} documents to {args.out / 'corpus.jsonl'}")


if __name__ == "__main__":
    main()
