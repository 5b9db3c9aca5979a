"""The ``sieve`` console script.

Importing the CLI takes a moment (typer, rich, the stage registry); a Ctrl-C in that moment would
print a Python traceback, since :func:`engine.cli.main` is not running yet to turn it into a quiet
exit. This entry point catches it there too.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from typing import Any, Callable


def print_json(document: Any) -> None:
    """Machine output (``--json``): the JSON text, indented, on stdout as it is, never through rich, which colours
    it when FORCE_COLOR is set, even into a pipe; non-ASCII characters escaped when stdout cannot encode them
    (an ASCII or Latin-1 locale), so that the output is the same JSON anywhere."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    text = json.dumps(document, indent=2, ensure_ascii=encoding not in ("utf8", "utf8sig"))
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# What a terminal or a browser does not show as itself: control characters (ESC starts the terminal's escape
# sequences), format characters (bidi overrides, zero-width and soft-hyphen, tag characters), line and paragraph
# separators, surrogates, private-use and unassigned code points; and the default-ignorable letters and marks that
# render as nothing (Hangul fillers, the combining grapheme joiner, variation selectors).
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_HIDDEN_MARKS = frozenset(map(chr, (0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x3164,
                                    0xFFA0)))
# The zero-width non-joiner and joiner and the variation selectors are part of ordinary text after a letter of the
# scripts that use them (Persian, Indic) or an emoji (❤️, 👩‍💻); after ASCII, or at the start, they only hide.
_JOINERS = frozenset(["\u200c", "\u200d", *map(chr, range(0xFE00, 0xFE10))])


def hidden(char: str, previous: str = "") -> bool:
    """Whether ``char`` (after ``previous``) would not be seen as itself: it changes what a terminal shows, or
    shows as nothing."""
    if char in _JOINERS and previous and not previous.isascii() and not hidden(previous):
        return False
    code = ord(char)
    return (unicodedata.category(char) in _HIDDEN_CATEGORIES or char in _HIDDEN_MARKS
            or 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF)


def first_hidden(text: str) -> int | None:
    """The position of the first character of ``text`` that would not be seen as itself (``hidden``), or None."""
    if text.isascii() and text.isprintable():
        return None
    return next((i for i, char in enumerate(text) if hidden(char, text[i - 1] if i else "")), None)


def backslashed(char: str) -> str:
    return ascii(char)[1:-1]  # \x1b, \u202e, \U000e0020


def written_out(text: str, write: Callable[[str], str] = backslashed, keep: str = "\n\t") -> str:
    """``text`` with every character that would not be seen as itself (``hidden``) written out (``\\x1b``,
    ``\\u202e``, or as ``write`` spells it), but those in ``keep``: what text from a corpus, a trace file or a
    config can hold reaches a person as what it is, never as a terminal's escape sequence or an invisible mark.
    Once a character is written out as a backslash escape, the text's own backslashes are doubled: ``\\x1b`` then
    always means the character, never the four characters an id or a title may hold."""
    if text.isascii() and text.isprintable():
        return text
    unseen = {i for i, char in enumerate(text) if char not in keep and hidden(char, text[i - 1] if i else "")}
    if not unseen:
        return text
    doubled = "\\\\" if write is backslashed else "\\"
    return "".join(write(char) if i in unseen else doubled if char == "\\" else char for i, char in enumerate(text))


def shown(value: Any, *, lines: bool = True) -> str:
    """``value`` as text for rich's console: written out (``written_out``; line breaks and tabs kept only with
    ``lines``, for a message; a table cell or a label gets them written out too), then its markup escaped, so
    that nothing in it is read as markup or reaches the terminal as a control sequence."""
    from rich.markup import escape

    return escape(written_out(str(value), keep="\n\t" if lines else ""))


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
