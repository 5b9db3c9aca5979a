"""On-disk index: a document store, pluggable components (bm25, dense, ...) and a manifest.

Layout of an index directory::

    manifest.json      format, corpus hash, doc count, every file's sha256, component settings
    docs.sqlite        row -> doc_id, fields (JSON)
    <component>/       one directory per component, written by its IndexComponent

Building writes into a temporary sibling directory and swaps it in with renames, so a failure
half-way never leaves a broken index where a good one was. One build of an ``--out`` runs at a time
(a lock file ``.NAME.lock`` beside it, held with ``flock`` and removed after): a second one started
meanwhile fails at once, naming the running build's pid. With ``keep_previous`` the index replaced is
moved aside to ``NAME.<first 12 hex of its manifest sha256>`` (a replay can name it with ``--index``)
instead of being deleted. Builds are deterministic: the same corpus, settings and engine give the same
manifest (the build time is in ``build.json``, outside the manifest) and, for components that write in a
fixed order, byte-identical files. Only nothing, an empty directory or a
Sieve index (a manifest.json of this format) is ever replaced: anything else at ``--out`` is
refused before any work is done, and again at swap time. A failed, interrupted (Ctrl-C) or
terminated (SIGTERM) build removes its staging directory; those of dead processes are removed by
the next build. Opening verifies the manifest's structure and (by default) every file's hash, and
a damaged document store is reported when read, so a corrupt index is reported, never half-used.

What is costly to compute per document (dense embeddings, spaCy entities) is kept, a batch at a time, in a build
cache (:class:`BuildCache`; ``.NAME.build-cache`` beside the index unless another directory is named) that outlives a
failed or killed build: the same build run again resumes where it stopped. Entries are keyed by the sha256 of all that
decides them and checked when read, so the index is the same, byte for byte, with or without a cache. Batches are cut
where their documents' content says (:func:`content_defined_batches`), so a document added or removed re-keys only the
batches near it; a cache of your own is pruned to the entries a build used only when asked (``prune_cache``).

The settings are checked before any work, the files they name (a gazetteer) opened and checked with them
(:meth:`IndexComponent.check_files`), so that a bad file is said at once, not after hours of embeddings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import operator
import os
import re
import shutil
import signal
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import ConfigDict, ValidationError

from engine import __version__
from engine.console import backslashed, first_hidden
from engine.errors import SieveError, SieveIndexError
from engine.paths import file_version, fsync_path, process_exists
from engine.strictness import NoCoercion, a_json_kind, json_kind
from engine.yamlsource import NotJson, printable, refuse_json_constant

if TYPE_CHECKING:
    from engine.yamlsource import SourceMap

INDEX_FORMAT = "sieve.index/1"
MANIFEST = "manifest.json"
DOCS_DB = "docs.sqlite"
BUILD_INFO = "build.json"  # when the index was built: beside the manifest, not in it (builds are reproducible)

Progress = Callable[[str, int, int | None], None]  # (task, advanced by, total)
T = TypeVar("T")


def _no_progress(task: str, advance: int, total: int | None) -> None:
    return None


@dataclass(frozen=True)
class Document:
    """A corpus document: id, title, text, and any other fields as metadata."""

    doc_id: str
    title: str
    text: str
    metadata: dict[str, Any]

    def content(self, fields: Sequence[str] = ("title", "text")) -> str:
        parts = []
        for name in fields:
            value = getattr(self, name) if name in ("title", "text") else self.metadata.get(name)
            if value:
                parts.append(str(value))
        return " ".join(parts)

    def content_sha256(self) -> str:
        payload = json.dumps([self.title, self.text], ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(payload).hexdigest()


class CorpusFields:
    """The fields a corpus's documents have, seen as a build stores them: for each field that a component's
    ``fields`` setting names, how many documents give it a value (what :meth:`Document.content` reads), and the
    field names the documents have. A misspelt field (``txt``) reads as empty text on every document: the build
    says so (:meth:`notes`) instead of building an index of empty documents."""

    NAMES_KEPT = 1000  # distinct field names kept for the did-you-mean (a corpus of ever new keys grows without end)
    NAMES_SHOWN = 20  # of which a note lists this many
    LARGE_CHARS = 1_000_000  # a document's title and text over this: said (each query that recalls it pays for it)

    def __init__(self, wanted: Iterable[str]):
        self.large = 0  # documents over LARGE_CHARS
        self.largest: tuple[int, str] = (0, "")  # (characters, doc_id)
        self.documents = 0
        self.with_value = dict.fromkeys(wanted, 0)  # field -> documents giving it a value
        self.names: set[str] = {"title", "text"}  # every record has these; metadata keys as documents have them

    def observe(self, documents: Iterable[Document]) -> Iterator[Document]:
        """``documents``, passed on one at a time, counted on the way."""
        for document in documents:
            self.documents += 1
            for name in self.with_value:
                if getattr(document, name) if name in ("title", "text") else document.metadata.get(name):
                    self.with_value[name] += 1
            if len(self.names) < self.NAMES_KEPT:
                self.names.update(document.metadata)
            size = len(document.title) + len(document.text)
            if size > self.LARGE_CHARS:
                self.large += 1
                self.largest = max(self.largest, (size, document.doc_id))
            yield document

    def size_note(self) -> str | None:
        """A warning when documents are very large: a query that recalls one reads all of it in the stages that read
        text per query (dedup's MinHash unless the index is built --with minhash, entities of candidates are read
        from the index; a 50 MB document made such a query take 25 s and 1.4 GB)."""
        if not self.large:
            return None
        size, doc_id = self.largest
        return (f"warning: {self.large} document{'s' if self.large > 1 else ''} hold{'s' if self.large == 1 else ''} "
                f"more than {self.LARGE_CHARS:,} characters of title and text (the largest, {doc_id!r}, "
                f"{size:,}): a query that recalls one reads all of it where a stage reads text per query (dedup by "
                "MinHash: build --with minhash to sign documents once); split such documents into passages")

    def absent(self, fields: Sequence[str]) -> list[str]:
        """Those of a component's ``fields`` that no document gives a value; title and text only when the others give
        none either (a corpus without titles, read as title + text, is no mistake)."""
        missing = [name for name in fields if not self.with_value.get(name)]
        if len(missing) < len(fields):
            missing = [name for name in missing if name not in ("title", "text")]
        return missing

    def notes(self, component: str, fields: Sequence[str]) -> list[str]:
        """A note for each of ``fields`` that no document gives a value, with a did-you-mean from the fields they
        have and what it does to the text the component reads."""
        from difflib import get_close_matches

        missing = self.absent(fields)
        effect = ("so every document is read as empty text" if len(missing) == len(fields) else
                  "so it adds nothing to the text read")
        have = sorted(self.names)
        listed = ", ".join(have[: self.NAMES_SHOWN]) + (f" and {len(have) - self.NAMES_SHOWN} more"
                                                        if len(have) > self.NAMES_SHOWN else "")
        notes = []
        for name in missing:
            hint = get_close_matches(name, [other for other in have if other != name], n=1)
            where = (f"has no value in any of the {self.documents} documents" if name in self.names else
                     f"is in none of the {self.documents} documents")
            notes.append(f"warning: {component}: fields: '{name}' {where}"
                         + (f" (did you mean '{hint[0]}'?)" if hint else "")
                         + f", {effect}; fields the documents have: {listed}")
        return notes


class ComponentSettings(NoCoercion):
    """Base of an index component's settings: frozen, a misspelt key is an error, numbers and booleans are taken as
    written and must be finite (as a stage's params)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class IndexComponent:
    """A searchable structure built from the corpus (registered with ``register_index_component``)."""

    name: ClassVar[str]
    Settings: ClassVar[type[ComponentSettings]] = ComponentSettings
    # True: ``build`` takes a ``cache`` keyword (a BuildCacheSection, or None when the build has no cache) in which
    # it keeps its costly per-batch work, so that a build run again after a failure does not redo it
    uses_build_cache: ClassVar[bool] = False

    def build(
        self, documents: Sequence[Document], out_dir: Path, settings: ComponentSettings, progress: Progress
    ) -> dict[str, Any]:
        """Write the component's files into ``out_dir``; return what the manifest should record.

        ``documents`` is a read-only sequence in row order; :func:`build_index` passes a :class:`StoredDocuments`,
        which reads them from the document store as they are iterated or sliced: walk it (in batches) rather than
        copying it whole, and the build holds no more than the component's own structures. What the manifest records
        must be the same for the same documents and settings (no timings: :func:`build_index` times each component
        into ``build.json``), and nothing may depend on whether work came from a build cache.

        A setting named ``fields`` names the document fields the component reads (:meth:`Document.content`): the
        build warns, before the component runs, of one that no document has (:class:`CorpusFields`)."""
        raise NotImplementedError

    @classmethod
    def check_files(cls, settings: ComponentSettings) -> list[tuple[tuple[str, ...], str]]:
        """Open and check every file ``settings`` name (a gazetteer, a model's directory) as the build will read it,
        without loading what warm-up loads (a model's weights): (the setting's path, what is wrong) for each problem,
        none when all is well. :func:`check_index_settings` asks every component before any of them runs, so that a
        missing or malformed file is said with the other settings problems, not when its component runs (after hours of
        embeddings)."""
        return []


def _sha256_fd(fd: int, chunk: int = 1 << 20) -> str:
    """The sha256 of an open file's content (read with pread: the descriptor's offset is left alone)."""
    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, chunk, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- corpus reading

# Deepest nesting of a corpus record's values (metadata): real corpora nest a few levels; far deeper
# records would overflow the JSON encoder's and decoder's recursion limits when stored or read back.
MAX_NESTING = 100


def corpus_path(path: Path) -> Path:
    """The corpus.jsonl that ``path`` names (itself, or the one in the directory); an error if there is none."""
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.is_file():
        raise SieveError(f"corpus not found: {path} (expected a BEIR corpus.jsonl or a directory holding one)")
    return path


def read_corpus(path: Path, max_errors: int = 20) -> list[Document]:
    """Read a BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``, other fields as metadata)."""
    return list(iter_corpus(path, max_errors))


def iter_corpus(path: Path, max_errors: int = 20, digest: Any = None) -> Iterator[Document]:
    """The documents of a BEIR ``corpus.jsonl``, one at a time, in file order (a build never holds them all).

    Every record is checked as it is read; once one is wrong no more documents are yielded, but reading goes on
    to report up to ``max_errors`` problems (``file:line: ...``) in one SieveError at the end, as does a corpus
    with no document. ``digest`` (a hashlib object), if given, is fed every byte read: the corpus's sha256
    without reading it twice."""
    path = corpus_path(path)
    seen: dict[str, int] = {}  # doc_id -> its line, for the duplicate message
    problems: list[str] = []
    count = 0
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if digest is not None:
                    digest.update(raw)
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw, parse_constant=refuse_json_constant)
                except NotJson as exc:  # NaN, Infinity: Python's json reads them, no JSON reader does
                    problems.append(f"{path}:{number}: {exc}")
                except UnicodeDecodeError as exc:  # a Latin-1 line, say
                    problems.append(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                    f"{exc.start + 1})")
                except RecursionError:
                    problems.append(f"{path}:{number}: the JSON is nested too deeply (more than {MAX_NESTING} levels)")
                except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
                    problems.append(f"{path}:{number}: not a JSON object ({exc})")
                else:
                    problem = _check_record(record)
                    if problem is None:
                        doc_id = str(record["_id"])
                        if doc_id in seen:
                            problems.append(f"{path}:{number}: duplicate _id '{doc_id}' (first on line {seen[doc_id]})")
                        else:
                            seen[doc_id] = number
                            if not problems:
                                metadata = {k: v for k, v in record.items() if k not in ("_id", "title", "text")}
                                count += 1
                                yield Document(doc_id, record.get("title") or "", record.get("text") or "", metadata)
                    else:
                        problems.append(f"{path}:{number}: {problem}")
                if len(problems) >= max_errors:
                    problems.append("(stopped after too many errors)")
                    break
    except OSError as exc:
        raise SieveError(f"cannot read the corpus {path}: {exc.strerror or exc}") from None
    if problems:
        raise SieveError("the corpus has errors:\n" + "\n".join(problems))
    if not count:
        raise SieveError(f"the corpus {path} holds no documents")


