"""Fixtures for the workbench tests: configs over the SciFact slice, a medical index, a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
MEDICAL = ROOT / "examples" / "medical"


@pytest.fixture(scope="session")
def medical_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BM25 index of the medical example corpus (documents carry ACLs, jurisdictions, statuses)."""
    from engine.index import build_index

    out = tmp_path_factory.mktemp("workbench-indexes") / "medical"
    build_index(MEDICAL, out, {"bm25": {}})
    return out


@pytest.fixture
def mini_config(bm25_index: Path, write_config):
    """Write a pipeline over the SciFact-slice BM25 index: recall top_k and final k are parameters."""

    def write(recall_top_k: int = 100, k: int = 10, name: str = "pipeline.yaml", extra: str = "") -> Path:
        return write_config(
            f"""
version: 1
name: {Path(name).stem}
index: {bm25_index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: {recall_top_k}}}}}
{extra}  - {{id: final, type: select.top_k, inputs: [{'floor' if extra else 'bm25'}], params: {{k: {k}}}}}
output: final
trace: {{log: null}}
""",
            name,
        )

    return write


@pytest.fixture
def cli():
    """Invoke the typer app in-process; returns the click Result (exceptions kept for inspection)."""
    from engine.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)

    return invoke


@pytest.fixture
def cli_json(cli):
    """Invoke a command with --json and parse its stdout."""

    def invoke(*args: str):
        result = cli(*args, "--json")
        assert result.exit_code == 0, (result.output, result.exception)
        return json.loads(result.stdout)

    return invoke


def run_sieve(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The real entry point in a subprocess (error mapping to exit codes is main()'s job)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)
