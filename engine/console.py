"""The ``sieve`` console script.

Importing the CLI takes a moment (typer, rich, the stage registry); a Ctrl-C in that moment would
print a Python traceback, since :func:`engine.cli.main` is not running yet to turn it into a quiet
exit. This entry point catches it there too.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from engine.cli import main as run
    except KeyboardInterrupt:
        sys.exit(130)
    run()
