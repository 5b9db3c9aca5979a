"""A model's device and precision in a config: fp16 on the CPU, which no machine runs, is an error where it is
written (file:line); ``cuda`` (or fp16) on a machine without CUDA is a warning of ``sieve validate``, which loads no
model, instead of a pipeline that validates and then fails to load. Both used to pass validate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.compiler import compile_file
from engine.errors import ConfigError, SieveError
from engine.index import load_index_settings

ROOT = Path(__file__).resolve().parents[2]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: nothing to warn of")


def _config(write_config, index: Path, dense: str = "", rerank: str = "") -> Path:
    return write_config(
        f"version: 1\nindex: {index}\nstages:\n"
        "  - {id: bm25, type: recall.bm25, params: {top_k: 10}}\n"
        f"  - {{id: dense, type: recall.dense, params: {{top_k: 10{dense}}}}}\n"
        "  - {id: both, type: fuse.rrf, inputs: [bm25, dense]}\n"
        f"  - {{id: rerank, type: rerank.cross_encoder, inputs: [both], params: {{window: 10{rerank}}}}}\n"
        "output: rerank\ntrace: {log: null}\n")


@pytest.mark.parametrize(("dense", "rerank", "line"), [
    (", device: cpu, precision: fp16", "", 5),
    ("", ", device: cpu, precision: fp16", 7),
])
def test_fp16_on_the_cpu_is_an_error_where_it_is_written(write_config, tmp_path, dense, rerank, line):
    config = _config(write_config, tmp_path / "index", dense, rerank)
    with pytest.raises(ConfigError) as caught:
        compile_file(config)
    message = str(caught.value)
    assert f"{config}:{line}:" in message
    assert "fp16 runs on CUDA only, and device is cpu" in message


def test_fp16_on_the_cpu_in_index_settings_is_an_error_where_it_is_written(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("dense:\n  device: cpu\n  precision: fp16\n", encoding="utf-8")
    with pytest.raises(SieveError) as caught:
        load_index_settings(settings, ["dense"])
    assert f"{settings}:2:" in str(caught.value) and "fp16 runs on CUDA only" in str(caught.value)


@no_cuda
@pytest.mark.parametrize(("dense", "rerank", "said"), [
    ("", ", device: cuda", "rerank.cross_encoder: device 'cuda' was asked for but CUDA is not available"),
    ("", ", precision: fp16", "rerank.cross_encoder: fp16 is not supported on CPU"),
    (", device: cuda", "", "recall.dense query model: device 'cuda' was asked for but CUDA is not available"),
])
def test_validate_warns_of_a_model_this_machine_cannot_run(write_config, tmp_path, dense, rerank, said):
    config = _config(write_config, tmp_path / "index", dense, rerank)
    compiled = compile_file(config)
    warnings = [str(w) for w in compiled.warnings]
    assert any(said in w and "the stage will fail to load on this machine" in w for w in warnings), warnings
    if rerank != ", device: cuda":
        return  # the command line once: it prints the same warnings
    shown = subprocess.run([str(Path(sys.executable).parent / "sieve"), "validate", str(config)],
                           capture_output=True, text=True, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr  # a warning: the config may be meant for another machine
    assert "will fail to load on this machine" in " ".join(shown.stderr.split())


def test_a_cuda_config_is_validated_where_torch_is_not_installed(write_config, tmp_path):
    """Review of this change: the check imported torch, an optional extra: validate ended in an internal error."""
    config = _config(write_config, tmp_path / "index", rerank=", device: cuda")
    code = ("import sys; sys.modules['torch'] = None; from engine.compiler import compile_file; "
            "c = compile_file(sys.argv[1]); print(len(c.warnings))")
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_a_config_for_any_machine_is_checked_without_importing_torch(write_config, tmp_path):
    config = _config(write_config, tmp_path / "index", ", device: cpu", ", precision: bf16")
    code = ("import sys; from engine.compiler import compile_file; c = compile_file(sys.argv[1]); "
            "assert 'torch' not in sys.modules; assert not [w for w in c.warnings if 'machine' in str(w)], c.warnings")
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_validate_warns_when_the_default_reranker_is_not_installed_with_sieve(write_config, tmp_path, monkeypatch):
    """Packaging audit F6: installed from a wheel (no models/ beside the code), `sieve validate` passed a config using
    the shipped reranker, and the first search failed to load it."""
    import stages.rerank.cross_encoder as cross_encoder

    config = _config(write_config, tmp_path / "index")
    assert not [w for w in compile_file(config).warnings if "shipped reranker" in str(w)]
    monkeypatch.setattr(cross_encoder, "REPO_ROOT", tmp_path)  # where a wheel's code lies: no models/ beside it
    [warning] = [str(w) for w in compile_file(config).warnings if "shipped reranker" in str(w)]
    assert "comes with a checkout of Sieve, not with an installed package: set the stage's `model:`" in warning
    assert warning.endswith("the stage will fail to load") and ":7:" in warning


def test_validate_warns_of_a_mistyped_local_model_read_as_a_hub_id(write_config, tmp_path):
    """README audit M2: `models/rr` (one slash) is a hub id's form; with no such directory beside the config, validate
    said nothing (the README promised it says when nothing is there), and loading it offline named no directory."""
    (tmp_path / "models").mkdir()
    config = _config(write_config, tmp_path / "index", rerank=", model: models/rr")
    [warning] = [str(w) for w in compile_file(config).warnings if "models/rr" in str(w)]
    assert f"{tmp_path / 'models' / 'rr'} does not exist, though {tmp_path / 'models'} does, so it is read as a hub " \
           "id" in warning and "write ./models/rr" in warning
    hub = _config(write_config, tmp_path / "index", rerank=", model: BAAI/bge-reranker-base")
    assert not [w for w in compile_file(hub).warnings if "bge-reranker" in str(w)]  # no BAAI/ beside it: a hub id
