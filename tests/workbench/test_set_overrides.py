"""`--set PATH=VALUE` on search, explain, eval and compare: one machine's settings without editing the file.

The trace records the overrides beside the config they produced, and replays as that config; a bad override is
named by its setting, and an error in the file itself keeps its file:line."""

from __future__ import annotations

import json
from pathlib import Path

from engine.replay import replay_trace
from tests.workbench.conftest import run_sieve


def test_search_with_set_runs_and_traces_the_overridden_config(cli, mini_config, tmp_path):
    config = mini_config(k=10)
    result = cli("search", config, "vitamin D", "--set", "stages.final.params.k=3", "--no-log", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert len(document["results"]) == 3
    trace = document["trace"]
    assert trace["config"]["set"] == ["stages.final.params.k=3"]
    final = next(s for s in trace["config"]["resolved"]["stages"] if s["id"] == "final")
    assert final["params"]["k"] == 3
    plain = json.loads(cli("search", config, "vitamin D", "--no-log", "--json").stdout)
    assert "set" not in plain["trace"]["config"] and plain["trace"]["config"]["sha256"] != trace["config"]["sha256"]
    replayed = replay_trace(trace)
    assert replayed["identical"], replayed["differences"]


def test_eval_and_explain_take_set(cli, cli_json, mini_config, mini_corpus):
    config = mini_config(k=10)
    report = cli_json("eval", config, "-d", mini_corpus, "--limit", "3", "--set", "stages.final.params.k=1")
    assert report["settings"] == ["stages.final.params.k=1"]
    explained = cli("explain", config, "vitamin D", "--set", "stages.final.params.k=2", "--json")
    assert explained.exit_code == 0 and len(json.loads(explained.stdout)["results"]) == 2


def test_a_bad_override_is_named_and_a_bad_value_is_a_config_error(mini_config):
    config = mini_config(k=10)

    def cli(*args):  # the real entry point: errors become messages and an exit status
        result = run_sieve(*args)
        result.output = result.stdout + result.stderr
        result.exit_code = result.returncode
        return result

    unknown = cli("search", config, "vitamin D", "--set", "stages.finl.params.k=3", "--no-log")
    assert unknown.exit_code != 0 and "no stage 'finl'" in unknown.output and "did you mean 'final'" in unknown.output
    malformed = cli("search", config, "vitamin D", "--set", "stages.final.params.k", "--no-log")
    assert malformed.exit_code != 0 and "PATH=VALUE" in malformed.output
    twice = cli("search", config, "vitamin D", "--set", "stages.final.params.k=3", "--set", "stages.final.params.k=4")
    assert twice.exit_code != 0 and "given twice" in twice.output
    wrong = cli("search", config, "vitamin D", "--set", "stages.final.params.k=many", "--no-log")
    assert wrong.exit_code != 0 and "stages.1.params.k" in wrong.output and "integer" in wrong.output
