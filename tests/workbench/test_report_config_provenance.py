"""sieve report shows what made the config that ran: the stages it switched off (``enabled: false``), the base configs
it extends and the ``--set`` overrides it was compiled with, and each routed stage's ``when``.

Real pipelines on the SciFact-slice BM25 index, run with ``sieve search --trace-out`` and rendered with ``sieve
report``: the HTML must say what the JSON trace records (``disabled``, ``config.extends``, ``config.set``,
``stages[].when``), or an auditor reading the page sees a stage table without the disabled stage and a config that
looks as though it was written whole.
"""

from __future__ import annotations

import html as html_escape
import json
import os
import re
import subprocess
from pathlib import Path

from engine.workbench.report import render_report
from tests.engine.test_stage_switch import rewrite_off

QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine."

# bm25 -> floor -> final; {floor} adds to the floor stage (enabled: false, a when), {final} to the final one
CHAIN = """\
version: 1
name: {name}
index: {index}
stages:
  - id: bm25
    type: recall.bm25
    params: {{top_k: 50}}
  - id: floor
    type: select.threshold
    inputs: [bm25]
    params: {{min_score: 0.2, normalize: max}}{floor}
  - id: final
    type: select.top_k
    inputs: [floor]
    params: {{k: 10}}{final}
output: final
trace: {{log: null}}
"""


def chain(index: Path | str, *, floor: str = "", final: str = "", name: str = "chain") -> str:
    return CHAIN.format(index=index, floor=floor, final=final, name=name)


def report_of(cli, config: Path, out_dir: Path, *settings: str, query: str = QUERY) -> tuple[dict, str]:
    """Search with the config (and ``--set`` overrides), then render the trace file: (the trace, the page)."""
    trace_file = out_dir / f"{config.stem}.trace.json"
    args = [arg for setting in settings for arg in ("--set", setting)]
    searched = cli("search", config, query, *args, "--trace-out", trace_file, "--no-log")
    assert searched.exit_code == 0, searched.output
    page_file = out_dir / f"{config.stem}.html"
    reported = cli("report", trace_file, "--html", page_file)
    assert reported.exit_code == 0, reported.output
    return json.loads(trace_file.read_text(encoding="utf-8")), page_file.read_text(encoding="utf-8")


def text_of(markup: str) -> str:
    """Markup as it reads: inline tags dropped, block ones (cells, list items) a space, entities decoded."""
    inline = re.sub(r"</?(?:span|strong|code)\b[^>]*>", "", markup)
    return " ".join(html_escape.unescape(re.sub(r"<[^>]+>", " ", inline)).split())


def fact(page: str, element_id: str) -> str:
    """The text of the config fact ``<dd id=...>``, tags removed and entities decoded."""
    found = re.search(rf'<dd id="{element_id}">(.*?)</dd>', page, re.S)
    assert found, f"no <dd id={element_id!r}> in the report"
    return text_of(found.group(1))


def stage_rows(page: str) -> list[tuple[str, str, str]]:
    """(data-stage, data-status, the row's text) of each row of the stage table, in order."""
    table = re.search(r'<table id="stage-table">(.*?)</table>', page, re.S)
    assert table
    rows = re.findall(r'<tr class="stage-row[^"]*" data-stage="([^"]*)" data-status="([^"]*)">(.*?)</tr>',
                      table.group(1), re.S)
    return [(sid, status, text_of(body)) for sid, status, body in rows]


def test_a_disabled_stage_is_a_row_of_the_stage_table_and_a_config_fact(cli, bm25_index, write_config, tmp_path):
    config = write_config(chain(bm25_index, floor="\n    enabled: false"), "off.yaml")
    trace, page = report_of(cli, config, tmp_path)
    assert trace["disabled"] == {"floor": ["bm25"]}
    assert [s["id"] for s in trace["stages"]] == ["bm25", "final"]  # the trace's stages leave it out

    rows = stage_rows(page)
    # in the order the stages ran, the disabled one after the stage its reader read in its place
    assert [(sid, status) for sid, status, _ in rows] == [("bm25", "ok"), ("floor", "disabled"), ("final", "ok")]
    floor = rows[1][2]
    assert floor.startswith("floor select.threshold@1 bm25 ")  # its type and its inputs as written
    assert "disabled (enabled: false): not loaded, did not run; its readers (final) read 'bm25' in its place" in floor
    assert "bm25 (in place of disabled floor)" in rows[2][2]  # final's inputs: what it read, and for what
    assert fact(page, "config-disabled") == ("floor select.threshold@1: disabled (enabled: false), not loaded and "
                                             "did not run; its readers (final) read 'bm25' in its place")
    assert '<span class="badge" id="disabled-badge">1 stage disabled: floor</span>' in page


def test_a_disabled_rewrite_says_its_readers_get_the_query_as_asked(cli, bm25_index, write_config, tmp_path):
    config = write_config(rewrite_off(bm25_index), "rewrite-off.yaml")
    trace, page = report_of(cli, config, tmp_path)
    assert trace["disabled"] == {"rewrite": []}
    rows = stage_rows(page)
    assert [(sid, status) for sid, status, _ in rows] == [("rewrite", "disabled"), ("bm25", "ok")]
    assert "its readers (bm25) read no stage in its place (the query as asked)" in rows[0][2]


