"""``sieve batch``: run a file of queries through one warmed pipeline, offline, resumably.

The queries file (JSONL: ``id``, ``text`` and optionally ``history``, ``user``, ``as_of``, ``language``; a BEIR
``queries.jsonl`` as it is) is checked whole before any query runs, every problem reported at once as
``FILE:LINE: message``. Results go to ``OUT.partial``, one line per query in input order, flushed as written,
with a sidecar ``OUT.partial.meta.json`` holding what must not change if the batch is resumed (the config's,
index's and queries file's sha256, the default user and ``as_of``, ``--top``, the trace log); the partial file is
renamed to ``OUT`` once every query is done. A batch stopped by Ctrl-C, SIGTERM, a full disk or a crash leaves a
partial file whose whole lines are results: ``--resume`` checks the sidecar (and that the log still holds the traces
of the lines written), drops a torn last line and goes on.

The file is read twice (checked, then run) rather than held in memory, and at most ``2 x workers`` queries are
in flight at once, so memory does not grow with the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine import __version__
from engine.config import did_you_mean
from engine.errors import QueryError, SieveError, StageError
from engine.model import UserContext, iso_moment, not_a_moment
from engine.paths import fsync_path
from engine.strictness import a_json_kind, refused_keys, strict_object
from engine.yamlsource import (NotJson, refuse_json_constant, refused_key_problem, unicode_problem, unmatchable_problem,
                               unreadable_strings)

# /2 (Sieve 0.8.0): the trace log is one of the values a resumed batch must share (/1, up to 0.7.0, did not require
# it): an engine that knows only /1 refuses a /2 sidecar rather than resuming it without that check
SIDECAR_SCHEMA = "sieve.batch/2"
EARLIER_SIDECAR_SCHEMAS = frozenset({"sieve.batch/1"})
#: A line's keys: ours, then BEIR's (``_id`` for ``id``; ``metadata`` is ignored).
QUERY_KEYS = ("id", "text", "history", "user", "as_of", "language")
BEIR_KEYS = ("_id", "metadata")
USER_KEYS = tuple(UserContext.model_fields)
MAX_LISTED_PROBLEMS = 100  # a file of a million bad lines is described by its first 100 problems and a count
FSYNC_EVERY_S = 1.0  # the partial file is flushed every line and fsynced at most this often (and at the end)
MAX_LISTED_FAILURES = 20  # failed queries named in the summary


class BatchInputError(SieveError):
    """The queries file has problems; carries every one found (``FILE:LINE: message``)."""

    def __init__(self, path: Path, problems: list[str]):
        self.problems = problems
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} {noun} in the queries file {path}; no query was run:\n" + "\n".join(listed)
                         + (f"\n... and {more} more" if more else ""))


# ---------------------------------------------------------------------------- the queries file


@dataclass(frozen=True)
class BatchQuery:
    """One line of the queries file, checked: what :meth:`engine.pipeline.Pipeline.make_query` is given."""

    line: int
    id: str
    text: str
    history: tuple[str, ...] = ()
    user: UserContext | None = None  # None: the batch's default user
    as_of: datetime | None = None  # None: the batch's as_of
    language: str | None = None


@dataclass
class QueriesFile:
    """A checked queries file: its sha256 and each query's id and line, in order (the texts are read again when
    the batch runs, not kept)."""

    path: Path
    sha256: str
    ids: list[str]
    lines: list[int]
    with_history: int = 0  # queries that give earlier turns


def _lines(path: Path, digest: Any = None) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the line break) of each line; ``digest`` is fed every byte of the file. The file
    must be a regular file: it is read twice (checked, then run), which a pipe or a device cannot be."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SieveError(f"queries file not found: {path}") from None
    except OSError as exc:
        raise SieveError(f"cannot read the queries file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
        kind = ("a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "not a file")
        raise SieveError(f"the queries file {path} is {kind} (/dev/stdin, a process substitution <(...) or a named "
                         "pipe are): it must be a regular file, because sieve batch reads it twice, every line checked "
                         "before any query runs, then again to run them; write the queries to a file first")
    try:
        handle = open(path, "rb")
    except IsADirectoryError:
        raise SieveError(f"queries file {path} is a directory; give a JSONL file") from None
    except FileNotFoundError:
        raise SieveError(f"queries file not found: {path}") from None
    except OSError as exc:
        raise SieveError(f"cannot read the queries file {path}: {exc.strerror or exc}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if digest is not None:
                digest.update(raw)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                raw = raw[3:]
            yield number, raw.rstrip(b"\r\n")


def _parse_as_of(value: Any, what: str) -> tuple[datetime | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, (f"{what} must be an ISO 8601 date or time string (e.g. 2026-01-31T12:00:00Z), not "
                      f"{a_json_kind(value)}")
    moment = iso_moment(value)
    if moment is None:
        return None, f"{what} {value!r}: {not_a_moment(value)}"
    return moment, None


def _parse_user(value: Any) -> tuple[UserContext | None, list[str]]:
    """A line's ``user`` object, typed strictly (no number read as text); None (the key left out): the batch's
    default. A ``null`` user is refused by the caller."""
    if value is None:
        return None, []
    if not isinstance(value, dict):
        return None, [f"user must be an object of {', '.join(USER_KEYS)}, not {a_json_kind(value)}"]
    problems = [f"user: unknown key '{key}'{did_you_mean(key, USER_KEYS)}; known: {', '.join(USER_KEYS)}"
                for key in value if key not in USER_KEYS]
    fields: dict[str, Any] = {}
    for key in USER_KEYS:
        given = value.get(key)
        if given is None:
            continue
        if key == "user_id":
            if not isinstance(given, str):
                problems.append(f"user.user_id must be a string, not {a_json_kind(given)}")
            fields[key] = given
        elif key == "attributes":
            if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
                problems.append("user.attributes must be an object of strings (NAME: VALUE), not "
                                + (a_json_kind(given) if not isinstance(given, dict) else "one holding "
                                   + a_json_kind(next(v for v in given.values() if not isinstance(v, str)))))
            fields[key] = given
        else:
            if not isinstance(given, list) or not all(isinstance(item, str) for item in given):
                problems.append(f"user.{key} must be a list of strings, not "
                                + (a_json_kind(given) if not isinstance(given, list) else "one holding "
                                   + a_json_kind(next(v for v in given if not isinstance(v, str)))))
            fields[key] = tuple(given) if isinstance(given, list) else given
    if problems:
        return None, problems
    return UserContext(**fields), []


def _parse_line(raw: bytes) -> tuple[BatchQuery | None, list[str]]:
    """One non-blank line as a query (line number 0: the caller sets it), or what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"]
    try:
        # a key given twice is marked, not kept silently; NaN and Infinity are not JSON
        record = json.loads(text, object_pairs_hook=strict_object, parse_constant=refuse_json_constant)
    except json.JSONDecodeError as exc:
        return None, [f"not JSON ({exc.msg}, column {exc.colno})"]
    except NotJson as exc:
        return None, [f"not JSON ({exc})"]
    if not isinstance(record, dict):
        return None, [f"expected a JSON object with id and text, got {a_json_kind(record)}"]
    flawed = [refused_key_problem(path, flaw) for path, flaw in refused_keys(record)]
    if flawed:  # which of the two values was meant cannot be told: nothing else is judged on the line
        return None, flawed
    problems = [f"unknown key '{key}'{did_you_mean(key, QUERY_KEYS + BEIR_KEYS)}; known: {', '.join(QUERY_KEYS)} (and "
                "BEIR's _id, metadata)" for key in record if key not in QUERY_KEYS and key not in BEIR_KEYS]
    # a value no trace log can hold, wherever it is (a user's group as much as the text): said here, before any query
    # runs, not by the trace log at the query that carries it; BEIR's metadata is not read
    problems.extend(f"{'.'.join(path)}: {problem}" for path, problem in unreadable_strings(
        {key: value for key, value in record.items() if key != "metadata"}))
    if "id" in record and "_id" in record:
        problems.append("give id or BEIR's _id, not both")
    raw_id = record.get("id", record.get("_id"))
    query_id: str | None = None
    if raw_id is None:
        problems.append("no id: every query needs an \"id\" (or BEIR's \"_id\"), a string or an integer")
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        problems.append(f"id must be a string or an integer, not {a_json_kind(raw_id)}")
    elif not str(raw_id).strip():
        problems.append("id is empty")
    elif isinstance(raw_id, str) and unicode_problem(raw_id) is not None:
        pass  # said above, with every value that is not Unicode text
    elif isinstance(raw_id, str) and unmatchable_problem(raw_id) is not None:
        # an id that is only a zero-width space passes .strip(), and one with a NUL reads as another id
        problems.append(f"id {unmatchable_problem(raw_id)}: give an id one can read")
    else:
        query_id = str(raw_id)
    query_text = record.get("text")
    if query_text is None:
        problems.append("no text: every query needs a \"text\"")
    elif not isinstance(query_text, str):
        problems.append(f"text must be a string, not {a_json_kind(query_text)}")
    history = record.get("history")
    if history is not None and (not isinstance(history, list) or not all(isinstance(t, str) for t in history)):
        problems.append("history must be a list of the earlier turns (strings), oldest first, not "
                        + (a_json_kind(history) if not isinstance(history, list) else "one holding "
                           + a_json_kind(next(t for t in history if not isinstance(t, str)))))
    if "user" in record and record["user"] is None:
        # the server reads `"user": null` as anonymous; here it would have meant the batch's default user, who may
        # see more: refused rather than read either way
        user, user_problems = None, ["user: null is not a user; leave the key out for the batch's default user, or "
                                     "give {} for an anonymous one"]
    else:
        user, user_problems = _parse_user(record.get("user"))
    problems.extend(user_problems)
    as_of, as_of_problem = _parse_as_of(record.get("as_of"), "as_of")
    if as_of_problem:
        problems.append(as_of_problem)
    language = record.get("language")
    if language is not None and not isinstance(language, str):
        problems.append(f"language must be a language tag such as en or zh-CN, not {a_json_kind(language)}")
    if problems:
        return None, problems
    assert query_id is not None and isinstance(query_text, str)
    return BatchQuery(0, query_id, query_text, tuple(history or ()), user, as_of, language), []


