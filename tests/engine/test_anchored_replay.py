"""replay and report --expect-head: the trace log's chain has no key, so whoever can write the log can rewrite it
from any record on (each hash recomputed) along with the --trace-out file that names it, and replay would call the
forgery verified. A head anchored outside the log (sieve trace head, kept in a ticket or a WORM store) is what
tells: the rewritten chain no longer holds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import TraceError
import engine.trace as trace_module
from engine.trace import GENESIS, _record_line, load_trace_checked


@pytest.fixture
def logged(bm25_index: Path, write_config, tmp_path: Path):
    """A BM25 pipeline that logs to tmp_path/log.jsonl; search(name) runs one query and returns its trace file."""
    log = tmp_path / "log.jsonl"
    config = write_config(f"""
version: 1
name: anchored
index: {bm25_index}
trace: {{log: {log}}}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: final, type: select.top_k, inputs: [bm25], params: {{k: 5}}}}
output: final
""")

    def search(name: str, *extra: str) -> Path:
        out = tmp_path / f"{name}.json"
        done = invoke("search", config, "vitamin d deficiency", "--trace-out", out, *extra)
        assert done.exit_code == 0, done.output
        return out

    return log, search


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def refusal(*args) -> str:
    """The message of the TraceError a command stops with (main() prints it and exits 2)."""
    done = invoke(*args)
    assert isinstance(done.exception, TraceError), (done.output, done.exception)
    return str(done.exception)


def _head(log: Path) -> str:
    done = invoke("trace", "head", log, "--json")
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)["hash"]


def _rewrite_from_first(log: Path, trace_file: Path) -> None:
    """The forger's move: change the first record's ranking, recompute every hash after it, and make the --trace-out
    file of that record match the rewritten log."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    first = records[0]["trace"]
    first["results"][0]["score"] = first["results"][0]["score"] + 1.0
    prev, lines = GENESIS, []
    for seq, record in enumerate(records):
        rewritten, line = _record_line(prev, seq, record["trace"])
        lines.append(line)
        prev = rewritten["hash"]
        if seq == 0:
            written = json.loads(trace_file.read_text())
            written.update(first)
            written["log"]["hash"] = rewritten["hash"]
            trace_file.write_text(json.dumps(written))
    log.write_bytes(b"".join(lines))


def test_replay_of_a_rewritten_chain_passes_without_an_anchor_and_is_refused_with_one(logged):
    log, search = logged
    first, _ = search("first"), search("second")
    head = _head(log)

    anchored = invoke("replay", first, "--expect-head", head, "--json")
    assert anchored.exit_code == 0, anchored.output
    source = json.loads(anchored.stdout)["source"]
    assert source["verified"] and source["anchored_head"] == head and source["seq"] == 0
    assert "the head anchored outside the log (seq 1" in source["message"]

    _rewrite_from_first(log, first)
    forged = invoke("replay", first, "--json")  # the chain alone vouches for the forgery
    assert json.loads(forged.stdout)["source"]["verified"] is True
    refused = refusal("replay", first, "--expect-head", head)
    assert "--expect-head: the trace log" in refused and "no record has the anchored hash" in refused
    assert f"sieve trace verify {log} --expect-head {head}" in refused


def test_a_trace_logged_after_the_anchor_or_not_logged_is_refused(logged):
    log, search = logged
    search("first")
    head = _head(log)
    later = search("later")
    refused = refusal("replay", later, "--expect-head", head)
    assert "record seq 1, logged after the anchored head (seq 0)" in refused
    assert f"anchor a later head (sieve trace head {log})" in refused
    record_in_log = invoke("replay", log, "--seq", "0", "--expect-head", head)  # a record read from the log itself
    assert record_in_log.exit_code == 0, record_in_log.output
    unlogged = search("unlogged", "--no-log")
    assert "is not a record of a trace log" in refusal("replay", unlogged, "--expect-head", head)
    assert "64 hex digits" in refusal("replay", later, "--expect-head", "nothex")


def test_report_shows_the_anchored_head_and_refuses_a_rewritten_chain(logged, tmp_path: Path):
    log, search = logged
    first = search("first")
    head = _head(log)
    html = tmp_path / "report.html"
    done = invoke("report", first, "--html", html, "--expect-head", head)
    assert done.exit_code == 0, done.output
    page = html.read_text()
    assert "anchored head" in page and head in page
    _rewrite_from_first(log, first)
    html.unlink()
    assert "no record has the anchored hash" in refusal("report", first, "--html", html, "--expect-head", head)
    assert not html.exists()


def test_a_trace_rotated_out_of_the_log_is_vouched_for_by_a_later_anchor(logged):
    """Review of the change (high): the chain was checked from the file holding the record, which after `trace
    rotate` is the archive, so a head anchored on the live log afterwards was never found there."""
    log, search = logged
    first = search("first")
    assert invoke("trace", "rotate", log).exit_code == 0
    search("second")
    head = _head(log)
    assert invoke("trace", "verify", log, "--expect-head", head).exit_code == 0
    done = invoke("replay", first, "--expect-head", head, "--json")
    assert done.exit_code == 0, (done.output, done.exception)
    source = json.loads(done.stdout)["source"]
    assert source["anchored_head"] == head and "a segment rotated out" in source["message"]


def test_a_log_swapped_between_matching_the_trace_and_checking_the_anchor_is_refused(logged, monkeypatch):
    """Review of the change (medium): the trace was matched against its record in one read and the chain checked
    against the anchor in another; a forged log for the first and the genuine one back for the second vouched for
    the forgery. The chain the anchor is checked on must hold the very record the trace was matched against."""
    log, search = logged
    first, _ = search("first"), search("second")
    head = _head(log)
    genuine = log.read_bytes()
    _rewrite_from_first(log, first)
    real_check = trace_module.check_log

    def swapped(path, **options):
        log.write_bytes(genuine)  # the genuine log back, for the anchor's check
        return real_check(path, **options)

    monkeypatch.setattr(trace_module, "check_log", swapped)
    with pytest.raises(TraceError, match="the chain checked has no record seq 0 with hash .* the log changed since"):
        load_trace_checked(first, expect_head=head)
