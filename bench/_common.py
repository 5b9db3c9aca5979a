"""Helpers shared by the benchmarks: the machine they ran on, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BUILD = ROOT / "build" / "bench"  # indexes and configs the benchmarks make (git-ignored)
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
SHIPPED_RERANKER = ROOT / "models" / "sieve-reranker-scifact-minilm"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never reach for a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def scifact_bm25_index() -> Path:
    """The BM25 index of the full SciFact corpus under build/bench, built when missing or stale."""
    from engine.index import Index, build_index

    index_dir = BUILD / "scifact-index"
    try:
        Index.open(index_dir, verify=False)
    except Exception:  # noqa: BLE001 - (re)build when missing or stale
        print(f"building the BM25 index of {SCIFACT} in {index_dir}")
        build_index(SCIFACT, index_dir, {"bm25": {}})
    return index_dir


def host(**libraries: str) -> dict[str, Any]:
    """CPU model, usable cores, Python, load average at start, plus the given library versions."""
    from stages.rerank.modeling import cpu_model_name  # plain Python: no torch at import

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {"cpu": cpu_model_name(), "cpu_cores_usable": usable, "python": platform.python_version(),
                            **libraries}
    try:
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def machine() -> dict[str, Any]:
    """``host()`` plus torch threads, native bf16 and GPU: stored with every model benchmark."""
    import torch

    from stages.rerank.modeling import cpu_has_native_bf16

    return host(
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        cpu_native_bf16=cpu_has_native_bf16(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_record(name: str) -> dict[str, Any]:
    """What every result file starts with: which benchmark, when, at which commit, by which command."""
    executable = Path(sys.executable)
    if executable.is_relative_to(ROOT):
        executable = executable.relative_to(ROOT)  # ".venv/bin/python", as the README writes it
    return {"benchmark": name, "ran_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_revision": git_revision(), "command": " ".join([str(executable), *sys.argv])}


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """bench/results/<name>.json (``run_record`` first, unless the payload holds it already) and <name>.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {**run_record(name), **payload}
    json_path = RESULTS / f"{name}.json"
    md_path = RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return json_path, md_path


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['cuda']}" if info.get("cuda") else ", no GPU"
    return (f"{info['cpu']}, {info['cpu_cores_usable']} usable cores, torch {info['torch']} with "
            f"{info['torch_threads']} threads, CPU capability {info['cpu_capability']}, native bf16: "
            f"{'yes' if info['cpu_native_bf16'] else 'no'}{gpu}; load average at start {info.get('load_average_at_start')}")