def _make_query(pipeline: Any, query: BatchQuery, default_user: UserContext, default_as_of: datetime) -> Any:
    """The pipeline's Query for ``query`` (its limits checked, as ``sieve search`` checks them)."""
    return pipeline.make_query(query.text, history=query.history,
                               user=query.user if query.user is not None else default_user,
                               as_of=query.as_of if query.as_of is not None else default_as_of,
                               language=query.language)


def read_queries(path: Path, pipeline: Any, default_user: UserContext, default_as_of: datetime) -> QueriesFile:
    """Check the whole queries file against ``pipeline``'s limits (no index or model is needed): every problem is
    raised at once as a :class:`BatchInputError`. Blank lines are skipped; a file with no query is an error."""
    digest = hashlib.sha256()
    problems: list[str] = []
    ids: list[str] = []
    lines: list[int] = []
    first_line: dict[str, int] = {}
    with_history = 0
    for number, raw in _lines(path, digest):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        query, found = _parse_line(raw)
        if query is not None:
            seen = first_line.setdefault(query.id, number)
            if seen != number:
                found.append(f"id {query.id!r} appears a second time (first at {path}:{seen})")
            else:
                try:
                    _make_query(pipeline, query, default_user, default_as_of)
                except QueryError as exc:
                    found.append(str(exc))
        problems.extend(f"{where}: {message}" for message in found)
        if query is not None:
            ids.append(query.id)
            lines.append(number)
            with_history += bool(query.history)
    if not ids and not problems:
        raise SieveError(f"the queries file {path} holds no queries (it is empty or has only blank lines)")
    if problems:
        raise BatchInputError(path, problems)
    return QueriesFile(path, digest.hexdigest(), ids, lines, with_history)


