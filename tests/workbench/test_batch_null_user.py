"""`"user": null` in a query line. The server reads it as anonymous; `sieve batch` read it as the batch's default user
(`--group`...), who may see more: the same JSON gave another user's results. A batch line's null user is now refused,
located, with the two spellings that say what was meant; the server keeps reading null as anonymous, as it reads a
missing user and `{}` (it has no default user, and reading a JSON client's null for an optional field as "nobody" is
the safe reading)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.workbench.conftest import ROOT, run_sieve

QUERY = "SEMA-CARD-205 investigator brochure"
BROCHURE = "med-029"  # acl: trial-investigators only


@pytest.fixture
def medical_config(tmp_path: Path, medical_index: Path) -> Path:
    shutil.copy(ROOT / "configs" / "medical" / "access.yaml", tmp_path / "access.yaml")
    config = tmp_path / "medical.yaml"
    config.write_text(f"""version: 1
name: medical
index: {medical_index}
stages:
  - {{id: access, type: rules.prefilter, params: {{rules: access.yaml}}}}
  - {{id: bm25, type: recall.bm25, inputs: [access], params: {{top_k: 10}}}}
output: bm25
trace: {{log: null}}
server: {{request_as_of: true}}
""", encoding="utf-8")
    return config


def _queries(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _batch(config: Path, queries: Path, out: Path):
    return run_sieve("batch", config, queries, "--out", out, "--no-log", "--group", "trial-investigators",
                     "--as-of", "2025-06-01", cwd=config.parent)


def test_a_batch_line_whose_user_is_null_is_refused_with_its_location(medical_config, tmp_path):
    queries = _queries(tmp_path / "q.jsonl", [
        {"id": "absent", "text": QUERY},
        {"id": "null", "text": QUERY, "user": None},
        {"id": "empty", "text": QUERY, "user": {}},
    ])
    done = _batch(medical_config, queries, tmp_path / "out.jsonl")
    assert done.returncode == 2, done.stdout + done.stderr
    said = " ".join(done.stderr.split())
    assert "1 problem in the queries file" in said and "no query was run" in said
    assert (f"{queries}:2: user: null is not a user; leave the key out for the batch's default user, or give {{}} "
            "for an anonymous one") in said
    assert f"{queries}:1" not in said and f"{queries}:3" not in said
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_a_left_out_user_is_the_default_and_an_empty_one_anonymous_as_on_the_server(medical_config, tmp_path):
    from starlette.testclient import TestClient

    from engine.server import create_app, load_pipelines

    queries = _queries(tmp_path / "q.jsonl", [{"id": "absent", "text": QUERY},
                                              {"id": "empty", "text": QUERY, "user": {}}])
    out = tmp_path / "out.jsonl"
    done = _batch(medical_config, queries, out)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = {line["id"]: [r["doc_id"] for r in line["results"]]
            for line in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert BROCHURE in seen["absent"] and BROCHURE not in seen["empty"]  # --group trial-investigators, then nobody

    client = TestClient(create_app(load_pipelines([medical_config])))

    def served(**body) -> list[str]:
        response = client.post("/v1/pipelines/medical/search", json={"query": QUERY, "as_of": "2025-06-01", **body})
        assert response.status_code == 200, response.text
        return [r["doc_id"] for r in response.json()["results"]]

    anonymous = served()
    assert served(user=None) == served(user={}) == anonymous == seen["empty"]
    assert BROCHURE in served(user={"groups": ["trial-investigators"]})
