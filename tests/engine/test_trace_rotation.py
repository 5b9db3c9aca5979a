"""Rotating a trace log: the records move to an archived segment beside the log, and the chain goes on unbroken.

The auditor's tools (verify, head, replay, report) follow the chain back through the segments; a rotation while
other processes append loses and duplicates nothing; tampering with an archive or its link is found; a failed
rotation changes nothing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import TraceError
from engine.pipeline import Pipeline
from engine.trace import TraceLog, check_log, load_trace_checked, log_head, rotate_log

ROOT = Path(__file__).resolve().parents[2]


def _trace(trace_id: str) -> dict:
    return {"schema": "sieve.trace/1", "trace_id": trace_id, "results": [{"doc_id": trace_id}]}


def _fill(log: TraceLog, prefix: str, count: int) -> None:
    for i in range(count):
        log.append(_trace(f"{prefix}{i}"))


def _ids(path: Path) -> list[str]:
    return [r["trace"]["trace_id"] for r in TraceLog(path).records() if "trace_id" in r["trace"]]


def _run_sieve(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SIEVE_DEBUG": ""}
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def test_the_chain_goes_on_across_rotations_and_readers_follow_it(tmp_path):
    log = TraceLog(tmp_path / "trace.jsonl")
    _fill(log, "a", 3)
    first = rotate_log(log.path)
    assert first.archive == tmp_path / "trace.000000-000002.jsonl"
    assert (first.first_seq, first.last_seq, first.marker["seq"]) == (0, 2, 3)
    assert _ids(first.archive) == ["a0", "a1", "a2"]
    # the new log holds only the marker, linked to the archive's last record
    archived_last = TraceLog(first.archive).last_record()
    assert first.marker["prev"] == archived_last["hash"] and _ids(log.path) == []
    assert log.find()["trace_id"] == "a2"  # the latest trace is in the archive
    _fill(log, "b", 2)
    second = rotate_log(log.path)
    assert second.archive.name == "trace.000003-000005.jsonl"  # marker seq 3, traces 4 and 5
    log.append(_trace("c0"))
    assert log.append(_trace("c1"))["seq"] == 8
    check = check_log(log.path)
    assert check.problems == [] and check.warnings == []
    assert check.records == 9 and [p.name for p in check.segments] == [
        "trace.000000-000002.jsonl", "trace.000003-000005.jsonl", "trace.jsonl"]
    # find by id, by seq, latest, across segments
    assert log.find("a1")["trace_id"] == "a1" and log.find("b0")["trace_id"] == "b0"
    assert log.find(seq=0)["trace_id"] == "a0" and log.find(seq=5)["trace_id"] == "b1"
    assert log.find()["trace_id"] == "c1"
    with pytest.raises(TraceError, match="nor do the segments rotated out of it: trace.000003-000005.jsonl, "
                                         "trace.000000-000002.jsonl"):
        log.find("nope")
    with pytest.raises(TraceError, match="seq 6 is the marker that starts the log after a rotation"):
        log.find(seq=6)
    # the head counts the whole chain, and an anchor taken before a rotation still checks after it
    head = log_head(log.path)
    assert (head.records, head.seq) == (9, 8)
    assert check_log(log.path, expect_head=head.hash, expect_count=head.records).problems == []
    archived_head = log_head(first.archive)
    assert check_log(log.path, expect_head=archived_head.hash, expect_count=archived_head.records).problems == []


def test_a_trace_file_whose_record_was_rotated_out_is_still_checked_against_it(tmp_path, bm25_index, write_config):
    log_path = tmp_path / "trace.jsonl"
    config = write_config(f"""\
version: 1
index: {bm25_index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 20}}}}
  - {{id: final, type: select.top_k, inputs: [bm25], params: {{k: 3}}}}
