"""Findings of the time-and-dates audit, each on a small real corpus or a real rule file.

H1/H2. ``as_of`` is read in UTC: one moment written with any offset (or a ``ZoneInfo`` across a DST change) gets
       the same access decisions; before, a month back from 2025-03-30T20:00-05:00 was counted on the caller's
       clock and hid a document 2025-03-31T01:00Z showed;
H3.    a ``date_range`` holds for a list of dates when one date is inside the window (before: [2010, 2030] was
       inside [2020, 2025), each bound met by another element);
H4.    a ``from``/``until`` date-time is a date-time whatever its separator's case (before: ``2025-06-30t12:00z``
       was the whole day); a separator that is not T, t or a space is no date anywhere;
H5.    a test of ``as_of`` that could never decide (``eq 2025-01-01``, ``ge 20250101``, ``contains``) is a located
       error;
M1.    a document date outside years 1-9999 in UTC is undated for ``boost.recency``, not a failed query;
M2.    an expired rule is a warning under ``strictness: strict`` (the file still loads the day after);
M3.    expressions cannot read the machine's clock or time zone (``as_of.now()``, ``as_of.astimezone()``);
L1.    the CLI, the server, batch lines and rule tests read ``as_of`` with the one parser documents and rules use;
L5.    ``NaN``/``Infinity`` in a corpus line is refused, located.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from engine.errors import ConfigError, QueryError, SieveError
from engine.model import Query, iso_moment
from rules.ruleset import load_rule_file
from tests.rules.test_access_audit import pipeline, visible


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


# =========================================================================== H1/H2: as_of is read in UTC

def test_one_moment_written_with_any_offset_gets_the_same_access_decisions(tmp_path):
    pipe = pipeline(tmp_path, [{"_id": "feb28", "date": "2025-02-28T12:00:00Z"}],
                    "rules:\n  - {id: recent, action: date_range, field: date, on_or_after: as_of - 1mo, "
                    "missing: deny}\n")
    moment = _utc(2025, 3, 31, 1)  # a month back: 2025-02-28T01:00Z (end of month clamped), so feb28 is inside
    spellings = [moment, moment.astimezone(timezone(timedelta(hours=-5))),
                 moment.astimezone(timezone(timedelta(hours=5, minutes=30)))]
    assert [visible(pipe, as_of=when) for when in spellings] == [{"feb28"}] * 3  # before: hidden at -05:00
    record = pipe.run(pipe.make_query("zebra", as_of=spellings[1])).trace["query"]
    assert record["as_of"] == "2025-03-31T01:00:00+00:00"  # the trace records the moment in UTC


def test_a_zoneinfo_as_of_across_a_dst_change_counts_real_hours(tmp_path):
    pipe = pipeline(tmp_path, [{"_id": "early", "date": "2025-03-09T04:30:00Z"},
                               {"_id": "late", "date": "2025-03-09T05:30:00Z"}],
                    "rules:\n  - {id: day, action: date_range, field: date, on_or_after: as_of - 12h, missing: deny}\n")
    new_york = datetime(2025, 3, 9, 12, tzinfo=ZoneInfo("America/New_York"))  # 16:00Z, after spring-forward
    assert visible(pipe, as_of=new_york) == visible(pipe, as_of=_utc(2025, 3, 9, 16)) == {"early", "late"}


def test_an_as_of_outside_years_1_to_9999_in_utc_is_a_query_error():
    with pytest.raises(QueryError, match="outside years 1-9999 in UTC"):
        Query.create("zebra", as_of=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))))


# =========================================================================== H3: a window on a list of dates

def test_a_list_of_dates_is_inside_a_window_only_when_one_date_is(tmp_path):
    pipe = pipeline(tmp_path, [{"_id": "straddles", "date": ["2010-01-01", "2030-01-01"]},
                               {"_id": "one-inside", "date": ["2010-01-01", "2022-06-01"]},
                               {"_id": "single", "date": "2022-06-01"},
                               {"_id": "outside", "date": "2030-01-01"}],
                    "rules:\n  - {id: w, action: date_range, field: date, on_or_after: 2020-01-01, "
                    "before: 2025-01-01, missing: deny}\n")
    assert visible(pipe) == {"one-inside", "single"}  # before: straddles too


def test_a_relative_window_on_lists_follows_as_of(tmp_path):
    pipe = pipeline(tmp_path, [{"_id": "listed", "date": ["2024-12-01", "2026-01-01"]}],
                    "rules:\n  - {id: w, action: date_range, field: date, on_or_after: as_of - 1mo, "
                    "before: as_of, missing: deny}\n")
    assert visible(pipe, as_of=_utc(2024, 12, 15)) == {"listed"}
    assert visible(pipe, as_of=_utc(2025, 6, 1)) == set()  # neither date in [2025-05-01, 2025-06-01)


# =========================================================================== H4 and L1: one shape of a date

@pytest.mark.parametrize("until", ["'2025-06-30T12:00:00Z'", "'2025-06-30t12:00:00z'", "'2025-06-30 12:00:00Z'"])
def test_a_date_time_until_is_a_moment_whatever_the_separators_case(write_rules, until):
    ruleset = load_rule_file(write_rules(
        f"version: 1\nkind: override\nrules:\n  - {{id: r, action: bury, docs: [d1], until: {until}}}\n"))
    assert ruleset.rules[0].end == _utc(2025, 6, 30, 12)  # before: lower case t read the whole day, to July 1


@pytest.mark.parametrize("text", ["2025-06-30_12:00:00Z", "2025-06-30x12:00", "2025-W27-1"])
def test_text_that_is_no_iso_date_is_refused_as_a_rule_date(write_rules, text):
    with pytest.raises(ConfigError, match="not an ISO 8601 date or date-time"):
        load_rule_file(write_rules(
            f"version: 1\nkind: override\nrules:\n  - {{id: r, action: bury, docs: [d1], until: '{text}'}}\n"))


@pytest.mark.parametrize(("text", "expected"), [
    ("2025-06-01", _utc(2025, 6, 1)), ("2025-06-01t10:00:00z", _utc(2025, 6, 1, 10)),
    ("2025-06-01 10:00+05:30", _utc(2025, 6, 1, 4, 30)), ("20250601", _utc(2025, 6, 1)),
    ("2025-06-01x10:00", None), ("2025-W22-7", None), ("9999-12-31T23:00:00-14:00", None), ("", None),
])
def test_the_one_parser_of_moments(text, expected):
    assert iso_moment(text) == expected


def test_the_cli_and_batch_read_as_of_with_the_one_parser():
    from engine.cli import _parse_time
    from engine.workbench.batch import _parse_as_of

    assert _parse_time("2025-06-01t10:00:00z", "--as-of") == _utc(2025, 6, 1, 10)  # before: refused
    with pytest.raises(SieveError, match="--as-of '2025-06-01x10:00': not an ISO 8601 date or date-time"):
        _parse_time("2025-06-01x10:00", "--as-of")  # before: read as 10:00
    assert _parse_as_of("2025-06-01t10:00:00z", "as_of") == (_utc(2025, 6, 1, 10), None)
    assert "as_of '2025-06-01_10:00': not an ISO 8601 date" in (_parse_as_of("2025-06-01_10:00", "as_of")[1] or "")


def test_a_rule_tests_as_of_is_read_by_the_one_parser_and_refused_once(tmp_path):
    from rules.testing import load_test_file

    (tmp_path / "pipeline.yaml").write_text("version: 1\n", encoding="utf-8")
    path = tmp_path / "t.tests.yaml"
    path.write_text("version: 1\npipeline: pipeline.yaml\nas_of: '2025-06-01x10:00'\ncases:\n  - name: c\n"
                    "    query: q\n    expect:\n      - {doc: a, present: true}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_test_file(path)
    message = str(caught.value)
    assert message.count("not an ISO 8601 date or date-time") == 1, message  # before: once per union arm


def test_the_server_reads_as_of_with_the_one_parser():
    from pydantic import ValidationError

    from engine.server import SearchBody

    assert SearchBody(query="q", as_of="2025-06-01t10:00:00z").as_of == _utc(2025, 6, 1, 10)
    with pytest.raises(ValidationError, match="not an ISO 8601 date"):
        SearchBody(query="q", as_of="2025-06-01x10:00")


# =========================================================================== H5: tests of as_of that never decide

@pytest.mark.parametrize(("condition", "says"), [
    ("{field: as_of, op: eq, value: 2025-01-01}", "as_of is a moment: `eq` with '2025-01-01' would never hold"),
    ("{field: as_of, op: ne, value: 2025-01-01}", "would always hold"),
    ("{field: as_of, op: in, value: [2025-01-01]}", "would never hold"),
    ("{field: as_of, op: contains, value: '2025'}", "would never hold"),
    ("{field: as_of, op: regex, value: '^2025'}", "would never hold"),
    ("{field: as_of, op: ge, value: 20250101}", "20250101 is no date"),
    ("{expr: \"as_of == '2025-01-01'\"}", "as_of is a moment"),
])
def test_a_test_of_as_of_that_could_never_decide_is_a_located_error(write_rules, condition, says):
    path = write_rules(f"version: 1\nkind: override\nrules:\n  - {{id: r, action: bury, docs: [d1], when: {condition}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path)
    message = str(caught.value)
    assert f"{path}:4:" in message and says in message and "give the rule from: and until:" in message, message


@pytest.mark.parametrize("condition", [
    "{field: as_of, op: ge, value: 2025-01-01}", "{field: as_of, op: before, value: '2025-01-01T12:00:00Z'}",
    "{field: as_of, op: lt, value: 'as_of + 1d'}", "{field: as_of, op: exists, value: true}",
    "{expr: 'as_of.hour < 9'}",
])
def test_ordered_tests_of_as_of_still_load(write_rules, condition):
    path = write_rules(f"version: 1\nkind: override\nrules:\n  - {{id: r, action: bury, docs: [d1], when: {condition}}}\n")
    assert len(load_rule_file(path).rules) == 1


# =========================================================================== M3: no clock in expressions

@pytest.mark.parametrize("expression", ["as_of.now() > as_of", "as_of.astimezone().hour < 12",
                                        "as_of.today().year == 2025"])
def test_an_expression_reading_the_machines_clock_is_a_located_error(write_rules, expression):
    path = write_rules(f'version: 1\nkind: override\nrules:\n  - {{id: r, action: bury, docs: [d1], '
                       f'when: {{expr: "{expression}"}}}}\n')
    with pytest.raises(ConfigError, match="reads the machine's clock or time zone"):
        load_rule_file(path)


def test_the_sandbox_refuses_the_clock_however_it_is_reached():
    from rules.expressions import ExpressionRuntimeError, compile_expression

    compiled = compile_expression("(as_of | attr('now'))() > as_of", {"as_of"})
    with pytest.raises(ExpressionRuntimeError, match="access to attribute 'now' of a datetime is not allowed"):
        compiled.evaluate({"as_of": _utc(2025, 6, 1)})


# =========================================================================== M1: recency on extreme dates

@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:00:00-14:00",
                                   "9999-12-31T23:59:59.99999Z"])
def test_a_date_outside_years_1_to_9999_in_utc_is_undated_for_recency(value):
    from stages.recency import parse_date

    assert parse_date(value) is None  # before: parsed, then every query recalling it failed with ValueError
    assert parse_date("9999-12-31") is not None and parse_date("0001-01-01") is not None


def test_recency_runs_over_a_document_dated_out_of_range(tmp_path):
    from engine.compiler import compile_file
    from engine.pipeline import Pipeline
    from tests.rules.test_access_audit import build

    index = build(tmp_path, [{"_id": "far", "date": "9999-12-31T23:59:59.99999Z"}, {"_id": "near", "date": "2025-05-01"}])
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"version: 1\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25, params: {{top_k: 10}}}}\n"
                      "  - {id: recency, type: boost.recency, inputs: [bm25], params: {half_life_days: 30}}\n"
                      "output: recency\ntrace: {log: null}\n", encoding="utf-8")
    pipe = Pipeline(compile_file(config))
    result = pipe.run(pipe.make_query("zebra", as_of=_utc(2025, 6, 1)))
    assert {c.doc_id for c in result.results} == {"far", "near"}
    assert any("not a date" in w or "undated" in w for w in pipe.warnings), pipe.warnings


# =========================================================================== L5: no NaN in a corpus

@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_corpus_line_with_a_json_constant_json_has_not_is_refused(tmp_path, constant):
    from engine.index import build_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "a", "text": "zebra"}) + "\n"
                      + '{"_id": "b", "text": "zebra", "date": ' + constant + "}\n", encoding="utf-8")
    with pytest.raises(SieveError, match=rf"corpus.jsonl:2: {constant} is not a JSON value"):
        build_index(corpus, tmp_path / "index", {"bm25": {}})
    assert not (tmp_path / "index").exists()


def test_a_trace_recording_as_of_with_an_offset_replays_identical_with_a_note(tmp_path):
    """Traces before 0.9.0 recorded as_of as given; the replay reads it in UTC and says so."""
    from engine.replay import replay_trace

    pipe = pipeline(tmp_path, [{"_id": "a", "date": "2025-05-20"}],
                    "rules:\n  - {id: recent, action: date_range, field: date, on_or_after: as_of - 30d}\n")
    trace = pipe.run(pipe.make_query("zebra", as_of=_utc(2025, 6, 1, 3))).trace
    trace = json.loads(json.dumps(trace))
    trace["query"]["as_of"] = "2025-05-31T22:00:00-05:00"
    report = replay_trace(trace)
    assert report["identical"], report["differences"]
    assert any("as_of was recorded as 2025-05-31T22:00:00-05:00; this engine reads it in UTC, "
               "2025-06-01T03:00:00+00:00" in note for note in report["notes"]), report["notes"]


def test_the_trace_says_what_each_relative_date_resolved_to(tmp_path):
    """Time audit L3: an auditor had to redo the calendar arithmetic of `as_of - 1mo` to check a decision."""
    pipe = pipeline(tmp_path, [{"_id": "feb28", "date": "2025-02-28T12:00:00Z"}],
                    "rules:\n  - {id: recent, action: date_range, field: date, on_or_after: as_of - 1mo, "
                    "missing: deny}\n  - {id: fixed, action: date_range, field: date, on_or_after: 2020-01-01}\n")
    record = pipe.run(pipe.make_query("zebra", as_of=_utc(2025, 3, 31, 1))).trace
    access = next(s for s in record["stages"] if s["id"] == "access")
    assert access["details"]["resolved_dates"] == {"recent": {"doc.date ge as_of - 1mo": "2025-02-28T01:00:00+00:00"}}


def test_an_override_stage_traces_its_resolved_dates_too(tmp_path):
    from engine.compiler import compile_file
    from engine.pipeline import Pipeline
    from tests.rules.test_access_audit import build

    index = build(tmp_path, [{"_id": "new", "date": "2025-05-20"}, {"_id": "old", "date": "2020-01-01"}])
    (tmp_path / "overrides.yaml").write_text(
        "version: 1\nkind: override\nrules:\n  - {id: fresh, action: boost, factor: 2.0, "
        "match: {field: doc.date, op: ge, value: as_of - 30d}}\n", encoding="utf-8")
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"version: 1\nindex: {index}\nstages:\n  - {{id: bm25, type: recall.bm25}}\n"
                      "  - {id: overrides, type: rules.override, inputs: [bm25], params: {rules: overrides.yaml}}\n"
                      "output: overrides\ntrace: {log: null}\n", encoding="utf-8")
    pipe = Pipeline(compile_file(config))
    trace = pipe.run(pipe.make_query("zebra", as_of=_utc(2025, 6, 1))).trace
    stage = next(s for s in trace["stages"] if s["id"] == "overrides")
    assert stage["details"]["resolved_dates"] == {"fresh": {"doc.date ge as_of - 30d": "2025-05-02T00:00:00+00:00"}}


@pytest.mark.parametrize(("text", "said"), [
    ("2025-06-31", "not a real date or time: day is out of range for month"),
    ("2025-06-01T25:00:00Z", "not a real date or time: hour must be in 0..23"),
    ("2025-13-10", "not a real date or time: month must be in 1..12"),
    ("2025-6-1", "write the month and day with two digits (2025-06-01)"),
    ("2025-6-1T10:00Z", "write the month and day with two digits (2025-06-01T10:00Z)"),
    ("2025-2-30", "not a real date or time: day is out of range for month"),
    ("01/06/2025", "not an ISO 8601 date or date-time (e.g. 2026-01-31 or 2026-01-31T12:00:00Z)"),
])
def test_an_impossible_date_says_which_part_is_wrong(write_rules, text, said):
    """Error-message audit C3: --as-of 2025-06-31 (and a rule's until: 2025-13-10, a batch line's as_of) was told to
    be "an ISO 8601 date or time", which it is in form: the message now says which part is wrong."""
    from engine.cli import _parse_time
    from engine.workbench.batch import _parse_as_of

    with pytest.raises(SieveError) as raised:
        _parse_time(text, "--as-of")
    assert str(raised.value) == f"--as-of {text!r}: {said}"
    assert _parse_as_of(text, "as_of")[1] == f"as_of {text!r}: {said}"
    with pytest.raises(ConfigError) as refused:
        load_rule_file(write_rules(
            f"version: 1\nkind: override\nrules:\n  - {{id: r, action: bury, docs: [d1], until: '{text}'}}\n"))
    assert said in str(refused.value)
