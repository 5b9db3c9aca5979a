"""Shared fixtures: the bundled SciFact slice, a BM25 index built from it once per session.

The network is blocked for every test (pytest-socket, configured in pyproject.toml: only
loopback may be reached) and the model hub is switched off, as in CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Property tests draw the same examples on every run (`make test`, CI): a failure is then the code's, found again
# by the next run, not a draw that the next run may miss. HYPOTHESIS_PROFILE=explore draws new ones, for looking.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "examples" / "scifact-mini"


@pytest.fixture(scope="session", autouse=True)
def _the_checkouts_audit_log_is_not_written():
    """A test writes its traces under its own tmp_path: the checkout's traces/trace.jsonl (the default log, relative
    to the working directory) is a user's audit record, and ``Pipeline.search`` logs by default."""
    log = ROOT / "traces" / "trace.jsonl"
    before = log.stat().st_size if log.exists() else None
    yield
    after = log.stat().st_size if log.exists() else None
    assert after == before, f"the test session appended to {log}: give the test's config `trace: {{log: null}}`"


@pytest.fixture(scope="session")
def mini_corpus() -> Path:
    """Directory of the bundled SciFact slice (corpus.jsonl, queries.jsonl, qrels/test.tsv)."""
    return MINI


@pytest.fixture(scope="session")
def bm25_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bm25s index over the SciFact slice, built once per test session."""
    from engine.index import build_index

    out = tmp_path_factory.mktemp("indexes") / "mini"
    build_index(MINI, out, {"bm25": {}})
    return out


@pytest.fixture
def write_config(tmp_path: Path):
    """Write YAML text to a file in tmp_path and return its path."""

    def write(text: str, name: str = "pipeline.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


# A pipeline that fails at run time: z-scores are negative for half the list, and multiplying a decay
# into them is refused ({extra}: more of the recency stage, e.g. its on_error).
FAILS_AT_RUN_TIME = """version: 1
index: {index}
stages:
  - id: bm25
    type: recall.bm25
    params: {{top_k: 20}}
  - id: z
    type: fuse.weighted
    inputs: [bm25]
    params: {{weights: {{bm25: 1.0}}, normalize: zscore}}
  - id: recent
    type: boost.recency
    inputs: [z]
    params: {{half_life_days: 365, combine: multiply}}{extra}
output: recent
"""


@contextmanager
def served(configs: list[Path], directory: Path, *options: str):
    """(base URL, process, log file) of `sieve serve CONFIGS OPTIONS` in ``directory``, once ready; stopped (SIGTERM)
    on exit if still running. A helper for tests that read the server's log or signal its process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = directory / "serve.log"
    with open(output, "w", encoding="utf-8") as sink:
        process = subprocess.Popen([str(Path(sys.executable).with_name("sieve")), "serve", *map(str, configs),
                                    "--port", str(port), *options], stdout=sink, stderr=subprocess.STDOUT, cwd=directory)
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with opener.open(f"{base}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, output.read_text(encoding="utf-8")
            time.sleep(0.2)
        yield base, process, output
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
