"""A pipeline config that extends a base config (``extends: base.yaml``).

Real pipelines on the SciFact-slice BM25 index: the merged config is the one a hand-written full copy gives (same
sha256, same results), stages merge by id, a stage's type cannot change, a cycle, a base in another directory and a
chain too long are located errors, every error is located in the file that wrote the value, the trace names each
base with its sha256, a replay reproduces the run, and ``--set`` and ``sieve sweep`` vary the merged config.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.compiler import MAX_EXTENDS_DEPTH, compile_file
from engine.errors import ConfigError, SieveError
from engine.pipeline import Pipeline
from engine.replay import replay_trace
from engine.workbench.sweep import parse_setting, sweep

QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine."

# bm25 -> short -> final; the index relative to the config's directory, as a base beside its children names it
BASE = """\
version: 1
name: base
index: {index}
stages:
  - id: bm25
    type: recall.bm25
    params: {{top_k: 50}}
  - id: short
    type: select.top_k
    inputs: [bm25]
    params: {{k: 10}}
  - id: final
    type: select.top_k
    inputs: [short]
    params: {{k: 10}}
output: final
trace: {{log: null, explain: true}}
"""


def relative_index(index: Path, directory: Path) -> str:
    return os.path.relpath(index, directory)


def base_text(index: Path, directory: Path) -> str:
    return BASE.format(index=relative_index(index, directory))


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        compile_file(path)
    return [str(issue) for issue in caught.value.issues if issue.severity == "error"]


def results(pipeline: Pipeline) -> list[tuple[str, float]]:
    return [(r.doc_id, r.score) for r in pipeline.search(QUERY).results]


def test_a_child_compiles_to_the_config_a_full_copy_gives(bm25_index, write_config, tmp_path):
    write_config(base_text(bm25_index, tmp_path), "base.yaml")
    child = write_config("extends: base.yaml\nname: short3\nstages:\n  - {id: short, params: {k: 3}}\n", "child.yaml")
    full = write_config(base_text(bm25_index, tmp_path).replace("name: base", "name: short3")
                        .replace("params: {k: 10}\n  - id: final", "params: {k: 3}\n  - id: final"), "full.yaml")
    merged, written = compile_file(child), compile_file(full)
    assert merged.canonical == written.canonical
    assert merged.config_sha256 == written.config_sha256
    assert "extends" not in merged.canonical
    assert results(Pipeline(merged)) == results(Pipeline(written))
    assert len(results(Pipeline(merged))) == 3


def test_stages_merge_by_id_and_mappings_key_by_key(bm25_index, write_config, tmp_path):
    write_config(base_text(bm25_index, tmp_path), "base.yaml")
    child = write_config("""\
extends: base.yaml
stages:
  - {id: bm25, params: {top_k: 20}}      # only top_k changes
  - {id: top5, type: select.top_k, inputs: [final], params: {k: 5}}
