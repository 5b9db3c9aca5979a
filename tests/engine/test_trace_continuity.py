"""A writer never starts a second chain under a log's name.

Once a process has appended to a log (or found it ending at a record), an append that finds the file gone (its
directory deleted), emptied or replaced by another file is refused with a TraceError naming the file and what
happened, instead of starting again at seq 0. What legitimately changes the file is followed: a rotation by another
process (``sieve trace rotate``, in a real subprocess here), other processes appending, and the log put back (moved
back, or a copy that holds the record). Real files throughout; "another process" is a real one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import TraceError
from engine.trace import TraceLog, TraceLogReplaced, check_log

ROOT = Path(__file__).resolve().parents[2]


def _trace(trace_id: str) -> dict:
    return {"schema": "sieve.trace/1", "trace_id": trace_id, "results": [{"doc_id": trace_id}]}


def _elsewhere(*args: object) -> subprocess.CompletedProcess[str]:
    """The real CLI in another process (its own memory of where logs end: none)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _append_elsewhere(path: Path, *trace_ids: str) -> None:
    """Another process appends traces to the log (as a second server or batch would)."""
    code = ("import sys; from engine.trace import TraceLog\n"
            "for i in sys.argv[2:]: TraceLog(sys.argv[1]).append({'schema': 'sieve.trace/1', 'trace_id': i})\n")
    subprocess.run([sys.executable, "-c", code, str(path), *trace_ids], check=True, cwd=ROOT, timeout=60)


def _ids(path: Path) -> list[str]:
    return [r["trace"]["trace_id"] for r in TraceLog(path).records() if "trace_id" in r["trace"]]


def test_a_first_append_creates_the_log_and_its_directories(tmp_path):
    path = tmp_path / "new" / "deeper" / "trace.jsonl"
    record = TraceLog(path).append(_trace("a"))
    assert record["seq"] == 0 and path.is_file() and _ids(path) == ["a"]


def test_a_log_whose_directory_was_deleted_is_not_begun_again(tmp_path):
    directory = tmp_path / "logs"
    path = directory / "trace.jsonl"
    for trace_id in ("a", "b", "c"):
        TraceLog(path).append(_trace(trace_id))  # a new TraceLog per append, as Pipeline.log_trace makes
    shutil.rmtree(directory)
    with pytest.raises(TraceError) as refused:
        TraceLog(path).append(_trace("d"))
    assert isinstance(refused.value, TraceLogReplaced)
    message = str(refused.value)
    assert f"the trace log {path} was removed or replaced since record seq 2 was appended" in message
    assert f"its directory {directory} is gone" in message and "refusing to start a new chain" in message
    assert "sieve trace rotate" in message
    assert not directory.exists()  # nothing recreated
    # the same, said without appending (what the server's readiness probe asks)
    assert TraceLog(path).continuity_problem() == message


def test_a_removed_emptied_cut_or_replaced_log_is_refused(tmp_path):
    path = tmp_path / "trace.jsonl"
    TraceLog(path).append(_trace("a"))
    TraceLog(path).append(_trace("b"))
    kept = path.read_bytes()

    path.unlink()
    with pytest.raises(TraceLogReplaced, match="since record seq 1 was appended \\(the file is gone\\)"):
        TraceLog(path).append(_trace("x"))
    assert not path.exists()
    path.write_bytes(kept)  # put back (a new file, or the freed inode number again: either way, it holds seq 1)
    assert TraceLog(path).append(_trace("c"))["seq"] == 2
    with_c = path.read_bytes()

    os.truncate(path, 0)  # emptied in place
    with pytest.raises(TraceLogReplaced, match="since record seq 2 was appended \\(it was emptied"):
        TraceLog(path).append(_trace("x"))
    assert path.read_bytes() == b""

    path.write_bytes(kept)  # cut back in place to before record seq 2
    with pytest.raises(TraceLogReplaced, match="\\(it was cut back: it ends before where record seq 2 was\\)"):
        TraceLog(path).append(_trace("x"))
    path.write_bytes(with_c)
    assert TraceLog(path).append(_trace("d"))["seq"] == 3

    path.unlink()
    _append_elsewhere(path, "other")  # another process starts a new log there: seq 0, another chain
    with pytest.raises(TraceLogReplaced, match="since record seq 3 was appended") as refused:
        TraceLog(path).append(_trace("x"))
    # a new inode: it does not hold the record; the freed inode number again: the record is not where it was
    assert ("another file is there: it does not hold record seq 3 with hash" in str(refused.value)
            or "it was cut back" in str(refused.value) or "is no longer where it was written" in str(refused.value))
    assert _ids(path) == ["other"]