def iter_queries(queries: QueriesFile, start: int = 0) -> Iterator[BatchQuery]:
    """The checked queries again, from the ``start``-th on, read from the file; the file must not have changed
    since it was checked (a line that no longer parses, another id, or another sha256 at the end is an error)."""
    digest = hashlib.sha256()
    position = 0
    changed = SieveError(f"the queries file {queries.path} changed while the batch ran (it no longer is the file "
                         "that was checked)")
    for number, raw in _lines(queries.path, digest):
        if not raw.strip():
            continue
        if position < start:
            position += 1
            continue
        query, problems = _parse_line(raw)
        if query is None or position >= len(queries.ids) or query.id != queries.ids[position]:
            raise changed
        position += 1
        yield BatchQuery(number, query.id, query.text, query.history, query.user, query.as_of, query.language)
    if position != len(queries.ids) or digest.hexdigest() != queries.sha256:
        raise changed


# ---------------------------------------------------------------------------- the output and its sidecar


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.meta.json")


def trace_log_target(pipeline: Any, log: Path | None, no_log: bool) -> Path | None:
    """The log a batch appends its traces to: ``--log``, else the config's ``trace.log``; None with ``--no-log`` or a
    config that logs nothing."""
    return None if no_log else pipeline.log_target(log)


def batch_identity(queries: QueriesFile, pipeline: Any, index_manifest_sha256: str | None, default_user: UserContext,
                   default_as_of: datetime, top: int | None, trace_log: Path | None = None) -> dict[str, Any]:
    """What the sidecar records: the values a resumed batch must share with the one it continues. ``trace_log``: the
    log the traces go to (``trace_log_target``), recorded resolved (absolute, symlinks followed), None for none."""
    return {
        "schema": SIDECAR_SCHEMA,
        "engine_version": __version__,
        "started_at": datetime.now(timezone.utc).isoformat(),
        "queries": {"path": str(queries.path), "sha256": queries.sha256, "count": len(queries.ids)},
        "config": {"path": str(pipeline.compiled.source_file), "sha256": pipeline.compiled.config_sha256,
                   **({"set": list(pipeline.settings)} if pipeline.settings else {})},
        "index": {"path": str(pipeline.index_path) if pipeline.index_path is not None else None,
                  "manifest_sha256": index_manifest_sha256},
        "user": default_user.model_dump(mode="json"),
        "as_of": default_as_of.isoformat(),
        "top": top,
        "trace_log": os.path.realpath(trace_log) if trace_log is not None else None,
    }


