"""sieve explain: score trees for results, and "why not doc X?" for masked, cut and never-recalled documents."""

from __future__ import annotations

from pathlib import Path

from tests.workbench.conftest import ROOT, run_sieve

MEDICAL_CONFIG = ROOT / "configs" / "medical" / "pipeline.yaml"
US_CLINICIAN = ("--role", "clinician", "--jurisdiction", "US", "--as-of", "2025-06-01")
QUERY = "0-dimensional biomaterials show inductive properties."


def _verdicts(report: dict) -> dict[str, dict]:
    return {v["doc_id"]: v for v in report["why_not"]}


def test_results_carry_trees_rules_and_contributions(cli_json, medical_index: Path):
    report = cli_json("explain", MEDICAL_CONFIG, "metformin kidney", *US_CLINICIAN, "--index", medical_index)
    first = report["results"][0]
    assert first["doc_id"] == "med-003"
    assert first["explanation"]["details"][0]["description"].startswith("BM25")
    fired = {f["rule"] for f in first["rules_fired"]}
    assert {"pin-fda-metformin-alert", "boost-current-guidelines"} <= fired
    assert first["contributions"] == []  # no weighted fusion in this pipeline


def test_why_not_a_masked_document_names_the_rule(cli_json, medical_index: Path):
    # med-001 is UK guidance: the jurisdiction access rule hides it from a US clinician.
    report = cli_json("explain", MEDICAL_CONFIG, "metformin kidney", *US_CLINICIAN, "--index", medical_index,
                      "--doc", "med-001")
    verdict = _verdicts(report)["med-001"]
    assert verdict["status"] == "masked" and verdict["stage"] == "access"
    assert verdict["details"]["rules"] == ["jurisdiction"]
    assert "masked by prefilter stage 'access'" in verdict["message"]
    assert all(step["rank"] is None for step in verdict["journey"])
    # The same document for a UK clinician is not masked.
    uk = cli_json("explain", MEDICAL_CONFIG, "metformin kidney", "--role", "clinician", "--jurisdiction", "UK",
                  "--as-of", "2025-06-01", "--index", medical_index, "--doc", "med-001")
    assert _verdicts(uk)["med-001"]["status"] != "masked"


def test_why_not_a_document_cut_by_top_k(cli_json, mini_config):
    config = mini_config(recall_top_k=20, k=3)
    report = cli_json("explain", config, QUERY, "--top", "0")
    trace_ranked = cli_json("explain", config, QUERY, "--top", "0", "--doc", "6550579")
    assert _verdicts(trace_ranked)["6550579"]["status"] == "returned"
    # The recall's 6th document is cut by select.top_k (k=3): stage, reason, its score and the cut-off.
    bm25_sixth = _verdicts(cli_json("explain", config, QUERY, "--doc", "19651306"))["19651306"]
    assert bm25_sixth["status"] == "dropped" and bm25_sixth["stage"] == "final"
    assert bm25_sixth["reason"] == "beyond_top_k" and "k=3" in bm25_sixth["message"]
    assert bm25_sixth["score"] < bm25_sixth["cutoff"]
    journey = {step["stage"]: step for step in bm25_sixth["journey"]}
    assert journey["bm25"]["rank"] == 6 and journey["final"]["rank"] is None
    assert report["results"] == []  # --top 0: no trees, verdicts only


def test_why_not_a_document_recall_never_found(cli_json, mini_config):
    config = mini_config(recall_top_k=10, k=3)
    report = cli_json("explain", config, QUERY, "--doc", "70490", "--doc", "41928290", "--doc", "1944452x")
    verdicts = _verdicts(report)
    # No query term occurs in 70490 (likelihood ratios): BM25 gives it no score at all.
    assert verdicts["70490"]["status"] == "not_recalled"
    assert "gives it no score at all" in verdicts["70490"]["message"]
    # Recalled (10th of top_k=10) but cut by the final k=3: not a recall miss.
    assert verdicts["41928290"]["status"] == "dropped" and verdicts["41928290"]["stage"] == "final"
    # An id that is not in the corpus.
    assert verdicts["1944452x"]["status"] == "not_in_index"


def test_why_not_reports_the_probe_rank_below_the_recall_cut(cli_json, mini_config):
    wide = cli_json("explain", mini_config(recall_top_k=50, k=50, name="wide.yaml"), QUERY)
    thirtieth = wide["results"][29]
    narrow = cli_json("explain", mini_config(recall_top_k=10, k=3, name="narrow.yaml"), QUERY,
                      "--doc", thirtieth["doc_id"])
    verdict = _verdicts(narrow)[thirtieth["doc_id"]]
    assert verdict["status"] == "not_recalled"
    assert verdict["rank"] == 30 and abs(verdict["score"] - thirtieth["score"]) < 1e-6
    assert "below its top_k=10 cut-off" in verdict["message"]


def test_explain_table_output_and_bad_input(cli, mini_config):
    config = mini_config(recall_top_k=10, k=3)
    result = cli("explain", config, QUERY, "--doc", "70490")
    assert result.exit_code == 0, result.output
    assert "why not 70490?" in result.stdout and "not_recalled" in result.stdout
    assert "BM25" in result.stdout
    done = run_sieve("explain", config, "   ")
    assert done.returncode == 2 and "query is empty" in done.stderr and "Traceback" not in done.stderr
