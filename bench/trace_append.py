"""Trace log append: what the writer's continuity check costs (a process remembers where it left each log and, at
its next append, checks the file there still holds that record: one read of a few hundred bytes), the code at a
baseline revision (before the check) against the working tree's, in the same run.

Each implementation appends ``--records`` real traces (one BM25 query on SciFact, top 100, ``sieve search
--trace-out``, about 70 KB compact, id and timestamps varied) to a log of its own, one ``TraceLog`` per append as
``Pipeline.log_trace`` makes it, in blocks of ``--block`` records alternated between the two (a busy moment on the
shared cores hits both). Every append is fsynced (the log's durability), so wall time is mostly the disk's; the CPU
time of this process is the figure the check changes. Both logs must verify and hold the same records.

Usage: .venv/bin/python bench/trace_append.py [--records 1000] [--block 50] [--baseline 56a8112]
Writes bench/results/trace_append.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench._common import host, write_results  # noqa: E402
from bench.trace_log_scale import baseline_module, template_trace  # noqa: E402

BASELINE = "56a8112"  # before the continuity check


def variant(template: dict[str, Any], i: int, rng: random.Random) -> dict[str, Any]:
    trace = dict(template)
    trace["trace_id"] = f"{rng.getrandbits(128):032x}"
    trace["created_at"] = f"2026-01-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}.{i:06d}+00:00"
    return trace


def append_block(module: ModuleType, path: Path, traces: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """CPU and wall seconds of each append, a new TraceLog each time (as Pipeline.log_trace does)."""
    cpu, wall = [], []
    for trace in traces:
        c, w = time.process_time(), time.perf_counter()
        module.TraceLog(path).append(dict(trace))
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the code to compare with")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    import engine.trace as current

    info = host()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="sieve-trace-append-") as tmp:
        workdir = Path(tmp)
        template = template_trace(workdir)
        baseline = baseline_module(args.baseline, workdir)
        traces = [variant(template, i, rng) for i in range(args.records)]
        logs = {"baseline": workdir / "baseline.jsonl", "current": workdir / "current.jsonl"}
        cpu: dict[str, list[float]] = {"baseline": [], "current": []}
        wall: dict[str, list[float]] = {"baseline": [], "current": []}
        for start in range(0, args.records, args.block):
            block = traces[start:start + args.block]
            order = (("baseline", baseline), ("current", current))
            for label, module in (order if start // args.block % 2 == 0 else order[::-1]):
                c, w = append_block(module, logs[label], block)
                cpu[label] += c
                wall[label] += w
        checks = {label: current.check_log(path) for label, path in logs.items()}
        for label, check in checks.items():
            if check.problems or check.records != args.records:
                raise SystemExit(f"{label}: the log does not verify: {check.problems[:3]}")
        ids = {label: [record["trace"]["trace_id"] for record in current.TraceLog(path).records()]
               for label, path in logs.items()}
        if ids["baseline"] != ids["current"]:
            raise SystemExit("the two logs hold different records")
        size = logs["current"].stat().st_size

    def figures(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {"p50_ms": round(statistics.median(values) * 1e3, 3),
                "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1e3, 3),
                "mean_ms": round(statistics.fmean(values) * 1e3, 3)}

    rows = {label: {"cpu": figures(cpu[label]), "wall": figures(wall[label])} for label in cpu}
    delta_cpu = rows["current"]["cpu"]["p50_ms"] - rows["baseline"]["cpu"]["p50_ms"]
    payload = {"machine": info, "records": args.records, "block": args.block, "baseline_revision": args.baseline,
               "bytes_per_record": size // args.records, "results": rows,
               "cpu_p50_difference_ms": round(delta_cpu, 3)}
    lines = [
        "# Trace log append: the cost of the writer's continuity check",
        "",
        f"Machine: {info['cpu']}, {info['cpu_cores_usable']} usable cores, Python {info['python']}; load average at "
        f"start {info.get('load_average_at_start')}.",
        "",
        f"{args.records} real traces ({size / args.records / 1e3:.1f} KB each: BM25 top 100 on SciFact, "
        "`sieve search --trace-out`, id and timestamps varied) appended to a log per implementation, a new "
        f"`TraceLog` per append, in blocks of {args.block} alternated. Baseline: `engine/trace.py` at "
        f"`{args.baseline}` (no continuity check), imported beside the working tree's. Every append is fsynced; "
        "both logs verify and hold the same records.",
        "",
        "| implementation | CPU p50 ms | CPU p95 ms | CPU mean ms | wall p50 ms | wall p95 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label in ("baseline", "current"):
        row = rows[label]
        lines.append(f"| {label} | {row['cpu']['p50_ms']} | {row['cpu']['p95_ms']} | {row['cpu']['mean_ms']} | "
                     f"{row['wall']['p50_ms']} | {row['wall']['p95_ms']} |")
    lines += ["", f"Difference of the CPU medians: **{delta_cpu:+.3f} ms** per append.", "",
              "Command: `.venv/bin/python bench/trace_append.py`"]
    write_results("trace_append", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
