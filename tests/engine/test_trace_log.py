"""The trace log is hash-chained: edits, deletions and reorderings are detected."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import TraceError
from engine.trace import TraceLog, TraceLogReplaced, load_trace, verify_log

ROOT = Path(__file__).resolve().parents[2]


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


def test_cli_verify_json_for_a_monitor(tmp_path):
    """`trace verify --json`: the verdict a cron job or monitor reads, with the same exit status."""
    log = _fill(tmp_path / "log.jsonl")
    ok = CliRunner().invoke(app, ["trace", "verify", str(log.path), "--json", "--expect-count", "3"])
    verdict = json.loads(ok.stdout)
    assert ok.exit_code == 0 and verdict["intact"] and verdict["records"] == 3 and verdict["anchored"]
    assert verdict["problems"] == [] and verdict["segments"] == [str(log.path)]
    log.path.write_text(log.path.read_text().replace('"t1"', '"tX"'))
    bad = CliRunner().invoke(app, ["trace", "verify", str(log.path), "--json"])
    verdict = json.loads(bad.stdout)
    assert bad.exit_code == 1 and not verdict["intact"] and "seq 1" in verdict["problems"][0], verdict


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
    # the first writer dumped the whole record, compact (its keys in their own order)
    path.write_text(json.dumps(legacy, separators=(",", ":"), ensure_ascii=False) + "\n", encoding="utf-8")
    log = TraceLog(path)
    record = log.append({"schema": "sieve.trace/1", "query": "q1"})
    assert record["seq"] == 1 and record["prev"] == legacy["hash"]
    assert record["hash"] == record_hash(legacy["hash"], record["trace"])
    second = log.append({"schema": "sieve.trace/1", "query": "q2"})
    assert second["seq"] == 2 and second["prev"] == record["hash"]
    assert verify_log(path) == (3, [])


# ---------------------------------------------------------------------------- audit findings

def _run_sieve(*args: object) -> subprocess.CompletedProcess[str]:
    """The real entry point (main() maps SieveErrors to exit 2, bugs to exit 70)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SIEVE_DEBUG": ""}
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def _trace(trace_id: str) -> dict:
    return {"schema": "sieve.trace/1", "trace_id": trace_id, "results": [{"doc_id": trace_id}]}


def _ids(log: TraceLog) -> list[str]:
    return [record["trace"]["trace_id"] for record in log.records()]


# 1. a failed append leaves no half-written record behind


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failure", ["write", "fsync"])
def test_a_failed_append_is_rolled_back(tmp_path, monkeypatch, failure):
    log = _fill(tmp_path / "log.jsonl", 2)
    before = log.path.read_bytes()
    real_write, real_fsync = os.write, os.fsync
    fsync_failed = []

    def write(fd, data):  # the disk fills up half-way through the record
        data = bytes(data)
        if b"doomed" in data:
            real_write(fd, data[: len(data) // 2])
            raise _enospc()
        return real_write(fd, data)

    def fsync(fd):  # the data reached the file, the fsync fails (ENOSPC on a delayed allocation)
        if not fsync_failed and os.fstat(fd).st_size > len(before):
            fsync_failed.append(fd)
            raise _enospc()
        return real_fsync(fd)

    monkeypatch.setattr(os, failure, write if failure == "write" else fsync)
    with pytest.raises(OSError) as raised:
        log.append(_trace("doomed"))
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert log.path.read_bytes() == before  # truncated back to where the record started
    assert verify_log(log.path) == (2, [])
    assert _ids(log) == ["t0", "t1"]
    assert not list(tmp_path.glob("log.jsonl.torn-*"))  # nothing torn was left to set aside
    assert log.append(_trace("next"))["seq"] == 2
    assert verify_log(log.path) == (3, [])


def test_a_write_cut_short_by_the_kernel_is_rolled_back(tmp_path):
    """A real partial write(2): RLIMIT_FSIZE lets the kernel write up to the limit, then fail (EFBIG)."""
    log = _fill(tmp_path / "log.jsonl", 2)
    before = log.path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 40, hard))
        with pytest.raises(OSError) as raised:
            log.append({**_trace("doomed"), "padding": "x" * 4000})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert raised.value.errno == errno.EFBIG
    assert log.path.read_bytes() == before
    assert verify_log(log.path) == (2, [])


