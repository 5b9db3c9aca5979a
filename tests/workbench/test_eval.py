"""sieve eval: pytrec_eval parity on a fixed run, latency figures, run files, precise errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import SieveError
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


# ---------------------------------------------------------------------------- evaluation audit


def _tied(n: int = 12) -> dict[str, float]:
    return {f"d{i:02d}": 1.0 for i in range(n)}


def test_tied_scores_rank_as_trec_eval_ranks_them_in_mrr_and_run_files(tmp_path: Path):
    """trec_eval breaks score ties by document id descending; MRR@10's cut and written runs must agree."""
    from engine.evaluation import per_query_metrics, write_trec_run

    for relevant, expected_rr, expected_mrr10 in (("d11", 1.0, 1.0), ("d00", 1 / 12, 0.0)):
        qrels = {"q": {relevant: 1}}
        reference = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "ndcg_cut.10"}).evaluate({"q": _tied()})["q"]
        figures = per_query_metrics({"q": _tied()}, qrels)["q"]
        assert figures["recip_rank"] == pytest.approx(reference["recip_rank"]) == pytest.approx(expected_rr)
        assert figures["ndcg_cut_10"] == pytest.approx(reference["ndcg_cut_10"])
        assert figures["mrr_10"] == pytest.approx(expected_mrr10), relevant  # was 0.0 for d11 (ties cut ascending)
    from engine.evaluation import trec_order

    assert [d for d, _ in trec_order({"a": 1.0, "B": 1.0, "é": 1.0, "z": 2.0})] == ["z", "é", "a", "B"]

    run_file = tmp_path / "ties.trec"
    write_trec_run({"q": _tied()}, run_file, tag="t")
    lines = run_file.read_text().splitlines()
    assert lines[0] == "q Q0 d11 1 1.000000 t" and lines[-1] == "q Q0 d00 12 1.000000 t"
    # read back, the file ranks the same for trec_eval and for Sieve
    assert [line.split()[2] for line in lines] == [d for d, _ in trec_order(read_trec_run(run_file)["q"])]


def test_sieve_runs_keep_their_scores_and_figures(tmp_path: Path):
    """Rank-derived scores (no ties) are written as before; a score six decimals would merge keeps its digits."""
    from engine.evaluation import write_trec_run

    write_trec_run({"2": {"b": 2.0, "a": 1.0}, "10": {"x": 1.0}}, tmp_path / "r.trec", tag="bm25")
    assert (tmp_path / "r.trec").read_text() == ("10 Q0 x 1 1.000000 bm25\n2 Q0 b 1 2.000000 bm25\n"
                                                 "2 Q0 a 2 1.000000 bm25\n")
    write_trec_run({"q": {"a": 0.1234561, "b": 0.1234564}}, tmp_path / "fine.trec")
    assert read_trec_run(tmp_path / "fine.trec") == {"q": {"a": 0.1234561, "b": 0.1234564}}


def test_duplicate_documents_in_a_run_or_qrels_are_refused_with_both_lines(tmp_path: Path, mini_corpus: Path):
    from engine.errors import SieveError

    run = tmp_path / "dup.trec"
    run.write_text("q1 Q0 d1 1 5 x\nq1 Q0 d2 2 4 x\nq2 Q0 d1 1 3 x\nq1 Q0 d1 3 3 x\n")
    with pytest.raises(SieveError, match=rf"dup.trec:4: document 'd1' is listed a second time for query 'q1' "
                                         rf"\(first at {run}:1\)"):
        read_trec_run(run)
    data = _dataset(tmp_path, mini_corpus, qrels=b"query-id\tcorpus-id\tscore\n1\td1\t2\n3\td9\t1\n1\td1\t0\n")
    with pytest.raises(SieveError, match=r"test.tsv:4: query '1' judges document 'd1' a second time \(first at "
                                         r".*test.tsv:2\)"):
        load_beir(data)


