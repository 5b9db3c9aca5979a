"""Per-query traces and the tamper-evident trace log.

A trace is one JSON document per query (schema ``sieve.trace/1``): what ran, with which config,
index and models, every stage's output scores, drops with reasons and decisions, and for every
returned document an explanation tree. The log is JSONL where each record carries the hash of
the previous one, so an edit, a reordering or a deletion before the last record is detected by ``verify_log``;
every line must be the writer's canonical serialisation (no duplicated key, no other spelling of the same
value). Records cut from the end (or an emptied log) leave a chain that still links up: ``log_head`` gives the
record count and last hash to anchor outside the log, and ``check_log(expect_head=..., expect_count=...)``
checks that the anchored record is still there.

Crash safety: an append that fails while writing (a full disk, an I/O error) truncates the log back to
where its record started before raising. A writer that died mid-record leaves a torn last line; the next
append copies it to a new ``LOG.torn-<offset>`` file (``-1``, ``-2``… when that name is taken: an earlier
set-aside is never overwritten) and cuts it off; ``check_log`` lists those files. A last record that is
whole and checks out but lacks its newline is kept: the next append completes the line and chains after it.
Reading a record (``TraceLog.find``, ``load_trace``) checks it and the chain up to it: an edited record is
refused, never returned as genuine. The records before it are checked as the writer's bytes (layout, seq, link, and
the sha256 of ``prev`` and the line's trace bytes) without decoding them; the record read is checked in full, and a
log with any other line is read with the full check (``TraceLog._find_quickly``).

Rotation (``rotate_log``): the log's records move to an archived segment beside it and the log starts again
with a segment marker, a record at the next seq that links to the archive's last hash and names the archive.
``check_log`` and ``TraceLog.find_record`` follow the chain back through the segments beside the log.

A writer never starts a second chain under a log's name: a process remembers, per log path, the file it last appended
to (device and inode) and that record's seq and hash (``TraceLog.remember_end`` notes where an existing log ends before
the first append). An append that finds the file gone (its directory deleted), emptied, or another file there is
refused (``TraceLogReplaced``) unless a rotation explains it (the segment markers lead back to that file, or link to
that record by its hash) or the file there holds that record (a copy put back). A long-running writer (``sieve serve``,
``sieve batch``) thus stops rather than writing traces into a new chain that starts at seq 0 with nothing to say that
the records before it exist elsewhere, or nowhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.console import first_hidden
from engine.errors import SieveError, TraceError
from engine.paths import file_version, fsync_path, process_exists

TRACE_SCHEMA = "sieve.trace/1"
LOG_SCHEMA = "sieve.tracelog/1"
GENESIS = "0" * 64
_HEADER = re.compile(
    rb'^\{"schema":"sieve\.tracelog/1","seq":(?P<seq>\d+),"prev":"[0-9a-f]{64}","hash":"(?P<hash>[0-9a-f]{64})",'
)


def canonical(data: Any, *, finite: bool = False) -> bytes:
    """The bytes a record's hash covers. ``finite``: refuse NaN and Infinity (ValueError), which JSON cannot hold
    (what a new record must not hold; records already logged are read and hashed as they are)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=not finite).encode("utf-8")


def record_hash(prev_hash: str, trace: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(trace)).hexdigest()


def _record_line(prev_hash: str, seq: int, trace: dict[str, Any], body: bytes | None = None) -> tuple[dict[str, Any], bytes]:
    """The record that chains ``trace`` after ``prev_hash`` at ``seq``, and its line as the writer lays it out:
    the header fields first, then the trace exactly as hashed (encoded once; the next append reads the chain
    position from the line's first bytes)."""
    body = canonical(trace) if body is None else body
    digest = hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()
    record = {"schema": LOG_SCHEMA, "seq": seq, "prev": prev_hash, "hash": digest, "trace": trace}
    header = json.dumps({k: record[k] for k in ("schema", "seq", "prev", "hash")}, separators=(",", ":"))
    return record, header[:-1].encode("ascii") + b',"trace":' + body + b"}\n"


def _read_at(handle: Any, offset: int, size: int) -> bytes:
    """``size`` bytes from ``offset`` of a raw (unbuffered) file; fewer only at the end of the file."""
    handle.seek(offset)
    chunks, wanted = [], size
    while wanted > 0:
        chunk = handle.read(wanted)
        if not chunk:
            break
        chunks.append(chunk)
        wanted -= len(chunk)
    return b"".join(chunks)


def _last_line(handle: Any, end: int) -> tuple[bytes, int]:
    """The line ending at offset ``end`` of a file (its newline included, if it has one) and the offset
    where it starts; reads backwards."""
    if end == 0:
        return b"", 0
    position = end
    buffer = b""
    while position > 0:
        step = min(65536, position)
        position -= step
        buffer = _read_at(handle, position, step) + buffer
        newline = buffer.rfind(b"\n", 0, len(buffer) - 1)
        if newline != -1:
            start = position + newline + 1
            return buffer[newline + 1 :], start
    return buffer, 0


def _last_record_line(handle: Any, end: int) -> tuple[bytes, int]:
    """Like ``_last_line``, skipping blank lines: the last line before ``end`` with something on it."""
    line, start = _last_line(handle, end)
    while line and not line.strip() and start > 0:
        line, start = _last_line(handle, start)
    return (line, start) if line.strip() else (b"", 0)


def _last_complete_record(handle: Any) -> tuple[bytes, int]:
    """The last whole record line of an open log and where it starts (a write in progress, or a torn tail, is
    passed over for the record before it); b"" when there is none."""
    last, start = _last_record_line(handle, handle.seek(0, os.SEEK_END))
    if last and not last.endswith(b"\n"):
        last, start = _last_record_line(handle, start)
    return last, start


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # a regular file never does this; never spin on it
            raise OSError(errno.EIO, f"write returned {written}")
        view = view[written:]


def _fsync_directory(path: Path) -> None:
    """Make a new directory entry durable (best effort: not every file system can fsync a directory)."""
    with contextlib.suppress(OSError):
        fsync_path(path)


# ---------------------------------------------------------------------------- reading records

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHAIN_KEYS = ("seq", "prev", "hash")


def _decode_line(raw: bytes) -> tuple[Any, str | None]:
    """(the line's JSON value, None), or (None, what is wrong with it), the latter worded to follow
    "line N" (" is not UTF-8 text (…)", ": unreadable record (…)")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f" is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start} of the line)"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f": unreadable record ({exc.msg}, column {exc.colno})"
    except (ValueError, RecursionError) as exc:  # an integer too long to convert, nesting too deep
        return None, f": unreadable record ({type(exc).__name__}: {str(exc)[:120]})"


def _line_problem(raw: bytes) -> tuple[Any, str | None]:
    """(the record, None) when the line is a well-shaped log record, else (its JSON value or None, problem);
    the problem worded to follow "line N", as in ``_decode_line``."""
    data, problem = _decode_line(raw)
    if problem is None:
        shape = _shape_problem(data)
        if shape is not None:
            problem = f": {shape}"
    return data, problem


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _shape_problem(data: Any) -> str | None:
    """Why a JSON value is not a log record (``{schema, seq, prev, hash, trace}``), or None."""
    if not isinstance(data, dict):
        kind = "null" if data is None else _JSON_TYPES.get(type(data), type(data).__name__)
        return f"not a trace log record (a JSON {kind}, not an object)"
    if data.get("schema") != LOG_SCHEMA:
        return f"not a trace log record (schema {_clip(data.get('schema'))}, expected {LOG_SCHEMA!r})"
    seq = data.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return f"not a trace log record (seq {_clip(seq)} is not a whole number)"
    for key in ("prev", "hash"):
        value = data.get(key)
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            return f"not a trace log record ({key} {_clip(value)} is not a sha256 in hex)"
    if not isinstance(data.get("trace"), dict):
        return f"not a trace log record (trace is {_clip(data.get('trace'))}, not an object)"
    return None


def _clip(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:39] + "…"


def _content_hash(record: dict[str, Any]) -> str | None:
    """The hash a (well-shaped) record's content and link give; None when the content cannot be hashed."""
    try:
        return record_hash(record["prev"], record["trace"])
    except (ValueError, TypeError, RecursionError):  # a lone surrogate (\ud800) in a string, nesting too deep
        return None


