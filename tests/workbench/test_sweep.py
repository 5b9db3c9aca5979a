"""sieve sweep: tuning by configuration over a grid of settings, on a real BM25 index of the SciFact slice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from engine.errors import SieveError
from engine.workbench.evaluate import evaluate_pipeline
from engine.workbench.sweep import Setting, apply_setting, parse_setting, sweep, write_best
from tests.workbench.conftest import run_sieve

CONFIG = """\
version: 1
index: {index}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 100}}}}
  - {{id: final, type: select.top_k, inputs: [bm25], params: {{k: {k}}}}}
output: final
trace: {{log: null}}
"""


@pytest.fixture
def config(bm25_index, write_config) -> Path:
    return write_config(CONFIG.format(index=bm25_index, k=10))


@pytest.fixture
def short_config(bm25_index, write_config) -> Path:
    """Returns 3 documents: keeping 10 scores higher."""
    return write_config(CONFIG.format(index=bm25_index, k=3), "short.yaml")


def test_a_grid_is_evaluated_next_to_the_config_as_written_best_first(config, mini_corpus):
    settings = [parse_setting("stages.final.params.k=[1, 3, 10]"), parse_setting("stages.bm25.params.top_k=[3, 100]")]
    report = sweep(config, mini_corpus, settings, split="test", allow_test=True)
    assert len(report.variants) == 6 and report.baseline.settings == {}
    scores = [v.metrics["ndcg_cut_10"] for v in report.variants]
    assert scores == sorted(scores, reverse=True)
    best = report.best
    # each variant is the config with those settings: evaluated on its own, it scores the same
    as_written = evaluate_pipeline(config, mini_corpus, split="test")
    assert report.baseline.metrics["ndcg_cut_10"] == pytest.approx(as_written.metrics["ndcg_cut_10"])
    assert best.settings == {"stages.final.params.k": 10, "stages.bm25.params.top_k": 100}
    assert best.config_sha256 == report.baseline.config_sha256  # the same config as written
    worst = report.variants[-1]
    assert worst.settings["stages.final.params.k"] == 1 and worst.metrics["ndcg_cut_10"] < best.metrics["ndcg_cut_10"]
    assert report.best_vs_baseline["difference"] == 0.0
    document = report.to_json()
    assert document["settings"] == {"stages.final.params.k": [1, 3, 10], "stages.bm25.params.top_k": [3, 100]}
    assert "optimistic estimate" in document["note"] and len(document["variants"]) == 6
    json.dumps(document)


def test_the_best_config_is_written_beside_the_original_and_scores_what_the_sweep_said(short_config, mini_corpus):
    report = sweep(short_config, mini_corpus, [parse_setting("stages.final.params.k=[2, 10]")], split="test",
                   allow_test=True)
    assert report.improves
    out = short_config.with_name("best.yaml")
    write_best(report, short_config, out)
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# sieve sweep: short.yaml with stages.final.params.k=10\n")
    assert "its comments and YAML anchors are not kept" in text
    assert yaml.safe_load(text)["stages"][1]["params"]["k"] == 10
    again = evaluate_pipeline(out, mini_corpus, split="test")
    assert again.metrics["ndcg_cut_10"] == pytest.approx(report.best.metrics["ndcg_cut_10"])
    with pytest.raises(SieveError, match="exists already: give a new file name"):
        write_best(report, short_config, out)  # never over a file, a config least of all
    with pytest.raises(SieveError, match="write it beside"):
        write_best(report, short_config, short_config.parent / "sub" / "best.yaml")


def test_a_grid_that_does_not_beat_the_config_as_written_writes_nothing(config, mini_corpus):
    """The best of a grid worse than the config as written was written out as 'best config'."""
    report = sweep(config, mini_corpus, [parse_setting("stages.final.params.k=[1, 3]")], split="test",
                   allow_test=True)
    assert not report.improves and report.best.metrics["ndcg_cut_10"] < report.baseline.metrics["ndcg_cut_10"]
    assert any("no variant scores above the config as written" in w for w in report.warnings())
    out = config.with_name("best.yaml")
    with pytest.raises(SieveError, match="no variant scores above the config as written .*nothing written"):
        write_best(report, config, out)
    assert not out.exists()


def test_a_variant_that_sets_the_index_runs_on_that_index(short_config, mini_corpus, tmp_path):
    """`--set index=...` was ignored: every variant ran on the config's index."""
    from engine.index import build_index

    half = tmp_path / "half"
    half.mkdir()
    lines = (mini_corpus / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    (half / "corpus.jsonl").write_text("\n".join(lines[::2]) + "\n", encoding="utf-8")
    build_index(half, tmp_path / "half-index", {"bm25": {}})
    report = sweep(short_config, mini_corpus, [parse_setting(f"index=[{tmp_path / 'half-index'}]")], split="test",
                   allow_test=True)
    (variant,) = report.variants
    assert variant.metrics["ndcg_cut_10"] < report.baseline.metrics["ndcg_cut_10"]  # half the documents are gone
    with pytest.raises(SieveError, match="--set index and --index together"):
        sweep(short_config, mini_corpus, [parse_setting("index=[x]")], split="test", allow_test=True,
              index_path=tmp_path / "half-index")


def test_every_variant_is_checked_before_any_query_runs(config, mini_corpus):
    ran = []
    with pytest.raises(SieveError, match="1 of 3 variants are not valid configs \\(nothing was run\\)") as caught:
        sweep(config, mini_corpus, [parse_setting("stages.final.params.k=[2, -1, 5]")], split="test",
              allow_test=True, on_variant=lambda *args: ran.append(args))
    said = str(caught.value)
    assert ran == [] and "stages.1.params.k: " in said and said.endswith("(stages.final.params.k=-1)")
    assert ":1:1" not in said  # no made-up file:line for a variant that exists in no file


def test_a_problem_every_variant_shares_is_said_once(config, mini_corpus):
    """Error-message audit: a mistyped parameter in the grid printed the same error once per value."""
    with pytest.raises(SieveError) as caught:
        sweep(config, mini_corpus, [parse_setting("stages.bm25.params.topk=[5, 10, 20, 40]")], split="test",
              allow_test=True)
    lines = str(caught.value).splitlines()
    assert lines[0] == "4 of 4 variants are not valid configs (nothing was run):"
    assert len(lines) == 2 and "unknown field 'topk' (did you mean 'top_k'?)" in lines[1]
    assert lines[1].endswith("(every variant)")


def test_a_variant_that_fails_at_run_time_is_reported_and_the_others_are_ranked(config, mini_corpus):
    report = sweep(config, mini_corpus, [parse_setting("limits.max_query_chars=[20, 4096]")], split="test",
                   allow_test=True)
    ok, failed = report.variants
    assert ok.settings == {"limits.max_query_chars": 4096} and ok.error is None
    assert failed.error is not None and "characters long" in failed.error
    assert any(w.startswith("variant limits.max_query_chars=20 failed:") for w in report.warnings())
    assert report.to_json()["variants"][1]["error"] == failed.error


def test_a_huge_grid_is_refused_before_anything_is_built(config, mini_corpus):
    big = [parse_setting(f"stages.bm25.params.top_k=[{', '.join(str(i) for i in range(1, 101))}]"),
           parse_setting(f"stages.final.params.k=[{', '.join(str(i) for i in range(1, 101))}]"),
           parse_setting(f"executor.max_workers=[{', '.join(str(i) for i in range(1, 65))}]")]
    with pytest.raises(SieveError, match="640000 combinations .* is more than 200"):
        sweep(config, mini_corpus, big, split="test", allow_test=True)


def test_tuning_on_the_test_split_is_refused_unless_asked_for(config, mini_corpus):
    with pytest.raises(SieveError, match="refusing to tune on the 'test' split"):
        sweep(config, mini_corpus, [parse_setting("stages.final.params.k=[2, 5]")], split="test")


def test_models_and_components_are_loaded_once_for_every_variant(config, mini_corpus, monkeypatch):
    from engine.index import Index

    opened = []
    real_open = Index.open

    def counting(*args, **kwargs):
        opened.append(args)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Index, "open", counting)
    sweep(config, mini_corpus, [parse_setting("stages.final.params.k=[1, 2, 3]")], split="test", allow_test=True,
          limit=2)
    assert len(opened) == 1