def test_trec_qrels_are_read_as_trec_and_named(cli_json, cli, mini_config, mini_corpus: Path, tmp_path: Path):
    """qid iter docid rel (tab or space separated): columns 0, 2, 3; a file mixing 3 and 4 fields is refused."""
    from engine.errors import SieveError

    TREC_QRELS = "TREC (qid iter docid rel)"
    rows = [line.split("\t") for line in (mini_corpus / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    tabs = _dataset(tmp_path / "tabs", mini_corpus, qrels="".join(f"{q}\t0\t{d}\t{g}\n" for q, d, g in rows).encode())
    spaces = _dataset(tmp_path / "spaces", mini_corpus, qrels="".join(f"{q} 0 {d} {g}\n" for q, d, g in rows).encode())
    beir = load_beir(mini_corpus)
    for data in (tabs, spaces):
        loaded = load_beir(data)
        assert loaded.qrels == beir.qrels and loaded.qrels_format == TREC_QRELS  # was {'1': {'0': 31715818}}
    assert beir.qrels_format.startswith("BEIR")
    config = mini_config()
    assert cli_json("eval", config, "--dataset", tabs)["metrics"] == cli_json("eval", config, "--dataset", mini_corpus)["metrics"]
    table = cli("eval", config, "--dataset", spaces, "--limit", "2")
    assert table.exit_code == 0 and "qrels: TREC (qid iter docid rel)" in table.stdout
    assert cli_json("eval", config, "--dataset", spaces, "--limit", "2")["qrels_format"] == TREC_QRELS
    mixed = _dataset(tmp_path / "mixed", mini_corpus, qrels=b"1\t0\t31715818\t1\n\n3\t14717500\t1\n")
    with pytest.raises(SieveError, match=r"test.tsv:3: 3 fields, but .*test.tsv:1 has 4"):
        load_beir(mixed)


def test_a_byte_order_mark_is_not_part_of_the_first_line(cli_json, mini_config, mini_corpus: Path, tmp_path: Path):
    bom = "\ufeff"
    data = _dataset(tmp_path, mini_corpus, qrels=(bom + (mini_corpus / "qrels" / "test.tsv").read_text()).encode(),
                    queries=bom + (mini_corpus / "queries.jsonl").read_text())
    loaded = load_beir(data)  # was: queries.jsonl:1: expected a JSON object with _id and text
    assert loaded.qrels == load_beir(mini_corpus).qrels and loaded.queries == load_beir(mini_corpus).queries
    run = tmp_path / "bom.trec"
    run.write_text(bom + "q1 Q0 d1 1 2 x\nq1 Q0 d2 2 1 x\n")
    assert read_trec_run(run) == {"q1": {"d1": 2.0, "d2": 1.0}}  # was {"\ufeffq1": {"d1": 2.0}, "q1": {"d2": 1.0}}
    config = mini_config()
    assert cli_json("eval", config, "--dataset", data)["metrics"] == cli_json("eval", config, "--dataset", mini_corpus)["metrics"]


def test_an_unwritable_run_out_is_refused_before_the_evaluation(mini_config, mini_corpus: Path, tmp_path: Path):
    too_long = tmp_path / ("x" * 300 + ".trec")
    done = run_sieve("eval", mini_config(), "--dataset", mini_corpus, "--run-out", too_long)
    assert done.returncode == 2 and f"--run-out {too_long}: File name too long" in done.stderr
    assert "internal error" not in done.stderr and "ndcg_cut_10" not in done.stdout  # refused before any work
    (tmp_path / "afile").write_text("x")
    under_file = run_sieve("eval", mini_config(), "--dataset", mini_corpus, "--json-out", tmp_path / "afile" / "r.json")
    assert under_file.returncode == 2 and "is a file, not a directory" in under_file.stderr


def test_a_failed_write_keeps_the_printed_figures_and_the_old_file(cli, mini_config, mini_corpus: Path, tmp_path: Path,
                                                                   monkeypatch):
    """A full disk while writing --run-out: the metrics are already printed, the error names the file and the OS's
    reason, the file that was there is intact and no temporary file is left behind."""
    import errno
    import os

    from engine.errors import SieveError

    run_out = tmp_path / "runs" / "new.trec"
    run_out.parent.mkdir()
    run_out.write_text("previous run\n")
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    try:
        result = cli("eval", mini_config(), "--dataset", mini_corpus, "--limit", "3", "--run-out", run_out)
    finally:
        monkeypatch.setattr(os, "fsync", real_fsync)
    assert "ndcg_cut_10" in result.stdout and "mrr_10" in result.stdout  # the figures came first
    assert isinstance(result.exception, SieveError), result.exception  # not an internal error
    message = str(result.exception)
    assert f"could not write --run-out {run_out}: No space left on device" in message
    assert run_out.read_text() == "previous run\n" and os.listdir(run_out.parent) == ["new.trec"]


def test_outputs_write_through_symlinks_and_never_replace_special_files(mini_config, mini_corpus: Path, tmp_path: Path):
    import os
    import stat

    from engine.errors import SieveError
    from engine.trace import write_json_atomic

    target = tmp_path / "target.json"
    target.write_text("{}")
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target.name)
    write_json_atomic(link, {"a": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}  # the link was replaced by a file
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(SieveError, match="is a FIFO"):
        write_json_atomic(fifo, {"a": 1})
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == [
        "fifo.json", "link.json", "target.json"]

    config = mini_config()
    for option in ("--run-out", "--json-out"):
        done = run_sieve("eval", config, "--dataset", mini_corpus, "--limit", "2", option, fifo)
        assert done.returncode == 2 and f"{option} {fifo} is a FIFO" in done.stderr, done.stderr
        assert stat.S_ISFIFO(fifo.stat().st_mode)
    run_target = tmp_path / "target.trec"
    run_target.write_text("old\n")
    (tmp_path / "link.trec").symlink_to(run_target)
    done = run_sieve("eval", config, "--dataset", mini_corpus, "--limit", "2", "--run-out", tmp_path / "link.trec",
                     "--json-out", link)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "link.trec").is_symlink() and link.is_symlink()
    assert read_trec_run(run_target).keys() == {"1", "3"} and json.loads(target.read_text())["queries"] == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"_id": "3", "text": null}', "2: query 3: text must be a string, got null"),
        ('{"_id": "3", "text": ""}', "2: query 3: query is empty"),
        ('{"_id": "3", "text": 42}', "2: query 3: text must be a string, got a number"),
        ('{"_id": "3", "text": ["a"]}', "2: query 3: text must be a string, got an array"),
        ('{"_id": "1", "text": "again"}', "2: query id '1' appears a second time (first at"),
    ],
)
def test_bad_queries_are_refused_at_load_with_their_line(mini_config, mini_corpus: Path, tmp_path: Path, line: str,
                                                         message: str):
    """Found when the data set is read, not when the pipeline reaches the query (a long eval lost otherwise)."""
    lines = (mini_corpus / "queries.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["_id"] == "3"
    lines[1] = line
    data = _dataset(tmp_path, mini_corpus, queries="\n".join(lines) + "\n")
    done = run_sieve("eval", mini_config(), "--dataset", data)
    assert done.returncode == 2 and f"queries.jsonl:{message}" in done.stderr, done.stderr
    assert "eval pipeline.yaml" not in done.stderr  # refused before the pipeline ran a query


def test_a_missing_data_set_or_split_says_what_is_there(mini_corpus: Path, tmp_path: Path):
    """Error-message audit C10: a mistyped --dataset was reported as a missing split ('no judgements for split
    test: .../qrels/test.tsv does not exist'), and a missing split did not say which splits there are."""
    with pytest.raises(SieveError, match="^no data set at .*scifct: no such directory$"):
        load_beir(tmp_path / "scifct")
    with pytest.raises(SieveError, match="is a data set's qrels directory: give the data set's own directory"):
        load_beir(mini_corpus / "qrels")
    with pytest.raises(SieveError, match="no judgements for split 'dev': .* does not exist; the splits there: test$"):
        load_beir(mini_corpus, "dev")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SieveError, match="has no qrels/<split>.tsv at all"):
        load_beir(tmp_path / "empty")


