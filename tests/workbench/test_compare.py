"""sieve compare: deltas with paired significance tests, wins/losses/ties, explained document moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workbench.conftest import run_sieve

pytest.importorskip("pytrec_eval")
stats = pytest.importorskip("scipy.stats")

FLOOR = "  - {id: floor, type: select.threshold, inputs: [bm25], params: {min_score: 0.5, normalize: max}}\n"


def test_compare_two_configs(cli_json, mini_config, mini_corpus: Path):
    a = mini_config(k=10, name="wide.yaml")
    b = mini_config(k=5, name="narrow.yaml", extra=FLOOR)
    report = cli_json("compare", a, b, "--dataset", mini_corpus, "--most-changed", "3")
    assert report["queries"] == 50
    metrics = {m["metric"]: m for m in report["metrics"]}
    ndcg = metrics["ndcg_cut_10"]
    assert ndcg["delta"] == pytest.approx(ndcg["mean_b"] - ndcg["mean_a"])
    assert ndcg["delta"] < 0  # cutting to 5 behind a floor can only lose relevant documents here
    assert ndcg["wins"] + ndcg["losses"] + ndcg["ties"] == 50 and ndcg["wins"] == 0 and ndcg["losses"] > 0
    assert 0 < ndcg["t_test_p"] <= 1 and 0 < ndcg["randomisation_p"] <= 1
    assert "ttest_rel" in report["tests"]["t_test"] and "permutation_test" in report["tests"]["randomisation"]

    changed = report["most_changed"]
    assert 1 <= len(changed) <= 3
    first = changed[0]
    assert first["ndcg_cut_10_b"] < first["ndcg_cut_10_a"]
    # Every document that left B's list is explained by the stage of B that dropped it.
    gone = [m for m in first["moves"] if m["rank_b"] is None]
    assert gone
    for move in gone:
        assert any("dropped by stage 'final'" in r or "dropped by stage 'floor'" in r for r in move["reasons"]), move


def test_compare_significance_matches_scipy(cli_json, mini_config, mini_corpus: Path, tmp_path: Path):
    """The p-values are scipy's on the per-query figures (no hand-rolled statistics)."""
    import numpy as np

    from engine.evaluation import load_beir, per_query_metrics, read_trec_run

    run_a, run_b = tmp_path / "a.trec", tmp_path / "b.trec"
    cli_json("eval", mini_config(k=10, name="a.yaml"), "--dataset", mini_corpus, "--run-out", run_a)
    cli_json("eval", mini_config(k=3, name="b.yaml"), "--dataset", mini_corpus, "--run-out", run_b)
    report = cli_json("compare", run_a, run_b, "--dataset", mini_corpus, "--most-changed", "1",
                      "--config-b", tmp_path / "b.yaml")
    qrels = load_beir(mini_corpus).qrels
    per_a = per_query_metrics(read_trec_run(run_a), qrels)
    per_b = per_query_metrics(read_trec_run(run_b), qrels)
    qids = sorted(qrels)
    x = np.array([per_a[q]["ndcg_cut_10"] for q in qids])
    y = np.array([per_b[q]["ndcg_cut_10"] for q in qids])
    ndcg = next(m for m in report["metrics"] if m["metric"] == "ndcg_cut_10")
    assert ndcg["t_test_p"] == pytest.approx(stats.ttest_rel(y, x).pvalue)
    assert ndcg["mean_a"] == pytest.approx(x.mean()) and ndcg["mean_b"] == pytest.approx(y.mean())
    # B's config reproduces its run file, so its side of the moves is explained; A (a bare run) is not.
    moves = report["most_changed"][0]["moves"]
    assert report["most_changed"][0]["note"] is None
    assert any("B: dropped by stage 'final'" in r for m in moves for r in m["reasons"])


def test_compare_identical_runs_have_no_difference(cli_json, mini_config, mini_corpus: Path, tmp_path: Path):
    run = tmp_path / "same.trec"
    cli_json("eval", mini_config(), "--dataset", mini_corpus, "--run-out", run, "--limit", "10")
    report = cli_json("compare", run, run, "--dataset", mini_corpus, "--limit", "10")
    for metric in report["metrics"]:
        assert metric["delta"] == 0 and metric["ties"] == 10
        assert metric["t_test_p"] == 1.0 and metric["randomisation_p"] == 1.0
    assert report["most_changed"] == []