def test_a_log_put_back_is_appended_to_again(tmp_path):
    directory = tmp_path / "logs"
    path = directory / "trace.jsonl"
    TraceLog(path).append(_trace("a"))
    directory.rename(tmp_path / "logs.moved")  # gone...
    with pytest.raises(TraceLogReplaced):
        TraceLog(path).append(_trace("x"))
    (tmp_path / "logs.moved").rename(directory)  # ... and moved back: the very file
    assert TraceLog(path).continuity_problem() is None
    assert TraceLog(path).append(_trace("b"))["seq"] == 1

    backup = tmp_path / "backup.jsonl"
    shutil.copyfile(path, backup)  # a copy holding the last record
    shutil.rmtree(directory)
    directory.mkdir()  # an empty directory does not make the log usable again
    with pytest.raises(TraceLogReplaced, match="the file is gone"):
        TraceLog(path).append(_trace("x"))
    shutil.copyfile(backup, path)  # restored from the copy: another inode, the same chain
    assert TraceLog(path).append(_trace("c"))["seq"] == 2
    assert _ids(path) == ["a", "b", "c"] and check_log(path).problems == []


def test_an_older_copy_put_back_is_refused(tmp_path):
    path = tmp_path / "trace.jsonl"
    TraceLog(path).append(_trace("a"))
    older = path.read_bytes()
    TraceLog(path).append(_trace("b"))
    path.unlink()
    path.write_bytes(older)  # a backup from before record seq 1
    with pytest.raises(TraceLogReplaced, match="since record seq 1 was appended") as refused:
        TraceLog(path).append(_trace("x"))
    assert ("does not hold record seq 1" in str(refused.value)  # a new inode
            or "it was cut back" in str(refused.value))  # the freed inode number again
    assert path.read_bytes() == older


def test_rotations_and_appends_by_other_processes_are_followed(tmp_path):
    path = tmp_path / "trace.jsonl"
    TraceLog(path).append(_trace("a"))
    _elsewhere("trace", "rotate", path)  # right after this process's record: the marker links to it
    assert TraceLog(path).append(_trace("b"))["seq"] == 2  # seq 1 is the marker
    _append_elsewhere(path, "other1", "other2")  # others append after this process's last record...
    _elsewhere("trace", "rotate", path)  # ... and the log is rotated by another process
    _append_elsewhere(path, "other3")
    _elsewhere("trace", "rotate", path)  # twice: the archive holding seq 2 is two segments back
    record = TraceLog(path).append(_trace("c"))
    check = check_log(path)
    assert check.problems == [] and len(check.segments) == 4
    assert record["seq"] == 8  # a 0, marker 1, b 2, other1 3, other2 4, marker 5, other3 6, marker 7
    assert [i for segment in check.segments for i in _ids(segment)] == ["a", "b", "other1", "other2", "other3", "c"]


def test_a_rotation_whose_archive_was_moved_away_is_followed_by_its_link(tmp_path):
    path = tmp_path / "trace.jsonl"
    TraceLog(path).append(_trace("a"))
    _elsewhere("trace", "rotate", path)
    archive = tmp_path / "trace.000000-000000.jsonl"
    assert archive.is_file()
    archive.rename(tmp_path / "cold-storage.jsonl")  # archived elsewhere at once
    assert TraceLog(path).append(_trace("b"))["seq"] == 2  # the marker links to record seq 0 by its hash


