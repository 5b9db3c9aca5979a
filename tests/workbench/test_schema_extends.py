"""sieve schema accepts a config that extends a base (only what it changes) and still checks a complete one in full.

Every config here is a real file that the compiler is given too: what the schema accepts, ``compile_file`` compiles
(merged onto its base), and what it rejects in an extending file the compiler rejects as well. Validated with the
``jsonschema`` package (Draft 2020-12), as an editor's YAML language server would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from engine.compiler import compile_file
from engine.errors import ConfigError
from tests.workbench.conftest import ROOT
from tests.workbench.test_report_config_provenance import chain

jsonschema = pytest.importorskip("jsonschema")

SHIPPED = sorted(
    path for path in (ROOT / "configs").rglob("*.yaml")
    if isinstance(data := yaml.safe_load(path.read_text(encoding="utf-8")), dict) and "stages" in data
)

# bm25 -> floor -> final (the report tests' chain), a `when` on floor; the index relative to the directory (a base
# lies beside the configs extending it)
ROUTE = "\n    when: {field: query.text, op: contains, value: vitamin}"

# what a config that extends the base may give: only what it changes
EXTENDING = {
    "a stage's param": "extends: base.yaml\nstages:\n  - {id: final, params: {k: 3}}\n",
    "a stage switched off": "extends: base.yaml\nstages:\n  - {id: floor, enabled: false}\n",
    "nothing but the base": "extends: base.yaml\n",
    "a name and a partial section": "extends: base.yaml\nname: child\ntrace: {explain: true}\n",
    "a when replaced, and one added": (
        "extends: base.yaml\nstages:\n  - {id: floor, when: {expr: 'true'}}\n"
        "  - {id: bm25, when: {field: user.roles, op: contains, value: research}}\n"),
    "a base's when removed": "extends: base.yaml\nstages:\n  - {id: floor, when: null}\n",
    "a new stage appended": (
        "extends: base.yaml\noutput: top3\nstages:\n"
        "  - {id: top3, type: select.top_k, inputs: [final], params: {k: 3}}\n"),
    "the type repeated, with a partial params": (
        "extends: base.yaml\nversion: 1\nstages:\n  - {id: floor, type: select.threshold, params: {normalize: none}}\n"),
    "a required param left in the base": "extends: base.yaml\nstages:\n  - {id: floor, inputs: [bm25], on_error: fail}\n",
}

# what the schema and the compiler both reject in an extending config
BROKEN_EXTENDING = {
    "an entry without an id": "extends: base.yaml\nstages:\n  - {params: {k: 3}}\n",
    "a misspelt param of a named type": "extends: base.yaml\nstages:\n  - {id: final, type: select.top_k, params: {kk: 3}}\n",
    "an unknown key in an entry": "extends: base.yaml\nstages:\n  - {id: final, colour: red}\n",
    "an unregistered type": "extends: base.yaml\nstages:\n  - {id: more, type: recall.nonexistent, inputs: [final]}\n",
    "an unknown top-level key": "extends: base.yaml\nstagez: []\n",
    "a switch that is not a switch": "extends: base.yaml\nstages:\n  - {id: floor, enabled: 'no'}\n",
    "extends naming nothing": "extends: ''\nstages:\n  - {id: final, params: {k: 3}}\n",
}


@pytest.fixture(scope="module")
def validator():
    from engine.workbench.schema import pipeline_json_schema

    schema = pipeline_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture
def base(bm25_index: Path, tmp_path: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(chain(os.path.relpath(bm25_index, tmp_path), floor=ROUTE, name="base"), encoding="utf-8")
    return path


def errors(validator, path: Path) -> list[str]:
    return [error.message for error in validator.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8")))]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_still_validates(validator, path: Path):
    assert not errors(validator, path)


def test_the_base_validates_as_a_complete_config(validator, base: Path):
    assert not errors(validator, base)
    compile_file(base)


@pytest.mark.parametrize("text", EXTENDING.values(), ids=list(EXTENDING))
def test_an_extending_config_validates(validator, base: Path, write_config, text: str):
    child = write_config(text, "child.yaml")
    compile_file(child)  # the compiler takes it, merged onto the base
    assert not errors(validator, child)


@pytest.mark.parametrize("text", BROKEN_EXTENDING.values(), ids=list(BROKEN_EXTENDING))
def test_a_broken_extending_config_is_rejected(validator, base: Path, write_config, text: str):
    child = write_config(text, "child.yaml")
    with pytest.raises(ConfigError):
        compile_file(child)
    assert errors(validator, child)


@pytest.mark.parametrize("change", [
    ("version: 1\n", ""),  # no version
    ("  - id: bm25\n    type: recall.bm25\n", "  - id: bm25\n"),  # a stage without its type
    ("params: {k: 10}", "params: {kk: 10}"),  # a misspelt param
    ("params: {min_score: 0.2, normalize: max}", "params: {normalize: max}"),  # a required param missing
    ("    when: {field: query.text, op: contains, value: vitamin}\n", "    colour: red\n"),  # an unknown key
    ("    when: {field: query.text, op: contains, value: vitamin}\n", "    when: null\n"),  # a when left empty
])
def test_a_broken_complete_config_is_still_rejected(validator, base: Path, write_config, change: tuple[str, str]):
    """Without extends nothing is loosened: what was required is still required, each type's params in full."""
    old, new = change
    text = base.read_text(encoding="utf-8")
    assert old in text
    broken = write_config(text.replace(old, new, 1), "broken.yaml")
    with pytest.raises(ConfigError):
        compile_file(broken)
    assert errors(validator, broken)


def test_a_complete_config_needs_its_stages(validator, write_config):
    assert errors(validator, write_config("version: 1\nname: nothing\n", "empty.yaml"))
    assert errors(validator, write_config("version: 1\nstages: []\n", "none.yaml"))


def test_partial_stage_entries_are_accepted_only_with_extends(validator, base: Path, write_config):
    """The same partial entry that an extending file may give is an error in a complete one."""
    child = write_config(EXTENDING["a stage's param"], "child.yaml")
    assert not errors(validator, child)
    alone = write_config(EXTENDING["a stage's param"].replace("extends: base.yaml", "version: 1"), "alone.yaml")
    with pytest.raises(ConfigError):
        compile_file(alone)
    assert errors(validator, alone)