def test_blank_lines_are_skipped_in_qrels_and_queries_alike(mini_corpus: Path, tmp_path: Path):
    qrels = (mini_corpus / "qrels" / "test.tsv").read_text().replace("\n", "\n\n", 3)
    queries = (mini_corpus / "queries.jsonl").read_text().replace("\n", "\n  \n", 2)
    loaded = load_beir(_dataset(tmp_path, mini_corpus, qrels=qrels.encode(), queries=queries))
    assert loaded.qrels == load_beir(mini_corpus).qrels and loaded.queries == load_beir(mini_corpus).queries


def test_eval_discloses_what_the_means_include(mini_config, mini_corpus: Path, tmp_path: Path):
    """Judged queries with no relevant document (they score 0) and relevant documents the index lacks are said."""
    qrels = (mini_corpus / "qrels" / "test.tsv").read_text()
    qrels = qrels.replace("\n1\t31715818\t1\n", "\n1\t31715818\t0\n") + "3\tNOT_IN_INDEX\t2\n"
    data = _dataset(tmp_path, mini_corpus, qrels=qrels.encode())
    done = run_sieve("eval", mini_config(), "--dataset", data, "--json")
    assert done.returncode == 0, done.stderr
    judgements = json.loads(done.stdout)["judgements"]
    assert judgements["judged_queries"] == 50 and judgements["queries_without_relevant"] == 1
    assert judgements["relevant_not_in_index"] == 1 and judgements["run_queries_not_judged"] == 0
    assert judgements["examples"]["relevant_not_in_index"] == {"query": "3", "doc_id": "NOT_IN_INDEX"}
    assert "warning: 1 of the 50 judged queries have no relevant document" in done.stderr
    assert "1 of the" in done.stderr and "relevant documents are not in the index" in done.stderr
    clean = run_sieve("eval", mini_config(), "--dataset", mini_corpus, "--limit", "3", "--json")
    assert "warning" not in clean.stderr and json.loads(clean.stdout)["judgements"]["queries_without_relevant"] == 0


