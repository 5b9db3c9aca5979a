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


def test_eval_releases_the_index(cli, mini_config, mini_corpus: Path, bm25_index: Path, no_collection):
    result = cli("eval", mini_config(), "--dataset", mini_corpus, "--limit", "3", "--json")
    assert result.exit_code == 0, result.output
    assert _held_under(bm25_index) == []


def test_compare_releases_both_configs_indexes(cli, mini_config, mini_corpus: Path, bm25_index: Path, no_collection):
    """The judgement coverage's look-up and the pipelines that explain the most changed queries."""
    a, b = mini_config(k=10, name="wide.yaml"), mini_config(k=3, name="narrow.yaml")
    result = cli("compare", a, b, "--dataset", mini_corpus, "--limit", "10", "--most-changed", "2", "--json")
    assert result.exit_code == 0, result.output
    assert '"moves"' in result.stdout  # the explaining pipelines ran
    assert _held_under(bm25_index) == []


def test_sweep_releases_the_shared_index_and_a_variants_own(cli, mini_config, mini_corpus: Path, bm25_index: Path,
                                                             tmp_path: Path, no_collection):
    other = shutil.copytree(bm25_index, tmp_path / "copy-of-index")
    result = cli("sweep", mini_config(), "--dataset", mini_corpus, "--split", "test", "--allow-test", "--limit", "3",
                 "--set", f"index=[{bm25_index}, {other}]", "--json")
    assert result.exit_code == 0, result.output
    assert _held_under(bm25_index) == [] and _held_under(other) == []


def test_replay_releases_the_index(cli, mini_config, bm25_index: Path, tmp_path: Path, no_collection):
    trace = tmp_path / "t.json"
    assert cli("search", mini_config(), "vitamin d", "--trace-out", trace, "--no-log").exit_code == 0
    gc.collect()  # the search's own pipeline is the command's, not replay's
    assert _held_under(bm25_index) == []
    result = cli("replay", trace)
    assert result.exit_code == 0, result.output
    assert _held_under(bm25_index) == []


def test_rule_tests_release_the_index_they_build(no_collection):
    from rules.testing import run_test_file

    scratch = Path(tempfile.gettempdir())
    before = [p for p in _held_under(scratch) if "sieve-rule-tests-" in p]
    outcome = run_test_file(ROOT / "configs" / "finance" / "rules.tests.yaml", name_filter="UK users never see")
    assert [case.passed for case in outcome.cases] == [True]
    assert [p for p in _held_under(scratch) if "sieve-rule-tests-" in p] == before == []