@pytest.mark.parametrize(("text", "says"), [
    ("stages.final.params.k", "--set takes PATH=VALUES"),
    ("=3", "--set takes PATH=VALUES"),
    ("stages.final.params.k=[]", "an empty list tries nothing"),
    ("stages.final.params.k=[1, 1]", "a value is listed twice"),
    ("stages.final.params.k=[1, 2", "the values are not YAML"),
])
def test_a_malformed_setting_says_what_is_wrong(text, says):
    with pytest.raises(SieveError, match=says):
        parse_setting(text)


def test_a_setting_that_names_nothing_fails_before_anything_runs(config, mini_corpus):
    with pytest.raises(SieveError, match="the config has no stage 'finl' \\(did you mean 'final'\\?\\)"):
        sweep(config, mini_corpus, [parse_setting("stages.finl.params.k=[2, 5]")], split="test", allow_test=True)
    with pytest.raises(SieveError, match="--metric ndcg_at_10 is not a measure sweep computes \\(did you mean 'ndcg_cut_10'"):
        sweep(config, mini_corpus, [parse_setting("stages.final.params.k=[2]")], split="test", allow_test=True,
              metric="ndcg_at_10")


@pytest.mark.parametrize(("text", "says"), [
    ("stages.final.params.k=", "gives no value"),
    ("stages.final=5", "name a setting inside the stage"),
    ("stages.final.id=[a, b]", "a stage's id names it"),
    ("trace.log=[a.jsonl, b.jsonl]", "does not change what a query returns"),
    ("description=x", "does not change what a query returns"),
    ("stages.final.params.k=[10, 10.0]", "a value is listed twice"),
])
def test_a_setting_that_could_not_mean_anything_is_refused(text, says):
    with pytest.raises(SieveError, match=says):
        parse_setting(text)


