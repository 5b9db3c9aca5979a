"""Rule tests (`*.tests.yaml`) say what their names claim: `fired` / `not_fired` read every firing, not the
trace's cut list; they refuse access (prefilter) rules, which mask the corpus whatever the query; a test entity
can carry the gazetteer's id; a document the index lacks gets the right verdict and a did-you-mean."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from rules.cli import rules_app
from rules.testing import _fired_rules

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

HEADER = """\
version: 1
pipeline: pipeline.yaml
corpus: ../../examples/medical
gazetteer: entities.yaml
as_of: 2025-06-01
cases:
"""


def _pack(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "configs" / "medical", tmp_path / "configs" / "medical")
    shutil.copytree(ROOT / "examples" / "medical", tmp_path / "examples" / "medical")
    pack = tmp_path / "configs" / "medical"
    (pack / "rules.tests.yaml").unlink()  # each test runs only its own file
    return pack


def _run(pack: Path, cases: str) -> tuple[Path, object]:
    tests = pack / "audit.tests.yaml"
    tests.write_text(HEADER + cases, encoding="utf-8")
    return tests, runner.invoke(rules_app, ["test", str(tests)])


# ------------------------------------------------------------------ 1. fired/not_fired are not cut by the trace


def test_fired_and_not_fired_see_firings_the_trace_list_leaves_out(tmp_path):
    pack = _pack(tmp_path)
    pipeline = pack / "pipeline.yaml"
    text = pipeline.read_text()
    assert "params: {rules: overrides.yaml}" in text
    pipeline.write_text(text.replace("params: {rules: overrides.yaml}",
                                     "params: {rules: overrides.yaml, max_traced_firings: 0}"))
    tests, result = _run(pack, """\
  - name: the demote fires although the trace lists no firing
    query: metformin first-line type 2 diabetes
    user: {roles: [clinician], jurisdictions: [UK]}
    expect:
      - {fired: demote-leaflets-for-clinicians}
      - {fired: boost-current-guidelines}
  - name: not_fired is not fooled by the cut list
    query: metformin first-line type 2 diabetes
    user: {roles: [clinician], jurisdictions: [UK]}
    expect:
      - {not_fired: demote-leaflets-for-clinicians}
""")
    assert result.exit_code == 1, result.output
    assert "✓ the demote fires although the trace lists no firing" in result.output
    assert "✗ not_fired is not fooled by the cut list" in result.output
    assert f"{tests}:17:9  expected rule 'demote-leaflets-for-clinicians' not to fire, but it did" in result.output


def test_fired_rules_are_read_from_the_complete_count_and_from_an_older_trace():
    stage = {"stage": "overrides", "details": {"firings": [{"rule": "a"}], "fired_rules": {"a": 3, "b": 40, "c": 0}}}
    prefilter = {"stage": "access", "details": {"rules": [{"rule": "p", "status": "applied", "excluded": 5}]}}
    assert _fired_rules({"stages": [prefilter, stage]}) == {"a", "b"}
    older = {"stage": "overrides", "details": {"firings": [{"rule": "a"}, {"rule": "a"}]}}
    assert _fired_rules({"stages": [older]}) == {"a"}


# ------------------------------------------------------------------ 2. prefilter rules: refused, with a way out


def test_fired_on_an_access_rule_is_refused_at_load_with_what_to_write_instead(tmp_path):
    pack = _pack(tmp_path)
    tests, result = _run(pack, """\
  - name: an unrelated query
    query: hand hygiene
    user: {roles: [clinician], jurisdictions: [US]}
    expect:
      - {fired: patient-level-data}
      - {not_fired: hide-drafts}
      - {fired: bury-superseded}
