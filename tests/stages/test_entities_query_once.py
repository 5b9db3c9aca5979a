"""A query's entities are extracted once per text: a stage's ``when``, the override rules and
boost.entity_consistency all read them through the index's extractor, whose query cache holds them.
Real spaCy on the medical example corpus; the extractions are counted, not replaced."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from engine.cache import LRUCache
from engine.index import Index, build_index
from engine.pipeline import Pipeline
from stages.entities import EntityExtractor, query_entity_source

ROOT = Path(__file__).resolve().parents[2]
CORPUS = [json.loads(line) for line in (ROOT / "examples" / "medical" / "corpus.jsonl").read_text().splitlines()]

RULES = """\
version: 1
kind: override
rules:
  - id: asked-drug
    action: boost
    factor: 3
    match: {field: doc.drugs, op: contains_any, value_from: query.entities.DRUG}
"""

# rewrite -> bm25 -> short (routed on the query's drugs) -> two entity boosts (the rewritten query's entities,
# the original's) -> override rules on the query's drugs -> final
STAGES = """\
  - {id: rewrite, type: rewrite.coreference}
  - {id: bm25, type: recall.bm25, inputs: [rewrite], params: {top_k: 50}}
  - id: short
    type: select.top_k
    inputs: [bm25]
    params: {k: 30}
    when: {field: query.entities.DRUG, op: contains, value: metformin}
  - {id: ent, type: boost.entity_consistency, inputs: [short], params: {combine: add}}
  - {id: asked, type: boost.entity_consistency, inputs: [ent], params: {query: original}}
  - {id: rules, type: rules.override, inputs: [asked], params: {rules: rules.yaml}}
  - {id: final, type: select.top_k, inputs: [rules], params: {k: 10}}
"""


@pytest.fixture(scope="module")
def medical_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("indexes") / "medical"
    build_index(ROOT / "examples" / "medical", out,
                {"bm25": {}, "entities": {"gazetteer": str(ROOT / "configs" / "medical" / "entities.yaml")}})
    return out


@pytest.fixture
def extractions(medical_index: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, tuple[str, ...]]]:
    """Every spaCy read of texts by any extractor, as (extractor id, texts), the index's extractor starting
    with an empty query cache (it is process-wide: other tests read these texts too)."""
    extractor = query_entity_source(Index.open(medical_index), "test")
    monkeypatch.setattr(extractor, "_query_cache", LRUCache(1024, per_asker=True))
    seen: list[tuple[int, tuple[str, ...]]] = []
    real = EntityExtractor._extract

    def counted(self: EntityExtractor, texts, batch_size):
        seen.append((id(self), tuple(texts)))
        return real(self, texts, batch_size)

    monkeypatch.setattr(EntityExtractor, "_extract", counted)
    return seen


def stage(result, stage_id: str) -> dict:
    return next(s for s in result.trace["stages"] if s["id"] == stage_id)


def boosted(result, drug: str) -> set[str]:
    """The documents rule 'asked-drug' boosted, each checked to list ``drug``."""
    doc_ids = {f["doc_id"] for f in stage(result, "rules")["details"].get("firings", []) if f["rule"] == "asked-drug"}
    assert doc_ids <= {d["_id"] for d in CORPUS if drug in d.get("drugs", [])}
    return doc_ids


def test_each_query_text_is_read_once_by_the_when_the_rules_and_the_boosts(medical_index, extractions, tmp_path):
    (tmp_path / "rules.yaml").write_text(RULES, encoding="utf-8")
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"version: 1\nindex: {medical_index}\nstages:\n{STAGES}output: final\ntrace: {{log: null}}\n",
                      encoding="utf-8")
    pipeline = Pipeline.from_file(config)
    pipeline.warm_up()

    asked = "Is it safe in kidney disease?"
    result = pipeline.search(asked, history=["Tell me about Glucophage"], log=False)
    rewritten = result.trace["query"]["rewritten"]
    assert rewritten == "Is Glucophage safe in kidney disease?"
    # every consumer got the entities: the route held, the boosts saw them, the rule fired on them
    assert stage(result, "short")["status"] == "ok" and stage(result, "short")["when"]["holds"] is True
    assert stage(result, "ent")["details"]["query"] == [{"label": "DRUG", "key": "metformin", "text": "Glucophage"}]
    assert stage(result, "asked")["details"]["query_entities"] == 0  # the original names no drug
    assert boosted(result, "metformin")
    # ... from one spaCy read of each text, by one extractor
    assert len({who for who, _ in extractions}) == 1
    assert sorted(texts for _, texts in extractions) == sorted([(asked,), (rewritten,)])

    # another query gets its own entities (one read), not the first one's
    extractions.clear()
    other = pipeline.search("Is insulin safe in kidney disease?", log=False)
    assert [texts for _, texts in extractions] == [("Is insulin safe in kidney disease?",)]
    assert stage(other, "short")["status"] == "bypassed"
    assert [m["key"] for m in stage(other, "ent")["details"]["query"]] == ["insulin"]
    assert boosted(other, "insulin") and boosted(other, "insulin") != boosted(result, "metformin")

    # the first query again: read from the cache, the same trace as before
    extractions.clear()
    again = pipeline.search(asked, history=["Tell me about Glucophage"], log=False)
    assert extractions == []
    for stage_id in ("short", "ent", "asked", "rules", "final"):
        first, second = stage(result, stage_id), stage(again, stage_id)
        assert {k: first.get(k) for k in ("when", "details", "output")} == \
               {k: second.get(k) for k in ("when", "details", "output")}


def test_stages_reading_one_text_at_once_extract_it_once(medical_index, extractions, monkeypatch):
    """Parallel branches of a pipeline (or concurrent queries) asking for the same text while it is being read
    wait for that read instead of reading it again."""
    extractor = query_entity_source(Index.open(medical_index), "test")
    counted = EntityExtractor._extract  # the fixture's counting one

    def slow(self: EntityExtractor, texts, batch_size):  # hold the lock long enough for the others to queue on it
        time.sleep(0.05)
        return counted(self, texts, batch_size)

    monkeypatch.setattr(EntityExtractor, "_extract", slow)
    start = threading.Barrier(8)
    found: list[tuple] = []

    def ask() -> None:
        start.wait()
        found.append(extractor.extract_query("Glucophage and kidney function"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(extractions) == 1
    assert len(found) == 8 and len(set(found)) == 1 and [m.key for m in found[0]] == ["metformin"]


def test_another_user_asking_the_same_text_gets_a_read_of_their_own(medical_index, extractions, tmp_path):
    """From an isolation audit: the extractor is process-wide and its query cache served every user, so a search's
    latency (5 ms against 1.5 ms) told a user whether anyone else, on any pipeline, had asked that very text. Each
    asker has their own entries; the same user asking again still hits."""
    from engine.model import UserContext

    config = tmp_path / "pipeline.yaml"
    config.write_text(f"version: 1\nindex: {medical_index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                      "  - {id: ent, type: boost.entity_consistency, inputs: [bm25]}\ntrace: {log: null}\n",
                      encoding="utf-8")
    pipeline = Pipeline.from_file(config)
    pipeline.warm_up()
    asked = "Is metformin safe in kidney disease?"
    for user, reads in ((UserContext(user_id="banker"), 1), (UserContext(user_id="banker"), 0),
                        (UserContext(user_id="eve"), 1), (UserContext(), 1), (UserContext(), 0)):
        extractions.clear()
        pipeline.search(asked, user=user, log=False)
        assert [texts for _, texts in extractions] == [(asked,)] * reads, user

