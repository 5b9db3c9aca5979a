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