def _writer_form(data: dict[str, Any]) -> bytes | None:
    """The bytes the log's writer produces for this record (compact, UTF-8, keys in the line's order: the header
    layout ``append`` writes, or a whole-record dump by earlier writers); None when it cannot be encoded."""
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (ValueError, TypeError, RecursionError):  # a lone surrogate: reported as content that cannot be hashed
        return None


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _canonical_problem(raw: bytes, data: dict[str, Any]) -> str | None:
    """Why a record's line is not the canonical serialisation the writer produces, worded to follow
    "line N (seq S)"; None when it is. A duplicated key (a reader keeps the last one, a hash the last one, a
    person perhaps the first) and any other spelling of the same value (whitespace, escapes, number forms)
    are refused: the line must say one thing, in one way."""
    body = raw[:-1] if raw.endswith(b"\n") else raw
    expected = _writer_form(data)
    if expected is None or body == expected:
        return None
    try:
        json.loads(body.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as exc:
        return f"the key {str(exc)!r} appears twice in one object (readers disagree on which one counts)"
    except (ValueError, RecursionError):
        pass
    column = next((i for i, (a, b) in enumerate(zip(body, expected)) if a != b), min(len(body), len(expected)))
    return (f"not in the canonical form the log's writer produces (it differs at column {column + 1}: "
            "whitespace, escapes or number forms): the line was rewritten after it was logged")


def _is_foreign(data: Any) -> bool:
    """A JSON object that is no trace log record at all (a corpus line, a config): no chain field, no log schema."""
    return isinstance(data, dict) and not any(k in data for k in _CHAIN_KEYS) and data.get("schema") != LOG_SCHEMA


def _holds_no_record(path: Path, first_bytes: int = 64 << 20) -> bool:
    """Whether no line of the file at ``path`` (its first ``first_bytes``) starts as the writer starts a record: a text
    file or another tool's log, told from a damaged log (whose other lines still start so, however long its first
    record or whatever overwrote its start). Read only when a line that should be a record is not even JSON."""
    start = b'{"schema":' + json.dumps(LOG_SCHEMA).encode("ascii")
    read = 0
    try:
        with open(path, "rb") as handle:
            while read < first_bytes:
                line = handle.readline(first_bytes - read)
                if not line:
                    return True
                read += len(line)
                if line.lstrip().startswith(start):
                    return False
    except OSError:
        return False
    return True


def _require_log(path: Path) -> None:
    if path.is_dir():
        raise TraceError(f"{path} is a directory, not a trace log")
    if not path.exists():
        raise TraceError(f"trace log not found: {path}")


def _open_log(path: Path) -> Any:
    _require_log(path)
    try:
        # Not blocking on a FIFO's open; a FIFO, a device (/dev/zero: one endless line) or a socket is refused.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise TraceError(f"cannot read the trace log {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TraceError(f"{path} is not a regular file, so not a trace log")
    os.set_blocking(fd, True)
    return open(fd, "rb")


MAX_SINGLE_TRACE_BYTES = 1 << 30


def _is_single_trace(path: Path, first_line: bytes, data: Any) -> bool:
    """Whether a file handed over as a log is one trace document (``--trace-out`` writes it indented over many
    lines: its first line is a lone ``{``; a compact one is a single line with the trace schema)."""
    if isinstance(data, dict):
        return data.get("schema") == TRACE_SCHEMA and not any(k in data for k in _CHAIN_KEYS)
    if first_line.strip() != b"{":
        return False
    try:
        if path.stat().st_size > MAX_SINGLE_TRACE_BYTES:
            return False
        whole = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(whole, dict) and whole.get("schema") == TRACE_SCHEMA


@dataclass
class _Line:
    """One non-blank line of a log as read by ``TraceLog.scan``."""

    number: int
    record: dict[str, Any] | None  # the record when the line is one (even one whose hash or link is wrong)
    problems: list[str]  # what is wrong with it as the next link of the chain; empty when it checks out
    terminated: bool
    end: int = 0  # byte offset just after the line
    torn: bool = False  # the last line, unterminated and no record: a write in progress or a dead writer's tail


# ---------------------------------------------------------------------------- where this process left each log


@dataclass(frozen=True)
class _Position:
    """Where this process last left a log: the file (device and inode) and the record at its end then (the last one it
    appended, or the last one the log held when ``TraceLog.remember_end`` looked)."""

    device: int
    inode: int
    seq: int
    hash: str
    offset: int  # where the record's line starts in that file
    appended: bool  # this process appended the record (else: it found the log ending at it)

    def same_file(self, found: os.stat_result) -> bool:
        return (found.st_dev, found.st_ino) == (self.device, self.inode)

    def describe(self) -> str:
        return (f"record seq {self.seq} was appended" if self.appended
                else f"this process found it ending at record seq {self.seq}")


# Per process, by the log's absolute path (not resolved: a symlink pointed elsewhere is another file at the path).
# Every TraceLog of one path shares it, because callers make a new TraceLog per append (Pipeline.log_trace).
_POSITIONS: dict[str, _Position] = {}
_POSITIONS_LOCK = threading.Lock()
# By log path, the last refusal of a file there to continue this process's chain: ((the file's fingerprint, the
# position judged against), the fingerprints of the archives its markers named, the problem); see _not_continued.
_JUDGED: dict[str, tuple[Any, tuple[tuple[str, Any], ...], str]] = {}


def _position_key(path: Path) -> str:
    return os.path.abspath(path)


def _position_of(key: str) -> _Position | None:
    with _POSITIONS_LOCK:
        return _POSITIONS.get(key)


def _remember(key: str, position: _Position) -> None:
    with _POSITIONS_LOCK:
        _POSITIONS[key] = position


class TraceLogReplaced(TraceError):
    """The log a process continues was removed or replaced since it appended to it (or found it ending at a record):
    appending would start a new chain, with the records before it missing and nothing to say so. A TraceError, as for
    any log that cannot be appended to."""

    def __init__(self, path: Path, position: _Position, what: str):
        self.path = path
        self.position = position
        super().__init__(
            f"the trace log {path} was removed or replaced since {position.describe()} ({what}); refusing to start "
            f"a new chain there: the records up to seq {position.seq} would be missing from it with nothing to say "
            f"so. Put the log back (or a copy holding record seq {position.seq}, hash {position.hash[:16]}…), or "
            "restart the process to start a new log deliberately; rotate a log with `sieve trace rotate`, which "
            "keeps the chain"
        )


class _LogNotFound(TraceError):
    """The log's file is not there (``TraceLog._locked`` without ``create``)."""


def _gone(path: Path) -> str:
    """What is missing where a log was: its directory or the file."""
    directory = Path(os.path.abspath(path)).parent
    missing = directory
    while not missing.parent.is_dir() and missing.parent != missing:
        missing = missing.parent
    if not directory.is_dir():
        return f"its directory {missing} is gone" if missing == directory else \
            f"its directory {directory} is gone ({missing} with it)"
    return "the file is gone"


def _record_at(handle: Any, offset: int) -> tuple[int, str] | None:
    """(seq, hash) of the record whose line starts at ``offset`` of an open log; None when there is none there."""
    head = _read_at(handle, offset, 512)
    found = _HEADER.match(head)
    if found is not None:
        return int(found.group("seq")), found.group("hash").decode("ascii")
    line = head  # a record in another layout (an earlier writer's): the whole line is read
    while b"\n" not in line:
        more = _read_at(handle, offset + len(line), 1 << 16)
        if not more:
            break
        line += more
    data, problem = _line_problem(line.split(b"\n", 1)[0])
    return None if problem is not None else (data["seq"], data["hash"])


def _holds_record_at(handle: Any, position: _Position) -> bool:
    """Whether the open file holds ``position``'s record where it was written."""
    return _record_at(handle, position.offset) == (position.seq, position.hash)


def _moved_problem(handle: Any, position: _Position) -> str | None:
    """None when the open file (the one ``position`` names, by device and inode) still holds the record where it was
    written; else what happened (a log cut back, emptied or rewritten, or another file given the same inode number
    after the log was deleted). One read of a few hundred bytes."""
    if _holds_record_at(handle, position):
        return None
    size = os.fstat(handle.fileno()).st_size
    if size == 0:
        return "it was emptied: it holds no record now"
    if size <= position.offset:
        return f"it was cut back: it ends before where record seq {position.seq} was"
    return (f"record seq {position.seq} is no longer where it was written: the file was rewritten, or another one "
            "took its place")


def _holds_record_where_written(path: Path, position: _Position) -> bool:
    """Whether the file at ``path`` holds the record where it was written (one read of a few hundred bytes)."""
    try:
        with open(path, "rb") as handle:
            return _holds_record_at(handle, position)
    except OSError:
        return False


def _discontinuity(path: Path, handle: Any, position: _Position) -> str | None:
    """Why the log open as ``handle`` (at ``path``) does not continue the chain this process left at ``position``
    (worded to follow "removed or replaced since ..."); None when it does."""
    opened = os.fstat(handle.fileno())
    if position.same_file(opened):
        return _moved_problem(handle, position)
    return _not_continued(path, opened, position)


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _chain_holds_record(segment: Path, position: _Position) -> bool:
    """Whether the file ``segment`` holds the record ``position`` names (seq, hash; the chain up to it intact)."""
    try:
        record = TraceLog(segment)._find_in_segment(None, position.seq)
    except TraceError:
        return False
    return record["hash"] == position.hash


def _fingerprint(found: os.stat_result | None) -> tuple[int, int, int, int] | None:
    """A file's identity and state (``engine.paths.file_version``); None for no file."""
    return None if found is None else file_version(found)


def _not_continued(path: Path, opened: os.stat_result, position: _Position) -> str | None:
    """None when the file now at ``path`` (``opened``: not the file ``position`` names) continues the chain this
    process left at ``position``; else what happened, worded to follow "removed or replaced since ...".

    It continues it when it was rotated from that file (``rotate_log``: the segments named by the markers lead back
    to that very file, or to a marker linking to the record by its hash, or to one naming an archive, moved away
    since, that ends at or after the record's seq, which ``check_log`` notes), or when it (or the segment its markers lead back
    to) holds the record: a copy of the log put back. The file's content is read only in the last case (a copy, a
    replacement). A refusal is remembered with every file it looked at (the log, the archives its markers name),
    and judged again only when one of them changed, appeared or went: an archive put back is seen."""
    key = _position_key(path)
    with _POSITIONS_LOCK:
        known = _JUDGED.get(key)
    if known is not None and known[0] == (_fingerprint(opened), position) and all(
            _fingerprint(_stat_or_none(Path(name))) == state for name, state in known[1]):
        return known[2]
    segment = path
    seen: set[str] = set()
    consulted: list[tuple[str, tuple[int, int, int, int] | None]] = []
    problem: str | None = None
    while True:
        previous = _previous_segment(segment)
        if previous is None or position.seq > previous.seq:  # the record would be in this segment
            if _chain_holds_record(segment, position):
                return None
            if segment == path and opened.st_size == 0:
                problem = "an empty file is there (a log rotated by other means than `sieve trace rotate`?)"
            else:
                where = "it" if segment == path else f"{segment.name}, the segment it continues,"
                problem = (f"another file is there: {where} does not hold record seq {position.seq} with hash "
                           f"{position.hash[:16]}…")
            break
        if previous.last_seq == position.seq and previous.prev == position.hash:
            return None  # rotated right after the record: the marker links to it by its hash
        archived = _stat_or_none(previous.path)
        consulted.append((str(previous.path), _fingerprint(archived)))
        if (archived is not None and position.same_file(archived)
                and _holds_record_where_written(previous.path, position)):
            return None  # rotated: the archive is the file the record was appended to (not its inode number reused)
        if archived is None and position.seq <= previous.last_seq:
            return None  # rotated, its archive (or an older one, holding the record) moved away since: check_log notes it
        real = os.path.realpath(previous.path)
        if archived is None or real in seen:
            problem = (f"it continues {previous.path.name} (seq {previous.first_seq}..{previous.last_seq}), which is "
                       f"not beside it, so record seq {position.seq} cannot be found")
            break
        seen.add(real)
        segment = previous.path
    with _POSITIONS_LOCK:
        if len(_JUDGED) > 1000:
            _JUDGED.clear()
        _JUDGED[key] = ((_fingerprint(opened), position), tuple(consulted), problem)
    return problem


class TraceLog:
    """Append-only, hash-chained JSONL log of traces. Safe for several processes (flock)."""

    def __init__(self, path: str | Path):
        if not isinstance(path, (str, os.PathLike)):
            raise TraceError(f"a trace log's path is a str or a pathlib.Path, got {type(path).__name__}")
        self.path = Path(path)

    def remember_end(self) -> None:
        """Note where the log ends now (its file and last record), so that this process's next append refuses a log
        removed or replaced meanwhile (``append``), as it would after an append of its own. Nothing is noted for a
        log that does not exist, holds no record or cannot be read, nor when this process already knows where it
        left the log."""
        key = _position_key(self.path)
        if _position_of(key) is not None:
            return
        try:
            handle = open(self.path, "rb", buffering=0)
        except OSError:
            return
        with handle:
            opened = os.fstat(handle.fileno())
            if not stat.S_ISREG(opened.st_mode):
                return
            last, start = _last_complete_record(handle)
            if not last:
                return
            try:
                last_hash, next_seq = self._chain_position(last)
            except TraceError:
                return
        with _POSITIONS_LOCK:
            _POSITIONS.setdefault(key, _Position(opened.st_dev, opened.st_ino, next_seq - 1, last_hash, start,
                                                 appended=False))

    def forget(self) -> None:
        """Forget where this process left the log: its next append takes the file at the path as it finds it (a
        missing log is started anew, at seq 0). For a long-lived process that starts a new log deliberately."""
        with _POSITIONS_LOCK:
            _POSITIONS.pop(_position_key(self.path), None)

    def continuity_problem(self) -> str | None:
        """Why this process's next append would be refused as ``TraceLogReplaced`` (the message), as far as can be
        told without the lock; None when it would not be (or this process never appended to the log)."""
        position = _position_of(_position_key(self.path))
        if position is None:
            return None
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return str(TraceLogReplaced(self.path, position, _gone(self.path)))
        except OSError:
            return None  # not about the chain: the append says what
        if not stat.S_ISREG(current.st_mode):
            return None
        try:
            with open(self.path, "rb", buffering=0) as handle:
                problem = _discontinuity(self.path, handle, position)
        except OSError:
            return None
        return None if problem is None else str(TraceLogReplaced(self.path, position, problem))

    def check_appendable(self) -> None:
        """Check, before any work, that ``append`` can go on with this log: when it exists, a regular file this process
        may write whose last record can be read (a torn tail is fine: the next append sets it aside), and the chain
        this process left it at, if any; then note where it ends (``remember_end``). TraceError saying what is
        wrong. A log that does not exist yet is fine (the first append creates it; its directory is the caller's to
        check)."""
        problem = self.continuity_problem()
        if problem is not None:
            raise TraceError(problem)
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise TraceError(f"cannot use the trace log {self.path}: {exc.strerror or exc}") from None
        if stat.S_ISDIR(current.st_mode):
            raise TraceError(f"{self.path} is a directory, not a trace log")
        if not stat.S_ISREG(current.st_mode):
            raise TraceError(f"{self.path} is not a regular file: a trace log is appended to, locked and cut back "
                             "on a failed write")
        if not os.access(self.path, os.R_OK | os.W_OK):
            raise TraceError(f"cannot append to the trace log {self.path}: permission denied")
        try:
            handle = open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise TraceError(f"cannot read the trace log {self.path}: {exc.strerror or exc}") from None
        with handle:
            last, _ = _last_complete_record(handle)
            if last:
                self._chain_position(last)  # TraceError: no trace log, or it ends with an unreadable record
        self.remember_end()

    def append(self, trace: dict[str, Any]) -> dict[str, Any]:
        """Append one trace; returns the record written (seq, prev, hash, trace).

        On any failure while writing (a full disk, an I/O error, an interrupt), the log is truncated back
        to where the record started and the error is raised: the log never keeps half a record.

        A process that has appended to the log (or found it ending at a record, ``remember_end``) continues that
        chain or none: when the log's file was removed or replaced since (its directory deleted, the file moved
        away, emptied, or another file put there) and that is not a rotation (``rotate_log``, by any process) nor a
        copy of the log put back that holds the record it left the log at, the append is refused with
        :class:`TraceLogReplaced` instead of starting a new chain at seq 0. A log this process never saw is
        created (with its directory) by the first append."""
        try:
            body = canonical(trace, finite=True)
        except ValueError as exc:  # a trace built by hand: a pipeline's traces hold finite numbers only
            raise TraceError(f"cannot append to the trace log {self.path}: the trace holds NaN or Infinity, which "
                             f"JSON cannot hold ({exc}); a log line with a bare NaN would break tools that read "
                             "the log as JSON") from None
        if len(body) > MAX_SINGLE_TRACE_BYTES:  # what load_trace reads back: a record no reader takes is refused
            raise TraceError(f"cannot append to the trace log {self.path}: the trace is {len(body) >> 20} MiB, over "
                             f"the {MAX_SINGLE_TRACE_BYTES >> 20} MiB a trace may hold (a query or history that large)")
        key = _position_key(self.path)
        position = _position_of(key)
        if position is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._locked(create=position is None) as handle:
                return self._append_locked(handle, key, trace, body)
        except _LogNotFound:
            if position is None:
                raise
            raise TraceLogReplaced(self.path, position, _gone(self.path)) from None

    def _append_locked(self, handle: Any, key: str, trace: dict[str, Any], body: bytes) -> dict[str, Any]:
        """``append`` on the locked log: refused when it does not continue the chain this process left it at."""
        position = _position_of(key)  # read again under the lock: another thread may have appended meanwhile
        opened = os.fstat(handle.fileno())
        if position is not None:
            problem = _discontinuity(self.path, handle, position)
            if problem is not None:
                raise TraceLogReplaced(self.path, position, problem)
        prev_hash, seq, end, prefix = self._tail(handle)
        record, line = _record_line(prev_hash, seq, trace, body)
        self._write_at(handle.fileno(), end, prefix + line)
        _remember(key, _Position(opened.st_dev, opened.st_ino, seq, record["hash"], end + len(prefix), appended=True))
        return record

    @contextmanager
    def _locked(self, *, create: bool) -> Iterator[Any]:
        """The log file, open unbuffered for reading and writing, under an exclusive lock. The lock is taken on
        the file the path names *when the lock is granted*: a rotation (``rotate_log``) that moved the file
        away while this process waited leaves it holding the archive, so it opens the path again."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o640)
            except FileNotFoundError:
                raise _LogNotFound(f"trace log not found: {self.path}") from None
            # Unbuffered: every byte written is written by _write_all, none is left in a buffer that a later
            # close could flush after a rollback.
            with open(fd, "rb+", buffering=0) as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    try:
                        current = os.stat(self.path)
                    except FileNotFoundError:
                        current = None
                    opened = os.fstat(handle.fileno())
                    if current is None or (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
                        continue  # rotated (or moved away) while this process waited for the lock
                    yield handle
                    return
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _tail(self, handle: Any) -> tuple[str, int, int, bytes]:
        """(previous hash, next seq, offset to write at, bytes to write before the record)."""
        end = handle.seek(0, os.SEEK_END)
        last, start = _last_line(handle, end)
        if last and not last.endswith(b"\n"):
            kept = self._complete_last_record(handle, last, start)
            if kept is not None:
                # The writer died between a whole, valid record and its newline: keep the record.
                return kept[0], kept[1], end, b"\n"
            # A writer died mid-record: move the torn bytes aside, keep the chain intact.
            self._set_aside(handle, start, end)
            end = start
        last, _ = _last_record_line(handle, end)
        if last:
            prev_hash, seq = self._chain_position(last)
            return prev_hash, seq, end, b""
        return GENESIS, 0, end, b""

    def _complete_last_record(self, handle: Any, last: bytes, start: int) -> tuple[str, int] | None:
        """(hash, next seq) when the unterminated last line is a whole record that chains after the line
        before it; None when it is torn (or otherwise not the chain's next record)."""
        data, problem = _line_problem(last)
        if problem is not None:
            return None
        previous, _ = _last_record_line(handle, start)
        if previous:
            try:
                prev_hash, seq = self._chain_position(previous)
            except TraceError:
                return None
        else:
            prev_hash, seq = GENESIS, 0
        if data["seq"] != seq or data["prev"] != prev_hash or _content_hash(data) != data["hash"]:
            return None
        return data["hash"], data["seq"] + 1

    def _set_aside(self, handle: Any, start: int, end: int) -> Path:
        """Copy the bytes from ``start`` to ``end`` into a new LOG.torn-<offset>[-<n>] file (never one that
        exists), make it durable, then cut them off the log."""
        torn = _read_at(handle, start, end - start)
        for attempt in range(100000):
            aside = self.path.with_name(f"{self.path.name}.torn-{start}" + (f"-{attempt}" if attempt else ""))
            try:
                fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileExistsError:
                continue
            except OSError as exc:  # a directory this process may not write (the log itself may be writable)
                raise TraceError(f"cannot set aside the torn tail of {self.path} (a writer died mid-record): cannot "
                                 f"create {aside.name} beside it ({exc.strerror or exc}); nothing was appended") from None
            break
        else:
            raise TraceError(
                f"cannot set aside the torn tail of {self.path}: too many {self.path.name}.torn-{start}* files"
            )
        try:
            _write_all(fd, torn)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            aside.unlink(missing_ok=True)  # the torn bytes are still in the log; nothing is lost
            raise
        os.close(fd)
        _fsync_directory(aside.parent)
        handle.truncate(start)
        os.fsync(handle.fileno())
        return aside

    @staticmethod
    def _write_at(fd: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (the end of the file) and fsync; on any failure truncate the file back
        to ``offset`` (and fsync) before raising, so no partial record stays in the log."""
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException as exc:
            try:
                os.ftruncate(fd, offset)
                os.fsync(fd)
            except OSError as cleanup:
                exc.add_note(f"and the partial record could not be removed ({cleanup}); "
                             "the next append sets it aside")
            raise

    def _chain_position(self, last: bytes) -> tuple[str, int]:
        """(hash, next seq) from the log's last record, read from its header when it has one."""
        found = _HEADER.match(last)
        if found is not None:
            return found.group("hash").decode("ascii"), int(found.group("seq")) + 1
        # records written before headers came first, or by another writer
        data, problem = _line_problem(last)
        if _is_foreign(data):
            raise TraceError(f"{self.path} is not a Sieve trace log (its last line has no seq/prev/hash)")
        if data is None and _holds_no_record(self.path):
            raise TraceError(f"{self.path} is not a Sieve trace log (its last line{problem}; nothing at its start "
                             "is a trace log record)")
        if problem is not None:
            raise TraceError(
                f"trace log {self.path} ends with an unreadable record (the last line{problem}); "
                "run `sieve trace verify` on it"
            )
        return data["hash"], data["seq"] + 1

    def scan(self, limit: int | None = None) -> Iterator[_Line]:
        """Every non-blank line, checked as the next link of the chain: its shape, sequence number, link to
        the record before it and hash. After a line that is no record the chain resumes at the next record
        (its own hash is checked; its link cannot be). With ``limit``, only the lines that end within the first
        ``limit`` bytes. Raises TraceError when the path is no trace log."""
        with _open_log(self.path) as handle:
            prev_hash: str | None = GENESIS
            expected_seq: int | None = 0
            first = True
            offset = 0
            for number, raw in enumerate(handle, start=1):
                offset += len(raw)
                if limit is not None and offset > limit:
                    return
                if not raw.strip():
                    continue
                terminated = raw.endswith(b"\n")
                data, problem = _line_problem(raw)
                starts = first
                if first:
                    first = False
                    if _is_single_trace(self.path, raw, data):
                        raise TraceError(
                            f"{self.path} is a single trace (sieve search --trace-out), not a log; "
                            "use sieve replay / sieve report on it"
                        )
                    if _is_foreign(data):
                        raise TraceError(f"{self.path} is not a Sieve trace log (line {number} has no seq/prev/hash)")
                    if data is None and _holds_no_record(self.path):
                        raise TraceError(f"{self.path} is not a Sieve trace log (line {number}{problem}; nothing at "
                                         "its start is a trace log record)")
                if problem is None and _is_segment_marker(data["trace"]):
                    marker_problem = _marker_problem(data["trace"])
                    if marker_problem is not None:
                        problem = f" (seq {data['seq']}): a segment marker {marker_problem}"
                    elif starts:
                        # A rotated log starts with the marker that links it to the end of the segment rotated
                        # out of it (``check_log`` checks that link): the chain goes on from there.
                        prev_hash, expected_seq = data["prev"], data["seq"]
                    else:
                        problem = (f" (seq {data['seq']}): a segment marker in the middle of the log (only the first "
                                   "line of a rotated log is one)")
                if problem is not None:
                    problem = f"line {number}{problem}"
                    torn = not terminated and raw.startswith(b"{")
                    if torn:
                        problem += (" (the last line, without its newline: a write in progress or a writer that died"
                                    " mid-record; the next append sets it aside)")
                    yield _Line(number, None, [problem], terminated, offset, torn)
                    prev_hash = expected_seq = None  # unknown: the chain resumes at the next record
                    continue
                problems = _link_problems(f"line {number}", raw, data, prev_hash, expected_seq)
                yield _Line(number, data, problems, terminated, offset)
                prev_hash, expected_seq = data["hash"], data["seq"] + 1

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record in order, shape-checked (not chain-checked: see ``scan``, ``find`` and ``verify_log``)."""
        for line in self.scan():
            if line.record is None:
                raise TraceError(f"{self.path}: {line.problems[0]}")
            yield line.record

    def find(self, trace_id: str | None = None, seq: int | None = None) -> dict[str, Any]:
        """A trace by id or sequence number; the most recent one when neither is given.

        The record must check out: its hash must match its content, and every record up to it must form an
        intact chain; otherwise TraceError (an edited record is never returned as if genuine)."""
        return self.find_record(trace_id, seq)["trace"]

    def last_record(self) -> dict[str, Any] | None:
        """The log's last record as written (shape-checked, not chain-checked); None for an empty log."""
        with _open_log(self.path) as handle:
            last, _ = _last_record_line(handle, handle.seek(0, os.SEEK_END))
        if not last:
            return None
        data, problem = _line_problem(last)
        if problem is not None:
            raise TraceError(f"{self.path}: its last line{problem}")
        return data

    def find_record(self, trace_id: str | None = None, seq: int | None = None) -> dict[str, Any]:
        """Like ``find``, the whole record: ``{schema, seq, prev, hash, trace}``. A rotated log (``rotate_log``)
        is searched back through the segments rotated out of it that are beside it, newest first."""
        return self.locate_record(trace_id, seq)[0]

    def locate_record(self, trace_id: str | None = None, seq: int | None = None) -> tuple[dict[str, Any], Path]:
        """Like ``find_record``, with the file that holds the record (this log, or a segment rotated out of it)."""
        log, searched = self, [self.path]
        while True:
            try:
                return log._find_in_segment(trace_id, seq), log.path
            except _NotInSegment as missing:
                previous = _previous_segment(log.path)
                if previous is None:
                    raise TraceError(str(missing) + _searched_also(searched)) from None
                if not previous.path.is_file():
                    raise TraceError(
                        f"{missing}{_searched_also(searched)}; {log.path.name} continues {previous.path.name} (seq "
                        f"{previous.first_seq}..{previous.last_seq}), which is not beside it: put the archived segment "
                        "back to search it"
                    ) from None
                if previous.path in searched:
                    raise TraceError(f"{missing}{_searched_also(searched)} (the segments name each other in a loop)") \
                        from None
                log = TraceLog(previous.path)
                searched.append(previous.path)

    def _find_in_segment(self, trace_id: str | None, seq: int | None) -> dict[str, Any]:
        """``find_record`` in this file alone; _NotInSegment when the record is not in it. The quick walk
        (``_find_quickly``) answers for a log as the writer wrote it; anything else is read by the full check,
        which words every refusal."""
        found = self._find_quickly(trace_id, seq)
        return self._find_checked(trace_id, seq) if found is None else found

    def _find_quickly(self, trace_id: str | None, seq: int | None) -> dict[str, Any] | None:
        """``_find_in_segment`` without decoding the records before the one wanted: each earlier line must be
        byte for byte the writer's layout (``_WRITER_LINE``), at the next seq, linking to the line before, and
        its hash must be the sha256 of ``prev`` and the line's own trace bytes. The record found gets the full
        check of ``scan`` (decoded, hashed, compared with its canonical form). None (the caller reads the file
        with the full check) at the first line that is anything else: a line in another layout, a broken link,
        a segment marker, an unterminated last line.

        Why hashing the raw bytes is enough for the earlier records: the writer hashes exactly the bytes it
        writes, so a line that was changed in any byte no longer matches its hash, and one whose hash was
        recomputed no longer links to the next record, up to the record found, whose own hash would then differ
        (from the one a --trace-out file or an anchored head records). A chain rewritten from the edited record
        on is not detected by the full check either."""
        wanted_id = None
        if trace_id is not None:
            try:
                wanted_id = b'"trace_id":' + json.dumps(trace_id, ensure_ascii=False).encode("utf-8")
            except (ValueError, TypeError):
                return None
        try:
            handle = open(self.path, "rb")
        except OSError:
            return None
        with handle:
            prev_hash, expected_seq = GENESIS, 0
            first = True
            latest: tuple[bytes, str, int] | None = None  # the last trace's line, with the link it must have
            for raw in handle:
                if not raw.strip():
                    continue
                header = _WRITER_LINE.match(raw)
                if header is None or not raw.endswith(b"}\n"):
                    return None
                trace_at = header.end()
                marker = False
                if raw.find(_MARKER_SCHEMA, trace_at) != -1:
                    if not first:
                        return None  # a marker in the middle of the log (or a trace that mentions one)
                    data, problem = _line_problem(raw)
                    if problem is not None:
                        return None
                    marker = _is_segment_marker(data["trace"])
                    if marker:  # a rotated log: the chain goes on from its marker
                        if _marker_problem(data["trace"]) is not None or seq == data["seq"]:
                            return None
                        prev_hash, expected_seq = data["prev"], data["seq"]
                first = False
                line_seq = int(header.group("seq"))
                line_hash = header.group("hash").decode("ascii")
                digest = hashlib.sha256(prev_hash.encode("ascii"))
                digest.update(memoryview(raw)[trace_at:-2])  # the trace's bytes, as the writer hashed them
                if (line_seq != expected_seq or header.group("prev").decode("ascii") != prev_hash
                        or digest.hexdigest() != line_hash):
                    return None
                if seq == line_seq or (wanted_id is not None and raw.find(wanted_id, trace_at) != -1):
                    record = _checked_record(raw, prev_hash, expected_seq)
                    if record is None:
                        return None
                    if seq == line_seq or record["trace"].get("trace_id") == trace_id:
                        return record
                if not marker:
                    latest = (raw, prev_hash, expected_seq)
                prev_hash, expected_seq = line_hash, line_seq + 1
        if trace_id is None and seq is None:
            # the latest trace; None when there is none (an empty log, only a marker): the full check words it
            return None if latest is None else _checked_record(*latest)
        wanted = f" with id {trace_id}" if trace_id is not None else f" with seq {seq}"
        raise _NotInSegment(f"{self.path} holds no trace{wanted}")

    def _find_checked(self, trace_id: str | None, seq: int | None) -> dict[str, Any]:
        """``_find_in_segment`` by the full check of every line up to the record (``scan``)."""
        broken: _Line | None = None  # the first line where the chain is broken
        found: _Line | None = None
        tail: _Line | None = None  # an unterminated last line that is no record
        for line in self.scan():
            record = line.record
            if record is None and not line.terminated:
                # The unterminated last line is no record: a write in progress, or a torn tail the next append
                # sets aside. It is not part of the chain (verify reports it); the latest record is before it.
                tail = line
                continue
            matches = record is not None and (
                (trace_id is not None and record["trace"].get("trace_id") == trace_id)
                or (seq is not None and record["seq"] == seq)
            )
            if line.problems and broken is None:
                broken = line
            if matches:
                found = line
                break
            if trace_id is None and seq is None and not (record is not None and _is_segment_marker(record["trace"])):
                found = line  # the latest trace (a rotated log's marker is no trace)
        verify = f"run `sieve trace verify {self.path}`"
        if found is None:
            wanted = f" with id {trace_id}" if trace_id is not None else f" with seq {seq}" if seq is not None else ""
            hint = next((f" (and its chain is broken: {p.problems[0]}; {verify})" for p in (broken, tail) if p), "")
            raise _NotInSegment(f"{self.path} holds no trace{wanted}{hint}")
        if found.record is not None and _is_segment_marker(found.record["trace"]):
            raise TraceError(f"{self.path}: seq {found.record['seq']} is the marker that starts the log after a "
                             f"rotation (it links to {found.record['trace']['previous']['file']}), not a trace")
        if found.record is None:  # the most recent line is no record
            first = "" if broken is None or broken is found else f"the chain is broken ({broken.problems[0]}), and "
            raise TraceError(
                f"{self.path}: cannot read the latest trace: {first}the last line is no record ({found.problems[0]}); "
                f"{verify}"
            )
        label = f"seq {found.record['seq']}" + (f", id {trace_id}" if trace_id is not None else "")
        refusing = f"{self.path}: refusing the record {label} (line {found.number}):"
        if found is broken:
            edited = [p for p in found.problems if "does not match its hash" in p or "cannot be hashed" in p]
            others = [p for p in found.problems if p not in edited]
            rewritten = [p for p in others if "canonical form" in p or "appears twice" in p]
            others = [p for p in others if p not in rewritten]
            if edited:
                what = "it does not match its hash: it was edited after it was logged" + (
                    f" ({'; '.join(others + rewritten)})" if others or rewritten else "")
            elif rewritten:
                what = f"it is not as the log's writer wrote it ({'; '.join(rewritten + others)})"
            else:
                what = f"the chain is broken at it ({'; '.join(others)})"
            raise TraceError(f"{refusing} {what}; {verify}")
        if broken is not None:
            raise TraceError(f"{refusing} the chain is broken before it ({broken.problems[0]}); {verify}")
        return found.record


# The layout ``append`` writes, up to the trace's first byte (seq as JSON writes a number: no leading zero; more
# than 18 digits is left to the full check).
_WRITER_LINE = re.compile(
    rb'\{"schema":"sieve\.tracelog/1","seq":(?P<seq>0|[1-9][0-9]{0,17}),"prev":"(?P<prev>[0-9a-f]{64})",'
    rb'"hash":"(?P<hash>[0-9a-f]{64})","trace":(?=\{)'
)
_MARKER_SCHEMA = b'"sieve.tracelog.segment/1"'  # in a segment marker's line, as the writer writes it


def _checked_record(raw: bytes, prev_hash: str, expected_seq: int) -> dict[str, Any] | None:
    """The record on ``raw`` when it passes ``scan``'s full check as the next link after ``prev_hash`` at
    ``expected_seq`` and is no segment marker; None otherwise (the full check then words the refusal)."""
    data, problem = _line_problem(raw)
    if problem is not None or _is_segment_marker(data["trace"]):
        return None
    if _link_problems("", raw, data, prev_hash, expected_seq):
        return None
    return data


def _link_problems(where: str, raw: bytes, data: dict[str, Any], prev_hash: str | None,
                   expected_seq: int | None) -> list[str]:
    """What is wrong with a well-shaped record (at ``where``, e.g. "line 7") as the next link of the chain: its
    sequence number (unless ``expected_seq`` is unknown), its link (unless ``prev_hash`` is), its hash, its canonical
    form."""
    seq = data["seq"]
    problems = []
    if expected_seq is not None and seq != expected_seq:
        problems.append(f"{where}: sequence {seq}, expected {expected_seq} (a record is missing or moved)")
    if prev_hash is not None and data["prev"] != prev_hash:
        problems.append(f"{where} (seq {seq}): does not link to the previous record")
    try:
        body = canonical(data["trace"])  # encoded once: hashed, and compared with the line
    except (ValueError, TypeError, RecursionError):  # a lone surrogate (\ud800) in a string, nesting too deep
        body = None
    if body is None:
        problems.append(f"{where} (seq {seq}): content cannot be hashed (text that is not valid Unicode)")
    elif data["hash"] != _body_hash(data["prev"], body):
        problems.append(f"{where} (seq {seq}): content does not match its hash (edited)")
    elif not _is_writer_line(raw, body):
        form = _canonical_problem(raw, data)  # another layout (an earlier writer), or a line rewritten
        if form is not None:
            problems.append(f"{where} (seq {seq}): {form}")
    return problems


def _body_hash(prev_hash: str, body: bytes) -> str:
    """``record_hash`` of a trace whose canonical bytes are ``body``."""
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


def _is_writer_line(raw: bytes, body: bytes) -> bool:
    """Whether a (parsed, well-shaped) line is exactly the header layout ``append`` writes followed by ``body``, the
    canonical bytes of its trace. Then it is also its own ``_writer_form`` (its trace was parsed from sorted keys, so
    its key order is the sorted one) and ``_canonical_problem`` need not encode it again."""
    line = raw[:-1] if raw.endswith(b"\n") else raw
    header = _HEADER.match(line)
    if header is None:
        return False
    start = header.end() + len(b'"trace":')
    return (len(line) == start + len(body) + 1 and line.startswith(b'"trace":', header.end())
            and line.endswith(b"}") and line[start:-1] == body)


SEGMENT_SCHEMA = "sieve.tracelog.segment/1"


def _is_segment_marker(trace: dict[str, Any]) -> bool:
    """Whether a record's trace is the marker ``rotate_log`` writes first in a rotated log."""
    return trace.get("schema") == SEGMENT_SCHEMA


def _marker_problem(trace: dict[str, Any]) -> str | None:
    """What is wrong with a segment marker's content (worded to follow "a segment marker"), or None."""
    previous = trace.get("previous")
    if not isinstance(previous, dict):
        return "without its 'previous' segment"
    name = previous.get("file")
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return f"naming no file beside the log as its previous segment ({_clip(name)})"
    for key in ("first_seq", "last_seq"):
        value = previous.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"whose previous.{key} {_clip(value)} is not a whole number"
    # The name rotate_log gives: the log's stem, the seqs it holds, the log's suffix; nothing a terminal would not
    # show as itself (a forged marker's escape sequences could hide the notes that quote the name).
    seqs = f".{previous['first_seq']:06d}-{previous['last_seq']:06d}"
    stem, found, suffix = name.rpartition(seqs)
    if not found or not stem or "." in suffix[1:] or (suffix and not suffix.startswith(".")) \
            or first_hidden(name) is not None:
        return f"naming {_clip(name)} as its previous segment, not the name a rotation gives it (STEM{seqs}.SUFFIX)"
    return None


@dataclass(frozen=True)
class _Previous:
    """The segment a rotated log continues, as its first record names it."""

    path: Path
    first_seq: int
    last_seq: int
    seq: int  # the marker's own seq (last_seq + 1)
    prev: str  # the hash it links to: that of the previous segment's last record


def _previous_segment(path: Path) -> _Previous | None:
    """The segment that ``path`` continues, read from its first line when that is a well-formed segment marker
    (None for a log that starts a chain, an empty one, or one that is no log: ``scan`` reports those)."""
    try:
        with open(path, "rb") as handle:
            for raw in handle:
                if raw.strip():
                    break
            else:
                return None
    except OSError:
        return None
    data, problem = _line_problem(raw)
    if problem is not None or not _is_segment_marker(data["trace"]) or _marker_problem(data["trace"]) is not None:
        return None
    previous = data["trace"]["previous"]
    beside = Path(os.path.realpath(path))  # a symlinked log's archives lie beside the file it names
    return _Previous(beside.with_name(previous["file"]), previous["first_seq"], previous["last_seq"], data["seq"],
                     data["prev"])


def _segments(path: Path) -> tuple[list[Path], list[str], list[str]]:
    """The chain's segments that are on disk, oldest first, ending with ``path``: a rotated log names the
    segment it continues (``rotate_log``), which may itself be rotated; and the problems (a segment that does
    not end where the next one's marker links) and notes (an earlier segment that is not beside the log) found
    following them."""
    chain = [path]
    seen = {os.path.realpath(path)}
    problems: list[str] = []
    notes: list[str] = []
    while True:
        previous = _previous_segment(chain[0])
        if previous is None:
            return chain, problems, notes
        label = f"{previous.path.name} (seq {previous.first_seq}..{previous.last_seq})"
        if os.path.realpath(previous.path) in seen:
            problems.append(f"{chain[0].name} names {previous.path.name} as its previous segment, which is a later "
                            "segment of the same chain (a loop): the segments were renamed")
            return chain, problems, notes
        if not previous.path.is_file():
            notes.append(f"{chain[0].name} continues {label}, which is not beside it: the chain is checked from seq "
                         f"{previous.seq} on (put the archived segment back beside the log to check it too)")
            return chain, problems, notes
        try:
            head = TraceLog(previous.path).last_record()
        except TraceError as exc:
            problems.append(f"{chain[0].name} continues {previous.path.name}, which cannot be read: {exc}")
            return chain, problems, notes
        if head is None or head["seq"] != previous.last_seq or head["hash"] != previous.prev:
            ends = "is empty" if head is None else f"ends at seq {head['seq']} with hash {head['hash'][:16]}…"
            problems.append(
                f"{chain[0].name} starts with the marker of a rotation from {label} (linking to hash "
                f"{previous.prev[:16]}…), but {previous.path.name} {ends}: the archived segment was cut, extended "
                "or replaced after the rotation"
            )
        seen.add(os.path.realpath(previous.path))
        chain.insert(0, previous.path)


class _NotInSegment(TraceError):
    """The record looked for is not in this file (an earlier segment of a rotated log may hold it)."""


def _searched_also(searched: list[Path]) -> str:
    if len(searched) < 2:
        return ""
    return f" (nor do the segments rotated out of it: {', '.join(p.name for p in searched[1:])})"


MAX_PROBLEMS = 100


def set_aside_files(path: str | Path) -> list[Path]:
    """The LOG.torn-* files next to a log: bytes of records torn by crashed writers, set aside by appends."""
    path = Path(path)
    if not path.parent.is_dir():
        return []

    def order(aside: Path) -> tuple[int, int, str]:
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", aside.name[len(path.name) + len(".torn-") :])
        return (int(found.group(1)), int(found.group(2) or 0), "") if found else (-1, 0, aside.name)

    return sorted((p for p in path.parent.glob(glob.escape(path.name) + ".torn-*") if p.is_file()), key=order)


@dataclass
class LogCheck:
    """What ``check_log`` found: records checked, problems (the chain is broken) and set-aside files."""

    path: Path
    records: int  # lines checked, in the log and the segments rotated out of it that are beside it
    problems: list[str]
    set_aside: list[Path] = field(default_factory=list)
    segments: list[Path] = field(default_factory=list)  # the files checked, oldest first (the log alone if unrotated)
    notes: list[str] = field(default_factory=list)  # e.g. an earlier segment that is not beside the log
    anchored_seq: int | None = None  # the seq of the record with the expected head's hash, when it is there

    @property
    def warnings(self) -> list[str]:
        warnings = list(self.notes)
        if self.set_aside:
            count = len(self.set_aside)
            warnings.append(
                f"{count} file{'s' if count > 1 else ''} next to the log hold{'s' if count == 1 else ''} bytes set "
                f"aside from records torn by a crashed writer (not part of the chain; inspect "
                f"{'them' if count > 1 else 'it'}): {', '.join(p.name for p in self.set_aside)}"
            )
        return warnings


def check_log(path: str | Path, *, expect_head: str | None = None, expect_count: int | None = None,
              holds: tuple[int, str] | None = None) -> LogCheck:
    """Check every record's shape, hash and link, and look for set-aside torn records next to the log.

    A rotated log (``rotate_log``) is checked with the segments rotated out of it that are beside it, oldest
    first, and each link between them: the marker that starts a segment must link to the last record of the one
    before. An earlier segment that is not beside the log is a note, and the chain is checked from there on.

    The chain alone cannot show that records were cut from the log's end (what is left still links up, and so
    does an empty file): ``expect_head`` (the hash of the last record when the log was anchored, from
    ``log_head``) and/or ``expect_count`` (how many records it held then) check that the anchored record is
    still there, at its seq with that hash; records appended since are fine. ``holds`` (seq, hash): a record the
    chain must hold (the one a trace was matched against), checked in the same read.

    Raises TraceError when the path is missing, a directory, unreadable or no trace log at all."""
    if expect_head is not None and not _HEX64.fullmatch(expect_head):
        raise TraceError(f"--expect-head must be a record hash (64 hex digits, from `sieve trace head`), "
                         f"got {_clip(expect_head)}")
    if expect_count is not None and expect_count < 0:
        raise TraceError(f"--expect-count must be 0 or more, got {expect_count}")
    log = TraceLog(path)
    anchored = expect_head is not None or expect_count is not None or holds is not None
    count = 0
    hashes: dict[int, str] = {}  # seq -> hash of the records that check out (kept only to check an anchor)

    notes: list[str] = []

    def check(segment: Path, label: str) -> list[str]:
        nonlocal count
        found: list[str] = []
        for line in TraceLog(segment).scan():
            if line.torn and not label:
                # No record yet, and none lost: the log's chain ends at the record before. Only the live log is
                # appended to (an archived segment with such a tail is broken: nothing will set it aside).
                notes.append(f"line {line.number}, the last, has no newline and is no whole record: a write in progress "
                             "or a writer that died mid-record (not part of the chain, which ends before it; the next "
                             "append sets it aside)")
                continue
            count += 1
            found.extend(label + problem for problem in line.problems)
            if line.record is not None and anchored:
                hashes.setdefault(line.record["seq"], line.record["hash"])
        return found

    # The log itself first: a missing path, a directory or a file that is no log is refused as such.
    own = check(log.path, "")
    segments, link_problems, segment_notes = _segments(log.path)
    notes = segment_notes + notes
    problems: list[str] = []
    for segment in segments[:-1]:
        problems.extend(check(segment, f"{segment.name}: "))
    problems.extend(link_problems + own)
    earliest = _previous_segment(segments[0])
    base = earliest.seq if earliest is not None else 0  # records before it are in a segment not beside the log
    problems.extend(_anchor_problems(hashes, count, expect_head, expect_count, base))
    if holds is not None and hashes.get(holds[0]) != holds[1]:  # ``holds``: a record that must be in this chain
        found = hashes.get(holds[0])
        problems.append(f"the chain checked has no record seq {holds[0]} with hash {holds[1][:16]}… (the one a trace "
                        "was matched against)" + (f": its record seq {holds[0]} has hash {found[:16]}…, so the log "
                                                  "changed since the trace was read from it" if found else ""))
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"… and {len(problems) - MAX_PROBLEMS} more problems"]
    set_aside = [aside for segment in segments for aside in set_aside_files(segment)]
    anchored_seq = min((seq for seq, value in hashes.items() if value == expect_head), default=None)
    return LogCheck(log.path, count, problems, set_aside, segments, notes, anchored_seq)


def _anchor_problems(hashes: dict[int, str], count: int, expect_head: str | None,
                     expect_count: int | None, base: int = 0) -> list[str]:
    """What an anchored head says is missing. ``count`` records were read, from seq ``base`` on (the records
    before it are in an earlier segment that is not beside the log)."""
    if expect_head is None and expect_count is None:
        return []
    total = base + count
    held = f"the log holds {total} record{'s' if total != 1 else ''}" + (
        f" (seq {base} on beside it, the earlier ones in a segment that is not)" if base else "")
    if expect_count is not None:
        if total < expect_count:
            return [f"{held}, the anchor says {expect_count}: records were removed from the log's end"]
        if expect_count == 0:
            return []
        seq = expect_count - 1
        if seq < base:  # a count alone too: the records before base are only what the first record claims
            return [f"the anchored record seq {seq} is in an earlier segment that is not beside the log: put the "
                    "archived segments back beside it to check the anchor"]
        if expect_head is None:
            return []
        if seq not in hashes:
            return [f"the anchored record seq {seq} is missing ({held}): records were removed or replaced"]
        if hashes[seq] != expect_head:
            return [f"the record at seq {seq} has hash {hashes[seq][:16]}…, not the anchored {expect_head[:16]}…: "
                    "the log's end was cut and rewritten (or the anchor is of another log)"]
        return []
    assert expect_head is not None
    if expect_head not in hashes.values():
        where = " (or it is in an earlier segment that is not beside the log)" if base else ""
        return [f"no record has the anchored hash {expect_head[:16]}… ({held}): the anchored record was removed "
                f"(records cut from the log's end) or replaced (or the anchor is of another log){where}"]
    return []


@dataclass
class LogHead:
    """The end of an intact log, to anchor outside it (a ticket, a WORM store): how many records its chain holds
    (with those of the segments rotated out of it) and the last record's seq and hash (None for an empty log)."""

    path: Path
    records: int
    seq: int | None
    hash: str | None


def log_head(path: str | Path) -> LogHead:
    """The log's head; TraceError when its chain does not check out (anchor only an intact log)."""
    log = TraceLog(path)
    count = 0
    last: dict[str, Any] | None = None
    for line in log.scan():
        if line.torn:
            break  # the last line, a write in progress (or a dead writer's): the head is the record before it
        count += 1
        if line.problems:
            raise TraceError(f"{log.path}: the chain is broken ({line.problems[0]}); "
                             f"run `sieve trace verify {log.path}`: anchor only an intact log")
        last = line.record
    if last is None:
        return LogHead(log.path, 0, None, None)
    # seq counts from the chain's first record, in this file or a segment rotated out of it (``rotate_log``)
    return LogHead(log.path, last["seq"] + 1, last["seq"], last["hash"])


@dataclass
class Rotation:
    """What ``rotate_log`` did: the records seq ``first_seq``..``last_seq`` moved to ``archive``; the log now
    starts with ``marker``, the record (seq ``last_seq + 1``) that links it to the archive's last record."""

    path: Path
    archive: Path
    first_seq: int
    last_seq: int
    marker: dict[str, Any]


def rotate_log(path: str | Path) -> Rotation:
    """Move a log's records to an archived segment beside it and start the log again, the chain unbroken.

    The chain is checked first without the lock (appends go on meanwhile), then, under the log's lock, only what
    was appended since: appending processes wait for that and the rename, not for a check of the whole log, and
    then append to the new log. The file gets a second name, ``<stem>.<first seq>-<last seq><suffix>``
    (``trace.000000-000123.jsonl``; never an existing file), and a new file (the old one's mode and owner) replaces
    it under the log's name in one rename, holding one record: a segment marker whose ``prev`` is the archive's
    last hash and whose content names the archive. Appends go on from there, so ``check_log`` and
    ``TraceLog.find_record`` follow the chain back through every segment that stays beside the log. A symlinked
    log is rotated where it points. The log's name never stops naming a file, and on a failure before the rename
    nothing changes (the second name is removed again). Only an intact log with at least one trace since its last
    rotation is rotated."""
    given = Path(path)
    _require_log(given)
    log = TraceLog(os.path.realpath(given))  # the file a symlinked log names: the archive goes beside it
    successor = _continued_by(log.path)
    if successor is not None:
        raise TraceError(f"{given} is an archived segment: {successor.name} continues its chain (its first record "
                         f"links to it); rotate {successor} instead, and leave archives as they are")
    for _ in range(10):  # another rotation may move the file between the check and the lock: check again
        try:
            rotation = _rotate_once(log, given)
        except _RotatedMeanwhile:
            continue
        return rotation
    raise TraceError(f"cannot rotate {given}: it keeps being rotated by another process")


class _RotatedMeanwhile(Exception):
    pass


def _rotate_once(log: TraceLog, given: Path) -> Rotation:
    try:
        checked = os.stat(log.path)
    except OSError as exc:
        raise TraceError(f"cannot rotate {given}: {exc.strerror or exc}") from None
    first: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    traces = 0
    checked_to = 0
    for line in log.scan(limit=checked.st_size):  # without the lock
        if not line.terminated:
            break  # a write in progress or a torn tail: seen again under the lock
        if line.problems:
            raise _broken(log.path, line.problems[0])
        first = first or line.record
        last = line.record
        traces += not _is_segment_marker(line.record["trace"])  # type: ignore[index]
        checked_to = line.end
    with log._locked(create=False) as handle:
        opened = os.fstat(handle.fileno())
        if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
            raise _RotatedMeanwhile()
        try:
            _, _, end, prefix = log._tail(handle)  # a torn tail is set aside, as an append would
            if prefix:
                log._write_at(handle.fileno(), end, prefix)  # a whole last record without its newline gets it
                end += len(prefix)
        except OSError as exc:
            raise TraceError(f"cannot rotate {given}: {exc.strerror or exc}; nothing was changed") from None
        # what was appended while the log was checked
        for record in _appended(log.path, handle, checked_to, end, last):
            first = first or record
            last = record
            traces += not _is_segment_marker(record["trace"])
        if first is None or last is None or not traces:
            raise TraceError(f"nothing to rotate: {given} holds no trace"
                             + (" since its last rotation" if first is not None else ""))
        archive = log.path.with_name(f"{log.path.stem}.{first['seq']:06d}-{last['seq']:06d}{log.path.suffix}")
        _remove_interrupted_archives(log.path, opened)
        try:
            os.link(log.path, archive)
        except FileExistsError:
            raise TraceError(f"cannot rotate {given}: {archive} exists already as another file "
                             "than the log: compare the two, then move it away") from None
        except OSError as exc:
            raise TraceError(f"cannot rotate {given}: cannot give it the archive's name {archive.name} "
                             f"({exc.strerror or exc}; the file system must allow hard links)") from None
        marker_trace = {
            "schema": SEGMENT_SCHEMA,
            "previous": {"file": archive.name, "first_seq": first["seq"], "last_seq": last["seq"]},
            "rotated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        marker, line = _record_line(last["hash"], last["seq"] + 1, marker_trace)
        temporary = _temporary_beside(log.path, "rotate")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, line)
                os.fchmod(fd, opened.st_mode & 0o7777)  # the old file's mode, whatever this process's umask
                try:
                    os.fchown(fd, opened.st_uid, opened.st_gid)  # the service keeps writing to it
                except OSError:
                    pass
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, log.path)
        except BaseException as exc:
            temporary.unlink(missing_ok=True)
            archive.unlink(missing_ok=True)  # the log's name still names the file: nothing was moved
            if isinstance(exc, OSError):
                raise TraceError(f"cannot rotate {given}: {exc.strerror or exc} (writing the new log beside it); "
                                 "nothing was changed") from None
            raise
        _fsync_directory(log.path.parent)
    _remove_dead_temporaries(log.path, "rotate")
    return Rotation(given, archive, first["seq"], last["seq"], marker)


def _remove_interrupted_archives(path: Path, log_file: os.stat_result) -> None:
    """Remove the archive names a rotation killed between giving the log its second name and replacing it left:
    a name of the archives' form beside the log that is the log's own file (a finished rotation's archive is
    another file than the log that replaced it), so it grows with the log and would shadow the real archive."""
    pattern = re.compile(re.escape(path.stem) + r"\.\d{6,}-\d{6,}" + re.escape(path.suffix))
    _remove_beside(path, pattern, lambda entry, _: os.path.samestat(entry.stat(follow_symlinks=False), log_file))


def _remove_beside(path: Path, pattern: re.Pattern[str], doomed: Callable[[os.DirEntry[str], re.Match[str]], bool],
                   ) -> None:
    """Remove the entries of ``path``'s directory whose name ``pattern`` matches in full and that ``doomed`` (given
    the entry and the match) says are leftovers; what cannot be read or removed stays."""
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is not None:
            with contextlib.suppress(OSError):
                if doomed(entry, found):
                    os.unlink(entry.path)


def _continued_by(path: Path, limit: int = 10_000) -> Path | None:
    """The log beside ``path`` whose first record is a segment marker naming ``path`` as its previous segment (the
    file is then an archive), or None; at most ``limit`` entries of the directory are looked at."""
    try:
        entries = os.scandir(path.parent)
    except OSError:
        return None
    with entries:
        for count, entry in enumerate(entries):
            if count >= limit:
                return None
            if entry.name == path.name or not entry.is_file():
                continue
            previous = _previous_segment(Path(entry.path))
            if previous is not None and previous.path.name == path.name:
                return Path(entry.path)
    return None


def _broken(path: Path, problem: str) -> TraceError:
    return TraceError(f"{path}: the chain is broken ({problem}); run `sieve trace verify {path}`: rotate only an "
                      "intact log")


def _appended(path: Path, handle: Any, start: int, end: int, last: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The records between byte offsets ``start`` and ``end`` of a locked log, each checked as the next link of the
    chain after ``last`` (TraceError on the first that is not)."""
    found = []
    prev_hash, seq = (last["hash"], last["seq"] + 1) if last is not None else (GENESIS, 0)
    for raw in _read_at(handle, start, end - start).splitlines(keepends=True):
        if not raw.strip():
            continue
        data, problem = _line_problem(raw)
        if problem is not None:
            raise _broken(path, f"a line appended during the check{problem}")
        problems = _link_problems("a line appended during the check", raw, data, prev_hash, seq)
        if _is_segment_marker(data["trace"]) and (found or last is not None):
            problems.append("a segment marker in the middle of the log")
        if problems:
            raise _broken(path, f"the record seq {data['seq']} appended during the check does not chain on: "
                                f"{problems[0]}")
        found.append(data)
        prev_hash, seq = data["hash"], data["seq"] + 1
    return found


def verify_log(path: str | Path) -> tuple[int, list[str]]:
    """Check every record's hash and link; returns (records checked, problems found).

    Raises TraceError when the path is missing, a directory, unreadable or no trace log at all."""
    check = check_log(path)
    return check.records, check.problems


def load_trace(path: str | Path, trace_id: str | None = None, seq: int | None = None) -> dict[str, Any]:
    """A trace from a ``.json`` trace file or from a trace log (``.jsonl``).

    A record read from a log is checked against its hash and the chain up to it (``TraceLog.find``); a
    ``.json`` file holding one log record is checked against its own hash."""
    if not isinstance(path, (str, os.PathLike)):
        raise TraceError(f"a trace's path is a str or a pathlib.Path, got {type(path).__name__}")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
        raise TraceError(f"seq is a record number (an int), got {seq!r:.40}")
    path = Path(path)
    if path.suffix == ".jsonl":
        _require_file(path)
        return TraceLog(path).find(trace_id, seq)
    return _read_trace_file(path)[0]


def _require_file(path: Path) -> None:
    """TraceError unless ``path`` is a file: a directory, or nothing there, says so."""
    if path.is_dir():
        raise TraceError(f"{path} is a directory, not a trace")
    if not path.is_file():
        raise TraceError(f"trace not found: {path}")


def _read_trace_file(path: Path) -> tuple[dict[str, Any], bool]:
    """The trace in a ``.json`` file, and whether the file held it as one log record (checked against its hash)."""
    _require_file(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"cannot read the trace {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): "
                         "not a Sieve trace") from None
    try:  # a key twice: readers disagree on which counts (the hash the last, an editor or grep perhaps the first)
        data = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as exc:
        raise TraceError(f"{path} is not a trace Sieve wrote: the key {str(exc)!r} appears twice in one object "
                         "(readers disagree on which one counts)") from None
    except (ValueError, RecursionError) as exc:
        raise TraceError(f"{path} is not a readable trace: {exc}") from None
    problem = _not_unicode(data)
    if problem is not None:
        raise TraceError(f"{path} is not a readable trace: {problem}; no trace Sieve writes holds one")
    copied_record = isinstance(data, dict) and data.get("schema") == LOG_SCHEMA
    if copied_record:
        problem = _shape_problem(data)
        if problem is not None:
            raise TraceError(f"{path}: {problem}")
        if _content_hash(data) != data["hash"]:
            raise TraceError(f"{path}: the log record seq {data['seq']} does not match its hash: it was edited "
                             "after it was logged; refusing to use it")
        data = data["trace"]
    if not isinstance(data, dict) or data.get("schema") != TRACE_SCHEMA:
        raise TraceError(f"{path} is not a Sieve trace (expected schema {TRACE_SCHEMA})")
    return data, copied_record


def _not_unicode(data: Any) -> str | None:
    """Where parsed JSON holds text that is not Unicode (a lone surrogate, from an escape such as ``\\ud800``), which
    no UTF-8 file, hash or page can hold: said, or None."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        from engine.yamlsource import unreadable_strings

        found = unreadable_strings(data)
        return f"{'.'.join(found[0][0])}: {found[0][1]}" if found else "a key is not valid Unicode text"
    return None


@dataclass
class TraceSource:
    """Where a trace was read from and how far it is vouched for: ``verified`` when it is a record of an intact
    log chain, or a standalone file that matches the log record it says it was logged as."""

    verified: bool
    message: str
    log: str | None = None
    seq: int | None = None
    hash: str | None = None
    anchored_head: str | None = None  # the head anchored outside the log that vouches for the record (expect_head)

    def to_json(self) -> dict[str, Any]:
        return {"verified": self.verified, "message": self.message, "log": self.log, "seq": self.seq,
                "hash": self.hash, "anchored_head": self.anchored_head}


def load_trace_checked(path: str | Path, trace_id: str | None = None, seq: int | None = None,
                       log: str | Path | None = None, *, expect_head: str | None = None,
                       ) -> tuple[dict[str, Any], TraceSource]:
    """A trace (as ``load_trace``) and how far it is vouched for.

    A standalone trace file that was also logged records where (``log``: path, seq, hash): it is checked
    against that record (``log`` here overrides the recorded path, for a copy of the log) and refused when
    it differs or the record is not there. A file without one (``trace.log: null``, ``--no-log``) is
    returned marked unverified.

    The chain has no key: whoever can write the log can rewrite it from any record on, hashes and all.
    ``expect_head`` (a head anchored outside the log, ``sieve trace head``) closes that: the log must hold the
    anchored record with its chain intact (as ``check_log`` with it finds no problem) and the trace's record must
    be at or before it; otherwise TraceError."""
    trace, live, source = _load_trace_vouched(Path(path), trace_id, seq, log)
    if expect_head is None:
        return trace, source
    if live is None or source.seq is None or source.hash is None:
        raise TraceError(f"--expect-head: {path} is not a record of a trace log ({source.message}); an anchored head "
                         "vouches only for logged records")
    # The log the trace names (its live file: a record rotated out lies in a segment the check follows back to), its
    # chain checked against the anchor in the same read that finds the trace's record there with the hash it was
    # matched against (a log swapped between two reads would otherwise vouch for a record of another)
    check = check_log(live, expect_head=expect_head, holds=(source.seq, source.hash))
    verify = f"sieve trace verify {live} --expect-head {expect_head}"
    if check.problems:
        more = f" (and {len(check.problems) - 1} more: {verify})" if len(check.problems) > 1 else f" ({verify})"
        raise TraceError(f"--expect-head: the trace log {live} does not check out against the anchored head: "
                         f"{check.problems[0]}{more}; refusing the trace")
    assert check.anchored_seq is not None  # no problem: the anchored hash is a record of the intact chain
    if source.seq > check.anchored_seq:
        raise TraceError(f"--expect-head: the trace is record seq {source.seq}, logged after the anchored head (seq "
                         f"{check.anchored_seq}), which vouches only for the records up to it: anchor a later head "
                         f"(sieve trace head {live})")
    return trace, replace(
        source, anchored_head=expect_head,
        message=f"{source.message}; the head anchored outside the log (seq {check.anchored_seq}, hash "
                f"{expect_head[:12]}) is in it with the chain intact, so the record was not rewritten since")


def _load_trace_vouched(path: Path, trace_id: str | None, seq: int | None,
                        log: str | Path | None) -> tuple[dict[str, Any], Path | None, TraceSource]:
    """``load_trace_checked`` without an anchored head; in the middle, the log the trace is a record of (the log
    given, or the one a trace file names: its live file, whichever segment holds the record; None: unverified)."""
    if path.suffix == ".jsonl":
        if log is not None:
            raise TraceError("--log is for a standalone trace file (.json); this is a trace log")
        _require_file(path)
        record, holder = TraceLog(path).locate_record(trace_id, seq)
        where = f"the trace log {path}" if holder == path else f"{holder}, a segment rotated out of the trace log {path}"
        return record["trace"], path, TraceSource(
            True, f"record seq {record['seq']} of {where}; the chain checks out up to it", str(holder),
            record["seq"], record["hash"])
    trace, copied_record = _read_trace_file(path)
    if copied_record:
        return trace, None, TraceSource(False, "unverified: a log record copied out of its log, checked only against "
                                        "its own hash (which anyone can recompute); check it in its log")
    where = trace.get("log")
    if where is None:
        if log is not None:
            raise TraceError(f"{path} records no trace log it was appended to; --log has nothing to check it against")
        return trace, None, TraceSource(False, "unverified: this trace file was not logged (trace.log: null, or "
                                        "--no-log), so nothing vouches that it is what the engine wrote")
    if (not isinstance(where, dict) or not isinstance(where.get("path"), str)
            or not isinstance(where.get("seq"), int) or isinstance(where.get("seq"), bool)
            or not isinstance(where.get("hash"), str) or not _HEX64.fullmatch(where["hash"])):
        raise TraceError(f"{path}: its 'log' field {_clip(where)} is not {{path, seq, hash}}; refusing the file")
    target = Path(log) if log is not None else Path(where["path"])
    label = f"{target} seq {where['seq']}"
    if not target.is_file():
        raise TraceError(
            f"{path} was logged to {where['path']} (seq {where['seq']}), "
            + (f"and {target} is not a file" if log is not None else "which is not found here")
            + "; pass --log with a copy of that log to check the file against its record"
        )
    record, holder = TraceLog(target).locate_record(seq=where["seq"])
    if record["hash"] != where["hash"]:
        raise TraceError(
            f"{path} does not match its log record: {label} has hash {record['hash']}, the file records "
            f"{where['hash']}; refusing it"
        )
    content = {k: v for k, v in trace.items() if k != "log"}
    if canonical(content) != canonical(record["trace"]):
        at = _first_difference(content, record["trace"], "") or "(its serialisation)"
        raise TraceError(
            f"{path} differs from the record it was logged as ({label}) at {at}; refusing a file edited after it "
            "was written"
        )
    segment = "" if holder == target else f" (in {holder.name}, a segment rotated out of it)"
    return trace, target, TraceSource(
        True, f"matches record seq {where['seq']} of the trace log {target}{segment} (hash {where['hash'][:12]}; the "
        "chain checks out up to it)", str(holder), where["seq"], where["hash"])


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    """The dotted path of the first place two JSON values differ, with both values; None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            where = f"{path}.{key}" if path else str(key)
            if key not in b:
                return f"{where} (only in the file: {_clip(a[key])})"
            if key not in a:
                return f"{where} (only in the log: {_clip(b[key])})"
            found = _first_difference(a[key], b[key], where)
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for position, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{position}]")
            if found is not None:
                return found
        if len(a) != len(b):
            return f"{path} ({len(a)} entries in the file, {len(b)} in the log)"
        return None
    if canonical(a) != canonical(b):
        return f"{path} (the file has {_clip(a)}, the log {_clip(b)})"
    return None


def _refuse_a_planted_link(link: Path) -> None:
    """SieveError when a link on the way from ``link`` to its target (each hop: one's own link may lead to another's)
    is a symlink another user owns in a sticky world-writable directory (/tmp): the kernel's ``protected_symlinks``
    rule, which a rename over the link's target would bypass (another user's link there, pointing at one of this
    user's files, had that file replaced by the output)."""
    import stat

    for _ in range(40):  # the kernel's own limit on links followed
        try:
            if not stat.S_ISLNK(os.lstat(link).st_mode):
                return
            directory, owner = os.stat(link.parent), os.lstat(link).st_uid
            following = link.parent / os.readlink(link)
        except OSError:
            return
        shared = directory.st_mode & stat.S_ISVTX and directory.st_mode & stat.S_IWOTH
        if shared and owner not in (os.geteuid(), directory.st_uid):
            raise SieveError(f"{link} is a symlink another user (uid {owner}) made in the shared directory "
                             f"{link.parent}: refusing to write through it (it could point at any of your files); "
                             "write elsewhere")
        link = following


def atomic_write_target(path: str | Path) -> Path:
    """The file an atomic write to ``path`` replaces: the target of a symlink (followed to the end), else ``path``.

    A target that exists but is not a regular file (a FIFO, a character or block device, a socket) is refused
    with a SieveError: renaming a new file over it would destroy it (``--json-out /dev/full`` run as root once
    replaced the device). A directory is left to the write, which fails on it with the OS's own error.
    """
    import stat

    path = Path(path)
    if path.is_symlink():
        _refuse_a_planted_link(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:  # os.stat follows every link, /dev/stdout's /proc/self/fd/1 included (realpath names it "pipe:[N]")
        found = os.stat(path)
    except OSError:  # absent (the usual case), or a path the write itself will report on
        return target
    shown = target if target != path and os.path.lexists(target) else path  # not /proc/N/fd/pipe:[M]
    via = f" (the target of symlink {path})" if shown != path else ""
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    for test, kind in kinds:
        if test(found.st_mode):
            raise SieveError(f"{shown}{via} is {kind}, not a regular file: refusing to replace it")
    for descriptor, stream in ((1, "standard output"), (2, "standard error")):
        try:
            opened = os.fstat(descriptor)
        except OSError:
            continue
        if (opened.st_dev, opened.st_ino) == (found.st_dev, found.st_ino):
            raise SieveError(f"{path} is this process's {stream}: replacing it would lose what is printed there; "
                             "give the output a file of its own")
    return target


def _write_atomic(path: str | Path, write: Any) -> None:
    """Call ``write(handle)`` on a temporary file beside the target, fsync it, and rename it over the target.

    Through a symlink, the symlink's target is replaced (the link stays); an existing file keeps its permission
    bits, a new one is made 0640 like the trace log (less by the umask: what these files hold, a trace, an eval's
    users, a report, is the log's content); a FIFO, device or socket is refused (:func:`atomic_write_target`). On
    any failure (a full disk, a directory at the target, Ctrl-C) the temporary file is removed and the target is
    untouched.
    """
    target = atomic_write_target(path)
    try:
        keep_mode: int | None = os.stat(target).st_mode & 0o777
    except OSError:
        keep_mode = None
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_beside(target, "tmp")
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_mode is not None:
            os.chmod(temporary, keep_mode)
        os.replace(temporary, target)
    except BaseException:  # no half-written file left behind
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    _remove_dead_temporaries(target, "tmp")


def _temporary_beside(target: Path, kind: str) -> Path:
    """A new name beside ``target`` for a file that becomes it by a rename: ``.NAME.KIND-PID-RANDOM``, NAME cut to
    96 characters (a target name near the file system's limit still gets one)."""
    return target.with_name(f".{target.name[:96]}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_dead_temporaries(target: Path, kind: str) -> None:
    """Remove the temporaries of ``target`` (``_temporary_beside``) left by processes killed while writing them
    (SIGKILL, a power cut): their pid no longer runs, or runs a process started after the file was last written."""
    pattern = re.compile(re.escape(f".{target.name[:96]}.{kind}-") + r"(\d+)-[0-9a-f]{8}")
    _remove_beside(target, pattern, lambda entry, found: entry.is_file(follow_symlinks=False) and not process_exists(
        int(found[1]), entry.stat(follow_symlinks=False).st_mtime))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so readers never see half a file (see
    :func:`_write_atomic`: symlinks are written through, a FIFO or device is refused)."""
    _write_atomic(path, lambda handle: json.dump(data, handle, indent=2, ensure_ascii=False))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text to ``path`` the way :func:`write_json_atomic` writes JSON."""
    _write_atomic(path, lambda handle: handle.write(text))