def read_sidecar(out: Path) -> dict[str, Any]:
    """The sidecar of ``out``'s partial file; a SieveError saying how to discard the partial file when it is
    missing or unreadable (the batch it belongs to cannot be told)."""
    meta = sidecar_path(out)
    discard = (f"without it, what {partial_path(out).name} was computed with cannot be checked: discard it with "
               "--overwrite (or delete it) and run the batch again")
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SieveError(f"{partial_path(out)} has no sidecar {meta.name}; {discard}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SieveError(f"the sidecar {meta} cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                         f"{discard}") from None
    if isinstance(data, dict) and data.get("schema") in EARLIER_SIDECAR_SCHEMAS:
        raise SieveError(f"{partial_path(out)} was begun by an earlier Sieve ({_began_by(data)}; its sidecar is "
                         f"{data['schema']}): {ONE_ENGINE}")
    if not isinstance(data, dict) or data.get("schema") != SIDECAR_SCHEMA:
        raise SieveError(f"the sidecar {meta} is not a {SIDECAR_SCHEMA} file; {discard}")
    return data


# A batch's lines come from one engine: another version may rank otherwise, and the finished file would then be
# neither version's (and the sidecar that said so is removed when it is done)
ONE_ENGINE = (f"a batch's lines come from one engine, so finish it with that version, or discard it with --overwrite "
              f"and run it again with this one ({__version__})")


