"""Safe YAML loading that remembers where every value came from; the checks of text and paths every file an analyst
writes shares (configs, rule files, glossaries, gazetteers, settings; the JSONL files of queries).

Only plain data is constructed (``yaml.SafeLoader``'s scalars, mappings and sequences): YAML can
never name a Python object. The loader guards against hostile or accidental input — oversized
files, very deep nesting, alias ("billion laughs") expansion, duplicate keys, a key or value that is not
Unicode text (the escape ``"\ud800"`` makes a lone surrogate, which no file, trace log or sha256 can hold) — and
reports each problem as a located :class:`~engine.errors.ConfigIssue`.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.console import backslashed
from engine.errors import ConfigError, ConfigIssue, Location
from engine.strictness import LONE_SURROGATE, walk_json

MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 200_000
# The text a document may expand to, aliases written out: an alias of a long value counts as one node, so 3,000
# aliases of a 1 MB string (a 3 GB config, copied into every trace) passed the node count.
MAX_EXPANDED_CHARS = MAX_BYTES

PathKey = tuple[str | int, ...]
_PLAIN_COLLECTION_TAGS = frozenset({"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"})


# ---------------------------------------------------------------------------- text and paths in analysts' files

NAME_MAX = 255  # bytes in one file or directory name: the limit of Linux's file systems (ext4, xfs, btrfs, tmpfs)
PATH_MAX = 4096  # bytes in a whole path, its terminating NUL included (Linux's PATH_MAX)
# control characters (Unicode category Cc) but tab and line breaks: no query can hold one (engine.model refuses them)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` as a message can show it: a NUL, another control character, an invisible format character or a lone
    surrogate becomes its escape (``\\x00``, ``\\u200b``, ``\\ud800``); every other character is kept as written."""
    return "".join(char if char.isprintable() or char == " " else backslashed(char) for char in text)


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not Unicode text, or None: a lone surrogate (what the YAML escape ``"\\ud800"`` or the JSON
    ``"\\ud800"`` makes), which no UTF-8 file, trace log or sha256 can hold."""
    found = LONE_SURROGATE.search(text)
    if found is None:
        return None
    return f"not valid Unicode text (a lone surrogate U+{ord(found.group()):04X} at character {found.start() + 1})"


class NotJson(ValueError):
    """A literal Python's ``json`` reads but JSON has not: ``NaN``, ``Infinity``, ``-Infinity``."""


def refuse_json_constant(literal: str) -> Any:
    """``json.loads``'s ``parse_constant`` for a file analysts write (queries): NaN and infinity are not JSON, and no
    value of a query line means one."""
    raise NotJson(f"{literal} is not a JSON value")


def unreadable_strings(document: Any) -> list[tuple[tuple[str, ...], str]]:
    """Each string value of parsed data (JSON's, YAML's) that is not Unicode text (:func:`unicode_problem`), in
    document order: (its path from the root, its keys shown printable; the problem). A JSON object's keys are
    :func:`engine.strictness.refused_keys`'s to judge (:func:`refused_key_problem` says it)."""
    found: list[tuple[tuple[str, ...], str]] = []
    for path, value in walk_json(document):
        problem = unicode_problem(value) if isinstance(value, str) else None
        if problem is not None:
            found.append((tuple(printable(str(part)) for part in path), problem))
    return found


def refused_key_problem(path: tuple[str, ...], flaw: str) -> str:
    """What a query file's line says of a key :func:`engine.strictness.refused_keys` found (``sieve batch``, ``sieve
    eval``): given twice, or not Unicode text."""
    key = ".".join(path)
    if flaw == "duplicated":
        return f"key {key!r} given twice"
    return f"key '{printable(key)}' is not valid Unicode text (it holds a lone surrogate)"


