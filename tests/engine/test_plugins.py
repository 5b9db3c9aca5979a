"""Stage plugins as a third party ships them: a package with a ``sieve.stages`` entry point (a dist-info on the
path), loaded by a real ``sieve`` process. From an audit of Sieve as a library: a plugin could replace Sieve's
own stages (an unpinned ``rules.prefilter`` resolved to a plugin's version 2 that let every document through),
a plugin that failed to import stopped every command with an 'internal error' that did not name it, and what a
plugin's stage returned was never checked (raw AttributeErrors past ``on_error``, documents twice, a score
credited to another stage, NaN written to the log)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PLUGIN = '''
from engine.model import Candidate, ScoreEntry, ranked
from engine.registry import register_stage
from engine.stage import Stage, StageParams, StageResult


class ModeParams(StageParams):
    mode: str = "good"


@register_stage
class Acme(Stage):
    type_name = "acme.rescore"
    version = 1
    Params = ModeParams
    signal = "acme"
    summary = "test plugin"

    def run(self, ctx):
        (incoming,) = ctx.inputs
        mode = self.params.mode
        if mode == "none":
            return None
        if mode == "twice":
            return StageResult(candidates=incoming + incoming)
        if mode == "foreign_score":
            return StageResult(candidates=[Candidate(c.doc_id, c.row, c.ledger + (ScoreEntry("bm25x", "bm25", 99.0, 1),))
                                           for c in incoming])
        if mode == "nan":
            return StageResult(candidates=[c.with_score(ScoreEntry(self.id, "acme", float("nan"), i))
                                           for i, c in enumerate(incoming, 1)])
        if mode == "details":
            return StageResult(candidates=incoming, details={"x": object()})
        if mode == "quote":  # a third party's message quoting the query, as exceptions often do
            raise ValueError(f"no rescoring for {ctx.query.text!r} (rewritten {ctx.query.rewritten!r}, after "
                             f"{list(ctx.query.history)!r}) with 5 inputs")
        return StageResult(candidates=ranked([c.with_score(ScoreEntry(self.id, "acme", c.score * 2, i))
                                              for i, c in enumerate(incoming, 1)]))
'''

SHADOW = '''
from engine.registry import register_stage
from engine.stage import Port, Stage, StageResult


@register_stage
class LetEveryoneIn(Stage):
    type_name = "rules.prefilter"
    version = 2
    produces = Port.MASK
    min_candidate_inputs = 0
    max_candidate_inputs = 0

    def run(self, ctx):
        return StageResult()
'''


def _plugin(site: Path, name: str, code: str) -> Path:
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(code, encoding="utf-8")
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[sieve.stages]\n{name} = {name}\n", encoding="utf-8")
    return site


def _python(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _config(tmp_path: Path, index: Path, mode: str, on_error: str = "fail", query_text: bool = True) -> Path:
    path = tmp_path / f"{mode}-{on_error}-{query_text}.yaml"
    path.write_text(f"""\
version: 1
index: {index}
stages:
  - {{id: bm25x, type: recall.bm25, params: {{top_k: 5}}}}
  - {{id: acme, type: acme.rescore, inputs: [bm25x], on_error: {on_error}, params: {{mode: {mode}}}}}
  - {{id: final, type: select.top_k, inputs: [acme], params: {{k: 3}}}}
output: final
trace: {{log: {tmp_path / 'log.jsonl'}, include_query_text: {str(query_text).lower()}}}
""", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _plugin(tmp_path_factory.mktemp("site"), "acmeplug", PLUGIN)


def test_a_plugins_stage_runs_is_traced_with_its_package_and_its_results_are_checked(site, bm25_index, tmp_path):
    modes = ["good", "none", "twice", "foreign_score", "nan", "details"]
    configs = {mode: str(_config(tmp_path, bm25_index, mode)) for mode in modes}
    skip = str(_config(tmp_path, bm25_index, "twice", on_error="skip"))
    done = _python(site, f"""
import json
from engine.errors import StageError
from engine.pipeline import Pipeline
report = {{}}
for mode, config in {json.dumps(configs)}.items():
    pipeline = Pipeline.from_file(config)
    try:
        result = pipeline.search("vitamin B12 homocysteine")  # and logs it
        stage = next(s for s in result.trace["stages"] if s["id"] == "acme")
        report[mode] = {{"ok": True, "plugin": stage.get("plugin"), "results": len(result.results)}}
    except StageError as exc:
        report[mode] = {{"ok": False, "error": str(exc)}}
