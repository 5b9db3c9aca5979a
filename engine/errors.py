"""Sieve's error types: every failure a user can cause has one, with a message fit to print.

The CLI prints ``str(error)`` and exits non-zero; it never shows a stack trace for these.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


class SieveError(Exception):
    """Base class of every error Sieve reports to a user."""

    exit_code = 2


@dataclass(frozen=True)
class Location:
    """A place in a source file (1-based line and column)."""

    file: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.file
        if self.column is None:
            return f"{self.file}:{self.line}"
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class ConfigIssue:
    """One problem found in a configuration file."""

    location: Location
    path: str
    message: str
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        tag = "" if self.severity == "error" else "warning: "
        return f"{self.location}  {tag}{self.detail()}"

    def detail(self) -> str:
        """The issue without its location or severity tag: for an issue quoted inside another one (a rule file's
        issue reported at the config field that names the file), whose own severity says it once."""
        where = f"{self.path}: " if self.path else ""
        return f"{where}{self.message}"


class ConfigError(SieveError):
    """A configuration (pipeline or rule file) is invalid; carries every issue found at once."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = sorted(  # the errors first (the count names them), then what is only a warning
            issues,
            key=lambda i: (i.severity != "error", i.location.file, i.location.line or 0, i.location.column or 0,
                           i.path),
        )
        count = sum(1 for i in self.issues if i.severity == "error")
        noun = "error" if count == 1 else "errors"
        lines = [str(issue) for issue in self.issues]
        super().__init__(f"{count} configuration {noun}:\n" + "\n".join(lines))


class QueryError(SieveError):
    """A query cannot be run as given (empty, too long, malformed context)."""


class SieveIndexError(SieveError):
    """An index is missing, incomplete, corrupt or does not match what the config expects."""


class StageError(SieveError):
    """A stage failed while running a query; names the stage and what it was doing."""

    def __init__(self, stage_id: str, stage_type: str, message: str):
        self.stage_id = stage_id
        self.stage_type = stage_type
        self.detail = message  # what went wrong, without the stage's name
        super().__init__(f"stage '{stage_id}' ({stage_type}) failed: {message}")


class DeadlineExceeded(SieveError):
    """The query's deadline (``executor.deadline_ms``) passed while a stage that may be cut (``on_error: skip``)
    was running: the stage stops (a reranker between batches) and is skipped."""


class ModelLoadError(SieveError):
    """A model could not be resolved or loaded."""


class TraceError(SieveError):
    """A trace or trace log is unreadable, tampered with, or cannot be replayed."""


class MissingDependencyError(SieveError):
    """An optional dependency is not installed; says which package provides it."""

    def __init__(self, module: str, package: str, feature: str):
        failed = sys.exc_info()[1]  # the ImportError being handled where this is raised, if any
        missing = getattr(failed, "name", None)
        if isinstance(failed, ImportError) and not (
                isinstance(failed, ModuleNotFoundError) and missing and (missing == module or module.startswith(
                    missing + ".") or missing.startswith(module + "."))):
            # installed, but importing it failed (a shared library that would not map: memory or address space
            # ran out; a broken dependency of its own): "not installed" would send an operator to reinstall it
            super().__init__(f"{feature} needs the Python module '{module}', which is installed but could not be "
                             f"imported: {type(failed).__name__}: {failed}")
            return
        super().__init__(
            f"{feature} needs the Python module '{module}', which is not installed; "
            f"install it with: pip install {package}"
        )