def path_problem(path: str) -> str | None:
    """Why ``path`` (a file name as an analyst wrote it, or as joined to a directory) can name no file, or None:
    a NUL character, a lone surrogate, a name or a whole path longer than the file system allows. The one check of
    every path a config, a settings file or a rule test names, made before the path reaches the operating system
    (which raises ValueError, UnicodeEncodeError or ENAMETOOLONG, not a message). A name read from the command line
    with bytes that are not UTF-8 (Python's surrogate escapes, ``\\udcff``) is a name the system can open: kept."""
    if "\x00" in path:
        return "the path contains a NUL character"
    if path.startswith("~"):
        try:
            os.fspath(Path(path).expanduser())
        except RuntimeError:  # no HOME and a uid without a passwd entry, or ~name of no user
            return f"{path.split('/')[0]} cannot be expanded: no home directory is known for that user (HOME unset?)"
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError as exc:  # the first character that is no byte of a name (not a surrogate escape)
        return (f"the path is not valid Unicode text (a lone surrogate U+{ord(path[exc.start]):04X} at character "
                f"{exc.start + 1})")
    for name in encoded.split(b"/"):
        if len(name) > NAME_MAX:
            shown = printable(name[:40].decode("utf-8", "replace"))
            return (f"a name in the path is longer than the file system allows ({len(name)} bytes, at most {NAME_MAX}: "
                    f"'{shown}...')")
    if len(encoded) >= PATH_MAX:
        return f"the path is longer than the file system allows ({len(encoded)} bytes, at most {PATH_MAX - 1})"
    return None


def check_path(path: str | Path) -> None:
    """:func:`path_problem` as a ConfigError located at the path itself (shown with its odd characters escaped): for
    a loader handed a path, whose caller quotes the issue at the config field that named it."""
    problem = path_problem(str(path))
    if problem is not None:
        raise ConfigError([ConfigIssue(Location(printable(str(path))), "", problem)])


def unmatchable_problem(text: str) -> str | None:
    """Why a name, term or id (matched against a query or a document, or naming a query) can never be matched or
    seen, or None: a control character (a NUL; no query can hold one: engine.model refuses them), or nothing visible
    (only whitespace and invisible format characters such as the zero-width space U+200B, which ``.strip()`` keeps)."""
    found = _CONTROL.search(text)
    if found is not None:
        return f"contains a control character (U+{ord(found.group()):04X} at character {found.start() + 1})"
    if not any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text):
        invisible = sorted({f"U+{ord(char):04X}" for char in text if not char.isspace()})
        return "has no visible character" + (f" (only the invisible {', '.join(invisible)})" if invisible else "")
    return None


