"""Output paths are checked before any work: a directory, a path under a file, a user's own files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workbench.conftest import ROOT, run_sieve


@pytest.fixture()
def places(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "adir").mkdir()
    return {"dir": tmp_path / "adir", "under_file": tmp_path / "afile" / "out.json"}


@pytest.mark.parametrize("kind, says", [("dir", "is a directory; give a file path"), ("under_file", "is a file, not a directory")])
def test_file_outputs_that_could_not_be_written_are_refused_first(places, tmp_path, kind, says):
    target = places[kind]
    for args, option in [
        (("schema", "--out", target), "--out"),
        (("report", tmp_path / "no-trace.json", "--html", target), "--html"),
        (("search", ROOT / "configs" / "bm25.yaml", "vitamin", "--no-log", "--trace-out", target), "--trace-out"),
    ]:
        done = run_sieve(*args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert f"error: {option} {target}" in done.stderr and says in done.stderr
        assert "internal error" not in done.stderr
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_train_reranker_never_overwrites_a_users_directory(tmp_path):
    mine = tmp_path / "myproj"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "config"}')
    done = run_sieve("train-reranker", "--data", ROOT / "examples" / "scifact-mini", "--out", mine, "--split", "test",
                     "--allow-test-split", "--max-steps", "1", cwd=tmp_path)
    assert done.returncode == 2 and "is a directory with other files in it" in done.stderr
    assert (mine / "config.json").read_text() == '{"my": "config"}'
    done = run_sieve("train-reranker", "--data", ROOT / "examples" / "scifact-mini", "--out", tmp_path / "new",
                     "--split", "test", "--max-steps", "1", cwd=tmp_path)
    assert done.returncode == 2 and "refusing to train on the test split" in done.stderr
    assert not (tmp_path / "new").exists()


def test_version_option_and_command(tmp_path):
    """`sieve --version` (as most tools spell it) and `sieve version` print the package's one version."""
    from importlib.metadata import version

    from engine import __version__

    for args in (("--version",), ("version",)):
        done = run_sieve(*args, cwd=tmp_path)
        assert done.returncode == 0 and done.stdout.strip() == __version__, done.stderr
    assert version("sieve-retrieval") == __version__  # pyproject reads it from engine.__version__


def test_every_command_and_option_says_what_it_does():
    """README audit leftover: `replay --json` and five of train-reranker's options had no help text."""
    import typer.main

    from engine.cli import app

    def undescribed(command, path):
        for name, sub in (getattr(command, "commands", None) or {}).items():
            yield from undescribed(sub, [*path, name])
        if not getattr(command, "commands", None):
            if not command.help:
                yield " ".join(path)
            yield from (f"{' '.join(path)} {param.opts[0]}" for param in command.params
                        if param.param_type_name == "option" and param.name != "help" and not param.help)

    assert list(undescribed(typer.main.get_command(app), ["sieve"])) == []
