"""Replay a traced query: same config (embedded in the trace), same index, same ``as_of``.

The replay re-runs the query and compares everything a re-run must reproduce, not only the final ranking:
every stage's output ids and scores, drops, decisions, details (rules fired) and rewritten query, and every
result's ledger and explanation tree. Only volatile fields are left out: timings and durations, the trace id,
the time it was written, where it was logged, and a reranker's score-cache counters.

Each difference comes with its cause where one can be named: another index manifest (rebuilt from the same
corpus or not, and which components' files changed; with what to pass as ``--index``, naming the copy
``sieve index --keep-previous`` kept of the traced index where there is one), a config that differs, a rule, glossary or gazetteer
file whose content changed (by its recorded sha256), a model with other weights or run at another precision.
What does not make a replay differ is reported as a note: the engine's version, settings a newer engine
adds at their defaults (they change the config's sha256 but not what ran), and, for a trace another engine
version wrote, prose worded differently (descriptions, decision details) and fields only one of the two
engines records; ids, scores and the values of fields both record must still be the same. An index rebuilt
from the same corpus with the same components and settings whose files differ only in their bytes (a
build before builds were deterministic) is a note too, when every result, score and stage output is
reproduced exactly; anything else about another index is a difference.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from engine import __version__
from engine.compiler import canonical_json, compile_data
from engine.errors import ConfigError, TraceError
from engine.model import KEY_ENV_NAME, Query, QueryKeyError, UserContext, key_id, query_key, text_digest
from engine.pipeline import Pipeline

MAX_DETAILED = 20  # path-by-path differences listed before "… and N more"

# Fields that differ between two runs of the same query by nature; never compared.
VOLATILE_KEYS = frozenset({"started_ms", "duration_ms", "timings_ms", "timing_ms", "trace_id", "created_at",
                           "host", "hostname", "pid", "log"})
# Inside a stage's details: a reranker's score-cache counters (warm or cold cache) and the rule files' loader
# warnings (they name the file's path and judge expiry against the wall clock).
VOLATILE_DETAILS = frozenset({"cache", "rule_warnings"})
# Machine-specific locations: a replay on another machine, or of a moved config, finds the same content elsewhere.
LOCATION_KEYS = frozenset({"file", "location", "path", "dir", "rules_file"})  # each file's content: by its sha256
# What a model identity records of the machine rather than of the model: compared for a note, not a difference
MACHINE_KEYS = frozenset({"threads"})
# Prose a newer engine may word differently: across engine versions a change here is a note, not a difference
WORDING_KEYS = frozenset({"description", "detail", "message", "condition"})
# What every engine version has recorded (0.1.0 on) wherever it applies: one side without it is a difference whatever
# version a trace claims (the version is a field of the trace like any other: an edited trace claiming another
# version had its drops, rule firings, ledgers and explanation trees deleted and still replayed "identical", each
# absence a mere note). Not `details` and `decisions` as such: a newer engine records them for stages that had none.
RECORDED_BY_EVERY_VERSION = frozenset({"drops", "ledger", "explanation", "firings"})


def _recorded_by_every_version(key: str, value: Any) -> bool:
    """Whether a field one side lacks is one every version records: those above, and a stage's details holding rule
    firings (deleting the whole of an override stage's details hid which rule pinned a document)."""
    return key in RECORDED_BY_EVERY_VERSION or key == "details" and isinstance(value, dict) and bool(value.get("firings"))
MAX_WORDING_NOTED = 8


def _digester(recorded: dict[str, Any], trace: dict[str, Any]) -> Any:
    """How the trace hashed its texts: plain sha256, or HMAC-SHA256 under the key in the environment variable it
    names (``hashed_with``; the key must be the one recorded by its id)."""
    hashed = recorded.get("hashed_with")
    configured = (((trace.get("config") or {}).get("resolved") or {}).get("trace") or {}).get("hash_key_env")
    if not hashed:
        if configured is not None:  # the replayed pipeline would key its hashes with whatever variable that names
            raise TraceError(f"the trace's config names trace.hash_key_env {configured!r}, but its query hashes are "
                             "not keyed (no query.hashed_with): not a trace Sieve wrote")
        return lambda text: text_digest(text, None)
    if not isinstance(hashed, dict) or hashed.get("algorithm") != "hmac-sha256" or not isinstance(
            hashed.get("key_env"), str) or not KEY_ENV_NAME.fullmatch(hashed["key_env"]):
        # a name as trace.hash_key_env allows it: a crafted trace must not have replay read any variable
        raise TraceError(f"the trace's query.hashed_with is not one this engine reads: {hashed!r}")
    if configured is not None and configured != hashed["key_env"]:
        raise TraceError(f"the trace's query.hashed_with names {hashed['key_env']}, its config {configured}")
    try:
        key = query_key(hashed["key_env"])
    except QueryKeyError as exc:
        raise TraceError(f"this trace's query hashes are keyed (trace.hash_key_env): {exc}") from None
    if key_id(key) != hashed.get("key_id"):
        raise TraceError(f"the key in {hashed['key_env']} is not the one this trace was written with (key id "
                         f"{hashed.get('key_id')}): set the key the log was written with")  # the other's id not said
    return lambda text: text_digest(text, key)


def _recorded_query(trace: dict[str, Any], query_text: str | None, history: list[str] | None,
                    notes: list[str]) -> Query:
    recorded = trace.get("query") or {}
    text = recorded.get("text")
    if text is None:
        if query_text is None:
            raise TraceError(
                "this trace stores only the query's sha256 (trace.include_query_text is off); "
                "pass the original text with --query"
            )
        text = query_text
    digest = _digester(recorded, trace)
    if digest(text) != recorded.get("text_sha256"):
        raise TraceError("the query text does not match the sha256 recorded in the trace")
    turns = _recorded_history(recorded, history, notes, digest)
    try:
        return Query(
            text=text,
            history=turns,
            user=UserContext.model_validate(recorded.get("user") or {}),
            as_of=datetime.fromisoformat(recorded["as_of"]),
            language=recorded.get("language"),
        )
    except (KeyError, ValueError) as exc:
        raise TraceError(f"the trace's query record is malformed: {exc}") from None


def _recorded_history(recorded: dict[str, Any], given: list[str] | None, notes: list[str],
                      digest: Any) -> tuple[str, ...]:
    """The conversation's earlier turns: stored in the trace, or given (``--history``) and checked against the
    sha256 of each turn the trace records when it does not store their text."""
    if "history" in recorded:
        stored = tuple(recorded.get("history") or ())
        if given and tuple(given) != stored:
            raise TraceError("the trace stores its conversation history, and --history differs from it; "
                             "leave --history out to replay the recorded turns")
        return stored
    count = recorded.get("history_turns") or 0
    hashes = recorded.get("history_sha256")
    if not count:
        if given:
            raise TraceError(f"the trace records no conversation history, but {len(given)} --history turn(s) "
                             "were given")
        return ()
    if not given:
        raise TraceError(
            f"this trace records {count} earlier conversation turn{'s' if count != 1 else ''} by "
            f"{'their sha256 only' if hashes else 'count only'} (trace.include_query_text is off); pass each "
            "turn, oldest first, with --history (repeatable)"
        )
    if len(given) != count:
        raise TraceError(f"the trace records {count} earlier conversation turns; {len(given)} --history given")
    if hashes is None:
        notes.append(f"the trace records only how many earlier turns there were ({count}), not their sha256: "
                     "the --history given cannot be checked (a trace written before Sieve recorded them)")
        return tuple(given)
    for number, (turn, recorded_digest) in enumerate(zip(given, hashes), start=1):
        if digest(turn) != recorded_digest:
            raise TraceError(f"--history turn {number} does not match the sha256 recorded in the trace for it")
    return tuple(given)


def _shape_problem(trace: Any) -> str | None:
    """What in a trace's shape a replay cannot read (a file edited by hand, or not a trace), or None: each field
    the replay reads, of the kind the engine writes."""
    if not isinstance(trace, dict):
        return f"a trace is a JSON object, got {type(trace).__name__}"
    expected: tuple[tuple[str, tuple[type, ...]], ...] = (  # what is missing is said where it is read
        ("config", (dict,)), ("config.resolved", (dict,)), ("config.dir", (str,)), ("index", (dict,)),
        ("index.path", (str,)), ("query", (dict,)), ("query.as_of", (str,)), ("query.user", (dict,)),
        ("query.history", (list,)), ("results", (list,)), ("stages", (list,)), ("models", (list,)),
    )
    for name, kinds in expected:
        value: Any = trace
        for key in name.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            continue
        if not isinstance(value, kinds) or isinstance(value, bool):
            return f"its {name} is {type(value).__name__}, not {' or '.join(k.__name__ for k in kinds)}"
    for name in ("results", "stages"):
        for position, item in enumerate(trace.get(name) or []):
            if not isinstance(item, dict):
                return f"its {name}[{position}] is {type(item).__name__}, not an object"
    for position, item in enumerate(trace.get("results") or []):
        if not isinstance(item.get("doc_id"), str) or isinstance(item.get("score"), bool) \
                or not isinstance(item.get("score"), (int, float)):
            return f"its results[{position}] has no doc_id (text) and score (a number)"
    for position, item in enumerate(trace.get("stages") or []):
        if not isinstance(item.get("id"), str):
            return f"its stages[{position}] has no id (text)"
    for position, item in enumerate(trace.get("models") or []):
        if not isinstance(item, dict):
            return f"its models[{position}] is {type(item).__name__}, not an object"
    query_text = (trace.get("query") or {}).get("text")
    if query_text is not None and not isinstance(query_text, str):
        return f"its query.text is {type(query_text).__name__}, not text"
    return None


def replay_trace(
    trace: dict[str, Any], *, index_path: Path | None = None, query_text: str | None = None,
    history: list[str] | None = None, config_dir: Path | None = None,
) -> dict[str, Any]:
    """Re-run the trace's query; returns a report with ``identical``, ``differences`` (each breaks
    ``identical``) and ``notes`` (what changed without changing what ran: they do not). ``config_dir``: where the
    config's relative paths (rule files, gazetteers, glossaries) lie now, when not in the directory the trace records
    (a checkout moved, another machine); each file is still checked against the sha256 the trace records."""
    problem = _shape_problem(trace)
    if problem is not None:
        raise TraceError(f"not a trace that can be replayed: {problem}")
    config = trace.get("config") or {}
    if "resolved" not in config:
        raise TraceError("the trace has no embedded configuration to replay")
    recorded_dir = Path(config.get("dir") or ".")
    if config_dir is not None and not config_dir.is_dir():
        raise TraceError(f"--config-dir {config_dir}: not a directory")
    try:
        compiled = compile_data(config["resolved"], label=f"<config in trace {trace.get('trace_id')}>",
                                base_dir=config_dir if config_dir is not None else recorded_dir)
    except ConfigError as exc:
        # The errors alone, by setting: the config is the trace's resolved one (every default written out, so its
        # warnings are of settings nobody wrote), with no lines of its own to point at
        errors = [issue for issue in exc.issues if issue.severity == "error"]
        message = (f"the trace's config does not compile here ({len(errors)} error{'s' if len(errors) != 1 else ''}):\n"
                   + "\n".join(f"  {issue.detail()}" for issue in errors))
        if config_dir is None and "file not found" in message:
            where = "" if recorded_dir.is_dir() else ", which is not here"
            message += (f"\nthe trace was made with its config in {recorded_dir}{where}: if its rule files lie "
                        "elsewhere now, give --config-dir where they are")
        raise TraceError(message) from None
    differences: list[str] = []
    notes: list[str] = []
    if config_dir is not None and config_dir.resolve() != recorded_dir.resolve():
        notes.append(f"the config's relative paths were read from {config_dir}, not {recorded_dir} where it was traced")
    recorded_version = trace.get("engine_version")
    if recorded_version != __version__:
        notes.append(f"engine version {recorded_version or '(not recorded)'} in the trace, {__version__} now")
    _config_differences(trace, compiled.canonical, compiled.config_sha256, differences, notes)
    recorded_index = trace.get("index") or {}
    given = index_path is not None
    if index_path is None and recorded_index.get("path"):
        index_path = Path(recorded_index["path"])
    if index_path is not None and not Path(index_path).exists() and recorded_index:
        # not "build one": a new index is another index (a difference); the trace needs the one it read
        where = f"--index {index_path}" if given else f"the trace's index {index_path}"
        raise TraceError(f"{where}: no index there; replay needs the index the trace read (manifest "
                         f"{str(recorded_index.get('manifest_sha256') or '?')[:12]}): give --index a copy of it "
                         "(`sieve index --keep-previous` keeps the one a rebuild replaces, as DIR.<manifest sha12>)")
    pipeline = Pipeline(compiled, index_path=index_path)
    query = _recorded_query(trace, query_text, history, notes)
    # A deadline (executor.deadline_ms) cuts by the clock: the replay runs with none, cutting exactly the stages
    # the trace records as cut, so it reproduces what the traced query ran.
    cuts = {stage["id"]: stage for stage in trace.get("stages") or []
            if isinstance(stage, dict) and stage.get("deadline") and stage.get("status") == "skipped"}
    for stage_id, stage in cuts.items():
        notes.append(f"stage {stage_id} was cut by the query's deadline when it was traced ({stage.get('error')}); "
                     "the replay cuts it too and runs every other stage in full")
    with pipeline:
        result = pipeline.run(query, deadline_cuts=cuts)
    now = _plain(result.trace)
    before_trace = _plain({k: v for k, v in trace.items() if k != "log"})
    _as_of_in_utc(before_trace, now, notes)
    differences_before_index = len(differences)
    differences.extend(_model_differences(before_trace.get("models") or [], now.get("models") or []))
    notes.extend(_thread_notes(before_trace.get("models") or [], now.get("models") or []))
    notes.extend(_renamed_model_notes(before_trace.get("models") or [], now.get("models") or []))
    differences.extend(_rewrite_differences(before_trace.get("query") or {}, now.get("query") or {}))
    before = [(r.get("doc_id"), r.get("score")) for r in before_trace.get("results") or []]
    after = [(r["doc_id"], r["score"]) for r in now["results"]]
    if len(before) != len(after):
        differences.append(f"{len(before)} results in the trace, {len(after)} now")
    for rank, (old, new) in enumerate(zip(before, after), start=1):
        if old[0] != new[0]:
            differences.append(f"rank {rank}: trace has {old[0]}, replay has {new[0]}")
        elif old[1] != new[1]:
            differences.append(f"rank {rank} ({old[0]}): score {old[1]!r} in the trace, {new[1]!r} now")
    # Across engine versions, wording and fields one engine records and the other does not are notes: what
    # ran (ids, scores, values of fields both record) must still be the same
    wording: list[str] | None = [] if recorded_version != __version__ else None
    detailed = _content_differences(before_trace, now, wording)
    if wording:
        listed = "; ".join(wording[:MAX_WORDING_NOTED]) + (
            f"; … and {len(wording) - MAX_WORDING_NOTED} more" if len(wording) > MAX_WORDING_NOTED else "")
        notes.append(f"engine {recorded_version or '(not recorded)'} -> {__version__}: {len(wording)} differences "
                     f"in wording or in fields only one of them records, not counted: {listed}")
    # What the replayed run warns of that the traced one did not (an index extracted under an older engine's
    # rules: the likeliest cause of a difference after an upgrade) is said, not left in the content differences
    warned = set(map(str, before_trace.get("warnings") or []))
    notes.extend(f"the replayed run warns: {w}" for w in map(str, now.get("warnings") or []) if w not in warned)
    if detailed:
        shown = detailed[:MAX_DETAILED]
        differences.extend(shown)
        if len(detailed) > len(shown):
            differences.append(f"… and {len(detailed) - len(shown)} more differences in the trace's content")
    ranking_identical = [d for d, _ in before] == [d for d, _ in after]
    reproduced = before == after and not detailed
    index_differences, index_notes = _index_differences(recorded_index, now.get("index") or {}, reproduced,
                                                        index_path)
    differences[differences_before_index:differences_before_index] = index_differences
    notes.extend(index_notes)
    return {
        "trace_id": trace.get("trace_id"),
        "identical": not differences,
        "ranking_identical": ranking_identical,
        "compared": len(before),
        "differences": differences,
        "notes": notes,
        "engine_version": {"trace": recorded_version, "now": __version__},
        "config_sha256": compiled.config_sha256,
        "index_manifest_sha256": (now.get("index") or {}).get("manifest_sha256") or "",
        "replay_trace_id": result.trace["trace_id"],
    }


def _as_of_in_utc(before: dict[str, Any], now: dict[str, Any], notes: list[str]) -> None:
    """A trace written before 0.9.0 records ``as_of`` with the offset it was given (2025-03-30T20:00:00-05:00);
    the engine now reads every as_of in UTC, so the replay's record says the same moment in UTC. That is a note;
    what rules judged on the caller's clock (a month back, an hour) shows as a difference of results, if any."""
    recorded, replayed = (before.get("query") or {}).get("as_of"), (now.get("query") or {}).get("as_of")
    if not isinstance(recorded, str) or not isinstance(replayed, str) or recorded == replayed:
        return
    try:
        same = datetime.fromisoformat(recorded) == datetime.fromisoformat(replayed)
    except ValueError:
        return
    if same:
        before["query"]["as_of"] = replayed
        notes.append(f"as_of was recorded as {recorded}; this engine reads it in UTC, {replayed} (rules count months "
                     "and read hours on the UTC clock since 0.9.0)")


def _plain(value: Any) -> Any:
    """The value as JSON gives it back (tuples as lists, keys as strings): what a trace file holds."""
    return json.loads(json.dumps(value, ensure_ascii=False))


# ---------------------------------------------------------------------------- config


def _config_differences(trace: dict[str, Any], canonical: dict[str, Any], sha_now: str,
                        differences: list[str], notes: list[str]) -> None:
    """The recorded config against the canonical form this engine gives it. Settings the recorded config lacks
    that are now present (at their defaults: compiling the recorded config filled them in) are a note; a value
    that differs, or a recorded setting this engine no longer has, is a difference, named by its dotted path."""
    config = trace.get("config") or {}
    recorded = config["resolved"]
    recorded_sha = config.get("sha256")
    try:
        own_sha = hashlib.sha256(canonical_json(recorded).encode("utf-8")).hexdigest()
    except (TypeError, ValueError):
        own_sha = None
    if recorded_sha is not None and own_sha is not None and own_sha != recorded_sha:
        differences.append(
            f"the trace's config sha256 {str(recorded_sha)[:12]} is not the sha256 of the config it records "
            f"({own_sha[:12]}): the recorded config was edited"
        )
    if sha_now == recorded_sha:
        return
    added: list[str] = []
    changed: list[str] = []
    _diff_config(_by_stage_id(recorded), _by_stage_id(canonical), "", added, changed)
    if added:
        version = trace.get("engine_version") or "(not recorded)"
        step = (f"engine {version} -> {__version__}" if version != __version__
                else f"engine {version} (the same version number) since the trace")
        notes.append(f"{step}: settings added at their defaults: {', '.join(added)} "
                     f"(config sha256 {str(recorded_sha)[:12]} -> {sha_now[:12]}; the settings that ran are unchanged)")
    if changed:
        differences.append(f"config differs from the trace's: {'; '.join(changed[:MAX_DETAILED])}"
                           + (f"; … and {len(changed) - MAX_DETAILED} more" if len(changed) > MAX_DETAILED else ""))
    if not added and not changed:
        differences.append(
            f"config sha256 differs: trace {str(recorded_sha or '?')[:12]}, now {sha_now[:12]}"
        )


def _by_stage_id(config: Any) -> Any:
    """The config with its stage list keyed by stage id (a path then reads ``stages.bm25.params.top_k``)."""
    if not isinstance(config, dict) or not isinstance(config.get("stages"), list):
        return config
    stages = config["stages"]
    if not all(isinstance(s, dict) and isinstance(s.get("id"), str) for s in stages):
        return config
    return {**config, "stages": {s["id"]: s for s in stages}}


def _diff_config(old: Any, new: Any, path: str, added: list[str], changed: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in old:
                added.append(f"{where}.*" if isinstance(new[key], dict) else where)
            elif key not in new:
                changed.append(f"{where} {_show(old[key])} is no longer a setting")
            else:
                _diff_config(old[key], new[key], where, added, changed)
    elif old != new or type(old) is not type(new) and not _same_number(old, new):
        changed.append(f"{path} {_show(old)} -> {_show(new)}")


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool)
            and not isinstance(b, bool) and a == b)