def _began_by(recorded: dict[str, Any]) -> str:
    version = recorded.get("engine_version")
    return f"Sieve {version}" if isinstance(version, str) else "a Sieve that recorded no version"


def _short(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False) if not isinstance(value, str) else value


NO_LOG = "no log (--no-log, or a config whose trace.log is null)"


def sidecar_differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the batch recorded in a sidecar and the one asked for now, each a sentence
    ("the config changed: sha256 abc... then, def... now")."""
    def get(data: dict[str, Any], *path: str) -> Any:
        for key in path:
            data = data.get(key) if isinstance(data, dict) else None
        return data

    checks = [
        (("engine_version",), "the engine changed (a batch's lines come from one engine):"),
        (("config", "sha256"), "the config changed (as compiled, --set included): sha256"),
        (("index", "manifest_sha256"), "the index changed: manifest sha256"),
        (("queries", "sha256"), "the queries file changed: sha256"),
        (("user",), "the default user (--user, --role, --group, --jurisdiction, --attribute) changed:"),
        (("as_of",), "the batch's as_of (--as-of) changed:"),
        (("top",), "--top changed:"),
        (("trace_log",), "the trace log (--log, --no-log or the config's trace.log) changed:"),
    ]
    differences = []
    for path, what in checks:
        then, current = get(recorded, *path), get(now, *path)
        if path == ("trace_log",):
            then, current = then or NO_LOG, current or NO_LOG
        if path == ("as_of",) and isinstance(then, str) and isinstance(current, str):
            try:
                if datetime.fromisoformat(then) == datetime.fromisoformat(current):
                    continue
            except ValueError:
                pass
        if then != current:
            differences.append(f"{what} {_short(then)} when it started, {_short(current)} now")
    return differences


@dataclass
class Written:
    """What the result lines already in a partial file say (a resumed batch counts them in its summary)."""

    lines: int = 0
    failed: int = 0
    empty: int = 0
    degraded: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)  # the first few: id and error
    last_trace: tuple[str, str] | None = None  # (query id, trace id) of the last line that names a trace


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not isinstance(
            record.get("results"), list):
        return None
    return record


def _count(written: Written, record: dict[str, Any], line: int | None) -> None:
    written.lines += 1
    if record.get("error") is not None:
        written.failed += 1
        if len(written.failures) < MAX_LISTED_FAILURES:
            written.failures.append({"id": record["id"], "line": line, "error": record["error"]})
    elif not record["results"]:
        written.empty += 1
    written.degraded += bool(record.get("degraded"))


def read_partial(fd: int, partial: Path, queries: QueriesFile) -> Written:
    """Check a partial file's lines (``fd``: it, open and locked) against the queries, in order; a torn last line
    (no line break: the writer stopped mid-line) is cut off the file. Anything else that is not a result line of
    this batch is a SieveError (the file was changed by something else)."""
    written = Written()
    offset = 0
    with open(partial, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                os.ftruncate(fd, offset)  # torn: that query runs again
                os.fsync(fd)
                break
            record = _record(raw)
            if record is None:
                raise SieveError(f"{partial}:{number}: not a result line of sieve batch; the file was changed by "
                                 "something else: discard it with --overwrite")
            if written.lines >= len(queries.ids) or record["id"] != queries.ids[written.lines]:
                expected = queries.ids[written.lines] if written.lines < len(queries.ids) else "(no more queries)"
                raise SieveError(f"{partial}:{number}: holds id {record['id']!r} where query {expected!r} was "
                                 "expected (results are written in the order of the queries file); discard it with "
                                 "--overwrite")
            _count(written, record, queries.lines[written.lines])
            if isinstance(record.get("trace_id"), str):
                written.last_trace = (record["id"], record["trace_id"])
            offset += len(raw)
    return written


def check_logged(written: Written, log: Path, partial: Path) -> None:
    """Refuse to resume a partial file whose last line's trace (``written.last_trace``) is not in ``log``: the log the
    batch appended to was removed or replaced since, or the segment holding the trace was moved away after a
    rotation (a resume would begin a new chain, or leave the lines written naming traces that cannot be checked). The log is read up to that record (its chain checked), back through the segments
    a rotation left beside it."""
    from engine.errors import TraceError
    from engine.trace import TraceLog

    if written.last_trace is None:
        return
    query_id, trace_id = written.last_trace
    problem = None
    if not log.exists():
        problem = "it does not exist"
    else:
        try:
            TraceLog(log).locate_record(trace_id=trace_id)
        except TraceError as exc:
            problem = str(exc)
    if problem is not None:
        raise SieveError(f"cannot resume {partial}: its line for query {query_id!r} names the trace {trace_id}, which "
                         f"the trace log {log} does not hold ({problem}): put back what was moved (the log, or the "
                         "segment of it that holds the trace, archived beside it by `sieve trace rotate`) and resume, "
                         "or discard the partial file with --overwrite")


def partial_in_use(partial: Path) -> bool:
    """Whether another ``sieve batch`` holds the partial file's lock (``lock_partial``): it is running, not
    interrupted."""
    try:
        fd = os.open(partial, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def in_use_message(partial: Path) -> str:
    return f"another sieve batch is writing {partial} (it holds its lock); wait for it to end"


def lock_partial(partial: Path, *, fresh: bool) -> int:
    """Open (creating it when ``fresh``) and lock the partial file for appending; another ``sieve batch`` writing
    it is an error rather than two writers. ``fresh``: the file is emptied, once locked."""
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_APPEND | (os.O_CREAT if fresh else 0), 0o640)  # as the trace log
    except OSError as exc:
        raise SieveError(f"cannot write {partial}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SieveError(in_use_message(partial)) from None
    try:
        still_there = os.path.samestat(os.fstat(fd), os.stat(partial))
    except OSError:
        still_there = False
    if not still_there:  # another batch finished and renamed this very file to its --out between open and lock
        os.close(fd)
        raise SieveError(f"{partial} was renamed while this batch opened it (another batch writing the same --out "
                         "finished): run the command again")
    if fresh:
        os.ftruncate(fd, 0)
    return fd


# ---------------------------------------------------------------------------- running


class StopRequest:
    """Set by SIGINT/SIGTERM while a batch runs: the batch stops after the line in hand, its partial file whole. A
    second signal interrupts at once (KeyboardInterrupt), for a query that would take too long to finish."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM ask the batch to stop at the next line boundary (see :class:`StopRequest`); the previous
    handlers are restored after. Outside the main thread (no handlers can be set there) nothing is installed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: Any) -> None:
        if request.signal is not None:
            raise KeyboardInterrupt
        request.signal = signum

    # a signal the process was started ignoring (SIGINT for `sieve batch ... &` in a script) stays ignored: a Ctrl-C
    # meant for the script's foreground must not stop its background batch
    watched = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, handle) for sig in watched}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Outcome:
    """One query's run, as a worker hands it back to the writer."""

    query: BatchQuery
    result: Any = None  # RunResult
    error: str | None = None
    latency_ms: float = 0.0


