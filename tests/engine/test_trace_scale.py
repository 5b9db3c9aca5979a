"""Reading one record of a long log without decoding every record before it (``TraceLog._find_quickly``), and
each record encoded once when it is checked: same answers, same refusals as the full check of the chain."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engine.errors import TraceError
from engine.trace import (GENESIS, TraceLog, check_log, load_trace, load_trace_checked, record_hash, rotate_log,
                          verify_log)


def _trace(i: int) -> dict:
    return {"schema": "sieve.trace/1", "trace_id": f"t{i}", "query": {"text": f"q é {i}"},
            "results": [{"doc_id": str(i), "score": i / 7}], "created_at": f"2026-01-01T00:00:{i % 60:02d}"}


def _fill(path: Path, count: int) -> TraceLog:
    log = TraceLog(path)
    for i in range(count):
        log.append(_trace(i))
    return log


def _no_full_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the fallback to the full check of every line fail the test: the quick walk must answer alone."""
    def refuse(self, trace_id, seq):
        raise AssertionError(f"fell back to the full check of {self.path}")

    monkeypatch.setattr(TraceLog, "_find_checked", refuse)


def test_a_record_of_a_long_log_is_found_without_the_full_check(tmp_path, monkeypatch):
    log = _fill(tmp_path / "log.jsonl", 300)
    _no_full_check(monkeypatch)
    assert log.find(seq=299)["trace_id"] == "t299"
    assert log.find(seq=0)["trace_id"] == "t0"
    assert log.find(seq=150) == _trace(150)
    assert log.find("t233")["query"]["text"] == "q é 233"
    assert log.find()["trace_id"] == "t299"
    record = log.find_record(seq=17)
    assert record["seq"] == 17 and record["hash"] == record_hash(record["prev"], record["trace"])
    trace, source = load_trace_checked(log.path, seq=298)
    assert trace["trace_id"] == "t298" and source.verified and source.seq == 298
    with pytest.raises(TraceError, match="holds no trace with seq 300"):
        log.find(seq=300)
    with pytest.raises(TraceError, match="holds no trace with id nope"):
        log.find("nope")


def test_an_id_that_appears_deeper_in_a_trace_is_not_taken_for_its_id(tmp_path, monkeypatch):
    log = TraceLog(tmp_path / "log.jsonl")
    log.append({"schema": "sieve.trace/1", "trace_id": "a", "stages": [{"trace_id": "b"}]})
    log.append({"schema": "sieve.trace/1", "trace_id": "b"})
    _no_full_check(monkeypatch)
    assert log.find("b") == {"schema": "sieve.trace/1", "trace_id": "b"}


def test_a_tampered_earlier_record_is_still_refused(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 200)
    lines = log.path.read_bytes().splitlines(keepends=True)
    lines[20] = lines[20].replace(b'"doc_id":"20"', b'"doc_id":"99"')
    log.path.write_bytes(b"".join(lines))
    with pytest.raises(TraceError, match=r"seq 199.*chain is broken before it.*line 21 \(seq 20\): content does not "
                                         r"match its hash"):
        load_trace(log.path, seq=199)
    with pytest.raises(TraceError, match="seq 199"):
        load_trace(log.path)  # the latest
    with pytest.raises(TraceError, match="chain is broken before it"):
        load_trace(log.path, trace_id="t150")
    assert load_trace(log.path, seq=19)["trace_id"] == "t19"  # the intact chain before it is usable


def test_a_tampered_record_read_is_refused(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 200)
    lines = log.path.read_bytes().splitlines(keepends=True)
    lines[199] = lines[199].replace(b'"doc_id":"199"', b'"doc_id":"198"')
    log.path.write_bytes(b"".join(lines))
    for selector in ({"seq": 199}, {"trace_id": "t199"}, {}):
        with pytest.raises(TraceError, match=r"seq 199.*does not match its hash: it was edited"):
            load_trace(log.path, **selector)


