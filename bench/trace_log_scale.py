"""Trace log at scale: `sieve trace verify`, `sieve trace head` and reading one record (`sieve report LOG --seq`,
`replay`) on a long log, the code at a baseline revision against the working tree's, in the same run.

The log: ``--records`` records appended with the real ``TraceLog.append``, each a real trace (one BM25 query on
SciFact, top 100, through ``sieve search --trace-out``, about 70 KB compact) with its trace id and timestamps
varied per record. The baseline's ``engine/trace.py`` is read from git (``git show REV:engine/trace.py``) into a
module of its own; both implementations read the same file, from the page cache (the log was just written).

Measured, each ``--repeats`` times, baseline and current alternated (the best CPU time and the best wall time
are reported):

- verify: ``check_log(LOG)`` (every record decoded, hashed and compared with its canonical form);
- head: ``log_head(LOG)`` (the same full check: it vouches for the whole log);
- last by seq: ``load_trace_checked(LOG, seq=LAST)``, what `sieve report LOG --seq LAST` and `replay` read;
- last by id: ``load_trace_checked(LOG, trace_id=ID)`` of the last record;
- latest: ``TraceLog(LOG).find()``.

Both implementations must give the same answer (counts, problems, head, record): the run stops otherwise.

Usage: .venv/bin/python bench/trace_log_scale.py [--records 2000] [--repeats 2] [--baseline 9c2b626]
Writes bench/results/trace_log_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench._common import host, scifact_bm25_index, write_results  # noqa: E402

QUERY = "does metformin reduce the risk of cancer in patients with type 2 diabetes"
BASELINE = "9c2b626"  # the revision the scale audit measured (one record read by scanning the whole chain)


def template_trace(workdir: Path) -> dict[str, Any]:
    """A real trace: one query through the BM25 baseline config on the SciFact index, written by --trace-out."""
    index = scifact_bm25_index()
    out = workdir / "template.json"
    subprocess.run([sys.executable, "-m", "engine.cli", "search", str(ROOT / "configs" / "bm25.yaml"), QUERY,
                    "--index", str(index), "--no-log", "--trace-out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    trace = json.loads(out.read_text(encoding="utf-8"))
    trace.pop("log", None)  # a logged trace has no 'log' field in its record
    return trace


def build_log(path: Path, template: dict[str, Any], records: int, rng: random.Random) -> list[str]:
    """Append ``records`` variants of ``template`` with the real appender; returns their trace ids."""
    from engine.trace import TraceLog

    log = TraceLog(path)
    ids = []
    for i in range(records):
        trace = dict(template)
        trace["trace_id"] = f"{rng.getrandbits(128):032x}"
        trace["created_at"] = f"2026-01-{1 + i // 2000 % 28:02d}T{i // 60 % 24:02d}:{i % 60:02d}:00.{i:06d}+00:00"
        trace["timing_ms"] = {k: round(v * rng.uniform(0.8, 1.2), 3) if isinstance(v, (int, float)) else v
                              for k, v in template.get("timing_ms", {}).items()}
        log.append(trace)
        ids.append(trace["trace_id"])
    return ids


def baseline_module(revision: str, workdir: Path) -> ModuleType:
    """``engine/trace.py`` at ``revision``, imported as a module of its own (it imports ``engine.errors``)."""
    source = subprocess.run(["git", "show", f"{revision}:engine/trace.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    file = workdir / "trace_baseline.py"
    file.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("trace_baseline", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["trace_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def timed(call: Callable[[], Any]) -> tuple[float, float, Any]:
    """(CPU seconds of this process, wall seconds, result) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = call()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def operations(module: ModuleType, path: Path, last_seq: int, last_id: str) -> dict[str, Callable[[], Any]]:
    """The measured operations, each returning what must agree between the implementations."""
    def verify() -> Any:
        check = module.check_log(path)
        return check.records, check.problems

    def head() -> Any:
        found = module.log_head(path)
        return found.records, found.seq, found.hash

    def by_seq() -> Any:
        trace, source = module.load_trace_checked(path, seq=last_seq)
        return trace["trace_id"], source.seq, source.hash

    def by_id() -> Any:
        trace, source = module.load_trace_checked(path, trace_id=last_id)
        return trace["trace_id"], source.seq, source.hash

    def latest() -> Any:
        return module.TraceLog(path).find()["trace_id"]

    return {"verify": verify, "head": head, "last by seq": by_seq, "last by id": by_id, "latest": latest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the code to compare with")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()

    import engine.trace as current

    info = host()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="sieve-trace-scale-") as tmp:
        workdir = Path(tmp)
        template = template_trace(workdir)
        path = workdir / "trace.jsonl"
        start = time.perf_counter()
        ids = build_log(path, template, args.records, rng)
        append_s = time.perf_counter() - start
        size = path.stat().st_size
        print(f"{args.records} records, {size / 1e6:.1f} MB ({size / args.records / 1e3:.1f} KB per record), "
              f"appended in {append_s:.1f} s")
        baseline = baseline_module(args.baseline, workdir)
        rows = []
        last_seq, last_id = args.records - 1, ids[-1]
        for name in operations(current, path, last_seq, last_id):
            runs: dict[str, list[tuple[float, float, Any]]] = {"baseline": [], "current": []}
            for _ in range(args.repeats):  # alternated, so a busy moment on the shared cores hits both
                for label, module in (("baseline", baseline), ("current", current)):
                    runs[label].append(timed(operations(module, path, last_seq, last_id)[name]))
            answers = {label: [run[2] for run in found] for label, found in runs.items()}
            if any(answer != answers["baseline"][0] for found in answers.values() for answer in found):
                raise SystemExit(f"{name}: the implementations disagree: {answers!r}")
            (before_cpu, after_cpu), (before_wall, after_wall) = (
                [min(run[column] for run in runs[label]) for label in ("baseline", "current")] for column in (0, 1))
            rows.append({"operation": name,
                         "baseline_cpu_s": round(before_cpu, 3), "current_cpu_s": round(after_cpu, 3),
                         "baseline_wall_s": round(before_wall, 3), "current_wall_s": round(after_wall, 3),
                         "baseline_cpu_ms_per_record": round(before_cpu / args.records * 1e3, 3),
                         "current_cpu_ms_per_record": round(after_cpu / args.records * 1e3, 3),
                         "speedup_cpu": round(before_cpu / after_cpu, 1)})
            print(f"{name:12s} CPU baseline {before_cpu:7.2f} s  current {after_cpu:7.2f} s  "
                  f"x{before_cpu / after_cpu:<5.1f} (wall {before_wall:.2f} s, {after_wall:.2f} s)")
        try:
            load_at_end = [round(v, 2) for v in os.getloadavg()]
        except OSError:
            load_at_end = None

    payload = {"machine": info, "records": args.records, "log_bytes": size, "bytes_per_record": size // args.records,
               "append_s": round(append_s, 2), "repeats": args.repeats, "baseline_revision": args.baseline,
               "load_average_at_end": load_at_end,
               "results": rows}
    cores = info["cpu_cores_usable"]
    lines = [
        "# Trace log at scale: verify, head, reading one record",
        "",
        f"Machine: {info['cpu']}, {cores} usable cores, Python {info['python']}; load average "
        f"{info.get('load_average_at_start')} at start, {load_at_end} at the end: the cores are shared with other "
        "jobs, so the figure to read is this process's CPU time (wall time beside it).",
        "",
        f"Log: {args.records} records appended with `TraceLog.append` ({append_s:.1f} s), {size / 1e6:.1f} MB, "
        f"{size / args.records / 1e3:.1f} KB per record: a real trace (BM25 top 100 on SciFact, `sieve search "
        "--trace-out`) with its id and timestamps varied. Read from the page cache. Baseline: `engine/trace.py` at "
        f"`{args.baseline}`, imported beside the working tree's, in the same run, the two alternated; best of "
        f"{args.repeats} each; both gave the same answers.",
        "",
        "| operation | baseline CPU s | current CPU s | baseline ms/record | current ms/record | speedup | "
        "wall s (baseline, current) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['operation']} | {row['baseline_cpu_s']} | {row['current_cpu_s']} | "
                     f"{row['baseline_cpu_ms_per_record']} | {row['current_cpu_ms_per_record']} | "
                     f"x{row['speedup_cpu']} | {row['baseline_wall_s']}, {row['current_wall_s']} |")
    lines += [
        "",
        "verify and head check every record in full (decoded, hashed, compared with the writer's canonical form); "
        "the current code encodes each record once instead of twice. Reading one record (by seq, by id, the "
        "latest) checks each earlier line as the writer's bytes (header layout, seq, link, sha256 of `prev` and "
        "the line's own trace bytes) without decoding it, and the record read in full; any other line sends the "
        "read to the full check, which words the refusal.",
        "",
        f"Command: `.venv/bin/python bench/trace_log_scale.py --records {args.records} --repeats {args.repeats} "
        f"--baseline {args.baseline}`",
    ]
    json_path, md_path = write_results("trace_log_scale", payload, "\n".join(lines))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