def _show(value: Any, limit: int = 80) -> str:
    shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


# ---------------------------------------------------------------------------- index


def _index_differences(recorded: dict[str, Any], now: dict[str, Any], reproduced: bool = False,
                       index_path: Path | None = None) -> tuple[list[str], list[str]]:
    """(differences, notes) between the index the trace recorded and the one the replay read. Another manifest is a
    difference, unless the index was rebuilt from the same corpus with the same components and settings (both
    recorded) and ``reproduced`` (every result, score and stage output is the same): then only the files' bytes
    differ, a note. A component the index read has and the traced one had not is said to be added (one it lacks,
    removed), not to differ in its files or settings. A difference says how to replay against the traced index
    (``--index``), naming the copy ``sieve index --keep-previous`` kept beside the index when there is one."""
    if recorded.get("manifest_sha256") == now.get("manifest_sha256"):
        return [], []
    message = (f"index manifest differs: trace {str(recorded.get('manifest_sha256'))[:12]}, "
               f"now {str(now.get('manifest_sha256'))[:12]}")
    old_corpus, new_corpus = recorded.get("corpus_sha256"), now.get("corpus_sha256")
    same_corpus = old_corpus is not None and old_corpus == new_corpus
    old_names, new_names = _component_names(recorded), _component_names(now)
    added = sorted(new_names - old_names) if old_names is not None and new_names is not None else []
    removed = sorted(old_names - new_names) if old_names is not None and new_names is not None else []
    changed_set = ""  # a component added or removed is said so, not as files or settings that differ
    for names, what in ((added, "added (in the index read, not in the traced one)"),
                        (removed, "removed (in the traced index, not in the index read)")):
        if names:
            several = len(names) > 1
            changed_set += (f"; {'the components' if several else 'the component'} {', '.join(names)} "
                            f"{'were' if several else 'was'} {what}")
    if same_corpus:
        message += f"; the corpus is the same (sha256 {old_corpus[:12]}): the index was rebuilt from an identical corpus"
        message += changed_set
        old_parts, new_parts = recorded.get("component_sha256") or {}, now.get("component_sha256") or {}
        if old_parts and new_parts:
            names = sorted((set(old_parts) | set(new_parts)) - set(added) - set(removed))
            differ = [n for n in names if old_parts.get(n) != new_parts.get(n)]
            if differ:
                message += f"; the files of {', '.join(differ)} differ"
            elif added or removed:
                message += "; the files of the components both indexes have are identical"
            else:
                message += ("; every component's files are identical (only the manifest differs: where the corpus or a "
                            "gazetteer lay, or what it records of the build)")
    else:
        if old_corpus is not None and new_corpus is not None:
            message += f"; the corpus differs (sha256 {old_corpus[:12]} -> {new_corpus[:12]})"
        message += changed_set
    # settings compared without where their files lay (a gazetteer's path): each file is compared by its sha256
    old_settings, new_settings = (_located_nowhere(recorded.get("component_settings")),
                                  _located_nowhere(now.get("component_settings")))
    built_alike = (same_corpus and isinstance(old_settings, dict) and old_settings == new_settings
                   and recorded.get("components") == now.get("components"))
    if built_alike and reproduced:
        return [], [message + "; built with the same components and settings, and every result, score and stage "
                    "output is reproduced exactly: a difference in the files' bytes only, not counted"]
    if same_corpus and reproduced and old_settings is None:
        message += ("; every result is reproduced, but the trace does not record the components' settings (a trace "
                    "written before Sieve recorded them), so the rebuild cannot be shown to be alike")
    elif same_corpus and isinstance(old_settings, dict) and isinstance(new_settings, dict) and old_settings != new_settings:
        changed = sorted(n for n in (set(old_settings) | set(new_settings)) - set(added) - set(removed)
                         if old_settings.get(n) != new_settings.get(n))
        if changed:
            message += "; the settings differ: " + "; ".join(
                f"{name} {_setting_changes(old_settings.get(name), new_settings.get(name))}" for name in changed)
    return [message + _index_hint(recorded, index_path)], []


