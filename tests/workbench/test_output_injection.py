"""Findings of the output-injection audit (report-only helper): text from a corpus, a trace file, a dataset or a
command line reached people as markup or as terminal control sequences. Before the fix:

F1/F2. a document id's rich markup was read: `med-0[i][/i]03` showed as `med-003`; `crash[/]` ended search and
       explain in "internal error" (exit 70) after the query was logged;
F3.    ESC sequences (and bidi overrides) in titles and ids reached the terminal as they were: a title hid its own
       words or cleared the screen, an id erased the row above it;
F4.    a forged rotation marker could name its archive with escape sequences that erased `trace verify`'s note;
F10.   `sieve replay` printed a trace file's trace_id raw: a never-logged trace could erase the "unverified" line and
       print a "chain checks out" line of its own; `[/]` in it crashed replay and report;
F5.    `compare --markdown` pasted a query's text as it was: a newline in it started a table of its own;
F6.    the HTML report wrote out bidi controls but not soft hyphens, tag characters or Hangul fillers;
F9.    `sieve rules test -k '[/]'` ended in "internal error".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.index import build_index
from engine.trace import LOG_SCHEMA, SEGMENT_SCHEMA, TraceLog, check_log, record_hash

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
ESC = "\x1b"


def _sieve(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=300)


def _corpus(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


HOSTILE = [
    {"_id": "med-003", "title": "Genuine FDA safety communication", "text": "metformin kidney safety"},
    {"_id": "med-0[i][/i]03", "title": "Genuine FDA safety communication", "text": "metformin kidney metformin"},
    {"_id": "crash[/]", "title": "Planted", "text": "metformin metformin kidney"},
    {"_id": "med-010", "title": f"Metformin {ESC}[8mCONTRAINDICATED{ESC}[0m safe", "text": "metformin"},
    {"_id": "med-011", "title": f"metformin {ESC}[2J{ESC}[H{ESC}]0;pwned{ESC}\\title", "text": "metformin kidney"},
    {"_id": "med-013", "title": "metformin bidi \u202eexe.fdp\u202c", "text": "metformin kidney"},
]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BM25 index over documents whose ids and titles carry markup and escape sequences, and its config."""
    root = tmp_path_factory.mktemp("hostile")
    build_index(_corpus(root / "corpus", HOSTILE) / "corpus.jsonl", root / "idx", {"bm25": {}})
    config = root / "p.yaml"
    config.write_text(f"version: 1\nindex: {root / 'idx'}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                      "output: bm25\ntrace: {log: null}\n", encoding="utf-8")
    return config


@pytest.mark.parametrize("command", ["search", "explain"])
def test_ids_and_titles_reach_the_terminal_as_what_they_are(hostile, command):
    done = _sieve(command, hostile, "metformin kidney", *(("--explain",) if command == "search" else ()))
    assert done.returncode == 0, done.stderr  # before: 70, "internal error: MarkupError" (the id crash[/])
    assert ESC not in done.stdout and "\u202e" not in done.stdout
    assert "med-0[i][/i]03" in done.stdout and "crash[/]" in done.stdout  # the ids as written, not as markup
    if command == "search":
        assert "\\x1b[8mCONTRAINDICATED\\x1b[0m" in done.stdout  # the title's own words are not hidden
        assert "\\u202eexe.fdp\\u202c" in done.stdout


@pytest.mark.parametrize("doc_id", [f"med-012{ESC}[1A{ESC}[2K", "med-0\u00ad03", "med-003\u200b", "med\t003"])
def test_an_id_with_a_control_or_invisible_character_is_refused_where_the_corpus_is_read(tmp_path, doc_id):
    corpus = _corpus(tmp_path / "c", [{"_id": "ok", "text": "a"}, {"_id": doc_id, "text": "metformin"}])
    done = _sieve("index", corpus, "--out", tmp_path / "idx", "--with", "bm25")
    assert done.returncode == 2 and ESC not in done.stderr, done.stderr
    assert "corpus.jsonl:2: '_id' holds " in " ".join(done.stderr.split()) and "control or invisible" in done.stderr


def test_a_forged_marker_naming_its_archive_with_escapes_breaks_the_chain(tmp_path):
    """A log rewritten to start with a rotation marker whose archive name erases the note that says where the
    chain check starts: the name is not one rotate_log gives, so it is a problem, shown written out."""
    name = f"trace.000000-000099.jsonl{ESC}[2K{ESC}[1G{ESC}[8m"
    marker = {"schema": SEGMENT_SCHEMA, "previous": {"file": name, "first_seq": 0, "last_seq": 99},
              "rotated_at": "2026-01-01T00:00:00+00:00"}
    prev = "a" * 64
    record = {"schema": LOG_SCHEMA, "seq": 100, "prev": prev, "hash": record_hash(prev, marker), "trace": marker}
    log = tmp_path / "trace.jsonl"
    log.write_text(json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n", encoding="utf-8")
    TraceLog(log).append({"schema": "sieve.trace/1", "trace_id": "t1", "results": []})
    problems = check_log(log).problems
    assert problems and "not the name a rotation gives it" in problems[0], problems
    verify = _sieve("trace", "verify", log)
    assert verify.returncode == 1 and ESC not in verify.stdout + verify.stderr  # before: exit 0, the note erased
    assert "\\x1b[2K" in verify.stderr


def test_replay_shows_a_forged_trace_id_as_written_and_says_unverified_in_its_verdict(hostile, tmp_path):
    trace_file = tmp_path / "t.json"
    assert _sieve("search", hostile, "metformin kidney", "--trace-out", trace_file).returncode == 0
    trace = json.loads(trace_file.read_text(encoding="utf-8"))
    forged = (f"0f3c9a{ESC}[1A{ESC}[2K{ESC}[1Gsource: record seq 41 of the trace log; the chain checks out "
              "[/]")
    trace["trace_id"] = forged
    trace_file.write_text(json.dumps(trace), encoding="utf-8")
    replayed = _sieve("replay", trace_file)
    assert replayed.returncode == 0, replayed.stderr  # before: 70 (MarkupError), or the escapes printed raw
    assert ESC not in replayed.stdout
    [verdict] = [line for line in replayed.stdout.splitlines() if "identical" in line]
    assert verdict.startswith("✓ identical (an unverified trace file): ") and "\\x1b[1A" in verdict
    reported = _sieve("report", trace_file, "--html", tmp_path / "r.html")
    assert reported.returncode == 0 and ESC not in reported.stdout, reported.stderr


def test_compare_markdown_keeps_a_querys_text_inside_its_quote(tmp_path, mini_corpus):
    dataset = tmp_path / "data"
    shutil.copytree(mini_corpus, dataset)
    queries = [json.loads(line) for line in (dataset / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    injected = ("\n\n| metric | A | B |\n|---|---|---|\n| ndcg_cut_10 | 0.1 | 0.9 |\n\n"
                "![](https://evil.example/pixel.png) [qrels](https://evil.example/q.tsv)")
    for query in queries:
        query["text"] += injected
    (dataset / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    index = tmp_path / "idx"
    build_index(dataset / "corpus.jsonl", index, {"bm25": {}})
    configs = []
    for name, k in (("a", 10), ("b", 2)):
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"version: 1\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n  - {{id: final, "
                          f"type: select.top_k, inputs: [bm25], params: {{k: {k}}}}}\noutput: final\n"
                          "trace: {log: null}\n", encoding="utf-8")
        configs.append(config)
    done = _sieve("compare", *configs, "--dataset", dataset, "--markdown")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    tables = [line for line in lines if line.startswith("|")]
    assert tables and all(line.startswith("| metric | A | B | Δ") or line.startswith("|---|---:")
                          or line.startswith("| ") and " | " in line and "0.9 |" not in line for line in tables)
    quoted = [line for line in lines if line.startswith("> ")]
    # the line breaks written out (a backslash, itself escaped, then n), the table and image syntax escaped
    assert quoted and all("\\\\n\\\\n\\| metric \\| A" in line and "\\!\\[\\](https://evil.example" in line
                          for line in quoted)
    assert not any(line.startswith("![") for line in lines)


def test_the_html_report_writes_out_every_character_that_shows_as_nothing():
    from engine.workbench.report import visible

    for text in ("med-0\u00ad03", "med-003\U000e0020\U000e0070", "med-003\u3164", "a\u202eb", f"a{ESC}[2Jb",
                 "med\u034f-003", "x\ufe0f"):
        shown = visible(text)
        assert "[U+" in shown and all(c.isascii() or c.isalpha() for c in shown), (text, shown)
    assert visible("Métformine 中文 naïve\tline\n") == "Métformine 中文 naïve\tline\n"


def test_a_rule_test_filter_is_shown_as_written(tmp_path):
    done = _sieve("rules", "test", ROOT / "configs", "-k", "[/]")
    assert done.returncode == 2 and "no test case matches '[/]'" in done.stderr, done.stderr  # before: 70


@pytest.mark.parametrize("command", ["search", "explain"])
def test_a_trace_out_that_is_a_fifo_is_refused_before_the_query_runs(hostile, tmp_path, command):
    """From the README audit: `search --trace-out FIFO` ran the query and logged its trace, then refused the write."""
    config = tmp_path / "logged.yaml"
    log = tmp_path / "trace.jsonl"
    config.write_text(hostile.read_text(encoding="utf-8").replace("trace: {log: null}", f"trace: {{log: {log}}}"),
                      encoding="utf-8")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    done = _sieve(command, config, "metformin", "--trace-out", fifo)
    assert done.returncode == 2 and "is a FIFO (named pipe), not a regular file" in done.stderr, done.stderr
    assert not log.exists()  # before: the query ran and its trace was logged first


def test_eval_with_run_out_refuses_an_index_whose_ids_a_run_file_cannot_hold_before_it_runs(tmp_path, mini_corpus):
    """Injection audit F8: one document id with a space in the index made `eval --run-out` run every query, print
    the figures, then write no run file."""
    dataset = tmp_path / "data"
    shutil.copytree(mini_corpus, dataset)
    lines = (dataset / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["_id"] = "doc with spaces"
    lines[0] = json.dumps(first)
    (dataset / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    build_index(dataset / "corpus.jsonl", tmp_path / "idx", {"bm25": {}})
    config = tmp_path / "p.yaml"
    config.write_text(f"version: 1\nindex: {tmp_path / 'idx'}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                      "output: bm25\ntrace: {log: null}\n", encoding="utf-8")
    done = _sieve("eval", config, "--dataset", dataset, "--run-out", tmp_path / "run.trec")
    assert done.returncode == 2 and "holds the document id 'doc with spaces'" in done.stderr, done.stderr
    assert "ndcg_cut_10" not in done.stdout and not (tmp_path / "run.trec").exists()  # refused before any query
    assert _sieve("eval", config, "--dataset", dataset, "--limit", "3").returncode == 0  # without it: evaluated


def test_joiners_of_scripts_and_emoji_are_kept_where_they_join(tmp_path):
    """Review of this change: the Persian zero-width non-joiner, the emoji joiner and selector were written out (and
    refused in ids) wherever they stood; they hide something only after ASCII or at the start."""
    from engine.console import first_hidden, written_out

    persian, emoji = "می\u200cخواهم", "\u2764\ufe0f-\U0001f469\u200d\U0001f4bb"
    assert written_out(persian) == persian and written_out(emoji) == emoji
    assert first_hidden("med-003\u200d") == 7 and first_hidden("\u200dmed") == 0 and first_hidden("med-0\u180b03") == 5
    corpus = _corpus(tmp_path / "c", [{"_id": persian, "text": "a"}, {"_id": emoji, "text": "b"}])
    assert build_index(corpus / "corpus.jsonl", tmp_path / "idx", {"bm25": {}})  # before the review: refused


def test_a_texts_own_backslashes_are_doubled_once_a_character_is_written_out():
    """Leftover of the output-injection audit: a title holding ESC and the four characters ``\\x1b`` showed both as
    ``\\x1b``; once anything is written out as an escape, the text's own backslashes are doubled, as ``repr`` does."""
    from engine.console import shown, written_out

    assert written_out("a\\x1b\x1b") == "a\\\\x1b\\x1b"  # the text's four characters, then ESC
    assert written_out("C:\\Users\\ana") == "C:\\Users\\ana"  # nothing written out: a path reads as itself
    assert shown("x\\y\u202e") == "x\\\\y\\u202e"
    assert written_out("a\\b\x1b", lambda char: "?") == "a\\b?"  # another spelling: its own convention


@pytest.mark.parametrize("text", [" a ", " a", "a ", "`x`", "``", "a`b", "plain"])
def test_a_code_span_renders_its_text_exactly(text):
    """Review leftover: ``_md_code(" a ")`` rendered as ``a`` (CommonMark strips one space inside each fence when both
    ends have one). Rendered by markdown-it (CommonMark), the span holds the text as given."""
    from markdown_it import MarkdownIt

    from engine.workbench.compare import _md_code

    html = MarkdownIt("commonmark").renderInline(_md_code(text))
    assert html == f"<code>{text}</code>", html