def test_apply_setting_creates_a_param_left_at_its_default_and_refuses_a_path_through_a_value():
    data = yaml.safe_load(CONFIG.format(index="x", k=10))
    apply_setting(data, "stages.bm25.params.query", "both")
    apply_setting(data, "executor.deadline_ms", 500)
    assert data["stages"][0]["params"] == {"top_k": 100, "query": "both"} and data["executor"] == {"deadline_ms": 500}
    with pytest.raises(SieveError, match="stages.bm25.params.top_k is 100, not a mapping"):
        apply_setting(data, "stages.bm25.params.top_k.x", 1)
    assert Setting("a", (1,)) == parse_setting("a=1")


def test_the_cli_prints_the_grid_and_writes_the_best_config(short_config, mini_corpus):
    from typer.testing import CliRunner

    from engine.cli import app

    best = short_config.with_name("best.yaml")
    args = ["sweep", str(short_config), "--dataset", str(mini_corpus), "--split", "test", "--allow-test",
            "--set", "stages.final.params.k=[1, 10]", "--best-out", str(best)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "2 variants and the config as written, by ndcg_cut_10" in done.output
    assert "(as written)" in done.output and "best vs as written: +0." in done.output
    assert "optimistic estimate" in done.output and f"best config written to {best}" in done.output
    assert yaml.safe_load(best.read_text(encoding="utf-8"))["stages"][1]["params"]["k"] == 10
    again = CliRunner().invoke(app, args)  # best.yaml exists now: refused before the sweep runs
    assert again.exit_code == 1 and "exists already" in str(again.exception) and "variants" not in again.output
    as_json = CliRunner().invoke(app, [*args[:-2], "--json"])
    assert json.loads(as_json.stdout)["best"]["settings"] == {"stages.final.params.k": 10}
    refused = CliRunner().invoke(app, ["sweep", str(short_config), "--dataset", str(mini_corpus), "--split", "test",
                                       "--set", "stages.final.params.k=[1, 10]"])
    assert refused.exit_code == 1 and "refusing to tune on the 'test' split" in str(refused.exception)


def test_what_warm_up_finds_is_a_sweep_warning_once_and_per_variant_where_only_it_has_it(bm25_index, write_config,
                                                                                         mini_corpus):
    """sweep printed no warm-up warning at all (a cap on a field no document has: every variant capped nothing)."""
    capped = write_config(CONFIG.format(index=bm25_index, k="10, max_per: {field: sourc, n: 1}"), "capped.yaml")
    report = sweep(capped, mini_corpus, [parse_setting("stages.final.params.max_per.field=[sourc, titel]")],
                   split="test", allow_test=True)
    warnings = report.warnings()
    assert sum("max_per.field 'sourc'" in w for w in warnings) == 1  # the config as written's, once
    (variant,) = [w for w in warnings if "'titel'" in w]
    assert variant.startswith('variant stages.final.params.max_per.field="titel": stage ' + "'final': max_per.field")
    assert "(did you mean 'title'?)" in variant
    assert report.to_json()["warnings"] == warnings


def test_a_sweep_table_keeps_each_settings_stage_id(config, mini_corpus):
    """`stages.a.enabled` and `stages.b.enabled` were both headed 'enabled'."""
    from engine.cli import _setting_label

    assert _setting_label("stages.rerank.enabled") == "rerank.enabled"
    assert _setting_label("stages.dedup.params.threshold") == "dedup.threshold"
    assert _setting_label("stages.blend.params.weights.rerank") == "blend.weights.rerank"
    assert _setting_label("executor.deadline_ms") == "executor.deadline_ms"
    result = run_sieve("sweep", config, "-d", mini_corpus, "--split", "test", "--allow-test", "--limit", "3",
                       "--set", "stages.final.params.k=[3, 10]", "--set", "stages.bm25.params.top_k=[50, 100]")
    assert result.returncode == 0, result.stderr
    assert "final.k" in result.stdout and "bm25.top_k" in result.stdout
