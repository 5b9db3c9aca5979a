"""On-disk index: a document store, pluggable components (bm25, dense, ...) and a manifest.

Layout of an index directory::

    manifest.json      format, corpus hash, doc count, every file's sha256, component settings
    docs.sqlite        row -> doc_id, fields (JSON)
    <component>/       one directory per component, written by its IndexComponent

Building writes into a temporary sibling directory and swaps it in with renames, so a failure
half-way never leaves a broken index where a good one was. Opening verifies the manifest and
(by default) every file's hash, so a corrupt index is reported, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ConfigDict, ValidationError

from engine import __version__
from engine.errors import SieveError, SieveIndexError
from engine.strictness import NoCoercion

INDEX_FORMAT = "sieve.index/1"
MANIFEST = "manifest.json"
DOCS_DB = "docs.sqlite"

Progress = Callable[[str, int, int | None], None]  # (task, advanced by, total)


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


class ComponentSettings(NoCoercion):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IndexComponent:
    """A searchable structure built from the corpus (registered with ``register_index_component``)."""

    name: ClassVar[str]
    Settings: ClassVar[type[ComponentSettings]] = ComponentSettings

    def build(
        self, documents: Sequence[Document], out_dir: Path, settings: ComponentSettings, progress: Progress
    ) -> dict[str, Any]:
        """Write the component's files into ``out_dir``; return what the manifest should record."""
        raise NotImplementedError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- corpus reading


def read_corpus(path: Path, max_errors: int = 20) -> list[Document]:
    """Read a BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``, other fields as metadata)."""
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.is_file():
        raise SieveError(f"corpus not found: {path} (expected a BEIR corpus.jsonl or a directory holding one)")
    documents: list[Document] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                problems.append(f"{path}:{number}: not a JSON object ({exc})")
            else:
                problem = _check_record(record)
                if problem is None:
                    doc_id = str(record["_id"])
                    if doc_id in seen:
                        problems.append(f"{path}:{number}: duplicate _id '{doc_id}' (first on line {seen[doc_id]})")
                    else:
                        seen[doc_id] = number
                        metadata = {k: v for k, v in record.items() if k not in ("_id", "title", "text")}
                        documents.append(
                            Document(doc_id, record.get("title") or "", record.get("text") or "", metadata)
                        )
                else:
                    problems.append(f"{path}:{number}: {problem}")
            if len(problems) >= max_errors:
                problems.append("(stopped after too many errors)")
                break
    if problems:
        raise SieveError("the corpus has errors:\n" + "\n".join(problems))
    if not documents:
        raise SieveError(f"the corpus {path} holds no documents")
    return documents