def _located_nowhere(settings: Any) -> Any:
    """Components' settings (``component_settings``) with each nested setting by its dotted path
    (tokenizer.normalization) and where files lay left out: the location keys (``_flatten``) and any setting that is
    an absolute path (a gazetteer's, a model directory's: the machine's, not the index's; what the file held shows in
    the component's files); anything else as it is."""
    if not isinstance(settings, dict):
        return settings
    return {name: {key: item for key, item in _flatten(value).items()
                   if not (isinstance(item, str) and os.path.isabs(item))} if isinstance(value, dict) else value
            for name, value in settings.items()}


def _setting_changes(old: Any, new: Any, shown: int = 6) -> str:
    """Which settings of one component differ (as ``_located_nowhere`` gives them), each as ``key old -> new`` (a
    setting the traced index does not record, as an older engine had none: ``(not recorded)``)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return f"{_clip_value(old)} -> {_clip_value(new)}"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    listed = [f"{key} {_clip_value(old[key]) if key in old else '(not recorded)'} -> "
              f"{_clip_value(new[key]) if key in new else '(not recorded)'}" for key in keys[:shown]]
    return ", ".join(listed) + (f", … and {len(keys) - shown} more" if len(keys) > shown else "")


def _clip_value(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _component_names(index: dict[str, Any]) -> set[str] | None:
    """The components an index record names (``components``); None: not recorded."""
    names = index.get("components")
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return set(names)
    return None


def _index_hint(recorded: dict[str, Any], index_path: Path | None) -> str:
    """What to do about another index: the kept copy of the traced one beside the index read, or ``--index``."""
    from engine.index import kept_copy

    traced = str(recorded.get("manifest_sha256") or "")
    where = index_path if index_path is not None else (Path(recorded["path"]) if recorded.get("path") else None)
    if where is not None:
        kept = kept_copy(Path(where).absolute(), traced)
        if kept is not None:
            return f". The traced index is kept beside it: replay with --index {kept}"
    return (f". To reproduce the trace, replay with --index DIR naming a copy of the index it used (manifest "
            f"{traced[:12]}); `sieve index --keep-previous` keeps the index it replaces as DIR.<manifest sha12>")


# ---------------------------------------------------------------------------- models and rule files


MODEL_FIELDS = ("weights_sha256", "tokenizer_sha256", "device", "precision", "max_length")
# Identity fields a newer engine records: absent from an older trace, they are no difference
ADDED_FIELDS = frozenset({"tokenizer_sha256", "files_sha256"})


def _flatten(value: Any, path: str = "", *, machine: bool = False) -> dict[str, Any]:
    """Nested identity fields by dotted path; machine-specific locations left out, and what the identity records of
    the machine (``MACHINE_KEYS``) unless ``machine``."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            if key in LOCATION_KEYS and (isinstance(item, str) or item is None) or (key in MACHINE_KEYS and not machine):
                continue
            flat.update(_flatten(item, f"{path}.{key}" if path else str(key), machine=machine))
        return flat
    return {path: value}


