"""What a stage's warm-up finds that changes what the pipeline does (an override rule reading a field no
document has: the rule can never fire) is shown where the analyst looks: search, explain, eval, the server's
log and /v1/pipelines; not only inside the trace JSON."""

from __future__ import annotations

from pathlib import Path

import httpx

from engine.server import serve_in_subprocess

OVERRIDES = """\
version: 1
kind: override
rules:
  - id: boost-fda
    action: boost
    factor: 2
    match: {field: doc.sorce, op: eq, value: fda}
"""


def _config(tmp_path: Path, index: Path, extra: str = "", name: str = "typo") -> Path:
    (tmp_path / "overrides.yaml").write_text(OVERRIDES, encoding="utf-8")
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"""version: 1
name: {name}
index: {index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 10}}}}
  - {{id: overrides, type: rules.override, inputs: [bm25], params: {{rules: overrides.yaml}}}}
output: overrides
trace: {{log: null}}
{extra}""", encoding="utf-8")
    return config


def test_search_explain_and_eval_print_what_warm_up_found(cli, medical_index, tmp_path):
    config = _config(tmp_path, medical_index)
    for command in (("search", config, "metformin kidney function"), ("explain", config, "metformin kidney function")):
        result = cli(*command)
        assert result.exit_code == 0, result.output
        said = " ".join(result.stderr.split())
        assert "warning: stage 'overrides':" in said and "doc.sorce" in said, said
    data = tmp_path / "data"
    (data / "qrels").mkdir(parents=True)
    (data / "queries.jsonl").write_text('{"_id": "q1", "text": "metformin kidney function"}\n', encoding="utf-8")
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tmed-001\t1\n", encoding="utf-8")
    result = cli("eval", config, "-d", data)
    assert result.exit_code == 0 and "doc.sorce" in result.stderr, result.output


def test_the_server_logs_them_at_start_and_lists_them(medical_index, tmp_path):
    """Listed whole where the pipeline allows include_trace (its traces carry them); elsewhere by the stage they
    arose in and their code, since their text names rules, documents and files (GET /v1/pipelines asks for no
    permission)."""
    config = _config(tmp_path, medical_index, "server: {include_trace: true}\n")
    closed = _config(tmp_path, medical_index, name="closed")
    with serve_in_subprocess([config, closed], cwd=tmp_path) as base:
        listed = {p["name"]: p for p in httpx.get(f"{base}/v1/pipelines").json()["pipelines"]}
    pipeline = listed["typo"]
    assert any("doc.sorce" in w and w.startswith("stage 'overrides':") for w in pipeline["warnings"]), pipeline
    assert listed["closed"]["warnings"] == ["stage 'overrides': [unknown_field]"] * len(pipeline["warnings"])


def test_a_rule_files_finding_is_printed_once(medical_index):
    """From the README audit: `make demo` printed each rule-file finding twice, once as the config's (located in the
    config) and once as the overrides stage's warm-up warning."""
    from tests.workbench.conftest import ROOT, run_sieve

    done = run_sieve("search", ROOT / "configs" / "medical" / "pipeline.yaml", "metformin kidney", "--role",
                     "clinician", "--jurisdiction", "US", "--as-of", "2025-06-01", "--index", medical_index, "--no-log")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("[expired]") == 1 and done.stderr.count("[pin_slot_conflict]") == 1, done.stderr