def _json_kind(value: Any) -> str:
    """What a JSON value is, for messages ("a boolean", "a number (1.5)", "an object", ...)."""
    return f"a number ({value!r})" if json_kind(value) == "number" else a_json_kind(value)


def _check_record(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"each line must be a JSON object, got {_json_kind(record)}"
    if "_id" not in record:
        return "missing '_id'"
    doc_id = record["_id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return f"'_id' must be a string or an integer, got {_json_kind(doc_id)}"
    if isinstance(doc_id, str) and doc_id.strip() == "":
        return "empty '_id'"
    for name in ("title", "text"):
        if name in record and record[name] is not None and not isinstance(record[name], str):
            return f"'{name}' must be a string, got {_json_kind(record[name])}"
    if not (record.get("title") or record.get("text")):
        return "the document has neither title nor text"
    for name, value in record.items():
        problem = _value_problem(value)
        if problem is None and not name.isascii():
            problem = _value_problem(name)
        if problem is not None:
            shown = name.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate, escaped
            return f"'{shown}' {problem}"
    if isinstance(doc_id, str):
        unseen = first_hidden(doc_id)
        if unseen is not None:  # an id is shown to people: it must read as what it is, and as no other id
            return (f"'_id' holds {backslashed(doc_id[unseen])} at character {unseen + 1}: a control or invisible "
                    "character (a terminal escape, a bidi override, a zero-width space...), which would make the id "
                    "read as another or change what a terminal shows")
    return None


def _value_problem(value: Any) -> str | None:
    """Why a parsed JSON value cannot be stored: a string that is not valid Unicode (a lone surrogate
    such as ``"\\ud800"``, which JSON escapes allow but UTF-8 cannot encode), or nesting too deep."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return (
                        f"is not valid Unicode: it holds a lone surrogate "
                        f"(\\u{ord(item[exc.start]):04x}), which cannot be stored"
                    )
        elif isinstance(item, (list, dict)):
            if depth > MAX_NESTING:
                return f"is nested too deeply (more than {MAX_NESTING} levels)"
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((element, depth + 1) for element in item.values())
            else:
                stack.extend((element, depth + 1) for element in item)
    return None


# --------------------------------------------------------------------------- building


def build_index(
    corpus: Path,
    out_dir: Path,
    components: dict[str, dict[str, Any]],
    progress: Progress = _no_progress,
    *,
    keep_previous: bool = False,
    cache: Path | Literal[False] | None = None,
    keep_cache: bool = False,
    prune_cache: bool = False,
    notes: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build an index with the named components (``{"bm25": {settings}}``) and swap it in atomically.

    ``out_dir`` may be new, an empty directory or an existing Sieve index (replaced); anything else is
    refused before any work is done. The index is built in a staging directory next to ``out_dir``
    (``.NAME.tmp-PID-MILLIS``) that is removed on any failure, Ctrl-C or SIGTERM, so a failed build
    leaves the previous index as it was; staging directories left by dead processes are removed.
    Only one build of ``out_dir`` runs at a time: another one running is a SieveIndexError at once
    (``.NAME.lock``, see :func:`_acquire_build_lock`). ``keep_previous``: the index replaced is moved to
    ``NAME.<sha12 of its manifest>`` beside it (see :func:`kept_copy`) instead of being deleted.

    Components whose per-document work is costly (dense embeddings, spaCy entities) keep it in a build cache
    (:class:`BuildCache`), so a build that failed or was interrupted resumes where it stopped when run again:
    ``cache`` None is ``.NAME.build-cache`` beside ``out_dir`` (kept after a failure, deleted after success unless
    ``keep_cache``), a path names a cache of your own (kept, and may be shared by builds of other outputs), False
    builds without one. ``prune_cache`` (a cache of your own only): after a successful build, remove from it the
    entries this build did not use, unless another build is using the cache (:meth:`BuildCache.close_after_success`).
    The index built is the same with or without a cache, byte for byte. ``notes`` receives what a user should read:
    cache entries found corrupt (recomputed), how much came from the cache and what was pruned, a component's ``fields``
    naming a field no document has (also kept in ``build.json``, as the component's ``notes``).
    """
    if prune_cache and (cache is None or cache is False):
        raise SieveError("pruning applies to a build cache of your own (--cache DIR): "
                         + ("there is none without a cache (--no-cache)" if cache is False else
                            "the default one is deleted after a successful build, or pruned to its entries with "
                            "--keep-cache"))
    resolved = {name: (cls(), settings) for name, (cls, settings) in check_index_settings(components).items()}
    corpus_file = corpus_path(corpus).absolute()
    out_dir = _output_path(out_dir)
    _check_target(out_dir)
    say = notes if notes is not None else _no_note
    cached_components = [name for name, (component, _) in resolved.items() if component.uses_build_cache]
    build_cache: BuildCache | None = None
    if cache is not False and cached_components:
        explicit = cache is not None
        cache_dir = _cache_path(Path(cache)) if explicit else default_cache_path(out_dir)
        check_cache_directory(cache_dir, out_dir)
        build_cache = BuildCache(cache_dir, default=not explicit, notes=say)
    elif cache is not None and cache is not False:
        say(f"no component being built ({', '.join(resolved)}) uses a build cache: {cache} is not used")
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
    created: list[Path] = []
    lock: list[tuple[int, Path]] = []
    built: dict[str, dict[str, Any]] = {}  # build.json's per component: its time, any notes on its fields
    built_sha: str | None = None  # the new index's manifest sha256, once it is written
    with _TerminationAsExit():
        try:
            _make_directories(out_dir, staging.parent, created)
            lock.append(_acquire_build_lock(out_dir))
            _remove_stale_builds(out_dir)
            if build_cache is not None:
                build_cache.open()
            _make_directories(out_dir, staging, created)
            # one streaming pass: each document is checked and stored as it is read (the corpus hashed on the way);
            # the components then read the stored documents back in batches, never the whole corpus at once
            corpus_digest = hashlib.sha256()
            read_fields = {name: _read_fields(settings) for name, (_, settings) in resolved.items()}
            seen = CorpusFields(dict.fromkeys(f for fields in read_fields.values() for f in fields))
            doc_count = _write_documents(seen.observe(iter_corpus(corpus_file, digest=corpus_digest)),
                                         staging / DOCS_DB, progress)
            corpus_sha256 = corpus_digest.hexdigest()
            documents = StoredDocuments(staging / DOCS_DB, doc_count)
            if seen.size_note() is not None:
                say(seen.size_note())
            for name, fields in read_fields.items():  # said before any component runs (an embedding takes hours)
                absent = seen.absent(fields)
                if absent:
                    built[name] = {"absent_fields": absent, "notes": seen.notes(name, fields)}
                    for note in built[name]["notes"]:
                        say(note)
            try:
                manifest_components = {}
                for name, (component, settings) in resolved.items():
                    component_dir = staging / name
                    component_dir.mkdir()
                    began = time.perf_counter()
                    if component.uses_build_cache:
                        section = build_cache.section(name) if build_cache is not None else None
                        recorded = component.build(documents, component_dir, settings, progress, cache=section)
                    else:
                        recorded = component.build(documents, component_dir, settings, progress)
                    built[name] = {"seconds": round(time.perf_counter() - began, 2), **built.get(name, {})}
                    manifest_components[name] = {"settings": settings.model_dump(mode="json"), **recorded}
            finally:
                documents.close()
            files = {
                str(p.relative_to(staging)): sha256_file(p)
                for p in sorted(staging.rglob("*"))
                if p.is_file()
            }
            manifest = {
                "format": INDEX_FORMAT,
                "engine_version": __version__,
                "corpus": {
                    "source": str(corpus_file),
                    "sha256": corpus_sha256,
                    "doc_count": doc_count,
                },
                "components": manifest_components,
                "files": files,
            }
            with open(staging / MANIFEST, "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            # what differs from one build to the next (when, how long, what the cache gave) goes beside the manifest
            info: dict[str, Any] = {"created_at": datetime.now(timezone.utc).isoformat(), "engine_version": __version__,
                                    "components": built}
            if build_cache is not None:
                info["build_cache"] = build_cache.summary()
            with open(staging / BUILD_INFO, "w", encoding="utf-8") as handle:
                json.dump(info, handle, indent=2, sort_keys=True)
            built_sha = manifest_sha256_of(staging)
            _swap_in(staging, out_dir, keep_previous)
        except (OSError, sqlite3.OperationalError) as exc:
            _close_cache_after_failure(build_cache)
            _discard(staging, created, lock)
            raise SieveIndexError(
                f"cannot build the index at {out_dir}: {_io_reason(exc)}; any previous index there is unchanged"
                + _resume_hint(build_cache)
            ) from exc
        except BaseException:  # a SieveError, Ctrl-C, SIGTERM (SystemExit): the cache's entries are kept to resume from
            _close_cache_after_failure(build_cache)
            _discard(staging, created, lock)
            if built_sha is not None and manifest_sha256_of(out_dir) == built_sha:  # an interrupt held back by the swap
                say(f"interrupted once the new index was in place: {out_dir} is the new index")
            hint = _resume_hint(build_cache)
            if hint:
                say(hint[2:])
            raise
        try:  # still under the build lock: no build of this output starts on its default cache meanwhile
            if build_cache is not None:
                build_cache.close_after_success(keep=keep_cache, prune=prune_cache)
        finally:
            _release_build_lock(lock)
    return manifest


def _no_note(message: str) -> None:
    return None


def _read_fields(settings: ComponentSettings) -> tuple[str, ...]:
    """The document fields a component's settings say it reads (its ``fields`` setting), or none."""
    fields = getattr(settings, "fields", None)
    if isinstance(fields, (tuple, list)) and all(isinstance(f, str) for f in fields):
        return tuple(fields)
    return ()


def _close_cache_after_failure(build_cache: "BuildCache | None") -> None:
    if build_cache is not None:
        build_cache.close_after_failure()


def _resume_hint(build_cache: "BuildCache | None") -> str:
    """For a failed build's message: the cache entries kept, and how to use them."""
    if build_cache is None or not build_cache.kept_entries:
        return ""
    return (f"; the build cache {build_cache.path} keeps what was computed ({build_cache.kept_entries} entries): "
            "run the same command again to resume")


# --------------------------------------------------------------------------- build cache

BUILD_CACHE_FORMAT = "sieve.build-cache/1"
CACHE_MARKER = "sieve-build-cache.json"  # what makes a directory a build cache (and one a build may delete)
_CACHE_LOCK = ".lock"
_CACHEDIR_TAG = "CACHEDIR.TAG"  # https://bford.info/cachedir/: backup tools skip the directory
_CACHEDIR_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55\n"
_ENTRY_MAGIC = b"SIEVE-BUILD-CACHE-ENTRY/1\n"
_ENTRY_TEMPORARY = re.compile(r"\.tmp-([0-9]{1,10})-([0-9]+)-[0-9a-f]*")
_DAMAGE_NOTES = 5  # damaged entries named one by one; the others are counted in the summary


def default_cache_path(out_dir: Path) -> Path:
    """Where a build of ``out_dir`` keeps its costly work unless told otherwise: ``.NAME.build-cache`` beside it."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.build-cache"


def _cache_path(path: Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
        raise SieveIndexError(f"cannot use the build cache {path}: {getattr(exc, 'strerror', None) or exc}") from None


def check_cache_directory(path: Path, out_dir: Path) -> None:
    """Refuse, before any work, a build cache that cannot be used: inside the index directory (a build replaces
    that), a file, under a file, a directory holding anything but a Sieve build cache (a build may delete a cache:
    never a user's folder), or a place that cannot be written."""

    def refuse(why: str) -> None:
        raise SieveIndexError(f"cannot use the build cache {path}: {why}")

    if path == out_dir or out_dir in path.parents:
        refuse(f"it is inside the index directory {out_dir}, which a build replaces; choose a directory outside it")
    try:
        mode: int | None = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as exc:
        refuse(exc.strerror or str(exc))
    if mode is None:  # to be created: its nearest existing ancestor must be a directory we may write in
        try:
            found = _nearest_ancestor(path)
        except OSError as exc:
            refuse(f"{exc.filename}: {exc.strerror or exc}")
        if found is not None:
            ancestor, ancestor_mode = found
            if not stat.S_ISDIR(ancestor_mode):
                refuse(f"{ancestor} is a file, not a directory")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                refuse(f"it cannot be created in {ancestor} (permission denied)")
        return
    if not stat.S_ISDIR(mode):
        refuse("it is a file, not a directory")
    why = _not_a_cache(path)
    if why is not None:
        refuse(why)
    if not os.access(path, os.W_OK | os.X_OK):
        refuse("it cannot be written (permission denied)")


def _not_a_cache(directory: Path) -> str | None:
    """Why ``directory`` is not a Sieve build cache a build may use (None: it is one, or is empty)."""
    marker = directory / CACHE_MARKER
    try:
        if not marker.is_file():
            # empty, or what a build starting on it at this very moment makes first (its lock, the marker's
            # temporary, the tag; the marker itself, renamed into place since it was looked for)
            made = (_CACHE_LOCK, _CACHEDIR_TAG, CACHE_MARKER)
            others = [p for p in directory.iterdir() if p.name not in made and not _ENTRY_TEMPORARY.fullmatch(p.name)]
            return None if not others else (f"it holds other files and no {CACHE_MARKER}; choose a new or empty "
                                             "directory (a build may delete its cache, so Sieve never takes a folder "
                                             "holding anything else)")
        recorded = json.loads(marker.read_bytes()[: 1 << 16])
    except OSError as exc:
        return f"it cannot be read: {exc.strerror or exc}"
    except (ValueError, RecursionError):
        return f"its {CACHE_MARKER} is not JSON; remove the directory or choose another one"
    found = recorded.get("format") if isinstance(recorded, dict) else None
    if found != BUILD_CACHE_FORMAT:
        return (f"it is a build cache of another format ({found!r}, this Sieve writes {BUILD_CACHE_FORMAT}); "
                "remove it or choose another directory")
    return None


def _in_bytes(count: int) -> str:
    """A size in words: 532,797 bytes is "532.8 kB" (decimal units, as ``du --si``)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _entry_problem(data: bytes, section: str, key: str) -> tuple[str | None, bytes]:
    """What is wrong with a cache entry's bytes (None: nothing), and its payload."""
    if not data.startswith(_ENTRY_MAGIC):
        return ("empty" if not data else "not a build cache entry"), b""
    start = len(_ENTRY_MAGIC) + 4
    if len(data) < start:
        return "cut short", b""
    header_end = start + int.from_bytes(data[len(_ENTRY_MAGIC) : start], "big")
    if header_end > len(data):
        return "cut short", b""
    try:
        header = json.loads(data[start:header_end])
        size, checksum = int(header["payload_bytes"]), str(header["payload_sha256"])
        stored_key, stored_section = header["key"], header["section"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return "its header is damaged", b""
    if stored_key != key or stored_section != section:
        return f"it holds another entry ({stored_section} {str(stored_key)[:12]})", b""
    payload = data[header_end:]
    if len(payload) != size:
        return f"cut short: {len(payload)} of {size} bytes", b""
    if hashlib.sha256(payload).hexdigest() != checksum:
        return "its content does not match its checksum", b""
    return None, payload


def _temporary_name(directory: Path) -> Path:
    """A new file's name to write before renaming it into place: the writer's pid and time (a build that finds one of a
    process gone removes it) and random hex (threads of one process, builds of one cache)."""
    return directory / f".tmp-{os.getpid()}-{int(time.time() * 1000)}-{os.urandom(6).hex()}"


def _write_file_atomically(path: Path, data: bytes, temporary: Path) -> None:
    """Write ``data`` to ``temporary`` and rename it to ``path``: a reader sees all of it or nothing (a process killed
    meanwhile leaves only the temporary, which the next build removes)."""
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def content_defined_batches(items: Iterable[tuple[T, bytes]], batch_size: int) -> Iterator[list[T]]:
    """A sequence of (item, sha256 of its content) cut into batches whose ends the contents decide, one batch held at a
    time: a batch holds ``batch_size // 2`` to ``batch_size`` items, and past the half it ends after an item whose
    digest says so (one in ``batch_size // 2``). An item changed, added or removed alters the batch it is in and a few
    after it, until the ends fall where they fell before: the other batches hold the very items they held, so their
    :class:`BuildCacheSection` keys (which name a batch's items) are found again. How the dense component (texts
    ordered by length, ``stages.embedding.corpus_batches``) and the entities component (in row order) cut theirs."""
    least = max(1, batch_size // 2)
    current: list[T] = []
    for item, digest in items:
        current.append(item)
        if len(current) >= batch_size or (len(current) >= least and int.from_bytes(digest[-8:], "big") % least == 0):
            yield current
            current = []
    if current:
        yield current


class BuildCacheSection:
    """One component's entries in a :class:`BuildCache`: payloads (bytes) under keys that are the sha256 of everything
    that determines them (:meth:`key`), verified when read (a damaged entry is recomputed, and the build says so),
    written atomically. The component decides what one entry holds (a batch of its work) and counts its items."""

    def __init__(self, cache: "BuildCache", name: str):
        self.cache = cache
        self.name = name
        self.directory = cache.path / name
        self.batches_reused = 0
        self.items_reused = 0
        self.batches_computed = 0
        self.items_computed = 0
        self.damaged = 0
        self.used: set[str] = set()

    def key(self, identity: dict[str, Any], members: Iterable[bytes]) -> str:
        """The key of an entry: the sha256 of the cache format, this section, ``identity`` (JSON: the model and every
        setting that changes the result) and the batch's ``members`` (each a digest of one item's input), in order."""
        digest = hashlib.sha256(f"{BUILD_CACHE_FORMAT}\0{self.name}\0".encode())
        digest.update(json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
        for member in members:
            digest.update(b"\0" + len(member).to_bytes(4, "big") + member)
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / key

    def get(self, key: str, items: int, decode: Callable[[bytes], Any]) -> Any:
        """The decoded entry under ``key`` (counted as ``items`` reused), or None: none there, or a damaged one
        (said, and counted). ``decode`` raises ValueError for a payload it cannot use."""
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            problem: str | None = f"it cannot be read: {exc.strerror or exc}"
        else:
            problem, payload = _entry_problem(data, self.name, key)
            if problem is None:
                try:
                    value = decode(payload)
                except ValueError as exc:
                    problem = f"its content is unusable: {exc}"
        if problem is not None:
            self.damaged += 1
            self.cache.damaged_entry(path, problem)
            return None
        self.batches_reused += 1
        self.items_reused += items
        self.used.add(key)
        return value

    def put(self, key: str, payload: bytes, items: int) -> None:
        """Count ``items`` computed, and keep their ``payload`` under ``key`` (a failure to write is said once, and
        the build goes on without the cache: it never fails a build)."""
        self.batches_computed += 1
        self.items_computed += items
        self.used.add(key)
        self.cache.write_entry(self._path(key), self.name, key, payload)

    def summary(self) -> dict[str, int]:
        return {"batches_reused": self.batches_reused, "items_reused": self.items_reused,
                "batches_computed": self.batches_computed, "items_computed": self.items_computed,
                "damaged_entries_recomputed": self.damaged}


class BuildCache:
    """A directory where index components keep their costly per-batch work (embeddings, entities) while a build
    runs, so that the same build run again after a failure, Ctrl-C, SIGTERM or a kill resumes instead of starting
    over; kept after a success, it makes a rebuild after a small corpus change recompute only what changed.

    Layout: ``sieve-build-cache.json`` (the format: a build only uses or deletes a directory that has it), a
    ``CACHEDIR.TAG``, ``.lock`` and ``<component>/<2 hex>/<key>`` entries. An entry's key is the sha256 of all
    that determines its content (:meth:`BuildCacheSection.key`), so an entry is reused only where it is exactly what
    the build would compute; each is written to a temporary file and renamed (never half there), carries the
    sha256 of its content and is checked when read. Builds using the cache hold a shared ``flock`` on ``.lock``;
    deleting or pruning it (the default cache after a build; a cache of your own with ``prune``) takes it exclusively,
    and is skipped while another build uses it, so builds of different outputs may share one cache."""

    def __init__(self, path: Path, *, default: bool, notes: Callable[[str], None]):
        self.path = path
        self.default = default  # .NAME.build-cache of the output being built: deleted after success unless kept
        self._notes = notes
        self._sections: dict[str, BuildCacheSection] = {}
        self._lock_fd: int | None = None
        self._created = False
        self._opened = False
        self._writable = True
        self._damage_said = 0
        self.entries_found = 0  # entries there when the build began
        self.kept_entries = 0  # entries left after a failed build, for the next run

    # ------------------------------------------------------------------ life cycle

    def open(self) -> None:
        """Create (or take) the directory, hold its shared lock, remove temporaries of dead builds."""
        self._created = not self.path.exists()
        try:
            self._lock_fd = self._lock_shared()
            why = _not_a_cache(self.path)
            if why is not None:  # filled by someone else since the check
                raise SieveIndexError(f"cannot use the build cache {self.path}: {why}")
            marker = self.path / CACHE_MARKER
            if not marker.is_file():
                _write_file_atomically(marker, json.dumps({"format": BUILD_CACHE_FORMAT}).encode() + b"\n",
                                       _temporary_name(self.path))
                (self.path / _CACHEDIR_TAG).write_text(
                    _CACHEDIR_SIGNATURE + "# a Sieve build cache: `sieve index` keeps its costly work here\n",
                    encoding="utf-8")
        except OSError as exc:
            self._release()
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(self.path) else ""
            raise SieveIndexError(f"cannot use the build cache {self.path}: {exc.strerror or exc}{where}") from None
        except BaseException:
            self._release()
            raise
        self._opened = True
        self.entries_found = self._sweep(remove_dead=True)
        if self.entries_found:
            self._notes(f"build cache {self.path}: {self.entries_found} entries from earlier builds; those that "
                        "match are reused")

    def _lock_shared(self) -> int:
        import fcntl

        lock_path = self.path / _CACHE_LOCK
        for _ in range(50):
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o644)
            except FileNotFoundError:  # deleted by a build as we created it: again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while another build deletes or prunes it (briefly)
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)  # the cache was deleted meanwhile: make it again
        raise SieveIndexError(f"cannot use the build cache {self.path}: it keeps being deleted by other builds")

    def _lock_exclusively(self) -> bool:
        """Whether no other build uses the cache now (the lock held becomes exclusive; False: left shared)."""
        import fcntl

        if self._lock_fd is None:
            return False
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:  # BlockingIOError: held by another build; the shared lock may be lost: take it again
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                pass
            return False

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _entry_files(self, top: bool = False) -> Iterator[os.DirEntry[str]]:
        """Every file in the sections' directories (entries and temporaries); ``top``: the temporaries beside the
        marker too."""
        try:
            listed = list(os.scandir(self.path))
            sections = [e for e in listed if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        if top:
            yield from (e for e in listed if _ENTRY_TEMPORARY.fullmatch(e.name))
        for section in sections:
            try:
                shards = [e for e in os.scandir(section.path) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for shard in shards:
                try:
                    yield from (e for e in os.scandir(shard.path) if e.is_file(follow_symlinks=False))
                except OSError:
                    continue

    def _sweep(self, remove_dead: bool = False) -> int:
        """How many entries the cache holds; ``remove_dead``: remove temporaries of builds that died writing them."""
        entries = 0
        for entry in self._entry_files(top=remove_dead):
            match = _ENTRY_TEMPORARY.fullmatch(entry.name)
            if match is None:
                entries += 1
            elif remove_dead and not process_exists(int(match.group(1)), int(match.group(2)) / 1000.0):
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
        return entries

    def close_after_failure(self) -> None:
        """Keep what was computed for the next run (a cache this build created and left empty is removed)."""
        if not self._opened:  # the build failed before it used the cache (another build of --out running...)
            return
        self.kept_entries = self._sweep()
        if self._created and not self.kept_entries and self._lock_exclusively():
            shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def close_after_success(self, *, keep: bool, prune: bool = False) -> None:
        """Say what came from the cache; then delete the default cache (unless ``keep``), or, kept, prune it to this
        build's entries. A cache named by the user is kept as it is, or with ``prune`` pruned to this build's entries.
        Deleting and pruning take the cache's lock exclusively and are skipped while another build holds it: builds
        may share a cache, and an entry another one is about to read is never removed from under it (a build that
        starts meanwhile waits for the lock, then finds what is left)."""
        for section in self._sections.values():
            total_batches = section.batches_reused + section.batches_computed
            total_items = section.items_reused + section.items_computed
            self._notes(
                f"{section.name}: {section.batches_reused} of {total_batches} batches ({section.items_reused} of "
                f"{total_items} texts) from the build cache, {section.batches_computed} computed"
                + (f"; {section.damaged} damaged entries were recomputed" if section.damaged else ""))
        try:
            if not self.default and not prune:
                entries, size = self._usage()
                self._notes(f"build cache {self.path} kept ({entries} entries, {_in_bytes(size)}); it is yours to "
                            "remove (--prune-cache removes the entries a build did not use)")
            elif not self._lock_exclusively():
                entries, size = self._usage()
                self._notes(f"build cache {self.path} left as it is: another build is using it" + (
                    "" if self.default else f"; not pruned ({entries} entries, {_in_bytes(size)}): run a build with "
                    "--prune-cache when no other build uses it"))
            elif self.default and not keep:
                # renamed first: a build killed while deleting leaves a leftover the next build sweeps, not a cache
                # without its marker that every later build of this output refuses to use
                gone = self.path.with_name(self.path.name.removesuffix(".build-cache")
                                           + f".gone-{os.getpid()}-{int(time.time() * 1000)}")
                try:
                    os.rename(self.path, gone)
                except OSError:
                    gone = self.path
                shutil.rmtree(gone, ignore_errors=True)
            else:
                removed, freed = self._prune()
                entries, size = self._usage()
                if self.default:
                    self._notes(f"build cache {self.path} kept for the next build ({entries} entries"
                                + (f"; {removed} no longer used removed)" if removed else ")"))
                else:
                    self._notes(f"build cache {self.path} pruned: {removed} entries ({_in_bytes(freed)}) this build "
                                f"did not use removed, {entries} ({_in_bytes(size)}) kept")
        finally:
            self._release()

    def _usage(self) -> tuple[int, int]:
        """How many entries the cache holds, and their bytes."""
        entries = size = 0
        for entry in self._entry_files():
            if _ENTRY_TEMPORARY.fullmatch(entry.name) is None:
                try:
                    size += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
                entries += 1
        return entries, size

    def _prune(self) -> tuple[int, int]:
        """Remove the entries this build did not use, with the directories they leave empty; how many, and their
        bytes. Only under the exclusive lock (no other build uses the cache)."""
        used = {key for section in self._sections.values() for key in section.used}
        removed = freed = 0
        shards: set[str] = set()
        for entry in self._entry_files():
            if entry.name not in used:
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                    os.unlink(entry.path)
                except OSError:
                    continue
                removed += 1
                freed += size
                shards.add(os.path.dirname(entry.path))
        for shard in sorted(shards):
            for directory in (shard, os.path.dirname(shard)):  # the shard, then its section, once empty
                try:
                    os.rmdir(directory)
                except OSError:
                    break
        return removed, freed

    # ------------------------------------------------------------------ entries

    def section(self, name: str) -> BuildCacheSection:
        if name not in self._sections:
            self._sections[name] = BuildCacheSection(self, name)
        return self._sections[name]

    def write_entry(self, path: Path, section: str, key: str, payload: bytes) -> None:
        if not self._writable:
            return
        header = json.dumps({"format": BUILD_CACHE_FORMAT, "section": section, "key": key,
                             "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()},
                            sort_keys=True).encode()
        data = _ENTRY_MAGIC + len(header).to_bytes(4, "big") + header + payload
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_file_atomically(path, data, _temporary_name(path.parent))
        except OSError as exc:
            self._writable = False
            self._notes(f"cannot write to the build cache {self.path} ({_io_reason(exc)}): the build goes on "
                        "without keeping its work there")

    def damaged_entry(self, path: Path, problem: str) -> None:
        self._damage_said += 1
        if self._damage_said <= _DAMAGE_NOTES:
            self._notes(f"build cache entry {path} is damaged ({problem}): recomputed")
        elif self._damage_said == _DAMAGE_NOTES + 1:
            self._notes("more damaged build cache entries are recomputed (counted in the summary)")

    def summary(self) -> dict[str, Any]:
        """What ``build.json`` records: where the cache was and, per component, what came from it."""
        return {"path": str(self.path), "default_location": self.default, "entries_found": self.entries_found,
                "sections": {name: section.summary() for name, section in self._sections.items()}}


# --------------------------------------------------------------------------- settings


def check_index_settings(
    components: dict[str, Any], source: "SourceMap | None" = None, *, label: str = "index settings", files: bool = True
) -> dict[str, tuple[type[IndexComponent], ComponentSettings]]:
    """Each named component's class and validated settings (``{"bm25": {"k1": 1.2}}``; None is the defaults).

    Every problem is reported at once, as a pipeline config's are: a ConfigError whose issues name the setting
    (``bm25.tokenizer.language``), with a did-you-mean for a misspelt key and the pipeline's words for a wrong type;
    located in the file when ``source`` maps where the settings were read (:func:`load_index_settings`), else under
    ``label`` (settings given in code, or by an option). ``files``: the files the settings name are opened and checked
    too (:meth:`IndexComponent.check_files`: a gazetteer missing or malformed, at its own file:line), those of a
    component whose other settings are wrong included."""
    from engine.errors import ConfigError, ConfigIssue, Location
    from engine.registry import UnknownStageType, known_components, resolve_component
    from engine.yamlsource import SourceMap

    located = source is not None
    source = source or SourceMap(label)
    issues: list[ConfigIssue] = []
    resolved: dict[str, tuple[type[IndexComponent], ComponentSettings]] = {}
    for name, raw in components.items():
        try:
            cls = resolve_component(name)
        except UnknownStageType:
            issues.append(ConfigIssue(source.locate((name,), prefer_key=True), str(name),
                                      _unknown_component(str(name), known_components())))
            continue
        if raw is not None and not isinstance(raw, dict):
            issues.append(ConfigIssue(source.locate((name,)), str(name), f"expected a mapping of {name} settings "
                                      f"(e.g. {_example(cls)}), got {a_json_kind(raw)}"))
            continue
        wrong: set[str] = set()  # the settings in error, left out to check the files the others name
        try:
            settings: ComponentSettings | None = cls.Settings.model_validate(raw or {})
        except ValidationError as exc:
            issues.extend(_settings_issues(exc, source, name, cls.Settings))
            settings, wrong = _settings_less_wrong(cls.Settings, raw or {}, exc)
        else:
            resolved[name] = (cls, settings)
        if files and settings is not None:
            for path, message in cls.check_files(settings):
                if not (path and path[0] in wrong):
                    issues.append(ConfigIssue(source.locate((name, *path)), ".".join((name, *path)), message))
    if issues and not located:  # no file: no line to point at
        issues = [dataclasses.replace(issue, location=Location(label)) for issue in issues]
    if issues:
        raise ConfigError(issues)
    return resolved


def _settings_less_wrong(
    model: type[ComponentSettings], raw: dict[str, Any], exc: ValidationError
) -> tuple[ComponentSettings | None, set[str]]:
    """The settings without those in error (the first key of each error's path), and those keys: None when no key is
    to blame or the others are not valid settings either."""
    wrong = {str(error["loc"][0]) for error in exc.errors(include_url=False) if error["loc"]}
    if not wrong:
        return None, wrong
    try:
        return model.model_validate({key: value for key, value in raw.items() if str(key) not in wrong}), wrong
    except ValidationError:
        return None, wrong


def _settings_issues(exc: ValidationError, source: "SourceMap", name: str, model: type[Any]) -> list[Any]:
    """A pipeline config's issues for these errors, and a did-you-mean for a short key one letter off a setting
    ('kl' for 'k1', which difflib's ratio finds too far)."""
    from engine.config import issues_from_validation

    issues = issues_from_validation(exc, source, (name,), model)
    for at, error in enumerate(exc.errors(include_url=False)):  # one issue per error, in order
        if error["type"] != "extra_forbidden" or "(did you mean" in issues[at].message:
            continue
        key = str(error["loc"][-1])
        near = [valid for valid in _fields_at(model, error["loc"][:-1]) if _one_edit_apart(key, valid)]
        if near:
            unknown = f"unknown field '{key}'"
            message = issues[at].message.replace(unknown, f"{unknown} (did you mean '{near[0]}'?)", 1)
            issues[at] = dataclasses.replace(issues[at], message=message)
    return issues


def _fields_at(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The setting names of the (nested) settings model at ``loc`` inside ``model``."""
    import types
    import typing

    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        arms = typing.get_args(field.annotation) if typing.get_origin(field.annotation) in (
            typing.Union, types.UnionType) else (field.annotation,)
        model = next((arm for arm in arms if hasattr(arm, "model_fields")), None)
    return list(getattr(model, "model_fields", {}))


def _one_edit_apart(a: str, b: str) -> bool:
    """One letter replaced, added, dropped, or two neighbours swapped (case ignored)."""
    a, b = a.casefold(), b.casefold()
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                  and a[diff[1]] == b[diff[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def load_index_settings(
    path: Path | None, components: Sequence[str], *, language: str | None = None
) -> dict[str, dict[str, Any]]:
    """What ``sieve index --with NAME... [--settings FILE] [--language L]`` builds: each component's settings (``{}``
    for its defaults), read from ``FILE`` (``{component: {setting: value}}``) and checked there, every problem at once
    and located (``s.yaml:2:9  bm25.kl: unknown field 'kl' (did you mean 'k1'?); ...``), with the files the settings
    name (a gazetteer; a spaCy pipeline, the file's or the default one) opened and checked, so that all this is said
    before any component runs; ``language`` sets the bm25 tokenizer's language (over the file's)."""
    from engine.errors import ConfigError, ConfigIssue
    from engine.registry import known_components
    from engine.yamlsource import load_yaml_file

    names = list(dict.fromkeys(components))
    for name in names:
        if name not in known_components():
            raise SieveError(f"--with {_unknown_component(name, [])}")
    settings: dict[str, dict[str, Any]] = {name: {} for name in names}
    given: dict[str, Any] = {}
    issues: list[ConfigIssue] = []
    if path is not None:
        loaded = load_yaml_file(path, collect=True)
        data, source = loaded.data, loaded.source
        issues.extend(loaded.issues)
        if not isinstance(data, dict):
            raise ConfigError([*issues, ConfigIssue(
                source.locate(()), "", "expected a mapping of component name to its settings (e.g. bm25: {k1: 1.2}), "
                f"got {a_json_kind(data)}")])
        for name, value in data.items():
            if name in settings:
                given[name] = value
                continue
            if name in known_components():
                problem = (f"settings for '{name}', which is not being built (add --with {name}; "
                           f"building: {', '.join(names)})")
            else:
                problem = _unknown_component(str(name), names) + f" (building: {', '.join(names)})"
            issues.append(ConfigIssue(source.locate((name,), prefer_key=True), str(name), problem))
        try:
            check_index_settings(given, source)
        except ConfigError as exc:
            issues.extend(exc.issues)
        issues = [i for i in issues if i.path not in loaded.unmade or i in loaded.issues]
    for name in names:
        if name not in given:  # built with its defaults: the files they name (the default spaCy pipeline) checked too
            try:
                check_index_settings({name: None}, label=f"--with {name}")
            except ConfigError as exc:
                issues.extend(exc.issues)
    if issues:
        raise ConfigError(issues)
    settings.update({name: dict(value or {}) for name, value in given.items()})
    if language is not None:
        if "bm25" not in settings:
            raise SieveError("--language applies to the bm25 component, which is not being built")
        tokenizer = dict(settings["bm25"].get("tokenizer") or {})
        settings["bm25"] = {**settings["bm25"], "tokenizer": {**tokenizer, "language": language}}
        check_index_settings({"bm25": settings["bm25"]}, label="--language")
    return settings


def component_read_by(params: type[Any]) -> type[IndexComponent] | None:
    """The index component a stage's parameter model reads (its ``component`` parameter's default, when that names a
    registered component): e.g. recall.bm25's ``bm25``."""
    from engine.registry import UnknownStageType, resolve_component

    field = getattr(params, "model_fields", {}).get("component")
    if field is None or not isinstance(field.default, str):
        return None
    try:
        return resolve_component(field.default)
    except UnknownStageType:
        return None


def index_setting_hint(params: type[Any], key: str) -> str | None:
    """For an unknown key in a stage's params that is (or is one letter off) a setting of the index component the stage
    reads (``k1``, ``kl`` in recall.bm25): where that setting lives. None for any other key."""
    component = component_read_by(params)
    if component is None:
        return None
    settings = list(component.Settings.model_fields)
    name = key if key in settings else next((s for s in settings if _one_edit_apart(key, s)), None)
    if name is None:
        return None
    return (f"'{name}' is a setting of the index's {component.name} component, fixed when the index is built: "
            f"sieve index --with {component.name} --settings FILE, with FILE holding {component.name}: {{{name}: ...}}")


def _unknown_component(name: str, candidates: Sequence[str]) -> str:
    from difflib import get_close_matches

    from engine.registry import known_components

    hint = get_close_matches(name, list(candidates), n=1) or get_close_matches(name, known_components(), n=1)
    return (f"unknown index component '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; known components: {', '.join(known_components())}")


def _example(cls: type[IndexComponent]) -> str:
    """``bm25: {k1: 1.5}``: a component's first scalar setting with its default, for a message."""
    for field_name, info in cls.Settings.model_fields.items():
        if isinstance(info.default, (int, float, str)) and not isinstance(info.default, bool):
            return f"{cls.name}: {{{field_name}: {info.default}}}"
    return f"{cls.name}: {{}}"


def _validation_details(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
    )


def _io_reason(exc: OSError | sqlite3.Error) -> str:
    """An I/O failure in words: the file and the system's reason ("No space left on device")."""
    if isinstance(exc, sqlite3.Error):  # only the document store is SQLite
        hint = " (is the disk full?)" if "full" in str(exc) else ""
        return f"writing {DOCS_DB} failed: {exc}{hint}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{exc.filename}: {reason}" if exc.filename else reason


def _output_path(out_dir: Path) -> Path:
    """``--out`` made absolute, with what can be seen wrong with it before building reported."""
    try:
        resolved = Path(out_dir).resolve()
    except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
        raise SieveIndexError(f"cannot use --out {out_dir}: {getattr(exc, 'strerror', None) or exc}") from None
    if resolved.name in ("", ".", ".."):
        raise SieveIndexError(f"cannot use --out {out_dir}: name a directory to create, not {resolved}")
    try:
        found = _nearest_ancestor(resolved)
    except OSError as exc:
        raise SieveIndexError(f"cannot build the index at {resolved}: {exc.filename}: {exc.strerror or exc}") from None
    if found is not None and not stat.S_ISDIR(found[1]):
        raise SieveIndexError(
            f"cannot build the index at {resolved}: {found[0]} is a file, not a directory; choose another --out"
        )
    return resolved


def _nearest_ancestor(path: Path) -> tuple[Path, int] | None:
    """The closest ancestor of ``path`` that exists, with its ``st_mode`` (None: none does). Any other OSError than
    its absence propagates (its ``filename`` is the ancestor)."""
    for ancestor in path.parents:
        try:
            return ancestor, os.stat(ancestor).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
    return None


def _check_target(target: Path) -> None:
    """Refuse to replace anything but nothing, an empty directory or a Sieve index (never a user's folder)."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SieveIndexError(f"cannot build the index at {target}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(mode):
        raise SieveIndexError(
            f"{target} exists and is not a Sieve index; choose another --out or remove it yourself (it is a file)"
        )
    why = _not_an_index(target)
    if why is not None:
        raise SieveIndexError(
            f"{target} exists and is not a Sieve index; choose another --out or remove it yourself ({why})"
        )


_MAX_MANIFEST_BYTES = 256 << 20  # a manifest lists a few files; a bigger "manifest.json" is someone else's


def _not_an_index(directory: Path) -> str | None:
    """Why ``directory`` is not a Sieve index that a build may replace (None: it is one, or is empty)."""
    manifest_path = directory / MANIFEST
    try:
        if not manifest_path.is_file():
            return None if not any(directory.iterdir()) else f"it has no {MANIFEST}"
        if manifest_path.stat().st_size > _MAX_MANIFEST_BYTES:
            return f"its {MANIFEST} is far larger than a Sieve index manifest"
        manifest = json.loads(manifest_path.read_bytes())
    except OSError as exc:
        return f"it cannot be read: {exc.strerror or exc}"
    except (ValueError, RecursionError):
        return f"its {MANIFEST} is not JSON"
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        return f"its {MANIFEST} is not a Sieve index manifest"
    return None


def _make_directories(out_dir: Path, staging: Path, created: list[Path]) -> None:
    """Create ``staging`` and its missing parents, recording each one created (``staging`` must be new unless it is
    ``out_dir``'s parent)."""
    missing = [p for p in reversed(staging.parents) if not p.exists()] + [staging]
    for directory in missing:
        try:
            directory.mkdir()
        except FileExistsError:
            if directory == staging and directory != out_dir.parent:
                raise
            continue
        except OSError as exc:
            raise SieveIndexError(
                f"cannot build the index at {out_dir}: cannot create {directory}: {exc.strerror or exc}"
            ) from None
        created.append(directory)


def _discard(staging: Path, created: list[Path], lock: list[tuple[int, Path]] | None = None) -> None:
    """Remove the staging directory, release the build lock and remove the (then empty) parents this build
    created."""
    shutil.rmtree(staging, ignore_errors=True)
    _release_build_lock(lock or [])
    for directory in reversed(created):
        if directory != staging:
            try:
                directory.rmdir()
            except OSError:
                pass


def _lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def _acquire_build_lock(out_dir: Path) -> tuple[int, Path]:
    """Take the lock of builds of ``out_dir``: ``.NAME.lock`` beside it, held with ``flock`` for the build and removed
    by its holder (a lock file found unlinked or replaced after locking it is retried). Held by another build: a
    SieveIndexError at once (no waiting: the build the user started second would otherwise silently replace the
    first one's index, or wait for minutes). The holder's pid and start time are written into the file for the
    message. A build that dies releases it with its process (flock); the file it leaves is reused."""
    import fcntl

    path = _lock_path(out_dir)
    for _ in range(50):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SieveIndexError(
                f"cannot build the index at {out_dir}: cannot create {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            raise SieveIndexError(
                f"another build of {out_dir} is running ({holder or 'lock ' + str(path)}): wait for it to finish "
                "and build again if you still need to; nothing was changed"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, started {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
                      .encode(), 0)
            return fd, path
        os.close(fd)  # its holder removed it as we opened it: take the new one
    raise SieveIndexError(f"cannot take the build lock {path}: it keeps being replaced")


def _release_build_lock(lock: list[tuple[int, Path]]) -> None:
    """Remove the lock file (while still holding it) and release it."""
    while lock:
        fd, path = lock.pop()
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _build_leftover(out_dir: Path, name: str) -> tuple[str, int, float] | None:
    """("tmp", "old" or "gone", pid, when it was made in Unix seconds) when ``name`` is a staging or retired
    directory of ``out_dir``'s builds, or a build cache being deleted."""
    prefix = f".{out_dir.name}."
    if not name.startswith(prefix):
        return None
    match = re.fullmatch(r"(tmp|old|gone)-([0-9]{1,10})-([0-9]+)", name[len(prefix):])
    return (match.group(1), int(match.group(2)), int(match.group(3)) / 1000.0) if match else None


def _remove_stale_builds(out_dir: Path) -> None:
    """Remove staging directories of ``out_dir`` whose build process no longer exists (killed with
    SIGKILL, a power cut...), and retired copies of a replaced index once a newer one is in place."""
    try:
        entries = list(os.scandir(out_dir.parent))
    except OSError:
        return
    target_exists = out_dir.is_dir()
    if not target_exists:  # a build killed between its two renames: put the newest retired index back
        retired = []
        for entry in entries:
            found = _build_leftover(out_dir, entry.name)
            if found is not None and found[0] == "old" and not process_exists(found[1], found[2]):
                retired.append((found[2], entry))
        if retired:
            newest = max(retired, key=lambda pair: pair[0])[1]
            with contextlib.suppress(OSError):
                os.rename(newest.path, out_dir)
                target_exists = True
                entries.remove(newest)
    for entry in entries:
        leftover = _build_leftover(out_dir, entry.name)
        if leftover is None:
            continue
        kind, pid, made = leftover
        if kind == "old" and not target_exists:
            continue  # the previous index, which could not be put back: keep it
        try:
            is_directory = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if is_directory and not process_exists(pid, made):
            shutil.rmtree(entry.path, ignore_errors=True)


class _TerminationAsExit:
    """While building, SIGTERM raises ``SystemExit(143)`` (as Ctrl-C raises KeyboardInterrupt), so the
    staging directory is removed instead of left behind at full size. Only in the main thread and only
    where SIGTERM has its default action (an application's own handler is left alone); a second SIGTERM
    during the clean-up is ignored; the previous handler is restored afterwards."""

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False
        self._fired = False

    def _handle(self, signum: int, frame: Any) -> None:
        if not self._fired:
            self._fired = True
            raise SystemExit(128 + signum)

    def __enter__(self) -> "_TerminationAsExit":
        if threading.current_thread() is threading.main_thread():
            try:
                previous = signal.getsignal(signal.SIGTERM)
                if previous == signal.SIG_DFL:
                    signal.signal(signal.SIGTERM, self._handle)
                    self._previous, self._installed = previous, True
            except (ValueError, OSError):  # not the main interpreter
                pass
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def _write_documents(documents: Iterable[Document], db_path: Path, progress: Progress) -> int:
    """Store the documents, in order, as rows 0..n-1 of ``db_path`` (one transaction); return how many.

    ``documents`` may be a stream (:func:`iter_corpus`): only a batch is held at a time."""
    total = len(documents) if isinstance(documents, Sized) else None
    connection = sqlite3.connect(db_path)
    count = 0
    try:
        connection.execute(DOCS_TABLE)
        batch = []
        for row, doc in enumerate(documents):
            body = json.dumps({"title": doc.title, "text": doc.text, "metadata": doc.metadata}, ensure_ascii=False)
            batch.append((row, doc.doc_id, body))
            if len(batch) == 5000:
                connection.executemany("INSERT INTO docs VALUES (?, ?, ?)", batch)
                count += len(batch)
                progress("documents", len(batch), total)
                batch = []
        if batch:
            connection.executemany("INSERT INTO docs VALUES (?, ?, ?)", batch)
            count += len(batch)
            progress("documents", len(batch), total)
        connection.commit()
    finally:
        connection.close()
    return count


DOCS_TABLE = "CREATE TABLE docs (row INTEGER PRIMARY KEY, doc_id TEXT UNIQUE NOT NULL, body TEXT NOT NULL)"
# What a document store holds, and nothing else: the table and the index its UNIQUE makes (sqlite_master's rows)
DOCS_SCHEMA = [("table", "docs", "docs", DOCS_TABLE), ("index", "sqlite_autoindex_docs_1", "docs", None)]


class StoredDocuments(Sequence[Document]):
    """The documents of an index being built, read back from its document store: what an
    :class:`IndexComponent` is given to build from.

    A read-only sequence (``len``, iteration in row order, ``[i]``, slices) that holds no document: iterating
    fetches them in batches, a slice reads just its rows, so a component that walks the corpus (or slices it
    batch by batch, as one given a list would) keeps only its own working set in memory. The documents equal
    those read from the corpus (the store keeps title, text and metadata as JSON, which reads back equal)."""

    BATCH = 1000

    def __init__(self, db_path: Path, count: int):
        self._path = db_path
        self._count = count
        self._lookup: sqlite3.Connection | None = None  # for [i] and slices; iterations open their own

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{_uri_path(str(self._path))}?mode=ro&immutable=1", uri=True,
                               check_same_thread=False)

    def close(self) -> None:
        if self._lookup is not None:
            self._lookup.close()
            self._lookup = None

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Document]:
        connection = self._connect()
        try:
            cursor = connection.execute("SELECT doc_id, body FROM docs ORDER BY row")
            while batch := cursor.fetchmany(self.BATCH):
                for doc_id, body in batch:
                    yield self._document(doc_id, body)
        finally:
            connection.close()

    def _rows(self, start: int, stop: int) -> list[Document]:
        if self._lookup is None:
            self._lookup = self._connect()
        found = self._lookup.execute(
            "SELECT doc_id, body FROM docs WHERE row >= ? AND row < ? ORDER BY row", (start, stop)
        ).fetchall()
        return [self._document(doc_id, body) for doc_id, body in found]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            if step == 1:
                return self._rows(start, stop) if start < stop else []
            return [self[i] for i in range(start, stop, step)]
        position = operator.index(index)
        if position < 0:
            position += self._count
        if not 0 <= position < self._count:
            raise IndexError("document index out of range")
        return self._rows(position, position + 1)[0]

    @staticmethod
    def _document(doc_id: str, body: str) -> Document:
        fields = json.loads(body)
        return Document(doc_id, fields["title"], fields["text"], fields["metadata"])


def _swap_in(staging: Path, target: Path, keep_previous: bool = False) -> None:
    """Replace ``target`` with ``staging`` so that a crash leaves either the old or the new index; with
    ``keep_previous`` the index replaced goes to ``NAME.<sha12>`` beside it (:func:`kept_copy_name`)."""
    _check_target(target)  # again: the directory may have changed during the build
    keep_as = None
    if keep_previous:
        previous = manifest_sha256_of(target)
        if previous is not None and previous != manifest_sha256_of(staging):  # identical: the new one is the same
            existing = kept_copy(target, previous)
            keep_as = existing if existing is not None else target.parent / kept_copy_name(target, previous)
            if keep_as.exists():  # a copy of that very index is kept already (or the name is taken): keep that one
                keep_as = None
    swap_directory(staging, target, keep_as=keep_as)


#: What a manifest records of the build rather than of the index (an identical rebuild by another version differs in it)
BUILD_METADATA = frozenset({"engine_version"})


def manifest_sha256_of(directory: Path) -> str | None:
    """The sha256 of ``directory``'s manifest.json (what a trace records as the index's ``manifest_sha256``), None
    when it has none or it cannot be read."""
    try:
        with open(Path(directory) / MANIFEST, "rb") as handle:
            return hashlib.sha256(handle.read(_MAX_MANIFEST_BYTES)).hexdigest()
    except OSError:
        return None


def kept_copy_name(index_dir: Path, manifest_sha256: str) -> str:
    """The name ``sieve index --keep-previous`` gives a replaced index: ``NAME.<first 12 hex of its manifest sha256>``."""
    return f"{Path(index_dir).name}.{manifest_sha256[:12]}"


def kept_copy(index_dir: Path, manifest_sha256: str) -> Path | None:
    """The copy of the index with this manifest sha256 kept beside ``index_dir`` (by ``--keep-previous``), if any."""
    if not manifest_sha256 or not re.fullmatch(r"[0-9a-f]{12,64}", str(manifest_sha256)):
        return None
    candidate = Path(index_dir).parent / kept_copy_name(index_dir, manifest_sha256)
    if candidate.is_dir() and manifest_sha256_of(candidate) == manifest_sha256:
        return candidate
    return None


def _identity_of(path: Path) -> tuple[int, int] | None:
    """A directory's (device, inode), None when there is none: which directory a path names now."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def swap_directory(staging: Path, target: Path, *, keep_as: Path | None = None) -> None:
    """Replace directory ``target`` (if any) with ``staging``, SIGINT and SIGTERM held back throughout: a crash leaves
    the previous directory or the new one at ``target``, never a mix. On Linux the two trade names in one step
    (renameat2's RENAME_EXCHANGE); elsewhere by two renames, and a build killed between them leaves the previous
    directory as ``.NAME.old-PID-MILLIS``, which the next build puts back (:func:`_remove_stale_builds`). The
    previous directory then goes (removed after), or, with ``keep_as``, is renamed to that path (beside ``target``)
    before the signals are let through, so an interrupt at the end cannot lose the copy asked for."""
    _durable(staging)  # a power cut after the swap must not leave a new index whose files were never written out
    retired = target.parent / f".{target.name}.old-{os.getpid()}-{int(time.time() * 1000)}"
    previous_at: Path | None = None  # where the previous directory is once the new one is in place
    previous_mask = _block_interrupts()
    try:
        if not target.exists():
            os.rename(staging, target)
        elif _exchange(staging, target):
            previous_at = staging
        else:
            os.rename(target, retired)
            previous_at = retired
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(retired, target)  # put the previous directory back
                raise
        if previous_at is not None and keep_as is not None:
            with contextlib.suppress(OSError):  # else the new one is in place: the previous one goes as without keep_as
                os.rename(previous_at, keep_as)
                previous_at = None
        if previous_at == staging:  # named as a retired copy, which a later build removes if this one is killed
            os.rename(staging, retired)
            previous_at = retired
    finally:
        _unblock_interrupts(previous_mask)
    with contextlib.suppress(SieveIndexError):  # the new names; the index is in place whatever this says
        _fsync_path(target.parent)
    if previous_at is not None:
        shutil.rmtree(previous_at, ignore_errors=True)


def _durable(directory: Path) -> None:
    """fsync every file and directory under ``directory`` (the staged index or model, before it is swapped in)."""
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def _fsync_path(path: Path) -> None:
    try:
        fsync_path(path)  # a file the build left unreadable: nothing to flush from here
    except OSError as exc:
        raise SieveIndexError(f"cannot write {path} out to disk: {exc.strerror or exc}") from None


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.cache
def _renameat2() -> Any:
    """The C library's renameat2, or None (not Linux, a C library before glibc 2.28)."""
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(first: Path, second: Path) -> bool:
    """Trade the names of two existing directories in one step; False where that cannot be done here (another system,
    a file system without it: the caller renames twice)."""
    import ctypes

    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _block_interrupts() -> Any:
    """Hold SIGINT and SIGTERM back during the two renames of a swap (delivered right after); returns
    the signal mask to restore (None where signals cannot be blocked here)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _unblock_interrupts(previous_mask: Any) -> None:
    if previous_mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


# --------------------------------------------------------------------------- opening


class DocumentStore:
    """Read-only access to documents by row, thread-safe.

    A damaged store (unreadable pages, text that is not UTF-8, bodies that are not the JSON the build
    wrote) raises :class:`SieveIndexError` naming the index, never a raw sqlite3 or JSON error.

    Every connection reads the very file the index was opened with, even after the index is rebuilt in
    place (a new directory swapped in at the same path). The file is held open (``fd``) from the start:
    its inode can then not be reused, so a connection opened by path is checked to be that file (the
    path's inode before and after connecting; SQLite opens the file when it connects). Each thread opens
    its own connection while the path still names that file; once it names another one, threads
    without a connection share one opened at the start (``_pinned``, serialised by a lock). SQLite cannot
    open ``/proc/self/fd/N`` once the file is deleted (it resolves the link to the deleted name), so the
    held descriptor alone is not enough.
    """

    def __init__(self, path: Path, count: int, fd: int | None = None):
        self._path = path
        self._local = threading.local()
        self.count = count
        self._fd = fd
        self._identity = os.fstat(fd) if fd is not None else None
        self._pinned_lock = threading.RLock()
        self._pinned: sqlite3.Connection | None = self._open_checked(shared=True) if fd is not None else None
        try:
            self._check_schema()
        except BaseException:
            self.close()
            raise

    def _check_schema(self) -> None:
        """SieveIndexError unless the store holds the build's table and nothing else: a store from elsewhere
        holding ``docs`` as a view (over an endless recursive query: warm-up never returned) or a trigger is
        refused before any document is read."""
        connection = self._pinned or self._connection()
        try:
            with self._pinned_lock:
                found = connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()
        except sqlite3.Error as exc:
            raise self._corrupt(exc) from None
        if found != DOCS_SCHEMA:
            shown = ", ".join(f"{kind} {printable(str(name))}" for kind, name, _, _ in found[:5]) or "nothing"
            raise self._corrupt(f"it holds {shown}{' ...' if len(found) > 5 else ''}, not the table a build writes")

    def _corrupt(self, detail: Any) -> SieveIndexError:
        return SieveIndexError(f"index at {self._path.parent} is corrupt: {self._path.name}: {detail}; rebuild it")

    def _names_our_file(self, name: str) -> bool:
        try:
            return self._identity is not None and os.path.samestat(os.stat(name), self._identity)
        except OSError:
            return False

    def _open_checked(self, shared: bool = False) -> sqlite3.Connection | None:
        """A read-only connection to the file opened at the start, by its path or (Linux) where it was moved to
        with its directory; None when no name reaches it any more (replaced and deleted)."""
        names = [str(self._path)]
        try:
            moved = os.readlink(f"/proc/self/fd/{self._fd}")
            if moved not in names and not moved.endswith(" (deleted)"):
                names.append(moved)
        except OSError:
            pass
        for name in names:
            if not self._names_our_file(name):
                continue
            try:
                connection = sqlite3.connect(f"file:{_uri_path(name)}?mode=ro&immutable=1", uri=True,
                                             check_same_thread=not shared)
            except sqlite3.Error:  # renamed or deleted between the check and the open (a rebuild), or no descriptor
                continue           # left (fd exhaustion): as a name that does not reach the file
            if self._names_our_file(name):
                return connection
            connection.close()
        return None

    def close(self) -> None:
        """Close the shared connection and this thread's (another thread's closes when that thread ends)."""
        with self._pinned_lock:
            pinned, self._pinned = self._pinned, None
        own = getattr(self._local, "connection", None)
        self._local.connection = None
        for connection in (pinned, own):
            if connection is not None:
                with contextlib.suppress(sqlite3.Error):
                    connection.close()

    def replaced_on_disk(self) -> bool:
        """Whether the document store's path now names another file than the one opened (the index was rebuilt)."""
        return self._identity is not None and not self._names_our_file(str(self._path))

    def _connection(self) -> sqlite3.Connection | None:
        """This thread's connection, or None: use the shared pinned one (under its lock)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            if self._fd is None:
                connection = sqlite3.connect(f"file:{_uri_path(str(self._path))}?mode=ro&immutable=1", uri=True)
            else:
                connection = self._open_checked()
                if connection is None:
                    if self._pinned is None:
                        raise SieveIndexError(
                            f"the index at {self._path.parent} was replaced on disk while it was being opened: "
                            "open it again (restart the server)")
                    return None
            self._local.connection = connection
        return connection

    def _query(self, sql: str, parameters: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        """The rows of a query, fetched in batches; any SQLite failure reported as a corrupt index."""
        connection = self._connection()
        if connection is None:  # the index was rebuilt since this thread began: read the version opened
            with self._pinned_lock:
                if self._pinned is None:  # closed (Pipeline.close) while this thread's query read a replaced index
                    raise SieveIndexError(f"the index at {self._path.parent} was closed while a query read it, and "
                                          "has been replaced on disk since: open it again")
                yield from self._rows(self._pinned, sql, parameters)
        else:
            yield from self._rows(connection, sql, parameters)

    def _rows(self, connection: sqlite3.Connection, sql: str, parameters: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
        try:
            cursor = connection.execute(sql, parameters)
            while batch := cursor.fetchmany(1000):
                yield from batch
        except sqlite3.Error as exc:
            raise self._corrupt(exc) from None

    def _document(self, row: Any, doc_id: Any, body: Any) -> Document:
        if not isinstance(doc_id, str):
            raise self._corrupt(f"row {row}: doc_id is not text")
        try:
            fields = json.loads(body)
        except (TypeError, ValueError, RecursionError) as exc:
            raise self._corrupt(f"row {row}: the document body is not valid JSON ({exc})") from None
        if (
            not isinstance(fields, dict)
            or not isinstance(fields.get("title"), str)
            or not isinstance(fields.get("text"), str)
            or not isinstance(fields.get("metadata"), dict)
        ):
            raise self._corrupt(f"row {row}: the document body lacks its title, text or metadata")
        return Document(doc_id, fields["title"], fields["text"], fields["metadata"])

    def get(self, rows: Sequence[int]) -> dict[int, Document]:
        """Documents for the given rows (missing rows are an index error)."""
        if not rows:
            return {}
        result: dict[int, Document] = {}
        unique = sorted(set(int(r) for r in rows))
        for start in range(0, len(unique), 900):
            chunk = unique[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for row, doc_id, body in self._query(f"SELECT row, doc_id, body FROM docs WHERE row IN ({marks})", chunk):
                result[row] = self._document(row, doc_id, body)
        if len(result) != len(unique):
            missing = [r for r in unique if r not in result][:5]
            raise SieveIndexError(f"document store {self._path} lacks rows {missing}: the index is corrupt; rebuild it")
        return result

    def doc_ids(self) -> list[str]:
        """Every doc_id, by row."""
        ids = [r[0] for r in self._query("SELECT doc_id FROM docs ORDER BY row")]
        for row, doc_id in enumerate(ids):
            if not isinstance(doc_id, str):
                raise self._corrupt(f"row {row}: doc_id is not text")
        return ids

    def iter_documents(self) -> Iterator[Document]:
        for row, doc_id, body in self._query("SELECT row, doc_id, body FROM docs ORDER BY row"):
            yield self._document(row, doc_id, body)


def _uri_path(name: str) -> str:
    """A file name as the path of an SQLite ``file:`` URI (``?``, ``#`` and ``%`` escaped)."""
    from urllib.parse import quote

    return quote(name, safe="/ ")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the structure of a manifest that names the right format (None: nothing)."""
    for key in ("corpus", "components", "files"):
        if key not in manifest:
            return f"no '{key}' section"
        if not isinstance(manifest[key], dict):
            return f"'{key}' must be an object, got {_json_kind(manifest[key])}"
    count = manifest["corpus"].get("doc_count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return f"'corpus.doc_count' must be a non-negative integer, got {_json_kind(count)}"
    for name, entry in manifest["components"].items():
        if not isinstance(entry, dict):
            return f"'components.{name}' must be an object, got {_json_kind(entry)}"
        if "settings" in entry:
            problem = _settings_problem(name, entry["settings"])
            if problem is not None:
                return f"'components.{name}.settings' {problem}"
    files = manifest["files"]
    if DOCS_DB not in files:
        return f"'files' does not list {DOCS_DB}"
    for relative, expected in files.items():
        parts = Path(relative).parts
        if not relative or Path(relative).is_absolute() or ".." in parts:
            return f"'files' names {relative!r}, which is not a path inside the index"
        if not isinstance(expected, str) or not _SHA256.fullmatch(expected):
            return f"'files.{relative}' must be a sha256 hex digest, got {_json_kind(expected)}"
    return None


def _settings_problem(name: str, settings: Any) -> str | None:
    """Why a component's recorded settings are unusable: not an object, or (for a registered component)
    not valid settings of that component."""
    if not isinstance(settings, dict):
        return f"must be an object, got {_json_kind(settings)}"
    from engine.registry import UnknownStageType, resolve_component

    try:
        cls = resolve_component(name)
    except UnknownStageType:
        return None  # a stage needing it will say the component is unknown
    try:
        cls.Settings.model_validate(settings)
    except ValidationError as exc:
        return f"are not valid {name} settings: {_validation_details(exc)}"
    return None


def _close_quietly(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class Index:
    """An opened, verified index directory.

    It stays the version opened for its whole life: the directory and its document store are held open (file
    descriptors, closed with the object or by :meth:`close`), the manifest and every file are read through the
    directory opened, and documents always come from the document store opened (see :class:`DocumentStore`), so
    an index rebuilt at the same path meanwhile (``sieve index --out`` swaps a new directory in) is never mixed
    with it. :meth:`disk_state` says whether the path now holds another index (or the same one rebuilt
    identically); :meth:`component` refuses to hand out a component directory once the path holds another
    directory (a stage loading its files at warm-up would read the new one).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], manifest_sha256: str, *,
                 dir_fd: int | None = None, docs_fd: int | None = None):
        self.path = path
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.doc_count: int = manifest["corpus"]["doc_count"]
        opened: list[int] = []  # the descriptors opened here, closed here if the store is refused
        try:
            if dir_fd is None:
                dir_fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
                opened.append(dir_fd)
            if docs_fd is None:
                docs_fd = os.open(DOCS_DB, os.O_RDONLY | _O_CLOEXEC, dir_fd=dir_fd)
                opened.append(docs_fd)
            self._dir_fd, self._docs_fd = dir_fd, docs_fd
            self._dir_identity = os.fstat(dir_fd)
            self.documents = DocumentStore(path / DOCS_DB, self.doc_count, docs_fd)
        except BaseException:
            _close_quietly(*opened)  # a caller's own descriptors are the caller's to close (Index.open does)
            raise
        self._closer = weakref.finalize(self, _close_quietly, dir_fd, docs_fd)  # once nothing can fail
        self._doc_ids: list[str] | None = None
        self._row_of: dict[str, int] | None = None
        self._lock = threading.Lock()
        self._on_disk: tuple[tuple[int, int, int, int], str | None, bool] | None = None  # key, sha256, built alike
        self._verified: dict[str, tuple[int, int, int, int]] = {}  # each file as hashed at open (Index.open)

    def close(self) -> None:
        """Release the directory and document store (the object cannot read documents after)."""
        self.documents.close()
        self._closer()

    @classmethod
    def open(cls, path: Path, *, verify: bool = True) -> "Index":
        """Open the index at ``path``. An open that fails while the directory at ``path`` is replaced (``sieve index``
        rebuilding it swaps a new one in) is tried again, up to three times: read half from the old directory and
        half from the new, it would call a healthy index incomplete."""
        path = Path(path)
        for attempt in range(3):
            before = _identity_of(path)
            try:
                return cls._open_once(path, verify=verify)
            except SieveIndexError:
                if attempt == 2 or before is None or _identity_of(path) == before:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @classmethod
    def _open_once(cls, path: Path, *, verify: bool) -> "Index":
        if not path.is_dir():
            raise SieveIndexError(f"no index at {path} (build one with `sieve index CORPUS --out {path}`)")
        try:
            dir_fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        except OSError as exc:
            raise SieveIndexError(f"cannot open the index {path}: {exc.strerror or exc}") from None
        docs_fd: list[int] = []
        verified: dict[str, tuple[int, int, int, int]] = {}
        try:
            manifest, raw = cls._read_manifest(path, dir_fd)
            for relative, expected in manifest["files"].items():
                file_path = path / relative
                try:
                    regular = stat.S_ISREG(os.stat(relative, dir_fd=dir_fd).st_mode)
                except OSError:
                    regular = False
                if not regular:
                    raise SieveIndexError(f"index {path} is incomplete: {relative} is missing; rebuild it")
                try:
                    fd = os.open(relative, os.O_RDONLY | _O_CLOEXEC, dir_fd=dir_fd)
                    if relative == DOCS_DB:
                        docs_fd.append(fd)
                    try:
                        matches = not verify or _sha256_fd(fd) == expected
                        verified[relative] = file_version(os.fstat(fd))
                    finally:
                        if relative != DOCS_DB:
                            os.close(fd)
                except OSError as exc:
                    raise SieveIndexError(f"cannot read {file_path}: {exc.strerror or exc}") from None
                if not matches:
                    raise SieveIndexError(
                        f"index {path} is corrupt: {relative} does not match the hash in {MANIFEST}; rebuild it"
                    )
            index = cls(path, manifest, hashlib.sha256(raw).hexdigest(), dir_fd=dir_fd, docs_fd=docs_fd[0])
            index._verified = verified
            return index
        except BaseException:
            _close_quietly(dir_fd, *docs_fd)
            raise

    def changed_since_opened(self) -> list[str]:
        """The index's files (by manifest name) that are not, in the directory opened, the files hashed when it was
        opened (replaced, rewritten or removed in place since): the stages load their files by name after that
        check, so one changed meanwhile would be loaded while the trace names the verified hashes."""
        changed = []
        for relative, key in self._verified.items():
            try:
                now = file_version(os.stat(relative, dir_fd=self._dir_fd))
            except OSError:
                now = None
            if now != key:
                changed.append(relative)
        return changed

    @staticmethod
    def _read_manifest(path: Path, dir_fd: int) -> tuple[dict[str, Any], bytes]:
        manifest_path = path / MANIFEST
        try:
            if not stat.S_ISREG(os.stat(MANIFEST, dir_fd=dir_fd).st_mode):
                raise FileNotFoundError
        except OSError:
            raise SieveIndexError(f"{path} is not a Sieve index: {MANIFEST} is missing") from None
        try:
            fd = os.open(MANIFEST, os.O_RDONLY | _O_CLOEXEC, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as handle:
                raw = handle.read(_MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise SieveIndexError(f"cannot read {manifest_path}: {exc.strerror or exc}") from None
        if len(raw) > _MAX_MANIFEST_BYTES:  # read whole, then parsed: a huge one would take the memory twice over
            raise SieveIndexError(f"{manifest_path} is over {_MAX_MANIFEST_BYTES >> 20} MiB: not a manifest Sieve wrote "
                                  "(it lists a few files)")
        try:
            manifest = json.loads(raw)
        except RecursionError:
            raise SieveIndexError(f"{manifest_path} is corrupt: nested too deeply; rebuild the index") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise SieveIndexError(f"{manifest_path} is corrupt: not valid JSON ({exc}); rebuild the index") from None
        if not isinstance(manifest, dict):
            raise SieveIndexError(
                f"index at {path} is corrupt: {MANIFEST} must hold a JSON object, got {_json_kind(manifest)}; rebuild "
                "it"
            )
        if manifest.get("format") != INDEX_FORMAT:
            found = manifest.get("format")
            raise SieveIndexError(f"{manifest_path}: unsupported index format {found!r} (expected {INDEX_FORMAT})")
        problem = _manifest_problem(manifest)
        if problem is not None:
            raise SieveIndexError(f"index at {path} is corrupt: {MANIFEST}: {problem}; rebuild it")
        return manifest, raw

    def replaced_on_disk(self) -> bool:
        """Whether ``path`` now names another directory (or document store) than the one opened: the index was
        rebuilt (or moved) since, perhaps identically (:meth:`disk_state` tells). This object still reads the
        version it opened."""
        try:
            same = os.path.samestat(os.stat(self.path), self._dir_identity)
        except OSError:
            same = False
        return not same or self.documents.replaced_on_disk()

    def disk_state(self) -> dict[str, Any]:
        """The index being read against the one now at its path: ``replaced_on_disk`` (the path holds another index:
        another manifest, or none readable), ``rebuilt_identically`` (the path holds another directory with the very
        manifest served, or one that differs from it only in build metadata, the engine version that wrote it: a
        deterministic rebuild of the same corpus and settings, whose files the manifest names by sha256, so the same
        index and nothing to restart for), ``serving_manifest_sha256`` and
        ``on_disk_manifest_sha256`` (None: no readable manifest there). The on-disk manifest is hashed again only
        when its file changed (size, mtime, inode)."""
        replaced = self.replaced_on_disk()
        on_disk: str | None = self.manifest_sha256
        built_alike = True
        if replaced:
            try:
                key = file_version(os.stat(self.path / MANIFEST))
            except OSError:
                key, on_disk, built_alike = None, None, False
            if key is not None:
                cached = self._on_disk
                if cached is None or cached[0] != key:
                    cached = self._on_disk = (key, manifest_sha256_of(self.path), self._built_alike_on_disk())
                _, on_disk, built_alike = cached
        identical = replaced and (on_disk == self.manifest_sha256 or built_alike)
        return {"path": str(self.path), "replaced_on_disk": replaced and not identical,
                "rebuilt_identically": identical, "serving_manifest_sha256": self.manifest_sha256,
                "on_disk_manifest_sha256": on_disk}

    def _built_alike_on_disk(self) -> bool:
        """Whether the manifest now at the path is the one served but for its build metadata (``BUILD_METADATA``): the
        same files by sha256, components, settings and corpus, as an identical rebuild by another Sieve writes it."""
        try:
            with open(self.path / MANIFEST, "rb") as handle:
                found = json.loads(handle.read(_MAX_MANIFEST_BYTES))
        except (OSError, ValueError):
            return False

        def content(manifest: Any) -> Any:
            return {k: v for k, v in manifest.items() if k not in BUILD_METADATA} if isinstance(manifest, dict) else None

        return content(found) is not None and content(found) == content(self.manifest)

    def component(self, name: str, stage_id: str | None = None) -> tuple[Path, dict[str, Any]]:
        """Directory and manifest entry of a component; a clear error if the index lacks it."""
        entry = self.manifest["components"].get(name)
        if entry is None:
            who = f"stage '{stage_id}' needs" if stage_id else "this needs"
            have = ", ".join(self.manifest["components"]) or "none"
            raise SieveIndexError(
                f"{who} the '{name}' component, but the index at {self.path} has: {have}. "
                f"Rebuild it with `sieve index ... --with {name}`"
            )
        if self.replaced_on_disk():
            raise SieveIndexError(
                f"the index at {self.path} was replaced on disk (rebuilt) after it was opened: its components would "
                "not match the documents opened; open it again (restart)"
            )
        return self.path / name, entry

    def doc_ids(self) -> list[str]:
        with self._lock:
            if self._doc_ids is None:
                self._doc_ids = self.documents.doc_ids()
            return self._doc_ids

    def row_of(self, doc_id: str) -> int | None:
        with self._lock:
            if self._row_of is None:
                ids = self._doc_ids if self._doc_ids is not None else self.documents.doc_ids()
                self._doc_ids = ids
                self._row_of = {d: i for i, d in enumerate(ids)}
            return self._row_of.get(doc_id)

    def describe(self) -> dict[str, Any]:
        """What a trace records about the index (with each component's settings, so that a replay against an index
        rebuilt from the same corpus can tell whether it was built alike)."""
        return {
            "path": str(self.path),
            "manifest_sha256": self.manifest_sha256,
            "doc_count": self.doc_count,
            "components": sorted(self.manifest["components"]),
            "component_settings": {
                name: entry.get("settings") for name, entry in sorted(self.manifest["components"].items())
                if isinstance(entry, dict) and "settings" in entry
            },
        }