# 2. set-aside files never overwrite each other


def test_set_aside_never_overwrites_an_earlier_set_aside(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 2)
    offset = log.path.stat().st_size
    earlier = tmp_path / f"log.jsonl.torn-{offset}"
    earlier.write_bytes(b"bytes set aside by an earlier crash at the same offset")
    with open(log.path, "ab") as handle:
        handle.write(b'{"schema": "sieve.tracelog/1", "seq": 2, "pr')
    log.append(_trace("after"))
    assert earlier.read_bytes() == b"bytes set aside by an earlier crash at the same offset"
    aside = sorted(tmp_path.glob("log.jsonl.torn-*"))
    assert len(aside) == 2
    assert {p.read_bytes() for p in aside} == {earlier.read_bytes(), b'{"schema": "sieve.tracelog/1", "seq": 2, "pr'}
    assert verify_log(log.path) == (3, [])


def test_two_crashes_at_one_offset_keep_both_torn_tails(tmp_path, monkeypatch):
    """Crash, an append that fails (disk full) after setting the torn tail aside, crash again at the same offset."""
    log = _fill(tmp_path / "log.jsonl", 1)
    with open(log.path, "ab") as handle:
        handle.write(b"first torn tail")
    real_write = os.write

    def write(fd, data):
        if b"doomed" in bytes(data):
            raise _enospc()
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError):
        log.append(_trace("doomed"))
    monkeypatch.undo()
    with open(log.path, "ab") as handle:
        handle.write(b"second torn tail")
    log.append(_trace("after"))
    aside = sorted(p.read_bytes() for p in tmp_path.glob("log.jsonl.torn-*"))
    assert aside == [b"first torn tail", b"second torn tail"]
    assert _ids(log) == ["t0", "after"] and verify_log(log.path) == (2, [])


# 3. a complete last record without its newline stays in the chain; verify lists set-aside files


@pytest.mark.parametrize("count", [1, 3])
def test_a_complete_last_record_without_its_newline_is_kept(tmp_path, count):
    log = _fill(tmp_path / "log.jsonl", count)
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-1])  # the writer died between the record and its "\n"
    last = json.loads(data.splitlines()[-1])
    record = log.append(_trace("after"))
    assert record["seq"] == count and record["prev"] == last["hash"]
    assert not list(tmp_path.glob("log.jsonl.torn-*"))
    assert verify_log(log.path) == (count + 1, [])
    assert _ids(log) == [f"t{i}" for i in range(count)] + ["after"]
    assert log.path.read_bytes().startswith(data)


def test_an_unterminated_last_line_that_does_not_check_out_is_set_aside(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 2)
    data = log.path.read_bytes()
    forged = data[:-1].replace(b'"doc_id":"1"', b'"doc_id":"9"')  # complete JSON, edited: not a valid record
    assert forged != data[:-1]
    log.path.write_bytes(forged)
    record = log.append(_trace("after"))
    assert record["seq"] == 1
    aside = list(tmp_path.glob("log.jsonl.torn-*"))
    assert len(aside) == 1 and b'"doc_id":"9"' in aside[0].read_bytes()
    assert verify_log(log.path) == (2, [])


def test_verify_lists_set_aside_files(tmp_path):
    from engine.trace import check_log

    log = _fill(tmp_path / "log.jsonl", 2)
    assert check_log(log.path).warnings == []
    with open(log.path, "ab") as handle:
        handle.write(b'{"schema": "sieve.tracelog/1", "seq": 2, "pr')
    log.append(_trace("after"))
    check = check_log(log.path)
    assert (check.records, check.problems) == (3, [])
    [aside] = tmp_path.glob("log.jsonl.torn-*")
    assert check.set_aside == [aside]
    assert len(check.warnings) == 1 and aside.name in check.warnings[0] and "set aside" in check.warnings[0]