output: top5
trace: {explain: false}                  # log and the rest kept from the base
""", "child.yaml")
    compiled = compile_file(child)
    stages = {s["id"]: s for s in compiled.canonical["stages"]}
    assert [s["id"] for s in compiled.canonical["stages"]] == ["bm25", "short", "final", "top5"]
    assert stages["bm25"]["params"]["top_k"] == 20 and stages["bm25"]["type"].startswith("recall.bm25")
    assert stages["final"]["inputs"] == ["short"] and stages["final"]["params"]["k"] == 10
    assert compiled.output == "top5"
    assert compiled.canonical["trace"]["explain"] is False and compiled.canonical["trace"]["log"] is None
    assert compiled.canonical["name"] == "base"
    # a list is replaced whole; the merged config is checked as a whole, each problem where its value was written:
    # 'short' (in the base) now feeds nothing
    child.write_text("extends: base.yaml\nstages:\n  - {id: final, inputs: [bm25]}\n")
    assert errors_of(child) == [f"{tmp_path / 'base.yaml'}:8:9  stages.1.id: stage 'short' does not feed the "
                                "output 'final' (unreachable)"]


def test_null_in_the_child_sets_null(bm25_index, write_config, tmp_path):
    write_config(base_text(bm25_index, tmp_path).replace("log: null", f"log: {tmp_path / 'traces.jsonl'}"),
                 "base.yaml")
    child = write_config("extends: base.yaml\nname: null\ntrace: {log: null}\n", "child.yaml")
    compiled = compile_file(child)
    assert compiled.canonical["name"] is None and compiled.canonical["trace"]["log"] is None


def test_a_chain_of_bases_merges_in_order(bm25_index, write_config, tmp_path):
    write_config(base_text(bm25_index, tmp_path), "base.yaml")
    write_config("extends: base.yaml\nstages:\n  - {id: short, params: {k: 4}}\n  - {id: final, params: {k: 2}}\n",
                 "middle.yaml")
    child = write_config("extends: middle.yaml\nstages:\n  - {id: short, params: {k: 6}}\n", "child.yaml")
    compiled = compile_file(child)
    k = {s["id"]: s["params"]["k"] for s in compiled.canonical["stages"] if s["id"] != "bm25"}
    assert k == {"short": 6, "final": 2}
    assert [Path(b["file"]).name for b in compiled.extends] == ["middle.yaml", "base.yaml"]


def test_a_stage_type_cannot_change(bm25_index, write_config, tmp_path):
    write_config(base_text(bm25_index, tmp_path), "base.yaml")
    child = write_config("extends: base.yaml\nstages:\n  - id: short\n    type: recall.bm25\n", "child.yaml")
    errors = errors_of(child)
    assert len(errors) == 1
    assert errors[0].startswith(f"{child}:4:11  stages.1.type: stage 'short' is 'select.top_k' in the base config "
                                f"({tmp_path / 'base.yaml'}:9:11)")
    assert "give this stage a new id" in errors[0]
    # the same type, restated, is no change
    child.write_text("extends: base.yaml\nstages:\n  - {id: short, type: select.top_k, params: {k: 2}}\n")
    assert compile_file(child).canonical["stages"][1]["params"]["k"] == 2


def test_a_cycle_is_a_located_error(bm25_index, write_config, tmp_path):
    write_config("extends: b.yaml\n" + base_text(bm25_index, tmp_path), "a.yaml")
    b = write_config("extends: a.yaml\nname: b\n", "b.yaml")
    errors = errors_of(b)
    assert errors == [f"{tmp_path / 'a.yaml'}:1:10  extends: extends 'b.yaml' makes a cycle: b.yaml -> a.yaml -> b.yaml"]
    itself = write_config("extends: itself.yaml\nname: x\n", "itself.yaml")
    assert errors_of(itself) == [f"{itself}:1:10  extends: extends 'itself.yaml' makes a cycle: itself.yaml -> "
                                 "itself.yaml"]


def test_a_chain_longer_than_the_cap_is_refused(bm25_index, write_config, tmp_path):
    write_config(base_text(bm25_index, tmp_path), "c0.yaml")
    for n in range(1, MAX_EXTENDS_DEPTH + 1):
        write_config(f"extends: c{n - 1}.yaml\nname: c{n}\n", f"c{n}.yaml")
    assert compile_file(tmp_path / f"c{MAX_EXTENDS_DEPTH}.yaml").canonical["name"] == f"c{MAX_EXTENDS_DEPTH}"
    top = write_config(f"extends: c{MAX_EXTENDS_DEPTH}.yaml\nname: top\n", "top.yaml")
    errors = errors_of(top)
    assert len(errors) == 1 and f"more than {MAX_EXTENDS_DEPTH} configs extend one another" in errors[0]
    assert errors[0].startswith(f"{tmp_path / 'c1.yaml'}:1:10  extends: ")


def test_a_base_in_another_directory_is_refused(bm25_index, write_config, tmp_path):
    elsewhere = tmp_path / "shared"
    elsewhere.mkdir()
    (elsewhere / "base.yaml").write_text(base_text(bm25_index, elsewhere))
    for name in ("shared/base.yaml", "../" + tmp_path.name + "/shared/base.yaml", str(elsewhere / "base.yaml")):
        child = write_config(f"extends: {name}\nname: x\n", "child.yaml")
        errors = errors_of(child)
        assert len(errors) == 1 and errors[0].startswith(f"{child}:1:10  extends: the base config '{name}' is in "
                                                         f"{elsewhere}, not in this config's directory")
        assert "means the same" in errors[0]
    # a name that stays in the directory is fine
    write_config(base_text(bm25_index, tmp_path), "base.yaml")
    child = write_config("extends: shared/../base.yaml\nname: x\n", "child.yaml")
    assert compile_file(child).canonical["name"] == "x"


def test_a_missing_or_unusable_base_is_located_at_extends(write_config, tmp_path):
    child = write_config("version: 1\nextends: nowhere.yaml\n", "child.yaml")
    assert errors_of(child) == [f"{child}:2:10  extends: the base config 'nowhere.yaml' is not there "
                                f"(looked for {tmp_path / 'nowhere.yaml'})"]
    child.write_text("extends: [a.yaml]\n")
    assert errors_of(child)[0].startswith(f"{child}:1:10  extends: extends names the base config")
    write_config("- a list\n", "list.yaml")
    child.write_text("extends: list.yaml\n")
    assert errors_of(child)[0].startswith(f"{tmp_path / 'list.yaml'}:1:1  a base config must be a mapping")


def test_an_error_in_the_base_is_located_in_the_base(bm25_index, write_config, tmp_path):
    base = write_config(base_text(bm25_index, tmp_path).replace("params: {top_k: 50}", 'params: {top_k: "50"}'),
                        "base.yaml")
    child = write_config("extends: base.yaml\nstages:\n  - {id: short, params: {k: 3}}\n", "child.yaml")
    errors = errors_of(child)
    assert len(errors) == 1 and errors[0].startswith(f"{base}:7:21  stages.0.params.top_k: ")
    # a YAML problem in the base (a duplicate key) is the base's too, reported with the child's own
    base.write_text(base_text(bm25_index, tmp_path).replace("name: base", "name: base\nname: again"))
    errors = errors_of(child)
    assert errors == [f"{base}:3:1  name: duplicate key 'name'"]


def test_an_error_in_the_child_is_located_in_the_child(bm25_index, write_config, tmp_path):
    write_config(base_text(bm25_index, tmp_path), "base.yaml")
    child = write_config("extends: base.yaml\nstages:\n  - id: final\n    params: {k: ten, kk: 1}\nlimit: 3\n",
                         "child.yaml")
    errors = errors_of(child)
    assert any(e.startswith(f"{child}:4:17  stages.2.params.k: ") for e in errors), errors
    assert any(e.startswith(f"{child}:4:22  stages.2.params.kk: unknown field 'kk'") for e in errors), errors
    assert any(e.startswith(f"{child}:5:1  limit: unknown field 'limit'") for e in errors), errors
    assert len(errors) == 3
    # a new stage reading one nobody defined: located at the child's entry
    child.write_text("extends: base.yaml\nstages:\n  - {id: extra, type: select.top_k, inputs: [nope], "
                     "params: {k: 1}}\n")
    errors = errors_of(child)
    assert any(e.startswith(f"{child}:3:46  stages.3.inputs.0: unknown input 'nope'") for e in errors), errors


def test_the_trace_names_each_base_with_its_sha256(bm25_index, write_config, tmp_path):
    base = write_config(base_text(bm25_index, tmp_path), "base.yaml")
    middle = write_config("extends: base.yaml\nstages:\n  - {id: short, params: {k: 4}}\n", "middle.yaml")
    child = write_config("extends: middle.yaml\nname: child\n", "child.yaml")
    trace = Pipeline.from_file(child).search(QUERY).trace
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (base, middle)}
    assert trace["config"]["extends"] == [{"file": str(middle.resolve()), "sha256": sha[middle]},
                                          {"file": str(base.resolve()), "sha256": sha[base]}]
    assert trace["config"]["file"] == str(child)
    assert trace["config"]["resolved"]["name"] == "child"
    # a config that extends nothing records no bases
    assert "extends" not in Pipeline.from_file(base).search(QUERY).trace["config"]


def test_a_trace_of_an_extending_config_replays_identically(bm25_index, write_config, tmp_path):
    write_config(base_text(bm25_index, tmp_path), "base.yaml")
    child = write_config("extends: base.yaml\nstages:\n  - {id: short, params: {k: 3}}\n", "child.yaml")
    trace = Pipeline.from_file(child).search(QUERY).trace
    report = replay_trace(trace)
    assert report["identical"], report["differences"]
    # the base edited since is no matter to a replay: the trace holds the merged config that ran
    (tmp_path / "base.yaml").write_text(base_text(bm25_index, tmp_path).replace("top_k: 50", "top_k: 5"))
    assert replay_trace(trace)["identical"]


def test_set_and_validate_work_on_the_merged_config(bm25_index, write_config, tmp_path):
    write_config(base_text(bm25_index, tmp_path), "base.yaml")
    child = write_config("extends: base.yaml\nstages:\n  - {id: short, params: {k: 3}}\n", "child.yaml")
    # a stage only the base writes can be set, and so can the child's
    pipeline = Pipeline.from_file(child, settings=["stages.bm25.params.top_k=2", "stages.short.params.k=5"])
    assert len(results(pipeline)) == 2
    assert pipeline.compiled.extends[0]["file"] == str((tmp_path / "base.yaml").resolve())
    with pytest.raises(SieveError, match="extends"):
        Pipeline.from_file(child, settings=["extends=other.yaml"])
    done = CliRunner().invoke(app, ["validate", str(child)])
    assert done.exit_code == 0, done.output
    assert "3 stages" in done.output
    result = CliRunner().invoke(app, ["search", str(child), QUERY, "--set", "stages.final.params.k=1", "--json"])
    assert result.exit_code == 0, result.output


def test_a_sweep_varies_a_setting_the_base_writes(bm25_index, write_config, mini_corpus, tmp_path):
    write_config(base_text(bm25_index, tmp_path), "base.yaml")
    child = write_config("extends: base.yaml\nstages:\n  - {id: short, params: {k: 3}}\n", "child.yaml")
    report = sweep(child, mini_corpus, [parse_setting("stages.bm25.params.top_k=[1, 50]")], split="test",
                   allow_test=True)
    assert all(v.error is None for v in report.variants)
    by_value = {v.settings["stages.bm25.params.top_k"]: v for v in report.variants}
    assert by_value[50].config_sha256 == report.baseline.config_sha256 == compile_file(child).config_sha256
    assert by_value[1].config_sha256 != report.baseline.config_sha256


def test_sweep_refuses_to_vary_extends():
    """A sweep runs the config merged onto its base: the base's values are varied by their own paths."""
    import pytest

    from engine.errors import SieveError
    from engine.workbench.sweep import parse_setting

    with pytest.raises(SieveError, match="set the base's values by their paths"):
        parse_setting("extends=[a.yaml, b.yaml]")


