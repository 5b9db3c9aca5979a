"""From the library-embedding audit (report-only helper): a Pipeline that had run a model, then fork()ed (a
'fork' multiprocessing pool, gunicorn --preload), hung for ever in the child on its first query no cache held:
PyTorch's thread pool does not survive fork(). The child is now told so at once, and one thread works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from engine.errors import SieveError
    from engine.pipeline import Pipeline

    torch.set_num_threads(2)
    pipeline = Pipeline.from_file(sys.argv[1])
    pipeline.search("vitamin D and bone density", log=False)  # the parent runs the model
    one_thread = sys.argv[2] == "one-thread"
    child = os.fork()
    if child == 0:
        if one_thread:
            torch.set_num_threads(1)
        try:
            result = pipeline.search("what causes insulin resistance in muscle", log=False)  # in no cache
        except SieveError as exc:
            print("refused:", exc, flush=True)
            os._exit(0)
        print("answered:", [c.doc_id for c in result.results][:3], flush=True)
        os._exit(0)
    deadline = time.monotonic() + 150
    while True:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            sys.exit(os.waitstatus_to_exitcode(status))
        if time.monotonic() > deadline:  # before the guard: the child waits for ever on torch's thread pool
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            print("the child hung", flush=True)
            sys.exit(9)
        time.sleep(0.2)
""")


def _run(tmp_path: Path, dense_index: Path, mode: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "dense.yaml"
    config.write_text(f"version: 1\nindex: {dense_index}\nstages:\n  - {{id: dense, type: recall.dense}}\n"
                      "output: dense\ntrace: {log: null}\n", encoding="utf-8")
    script = tmp_path / "fork.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), str(config), mode], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_a_forked_child_is_told_why_its_model_cannot_run(tmp_path, dense_index):
    done = _run(tmp_path, dense_index, "threads")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused:" in done.stdout and "fork()" in done.stdout and "torch.set_num_threads(1)" in done.stdout


def test_a_forked_child_on_one_thread_answers(tmp_path, dense_index):
    done = _run(tmp_path, dense_index, "one-thread")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "answered:" in done.stdout, done.stdout