# 4. replay and report refuse a record that does not match its hash


def _edit(path: Path, line: int, old: bytes, new: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    assert old in lines[line]
    lines[line] = lines[line].replace(old, new, 1)
    path.write_bytes(b"".join(lines))


def test_an_edited_record_is_refused_when_read(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 3)
    _edit(log.path, 1, b'"doc_id":"1"', b'"doc_id":"7"')  # one character changed
    for selector in ({"seq": 1}, {"trace_id": "t1"}):
        with pytest.raises(TraceError) as raised:
            load_trace(log.path, **selector)
        message = str(raised.value)
        assert "seq 1" in message and "does not match its hash" in message and "sieve trace verify" in message
    with pytest.raises(TraceError, match="seq 1"):  # the latest record sits on a broken chain
        load_trace(log.path)
    with pytest.raises(TraceError, match=r"seq 2.*chain is broken"):
        load_trace(log.path, seq=2)
    assert load_trace(log.path, seq=0)["trace_id"] == "t0"  # the intact chain before the edit is usable


def test_an_edited_record_with_its_hash_recomputed_does_not_link(tmp_path):
    from engine.trace import record_hash

    log = _fill(tmp_path / "log.jsonl", 3)
    lines = log.path.read_text().splitlines()
    record = json.loads(lines[1])
    record["trace"]["results"][0]["doc_id"] = "forged"
    record["hash"] = record_hash(record["prev"], record["trace"])
    lines[1] = json.dumps(record, separators=(",", ":"), ensure_ascii=False)  # as the writer writes it
    log.path.write_text("\n".join(lines) + "\n")
    assert load_trace(log.path, seq=1)["results"][0]["doc_id"] == "forged"  # its own link and hash check out
    with pytest.raises(TraceError, match=r"seq 2.*does not link"):  # but the next record no longer links to it
        load_trace(log.path, seq=2)


def test_a_single_log_record_file_is_checked_against_its_hash(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 1)
    single = tmp_path / "record.json"
    single.write_bytes(log.path.read_bytes().strip())
    assert load_trace(single)["trace_id"] == "t0"
    single.write_bytes(single.read_bytes().replace(b'"doc_id":"0"', b'"doc_id":"5"'))
    with pytest.raises(TraceError, match="does not match its hash"):
        load_trace(single)


def test_report_and_replay_refuse_an_edited_record(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 2)
    _edit(log.path, 0, b'"doc_id":"0"', b'"doc_id":"8"')
    commands = (["report", log.path, "--html", tmp_path / "r.html", "--seq", "0"], ["replay", log.path, "--seq", "0"])
    for command in commands:
        result = CliRunner().invoke(app, [str(a) for a in command])
        assert isinstance(result.exception, TraceError), (result.output, result.exception)
        assert "seq 0" in str(result.exception) and "does not match its hash" in str(result.exception)
    assert not (tmp_path / "r.html").exists()
    done = _run_sieve("report", log.path, "--html", tmp_path / "r.html", "--seq", "0")
    assert done.returncode == 2 and "does not match its hash" in done.stderr, done.stderr


# 5. valid JSON that is not a record is a broken record, not a crash


NOT_RECORDS = [
    b"42\n",
    b'{"schema": "sieve.tracelog/1", "seq": 2, "prev": 123, "hash": "' + b"a" * 64 + b'", "trace": {}}\n',
    b'{"schema": "sieve.tracelog/1", "seq": 2, "prev": "' + b"a" * 64 + b'", "hash": "' + b"b" * 64
    + b'", "trace": ["not", "an", "object"]}\n',
    b'{"schema": "sieve.tracelog/1", "seq": "2", "prev": "' + b"a" * 64 + b'", "hash": 5, "trace": {}}\n',
    b"[]\n",
    b"null\n",
]


@pytest.mark.parametrize("line", NOT_RECORDS)
def test_a_line_that_is_not_a_record_breaks_the_chain_at_its_line(tmp_path, line):
    log = _fill(tmp_path / "log.jsonl", 2)
    with open(log.path, "ab") as handle:
        handle.write(line)
    log.path.write_bytes(log.path.read_bytes() + _record_after(log.path.read_bytes().splitlines()[1], 3))
    count, problems = verify_log(log.path)
    assert problems and any(p.startswith("line 3") for p in problems), problems
    assert load_trace(log.path, seq=1)["trace_id"] == "t1"
    with pytest.raises(TraceError, match=r"line 3"):
        load_trace(log.path, seq=3)
    with pytest.raises(TraceError, match=r"line 3"):
        load_trace(log.path)
    result = CliRunner().invoke(app, ["trace", "verify", str(log.path)])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    assert "line 3" in result.output


def _record_after(previous_line: bytes, seq: int) -> bytes:
    from engine.trace import LOG_SCHEMA, record_hash

    previous = json.loads(previous_line)
    trace = _trace(f"t{seq}")
    record = {"schema": LOG_SCHEMA, "seq": seq, "prev": previous["hash"], "hash": "", "trace": trace}
    record["hash"] = record_hash(previous["hash"], trace)
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


@pytest.mark.parametrize("line", NOT_RECORDS[:4])
def test_appending_after_a_last_line_that_is_not_a_record_is_a_trace_error(tmp_path, line):
    log = _fill(tmp_path / "log.jsonl", 1)
    with open(log.path, "ab") as handle:
        handle.write(line)
    before = log.path.read_bytes()
    with pytest.raises(TraceError, match="unreadable record"):
        log.append(_trace("after"))
    assert log.path.read_bytes() == before


def test_cli_on_a_line_that_is_not_a_record_is_not_an_internal_error(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 2)
    with open(log.path, "ab") as handle:
        handle.write(NOT_RECORDS[1])
    verify = _run_sieve("trace", "verify", log.path)
    assert verify.returncode == 1 and "line 3" in verify.stderr and "internal error" not in verify.stderr
    report = _run_sieve("report", log.path, "--html", tmp_path / "r.html")
    assert report.returncode == 2 and "line 3" in report.stderr and "internal error" not in report.stderr


# 6. bytes that are not UTF-8


def test_a_line_that_is_not_utf8_is_a_broken_record(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 2)
    with open(log.path, "ab") as handle:
        handle.write(b'{"schema": "sieve.tracelog/1", "seq": 2, "trace": "\xff\xfe\x00"}\n')
    count, problems = verify_log(log.path)
    assert any("line 3 is not UTF-8 text" in p for p in problems), problems
    with pytest.raises(TraceError, match="line 3 is not UTF-8 text"):
        load_trace(log.path)


def test_a_binary_file_is_not_utf8_text(tmp_path):
    binary = b"\x89PNG\r\n\x1a\n" + bytes(range(255, -1, -1)) * 64  # a PNG header, then bytes that are not UTF-8
    log = tmp_path / "binary.jsonl"
    log.write_bytes(binary)
    with pytest.raises(TraceError, match="is not a Sieve trace log \\(line 1 is not UTF-8 text"):
        verify_log(log)  # no line is a record: another file than a log (a binary file), not a damaged log
    with pytest.raises(TraceError, match="not UTF-8 text"):
        load_trace(log)
    standalone = tmp_path / "binary.json"
    standalone.write_bytes(binary)
    with pytest.raises(TraceError, match="not UTF-8 text"):
        load_trace(standalone)
    for path in (log, standalone):
        done = _run_sieve("report", path, "--html", tmp_path / "r.html")
        assert done.returncode == 2 and "not UTF-8 text" in done.stderr, done.stderr
    verify = _run_sieve("trace", "verify", log)
    assert verify.returncode == 2 and "not UTF-8 text" in verify.stderr, verify.stderr
    # a log whose records are followed by binary bytes is a damaged log: a negative verdict that does not flood
    genuine = _fill(tmp_path / "damaged.jsonl", 2)
    with genuine.path.open("ab") as handle:
        handle.write(binary)
    count, problems = verify_log(genuine.path)
    assert count > 2 and any("is not UTF-8 text" in p for p in problems) and len(problems) <= 101


# 7. verify on what is not a trace log at all


def test_verify_a_missing_path_or_a_directory(tmp_path):
    with pytest.raises(TraceError, match="trace log not found"):
        verify_log(tmp_path / "missing.jsonl")
    with pytest.raises(TraceError, match="is a directory, not a trace log"):
        verify_log(tmp_path)
    with pytest.raises(TraceError, match="is a directory"):
        load_trace(tmp_path)
    missing = _run_sieve("trace", "verify", tmp_path / "missing.jsonl")
    assert missing.returncode == 2 and "trace log not found" in missing.stderr and "✗" not in missing.stderr
    directory = _run_sieve("trace", "verify", tmp_path)
    assert directory.returncode == 2 and "is a directory, not a trace log" in directory.stderr


def test_verify_a_jsonl_file_that_is_not_a_trace_log(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "title": "t", "text": "x"}) + "\n" for i in range(5)))
    with pytest.raises(TraceError) as raised:
        verify_log(corpus)
    assert str(raised.value) == f"{corpus} is not a Sieve trace log (line 1 has no seq/prev/hash)"
    with pytest.raises(TraceError, match="not a Sieve trace log"):
        load_trace(corpus)
    with pytest.raises(TraceError, match="not a Sieve trace log"):
        TraceLog(corpus).append(_trace("x"))
    assert corpus.read_text().count("\n") == 5