result = Pipeline.from_file({skip!r}).search("vitamin B12 homocysteine")
report["skip"] = {{"degraded": result.degraded, "error": next(s for s in result.trace["stages"] if s["id"] == "acme").get("error")}}
print(json.dumps(report))
""", tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["good"] == {"ok": True, "plugin": "'acmeplug = acmeplug' (acmeplug 0.1)", "results": 3}
    says = {
        "none": "returned a NoneType, not a StageResult",
        "twice": "returned document '",
        "foreign_score": "under stage 'bm25x', which did not give it",
        "nan": "that is not a finite score",
        "details": "details that are not plain JSON",
    }
    for mode, message in says.items():
        assert not report[mode]["ok"] and "stage 'acme'" in report[mode]["error"], report[mode]
        assert message in report[mode]["error"], report[mode]
    assert report["skip"]["degraded"] and "twice" in report["skip"]["error"]
    lines = (tmp_path / "log.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and not any("NaN" in line for line in lines)  # the good run and the degraded one


def test_a_plugins_error_message_keeps_no_query_words_where_traces_keep_no_query_text(site, bm25_index, tmp_path):
    """A stage's error message goes to the trace, the hash-chained log, a batch's output and the server's answer:
    without query text, the words of the query (its text, rewrite and history, bar function words) are taken out
    of it, whatever stage raised it; the rest of the message stays for the operator."""
    configs = {f"{on_error}-{text}": str(_config(tmp_path, bm25_index, "quote", on_error, text))
               for on_error in ("skip", "fail") for text in (True, False)}
    done = _python(site, f"""
import json
from engine.errors import StageError
from engine.pipeline import Pipeline
report = {{}}
for name, config in {json.dumps(configs)}.items():
    pipeline = Pipeline.from_file(config)
    try:
        result = pipeline.search("homocysteine lowering by vitamin B12", history=["Zyprexa dosing in 2019?"])
        report[name] = next(s for s in result.trace["stages"] if s["id"] == "acme")["error"]
    except StageError as exc:
        report[name] = str(exc)
print(json.dumps(report))
""", tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "'homocysteine lowering by vitamin B12'" in report["skip-True"]
    assert "'homocysteine lowering by vitamin B12'" in report["fail-True"] and "Zyprexa" in report["fail-True"]
    for name in ("skip-False", "fail-False"):
        message = report[name]
        for word in ("homocysteine", "lowering", "vitamin", "B12", "Zyprexa", "dosing", "2019"):
            assert word not in message, (name, message)
        assert "ValueError: no rescoring for '<redacted> <redacted> by <redacted> <redacted>' (rewritten None, " \
               "after ['<redacted> <redacted> in <redacted>?']) with 5 inputs" in message, message
        assert "words of the query are redacted" in message, message
    lines = (tmp_path / "log.jsonl").read_text(encoding="utf-8").splitlines()  # the two skipped-stage queries
    assert len(lines) == 2 and [("homocysteine" in line, "Zyprexa" in line) for line in lines] == [(True, True),
                                                                                                  (False, False)]


def test_a_plugin_may_not_replace_sieves_own_stages(tmp_path, bm25_index):
    site = _plugin(tmp_path / "shadow-site", "shadowplug", SHADOW)
    done = subprocess.run([sys.executable, "-m", "engine.cli", "schema"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                          "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])})
    assert done.returncode == 2, done.stdout
    assert ("plugin 'shadowplug = shadowplug' (shadowplug 0.1) registers the stage type rules.prefilter@2, a type "
            "of Sieve's own") in done.stderr
    assert "internal error" not in done.stderr


def test_a_plugin_that_cannot_be_imported_is_named(tmp_path):
    site = _plugin(tmp_path / "broken-site", "brokenplug", "import this_module_does_not_exist\n")
    done = subprocess.run([sys.executable, "-m", "engine.cli", "schema"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                          "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])})
    assert done.returncode == 2
    assert ("stage plugin 'brokenplug = brokenplug' (brokenplug 0.1) cannot be loaded: ModuleNotFoundError: No module "
            "named 'this_module_does_not_exist'") in done.stderr
    assert "internal error" not in done.stderr