@dataclass
class BatchSummary:
    """What a batch did: counts over the whole output (resumed lines included), latency of the queries run now."""

    output: Path
    partial: Path
    queries: int
    run: int
    resumed: int
    failed: int
    empty: int
    degraded: int
    latency_ms: dict[str, float]
    wall_s: float
    workers: int
    top: int | None
    as_of: str
    user: dict[str, Any]
    config: str
    config_sha256: str
    index: dict[str, Any]
    trace_log: str | None
    failures: list[dict[str, Any]]
    complete: bool
    stopped_by: str | None = None  # SIGINT / SIGTERM when a signal stopped the batch
    warm_up_warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "engine_version": __version__,
            "output": str(self.output) if self.complete else None,
            "partial": None if self.complete else str(self.partial),
            "complete": self.complete,
            "stopped_by": self.stopped_by,
            "queries": self.queries,
            "run": self.run,
            "resumed": self.resumed,
            "failed": self.failed,
            "empty": self.empty,
            "degraded": self.degraded,
            "latency_ms": self.latency_ms,
            "wall_s": round(self.wall_s, 3),
            "queries_per_s": round(self.run / self.wall_s, 2) if self.wall_s > 0 else None,
            "workers": self.workers,
            "top": self.top,
            "asked_as": {"user": self.user, "as_of": self.as_of},
            "config": self.config,
            "config_sha256": self.config_sha256,
            "index": self.index,
            "trace_log": self.trace_log,
            "failures": self.failures,
            "warm_up_warnings": self.warm_up_warnings,
        }


