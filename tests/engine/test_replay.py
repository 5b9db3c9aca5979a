"""sieve replay: what a re-run must reproduce, and the named cause of every difference (audit findings).

Real pipelines on the SciFact-slice and medical indexes; traces are edited only where the test plays an
older engine, a forger or a changed file on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.compiler import canonical_json
from engine.errors import TraceError
from engine.index import build_index
from engine.pipeline import Pipeline
from engine.replay import replay_trace

ROOT = Path(__file__).resolve().parents[2]
MEDICAL = ROOT / "examples" / "medical"
QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine."
US_CLINICIAN = ["--role", "clinician", "--jurisdiction", "US", "--as-of", "2025-06-01"]


def _yaml(index: Path, trace: str = "{log: null}", stages: str = "") -> str:
    return f"""\
version: 1
index: {index}
stages:
{stages or '''  - {id: bm25, type: recall.bm25, params: {top_k: 50}}
  - {id: final, type: select.top_k, inputs: [bm25], params: {k: 5}}'''}
output: final
trace: {trace}
"""


def _sha(data: object) -> str:
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def _replay_cli(*args: object):
    return CliRunner().invoke(app, ["replay", *map(str, args)])


@pytest.fixture(scope="module")
def medical_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replay-indexes") / "medical"
    build_index(MEDICAL, out, {"bm25": {}})
    return out


@pytest.fixture
def medical_config(tmp_path: Path, medical_index: Path):
    """The medical rules pipeline in tmp_path (its rule files copied beside it, so a test can edit them)."""

    def write(trace: str = "{log: null}") -> Path:
        for name in ("access.yaml", "overrides.yaml"):
            shutil.copy(ROOT / "configs" / "medical" / name, tmp_path / name)
        text = (ROOT / "configs" / "medical" / "pipeline.yaml").read_text(encoding="utf-8")
        text = text.replace("index: ../../build/medical-index", f"index: {medical_index}")
        text = text.replace("trace:\n  log: null", f"trace: {trace}")
        assert f"index: {medical_index}" in text and f"trace: {trace}" in text
        path = tmp_path / "pipeline.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def _medical_trace(config: Path, trace_out: Path) -> dict:
    result = CliRunner().invoke(app, ["search", str(config), "metformin kidney", *US_CLINICIAN,
                                      "--trace-out", str(trace_out)])
    assert result.exit_code == 0, result.output
    return json.loads(trace_out.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- 1. config and engine version


def test_settings_a_newer_engine_adds_at_their_defaults_are_a_note_not_a_difference(bm25_index, write_config):
    trace = Pipeline.from_file(write_config(_yaml(bm25_index))).search(QUERY).trace
    # the trace as an engine without the `server:` section wrote it: no such section, its sha256 over the rest
    resolved = trace["config"]["resolved"]
    assert "server" in resolved
    del resolved["server"]
    trace["config"]["sha256"] = _sha(resolved)
    trace["engine_version"] = "0.0.9"
    report = replay_trace(trace)
    assert report["identical"], report["differences"]
    assert report["differences"] == []
    assert any("engine version 0.0.9 in the trace" in n for n in report["notes"]), report["notes"]
    assert any(n.startswith("engine 0.0.9 -> ") and "settings added at their defaults: server.*" in n
               for n in report["notes"]), report["notes"]


def test_a_config_value_the_engine_reads_otherwise_is_a_difference_by_dotted_path(bm25_index, write_config):
    trace = Pipeline.from_file(write_config(_yaml(bm25_index))).search(QUERY).trace
    resolved = trace["config"]["resolved"]
    bm25 = next(s for s in resolved["stages"] if s["id"] == "bm25")
    assert bm25["type"] == "recall.bm25@1"
    bm25["type"] = "recall.bm25"  # as an engine that recorded stage types without their version
    trace["config"]["sha256"] = _sha(resolved)
    report = replay_trace(trace)
    assert not report["identical"]
    assert any("stages.bm25.type 'recall.bm25' -> 'recall.bm25@1'" in d for d in report["differences"]), report


def test_a_recorded_config_edited_without_its_sha256_is_named(bm25_index, write_config):
    trace = Pipeline.from_file(write_config(_yaml(bm25_index))).search(QUERY).trace
    next(s for s in trace["config"]["resolved"]["stages"] if s["id"] == "final")["params"]["k"] = 3
    report = replay_trace(trace)
    assert not report["identical"]
    assert any("the recorded config was edited" in d for d in report["differences"]), report["differences"]


# ---------------------------------------------------------------------------- 2. identity hashes


def test_an_edited_rule_file_is_named_as_the_cause(medical_config, tmp_path):
    config = medical_config()
    trace = _medical_trace(config, tmp_path / "t.json")
    assert replay_trace(trace)["identical"]
    # a comment-only edit: nothing ranks differently, but the rule file that ran is not the one on disk now
    access = tmp_path / "access.yaml"
    access.write_text(access.read_text(encoding="utf-8") + "# reviewed 2025-07-01\n", encoding="utf-8")
    report = replay_trace(trace)
    assert not report["identical"]
    assert report["ranking_identical"]
    [named] = [d for d in report["differences"] if d.startswith("stage 'access'")]
    assert "rule file sha256" in named and "the rule file access.yaml changed since the trace" in named


def test_an_identity_field_of_a_glossary_is_compared(bm25_index, write_config, tmp_path):
    """A rewrite's glossary (nested in its identity) edited since the trace: named, and the rewrite that
    changed with it is compared too."""
    pytest.importorskip("jieba")
    glossary = tmp_path / "glossary.yaml"
    glossary.write_text("version: 1\nentries:\n  - {id: b12, terms: [vitamin B12, cobalamin]}\n", encoding="utf-8")
    stages = f"""\
  - {{id: rewrite, type: rewrite.coreference, params: {{language: zh, glossary: {glossary}}}}}
  - {{id: bm25, type: recall.bm25, inputs: [rewrite], params: {{top_k: 50}}}}
  - {{id: final, type: select.top_k, inputs: [bm25], params: {{k: 5}}}}"""
    trace = Pipeline.from_file(write_config(_yaml(bm25_index, stages=stages))).search(QUERY).trace
    recorded = next(m for m in trace["models"] if m["stage"] == "rewrite")
    assert len(recorded["glossary"]["sha256"]) == 64
    assert replay_trace(trace)["identical"]
    glossary.write_text("version: 1\nentries:\n  - {id: b12, terms: [vitamin B12, cyanocobalamin]}\n", encoding="utf-8")
    report = replay_trace(trace)
    assert not report["identical"]
    [named] = [d for d in report["differences"] if d.startswith("stage 'rewrite'")]
    assert "glossary sha256" in named and "the glossary glossary.yaml changed since the trace" in named
    assert any(d.startswith("rewritten query differs") and "cyanocobalamin" in d for d in report["differences"])


def test_another_engine_versions_wording_and_fields_are_notes_but_what_ran_is_compared(medical_config, tmp_path):
    """A trace an older engine wrote: a reworded description or decision, and a detail it did not record, are
    notes (every older trace replayed 'different' after a message was reworded); a drop reason, a rule id
    and a score are still differences. The same edits under the current version are differences."""
    trace = _medical_trace(medical_config(), tmp_path / "t.json")
    floor = next(s for s in trace["stages"] if s["id"] == "floor")
    bm25 = next(s for s in trace["stages"] if s["id"] == "bm25")
    trace["results"][0]["explanation"]["details"][0]["description"] = "an older engine's words"
    floor["drops"][0]["detail"] = "an older engine's words"
    del bm25["details"]["searched"]  # a field the older engine did not record

    same_version = replay_trace(json.loads(json.dumps(trace)))
    assert not same_version["identical"] and len(same_version["differences"]) == 3, same_version["differences"]

    trace["engine_version"] = "0.0.9"
    older = replay_trace(json.loads(json.dumps(trace)))
    assert older["identical"], older["differences"]
    note = next(n for n in older["notes"] if n.startswith("engine 0.0.9 -> ") and "not counted" in n)
    assert "3 differences in wording or in fields only one of them records" in note
    assert "stages[bm25].details.searched: absent in the trace" in note

    floor["drops"][0]["reason"] = "withdrawn_by_legal"
    trace["results"][1]["score"] += 0.5
    edited = replay_trace(trace)
    assert not edited["identical"]
    text = "\n".join(edited["differences"])
    assert "stages[floor].drops[0].reason: 'withdrawn_by_legal' in the trace" in text
    assert "rank 2" in text and "score" in text


# ---------------------------------------------------------------------------- 3a. everything a re-run reproduces


def test_a_forged_stage_record_or_explanation_is_a_difference_by_path(medical_config, tmp_path):
    trace = _medical_trace(medical_config(), tmp_path / "t.json")
    overrides = next(s for s in trace["stages"] if s["id"] == "overrides")
    floor = next(s for s in trace["stages"] if s["id"] == "floor")
    assert overrides["details"]["firings"] and floor.get("drops"), "the fixture query must fire a rule and drop"
    overrides["details"]["firings"][0]["rule"] = "pin-approved-by-CMO"
    floor["drops"][0]["reason"] = "withdrawn_by_legal"
    trace["results"][0]["explanation"]["description"] = "score approved by reviewer"
    for stage in trace["stages"]:  # volatile fields are not compared
        stage["duration_ms"] = 1.0
    trace["timing_ms"] = {"total": 1.0}
    report = replay_trace(trace)
    assert not report["identical"] and report["ranking_identical"]
    text = "\n".join(report["differences"])
    assert "stages[overrides].details.firings[0].rule: 'pin-approved-by-CMO' in the trace" in text
    assert "stages[floor].drops[0].reason: 'withdrawn_by_legal' in the trace, 'below_threshold'" in text
    assert "results[0].explanation.description: 'score approved by reviewer' in the trace" in text
    assert "duration_ms" not in text and "timing_ms" not in text


def test_a_number_changed_in_its_last_digits_is_a_difference_and_the_command_says_so(medical_config, tmp_path):
    """Mutation audit: mutants 44 (a 0.1 % tolerance on numbers inside stage records and explanations), 45 (`sieve
    replay` exiting 0 when only the content, not the ranking, differed) and 43 (no result-count check) went unseen."""
    trace = _medical_trace(medical_config(), tmp_path / "t.json")
    nudged = json.loads(json.dumps(trace))
    term = nudged["results"][0]["explanation"]["details"][0]
    term["value"] *= 1.0001
    report = replay_trace(nudged)
    assert not report["identical"] and report["ranking_identical"]
    assert any(line.startswith("results[0].explanation.details[0].value:") for line in report["differences"])
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(nudged), encoding="utf-8")
    shown = _replay_cli(edited)
    assert shown.exit_code == 1 and "different" in shown.output, shown.output
    shorter = json.loads(json.dumps(trace))
    shorter["results"].pop()
    report = replay_trace(shorter)
    assert f"{len(shorter['results'])} results in the trace, {len(trace['results'])} now" in report["differences"]


def test_a_trace_claiming_another_version_cannot_drop_the_rules_that_fired(medical_config, tmp_path):
    """Untrusted-artifacts audit F1: the whole of the override stage's details (which rule pinned a document) deleted
    from a trace claiming 0.10.0 was a wording note. (A stage's details as such stay a note across versions: a newer
    engine records details for stages that had none.)"""
    trace = _medical_trace(medical_config(), tmp_path / "t.json")
    trace["engine_version"] = "0.10.0"
    overrides = next(s for s in trace["stages"] if s["id"] == "overrides")
    assert overrides["details"]["firings"]
    del overrides["details"]
    report = replay_trace(trace)
    assert not report["identical"]
    assert any(line.startswith("stages[overrides].details: absent in the trace") for line in report["differences"])


def test_a_trace_replays_after_its_config_moved_given_where_it_lies_now(medical_config, tmp_path):
    """Packaging audit F7: a trace records its config's directory and its rule files' paths; a replay after the
    checkout moved (or on an auditor's machine) found no rule file, and with them in place it still differed, on the
    rule files' paths alone. --config-dir says where they lie now; their sha256 is still checked."""
    trace_file = tmp_path / "t.json"
    _medical_trace(medical_config(), trace_file)
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    moved.mkdir()
    for name in ("pipeline.yaml", "access.yaml", "overrides.yaml"):
        shutil.move(tmp_path / name, moved / name)
    lost = _replay_cli(trace_file)
    assert isinstance(lost.exception, TraceError) and "give --config-dir" in str(lost.exception), lost.output
    said = str(lost.exception)  # the errors by setting: no warnings of defaults, no line of a config with none
    assert said.startswith("the trace's config does not compile here (2 errors):\n  stages.0.params.rules: ")
    assert "access.yaml  file not found" in said and "<config in trace" not in said and "replay_trace" not in said
    found = _replay_cli(trace_file, "--config-dir", moved)
    assert found.exit_code == 0 and "identical" in found.output, found.output
    assert f"the config's relative paths were read from {moved}" in " ".join(found.output.split())
    with open(moved / "access.yaml", "a", encoding="utf-8") as edited:
        edited.write("# edited after the trace\n")
    changed = _replay_cli(trace_file, "--config-dir", moved)
    assert changed.exit_code == 1 and "the rule file access.yaml changed since the trace" in changed.output


def test_a_missing_index_asks_for_the_one_the_trace_read_not_a_new_one(medical_config, tmp_path):
    """Older-trace audit F5: `replay --index DIR` naming no index advised building one, which gives another index (a
    difference); the trace needs a copy of the one it read, which replay names by its manifest."""
    trace_file = tmp_path / "t.json"
    trace = _medical_trace(medical_config(), trace_file)
    missing = _replay_cli(trace_file, "--index", tmp_path / "nowhere")
    said = str(missing.exception)
    assert isinstance(missing.exception, TraceError), missing.output
    assert said.startswith(f"--index {tmp_path / 'nowhere'}: no index there; replay needs the index the trace read "
                           f"(manifest {trace['index']['manifest_sha256'][:12]})")
    assert "--keep-previous" in said and "build one" not in said


# ---------------------------------------------------------------------------- 3b. a standalone file and its log


def test_a_logged_trace_file_is_checked_against_its_log_record(medical_config, tmp_path):
    log = tmp_path / "log.jsonl"
    trace_file = tmp_path / "t.json"
    trace = _medical_trace(medical_config(f"{{log: {log}}}"), trace_file)
    assert trace["log"]["path"] == str(log) and trace["log"]["seq"] == 0 and len(trace["log"]["hash"]) == 64
    ok = _replay_cli(trace_file)
    assert ok.exit_code == 0, ok.output
    assert "matches record seq 0 of the trace log" in ok.output and "identical" in ok.output

    forged = json.loads(trace_file.read_text(encoding="utf-8"))
    next(s for s in forged["stages"] if s["id"] == "floor")["drops"][0]["reason"] = "withdrawn_by_legal"
    trace_file.write_text(json.dumps(forged, indent=2), encoding="utf-8")
    refused = _replay_cli(trace_file)
    assert isinstance(refused.exception, TraceError), refused.output
    message = str(refused.exception)
    assert "differs from the record it was logged as" in message and "seq 0" in message
    assert "drops[0].reason" in message and "withdrawn_by_legal" in message
    html = tmp_path / "r.html"
    report = CliRunner().invoke(app, ["report", str(trace_file), "--html", str(html)])
    assert isinstance(report.exception, TraceError) and not html.exists()

    forged = {**trace, "log": {**trace["log"], "hash": "0" * 64}}
    trace_file.write_text(json.dumps(forged), encoding="utf-8")
    refused = _replay_cli(trace_file)
    assert isinstance(refused.exception, TraceError) and "does not match its log record" in str(refused.exception)

    # the log moved: say so, and check against a copy given with --log
    trace_file.write_text(json.dumps(trace), encoding="utf-8")
    moved = tmp_path / "archive.jsonl"
    log.rename(moved)
    refused = _replay_cli(trace_file)
    assert isinstance(refused.exception, TraceError) and "not found here; pass --log" in str(refused.exception)
    assert _replay_cli(trace_file, "--log", moved).exit_code == 0


def test_a_trace_file_that_was_not_logged_replays_as_unverified(medical_config, tmp_path):
    trace_file = tmp_path / "t.json"
    trace = _medical_trace(medical_config(), trace_file)
    assert "log" not in trace
    done = _replay_cli(trace_file)
    assert done.exit_code == 0, done.output
    assert "unverified: this trace file was not logged" in done.output
    as_json = json.loads(_replay_cli(trace_file, "--json").stdout)
    assert as_json["source"]["verified"] is False and as_json["identical"]


# ---------------------------------------------------------------------------- 5. conversation history by hash


def test_history_kept_out_of_the_trace_is_recorded_by_hash_and_given_back_to_replay(bm25_index, write_config,
                                                                                    tmp_path):
    config = write_config(_yaml(bm25_index, trace="{log: null, include_query_text: false}"))
    turns = ["Tell me about homocysteine", "and folate?"]
    trace = Pipeline.from_file(config).search(QUERY, history=turns).trace
    text = json.dumps(trace)
    assert "folate" not in text and trace["query"]["history_turns"] == 2
    assert trace["query"]["history_sha256"] == [hashlib.sha256(t.encode()).hexdigest() for t in turns]
    with pytest.raises(TraceError, match="records 2 earlier conversation turns by their sha256 only.*--history"):
        replay_trace(trace, query_text=QUERY)
    with pytest.raises(TraceError, match="--history turn 2 does not match"):
        replay_trace(trace, query_text=QUERY, history=[turns[0], "and iron?"])
    with pytest.raises(TraceError, match="records 2 earlier conversation turns; 1 --history given"):
        replay_trace(trace, query_text=QUERY, history=turns[:1])
    assert replay_trace(trace, query_text=QUERY, history=turns)["identical"]
    trace_file = tmp_path / "t.json"
    trace_file.write_text(json.dumps(trace), encoding="utf-8")
    done = _replay_cli(trace_file, "--query", QUERY, "--history", turns[0], "--history", turns[1])
    assert done.exit_code == 0 and "identical" in done.output, done.output


# ---------------------------------------------------------------------------- 8. an index rebuilt from the same corpus


def test_an_index_rebuilt_from_the_same_corpus_says_so_and_names_the_components(bm25_index, write_config, tmp_path):
    index = tmp_path / "copy"
    shutil.copytree(bm25_index, index)
    trace = Pipeline.from_file(write_config(_yaml(index))).search(QUERY).trace
    assert len(trace["index"]["corpus_sha256"]) == 64 and set(trace["index"]["component_sha256"]) >= {"bm25"}
    build_index(ROOT / "examples" / "scifact-mini", index, {"bm25": {"k1": 1.2}})
    report = replay_trace(trace)
    [named] = [d for d in report["differences"] if d.startswith("index manifest differs")]
    assert "the corpus is the same" in named and "rebuilt from an identical corpus" in named
    assert "the files of bm25 differ" in named and "documents" not in named


def test_a_record_read_back_from_the_log_replays_whatever_order_the_yaml_wrote_a_mapping_in(bm25_index, write_config,
                                                                                           tmp_path):
    """The log stores keys sorted, so a config compiled from it saw `weights: {rerank, hybrid}` as {hybrid, rerank}
    and the weighted fusion's explanation listed its terms in the other order: every demo query replayed from the
    log was 'different'. Params are compiled with their mappings' keys sorted, whatever the source."""
    log = tmp_path / "log.jsonl"
    pipeline = Pipeline.from_file(write_config(_yaml(bm25_index, trace=f"{{log: {log}}}", stages='''\
  - {id: bm25, type: recall.bm25, params: {top_k: 50}}
  - {id: short, type: recall.bm25, params: {top_k: 10}}
  - {id: rrf, type: fuse.rrf, inputs: [bm25, short]}
  - {id: blend, type: fuse.weighted, inputs: [rrf], params: {weights: {rrf: 0.6, bm25: 0.4}}}
  - {id: final, type: select.top_k, inputs: [blend], params: {k: 5}}''')))
    trace = pipeline.search(QUERY).trace  # search logs it
    fusion = trace["results"][0]["explanation"]["details"][-1]["description"]
    assert "0.4*norm(bm25) + 0.6*norm(rrf)" in fusion, fusion
    replayed = _replay_cli(log, "--seq", 0)
    assert replayed.exit_code == 0, replayed.output
    assert "identical" in replayed.output


def test_what_the_replayed_run_warns_of_and_the_trace_did_not_is_a_note(bm25_index, write_config, tmp_path):
    """From an upgrade audit: an older engine's trace replayed 'different' on an index that the newer engine warns
    was extracted under older rules, and the replay never showed that warning (it was one of the 'fields only one
    records'). A warning the trace does not hold is a note of its own."""
    config = write_config(_yaml(bm25_index, stages="""\
  - {id: bm25, type: recall.bm25, params: {top_k: 50}}
  - {id: dedup, type: dedup.near_duplicate, inputs: [bm25], params: {method: minhash, fields: [text, summary]}}
  - {id: final, type: select.top_k, inputs: [dedup], params: {k: 5}}"""))  # no document has a summary: it warns
    trace = Pipeline.from_file(config).search("vitamin").trace
    assert trace.get("warnings"), "the config was meant to warn"
    warned = list(trace.pop("warnings"))  # as an engine that did not warn of it wrote the trace
    trace["engine_version"] = "0.0.9"
    report = replay_trace(json.loads(json.dumps(trace)))
    assert [n for n in report["notes"] if n.startswith("the replayed run warns: ")] == [
        f"the replayed run warns: {w}" for w in warned]
    trace["warnings"] = warned
    assert not any(n.startswith("the replayed run warns") for n in replay_trace(trace)["notes"])


def test_a_trace_file_holding_text_that_is_not_unicode_is_refused_by_name(bm25_index, write_config, tmp_path):
    """Found after a fuzzing audit: a trace file whose JSON escapes a lone surrogate ("\\ud800", as no trace Sieve
    writes does) made replay and report an internal error (UnicodeEncodeError hashing the config, rendering the
    page); it is refused, naming where."""
    from engine.trace import load_trace

    trace = Pipeline.from_file(write_config(_yaml(bm25_index))).search("vitamin").trace
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**trace, "results": [{**trace["results"][0], "doc_id": "a\ud800"}]}), encoding="ascii")
    with pytest.raises(TraceError, match=r"results\.0\.doc_id: not valid Unicode text \(a lone surrogate U\+D800"):
        load_trace(bad)
    for command in (["replay", str(bad)], ["report", str(bad), "--html", str(tmp_path / "r.html")]):
        result = CliRunner().invoke(app, command)  # the CLI's entry point prints a SieveError as `error: ...`, exit 2
        assert isinstance(result.exception, TraceError), result.output
        assert "is not a readable trace: results.0.doc_id" in str(result.exception)