def _check_record(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "each line must be a JSON object"
    if "_id" not in record or not isinstance(record["_id"], (str, int)) or str(record["_id"]).strip() == "":
        return "missing or empty '_id'"
    for name in ("title", "text"):
        if name in record and record[name] is not None and not isinstance(record[name], str):
            return f"'{name}' must be a string"
    if not (record.get("title") or record.get("text")):
        return "the document has neither title nor text"
    return None


# --------------------------------------------------------------------------- building


def build_index(
    corpus: Path,
    out_dir: Path,
    components: dict[str, dict[str, Any]],
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """Build an index with the named components (``{"bm25": {settings}}``) and swap it in atomically."""
    from engine.registry import UnknownStageType, resolve_component

    resolved = {}
    for name, raw_settings in components.items():
        try:
            cls = resolve_component(name)
        except UnknownStageType as exc:
            raise SieveError(exc.message) from None
        try:
            resolved[name] = (cls(), cls.Settings.model_validate(raw_settings or {}))
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            raise SieveError(f"bad settings for index component '{name}': {details}") from None

    corpus_file = corpus / "corpus.jsonl" if corpus.is_dir() else corpus
    documents = read_corpus(corpus_file)
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
    staging.mkdir()
    try:
        _write_documents(documents, staging / DOCS_DB, progress)
        manifest_components = {}
        for name, (component, settings) in resolved.items():
            component_dir = staging / name
            component_dir.mkdir()
            recorded = component.build(documents, component_dir, settings, progress)
            manifest_components[name] = {"settings": settings.model_dump(mode="json"), **recorded}
        files = {
            str(p.relative_to(staging)): sha256_file(p)
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": INDEX_FORMAT,
            "engine_version": __version__,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "corpus": {
                "source": str(corpus_file),
                "sha256": sha256_file(corpus_file),
                "doc_count": len(documents),
            },
            "components": manifest_components,
            "files": files,
        }
        with open(staging / MANIFEST, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_documents(documents: Sequence[Document], db_path: Path, progress: Progress) -> None:
    connection = sqlite3.connect(db_path)
    try:
        connection.execute("CREATE TABLE docs (row INTEGER PRIMARY KEY, doc_id TEXT UNIQUE NOT NULL, body TEXT NOT NULL)")
        batch = []
        for row, doc in enumerate(documents):
            body = json.dumps({"title": doc.title, "text": doc.text, "metadata": doc.metadata}, ensure_ascii=False)
            batch.append((row, doc.doc_id, body))
            if len(batch) == 5000:
                connection.executemany("INSERT INTO docs VALUES (?, ?, ?)", batch)
                progress("documents", len(batch), len(documents))
                batch = []
        if batch:
            connection.executemany("INSERT INTO docs VALUES (?, ?, ?)", batch)
            progress("documents", len(batch), len(documents))
        connection.commit()
    finally:
        connection.close()


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging`` so that a crash leaves either the old or the new index."""
    if target.exists() and not (target / MANIFEST).is_file() and any(target.iterdir()):
        raise SieveError(
            f"{target} exists and is not a Sieve index (no {MANIFEST}); refusing to overwrite it"
        )
    retired = None
    if target.exists():
        retired = target.parent / f".{target.name}.old-{os.getpid()}-{int(time.time() * 1000)}"
        os.rename(target, retired)
    os.rename(staging, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


# --------------------------------------------------------------------------- opening


class DocumentStore:
    """Read-only access to documents by row, thread-safe."""

    def __init__(self, path: Path, count: int):
        self._path = path
        self._local = threading.local()
        self.count = count

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(f"file:{self._path}?mode=ro&immutable=1", uri=True)
            self._local.connection = connection
        return connection

    def get(self, rows: Sequence[int]) -> dict[int, Document]:
        """Documents for the given rows (missing rows are an index error)."""
        if not rows:
            return {}
        result: dict[int, Document] = {}
        unique = sorted(set(int(r) for r in rows))
        connection = self._connection()
        for start in range(0, len(unique), 900):
            chunk = unique[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for row, doc_id, body in connection.execute(
                f"SELECT row, doc_id, body FROM docs WHERE row IN ({marks})", chunk
            ):
                fields = json.loads(body)
                result[row] = Document(doc_id, fields["title"], fields["text"], fields["metadata"])
        if len(result) != len(unique):
            missing = [r for r in unique if r not in result][:5]
            raise SieveIndexError(f"document store {self._path} lacks rows {missing}: the index is corrupt")
        return result

    def doc_ids(self) -> list[str]:
        """Every doc_id, by row."""
        rows = self._connection().execute("SELECT doc_id FROM docs ORDER BY row").fetchall()
        return [r[0] for r in rows]

    def iter_documents(self) -> Iterator[Document]:
        for _row, doc_id, body in self._connection().execute("SELECT row, doc_id, body FROM docs ORDER BY row"):
            fields = json.loads(body)
            yield Document(doc_id, fields["title"], fields["text"], fields["metadata"])


class Index:
    """An opened, verified index directory."""

    def __init__(self, path: Path, manifest: dict[str, Any], manifest_sha256: str):
        self.path = path
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.doc_count: int = manifest["corpus"]["doc_count"]
        self.documents = DocumentStore(path / DOCS_DB, self.doc_count)
        self._doc_ids: list[str] | None = None
        self._row_of: dict[str, int] | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, verify: bool = True) -> "Index":
        path = Path(path)
        if not path.is_dir():
            raise SieveIndexError(f"no index at {path} (build one with `sieve index CORPUS --out {path}`)")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise SieveIndexError(f"{path} is not a Sieve index: {MANIFEST} is missing")
        raw = manifest_path.read_bytes()
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SieveIndexError(f"{manifest_path} is corrupt: not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise SieveIndexError(f"{manifest_path}: unsupported index format {found!r} (expected {INDEX_FORMAT})")
        for key in ("corpus", "components", "files"):
            if key not in manifest:
                raise SieveIndexError(f"{manifest_path} is corrupt: no '{key}' section")
        for relative, expected in manifest["files"].items():
            file_path = path / relative
            if not file_path.is_file():
                raise SieveIndexError(f"index {path} is incomplete: {relative} is missing")
            if verify and sha256_file(file_path) != expected:
                raise SieveIndexError(
                    f"index {path} is corrupt: {relative} does not match the hash in {MANIFEST}; rebuild it"
                )
        return cls(path, manifest, hashlib.sha256(raw).hexdigest())

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
        """What a trace records about the index."""
        return {
            "path": str(self.path),
            "manifest_sha256": self.manifest_sha256,
            "doc_count": self.doc_count,
            "components": sorted(self.manifest["components"]),
        }
