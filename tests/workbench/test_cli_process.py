"""The CLI as a Unix process (process-and-environment audit): closed pipes, full disks, non-UTF-8 consoles,
FORCE_COLOR, /dev/stdout as an output file, conflicting options, model paths and the working directory, jieba's
shared cache, an inherited SIGINT ignore. Each test says what happened before the fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workbench.conftest import ROOT, run_sieve

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _sieve(*args: object, stdout=subprocess.PIPE, env: dict | None = None, cwd: Path = ROOT):
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *map(str, args)], stdout=stdout,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env or ENV)


def test_eval_writes_its_files_when_the_reader_of_stdout_goes_away(mini_config, mini_corpus, tmp_path):
    """before: `sieve eval ... --run-out R --json-out J | head -1` ran the whole evaluation, then lost R and J."""
    run_out, json_out = tmp_path / "run.trec", tmp_path / "report.json"
    process = _sieve("eval", mini_config(), "--dataset", mini_corpus, "--run-out", run_out, "--json-out", json_out)
    process.stdout.close()  # the reader is gone before anything is printed
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 141, errors  # before: 1, which also means a negative verdict
    assert run_out.stat().st_size > 0 and json.loads(json_out.read_text(encoding="utf-8"))["queries"] == 50
    assert "Traceback" not in errors and "internal error" not in errors


def test_a_full_disk_under_stdout_is_an_io_error_not_a_bug(tmp_path):
    with open("/dev/full", "w") as full:
        process = _sieve("validate", ROOT / "configs" / "bm25.yaml", stdout=full)
        _, errors = process.communicate(timeout=120)
    assert process.returncode == 74, errors  # before: 70, "internal error ... this is a bug in Sieve"
    assert "No space left on device (writing the output)" in errors and "bug" not in errors


def test_json_output_is_plain_json_under_force_color(mini_config):
    """before: FORCE_COLOR=1 put 812 ANSI escapes into `search --json > file`."""
    done = subprocess.run([sys.executable, "-m", "engine.cli", "search", str(mini_config()), "vitamin d", "--json",
                           "--no-log"], capture_output=True, text=True, env={**ENV, "FORCE_COLOR": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout and json.loads(done.stdout)["results"]


def test_an_ascii_console_gets_escapes_not_an_internal_error():
    """before: the ✓ of a successful validate (or an accented title) exited 70 under PYTHONIOENCODING=ascii."""
    done = subprocess.run([sys.executable, "-m", "engine.cli", "validate", str(ROOT / "configs" / "bm25.yaml")],
                          capture_output=True, text=True, env={**ENV, "PYTHONIOENCODING": "ascii"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("\\u2713 ")


def test_json_escapes_what_an_ascii_stdout_cannot_encode(capsys, monkeypatch):
    import io

    from engine.console import print_json

    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    print_json({"title": "Café 糖尿病"})
    ascii_out.seek(0)
    assert json.loads(ascii_out.read()) == {"title": "Café 糖尿病"}


def test_a_query_read_in_an_ascii_locale_is_refused_with_the_fix():
    from engine.errors import QueryError
    from engine.model import Query

    misread = os.fsdecode("café".encode("utf-8")) if sys.getfilesystemencoding() == "ascii" else "caf\udcc3\udca9"
    with pytest.raises(QueryError, match="UTF-8 text read in a locale whose encoding is not UTF-8.*LANG=C.UTF-8"):
        Query.create(misread)


@pytest.mark.parametrize("args", [("schema", "--out", "/dev/stdout")])
def test_dev_stdout_as_an_output_file_is_refused_up_front(args, tmp_path):
    """before: a pipe: exit 70 (FileNotFoundError on /proc/N/fd/pipe:[M].tmp); a file: renamed over what was printed."""
    process = _sieve(*args)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 2 and "/dev/stdout is a FIFO (named pipe)" in errors, errors
    printed = tmp_path / "printed.txt"
    with open(printed, "w") as handle:
        process = _sieve(*args, stdout=handle)
        _, errors = process.communicate(timeout=120)
    assert process.returncode == 2 and "/dev/stdout is this process's standard output" in errors, errors


@pytest.mark.parametrize(("args", "says"), [
    (("search", "{config}", "q", "--log", "{tmp}/x.jsonl", "--no-log"), "--log and --no-log together"),
    (("compare", "{config}", "{config}", "--dataset", "{corpus}", "--json", "--markdown"), "--json and --markdown"),
    (("eval", "{config}", "--dataset", "{corpus}", "--per-query"), "--per-query adds per-query figures"),
])
def test_conflicting_options_are_refused(mini_config, mini_corpus, tmp_path, args, says):
    """before: the log silently dropped, JSON silently winning, --per-query silently ignored."""
    config = mini_config()
    done = run_sieve(*[a.format(config=config, tmp=tmp_path, corpus=mini_corpus) for a in args])
    assert done.returncode == 2 and says in done.stderr, done.stderr


def test_search_checks_its_trace_log_before_running(mini_config, tmp_path):
    """before: a log that could not be written failed after the models loaded and the query ran."""
    (tmp_path / "a-directory").mkdir()
    done = run_sieve("search", mini_config(), "vitamin d", "--log", tmp_path / "a-directory")
    assert done.returncode == 2 and "--log" in done.stderr and "is a directory" in done.stderr, done.stderr
    assert done.stdout == ""  # no query ran, nothing was shown


def test_a_relative_model_path_is_never_read_from_the_working_directory(tmp_path, monkeypatch):
    """before: `model: models/rr` not beside the config was taken from the working directory: one config, one
    config_sha256, another model wherever it ran."""
    from engine.errors import ModelLoadError
    from engine.models import missing_model_path, resolve_model

    packaged = Path(resolve_model("sentence-transformers/all-MiniLM-L6-v2").location)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "models").mkdir(parents=True)
    (elsewhere / "models" / "rr").symlink_to(packaged)
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ModelLoadError, match="relative to the config's directory"):
        resolve_model("./models/rr", base_dir=config_dir)
    assert "looked in the config's directory" in (missing_model_path("./models/rr", config_dir) or "")
    (config_dir / "models").mkdir()
    (config_dir / "models" / "rr").symlink_to(packaged)
    assert resolve_model("./models/rr", base_dir=config_dir).source == "path"


def test_no_home_directory_is_no_crash(monkeypatch):
    """before: with HOME unset and a uid without a passwd entry, `Path.home()` raised inside the hub cache look-up
    even with HF_HOME set, and a `~` path was an internal error."""
    from engine import models
    from engine.yamlsource import path_problem

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    assert models._hub_cache_directory("BAAI/bge-reranker-base") is None
    assert "cannot be expanded" in (path_problem("~nosuchuser12345/index") or "")


def test_chinese_segmentation_never_reads_jiebas_shared_cache(tmp_path):
    """before: jieba loaded <tmp>/jieba.cache whatever wrote it: a planted one turned a query's words into one."""
    import marshal

    planted = {"糖尿病的治疗方法": 10**9, **{ch: 1 for ch in "糖尿病的治疗方法"}}
    (tmp_path / "jieba.cache").write_bytes(marshal.dumps((planted, 10**9 + 8)))
    script = ("from stages.text import quiet_jieba\nj = quiet_jieba()\nprint(j.dt.tmp_dir)\n"
              "print(' '.join(j.lcut('糖尿病的治疗方法')))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**ENV, "TMPDIR": str(tmp_path)}, timeout=120)
    assert done.returncode == 0, done.stderr
    directory, words = done.stdout.splitlines()
    assert words == "糖尿病 的 治疗 方法" and "Traceback" not in done.stderr
    assert Path(directory) == tmp_path / f"sieve-{os.getuid()}" / "jieba"
    assert oct(Path(directory).stat().st_mode & 0o777) == "0o700"


def test_a_batch_started_ignoring_sigint_keeps_ignoring_it():
    from engine.workbench.batch import stop_on_signals

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # before: replaced by the batch's handler
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_corpus_line_that_is_not_utf8_says_so(tmp_path):
    """before: "not a JSON object ('utf-8' codec can't decode byte 0xe9 ...)"."""
    from engine.errors import SieveError
    from engine.index import build_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"_id": "a", "text": "caf\xe9"}\n')
    with pytest.raises(SieveError, match=r"corpus.jsonl:1: not UTF-8 text \(byte 0xe9 at column 26\)"):
        build_index(corpus, tmp_path / "index", {"bm25": {}})
