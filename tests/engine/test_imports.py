"""`import engine` (and compiling a config) must not pull in heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ["torch", "transformers", "FlagEmbedding", "spacy", "faiss", "sentence_transformers"]

SCRIPT = """
import json, sys
import engine, engine.cli, engine.compiler, engine.pipeline, engine.index, engine.trace, engine.models
import stages
from engine.compiler import compile_file
compile_file(sys.argv[1])
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def test_engine_import_and_validation_stay_light(tmp_path: Path):
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    script = SCRIPT.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", script, str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_ctrl_c_while_the_cli_is_still_importing_exits_quietly():
    """The console script catches a KeyboardInterrupt raised while engine.cli is imported (before cli.main runs)."""
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name == 'engine.cli':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        "from engine.console import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr


# Packaging audit: what an installed package needs and where it runs.

def test_the_command_line_needs_no_click_of_its_own():
    """F2: `import click` in the entry point, undeclared (typer 0.2x carries its own): a plain install without the
    extras that happen to pull click in crashed on every command."""
    script = ("import sys; sys.modules['click'] = None\n"  # as if not installed: importing it raises ImportError
              "from engine.cli import main\nsys.argv = ['sieve', 'no-such-command']\nmain()")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "No such command 'no-such-command'" in done.stderr, done.stderr


def test_on_windows_importing_sieve_says_where_it_runs():
    """F4: on Windows the first module taking a file lock failed (no fcntl), and the CLI called it a bug in Sieve."""
    done = subprocess.run([sys.executable, "-c", "import sys; sys.platform = 'win32'; import engine"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "ImportError: Sieve runs on Linux and macOS (POSIX systems) only; on Windows, run it under WSL" in done.stderr