_BOOL_TAG = "tag:yaml.org,2002:bool"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2's booleans and no implicit dates.

    YAML 1.1 (PyYAML's default) reads ``yes/no/on/off`` as booleans, so the country code ``NO`` in a
    list of jurisdictions silently becomes ``false``; here only ``true``/``false`` are booleans. And a
    date-looking scalar stays text (``2025-02-30`` is not a crash in the loader): the models parse it,
    so a bad date is an ordinary located error. Numbers with an exponent are floats as in YAML 1.2
    (``1e3``, ``1e-3``), not text."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        """An alias (``*name``) is its anchor's node, so every problem inside it was located at the anchor: a
        shallow copy carries the alias's position (``alias_mark``), which the builder uses for it and all inside."""
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = copy.copy(super().compose_node(parent, index))
            node.alias_mark = mark
            return node
        return super().compose_node(parent, index)


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_BOOL_TAG, _TIMESTAMP_TAG, _INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2's core schema numbers, not YAML 1.1's: 010 is ten (not octal eight: 0o10 is), 1:30 is text (not
# sexagesimal ninety), 1_000 is text (no digit separators: an error where a number is wanted, never a silent
# reading), and an exponent needs no dot or sign (1e3, 1e-3, 2E6 are floats). Integers are tried first.
_Loader.add_implicit_resolver(_INT_TAG, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """An integer as YAML 1.2 reads it (decimal, ``0o`` octal, ``0x`` hex; an explicit ``!!int`` tag included)."""
    text = str(loader.construct_scalar(node))
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text, 10)
    if re.fullmatch(r"0o[0-7]+", text):
        return int(text[2:], 8)
    if re.fullmatch(r"0x[0-9a-fA-F]+", text):
        return int(text[2:], 16)
    raise ValueError(f"'{text}' is not an integer (YAML 1.2: decimal, 0o17, 0x1F)")  # an explicit !!int tag


_Loader.add_constructor(_INT_TAG, _construct_int)


@dataclass
class SourceMap:
    """Maps a path inside the loaded data to the line and column it came from, and, for data merged from several
    files (a pipeline config that extends a base config), the file where that is not ``file``."""

    file: str
    values: dict[PathKey, tuple[int | None, int | None]] = field(default_factory=dict)
    keys: dict[PathKey, tuple[int | None, int | None]] = field(default_factory=dict)
    # the file a value or a key at a path was written in, where that is another file than ``file``
    value_files: dict[PathKey, str] = field(default_factory=dict)
    key_files: dict[PathKey, str] = field(default_factory=dict)

    def locate(self, path: PathKey, *, prefer_key: bool = False) -> Location:
        """Location of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while True:
            table_order = ((self.keys, self.key_files), (self.values, self.value_files)) if prefer_key \
                else ((self.values, self.value_files), (self.keys, self.key_files))
            for table, files in table_order:
                if path in table:
                    line, column = table[path]
                    return Location(files.get(path, self.file), line, column)
            if not path:
                return Location(self.file, 1, 1)
            path = path[:-1]
            prefer_key = False


    def graft(self, at: PathKey, other: "SourceMap") -> None:
        """Locate what is at and under ``at`` by ``other`` (the source map of a value written there from elsewhere:
        a ``--set PATH=VALUE``), in ``other``'s file: this map's entries there give way, and the key at ``at`` and
        each mapping on the way to it that this map did not have are located at ``other``'s start."""
        for table, files in ((self.values, self.value_files), (self.keys, self.key_files)):
            for key in [k for k in table if k[:len(at)] == at]:
                del table[key]
                files.pop(key, None)
        for inner, place in other.values.items():
            self.values[at + inner] = place
            self.value_files[at + inner] = other.file
        for inner, place in other.keys.items():
            self.keys[at + inner] = place
            self.key_files[at + inner] = other.file
        for depth in range(1, len(at) + 1):
            prefix = at[:depth]
            if depth == len(at) or (prefix not in self.keys and prefix not in self.values):
                self.keys[prefix] = (None, None)  # located by the other source's name alone (--set PATH)
                self.key_files[prefix] = other.file

    def forget_positions(self) -> None:
        """Locate everything by the file's name alone: a value given on the command line (``--set PATH=VALUE``),
        whose line 1 and column in that value would read as a place in a file."""
        for table in (self.values, self.keys):
            for key in table:
                table[key] = (None, None)


@dataclass
class LoadedYaml:
    data: Any
    source: SourceMap
    # problems found while loading that left the data usable (a duplicate key: the first value is kept; a
    # value an explicit tag cannot make: None), when the caller asked to collect them (``collect=True``)
    issues: list[ConfigIssue] = field(default_factory=list)
    unmade: set[str] = field(default_factory=set)  # dotted paths of values that could not be made (None)
    sha256: str | None = None  # of the file's bytes as read (load_yaml_file)
    # the files this data was merged onto, nearest first, each {"file": ..., "sha256": ...} (a pipeline config's
    # ``extends``: engine.compiler.resolve_extends)
    bases: list[dict[str, str]] = field(default_factory=list)
    # the file's text as read and parsed (load_yaml_file): a caller keeping or hashing the file uses this, never a
    # second read, which could find another file renamed into its place meanwhile
    text: str | None = None


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
        raise ConfigError([_yaml_error_issue(file, exc, text)]) from None


def _yaml_error_issue(file: str, exc: yaml.YAMLError, text: str | None = None) -> ConfigIssue:
    if isinstance(exc, yaml.reader.ReaderError) and text is not None:  # a character YAML forbids (NUL, ...)
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return ConfigIssue(Location(file, line, column), "",
                           f"not valid YAML: character U+{code:04X} is not allowed in YAML text")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    parser = f"{problem}" + (f" ({context})" if context else "")
    meaning = next((said for pattern, said in _YAML_MEANINGS if pattern.search(parser)), None)
    return _issue(file, mark, f"not valid YAML: {parser}" if meaning is None
                  else f"not valid YAML: {meaning} (the parser: {parser})")


# What PyYAML's messages mean for someone editing a config (its token names, '?' for a key and '<block end>', are not
# in the file): each the likely slip first, the parser's own words after it
_YAML_MEANINGS = [
    (re.compile(r"found character '\\t' that cannot start any token"),
     "a tab; YAML indents with spaces only"),
    (re.compile(r"expected <block end>, but found '\?'|expected <block end>, but found '<block mapping start>'"),
     "this key is not indented like the keys of the block above it; indent it as its siblings are (or as its "
     "parent's, one level out)"),
    (re.compile(r"expected <block end>, but found '-'"),
     "a list item ('-') where the block above holds keys; indent it under the key it belongs to"),
    (re.compile(r"mapping values are not allowed here"),
     "a 'key: value' where a plain value was expected: indent it under its key, or quote a value holding ': '"),
    (re.compile(r"expected ',' or '[\]}]', but got"),
     "a flow collection ('{...}' or '[...]') not closed where it should be; check its commas and brackets"),
    (re.compile(r"while parsing a flow (mapping|sequence)"),
     "a flow collection ('{...}' or '[...]') not closed; check its commas and brackets"),
]


class _Builder:
    """Turns a composed node graph into plain data, recording positions and counting nodes."""

    def __init__(self, loader: yaml.SafeLoader, file: str):
        self.loader = loader
        self.source = SourceMap(file)
        self.visited = 0
        self.expanded = 0  # characters of the scalars built, each alias's as often as it is used
        self.issues: list[ConfigIssue] = []
        self.unmade: set[str] = set()

    def build(self, node: yaml.Node, path: PathKey, depth: int = 0, at: Any = None) -> Any:
        """Plain data of ``node``; ``at``: the mark of the alias this node was reached through (inside an alias,
        every value and key is located at the alias, where the reader wrote it into this place)."""
        at = getattr(node, "alias_mark", None) or at
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
        mark = at or node.start_mark
        self.source.values[path] = (mark.line + 1, mark.column + 1)
        if isinstance(node, yaml.ScalarNode):
            self.expanded += len(node.value)
            if self.expanded > MAX_EXPANDED_CHARS:
                raise ConfigError([_issue(
                    self.source.file, mark, f"document expands to more than {MAX_EXPANDED_CHARS:,} characters of "
                    "text with its aliases written out (an alias repeating a long value): write the value once")])
            value = self._scalar(node, path, mark)
            problem = unicode_problem(value) if isinstance(value, str) else None
            if problem is not None:  # no file, log or hash could hold it: not made, like a value a tag cannot make
                dotted = ".".join(str(p) for p in path)
                self.issues.append(_issue(self.source.file, mark, problem, dotted))
                self.unmade.add(dotted)
                return None
            return value
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) and node.tag not in _PLAIN_COLLECTION_TAGS:
            dotted = ".".join(str(p) for p in path)
            self.issues.append(_issue(self.source.file, node.start_mark, f"not valid YAML here: unsupported tag "
                                      f"'{node.tag}'", dotted))
            self.unmade.add(dotted)
            return None
        if isinstance(node, yaml.SequenceNode):
            return [self.build(child, path + (i,), depth + 1, at) for i, child in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self.issues.append(
                        _issue(self.source.file, key_node.start_mark, "merge keys ('<<') are not supported: write "
                               "the keys out, or alias a whole mapping (params: *name)",
                               ".".join(str(p) for p in path + ("<<",)))
                    )
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    self.issues.append(
                        _issue(self.source.file, key_node.start_mark, "mapping keys must be plain scalars")
                    )
                    continue
                key = self._scalar(key_node, path, at or key_node.start_mark)
                if key is None:
                    if key_node.tag == "tag:yaml.org,2002:null":
                        self.issues.append(_issue(self.source.file, key_node.start_mark, "a key is empty or null "
                                                  "(quote it if you mean the text, e.g. 'null')",
                                                  ".".join(str(p) for p in path)))
                    continue
                if not isinstance(key, (str, int, float, bool)):
                    key = str(key)
                problem = unicode_problem(key) if isinstance(key, str) else None
                if problem is not None:  # left out: a key no message, file or hash could hold
                    self.issues.append(_issue(self.source.file, at or key_node.start_mark,
                                              f"the key '{printable(key)}' is {problem}", ".".join(map(str, path))))
                    continue
                dotted = ".".join(str(p) for p in path + (key,))
                if key in result:
                    self.issues.append(
                        _issue(self.source.file, key_node.start_mark, f"duplicate key '{key}'", dotted)
                    )
                    continue
                key_mark = at or key_node.start_mark
                self.source.keys[path + (key,)] = (key_mark.line + 1, key_mark.column + 1)
                result[key] = self.build(value_node, path + (key,), depth + 1, at)
            return result
        raise ConfigError([_issue(self.source.file, node.start_mark, f"unsupported YAML node {node.tag}")])

    def _scalar(self, node: yaml.ScalarNode, path: PathKey, mark: Any = None) -> Any:
        """A scalar's value; one an explicit tag cannot make ('!!int abc', '!!timestamp 2025-02-30') is an issue."""
        dotted = ".".join(str(p) for p in path)
        self.unmade.add(dotted)  # until it is made
        try:
            value = self.loader.construct_object(node, deep=True)
            self.unmade.discard(dotted)
            return value
        except yaml.YAMLError as exc:
            issue = _yaml_error_issue(self.source.file, exc)
            self.issues.append(ConfigIssue(issue.location, dotted, issue.message))
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            tag = node.tag.rsplit(":", 1)[-1]
            detail = f": {exc}" if isinstance(exc, (ValueError, OverflowError)) and str(exc) else ""
            self.issues.append(_issue(self.source.file, mark or node.start_mark,
                                      f"'{node.value}' is not a valid !!{tag}{detail}", dotted))
        return None


def load_yaml_text(text: str, file: str, *, collect: bool = False) -> LoadedYaml:
    """Parse YAML text into plain data plus a :class:`SourceMap`; raise ConfigError on any problem, or,
    with ``collect``, return the problems that left the data usable in ``issues`` (so that a caller can
    report them together with its own validation's)."""
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise ConfigError([ConfigIssue(Location(file), "", f"file is larger than {MAX_BYTES} bytes")])
    if not text.strip() or all(
        line.strip() == "" or line.lstrip().startswith("#") for line in text.splitlines()
    ):
        raise ConfigError([ConfigIssue(Location(file, 1, 1), "", "file is empty")])
    _check_events(text, file)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError([ConfigIssue(Location(file, 1, 1), "", "file is empty")])
        builder = _Builder(loader, file)
        data = builder.build(node, ())
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error_issue(file, exc, text)]) from None
    except RecursionError:
        raise ConfigError([ConfigIssue(Location(file), "", "document is nested too deeply")]) from None
    finally:
        loader.dispose()
    if builder.issues and not collect:
        raise ConfigError(builder.issues)
    return LoadedYaml(data, builder.source, builder.issues, builder.unmade)