def test_the_base_configs_and_the_set_overrides_are_config_facts(cli, bm25_index, write_config, tmp_path):
    index = os.path.relpath(bm25_index, tmp_path)
    base = write_config(chain(index, name="base"), "base.yaml")
    middle = write_config("extends: base.yaml\nname: middle\nstages:\n  - {id: final, params: {k: 5}}\n", "middle.yaml")
    child = write_config("extends: middle.yaml\nname: child\nstages:\n  - {id: floor, enabled: false}\n", "child.yaml")
    trace, page = report_of(cli, child, tmp_path, "stages.bm25.params.top_k=20", "stages.final.params.k=3")
    recorded = trace["config"]
    assert recorded["set"] == ["stages.bm25.params.top_k=20", "stages.final.params.k=3"]
    assert [b["file"] for b in recorded["extends"]] == [str(middle.resolve()), str(base.resolve())]
    assert len(trace["results"]) == 3

    based = fact(page, "config-extends")
    # each base with its sha256, nearest first, and what the config sha256 is of
    first, second = recorded["extends"]
    assert based.index(first["file"]) < based.index(first["sha256"]) < based.index(second["file"]) \
        < based.index(second["sha256"])
    assert "nearest first" in based and "merged config" in based
    overrides = fact(page, "config-set")
    assert overrides.startswith("--set stages.bm25.params.top_k=20 --set stages.final.params.k=3 ")
    assert "the sha256 above is of the config with them" in overrides
    assert recorded["sha256"] in page
    assert "config extends 2 bases" in page and "2 --set overrides" in page
    # the extending file's enabled: false is a row too, its readers as the merged config wrote them
    assert ("floor", "disabled") in [(sid, status) for sid, status, _ in stage_rows(page)]


def test_a_whole_config_run_as_written_says_so(cli, bm25_index, write_config, tmp_path):
    _, page = report_of(cli, write_config(chain(bm25_index), "plain.yaml"), tmp_path)
    assert fact(page, "config-extends") == "no base config: the file is the whole config"
    assert fact(page, "config-set") == "none"
    assert fact(page, "config-disabled") == "none"
    assert not any(badge in page for badge in ('id="disabled-badge"', 'id="extends-badge"', 'id="set-badge"'))
    assert [status for _, status, _ in stage_rows(page)] == ["ok", "ok", "ok"]
    assert fact(page, "warm-up-warnings") == "none"


def test_what_warm_up_found_is_a_config_fact(cli, bm25_index, write_config, tmp_path):
    """The trace keeps the warm-up warnings (a cap on a field no document has); the page left them out."""
    config = write_config(chain(bm25_index), "cap.yaml")
    trace, page = report_of(cli, config, tmp_path, "stages.final.params.max_per={field: sourc, n: 1}")
    (warning,) = trace["warnings"]
    assert "max_per.field 'sourc'" in warning
    assert fact(page, "warm-up-warnings").startswith("stage 'final': max_per.field 'sourc': none of the index's first")


def test_a_when_that_holds_is_shown_with_its_evidence(cli, bm25_index, write_config, tmp_path):
    """A stage whose `when` held: the page rendered (the template read `when.error`, absent then, and failed) and
    says the condition held, and on what in the query."""
    config = write_config(chain(bm25_index, floor="\n    when: {field: query.text, op: contains, value: vitamin}"),
                          "routed.yaml")
    trace, page = report_of(cli, config, tmp_path)
    assert trace["stages"][1]["when"]["holds"] is True
    floor = dict((sid, text) for sid, _, text in stage_rows(page))["floor"]
    assert "ok (its when holds: query.text contains 'vitamin')" in floor
    assert 'evidence of its when: query.text contains: matched &#34;vitamin&#34;' in page
    # not holding: bypassed, as before
    trace, page = report_of(cli, config, tmp_path, query="homocysteine levels")
    assert trace["stages"][1]["status"] == "bypassed"
    assert "bypassed (its when does not hold: query.text contains &#39;vitamin&#39;)" in page


def test_a_trace_written_before_disabled_was_recorded_still_shows_the_stage(cli, bm25_index, write_config, tmp_path):
    """Without the trace's `disabled` (older traces), the resolved config's enabled: false still makes a row."""
    config = write_config(chain(bm25_index, floor="\n    enabled: false"), "old.yaml")
    trace, _ = report_of(cli, config, tmp_path)
    del trace["disabled"]
    rows = stage_rows(render_report(trace))
    assert [(sid, status) for sid, status, _ in rows] == [("bm25", "ok"), ("floor", "disabled"), ("final", "ok")]
    assert "disabled (enabled: false): not loaded, did not run; what reads it reads its input in its place" in rows[1][2]


def test_the_disabled_row_and_the_config_facts_render_in_a_real_browser(cli, bm25_index, write_config, tmp_path):
    from tests.workbench.test_report import CHROMIUM_FLAGS, _chromium

    chromium = _chromium()
    index = os.path.relpath(bm25_index, tmp_path)
    write_config(chain(index, name="base"), "base.yaml")
    child = write_config("extends: base.yaml\nstages:\n  - {id: floor, enabled: false}\n", "child.yaml")
    report_of(cli, child, tmp_path, "stages.final.params.k=3")
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, "--dump-dom", (tmp_path / "child.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for element in ('id="config-extends"', 'id="config-set"', 'id="config-disabled"',
                    'data-stage="floor" data-status="disabled"'):
        assert element in dom.stdout, element
    assert "its readers (final) read 'bm25' in its place" in html_escape.unescape(dom.stdout)
