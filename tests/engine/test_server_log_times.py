"""`sieve serve`'s log lines carry their UTC time, Sieve's own warnings included (time audit L4: they had none, so an
operator could not line a "rule file changed" or a warm-up warning up with the trace log's UTC times)."""

from __future__ import annotations

import re

import httpx

from tests.conftest import served

STAMPED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z (INFO|WARNING|ERROR): ")


def test_every_log_line_of_the_server_starts_with_its_utc_time(bm25_index, tmp_path):
    (tmp_path / "overrides.yaml").write_text(
        "version: 1\nkind: override\nrules:\n  - {id: old, action: bury, docs: [d1], until: 2020-01-01}\n",
        encoding="utf-8")
    config = tmp_path / "p.yaml"
    config.write_text(
        f"version: 1\nname: p\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
        "  - {id: overrides, type: rules.override, inputs: [bm25], params: {rules: overrides.yaml}}\n"
        f"output: overrides\ntrace: {{log: {tmp_path / 'trace.jsonl'}}}\n", encoding="utf-8")
    with served([config], tmp_path) as (base, _, output):
        httpx.get(f"{base}/healthz", timeout=5)
    lines = [line for line in output.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert any("rule 'old' has expired" in line for line in lines), lines  # Sieve's own warning
    assert any("GET /healthz" in line for line in lines), lines  # uvicorn's access line
    assert lines and all(STAMPED.match(line) for line in lines), lines