def test_edge_cases_of_an_extending_file_get_the_right_message(bm25_index, write_config, tmp_path):
    """Each was a wrong or misleading message: a repeated id ('required field is missing' on a second entry
    appended as a new stage), the same type written with its version (refused as a change of type), a directory
    as the base (no location), and the top level's valid fields without `extends`."""
    write_config(base_text(bm25_index, tmp_path), "base.yaml")
    twice = write_config("extends: base.yaml\nstages:\n  - {id: final, params: {k: 2}}\n"
                         "  - {id: final, params: {k: 3}}\n", "twice.yaml")
    (error,) = errors_of(twice)
    assert f"{twice}:4:" in error and "duplicate stage id 'final' (this file's stages.0 has it already)" in error
    versioned = write_config("extends: base.yaml\nstages:\n  - {id: bm25, type: recall.bm25@1, params: {top_k: 5}}\n",
                             "versioned.yaml")
    compiled = compile_file(versioned)
    assert compiled.specs["bm25"].type == "recall.bm25@1" and compiled.stages["bm25"].params.top_k == 5
    other = write_config("extends: base.yaml\nstages:\n  - {id: bm25, type: recall.dense}\n", "other.yaml")
    (error,) = errors_of(other)
    assert "stages.0.type: stage 'bm25' is 'recall.bm25' in the base config" in error
    (tmp_path / "sub").mkdir()
    directory = write_config("extends: sub\n", "directory.yaml")
    (error,) = errors_of(directory)
    assert error.startswith(f"{directory}:1:10") and "is a directory" in error
    unknown = write_config("extends: base.yaml\ntrcae: {log: null}\n", "unknown.yaml")
    (error,) = errors_of(unknown)
    assert "unknown field 'trcae' (did you mean 'trace'?)" in error and error.endswith(", extends")
