"""`sieve eval` and `sieve compare` measure a pipeline as a given user sees it, at one fixed time.

An access-controlled pipeline evaluated as nobody in particular measures what an anonymous user gets; the
options say who the queries are asked as, the report records it, and queries that return nothing are named
(an evaluation whose every query is empty is almost always the wrong user, not a bad pipeline).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ACCESS = """\
version: 1
kind: prefilter
rules:
  - id: acl
    action: acl
    field: acl
    user_field: groups
    public: [{public}]
"""


@pytest.fixture
def trial_data(tmp_path: Path) -> Path:
    """Two queries whose relevant documents are the trial protocols only trial investigators may see."""
    data = tmp_path / "trial-data"
    (data / "qrels").mkdir(parents=True)
    (data / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "clinical trial protocol metformin in gestation"}) + "\n"
        + json.dumps({"_id": "q2", "text": "investigator brochure semaglutide cardiovascular"}) + "\n",
        encoding="utf-8")
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tmed-006\t1\nq2\tmed-029\t1\n",
                                             encoding="utf-8")
    return data


def _config(tmp_path: Path, index: Path, public: str) -> Path:
    (tmp_path / "access.yaml").write_text(ACCESS.format(public=public), encoding="utf-8")
    config = tmp_path / "access-pipeline.yaml"
    config.write_text(f"""version: 1
name: access-pipeline
index: {index}
stages:
  - {{id: access, type: rules.prefilter, params: {{rules: access.yaml}}}}
  - {{id: bm25, type: recall.bm25, inputs: [access], params: {{top_k: 10}}}}
output: bm25
trace: {{log: null}}
""", encoding="utf-8")
    return config


def test_eval_asks_every_query_as_the_named_user_at_one_time_and_records_both(cli, cli_json, medical_index,
                                                                               trial_data, tmp_path):
    config = _config(tmp_path, medical_index, "public")
    anonymous = cli_json("eval", config, "-d", trial_data)
    investigator = cli_json("eval", config, "-d", trial_data, "--group", "trial-investigators",
                            "--as-of", "2025-06-01")
    assert anonymous["metrics"]["ndcg_cut_10"] == 0.0  # the protocols are hidden from an anonymous user
    assert investigator["metrics"]["ndcg_cut_10"] > 0.5
    assert investigator["asked_as"]["user"]["groups"] == ["trial-investigators"]
    assert investigator["asked_as"]["as_of"].startswith("2025-06-01T00:00:00")
    assert anonymous["asked_as"]["user"]["groups"] == [] and anonymous["asked_as"]["as_of"]
    table = cli("eval", config, "-d", trial_data, "--group", "trial-investigators", "--as-of", "2025-06-01")
    assert table.exit_code == 0 and "asked as groups trial-investigators at 2025-06-01" in table.stdout


def test_eval_names_queries_that_returned_nothing_and_who_asked(cli, medical_index, trial_data, tmp_path):
    config = _config(tmp_path, medical_index, "a-group-nobody-has")  # an anonymous user may see nothing
    result = cli("eval", config, "-d", trial_data)
    assert result.exit_code == 0, result.output
    assert "every query returned no document, asked as an anonymous user" in " ".join(result.stderr.split())
    seen = cli("eval", config, "-d", trial_data, "--group", "trial-investigators")
    assert seen.exit_code == 0 and "returned no document" not in seen.stderr


def test_compare_asks_both_sides_as_the_same_user(cli_json, medical_index, trial_data, tmp_path):
    config = _config(tmp_path, medical_index, "public")
    other = tmp_path / "other.yaml"
    other.write_text(config.read_text(encoding="utf-8").replace("top_k: 10", "top_k: 5").replace(
        "name: access-pipeline", "name: other"), encoding="utf-8")
    report = cli_json("compare", config, other, "-d", trial_data, "--group", "trial-investigators",
                      "--as-of", "2025-06-01")
    ndcg = next(m for m in report["metrics"] if m["metric"] == "ndcg_cut_10")
    assert ndcg["mean_a"] > 0.5 and ndcg["mean_b"] > 0.5


def test_sweep_asks_as_the_named_user_and_warns_when_the_config_answers_nothing(cli, cli_json, medical_index,
                                                                                 trial_data, tmp_path):
    config = _config(tmp_path, medical_index, "a-group-nobody-has")
    (trial_data / "qrels" / "train.tsv").write_text((trial_data / "qrels" / "test.tsv").read_text(), encoding="utf-8")
    anonymous = cli("sweep", config, "-d", trial_data, "--set", "stages.bm25.params.top_k=[5, 20]")
    assert anonymous.exit_code == 0, anonymous.output
    assert "2 of 2 queries returned no document" in " ".join(anonymous.stderr.split())
    seen = cli_json("sweep", config, "-d", trial_data, "--set", "stages.bm25.params.top_k=[5, 20]",
                    "--group", "trial-investigators", "--as-of", "2025-06-01")
    assert seen["baseline"]["metrics"]["ndcg_cut_10"] > 0.5
    assert seen["asked_as"]["user"]["groups"] == ["trial-investigators"]
    assert not any("returned no document" in w for w in seen["warnings"])
