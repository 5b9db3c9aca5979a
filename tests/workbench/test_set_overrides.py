"""`--set PATH=VALUE` on search, explain, eval and compare: one machine's settings without editing the file.

The trace records the overrides beside the config they produced, and replays as that config; a bad override is
named by its setting, and an error in the file itself keeps its file:line."""

from __future__ import annotations

import json

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


def test_an_override_is_read_as_a_config_file_is_yaml_1_2(mini_config):
    """`NO` (Norway) stays text, `no` is no switch, `010` is ten and `1_0` no number: as in the file itself (the
    override was read as YAML 1.1, where they are false, false, eight and ten)."""
    from engine.pipeline import Pipeline

    config = mini_config(k=10)
    routed = Pipeline.from_file(config, settings=[
        "stages.bm25.when={field: user.jurisdictions, op: contains, value: NO}"])
    result = routed.search("vitamin D", log=False, user={"jurisdictions": ["NO"]})
    record = next(s for s in result.trace["stages"] if s["id"] == "bm25")
    assert record["status"] == "ok" and "'NO'" in record["when"]["condition"]
    ten = Pipeline.from_file(config, settings=["stages.final.params.k=010"])
    assert next(s for s in ten.compiled.canonical["stages"] if s["id"] == "final")["params"]["k"] == 10
    for setting, says in (("stages.final.enabled=no", "expected true or false, not text"),
                          ("stages.final.params.k=1_0", "expected a number, not text")):
        failed = run_sieve("search", config, "vitamin D", "--set", setting, "--no-log")
        assert failed.returncode != 0 and says in failed.stderr, failed.stderr


def test_an_override_that_breaks_the_config_is_located_at_the_setting_not_the_files_line(mini_config, write_config):
    """The error was located at the file's line of the value it replaced (k: 10), or at line 1 for a new key, and
    with `extends` at the base file, which does not hold the value at all."""
    config = mini_config(k=10)
    bad = run_sieve("search", config, "vitamin D", "--set", "stages.final.params.k=-1", "--no-log")
    assert bad.returncode != 0
    assert "--set stages.final.params.k  stages.1.params.k: Input should be greater than or equal to 1" in bad.stderr
    assert f"{config}:" not in bad.stderr
    new_key = run_sieve("search", config, "vitamin D", "--set", "trce.log=x", "--no-log")
    assert "--set trce.log  trce: unknown field 'trce' (did you mean 'trace'?)" in new_key.stderr
    child = write_config(f"extends: {config.name}\nstages:\n  - {{id: final, params: {{k: 5}}}}\n", "child.yaml")
    based = run_sieve("search", child, "vitamin D", "--set", "stages.bm25.params.top_k=-5", "--no-log")
    assert "--set stages.bm25.params.top_k  stages.0.params.top_k" in based.stderr
    whole = run_sieve("search", config, "vitamin D", "--set", "stages.final=5", "--no-log")
    assert "name a setting inside the stage" in whole.stderr
    # an error the file itself holds keeps its file:line
    broken = write_config(config.read_text(encoding="utf-8").replace("{k: 10}", "{k: 0}"), "broken.yaml")
    kept = run_sieve("search", broken, "vitamin D", "--set", "stages.bm25.params.top_k=5", "--no-log")
    assert f"{broken}:" in kept.stderr and "stages.1.params.k" in kept.stderr


def test_compare_and_eval_say_the_settings_they_ran_with_and_which_config_one_fails(cli, mini_config, mini_corpus,
                                                                                    write_config):
    a, b = mini_config(k=10, name="a.yaml"), mini_config(k=5, name="b.yaml")
    compared = cli("compare", a, b, "-d", mini_corpus, "--limit", "3", "--set", "stages.bm25.params.top_k=50",
                   "--json")
    assert compared.exit_code == 0, compared.output
    assert json.loads(compared.stdout)["settings"] == ["stages.bm25.params.top_k=50"]
    text = cli("compare", a, b, "-d", mini_corpus, "--limit", "3", "--set", "stages.bm25.params.top_k=50")
    assert "both configs with --set stages.bm25.params.top_k=50" in " ".join(text.stdout.split())
    evaluated = cli("eval", a, "-d", mini_corpus, "--limit", "3", "--set", "stages.final.params.k=3")
    assert "with --set stages.final.params.k=3" in " ".join(evaluated.stdout.split())
    # a setting only one of the two configs can take: the error says which
    other = write_config(a.read_text(encoding="utf-8").replace("id: final", "id: last").replace(
        "output: final", "output: last"), "other.yaml")
    failed = run_sieve("compare", a, other, "-d", mini_corpus, "--limit", "3", "--set", "stages.final.params.k=3")
    assert failed.returncode != 0 and f"B ({other}): --set stages.final.params.k: the config has no stage 'final'" \
        in " ".join(failed.stderr.split()), failed.stderr


def test_validate_takes_set_and_a_set_value_is_located_by_its_setting(tmp_path):
    """Error-message audit: `sieve validate` took no --set, so a variant could be checked only by running it; and a
    --set value was located as `--set PATH:1:1`, a line and column of the command-line value that read as a file's."""
    from tests.workbench.conftest import ROOT

    demo = ROOT / "configs" / "demo.yaml"
    done = run_sieve("validate", demo, "--set", "stages.final.params.k=0")
    assert done.returncode == 2 and "--set stages.final.params.k  stages.8.params.k: " in done.stderr, done.stderr
    assert ":1:1" not in done.stderr
    fine = run_sieve("validate", demo, "--set", "stages.final.params.k=3")
    assert fine.returncode == 0 and "✓" in fine.stdout, fine.stderr