def test_a_string_that_is_not_valid_unicode_is_a_broken_record_not_a_crash(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 1)
    previous = json.loads(log.path.read_text())["hash"]
    with open(log.path, "a") as handle:  # a \ud800 escape: valid JSON, but no UTF-8 can encode it
        handle.write(json.dumps({"schema": "sieve.tracelog/1", "seq": 1, "prev": previous, "hash": "c" * 64,
                                 "trace": {"schema": "sieve.trace/1", "trace_id": "\ud800"}}) + "\n")
    count, problems = verify_log(log.path)
    assert count == 2 and problems == ["line 2 (seq 1): content cannot be hashed (text that is not valid Unicode)"]
    with pytest.raises(TraceError, match="seq 1.*does not match its hash"):
        load_trace(log.path)


# the concurrency guarantee still holds


def _append_many(path: str, worker: int) -> None:
    log = TraceLog(path)
    for i in range(25):
        log.append(_trace(f"w{worker}-{i}"))


def test_concurrent_appends_from_several_processes_form_one_chain(tmp_path):
    import multiprocessing

    log = _fill(tmp_path / "log.jsonl", 1)
    with open(log.path, "ab") as handle:
        handle.write(b'{"schema": "sieve.tracelog/1", "seq": 1, "pr')  # a torn tail the first writer sets aside
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(log.path), w)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert verify_log(log.path) == (101, [])
    assert sorted(_ids(log)[1:]) == sorted(f"w{w}-{i}" for w in range(4) for i in range(25))
    assert len(list(tmp_path.glob("log.jsonl.torn-*"))) == 1


