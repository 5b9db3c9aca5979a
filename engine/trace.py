"""Per-query traces and the tamper-evident trace log.

A trace is one JSON document per query (schema ``sieve.trace/1``): what ran, with which config,
index and models, every stage's output scores, drops with reasons and decisions, and for every
returned document an explanation tree. The log is JSONL where each record carries the hash of
the previous one, so any edit, deletion or reordering is detected by ``verify_log``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.errors import TraceError

TRACE_SCHEMA = "sieve.trace/1"
LOG_SCHEMA = "sieve.tracelog/1"
GENESIS = "0" * 64
_HEADER = re.compile(
    rb'^\{"schema":"sieve\.tracelog/1","seq":(?P<seq>\d+),"prev":"[0-9a-f]{64}","hash":"(?P<hash>[0-9a-f]{64})",'
)


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_hash(prev_hash: str, trace: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(trace)).hexdigest()


def _last_line(handle: Any) -> tuple[bytes, int]:
    """The last line of a file opened 'rb+' and the offset where it starts (reads backwards)."""
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    if end == 0:
        return b"", 0
    position = end
    buffer = b""
    while position > 0:
        step = min(65536, position)
        position -= step
        handle.seek(position)
        buffer = handle.read(step) + buffer
        newline = buffer.rfind(b"\n", 0, len(buffer) - 1)
        if newline != -1:
            start = position + newline + 1
            return buffer[newline + 1 :], start
    return buffer, 0


class TraceLog:
    """Append-only, hash-chained JSONL log of traces. Safe for several processes (flock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, trace: dict[str, Any]) -> dict[str, Any]:
        """Append one trace; returns the record written (seq, prev, hash, trace)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        with os.fdopen(fd, "rb+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                last, start = _last_line(handle)
                prev_hash, seq = GENESIS, 0
                if last and not last.endswith(b"\n"):
                    # A writer died mid-record: move the torn bytes aside, keep the chain intact.
                    handle.seek(start)
                    torn = handle.read()
                    aside = self.path.with_name(f"{self.path.name}.torn-{start}")
                    aside.write_bytes(torn)
                    handle.truncate(start)
                    handle.flush()
                    os.fsync(handle.fileno())
                    last, start = _last_line(handle)
                if last.strip():
                    prev_hash, seq = self._chain_position(last)
                body = canonical(trace)
                digest = hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()
                record = {"schema": LOG_SCHEMA, "seq": seq, "prev": prev_hash, "hash": digest, "trace": trace}
                # The header fields first, then the trace exactly as hashed: encoded once, and the
                # next append reads the chain position from the line's first bytes.
                header = json.dumps({k: record[k] for k in ("schema", "seq", "prev", "hash")}, separators=(",", ":"))
                line = header[:-1].encode("ascii") + b',"trace":' + body + b"}\n"
                handle.seek(0, os.SEEK_END)
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
                return record
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _chain_position(self, last: bytes) -> tuple[str, int]:
        """(hash, next seq) from the log's last record, read from its header when it has one."""
        found = _HEADER.match(last)
        if found is not None:
            return found.group("hash").decode("ascii"), int(found.group("seq")) + 1
        try:  # records written before headers came first, or by another writer
            previous = json.loads(last)
            return previous["hash"], previous["seq"] + 1
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TraceError(
                f"trace log {self.path} ends with an unreadable record ({exc}); run `sieve trace verify` on it"
            ) from None

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.path.is_file():
            raise TraceError(f"trace log not found: {self.path}")
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{self.path}:{number}: unreadable record ({exc.msg})") from None

    def find(self, trace_id: str | None = None, seq: int | None = None) -> dict[str, Any]:
        """A trace by id or sequence number; the most recent one when neither is given."""
        found = None
        for record in self.records():
            trace = record.get("trace", {})
            if trace_id is not None and trace.get("trace_id") == trace_id:
                return trace
            if seq is not None and record.get("seq") == seq:
                return trace
            found = trace
        if trace_id is not None or seq is not None or found is None:
            wanted = f"id {trace_id}" if trace_id is not None else f"seq {seq}" if seq is not None else "any trace"
            raise TraceError(f"{self.path} holds no trace with {wanted}")
        return found


def verify_log(path: str | Path) -> tuple[int, list[str]]:
    """Check every record's hash and link; returns (records checked, problems found)."""
    problems: list[str] = []
    prev_hash, expected_seq, count = GENESIS, 0, 0
    log = TraceLog(path)
    try:
        for record in log.records():
            count += 1
            seq = record.get("seq")
            if seq != expected_seq:
                problems.append(f"record {count}: sequence {seq}, expected {expected_seq} (a record is missing or moved)")
            if record.get("prev") != prev_hash:
                problems.append(f"record {count} (seq {seq}): does not link to the previous record")
            actual = record_hash(record.get("prev", ""), record.get("trace", {}))
            if record.get("hash") != actual:
                problems.append(f"record {count} (seq {seq}): content does not match its hash (edited)")
            prev_hash = record.get("hash", "")
            expected_seq = (seq if isinstance(seq, int) else expected_seq) + 1
    except TraceError as exc:
        problems.append(str(exc))
    return count, problems


def load_trace(path: str | Path, trace_id: str | None = None, seq: int | None = None) -> dict[str, Any]:
    """A trace from a ``.json`` trace file or from a trace log (``.jsonl``)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace not found: {path}")
    if path.suffix == ".jsonl":
        return TraceLog(path).find(trace_id, seq)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path} is not a readable trace: {exc}") from None
    if isinstance(data, dict) and data.get("schema") == LOG_SCHEMA:
        data = data.get("trace", {})
    if not isinstance(data, dict) or data.get("schema") != TRACE_SCHEMA:
        raise TraceError(f"{path} is not a Sieve trace (expected schema {TRACE_SCHEMA})")
    return data


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