_NAMES = {
    "sha256": "rule file sha256",
    "rules": "rule count",
    "glossary.sha256": "glossary sha256",
    "glossary.entries": "glossary entries",
    "gazetteer.sha256": "gazetteer sha256",
    "gazetteer.entries": "gazetteer entries",
}


def _model_differences(recorded: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    """How each stage's identity (model, rule file, glossary, gazetteer, reranker scale…) differs between the
    trace and the replay: every recorded field is compared except machine-specific locations. Other weights or
    file contents are named; the same weights run differently (``device``/``precision: auto`` resolve per
    machine: bf16 on a CPU with native bf16, fp16 on CUDA) change scores in their last digits."""
    current = {m.get("stage"): m for m in now}
    recorded_stages = {m.get("stage") for m in recorded}
    differences = []
    for model in recorded:
        stage = model.get("stage")
        other = current.get(stage)
        if other is None:
            what = model.get("model") or model.get("rules_file") or "an identity"
            differences.append(f"stage '{stage}' recorded {what}; the replay recorded none")
            continue
        old, new = _flatten(model), _flatten(other)
        fields = [f for f in MODEL_FIELDS if f in old or f in new]
        fields += [f for f in sorted(set(old) | set(new)) if f not in fields and f != "stage"]
        changed = []
        for field in fields:
            if old.get(field) == new.get(field) or field not in old and field.rpartition(".")[2] in ADDED_FIELDS:
                continue
            if field == "model" and _renamed_only(old, new):  # a note (_renamed_model_notes)
                continue
            if field not in old:
                changed.append(f"{field} (not recorded) -> {new[field]!r}")
            else:
                changed.append(f"{_NAMES.get(field, field)} {old[field]!r} -> {new.get(field)!r}"
                               if field not in MODEL_FIELDS else f"{field} {old[field]!r} -> {new.get(field)!r}")
        if changed:
            hint = ("; pin device and precision in the config for bit-identical replays across machines"
                    if any(c.startswith(("device", "precision")) for c in changed) else "")
            cause = _file_cause(model, old, new)
            differences.append(f"model of stage '{stage}' differs: {', '.join(changed)}{cause}{hint}"
                               if "model" in model or "weights_sha256" in model
                               else f"stage '{stage}' differs: {', '.join(changed)}{cause}")
    for stage, other in current.items():
        if stage not in recorded_stages:
            what = other.get("model") or other.get("rules_file") or "an identity"
            differences.append(f"stage '{stage}' now records {what}, which the trace does not")
    return differences


def _renamed_only(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a model identity names the model otherwise but its files are the same (weights and, where both record
    it, tokenizer): the shipped reranker, which an engine before 0.13.0 named by its checkout's absolute path."""
    weights = old.get("weights_sha256")
    return (old.get("model") != new.get("model") and isinstance(weights, str) and weights == new.get("weights_sha256")
            and old.get("tokenizer_sha256", new.get("tokenizer_sha256")) == new.get("tokenizer_sha256"))


def _renamed_model_notes(recorded: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    """A note for each model the replay names otherwise than the trace, with the same files (``_renamed_only``)."""
    current = {m.get("stage"): m for m in now if isinstance(m, dict)}
    return [f"stage '{model.get('stage')}': the model is named {_flatten(other).get('model')!r} now, "
            f"{_flatten(model).get('model')!r} in the trace: the same weights and tokenizer (sha256), not counted"
            for model in recorded if isinstance(model, dict)
            for other in [current.get(model.get("stage"))]
            if other is not None and _renamed_only(_flatten(model), _flatten(other))]


def _thread_notes(recorded: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    """A model that ran on another number of CPU threads than when traced: under bf16 or fp16 its scores can differ
    in their last digits with it (torch splits the sums otherwise), which a difference in scores then comes from."""
    current = {m.get("stage"): m for m in now if isinstance(m, dict)}
    notes = []
    for model in recorded:
        if not isinstance(model, dict):
            continue
        threads_now = _flatten(current.get(model.get("stage"), {}), machine=True)
        for path, then in _flatten(model, machine=True).items():
            found = threads_now.get(path)
            if path.rpartition(".")[2] == "threads" and then is not None and found is not None and then != found:
                reduced = model.get("precision") in ("bf16", "fp16")
                owner = path.rpartition(".")[0]
                notes.append(f"stage '{model.get('stage')}' ran {owner or 'its model'} on {then} CPU threads when "
                             f"traced, {found} now" + (f": under {model.get('precision')} its scores can differ in "
                                                       "their last digits with the thread count (torch.set_num_threads "
                                                       "as traced, or precision: fp32, for identical replays)"
                                                       if reduced else ""))
    return notes


def _file_cause(model: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which file's content changed since the trace, named by its (recorded) path."""
    causes = []
    if old.get("sha256") != new.get("sha256") and model.get("rules_file"):
        causes.append(f"the rule file {Path(str(model['rules_file'])).name} changed since the trace")
    for part in ("glossary", "gazetteer"):
        if old.get(f"{part}.sha256") != new.get(f"{part}.sha256") and isinstance(model.get(part), dict):
            causes.append(f"the {part} {Path(str(model[part].get('file') or part)).name} changed since the trace")
    if old.get("weights_sha256") != new.get("weights_sha256") and "weights_sha256" in old:
        causes.append("other weights")
    if old.get("tokenizer_sha256") != new.get("tokenizer_sha256") and "tokenizer_sha256" in old:
        causes.append("another tokenizer or model config over the weights")
    return f" ({'; '.join(causes)})" if causes else ""


def _rewrite_differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    if "rewritten" in recorded and recorded.get("rewritten") != now.get("rewritten"):
        return [f"rewritten query differs: {recorded.get('rewritten')!r} in the trace, {now.get('rewritten')!r} now"]
    return []


# ---------------------------------------------------------------------------- content


def _content_differences(before: dict[str, Any], now: dict[str, Any],
                         wording: list[str] | None = None) -> list[str]:
    """Path-by-path differences in what a re-run must reproduce: the query record, whether the run was degraded,
    the output stage, every stage's record (output ids and scores, drops, decisions, details, rewritten query)
    and every result (ledger, explanation tree, document). Volatile fields are left out (``VOLATILE_KEYS``)."""
    found: list[str] = []
    for key in ("query", "degraded", "output"):
        _diff(before.get(key), now.get(key), key, found, wording)
    old_stages = {s.get("id"): s for s in before.get("stages") or [] if isinstance(s, dict)}
    new_stages = {s.get("id"): s for s in now.get("stages", [])}
    if list(old_stages) != list(new_stages):
        found.append(f"stages: trace has {list(old_stages)}, replay has {list(new_stages)}")
    for stage_id, record in old_stages.items():
        if stage_id in new_stages:
            _diff(record, new_stages[stage_id], f"stages[{stage_id}]", found, wording)
    for position, (old, new) in enumerate(zip(before.get("results") or [], now.get("results", []))):
        _diff(old, new, f"results[{position}]", found, wording)
    return found


def _diff(old: Any, new: Any, path: str, found: list[str], wording: list[str] | None = None) -> None:
    """Differences into ``found``; with ``wording`` (a trace from another engine version), differences in
    prose (``WORDING_KEYS``) and fields only one side records go there instead."""
    if isinstance(old, dict) and isinstance(new, dict):
        in_details = path.endswith(".details")
        for key in list(old) + [k for k in new if k not in old]:
            if key in VOLATILE_KEYS or (in_details and key in VOLATILE_DETAILS):
                continue
            if key in LOCATION_KEYS and isinstance(old.get(key, new.get(key)), str):
                continue
            where = f"{path}.{key}"
            noted = found if wording is None or _recorded_by_every_version(key, old.get(key, new.get(key))) else wording
            if key not in new:
                noted.append(f"{where}: {_show(old[key])} in the trace, absent in the replay")
            elif key not in old:
                if new[key] in (None, False, [], {}, "") or where == "query.history_sha256":
                    continue  # a field a newer engine writes, empty here (or the turns' hashes, checked above)
                noted.append(f"{where}: absent in the trace, {_show(new[key])} in the replay")
            elif wording is not None and key in WORDING_KEYS and isinstance(old[key], str) and isinstance(
                    new[key], str):
                if old[key] != new[key]:
                    wording.append(f"{where} worded differently")
            else:
                _diff(old[key], new[key], where, found, wording)
    elif isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            found.append(f"{path}: {len(old)} entries in the trace, {len(new)} in the replay")
        for position, (a, b) in enumerate(zip(old, new)):
            _diff(a, b, f"{path}[{position}]", found, wording)
    elif old != new or (type(old) is not type(new) and not _same_number(old, new)):
        found.append(f"{path}: {_show(old)} in the trace, {_show(new)} in the replay")