""")
    assert result.exit_code == 2, result.output
    assert (f"{tests}:11:17  cases.0.expect.0.fired: rule 'patient-level-data' is an access (prefilter) rule"
            in result.output)
    assert f"{tests}:12:21  cases.0.expect.1.not_fired: rule 'hide-drafts' is an access (prefilter) rule" in result.output
    assert "{doc: ID, absent: true}" in result.output and "a user it lets through" in result.output
    assert "bury-superseded" not in result.output  # an override rule is fine
    assert "2 configuration errors" in result.output


def test_the_shipped_patient_level_data_case_fails_when_the_rule_is_off(tmp_path):
    pack = tmp_path / "configs" / "medical"
    shutil.copytree(ROOT / "configs" / "medical", pack)
    shutil.copytree(ROOT / "examples" / "medical", tmp_path / "examples" / "medical")
    access = pack / "access.yaml"
    text = access.read_text()
    anchor = "  - id: patient-level-data\n"
    assert anchor in text
    access.write_text(text.replace(anchor, anchor + "    enabled: false\n"))
    result = runner.invoke(rules_app, ["test", str(pack), "-k", "patient-level data is blocked"])
    assert result.exit_code == 1, result.output
    assert "✗ patient-level data is blocked outside pharmacovigilance" in result.output
    assert "expected 'med-016' never to be returned, got rank" in result.output


def test_no_shipped_suite_asks_whether_an_access_rule_fired():
    from engine.yamlsource import load_yaml_file

    for domain in ("medical", "finance"):
        access = load_yaml_file(ROOT / "configs" / domain / "access.yaml").data
        ids = {rule["id"] for rule in access["rules"]}
        for path in (ROOT / "configs" / domain).glob("*.tests.yaml"):
            for case in load_yaml_file(path).data["cases"]:
                for expectation in case["expect"]:
                    assert not ({expectation.get("fired"), expectation.get("not_fired")} & ids), (path, case["name"])


# ------------------------------------------------------------------ 3. a test entity can carry the gazetteer's id


def test_a_test_entity_carries_the_gazetteer_id_as_extraction_does(tmp_path):
    pack = _pack(tmp_path)
    tests, result = _run(pack, """\
  - name: Glucophage is metformin to the rule
    query: lactic acidosis risk
    user: {roles: [clinician], jurisdictions: [US]}
    entities: [{text: Glucophage, label: DRUG, id: metformin}]
    expect:
      - {fired: pin-fda-metformin-alert}
      - {doc: med-003, rank: 1}
  - name: as production extracts it from the query text
    query: lactic acidosis risk with Glucophage
    user: {roles: [clinician], jurisdictions: [US]}
    expect:
      - {fired: pin-fda-metformin-alert}
      - {doc: med-003, rank: 1}
  - name: without the id only the brand name is known
    query: lactic acidosis risk
    user: {roles: [clinician], jurisdictions: [US]}
    entities: [{text: Glucophage, label: DRUG}]
    expect:
      - {not_fired: pin-fda-metformin-alert}
""")
    assert result.exit_code == 0, result.output
    assert "3 passed, 0 failed" in result.output


def test_an_entity_id_is_text(tmp_path):
    pack = _pack(tmp_path)
    tests, result = _run(pack, """\
  - name: a numeric id
    query: lactic acidosis risk
    entities: [{text: Glucophage, label: DRUG, id: 700}]
    expect:
      - {doc: med-003, present: true}
""")
    assert result.exit_code == 2, result.output
    assert "cases.0.entities.0.id: Input should be a valid string (got 700)" in result.output


# ------------------------------------------------------------------ 4. documents the index lacks


def test_a_missing_document_gets_the_right_verdict_and_a_did_you_mean(tmp_path):
    pack = _pack(tmp_path)
    tests, result = _run(pack, """\
  - name: ghosts
    query: metformin
    user: {roles: [clinician], jurisdictions: [US]}
    expect:
      - {doc: med-999, absent: true}
      - {doc: MED-003, rank: 1}
      - {doc: med-003, below: Med-001}
      - {doc: no-such-thing, present: true}
      - {not_fired: pin-fda-metformin-alrt}
""")
    assert result.exit_code == 2, result.output
    out = result.output
    assert (f"{tests}:11:15  cases.0.expect.0.doc: document 'med-999' is not in the index (33 documents): "
            "the expectation could never fail") in out
    assert (f"{tests}:12:15  cases.0.expect.1.doc: document 'MED-003' is not in the index (33 documents): "
            "the expectation could never pass; did you mean 'med-003'?") in out
    assert (f"{tests}:13:31  cases.0.expect.2.below: document 'Med-001' is not in the index (33 documents): "
            "the expectation could never pass; did you mean 'med-001'?") in out
    assert ("document 'no-such-thing' is not in the index (33 documents): the expectation could never pass\n"
            in out.replace("\r", ""))
    assert "no rule 'pin-fda-metformin-alrt' in the pipeline's rule files: the expectation could never fail" in out
    assert "did you mean 'pin-fda-metformin-alert'?" in out
