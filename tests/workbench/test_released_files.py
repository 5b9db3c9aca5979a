"""What a command run from Python opens of an index it releases when it returns: eval, compare, sweep, replay and
the rule tests are library calls too (a notebook, a scheduler), where a descriptor or mapping held until garbage
collection adds up over a day of runs."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.workbench.conftest import ROOT


def _held_under(directory: Path) -> list[str]:
    """The files under ``directory`` this process holds open or mapped (Linux: /proc/self)."""
    where = str(directory.resolve())
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since it was listed
            continue
        if target.startswith(where):
            held.append(target)
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        held += [line.split(maxsplit=5)[-1].strip() for line in maps if where in line]
    return held


@pytest.fixture
def no_collection():
    """Garbage collection off for the test: a release that rests on it is not a release."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self (Linux)")


@pytest.fixture(scope="module")
def own_index(bm25_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own copy of the SciFact slice's index: the session's may be held by other tests' pipelines."""
    return Path(shutil.copytree(bm25_index, tmp_path_factory.mktemp("released") / "mini"))


@pytest.fixture
def config_on(own_index: Path, write_config):
    def write(k: int = 10, name: str = "pipeline.yaml") -> Path:
        return write_config(f"version: 1\nname: {Path(name).stem}\nindex: {own_index}\nstages:\n"
                            "  - {id: bm25, type: recall.bm25, params: {top_k: 100}}\n"
                            f"  - {{id: final, type: select.top_k, inputs: [bm25], params: {{k: {k}}}}}\n"
                            "output: final\ntrace: {log: null}\n", name)

    return write


def test_eval_releases_the_index(cli, config_on, mini_corpus: Path, own_index: Path, no_collection):
    result = cli("eval", config_on(), "--dataset", mini_corpus, "--limit", "3", "--json")
    assert result.exit_code == 0, result.output
    assert _held_under(own_index) == []


def test_compare_releases_both_configs_indexes(cli, config_on, mini_corpus: Path, own_index: Path, no_collection):
    """The judgement coverage's look-up and the pipelines that explain the most changed queries."""
    a, b = config_on(k=10, name="wide.yaml"), config_on(k=3, name="narrow.yaml")
    result = cli("compare", a, b, "--dataset", mini_corpus, "--limit", "10", "--most-changed", "2", "--json")
    assert result.exit_code == 0, result.output
    assert '"moves"' in result.stdout  # the explaining pipelines ran
    assert _held_under(own_index) == []


def test_sweep_releases_the_shared_index_and_a_variants_own(cli, config_on, mini_corpus: Path, own_index: Path,
                                                             tmp_path: Path, no_collection):
    other = shutil.copytree(own_index, tmp_path / "copy-of-index")
    result = cli("sweep", config_on(), "--dataset", mini_corpus, "--split", "test", "--allow-test", "--limit", "3",
                 "--set", f"index=[{own_index}, {other}]", "--json")
    assert result.exit_code == 0, result.output
    assert _held_under(own_index) == [] and _held_under(other) == []


def test_replay_releases_the_index(cli, config_on, own_index: Path, tmp_path: Path, no_collection):
    trace = tmp_path / "t.json"
    assert cli("search", config_on(), "vitamin d", "--trace-out", trace, "--no-log").exit_code == 0
    gc.collect()  # the search's own pipeline is the command's, not replay's
    assert _held_under(own_index) == []
    result = cli("replay", trace)
    assert result.exit_code == 0, result.output
    assert _held_under(own_index) == []


def test_rule_tests_release_the_index_they_build(no_collection):
    from rules.testing import run_test_file

    scratch = Path(tempfile.gettempdir())
    before = [p for p in _held_under(scratch) if "sieve-rule-tests-" in p]
    outcome = run_test_file(ROOT / "configs" / "finance" / "rules.tests.yaml", name_filter="UK users never see")
    assert [case.passed for case in outcome.cases] == [True]
    assert [p for p in _held_under(scratch) if "sieve-rule-tests-" in p] == before == []