def test_write_trec_run_refuses_ids_a_run_line_cannot_hold(tmp_path: Path):
    from engine.errors import SieveError
    from engine.evaluation import write_trec_run

    for run, what in (({"q 1": {"d": 1.0}}, "query id 'q 1'"), ({"q": {"doc\t1": 1.0}}, r"document id 'doc\\t1'")):
        with pytest.raises(SieveError, match=what):
            write_trec_run(run, tmp_path / "r.trec")
        assert not (tmp_path / "r.trec").exists()


def test_limit_takes_ids_in_natural_order_and_split_is_a_plain_name(cli, cli_json, mini_config, mini_corpus: Path):
    report = cli_json("eval", mini_config(), "--dataset", mini_corpus, "--limit", "4", "--per-query")
    assert list(report["per_query"]) == ["1", "3", "5", "13"]  # was 1, 100, 113, 115 (string order)
    assert list(load_beir(mini_corpus).queries)[:5] == ["1", "3", "5", "13", "36"]
    import typer

    from engine.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name in ("eval", "compare"):
        limit = next(p for p in commands[name].params if p.name == "limit")
        assert "natural order of id (2 before 10" in limit.help
    done = run_sieve("eval", mini_config(), "--dataset", mini_corpus, "--split", "../qrels/test")
    assert done.returncode == 2 and "split must be a plain name" in done.stderr
