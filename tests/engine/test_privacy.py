"""Privacy audit (data at rest). F1: under ``include_query_text: false`` a trace kept the query's plain sha256,
which a word list reverses for a short query ("HIV PrEP", "my daughter": all recovered from a log); a key
(``trace.hash_key_env``) makes the hashes HMAC-SHA256. F5: copies of a trace were world-readable (0644) while
the log is 0640."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import ConfigError, TraceError
from engine.pipeline import Pipeline
from engine.replay import replay_trace

KEY = "k" * 32
SIEVE = str(Path(sys.executable).parent / "sieve")


def _config(write_config, bm25_index, log, extra: str = "") -> Pipeline:
    return Pipeline.from_file(write_config(
        f"version: 1\nname: p\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 5}}}}\n"
        f"output: bm25\ntrace: {{log: {log}, include_query_text: false{extra}}}\n"))


def test_a_keyed_trace_records_hmacs_a_word_list_cannot_reverse(write_config, bm25_index, tmp_path, monkeypatch):
    monkeypatch.setenv("SIEVE_TRACE_KEY", KEY)
    pipeline = _config(write_config, bm25_index, tmp_path / "log.jsonl", ", hash_key_env: SIEVE_TRACE_KEY")
    trace = pipeline.search("HIV PrEP", history=["my daughter"], log=True).trace
    recorded = trace["query"]
    plain = hashlib.sha256(b"HIV PrEP").hexdigest()
    assert recorded["text_sha256"] != plain  # before: the plain sha256, found again by hashing candidate words
    assert recorded["text_sha256"] == hmac.new(KEY.encode(), b"HIV PrEP", hashlib.sha256).hexdigest()
    assert recorded["history_sha256"] == [hmac.new(KEY.encode(), b"my daughter", hashlib.sha256).hexdigest()]
    assert recorded["hashed_with"]["key_env"] == "SIEVE_TRACE_KEY" and len(recorded["hashed_with"]["key_id"]) == 16
    assert KEY not in json.dumps(trace)

    assert replay_trace(trace, query_text="HIV PrEP", history=["my daughter"])["identical"]
    with pytest.raises(TraceError, match="does not match"):
        replay_trace(trace, query_text="HIV PEP", history=["my daughter"])
    monkeypatch.setenv("SIEVE_TRACE_KEY", "another key of 32 bytes or more.")
    with pytest.raises(TraceError, match="not the one this trace was written with"):
        replay_trace(trace, query_text="HIV PrEP", history=["my daughter"])
    monkeypatch.delenv("SIEVE_TRACE_KEY")
    with pytest.raises(TraceError, match="SIEVE_TRACE_KEY, which is not set"):
        replay_trace(trace, query_text="HIV PrEP", history=["my daughter"])


def test_a_missing_or_short_key_stops_the_pipeline_at_warm_up(write_config, bm25_index, tmp_path, monkeypatch):
    monkeypatch.delenv("SIEVE_TRACE_KEY", raising=False)
    pipeline = _config(write_config, bm25_index, tmp_path / "log.jsonl", ", hash_key_env: SIEVE_TRACE_KEY")
    with pytest.raises(ConfigError, match="SIEVE_TRACE_KEY, which is not set"):
        pipeline.warm_up()
    monkeypatch.setenv("SIEVE_TRACE_KEY", "short")
    with pytest.raises(ConfigError, match="5 bytes: a query key needs at least 16"):
        _config(write_config, bm25_index, tmp_path / "log.jsonl", ", hash_key_env: SIEVE_TRACE_KEY").warm_up()
    with pytest.raises(ConfigError, match="hash_key_env"):
        _config(write_config, bm25_index, tmp_path / "log.jsonl", ", hash_key_env: 'lower case'")


def test_without_a_key_the_hash_is_plain_sha256_as_before(write_config, bm25_index, tmp_path):
    trace = _config(write_config, bm25_index, tmp_path / "log.jsonl").search("HIV PrEP", log=False).trace
    assert trace["query"]["text_sha256"] == hashlib.sha256(b"HIV PrEP").hexdigest()
    assert "hashed_with" not in trace["query"]


def test_copies_of_a_trace_are_made_0640_like_the_log(tmp_path, monkeypatch):
    """F5: --trace-out, the HTML report, eval's and batch's outputs were 0644 under umask 022 (the log 0640)."""
    from engine.trace import TraceLog, write_json_atomic, write_text_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "trace.json", {"a": 1})
        write_text_atomic(tmp_path / "report.html", "<p>")
        TraceLog(tmp_path / "log.jsonl").append({"schema": "sieve.trace/1"})
        (tmp_path / "kept.json").write_text("{}")
        os.chmod(tmp_path / "kept.json", 0o600)
        write_json_atomic(tmp_path / "kept.json", {"b": 2})  # an existing file keeps its mode
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"trace.json": 0o640, "report.html": 0o640, "log.jsonl": 0o640, "kept.json": 0o600}, modes


@pytest.mark.parametrize("quoted", ["b'Zo\\xc3\\xab M\\xc3\\xbcller'", "Zo\\u00eb M\\u00fcller", "Zo\\xeb", "Zo%C3%AB",
                                    "Zoe\u0308 Mu\u0308ller", "Zoë Müller"])
def test_a_stage_message_quoting_the_query_escaped_is_withheld(quoted):
    """F6: the redaction of a stage's error message (a plugin's, a library's) missed the query's words escaped (bytes,
    \\u escapes, URL encoding) or decomposed: 5 of 6 forms got through."""
    from engine.model import Query
    from engine.pipeline import _without_query_words

    query = Query.create("Zoë Müller kidney dose")
    kept = _without_query_words(f"lookup failed for {quoted} in table x", query)
    assert quoted not in kept and "Zo" not in kept and "xc3" not in kept.lower() and "%C3" not in kept, kept
    assert _without_query_words("connection refused by host db-1", query) == "connection refused by host db-1"


def test_replay_reads_only_the_key_variable_the_config_names(write_config, bm25_index, tmp_path, monkeypatch):
    """Review of this change: replay read whatever variable a trace's hashed_with named, so a crafted trace could make
    it print a key id of any environment variable (offline guessing of a weak secret)."""
    monkeypatch.setenv("SIEVE_TRACE_KEY", KEY)
    pipeline = _config(write_config, bm25_index, tmp_path / "log.jsonl", ", hash_key_env: SIEVE_TRACE_KEY")
    trace = pipeline.search("HIV PrEP", log=False).trace
    for name, says in (("PATH", "names PATH, its config SIEVE_TRACE_KEY"), ("lower case", "not one this engine reads")):
        crafted = json.loads(json.dumps(trace))
        crafted["query"]["hashed_with"]["key_env"] = name
        with pytest.raises(TraceError, match=says):
            replay_trace(crafted, query_text="HIV PrEP")


# Privacy leftover: the query and the conversation could be given only on the command line, which every user of the
# machine reads (ps, /proc/PID/cmdline) and shells keep in their history; they can now come from standard input (-)
# and a file (--history-file), for search, explain and replay alike.

def _sieve(*args: str, stdin: bytes = b"", cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([SIEVE, *args], input=stdin, capture_output=True, cwd=cwd, env=env, timeout=300)


def test_the_query_and_its_conversation_can_stay_off_the_command_line(write_config, bm25_index, tmp_path):
    log = tmp_path / "log.jsonl"
    config = write_config(
        f"version: 1\nname: p\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 5}}}}\n"
        f"output: bm25\ntrace: {{log: {log}, include_query_text: false}}\n")
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps(["my daughter's diagnosis", "HIV PrEP"]), encoding="utf-8")
    ran = _sieve("search", str(config), "-", "--history-file", str(turns), "--json", stdin="is it safe?\n".encode())
    assert ran.returncode == 0, ran.stderr.decode()
    recorded = json.loads(ran.stdout)["trace"]["query"]
    assert recorded["text_sha256"] == hashlib.sha256(b"is it safe?").hexdigest()  # one final line break removed
    assert recorded["history_sha256"] == [hashlib.sha256(t.encode()).hexdigest()
                                          for t in ("my daughter's diagnosis", "HIV PrEP")]

    replayed = _sieve("replay", str(log), "--query", "-", "--history-file", str(turns), stdin=b"is it safe?")
    assert replayed.returncode == 0 and b"identical" in replayed.stdout, replayed.stdout + replayed.stderr
    wrong = _sieve("replay", str(log), "--query", "-", "--history-file", str(turns), stdin=b"is it risky?")
    assert wrong.returncode == 2 and b"does not match" in wrong.stderr, wrong.stderr
    explained = _sieve("explain", str(config), "-", "--history", "HIV PrEP", "--json", stdin="it\u2019s safe?".encode())
    assert explained.returncode == 0, explained.stderr.decode()


@pytest.mark.parametrize(("args", "stdin", "said"), [
    (("-",), b"\xff\xfe", "the query (QUERY) (standard input) is not UTF-8 text (byte 0)"),
    (("-", "--history-file", "-"), b"[]", "QUERY and --history-file both read standard input"),
    (("q", "--history-file", "-", "--history", "a"), b"[]", "--history and --history-file together"),
    (("q", "--history-file", "-"), b'{"turns": ["a"]}', "must be a JSON array of strings"),
    (("q", "--history-file", "-"), b"[1, 2", "--history-file (standard input): not JSON"),
    (("q", "--history-file", "nowhere.json"), b"", "--history-file (nowhere.json): cannot read it (No such file"),
    (("q", "--history-file", "/dev/zero"), b"", "--history-file (/dev/zero) is over 64 MiB: nothing was run"),
])
def test_a_query_or_conversation_read_wrong_is_said_before_anything_runs(write_config, bm25_index, tmp_path,
                                                                          args, stdin, said):
    log = tmp_path / "log.jsonl"
    config = write_config(f"version: 1\nindex: {bm25_index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                          f"output: bm25\ntrace: {{log: {log}}}\n")
    ran = _sieve("search", str(config), *args, stdin=stdin, cwd=tmp_path)
    assert ran.returncode == 2, ran.stderr.decode()
    assert said in " ".join(ran.stderr.decode().split()) and b"Traceback" not in ran.stderr
    assert not log.exists()  # nothing ran, nothing logged