def test_compare_markdown_and_table(cli, mini_config, mini_corpus: Path):
    a, b = mini_config(k=10, name="a.yaml"), mini_config(k=2, name="b.yaml")
    markdown = cli("compare", a, b, "--dataset", mini_corpus, "--markdown")
    assert markdown.exit_code == 0, markdown.output
    assert "| ndcg_cut_10 |" in markdown.stdout and "paired randomisation test" in markdown.stdout
    assert "moved" in markdown.stdout and f"sieve compare {a} {b} --dataset {mini_corpus}" in markdown.stdout
    table = cli("compare", a, b, "--dataset", mini_corpus, "--limit", "10")
    assert table.exit_code == 0 and "p(rand)" in table.stdout and "ndcg_cut_10" in table.stdout


def test_compare_and_sweep_say_in_words_whether_the_difference_is_significant():
    """p-values alone invited over-reading: a sweep's "best" at p 0.34 was written out as if it were better."""
    from engine.cli import _verdict

    assert _verdict(0.0094, 0.34, "the best variant", "the config as written") == (
        "not significant at 0.05 (p 0.34): the difference may be chance; keep the config as written unless more "
        "queries confirm it")
    assert _verdict(0.061, 0.0004, "B", "A") == "B is better (significant at 0.05, randomisation test)"
    assert _verdict(-0.061, 0.0004, "B", "A").startswith("A is better")
    assert _verdict(0.0, None, "B", "A") == "no difference to test"


def test_the_compare_table_ends_with_the_verdict(cli, mini_config, mini_corpus: Path):
    a, b = mini_config(k=10, name="a.yaml"), mini_config(k=2, name="b.yaml")
    table = cli("compare", a, b, "--dataset", mini_corpus, "--limit", "10")
    assert table.exit_code == 0 and "ndcg_cut_10: " in table.stdout
    assert "significant at 0.05" in " ".join(table.stdout.split())


def test_compare_rejects_a_run_with_no_judged_query(mini_corpus: Path, tmp_path: Path):
    from tests.workbench.conftest import run_sieve

    bogus = tmp_path / "bogus.trec"
    bogus.write_text("nope Q0 doc 1 1.0 x\n")
    done = run_sieve("compare", bogus, bogus, "--dataset", mini_corpus)
    assert done.returncode == 2 and "none of its 1 queries is judged" in done.stderr
    broken = tmp_path / "broken.trec"
    broken.write_text("1 Q0 doc 1\n")
    done = run_sieve("compare", broken, bogus, "--dataset", mini_corpus)
    assert done.returncode == 2 and "a TREC run line has 6 fields" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------- evaluation audit


def _ties_dataset(tmp_path: Path) -> Path:
    data = tmp_path / "ties"
    (data / "qrels").mkdir(parents=True)
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\td00\t1\n")
    (data / "queries.jsonl").write_text('{"_id": "q", "text": "tie"}\n')
    return data


def test_compare_ranks_tied_documents_as_trec_eval_does(cli_json, tmp_path: Path):
    """A: twelve documents tied at 1.0 (trec_eval ranks d11 first, d00 twelfth); B lifts d00 to the top. The
    nDCG@10 change (0 -> 1) must come with its document moves, ranked as trec_eval ranked them."""
    data = _ties_dataset(tmp_path)
    docs = [f"d{i:02d}" for i in range(12)]
    (tmp_path / "a.trec").write_text("".join(f"q Q0 {d} {r} 1.0 a\n" for r, d in enumerate(docs, start=1)))
    (tmp_path / "b.trec").write_text("".join(f"q Q0 {d} {r} {2.0 if d == 'd00' else 1.0} b\n"
                                             for r, d in enumerate(docs, start=1)))
    report = cli_json("compare", tmp_path / "a.trec", tmp_path / "b.trec", "--dataset", data)
    ndcg = next(m for m in report["metrics"] if m["metric"] == "ndcg_cut_10")
    mrr = next(m for m in report["metrics"] if m["metric"] == "mrr_10")
    assert (ndcg["mean_a"], ndcg["mean_b"]) == (0.0, 1.0) and (mrr["mean_a"], mrr["mean_b"]) == (0.0, 1.0)
    moves = {m["doc_id"]: (m["rank_a"], m["rank_b"]) for m in report["most_changed"][0]["moves"]}
    assert moves["d00"] == (12, 1)  # was no move at all: both sides ranked ties by ascending id
    assert moves["d11"] == (1, 2) and moves["d02"] == (10, 11)


