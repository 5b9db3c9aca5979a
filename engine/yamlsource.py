"""Safe YAML loading that remembers where every value came from.

Only plain data is constructed (``yaml.SafeLoader``'s scalars, mappings and sequences): YAML can
never name a Python object. The loader guards against hostile or accidental input — oversized
files, very deep nesting, alias ("billion laughs") expansion, duplicate keys — and reports each
problem as a located :class:`~engine.errors.ConfigIssue`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import ConfigError, ConfigIssue, Location

MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 200_000

PathKey = tuple[str | int, ...]
_PLAIN_COLLECTION_TAGS = frozenset({"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"})


@dataclass
class SourceMap:
    """Maps a path inside the loaded data to the line and column it came from."""

    file: str
    values: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    keys: dict[PathKey, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: PathKey, *, prefer_key: bool = False) -> Location:
        """Location of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while True:
            table_order = (self.keys, self.values) if prefer_key else (self.values, self.keys)
            for table in table_order:
                if path in table:
                    line, column = table[path]
                    return Location(self.file, line, column)
            if not path:
                return Location(self.file, 1, 1)
            path = path[:-1]
            prefer_key = False


@dataclass
class LoadedYaml:
    data: Any
    source: SourceMap


def _issue(file: str, mark: Any, message: str, path: str = "") -> ConfigIssue:
    if mark is None:
        return ConfigIssue(Location(file), path, message)
    return ConfigIssue(Location(file, mark.line + 1, mark.column + 1), path, message)


def _check_events(text: str, file: str) -> None:
    """Reject nesting deeper than MAX_DEPTH before composing (composition is recursive)."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(
                        [_issue(file, event.start_mark, f"nesting is deeper than {MAX_DEPTH} levels")]
                    )
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error_issue(file, exc)]) from None


def _yaml_error_issue(file: str, exc: yaml.YAMLError) -> ConfigIssue:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = f"not valid YAML: {problem}" + (f" ({context})" if context else "")
    return _issue(file, mark, message)


class _Builder:
    """Turns a composed node graph into plain data, recording positions and counting nodes."""

    def __init__(self, loader: yaml.SafeLoader, file: str):
        self.loader = loader
        self.source = SourceMap(file)
        self.visited = 0
        self.issues: list[ConfigIssue] = []

    def build(self, node: yaml.Node, path: PathKey, depth: int = 0) -> Any:
        self.visited += 1
        if self.visited > MAX_NODES:
            raise ConfigError(
                [
                    _issue(
                        self.source.file,
                        node.start_mark,
                        f"document expands to more than {MAX_NODES} values "
                        "(too large, or aliases expanding exponentially)",
                    )
                ]
            )
        if depth > MAX_DEPTH:
            raise ConfigError(
                [_issue(self.source.file, node.start_mark, f"nesting is deeper than {MAX_DEPTH} levels")]
            )
        self.source.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except yaml.YAMLError as exc:
                self.issues.append(_yaml_error_issue(self.source.file, exc))
                return None
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) and node.tag not in _PLAIN_COLLECTION_TAGS:
            self.issues.append(
                _issue(self.source.file, node.start_mark, f"not valid YAML here: unsupported tag '{node.tag}'")
            )
            return None
        if isinstance(node, yaml.SequenceNode):
            return [self.build(child, path + (i,), depth + 1) for i, child in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self.issues.append(
                        _issue(self.source.file, key_node.start_mark, "merge keys ('<<') are not supported")
                    )
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    self.issues.append(
                        _issue(self.source.file, key_node.start_mark, "mapping keys must be plain scalars")
                    )
                    continue
                key = self.loader.construct_object(key_node)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    key = str(key)
                dotted = ".".join(str(p) for p in path + (key,))
                if key in result:
                    self.issues.append(
                        _issue(self.source.file, key_node.start_mark, f"duplicate key '{key}'", dotted)
                    )
                    continue
                self.source.keys[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                result[key] = self.build(value_node, path + (key,), depth + 1)
            return result
        raise ConfigError([_issue(self.source.file, node.start_mark, f"unsupported YAML node {node.tag}")])


def load_yaml_text(text: str, file: str) -> LoadedYaml:
    """Parse YAML text into plain data plus a :class:`SourceMap`; raise ConfigError on any problem."""
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise ConfigError([ConfigIssue(Location(file), "", f"file is larger than {MAX_BYTES} bytes")])
    if not text.strip() or all(
        line.strip() == "" or line.lstrip().startswith("#") for line in text.splitlines()
    ):
        raise ConfigError([ConfigIssue(Location(file, 1, 1), "", "file is empty")])
    _check_events(text, file)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError([ConfigIssue(Location(file, 1, 1), "", "file is empty")])
        builder = _Builder(loader, file)
        data = builder.build(node, ())
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error_issue(file, exc)]) from None
    except RecursionError:
        raise ConfigError([ConfigIssue(Location(file), "", "document is nested too deeply")]) from None
    finally:
        loader.dispose()
    if builder.issues:
        raise ConfigError(builder.issues)
    return LoadedYaml(data, builder.source)


def load_yaml_file(path: str | Path) -> LoadedYaml:
    """Read and parse a YAML file; unreadable or non-UTF-8 files are reported as ConfigError."""
    path = Path(path)
    name = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError([ConfigIssue(Location(name), "", f"file is larger than {MAX_BYTES} bytes")])
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(Location(name), "", "file not found")]) from None
    except IsADirectoryError:
        raise ConfigError([ConfigIssue(Location(name), "", "is a directory, not a file")]) from None
    except OSError as exc:
        raise ConfigError([ConfigIssue(Location(name), "", f"cannot read file: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue(Location(name), "", f"not UTF-8 text (bad byte at offset {exc.start})")]
        ) from None
    return load_yaml_text(text, name)