def _run_one(pipeline: Any, query: BatchQuery, default_user: UserContext, default_as_of: datetime) -> Outcome:
    """Run one query; a stage failure (``on_error: fail``) is the query's error, not the batch's."""
    began = time.perf_counter()
    try:
        result = pipeline.run(_make_query(pipeline, query, default_user, default_as_of))
    except StageError as exc:
        return Outcome(query, error=str(exc), latency_ms=(time.perf_counter() - began) * 1000.0)
    return Outcome(query, result=result, latency_ms=(time.perf_counter() - began) * 1000.0)


def _line(outcome: Outcome, top: int | None) -> dict[str, Any]:
    if outcome.error is not None:
        return {"id": outcome.query.id, "trace_id": None, "results": [], "degraded": False, "error": outcome.error}
    result = outcome.result
    chosen = result.results if top is None else result.results[:top]
    return {
        "id": outcome.query.id,
        "trace_id": result.trace["trace_id"],
        "results": [{"rank": rank, "doc_id": c.doc_id, "score": float(c.score)}
                    for rank, c in enumerate(chosen, start=1)],
        "degraded": bool(result.degraded),
    }


class PartialLost(SieveError):
    """The partial file was removed (or another file put in its place) while the batch ran: the lines written to it
    are lost with it, so there is nothing to keep or resume."""


def partial_problem(fd: int, partial: Path) -> str | None:
    """None while ``partial`` still names the file open as ``fd``; else what happened to it."""
    try:
        now = os.stat(partial)
    except FileNotFoundError:
        directory = partial.parent
        return (f"its directory {directory} was removed" if not directory.is_dir()
                else "it was removed") + " while the batch ran"
    except OSError as exc:
        return f"it cannot be looked at ({exc.strerror or exc})"
    opened = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
        return "another file was put in its place while the batch ran"
    return None


class _PartialWriter:
    """Appends whole lines to the locked partial file: each flushed as written, fsynced at most every
    FSYNC_EVERY_S (when the file is also checked to be still there: ``PartialLost`` if not); a write that fails (a
    full disk) is cut back, so the file keeps only whole lines."""

    def __init__(self, fd: int, partial: Path):
        self.fd = fd
        self.partial = partial
        self.size = os.fstat(fd).st_size
        self.synced_at = time.monotonic()

    def check(self) -> None:
        """PartialLost when the partial file is no longer at its path."""
        problem = partial_problem(self.fd, self.partial)
        if problem is not None:
            raise PartialLost(f"{self.partial} is gone: {problem}")

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise SieveError(f"could not write {self.partial}: {exc.strerror or exc}") from None
        self.size += len(data)
        if time.monotonic() - self.synced_at >= FSYNC_EVERY_S:
            self.sync()
            self.check()  # once a second: a batch whose results file is gone stops, not runs on for nothing

    def sync(self) -> None:
        os.fsync(self.fd)
        self.synced_at = time.monotonic()