def test_compare_refuses_a_limit_below_one(mini_corpus: Path, tmp_path: Path):
    from tests.workbench.conftest import run_sieve

    run = tmp_path / "r.trec"
    run.write_text("1 Q0 31715818 1 1.0 x\n3 Q0 14717500 1 1.0 x\n")
    for value in ("-1", "0"):
        done = run_sieve("compare", run, run, "--dataset", mini_corpus, "--limit", value)
        assert done.returncode == 2 and f"--limit must be at least 1, got {value}" in done.stderr, done.stderr


def test_compare_discloses_unjudged_run_queries_and_duplicate_lines(mini_corpus: Path, mini_config, tmp_path: Path):
    import json

    from tests.workbench.conftest import run_sieve

    good = tmp_path / "a.trec"
    good.write_text("1 Q0 31715818 1 1.0 x\n3 Q0 14717500 1 1.0 x\n")
    extra = tmp_path / "b.trec"
    extra.write_text("1 Q0 31715818 1 1.0 x\nnot-judged Q0 31715818 1 1.0 x\n")
    done = run_sieve("compare", good, extra, "--dataset", mini_corpus, "--json")
    assert done.returncode == 0, done.stderr
    judgements = json.loads(done.stdout)["judgements"]
    assert judgements["run_queries_not_judged_a"] == 0 and judgements["run_queries_not_judged_b"] == 1
    assert judgements["queries_without_relevant"] == 0 and judgements["relevant_not_in_index"] is None  # no index
    assert "run b.trec: 1 of its 2 queries are not in the qrels (e.g. 'not-judged')" in done.stderr
    # with a config, the index it searched is checked for the relevant documents
    with_index = run_sieve("compare", mini_config(), good, "--dataset", mini_corpus, "--json", "--limit", "3")
    assert json.loads(with_index.stdout)["judgements"]["relevant_not_in_index"] == 0, with_index.stderr
    duplicated = tmp_path / "dup.trec"
    duplicated.write_text("1 Q0 31715818 1 2.0 x\n1 Q0 31715818 2 1.0 x\n")
    refused = run_sieve("compare", good, duplicated, "--dataset", mini_corpus)
    assert refused.returncode == 2 and f"dup.trec:2: document '31715818' is listed a second time for query '1' " \
                                       f"(first at {duplicated}:1)" in refused.stderr


def test_both_sides_are_checked_before_either_runs(mini_config, mini_corpus: Path, write_config, tmp_path: Path):
    """Error-message audit C8: B's config error (or a missing B) was found only after A's whole evaluation (minutes
    with a reranker). Here A could not even run (no index at its path): B's error is what is said."""
    unrunnable = write_config("version: 1\nindex: /nonexistent/index\nstages:\n"
                              "  - {id: bm25, type: recall.bm25, params: {top_k: 10}}\noutput: bm25\n", "a.yaml")
    typo = write_config("version: 1\nindex: /nonexistent/index\nstages:\n"
                        "  - {id: bm25, type: recall.bm25, params: {topk: 10}}\noutput: bm25\n", "b.yaml")
    done = run_sieve("compare", unrunnable, typo, "--dataset", mini_corpus)
    assert done.returncode == 2 and "b.yaml:4:" in done.stderr and "topk" in done.stderr, done.stderr
    assert "no index" not in done.stderr
    missing = run_sieve("compare", unrunnable, tmp_path / "b.yml", "--dataset", mini_corpus)
    assert missing.returncode == 2 and "b.yml" in missing.stderr and "no index" not in missing.stderr, missing.stderr