def nearby(path: Path) -> str:
    """' (did you mean NAME?)' for a missing file whose directory holds one of a close name (demo.yml for demo.yaml,
    bse.yaml for base.yaml); '' otherwise."""
    from difflib import get_close_matches

    try:
        names = [entry.name for entry in os.scandir(path.parent or ".") if entry.is_file()][:10_000]
    except OSError:
        return ""
    close = get_close_matches(path.name, names, n=1, cutoff=0.75)
    return f" (did you mean {path.parent / close[0]}?)" if close else ""


def load_yaml_file(path: str | Path, *, collect: bool = False) -> LoadedYaml:
    """Read and parse a YAML file; unreadable or non-UTF-8 files, and a path that can name no file
    (:func:`path_problem`), are reported as ConfigError."""
    path = Path(path)
    name = str(path)
    check_path(name)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
            raise ConfigError([ConfigIssue(Location(name), "", "not a regular file")])
        size = info.st_size
        if size > MAX_BYTES:
            raise ConfigError([ConfigIssue(Location(name), "", f"file is larger than {MAX_BYTES} bytes")])
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(Location(name), "", "file not found" + nearby(path))]) from None
    except IsADirectoryError:
        inside = sorted(p.name for p in path.glob("*.y*ml") if p.is_file())[:5]
        raise ConfigError([ConfigIssue(Location(name), "", "is a directory, not a file" + (
            f" (it holds {', '.join(inside)})" if inside else ""))]) from None
    except OSError as exc:
        raise ConfigError([ConfigIssue(Location(name), "", f"cannot read file: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            [ConfigIssue(Location(name, line, column), "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x}; save the file as UTF-8)")]
        ) from None
    loaded = load_yaml_text(text, name, collect=collect)
    loaded.sha256 = hashlib.sha256(raw).hexdigest()
    loaded.text = text
    return loaded