def test_an_append_after_trailing_blank_lines_continues_the_chain(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 2)
    with open(log.path, "ab") as handle:
        handle.write(b"\n  \n")
    assert log.append(_trace("after"))["seq"] == 2
    assert verify_log(log.path) == (3, [])


def test_cli_verify_warns_about_set_aside_files(tmp_path):
    log = tmp_path / "log.jsonl"
    TraceLog(log).append({"trace_id": "a" * 32})
    with open(log, "ab") as handle:
        handle.write(b'{"schema": "sieve.tracelog/1", "seq": 1, "pr')  # a writer died mid-record
    TraceLog(log).append({"trace_id": "b" * 32})  # sets the torn bytes aside
    done = subprocess.run([str(Path(sys.executable).with_name("sieve")), "trace", "verify", str(log)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "2 records, chain intact" in done.stdout
    assert "warning:" in done.stderr and "log.jsonl.torn-" in done.stderr


def test_write_json_atomic_leaves_nothing_behind_when_it_fails(tmp_path):
    from engine.trace import write_json_atomic

    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        write_json_atomic(tmp_path / "taken", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# ---------------------------------------------------------------------------- second audit


# 4. records cut from the end: an anchored head shows them


def test_records_cut_from_the_end_fail_against_an_anchored_head(tmp_path):
    from engine.trace import check_log, log_head

    log = _fill(tmp_path / "log.jsonl", 4)
    head = log_head(log.path)
    assert (head.records, head.seq) == (4, 3) and head.hash == json.loads(log.path.read_text().splitlines()[-1])["hash"]
    assert check_log(log.path, expect_head=head.hash, expect_count=4).problems == []
    full = log.path.read_bytes()
    log.append(_trace("later"))  # a later append is fine: the anchored record is still there at its seq
    assert check_log(log.path, expect_head=head.hash, expect_count=4).problems == []
    assert check_log(log.path, expect_head=head.hash).problems == []

    log.path.write_bytes(b"".join(full.splitlines(keepends=True)[:3]))  # the last record cut off
    assert verify_log(log.path) == (3, [])  # the chain alone cannot tell
    [problem] = check_log(log.path, expect_head=head.hash).problems
    assert "no record has the anchored hash" in problem
    [problem] = check_log(log.path, expect_count=4).problems
    assert "holds 3 records, the anchor says 4" in problem
    # this process appended the record cut off: it refuses to go on from the shorter chain
    with pytest.raises(TraceLogReplaced, match="since record seq 4 was appended \\(it was cut back"):
        log.append(_trace("replacement"))
    log.forget()  # a writer that never saw it (another process) cannot tell
    log.append(_trace("replacement"))  # cut and appended again: as many records, another last hash
    [problem] = check_log(log.path, expect_head=head.hash, expect_count=4).problems
    assert "the record at seq 3 has hash" in problem

    log.path.write_bytes(b"")  # an emptied log
    assert verify_log(log.path) == (0, [])
    assert check_log(log.path, expect_head=head.hash, expect_count=4).problems


def test_cli_trace_head_and_verify_expect_head(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 3)
    head = CliRunner().invoke(app, ["trace", "head", str(log.path), "--json"])
    assert head.exit_code == 0, head.output
    anchor = json.loads(head.stdout)
    assert anchor["records"] == 3 and anchor["seq"] == 2 and len(anchor["hash"]) == 64
    args = ["trace", "verify", str(log.path), "--expect-head", anchor["hash"], "--expect-count", "3"]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0 and "the anchored head is present" in ok.output
    log.path.write_bytes(b"".join(log.path.read_bytes().splitlines(keepends=True)[:2]))
    cut = _run_sieve(*args)
    assert cut.returncode == 1 and "records were removed from the log's end" in cut.stderr, cut.stderr
    plain = _run_sieve("trace", "verify", log.path)  # without an anchor: intact, and it says what it cannot see
    assert plain.returncode == 0 and "cannot be seen in the chain" in plain.stdout
    bad = _run_sieve("trace", "verify", log.path, "--expect-head", "nothex")
    assert bad.returncode == 2 and "64 hex digits" in bad.stderr
    help_text = _run_sieve("trace", "verify", "--help").stdout
    assert "detects edited, removed or reordered records." not in help_text and "--expect-head" in help_text


# 6. a single trace handed to verify


def test_verify_on_a_single_trace_file_says_what_it_is(tmp_path):
    from engine.trace import write_json_atomic

    single = tmp_path / "trace.json"
    write_json_atomic(single, {"schema": "sieve.trace/1", "trace_id": "t", "stages": [], "results": [
        {"doc_id": str(i)} for i in range(50)]})
    done = _run_sieve("trace", "verify", single)
    assert done.returncode == 2, done.stderr
    assert "is a single trace (sieve search --trace-out), not a log; use sieve replay / sieve report" in done.stderr
    assert "unreadable record" not in done.stderr and done.stderr.count("\n") <= 2
    compact = tmp_path / "compact.jsonl"
    compact.write_text(json.dumps({"schema": "sieve.trace/1", "trace_id": "t"}) + "\n")
    with pytest.raises(TraceError, match="is a single trace"):
        verify_log(compact)


def test_a_text_file_is_no_trace_log_not_a_damaged_one(tmp_path):
    """A --log or verify pointed at a plain text file (a wrong path) is bad input (exit 2, 'not a Sieve trace
    log'), as another tool's JSON lines are, not a log with a damaged record (exit 1 reads as tampering)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello world\nsecond line\n")
    done = _run_sieve("trace", "verify", notes)
    assert done.returncode == 2 and "is not a Sieve trace log (line 1: unreadable record" in done.stderr, done.stderr
    with pytest.raises(TraceError, match="is not a Sieve trace log \\(its last line: unreadable record"):
        TraceLog(notes).append(_trace("t"))
    assert notes.read_text() == "hello world\nsecond line\n"
    # a log whose records are damaged is still one: a negative verdict, exit 1
    log = _fill(tmp_path / "log.jsonl", 3)
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"garbage\n" + b"".join(lines[1:-1]) + b"more garbage\n")
    done = _run_sieve("trace", "verify", log.path)
    assert done.returncode == 1 and "line 1: unreadable record" in done.stderr, done.stderr
    log.forget()  # as a process that never appended to it
    with pytest.raises(TraceError, match="ends with an unreadable record"):
        log.append(_trace("t"))
    # however long its damaged first record (review of the change: the schema was looked for in the first MiB only)
    from engine.trace import GENESIS, _record_line

    big, _ = _record_line(GENESIS, 0, {"trace_id": "big", "results": [{"doc_id": "d", "pad": "x" * 2_000_000}]})
    _, first_line = _record_line(GENESIS, 0, big["trace"])
    _, second_line = _record_line(big["hash"], 1, _trace("next"))
    log.path.write_bytes(b"X" + first_line[1:] + second_line)
    done = _run_sieve("trace", "verify", log.path)
    assert done.returncode == 1 and "line 1: unreadable record" in done.stderr, done.stderr


# 7. a line must be the writer's canonical serialisation


def test_a_duplicated_key_or_a_non_canonical_line_is_refused(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 3)
    lines = log.path.read_bytes().splitlines(keepends=True)
    # a forged "trace" first, the genuine one after it: a JSON reader keeps the last, a person reads the first
    forged = lines[1].replace(b'"trace":', b'"trace":{"schema":"sieve.trace/1","trace_id":"forged"},"trace":', 1)
    log.path.write_bytes(lines[0] + forged + lines[2])
    _, problems = verify_log(log.path)
    assert problems == ["line 2 (seq 1): the key 'trace' appears twice in one object (readers disagree on which one "
                        "counts)"]
    with pytest.raises(TraceError, match="line 2.*appears twice"):
        load_trace(log.path, seq=1)

    spaced = lines[1].replace(b'"seq":1,', b'"seq": 1,', 1)  # same value, other whitespace
    log.path.write_bytes(lines[0] + spaced + lines[2])
    _, problems = verify_log(log.path)
    assert len(problems) == 1 and problems[0].startswith("line 2 (seq 1): not in the canonical form")
    escaped = lines[1].replace(b'"doc_id":"1"', b'"doc_id":"\\u0031"', 1)  # the same string, escaped
    log.path.write_bytes(lines[0] + escaped + lines[2])
    _, problems = verify_log(log.path)
    assert len(problems) == 1 and "not in the canonical form" in problems[0]
    with pytest.raises(TraceError, match="seq 1.*not as the log's writer wrote it"):
        load_trace(log.path, seq=1)
    log.path.write_bytes(b"".join(lines))
    assert verify_log(log.path) == (3, [])
