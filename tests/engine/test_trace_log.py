"""The trace log is hash-chained: edits, deletions and reorderings are detected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import TraceError
from engine.trace import TraceLog, load_trace, verify_log


def _fill(path: Path, count: int = 3) -> TraceLog:
    log = TraceLog(path)
    for i in range(count):
        log.append({"schema": "sieve.trace/1", "trace_id": f"t{i}", "results": [{"doc_id": str(i)}]})
    return log


def test_chain_verifies_and_finds(tmp_path):
    log = _fill(tmp_path / "log.jsonl")
    assert verify_log(log.path) == (3, [])
    assert log.find("t1")["trace_id"] == "t1"
    assert log.find()["trace_id"] == "t2"
    assert log.find(seq=0)["trace_id"] == "t0"
    with pytest.raises(TraceError, match="no trace with id nope"):
        log.find("nope")


def test_edit_is_detected(tmp_path):
    log = _fill(tmp_path / "log.jsonl")
    lines = log.path.read_text().splitlines()
    record = json.loads(lines[1])
    record["trace"]["results"][0]["doc_id"] = "forged"
    lines[1] = json.dumps(record)
    log.path.write_text("\n".join(lines) + "\n")
    count, problems = verify_log(log.path)
    assert count == 3 and any("content does not match its hash" in p for p in problems)


def test_deletion_and_reordering_are_detected(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 4)
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join([lines[0], lines[2], lines[3]]) + "\n")
    _, problems = verify_log(log.path)
    assert any("missing or moved" in p for p in problems)
    assert any("does not link" in p for p in problems)


def test_torn_tail_is_set_aside_not_lost(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 2)
    with open(log.path, "ab") as handle:
        handle.write(b'{"schema": "sieve.tracelog/1", "seq": 2, "pr')  # a writer died mid-record
    log.append({"schema": "sieve.trace/1", "trace_id": "after"})
    assert verify_log(log.path) == (3, [])
    aside = list(tmp_path.glob("log.jsonl.torn-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b'{"schema"')


def test_cli_verify(tmp_path):
    log = _fill(tmp_path / "log.jsonl")
    ok = CliRunner().invoke(app, ["trace", "verify", str(log.path)])
    assert ok.exit_code == 0 and "3 records, chain intact" in ok.output
    log.path.write_text(log.path.read_text().replace('"t1"', '"tX"'))
    bad = CliRunner().invoke(app, ["trace", "verify", str(log.path)])
    assert bad.exit_code == 1


def test_load_trace_rejects_non_traces(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(TraceError, match="not a Sieve trace"):
        load_trace(path)


def test_appends_after_a_record_without_the_header_layout(tmp_path):
    """A log whose last line has its keys in another order (an older writer, a hand-made tool)
    still chains: the position falls back to parsing the whole record."""
    from engine.trace import GENESIS, LOG_SCHEMA, record_hash

    path = tmp_path / "log.jsonl"
    first = {"schema": "sieve.trace/1", "query": "q0"}
    legacy = {"trace": first, "hash": record_hash(GENESIS, first), "prev": GENESIS, "seq": 0, "schema": LOG_SCHEMA}
    path.write_text(json.dumps(legacy) + "\n", encoding="utf-8")
    log = TraceLog(path)
    record = log.append({"schema": "sieve.trace/1", "query": "q1"})
    assert record["seq"] == 1 and record["prev"] == legacy["hash"]
    assert record["hash"] == record_hash(legacy["hash"], record["trace"])
    second = log.append({"schema": "sieve.trace/1", "query": "q2"})
    assert second["seq"] == 2 and second["prev"] == record["hash"]
    assert verify_log(path) == (3, [])