output: final
trace: {{log: {log_path}}}
""")
    pipeline = Pipeline.from_file(config)
    trace = pipeline.search("vitamin B12 homocysteine").trace
    trace_file = tmp_path / "trace.json"
    trace_file.write_text(json.dumps(trace), encoding="utf-8")
    rotation = rotate_log(log_path)
    pipeline.search("metformin kidney")  # the next query goes into the new log
    found, source = load_trace_checked(trace_file)
    assert source.verified and found["trace_id"] == trace["trace_id"]
    replayed = CliRunner().invoke(app, ["replay", str(log_path), "--id", trace["trace_id"]])
    assert replayed.exit_code == 0 and "identical" in replayed.output, replayed.output
    assert CliRunner().invoke(app, ["replay", str(log_path)]).exit_code == 0  # the latest: in the new log
    # the archive moved away: the reader says where the record was and what to do
    rotation.archive.rename(tmp_path / "elsewhere.jsonl")
    with pytest.raises(TraceError, match=r"continues trace.000000-000000.jsonl \(seq 0..0\), which is not beside it"):
        load_trace_checked(trace_file)


def test_an_archived_segment_that_was_cut_edited_or_moved_is_reported(tmp_path):
    log = TraceLog(tmp_path / "trace.jsonl")
    _fill(log, "a", 4)
    rotation = rotate_log(log.path)
    _fill(log, "b", 2)
    archive_bytes = rotation.archive.read_bytes()
    # an edited archived record: the problem names the archive
    rotation.archive.write_bytes(archive_bytes.replace(b'"doc_id":"a1"', b'"doc_id":"zz"'))
    problems = check_log(log.path).problems
    assert any(p.startswith("trace.000000-000003.jsonl: line 2 (seq 1): content does not match") for p in problems)
    # the archive's last record cut off: what is left links up, but not to the new log's marker
    rotation.archive.write_bytes(b"".join(archive_bytes.splitlines(keepends=True)[:3]))
    problems = check_log(log.path).problems
    assert any("but trace.000000-000003.jsonl ends at seq 2" in p and "cut, extended or replaced" in p
               for p in problems), problems
    # the archive moved away: the log alone checks out, with a note, and an anchor inside the archive cannot be
    rotation.archive.write_bytes(archive_bytes)
    head = log_head(rotation.archive)
    rotation.archive.rename(tmp_path / "cold-storage.jsonl")
    check = check_log(log.path)
    assert check.problems == [] and check.records == 3
    assert any("continues trace.000000-000003.jsonl (seq 0..3), which is not beside it: the chain is checked from "
               "seq 4 on" in w for w in check.warnings), check.warnings
    anchored = check_log(log.path, expect_head=head.hash, expect_count=head.records).problems
    assert anchored and "in an earlier segment that is not beside the log" in anchored[0]
    ok = log_head(log.path)
    assert check_log(log.path, expect_head=ok.hash, expect_count=ok.records).problems == []
    done = _run_sieve("trace", "verify", log.path)
    assert done.returncode == 0 and "which is not beside it" in done.stderr, done.stderr


def test_a_marker_that_does_not_start_the_log_or_names_no_file_breaks_the_chain(tmp_path):
    log = TraceLog(tmp_path / "trace.jsonl")
    _fill(log, "a", 2)
    rotate_log(log.path)
    marker_line = log.path.read_bytes()
    other = TraceLog(tmp_path / "other.jsonl")
    _fill(other, "x", 2)
    with open(other.path, "ab") as handle:  # a marker copied into the middle of another log
        handle.write(marker_line)
    assert any("a segment marker in the middle of the log" in p for p in check_log(other.path).problems)
    forged = json.loads(marker_line)
    forged["trace"]["previous"]["file"] = "../../etc/passwd"
    log.path.write_text(json.dumps(forged, separators=(",", ":")) + "\n")
    problems = check_log(log.path).problems
    assert any("naming no file beside the log as its previous segment" in p for p in problems), problems


def test_rotate_refuses_what_it_cannot_rotate_and_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "trace.jsonl"
    with pytest.raises(TraceError, match="trace log not found"):
        rotate_log(path)
    path.touch()
    with pytest.raises(TraceError, match="nothing to rotate: .* holds no trace$"):
        rotate_log(path)
    log = TraceLog(path)
    _fill(log, "a", 2)
    rotate_log(path)
    with pytest.raises(TraceError, match="holds no trace since its last rotation"):
        rotate_log(path)
    _fill(log, "b", 1)
    # the archive's name is taken by another file: refused, nothing moved
    taken = tmp_path / "trace.000002-000003.jsonl"
    taken.write_text("someone else's file\n")
    before = path.read_bytes()
    with pytest.raises(TraceError, match="trace.000002-000003.jsonl exists already"):
        rotate_log(path)
    assert path.read_bytes() == before and taken.read_text() == "someone else's file\n"
    taken.unlink()
    # a failure while writing the new log: the archive's second name is removed, the log is as it was
    real_replace = os.replace

    def failing(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(TraceError, match="cannot rotate .*: No space left on device .*nothing was changed"):
        rotate_log(path)  # a TraceError (exit 2 with its message), not an internal error
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == before and not taken.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.000000-000001.jsonl", "trace.jsonl"]
    # an edited record: rotate only an intact log
    path.write_bytes(before.replace(b'"doc_id":"b0"', b'"doc_id":"zz"'))
    with pytest.raises(TraceError, match="the chain is broken .* rotate only an intact log"):
        rotate_log(path)


def test_a_torn_tail_is_set_aside_before_the_rotation(tmp_path):
    log = TraceLog(tmp_path / "trace.jsonl")
    _fill(log, "a", 2)
    with open(log.path, "ab") as handle:
        handle.write(b'{"schema": "sieve.tracelog/1", "seq": 2, "pr')
    rotation = rotate_log(log.path)
    assert (rotation.first_seq, rotation.last_seq) == (0, 1)
    check = check_log(log.path)
    assert check.problems == [] and len(check.set_aside) == 1


def _append_many(path: str, worker: int) -> None:
    log = TraceLog(path)
    for i in range(40):
        log.append(_trace(f"w{worker}-{i}"))


def _rotate_many(path: str, done) -> None:  # noqa: ANN001 (a multiprocessing Event)
    while not done.is_set():
        try:
            rotate_log(path)
        except TraceError as exc:  # nothing appended since the last rotation
            assert "nothing to rotate" in str(exc), exc


def test_rotating_while_processes_append_loses_and_duplicates_nothing(tmp_path):
    log = TraceLog(tmp_path / "trace.jsonl")
    log.append(_trace("first"))
    context = multiprocessing.get_context("fork")
    done = context.Event()
    rotator = context.Process(target=_rotate_many, args=(str(log.path), done))
    rotator.start()
    workers = [context.Process(target=_append_many, args=(str(log.path), w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    done.set()
    rotator.join(60)
    assert [w.exitcode for w in workers] + [rotator.exitcode] == [0, 0, 0, 0]
    check = check_log(log.path)
    assert check.problems == [] and check.warnings == []
    assert len(check.segments) > 2, "the test must rotate while the workers append"
    traces = [tid for segment in check.segments for tid in _ids(segment)]
    assert sorted(traces) == sorted(["first"] + [f"w{w}-{i}" for w in range(3) for i in range(40)])
    assert check.records == len(traces) + len(check.segments) - 1  # one marker per rotation


def test_cli_rotate_then_verify_and_head(tmp_path):
    log = TraceLog(tmp_path / "trace.jsonl")
    _fill(log, "a", 3)
    done = _run_sieve("trace", "rotate", log.path)
    assert done.returncode == 0, done.stderr
    assert "seq 0..2 (3 records) moved to" in done.stdout and "trace.000000-000002.jsonl" in done.stdout
    assert "--expect-count 4" in done.stdout
    as_json = CliRunner().invoke(app, ["trace", "rotate", str(log.path), "--json"])
    assert as_json.exit_code == 1 and "nothing to rotate" in str(as_json.exception)
    log.append(_trace("b0"))
    rotated = json.loads(CliRunner().invoke(app, ["trace", "rotate", str(log.path), "--json"]).stdout)
    assert rotated["archive"].endswith("trace.000003-000004.jsonl") and rotated["seq"] == 5 and rotated["records"] == 6
    verified = _run_sieve("trace", "verify", log.path, "--expect-head", rotated["hash"], "--expect-count", "6")
    assert verified.returncode == 0, verified.stderr
    assert "6 records in 3 segments (trace.000000-000002.jsonl, trace.000003-000004.jsonl, trace.jsonl)" \
        in verified.stdout
    missing = _run_sieve("trace", "rotate", tmp_path / "nope.jsonl")
    assert missing.returncode == 2 and "trace log not found" in missing.stderr


def test_the_new_log_keeps_the_old_ones_mode_whatever_the_umask(tmp_path):
    log = TraceLog(tmp_path / "trace.jsonl")
    _fill(log, "a", 2)
    os.chmod(log.path, 0o644)  # readable by the log shipper
    before = os.umask(0o077)
    try:
        rotate_log(log.path)
    finally:
        os.umask(before)
    assert (os.stat(log.path).st_mode & 0o777) == 0o644


def test_a_symlinked_log_is_rotated_where_it_points(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "target.jsonl"
    link = tmp_path / "link.jsonl"
    _fill(TraceLog(target), "a", 3)
    link.symlink_to(target)
    rotation = rotate_log(link)
    assert rotation.archive == tmp_path / "real" / "target.000000-000002.jsonl" and rotation.archive.is_file()
    assert link.is_symlink() and link.resolve() == target  # the link still names the log
    TraceLog(link).append(_trace("b0"))
    check = check_log(link)
    assert check.problems == [] and check.records == 5 and len(check.segments) == 2
    assert TraceLog(link).find("a1")["trace_id"] == "a1"


def test_the_log_is_checked_without_its_lock_so_appends_go_on_meanwhile(tmp_path, monkeypatch):
    """A rotation of a long log held the lock while it checked the whole chain (seconds, every request waiting).
    Now only what was appended during the check is checked under the lock, and those records are archived too."""
    import threading

    log = TraceLog(tmp_path / "trace.jsonl")
    _fill(log, "a", 3)
    real_scan = TraceLog.scan
    appended = []

    def scan_then_append(self, limit=None):
        yield from real_scan(self, limit)
        if limit is not None and not appended:  # the check without the lock is done: another process appends
            worker = threading.Thread(target=lambda: appended.append(TraceLog(self.path).append(_trace("during"))))
            worker.start()
            worker.join(10)
            assert appended, "the append waited for a lock held during the check"

    monkeypatch.setattr(TraceLog, "scan", scan_then_append)
    rotation = rotate_log(log.path)
    monkeypatch.setattr(TraceLog, "scan", real_scan)
    assert (rotation.first_seq, rotation.last_seq) == (0, 3) and _ids(rotation.archive)[-1] == "during"
    assert check_log(log.path).problems == []


def test_a_record_appended_during_the_check_that_does_not_chain_on_is_refused(tmp_path, monkeypatch):
    log = TraceLog(tmp_path / "trace.jsonl")
    _fill(log, "a", 2)
    real_scan = TraceLog.scan
    forged = json.loads(log.path.read_text().splitlines()[-1])
    forged["seq"] = 2

    def scan_then_forge(self, limit=None):
        yield from real_scan(self, limit)
        if limit is not None:
            with open(self.path, "ab") as handle:
                handle.write(json.dumps(forged, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")

    monkeypatch.setattr(TraceLog, "scan", scan_then_forge)
    with pytest.raises(TraceError, match="appended during the check does not chain on"):
        rotate_log(log.path)
    monkeypatch.setattr(TraceLog, "scan", real_scan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.jsonl"]


def test_a_record_read_from_an_archive_names_the_archive(tmp_path):
    log = TraceLog(tmp_path / "trace.jsonl")
    _fill(log, "a", 2)
    rotate_log(log.path)
    log.append(_trace("b0"))
    trace, source = load_trace_checked(log.path, trace_id="a1")
    assert trace["trace_id"] == "a1" and source.log == str(tmp_path / "trace.000000-000001.jsonl")
    assert "trace.000000-000001.jsonl, a segment rotated out of the trace log" in source.message
    _, here = load_trace_checked(log.path, trace_id="b0")
    assert here.log == str(log.path) and "segment" not in here.message


def test_an_archived_segment_is_not_rotated(tmp_path):
    """Rotating an archive left it holding only a marker and broke the chain of the log that continues it."""
    log = TraceLog(tmp_path / "trace.jsonl")
    _fill(log, "a", 2)
    first = rotate_log(log.path)
    _fill(log, "b", 2)
    before = first.archive.read_bytes()
    with pytest.raises(TraceError, match="trace.000000-000001.jsonl is an archived segment: trace.jsonl continues"):
        rotate_log(first.archive)
    assert first.archive.read_bytes() == before and check_log(log.path).problems == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.000000-000001.jsonl", "trace.jsonl"]
