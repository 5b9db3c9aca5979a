"""sieve schema: a JSON Schema that accepts every shipped config and rejects what the compiler rejects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.workbench.conftest import ROOT

jsonschema = pytest.importorskip("jsonschema")

SHIPPED = sorted(
    path for path in (ROOT / "configs").rglob("*.yaml")
    if isinstance(data := yaml.safe_load(path.read_text(encoding="utf-8")), dict) and "stages" in data
)


@pytest.fixture(scope="module")
def validator():
    from engine.workbench.schema import pipeline_json_schema

    schema = pipeline_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_registered_stage_type_is_a_branch(validator):
    from engine.registry import known_stage_types

    # a complete config's entries (the schema's `else`: without `extends`, see test_schema_extends.py)
    union = validator.schema["else"]["properties"]["stages"]["items"]
    branches = union["oneOf"]
    spellings = set()
    for branch in branches:
        definition = validator.schema["$defs"][branch["$ref"].split("/")[-1]]
        spellings.update(definition["properties"]["type"]["enum"])
        assert definition["additionalProperties"] is False
    assert set(known_stage_types()) <= spellings
    assert "recall.bm25@1" in spellings
    assert union["discriminator"]["propertyName"] == "type"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_validate(validator, path: Path):
    errors = list(validator.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8"))))
    assert not errors, [e.message for e in errors]


def test_shipped_configs_exist():
    assert len(SHIPPED) >= 8


@pytest.mark.parametrize(
    "stage",
    [
        {"id": "b", "type": "recall.bm25", "params": {"topk": 5}},  # misspelt parameter
        {"id": "b", "type": "recall.bm25", "params": {"top_k": 0}},  # below the minimum
        {"id": "b", "type": "recall.nonexistent"},  # unregistered type
        {"id": "b", "type": "recall.bm25", "color": "red"},  # unknown envelope key
        {"id": "b", "type": "fuse.weighted", "params": {"weights": {"bm25": "heavy"}}},  # wrong value type
    ],
)
def test_invalid_stages_are_rejected(validator, stage: dict):
    assert list(validator.iter_errors({"version": 1, "stages": [stage]}))


def test_schema_command_writes_a_file(cli, tmp_path: Path):
    out = tmp_path / "sieve.schema.json"
    result = cli("schema", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["$schema"].endswith("2020-12/schema")
    printed = cli("schema")
    assert json.loads(printed.stdout)["title"] == "Sieve pipeline"


def test_every_top_level_setting_is_in_the_schema(validator):
    """The schema listed its top-level sections by hand and missed `server:` when it was added: an editor then
    rejected a config that `sieve validate` accepts."""
    from engine.config import PipelineConfig

    # every PipelineConfig section, and `extends` (resolved before validation, so not a PipelineConfig field)
    assert set(validator.schema["properties"]) == set(PipelineConfig.model_fields) | {"extends"}
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    config["server"] = {"request_as_of": True, "include_trace": True, "explain": True}
    assert not list(validator.iter_errors(config))
    config["server"]["typo"] = True
    assert list(validator.iter_errors(config))


def test_schema_out_counts_the_stage_types_it_wrote(tmp_path):
    from engine.workbench.schema import pipeline_json_schema
    from tests.workbench.conftest import run_sieve

    out = tmp_path / "sieve.schema.json"
    result = run_sieve("schema", "--out", out)
    assert result.returncode == 0, result.stderr
    count = len(pipeline_json_schema()["else"]["properties"]["stages"]["items"]["oneOf"])
    assert count > 10 and f"schema with {count} stage types written" in result.stderr
