"""The parameter reference's notes on index settings and its index components' headings.

A stage's note names as "fixed when the index is built" only the settings of the component it reads that are not
its own params (dedup.near_duplicate's `model` and `fields`, recall.dense's `model`, are the stage's own); the
minhash component, which dedup.near_duplicate reads under `method: minhash` only when it was built with the stage's
own fields, shingle_size, num_perm and seed, is named with that condition, and the condition is checked against a
real index; every component has a one-line, plain summary.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.workbench.reference import component_section, render_reference, stage_section


def _every_stage() -> list[str]:
    from engine.registry import stage_versions

    return [f"{name}@{version}" for name, versions in stage_versions().items() for version in versions]


def _every_component() -> list[str]:
    from engine.registry import known_components

    return known_components()


def _fixed_names(note: str) -> set[str]:
    """The settings a note lists as fixed when the index is built: the words before 'fixed when' (up to the ': '
    or 'whose ' that opens the list)."""
    head = note.split("fixed when the index is built")[0]
    head = head.split("whose ")[-1] if "whose " in head else head.split(": settings of")[0]
    return set(re.findall(r"[a-z_]+", head)) - {"and", "are", "settings", "of", "the", "index", "s"}


@pytest.mark.parametrize("stage", _every_stage())
def test_no_note_calls_a_stage_param_a_fixed_index_setting(stage: str):
    from engine.registry import resolve_stage

    own = set(resolve_stage(stage).Params.model_fields)
    for note in stage_section(stage).notes:
        if "fixed when the index is built" in note:
            assert not _fixed_names(note) & own, (stage, note)


def test_dedup_names_the_dense_settings_it_cannot_change_and_its_own_apart():
    embedding, minhash = stage_section("dedup.near_duplicate").notes
    assert embedding.startswith("with method: embedding the stage reads the index's dense component, whose pooling, ")
    assert _fixed_names(embedding) == {"pooling", "query_instruction", "max_length", "query_max_length", "batch_size",
                                       "device", "precision", "hnsw_above", "hnsw_m", "hnsw_ef_construction",
                                       "hnsw_ef_search"}
    assert embedding.endswith("; model and fields, settings of that component too, are this stage's own (below)")
    assert minhash == (
        "with method: minhash the stage reads the signatures of the index's minhash component (sieve index --with "
        "minhash, see 'index component minhash') only when that was built with the same fields, shingle_size, "
        "num_perm and seed as this stage's own (below); otherwise it computes the signatures per query (and warns at "
        "warm-up when the index's were built with other settings)")
    text = render_reference(stage="dedup.near_duplicate")
    assert "note: model, pooling" not in text and "fields, device" not in text


def test_recall_dense_and_entity_consistency_keep_their_own_params_out_of_the_fixed_list():
    (dense,) = stage_section("recall.dense").notes
    assert dense.startswith("pooling, query_instruction, max_length, query_max_length, batch_size, fields, hnsw_above")
    assert dense.endswith("; model, device and precision, settings of that component too, are this stage's own (below)")
    (entities,) = stage_section("boost.entity_consistency").notes
    assert entities.startswith("model, ner, fields, batch_size, max_chars: settings of the index's entities component")
    assert entities.endswith("; gazetteer, a setting of that component too, is this stage's own (below)")


def test_the_minhash_component_names_its_reader_and_the_settings_that_must_match():
    section = component_section("minhash")
    assert section.notes == (
        "read by dedup.near_duplicate (method: minhash)",
        "dedup.near_duplicate uses these signatures only when its own fields, shingle_size, num_perm and seed are the "
        "ones the index was built with; otherwise it computes them per query (and warns at warm-up)")
    assert component_section("dense").notes == (
        "read by dedup.near_duplicate (method: embedding, its component parameter) and recall.dense (its component "
        "parameter)",)


def test_the_chosen_component_table_matches_the_stage():
    """The one link the params cannot declare, checked against stages/dedup.py: the method value, the component's
    name, and that every minhash setting is a param of the stage (the ones that must match)."""
    from typing import get_args

    from engine.workbench.reference import CHOSEN_COMPONENTS
    from stages.dedup import MINHASH_COMPONENT, DedupParams, MinHashIndexSettings

    chosen = CHOSEN_COMPONENTS["dedup.near_duplicate"]
    assert chosen.component == MINHASH_COMPONENT
    assert chosen.value in get_args(DedupParams.model_fields[chosen.parameter].annotation)
    assert set(MinHashIndexSettings.model_fields) <= set(DedupParams.model_fields)


@pytest.fixture(scope="module")
def minhash_index(tmp_path_factory: pytest.TempPathFactory, mini_corpus: Path) -> Path:
    from engine.index import build_index

    out = tmp_path_factory.mktemp("reference-notes") / "minhash"
    build_index(mini_corpus, out, {"bm25": {}, "minhash": {}})
    return out


@pytest.mark.parametrize("changed", [None, "fields: [text]", "shingle_size: 4", "num_perm: 64", "seed: 2"])
def test_the_minhash_note_is_what_the_stage_does(minhash_index: Path, write_config, changed: str | None):
    """Each setting the note names decides whether the index's signatures are used: the same four, no warning;
    any one of them changed, the warm-up warning the note promises."""
    from engine.pipeline import Pipeline

    params = "method: minhash, threshold: 0.8" + (f", {changed}" if changed else "")
    config = write_config(f"""\
version: 1
index: {minhash_index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: dedup, type: dedup.near_duplicate, inputs: [bm25], params: {{{params}}}}}
output: dedup
trace: {{log: null}}
""")
    pipeline = Pipeline.from_file(config)
    pipeline.warm_up()
    warned = [w for w in pipeline.warnings if "minhash component" in w and "signatures are not used" in w]
    assert bool(warned) == (changed is not None), pipeline.warnings


@pytest.mark.parametrize("component", _every_component())
def test_every_component_has_a_one_line_plain_summary(component: str):
    summary = component_section(component).summary
    assert summary, f"index component {component} has no summary"
    assert "``" not in summary and "`" not in summary, summary
    assert summary.endswith("."), f"cut mid-sentence? {summary!r}"
    heading = render_reference(component=component).splitlines()[0]
    assert heading == f"index component {component}: {summary}"


def test_the_minhash_heading():
    assert render_reference(component="minhash").splitlines()[0] == (
        "index component minhash: Every document's MinHash signature, signed once when the index is built, for "
        "dedup.near_duplicate.")
