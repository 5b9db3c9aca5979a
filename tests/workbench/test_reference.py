"""The parameter reference (engine.workbench.reference): every tunable setting, documented, from the registry."""

from __future__ import annotations

import pytest

from engine.errors import SieveError
from engine.workbench.reference import (
    ParamRow,
    component_section,
    parameter_rows,
    pipeline_section,
    reference_sections,
    render_reference,
    stage_section,
)


def _rows_by_name(rows: tuple[ParamRow, ...] | list[ParamRow]) -> dict[str, ParamRow]:
    return {row.name: row for row in rows}


def _every_stage() -> list[str]:
    from engine.registry import stage_versions

    return [f"{name}@{version}" for name, versions in stage_versions().items() for version in versions]


def _every_component() -> list[str]:
    from engine.registry import known_components

    return known_components()


@pytest.mark.parametrize("stage", _every_stage())
def test_every_stage_parameter_has_a_description(stage: str):
    """A new parameter without a description fails here: the reference (and the JSON Schema) would show it bare."""
    rows = stage_section(stage).rows
    assert rows, f"{stage} lists no parameters"
    bare = [row.name for row in rows if not row.description.strip()]
    assert not bare, f"{stage}: parameters without a description: {', '.join(bare)}"


@pytest.mark.parametrize("component", _every_component())
def test_every_index_setting_has_a_description(component: str):
    bare = [row.name for row in component_section(component).rows if not row.description.strip()]
    assert not bare, f"index component {component}: settings without a description: {', '.join(bare)}"


def test_every_pipeline_setting_has_a_description():
    bare = [row.name for row in pipeline_section().rows if not row.description.strip()]
    assert not bare, f"pipeline settings without a description: {', '.join(bare)}"


def test_the_cross_encoder_listing():
    section = stage_section("rerank.cross_encoder")
    assert section.title == "rerank.cross_encoder@1"
    rows = _rows_by_name(section.rows)
    window = rows["window"]
    assert (window.type, window.default, window.allowed) == ("integer", "100", "1 to 10000")
    assert "rerank the top N candidates" in window.description
    assert (rows["cascade"].type, rows["cascade"].default) == ("mapping or null", "null")
    assert (rows["cascade.full_top"].default, rows["cascade.full_top"].allowed) == ("required", "1 to 10000")
    assert rows["precision"].allowed == "auto | fp32 | bf16 | fp16"
    assert rows["fields"].default == "[title, text]"
    assert rows["oom_backoff"].type == "true/false"
    text = render_reference(stage="rerank.cross_encoder")
    assert text.startswith("rerank.cross_encoder@1: ")
    assert "  window " in text and "integer; default 100; allowed 1 to 10000" in text
    assert "\n      rerank the top N candidates" in text  # the description under its parameter
    assert "  cascade.light_batch_size " in text


def test_nested_settings_are_dotted_and_every_field_is_listed():
    from stages.rewrite.coreference import CoreferenceParams
    from stages.rewrite.discourse import SalienceWeights

    rows = _rows_by_name(parameter_rows(CoreferenceParams))
    assert {f"salience.{name}" for name in SalienceWeights.model_fields} <= set(rows)
    assert rows["salience"].default == "(see below)"
    decay = rows["salience.recency_decay"]
    assert (decay.default, decay.allowed) == ("0.4", "above 0, at most 1")
    assert rows["heuristics.acronyms"].default == "true"


def test_index_components_and_where_their_settings_go():
    section = component_section("bm25")
    assert "sieve index --with bm25 --settings FILE" in section.where
    rows = _rows_by_name(section.rows)
    assert (rows["k1"].type, rows["k1"].default, rows["k1"].allowed) == ("number", "1.5", "0 to 1000")
    assert (rows["b"].default, rows["b"].allowed) == ("0.75", "0 to 1")
    assert rows["method"].allowed == "lucene | robertson | atire | bm25l | bm25+"
    assert rows["tokenizer.language"].allowed == "en | zh"
    assert _rows_by_name(component_section("dense").rows)["model"].default == "sentence-transformers/all-MiniLM-L6-v2"


def test_a_recall_stage_says_which_settings_belong_to_its_index():
    """k1 in a recall.bm25 stage is an error: the stage's listing says where k1 is set and how to compare values."""
    (note,) = stage_section("recall.bm25").notes
    assert note.startswith("tokenizer, method, k1, b, fields: settings of the index's bm25 component")
    assert "sieve index --settings FILE" in note and "sieve sweep CONFIG --set 'index=[dirA, dirB]'" in note
    assert stage_section("recall.dense").notes and not stage_section("fuse.rrf").notes
    assert "note: tokenizer, method, k1, b, fields" in render_reference(stage="recall.bm25")


def test_everything_at_once():
    sections = reference_sections()
    titles = [s.title for s in sections]
    assert titles[0] == "pipeline settings"
    assert set(_every_stage()) <= set(titles)
    assert {f"index component {c}" for c in _every_component()} <= set(titles)
    assert "limits.max_query_chars" in _rows_by_name(sections[0].rows)
    text = render_reference()
    assert all(title in text for title in titles)
    assert sum(len(s.rows) for s in sections) > 120


def test_a_pinned_version_and_unknown_names():
    assert stage_section("recall.bm25@1").title == "recall.bm25@1"
    with pytest.raises(SieveError, match=r"unknown stage type 'rerank.cross_encodr' \(did you mean 'rerank.cross_enc"):
        render_reference(stage="rerank.cross_encodr")
    with pytest.raises(SieveError, match=r"unknown index component 'dnse' \(did you mean 'dense'\?\); known compon"):
        render_reference(component="dnse")
    assert [s.title for s in reference_sections(stage="select.top_k", component="bm25")] == [
        "select.top_k@1", "index component bm25"]


def test_sieve_schema_prints_the_reference_for_one_stage_or_component(cli):
    stage = cli("schema", "--stage", "rerank.cross_encoder")
    assert stage.exit_code == 0 and "window" in stage.stdout and "default 100" in stage.stdout
    assert "recall.bm25" not in stage.stdout
    component = cli("schema", "--component", "bm25")
    assert component.exit_code == 0 and "k1" in component.stdout
    everything = cli("schema", "--human")
    assert everything.exit_code == 0 and "rerank.cross_encoder" in everything.stdout and "recall.bm25" in everything.stdout
    assert cli("schema").stdout.lstrip().startswith("{")  # the JSON Schema stays the default
