"""sieve eval: pytrec_eval parity on a fixed run, latency figures, run files, precise errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.evaluation import load_beir, read_trec_run
from tests.workbench.conftest import run_sieve

pytrec_eval = pytest.importorskip("pytrec_eval")


def test_eval_metrics_match_pytrec_eval_on_the_saved_run(cli_json, mini_config, mini_corpus: Path, tmp_path: Path):
    config = mini_config(recall_top_k=100, k=100)
    run_file = tmp_path / "bm25.trec"
    report = cli_json("eval", config, "--dataset", mini_corpus, "--run-out", run_file, "--recall-k", "20")
    assert report["queries"] == 50 and report["run_file"] == str(run_file)
    metrics = report["metrics"]
    assert set(metrics) == {"ndcg_cut_10", "recall_20", "recall_100", "map", "recip_rank", "mrr_10"}

    # Independently: the saved run through pytrec_eval, straight from its own API.
    run = read_trec_run(run_file)
    qrels = load_beir(mini_corpus, "test").qrels
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.20,100", "map", "recip_rank"})
    per_query = evaluator.evaluate(run)
    for name in ("ndcg_cut_10", "recall_20", "recall_100", "map", "recip_rank"):
        expected = sum(per_query[q][name] for q in qrels) / len(qrels)
        assert metrics[name] == pytest.approx(expected, abs=1e-6), name
    # MRR@10: reciprocal rank of the run cut at 10 (documents beyond rank 10 earn nothing).
    cut = {q: dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:10]) for q, d in run.items()}
    rr10 = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    assert metrics["mrr_10"] == pytest.approx(sum(rr10[q]["recip_rank"] for q in qrels) / len(qrels), abs=1e-6)
    # The slice is easy for BM25, and the figure is stable: a regression guard, not a tautology.
    assert 0.85 < metrics["ndcg_cut_10"] < 0.95


def test_eval_reports_latency_overall_and_per_stage(cli_json, mini_config, mini_corpus: Path):
    report = cli_json("eval", mini_config(), "--dataset", mini_corpus, "--limit", "7")
    assert report["queries"] == 7 and report["latency_ms"]["count"] == 7
    assert set(report["stage_latency_ms"]) == {"bm25", "final"}
    for figures in [report["latency_ms"], *report["stage_latency_ms"].values()]:
        assert 0 <= figures["p50"] <= figures["p95"]
    assert report["stage_latency_ms"]["bm25"]["type"] == "recall.bm25@1"
    assert report["index"]["doc_count"] == 601 and len(report["config_sha256"]) == 64


def test_eval_table_is_the_default_output(cli, mini_config, mini_corpus: Path):
    result = cli("eval", mini_config(), "--dataset", mini_corpus, "--limit", "3")
    assert result.exit_code == 0, result.output
    for text in ("ndcg_cut_10", "mrr_10", "recall_100", "map", "p95", "bm25", "total"):
        assert text in result.stdout


def test_eval_json_out_and_per_query(cli_json, mini_config, mini_corpus: Path, tmp_path: Path):
    saved = tmp_path / "report.json"
    report = cli_json("eval", mini_config(), "--dataset", mini_corpus, "--limit", "4", "--per-query",
                      "--json-out", saved)
    assert json.loads(saved.read_text())["metrics"] == report["metrics"]
    assert len(report["per_query"]) == 4


def test_eval_trace_log_holds_every_query_and_replays(cli_json, mini_config, mini_corpus: Path, tmp_path: Path):
    from engine.replay import replay_trace
    from engine.trace import TraceLog

    log = tmp_path / "eval-traces.jsonl"
    report = cli_json("eval", mini_config(), "--dataset", mini_corpus, "--limit", "5", "--trace-log", log)
    assert report["trace_log"] == str(log)
    records = [record["trace"] for record in TraceLog(log).records()]
    assert len(records) == 5
    queries = load_beir(mini_corpus, "test").queries
    assert [r["query"]["text"] for r in records] == list(queries.values())[:5]
    assert run_sieve("trace", "verify", log).returncode == 0
    assert replay_trace(records[0])["identical"]
    # without --trace-log, nothing is written anywhere
    assert cli_json("eval", mini_config(), "--dataset", mini_corpus, "--limit", "2")["trace_log"] is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--split", "dev"], "no judgements for split 'dev'"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--recall-k", "0"], "--recall-k must be at least 1"),
    ],
)
def test_eval_bad_input_is_a_message_not_a_traceback(mini_config, mini_corpus: Path, extra: list[str], message: str):
    done = run_sieve("eval", mini_config(), "--dataset", mini_corpus, *extra)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_eval_names_a_data_set_without_queries(mini_config, tmp_path: Path, mini_corpus: Path):
    (tmp_path / "data" / "qrels").mkdir(parents=True)
    (tmp_path / "data" / "qrels" / "test.tsv").write_text((mini_corpus / "qrels" / "test.tsv").read_text())
    done = run_sieve("eval", mini_config(), "--dataset", tmp_path / "data")
    assert done.returncode == 2 and "no queries for split 'test'" in done.stderr and "Traceback" not in done.stderr


def _dataset(tmp_path: Path, mini_corpus: Path, qrels: bytes | None = None, queries: str | None = None) -> Path:
    data = tmp_path / "data"
    (data / "qrels").mkdir(parents=True)
    (data / "qrels" / "test.tsv").write_bytes(qrels if qrels is not None else (mini_corpus / "qrels" / "test.tsv").read_bytes())
    (data / "queries.jsonl").write_text(queries if queries is not None else (mini_corpus / "queries.jsonl").read_text())
    return data


def test_eval_refuses_what_would_measure_nothing_and_names_the_query(mini_config, tmp_path: Path, mini_corpus: Path):
    empty = run_sieve("eval", mini_config(), "--dataset", _dataset(tmp_path / "a", mini_corpus, qrels=b"query-id\tcorpus-id\tscore\n"))
    assert empty.returncode == 2 and "no judged queries in" in empty.stderr
    binary = run_sieve("eval", mini_config(), "--dataset", _dataset(tmp_path / "b", mini_corpus, qrels=b"q\td\t1\n\x97\xff\n"))
    assert binary.returncode == 2 and "test.tsv:2: not UTF-8 text (byte 0x97)" in binary.stderr
    first = json.loads((mini_corpus / "queries.jsonl").read_text().splitlines()[0])
    lines = (mini_corpus / "queries.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**first, "text": "  "})
    blank = run_sieve("eval", mini_config(), "--dataset", _dataset(tmp_path / "c", mini_corpus, queries="\n".join(lines) + "\n"))
    assert blank.returncode == 2 and f"query {first['_id']}: query is empty" in blank.stderr


def test_compare_warns_about_a_run_that_ranks_only_some_queries(mini_corpus: Path, tmp_path: Path):
    run = (mini_corpus / "qrels" / "test.tsv").read_text().splitlines()[1:]
    full = [f"{q} Q0 {d} 1 1.0 t" for q, d, _ in (line.split("\t") for line in run)]
    (tmp_path / "a.trec").write_text("\n".join(full) + "\n")
    (tmp_path / "b.trec").write_text(full[0] + "\n")
    done = run_sieve("compare", tmp_path / "a.trec", tmp_path / "b.trec", "--dataset", mini_corpus)
    assert done.returncode == 0 and "warning: run b.trec ranks nothing for" in done.stderr
    (tmp_path / "c.trec").write_text(full[0].replace(" 1 1.0 ", " one nan ") + "\n")
    bad = run_sieve("compare", tmp_path / "a.trec", tmp_path / "c.trec", "--dataset", mini_corpus)
    assert bad.returncode == 2 and "c.trec:1: rank 'one' must be an integer" in bad.stderr
    folder = run_sieve("compare", tmp_path / "a.trec", tmp_path, "--dataset", mini_corpus)
    assert folder.returncode == 2 and "is a directory, not a file" in folder.stderr


def test_eval_against_an_index_holding_none_of_the_judged_documents_is_refused(mini_config, mini_corpus, tmp_path):
    from engine.index import build_index

    other = tmp_path / "other"
    (other / "c").mkdir(parents=True)
    (other / "c" / "corpus.jsonl").write_text('{"_id": "x1", "title": "t", "text": "vitamin d"}\n')
    build_index(other / "c", other / "idx", {"bm25": {}})
    done = run_sieve("eval", mini_config(), "--dataset", mini_corpus, "--index", other / "idx")
    assert done.returncode == 2 and "relevant documents judged in" in done.stderr and "is in the index" in done.stderr