def test_a_record_read_rewritten_with_its_hash_over_its_new_bytes_is_refused(tmp_path):
    """The record read gets the full check: a line that is not the canonical form is refused even when its hash
    was recomputed over the very bytes it now holds."""
    log = _fill(tmp_path / "log.jsonl", 50)
    lines = log.path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[49])
    body = json.dumps(record["trace"], sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()  # \u00e9
    digest = hashlib.sha256(record["prev"].encode() + body).hexdigest()
    lines[49] = (f'{{"schema":"sieve.tracelog/1","seq":49,"prev":"{record["prev"]}","hash":"{digest}","trace":'
                 .encode() + body + b"}\n")
    log.path.write_bytes(b"".join(lines))
    with pytest.raises(TraceError, match="seq 49.*does not match its hash"):
        load_trace(log.path, seq=49)
    assert any("line 50 (seq 49): content does not match its hash" in p for p in verify_log(log.path)[1])


def test_a_record_read_from_an_archived_segment(tmp_path, monkeypatch):
    log = _fill(tmp_path / "trace.jsonl", 40)
    rotate_log(log.path)
    for i in range(40, 60):
        log.append(_trace(i))
    with monkeypatch.context() as patched:
        _no_full_check(patched)
        record, holder = log.locate_record(seq=12)
        assert record["trace"] == _trace(12) and holder.name == "trace.000000-000039.jsonl"
        assert log.find(seq=60)["trace_id"] == "t59" and log.find()["trace_id"] == "t59"  # the marker is seq 40
        assert log.find("t39")["trace_id"] == "t39"
    with pytest.raises(TraceError, match="seq 40 is the marker that starts the log after a rotation"):
        log.find(seq=40)
    archive = tmp_path / "trace.000000-000039.jsonl"
    lines = archive.read_bytes().splitlines(keepends=True)
    archive.write_bytes(b"".join(lines[:5] + lines[6:]))  # a record cut out of the archive
    with pytest.raises(TraceError, match="trace.000000-000039.jsonl: refusing the record seq 30.*missing or moved"):
        log.find(seq=30)
    assert log.find(seq=45)["trace_id"] == "t44"  # the current segment's chain starts at its marker


# Every way a line can be wrong that the log's tests know of: the quick walk must answer exactly as the full check
# does (the same record, or the same refusal word for word).

def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _recomputed(line: bytes, edit) -> bytes:
    record = json.loads(line)
    edit(record["trace"])
    record["hash"] = record_hash(record["prev"], record["trace"])
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _marker_line(line: bytes) -> bytes:
    record = json.loads(line)
    record["trace"] = {"schema": "sieve.tracelog.segment/1", "rotated_at": "2026-01-01T00:00:00+00:00",
                       "previous": {"file": "x.jsonl", "first_seq": 0, "last_seq": record["seq"] - 1}}
    record["hash"] = record_hash(record["prev"], record["trace"])
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _unsorted_line(line: bytes) -> bytes:
    """Compact, the header layout, the trace's keys in reverse order: its hash still checks out."""
    record = json.loads(line)
    record["trace"] = dict(reversed(list(record["trace"].items())))
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


MUTATIONS = {
    "intact": lambda ls: ls,
    "edited": lambda ls: ls[:2] + [ls[2].replace(b'"doc_id":"2"', b'"doc_id":"7"')] + ls[3:],
    "edited, hash recomputed": lambda ls: ls[:2] + [_recomputed(ls[2], lambda t: t.update(trace_id="x"))] + ls[3:],
    "the target edited, hash recomputed": lambda ls: ls[:5] + [_recomputed(ls[5], lambda t: t.update(q=1))],
    "whitespace": lambda ls: ls[:2] + [ls[2].replace(b'"seq":2,', b'"seq": 2,')] + ls[3:],
    "escaped": lambda ls: ls[:2] + [ls[2].replace(b'"doc_id":"2"', b'"doc_id":"\\u0032"')] + ls[3:],
    "leading zero": lambda ls: ls[:2] + [ls[2].replace(b'"seq":2,', b'"seq":02,')] + ls[3:],
    "duplicated key": lambda ls: ls[:2] + [ls[2].replace(b'"trace":', b'"trace":{"trace_id":"t9"},"trace":', 1)]
    + ls[3:],
    "a key after the trace": lambda ls: ls[:2] + [ls[2][:-2] + b',"note":1}\n'] + ls[3:],
    "trailing space": lambda ls: ls[:2] + [ls[2][:-1] + b" \n"] + ls[3:],
    "CRLF": lambda ls: ls[:2] + [ls[2][:-1] + b"\r\n"] + ls[3:],
    "deleted": lambda ls: ls[:2] + ls[3:],
    "reordered": lambda ls: ls[:2] + [ls[3], ls[2]] + ls[4:],
    "cut from the end": lambda ls: ls[:4],
    "emptied": lambda ls: [],
    "blank lines": lambda ls: [b"\n"] + ls[:3] + [b"  \n"] + ls[3:] + [b"\n"],
    "not a record": lambda ls: ls[:3] + [b'{"schema":"sieve.tracelog/1"}\n'] + ls[3:],
    "not JSON": lambda ls: ls[:3] + [b"garbage\n"] + ls[3:],
    "not UTF-8": lambda ls: ls[:2] + [ls[2].replace(b"\xc3\xa9", b"\xe9")] + ls[3:],
    "torn tail": lambda ls: ls + [ls[5][:40]],
    "last record without its newline": lambda ls: ls[:5] + [ls[5][:-1]],
    "a marker in the middle": lambda ls: ls[:2] + [_marker_line(ls[2])] + ls[3:],
    "a trace that mentions the marker schema": lambda ls: ls[:2] + [_recomputed(
        ls[2], lambda t: t.update(note="sieve.tracelog.segment/1"))] + ls[3:],
    "trace keys not sorted": lambda ls: ls[:2] + [_unsorted_line(ls[2])] + ls[3:],
    "first line not a log": lambda ls: [b'{"_id":"d1","text":"a corpus line"}\n'] + ls,
}
SELECTORS = [{"seq": 0}, {"seq": 2}, {"seq": 4}, {"seq": 5}, {"seq": 9}, {}, {"trace_id": "t1"},
             {"trace_id": "t4"}, {"trace_id": "t5"}, {"trace_id": "nope"}]


def _outcome(call, **selector):
    try:
        return "record", call(selector.get("trace_id"), selector.get("seq"))
    except TraceError as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_quick_walk_answers_as_the_full_check_does(tmp_path, mutation):
    log = _fill(tmp_path / "log.jsonl", 6)
    log.path.write_bytes(b"".join(MUTATIONS[mutation](_lines(log.path))))
    for selector in SELECTORS:
        assert _outcome(log._find_in_segment, **selector) == _outcome(log._find_checked, **selector), selector


def test_a_log_that_is_a_single_trace_or_a_corpus_is_refused_as_such(tmp_path):
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps(_trace(0)) + "\n")
    with pytest.raises(TraceError, match="is a single trace"):
        TraceLog(single).find(seq=0)