def test_a_writer_whose_record_others_followed_before_a_rotation_goes_on_when_the_archive_is_moved(tmp_path):
    """Two writers on one log (a server and a batch): this one's last record is not the archive's last, and the
    archive is gzipped or moved away after the rotation. The chain goes on past the record (the marker names the
    archive and its seq range; `sieve trace verify` notes the archive missing): no refusal (audit 2, F1)."""
    path = tmp_path / "trace.jsonl"
    TraceLog(path).append(_trace("a"))  # seq 0, this process
    _append_elsewhere(path, "other1", "other2")  # seq 1, 2 by another writer
    _elsewhere("trace", "rotate", path)  # by the other writer: the marker links to seq 2
    _append_elsewhere(path, "other3")
    _elsewhere("trace", "rotate", path)  # twice: this process's record is two segments back
    for archive in sorted(tmp_path.glob("trace.0*.jsonl")):
        archive.rename(tmp_path / f"cold-{archive.name}")  # moved to cold storage
    assert TraceLog(path).continuity_problem() is None
    assert TraceLog(path).append(_trace("b"))["seq"] == 6  # a 0, other1 1, other2 2, marker 3, other3 4, marker 5
    check = check_log(path)
    assert check.problems == [] and check.records == 2 and check.notes  # the marker and b; the archive noted missing


def test_a_refusal_is_judged_again_when_an_archive_it_read_is_put_back(tmp_path):
    """A refusal is remembered (a server asks on every query and every probe), but with every file it read: an
    archive put right is seen without the log itself changing (audit 2, F2)."""
    path = tmp_path / "trace.jsonl"
    TraceLog(path).append(_trace("a"))  # seq 0, in the file that becomes the first archive
    _append_elsewhere(path, "other1")
    _elsewhere("trace", "rotate", path)
    _append_elsewhere(path, "other2")
    _elsewhere("trace", "rotate", path)
    (first,) = [a for a in tmp_path.glob("trace.0*.jsonl") if a.name.startswith("trace.000000-")]
    kept = first.read_bytes()
    first.unlink()
    first.write_bytes(b"")  # another file where the archive holding seq 0 was: not the chain
    with pytest.raises(TraceLogReplaced, match="the segment it continues, does not hold record seq 0"):
        TraceLog(path).append(_trace("x"))
    before = path.stat()
    first.unlink()
    first.write_bytes(kept)  # put back (a copy: another inode, the same records)
    assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_size == before.st_size
    assert TraceLog(path).continuity_problem() is None
    assert check_log(path).problems == [] and TraceLog(path).append(_trace("b"))["seq"] == 5


def test_an_empty_file_in_the_logs_place_is_said_so(tmp_path):
    path = tmp_path / "trace.jsonl"
    TraceLog(path).append(_trace("a"))
    path.rename(tmp_path / "trace.jsonl.1")  # logrotate's `create`: moved, and a new empty file made
    path.write_bytes(b"")
    with pytest.raises(TraceLogReplaced, match="an empty file is there"):
        TraceLog(path).append(_trace("x"))


def test_the_end_of_an_existing_log_is_remembered_before_the_first_append(tmp_path):
    path = tmp_path / "trace.jsonl"
    _append_elsewhere(path, "x", "y")  # a log this process never wrote
    TraceLog(path).check_appendable()  # what sieve batch and sieve serve do at start
    path.unlink()
    with pytest.raises(TraceLogReplaced) as refused:
        TraceLog(path).append(_trace("z"))
    assert "since this process found it ending at record seq 1 (the file is gone)" in str(refused.value)
    TraceLog(path).forget()  # deliberately: a new log
    assert TraceLog(path).append(_trace("z"))["seq"] == 0


@pytest.mark.parametrize("content, says", [
    (b'{"hello": 1}\n', "is not a Sieve trace log"),
    (b'{"schema":"sieve.tracelog/1","seq":0,"prev":"0"}\n', "ends with an unreadable record"),
])
def test_check_appendable_refuses_a_file_that_is_no_usable_log(tmp_path, content, says):
    path = tmp_path / "trace.jsonl"
    path.write_bytes(content)
    with pytest.raises(TraceError, match=says):
        TraceLog(path).check_appendable()
    directory = tmp_path / "dir.jsonl"
    directory.mkdir()
    with pytest.raises(TraceError, match="is a directory"):
        TraceLog(directory).check_appendable()
    TraceLog(tmp_path / "absent.jsonl").check_appendable()  # created by the first append
