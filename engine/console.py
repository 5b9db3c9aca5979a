"""The ``sieve`` console script.

Importing the CLI takes a moment (typer, rich, the stage registry); a Ctrl-C in that moment would
print a Python traceback, since :func:`engine.cli.main` is not running yet to turn it into a quiet
exit. This entry point catches it there too.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json(document: Any) -> None:
    """Machine output (``--json``): the JSON text, indented, on stdout as it is, never through rich, which colours
    it when FORCE_COLOR is set, even into a pipe; non-ASCII characters escaped when stdout cannot encode them
    (an ASCII or Latin-1 locale), so that the output is the same JSON anywhere."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    text = json.dumps(document, indent=2, ensure_ascii=encoding not in ("utf8", "utf8sig"))
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


EXIT_PIPE_CLOSED = 141  # the reader of stdout went away (| head): what a process SIGPIPE ends exits with


def make_console(**options: Any) -> Any:
    """A rich Console for the CLI's human output whose answer to a reader closing the pipe (``| head``) is exit
    status 141, not rich's 1, which Sieve's commands use for a negative verdict (replay different)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            try:
                super().on_broken_pipe()
            except SystemExit:
                raise SystemExit(EXIT_PIPE_CLOSED) from None

    return _Console(**options)


def utf8_or_escaped() -> None:
    """Where stdout or stderr cannot encode every character (an ASCII locale, a Windows console), write what they
    cannot as backslash escapes: a ✓ or a document's accented title must not turn finished work into an error."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if reconfigure is not None and encoding not in ("utf8", "utf8sig"):
            reconfigure(errors="backslashreplace")


def main() -> None:
    try:
        from engine.cli import main as run
    except KeyboardInterrupt:
        sys.exit(130)
    try:
        run()
    except KeyboardInterrupt:  # in the moment before the CLI's own handling starts (its imports, console set-up)
        sys.exit(130)