# Encoding once per check: the verdicts of ``check_log`` on lines in every layout.

def test_verify_accepts_the_layouts_it_accepted_and_refuses_the_rest(tmp_path):
    log = _fill(tmp_path / "log.jsonl", 4)
    lines = _lines(log.path)
    # the header layout with the trace's keys in another order, and an earlier writer's whole-record dump: the
    # hash is over the canonical (sorted) trace, the line is its own writer form
    legacy = json.loads(lines[3])
    legacy = {key: legacy[key] for key in ("trace", "hash", "prev", "seq", "schema")}
    log.path.write_bytes(b"".join(lines[:1] + [_unsorted_line(lines[1]), lines[2],
                                               json.dumps(legacy, separators=(",", ":"), ensure_ascii=False)
                                               .encode() + b"\n"]))
    assert verify_log(log.path) == (4, [])
    assert log.find(seq=1) == _trace(1) and log.find() == _trace(3)
    log.path.write_bytes(b"".join(lines[:1] + [lines[1].replace(b'"score":', b'"score": ')] + lines[2:]))
    column = lines[1].index(b'"score":') + len(b'"score":') + 1
    assert verify_log(log.path)[1] == [
        f"line 2 (seq 1): not in the canonical form the log's writer produces (it differs at column {column}: "
        "whitespace, escapes or number forms): the line was rewritten after it was logged"]


def test_a_whole_chain_forged_from_genesis_is_what_an_anchored_head_catches(tmp_path):
    """Neither the full check nor the quick walk can tell a chain rewritten from its first record on (what the
    README says): the anchor does."""
    log = _fill(tmp_path / "log.jsonl", 5)
    assert check_log(log.path).problems == []
    anchored = TraceLog(log.path).find_record()["hash"]
    forged = TraceLog(tmp_path / "forged.jsonl")
    for i in range(5):
        forged.append({**_trace(i), "trace_id": f"f{i}"} if i == 2 else _trace(i))
    assert forged.find(seq=4)["trace_id"] == "t4"
    assert check_log(forged.path, expect_head=anchored).problems != []
    assert forged.find_record(seq=0)["prev"] == GENESIS