def run_batch(
    pipeline: Any,
    queries: QueriesFile,
    out: Path,
    fd: int,
    written: Written,
    *,
    default_user: UserContext,
    default_as_of: datetime,
    top: int | None = None,
    workers: int = 1,
    log: Path | None = None,
    no_log: bool = False,
    stop: StopRequest | None = None,
    progress: Callable[[int], None] | None = None,
) -> BatchSummary:
    """Run the queries after the ``written.lines`` already in the partial file (``fd``: open and locked), appending a
    line per query in input order, each trace logged first (the config's log, ``log``, or none with ``no_log``);
    when all are done, rename the partial file to ``out`` and remove the sidecar. ``workers`` threads share the
    warmed pipeline, at most twice as many queries in flight. A SieveError other than a stage's failure (a trace
    that cannot be logged, a full disk) stops the batch with the partial file whole; so does ``stop``."""
    partial = partial_path(out)
    writer = _PartialWriter(fd, partial)
    latencies: list[float] = []
    counts = Written(written.lines, written.failed, written.empty, written.degraded, list(written.failures))
    log_target: Path | None = None
    began = time.perf_counter()
    complete = False

    logged = 0  # traces appended by this run

    def finish(outcome: Outcome) -> None:
        nonlocal log_target, logged
        if outcome.result is not None and not no_log:
            # logged before its line is written: every line's trace_id names a record in the log
            log_target = pipeline.log_trace(outcome.result.trace, log)
            logged += log_target is not None
        record = _line(outcome, top)
        writer.write(record)
        _count(counts, record, outcome.query.line)
        latencies.append(outcome.latency_ms)
        if progress is not None:
            progress(1)

    def lost(exc: PartialLost) -> PartialLost:
        traces = (f"; the traces of the {logged} queries run now are in the trace log {log_target}, without their "
                  "result lines" if log_target is not None and logged else "")
        return PartialLost(f"{exc}: the {counts.lines} result lines written to it are lost and the batch stopped"
                           f"{traces}. Nothing can be resumed: run the batch again")

    source = iter_queries(queries, start=written.lines)
    try:
        if workers == 1:
            for query in source:
                if stop:
                    break
                finish(_run_one(pipeline, query, default_user, default_as_of))
        else:
            window = 2 * workers
            pending: deque[Future[Outcome]] = deque()
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sieve-batch") as pool:
                try:
                    for query in source:
                        if stop:
                            break
                        pending.append(pool.submit(_run_one, pipeline, query, default_user, default_as_of))
                        while len(pending) >= window and not stop:
                            finish(pending.popleft().result())
                    while pending and not stop:
                        finish(pending.popleft().result())
                finally:
                    for future in pending:  # not written: they run again on --resume
                        future.cancel()
        complete = counts.lines == len(queries.ids)
        if complete:
            writer.check()
    except PartialLost as exc:
        raise lost(exc) from None
    finally:
        with contextlib.suppress(OSError):
            writer.sync()
        source.close()
    if complete:
        try:
            os.replace(partial, out)
        except OSError as exc:
            problem = partial_problem(fd, partial)
            if problem is not None:
                raise lost(PartialLost(f"{partial} is gone: {problem}")) from None
            raise SieveError(f"every query ran, but {partial} could not be renamed to {out}: "
                             f"{exc.strerror or exc}") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sidecar_path(out))
        with contextlib.suppress(OSError):  # best effort: not every file system can fsync a directory
            fsync_path(out.parent)
    index = pipeline.resources.index if pipeline.resources is not None else None
    if log_target is None and not no_log:
        log_target = log if log is not None else (Path(pipeline.compiled.config.trace.log)
                                                  if pipeline.compiled.config.trace.log is not None else None)
    from engine.workbench.evaluate import latency_summary

    return BatchSummary(
        output=out, partial=partial, queries=len(queries.ids), run=len(latencies), resumed=written.lines,
        failed=counts.failed, empty=counts.empty, degraded=counts.degraded, latency_ms=latency_summary(latencies),
        wall_s=time.perf_counter() - began, workers=workers, top=top, as_of=default_as_of.isoformat(),
        user=default_user.model_dump(mode="json"), config=str(pipeline.compiled.source_file),
        config_sha256=pipeline.compiled.config_sha256,
        index={"path": str(index.path), "manifest_sha256": index.manifest_sha256} if index is not None else {},
        trace_log=str(Path(log_target).absolute()) if log_target is not None else None,
        failures=counts.failures, complete=complete, stopped_by=stop.name if stop and not complete else None,
        warm_up_warnings=list(pipeline.warnings),
    )
