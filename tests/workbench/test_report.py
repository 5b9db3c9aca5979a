"""sieve report: the HTML is rendered by a real headless browser (Debian's chromium), screenshot and DOM checked."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from engine.trace import TraceLog
from tests.workbench.conftest import ROOT

MEDICAL_CONFIG = ROOT / "configs" / "medical" / "pipeline.yaml"
US_CLINICIAN = ("--role", "clinician", "--jurisdiction", "US", "--as-of", "2025-06-01")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium not found on PATH (`make test` installs Debian's chromium via the 'browser' target; "
                "install it with `apt-get install -y chromium`)")


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG (what chromium writes) into rows of raw pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, header = 8, b"", None
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    assert header is not None
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            upper_left = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                estimate = left + up - upper_left
                pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - upper_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else upper_left)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, [bytes(r[i:i + 3]) for r in rows[::8] for i in range(0, stride, channels * 8)]


@pytest.fixture(scope="module")
def medical_trace(tmp_path_factory: pytest.TempPathFactory, medical_index: Path) -> Path:
    """A real trace with rules fired, a mask, a threshold drop and top-k; the query text carries markup."""
    from typer.testing import CliRunner

    from engine.cli import app

    out = tmp_path_factory.mktemp("report") / "trace.json"
    result = CliRunner().invoke(app, ["explain", str(MEDICAL_CONFIG), "metformin kidney <script>alert(1)</script>",
                                      *US_CLINICIAN, "--index", str(medical_index), "--trace-out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out


def test_report_renders_in_a_real_browser(cli, medical_trace: Path, tmp_path: Path):
    chromium = _chromium()
    html = tmp_path / "report.html"
    result = cli("report", medical_trace, "--html", html)
    assert result.exit_code == 0, result.output
    text = html.read_text(encoding="utf-8")
    # Self-contained: no script, no external asset; user text escaped, never markup.
    assert "<script" not in text and "&lt;script&gt;" in text
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text
    assert "@media print" in text

    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, "--dump-dom", html.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    trace = json.loads(medical_trace.read_text())
    for element in ('id="stage-table"', 'id="result-table"', 'id="firings"', 'id="drop-table"', 'id="config-hash"',
                    'id="index-hash"', 'id="models"', 'id="rewrite"', 'class="segment"'):
        assert element in dom.stdout, element
    assert trace["config"]["sha256"] in dom.stdout and trace["index"]["manifest_sha256"] in dom.stdout
    for stage in ("access", "bm25", "overrides", "floor", "final"):
        assert f'data-stage="{stage}"' in dom.stdout
    assert "pin-fda-metformin-alert" in dom.stdout and "below_threshold" in dom.stdout
    assert 'data-doc="med-003"' in dom.stdout
    assert "<script>alert(1)</script>" not in dom.stdout  # the browser saw text, not a script element

    shot = tmp_path / "report.png"
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--screenshot={shot}", "--window-size=1280,1800",
                           html.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    width, height, sample = _png_pixels(shot)
    assert (width, height) == (1280, 1800)
    colours = set(sample)
    assert len(colours) > 20, f"screenshot looks blank: {len(colours)} distinct colours"
    # The score bars' palette blue (#4C78A8) is on the page, i.e. the inline CSS bars were painted.
    assert any(abs(c[0] - 0x4C) < 12 and abs(c[1] - 0x78) < 12 and abs(c[2] - 0xA8) < 12 for c in colours)


def test_report_from_a_trace_log_record(cli, medical_trace: Path, tmp_path: Path):
    trace = json.loads(medical_trace.read_text())
    log = tmp_path / "traces.jsonl"
    TraceLog(log).append({**trace, "trace_id": "first"})
    TraceLog(log).append(trace)
    html = tmp_path / "from-log.html"
    result = cli("report", log, "--html", html, "--seq", "0")
    assert result.exit_code == 0, result.output
    assert "first" in html.read_text(encoding="utf-8")
    result = cli("report", log, "--html", html, "--id", trace["trace_id"])
    assert result.exit_code == 0 and trace["trace_id"] in html.read_text(encoding="utf-8")


def test_report_errors_are_messages(tmp_path: Path, medical_trace: Path):
    from tests.workbench.conftest import run_sieve

    missing = run_sieve("report", tmp_path / "nope.json", "--html", tmp_path / "x.html")
    assert missing.returncode == 2 and "trace not found" in missing.stderr
    not_a_trace = tmp_path / "bad.json"
    not_a_trace.write_text('{"hello": 1}')
    bad = run_sieve("report", not_a_trace, "--html", tmp_path / "x.html")
    assert bad.returncode == 2 and "is not a Sieve trace" in bad.stderr and "Traceback" not in bad.stderr
    wrong = run_sieve("report", medical_trace, "--html", tmp_path / "x.html", "--seq", "1")
    assert wrong.returncode == 2 and "--seq select a record in a trace log" in wrong.stderr


def test_report_shows_a_rewrite_before_and_after(cli, bm25_index: Path, write_config, tmp_path: Path):
    """A real coreference rewrite (spaCy) in a conversation; the report shows the question and its rewrite."""
    pytest.importorskip("spacy")
    config = write_config(f"""
version: 1
index: {bm25_index}
stages:
  - {{id: rewrite, type: rewrite.coreference, params: {{model: en_core_web_sm}}}}
  - {{id: bm25, type: recall.bm25, inputs: [rewrite], params: {{top_k: 20}}}}
output: bm25
trace: {{log: null}}
""")
    trace_file = tmp_path / "conversation.json"
    result = cli("search", config, "Is it treatable?", "-H", "Tell me about throat cancer", "--trace-out", trace_file,
                 "--no-log")
    assert result.exit_code == 0, result.output
    rewritten = json.loads(trace_file.read_text())["query"]["rewritten"]
    assert rewritten and "throat cancer" in rewritten
    html = tmp_path / "conversation.html"
    assert cli("report", trace_file, "--html", html).exit_code == 0
    page = html.read_text(encoding="utf-8")
    assert '<span class="before">Is it treatable?</span>' in page
    assert f'<span class="after">{rewritten}</span>' in page


# ---------------------------------------------------------------------------- second audit


def test_report_says_whether_the_trace_is_vouched_for_by_its_log(cli, medical_trace: Path, medical_index: Path,
                                                                  tmp_path: Path):
    html = tmp_path / "unlogged.html"
    assert cli("report", medical_trace, "--html", html).exit_code == 0  # written by `explain`: never logged
    page = html.read_text(encoding="utf-8")
    assert 'id="unverified"' in page and "Unverified: this trace file was not logged" in page

    config = tmp_path / "pipeline.yaml"
    for name in ("access.yaml", "overrides.yaml"):
        shutil.copy(MEDICAL_CONFIG.parent / name, tmp_path / name)
    config.write_text(MEDICAL_CONFIG.read_text(encoding="utf-8")
                      .replace("index: ../../build/medical-index", f"index: {medical_index}")
                      .replace("trace:\n  log: null", f"trace: {{log: {tmp_path / 'log.jsonl'}}}"), encoding="utf-8")
    trace_file = tmp_path / "logged.json"
    assert cli("search", config, "metformin kidney", *US_CLINICIAN, "--trace-out", trace_file).exit_code == 0
    html = tmp_path / "logged.html"
    assert cli("report", trace_file, "--html", html).exit_code == 0
    page = html.read_text(encoding="utf-8")
    assert 'id="unverified"' not in page and 'id="verified"' in page and "matches record seq 0" in page


def test_report_names_the_pinning_rule(cli, medical_trace: Path, tmp_path: Path):
    html = tmp_path / "report.html"
    assert cli("report", medical_trace, "--html", html).exit_code == 0
    page = html.read_text(encoding="utf-8")
    assert "by override rule &#39;pin-fda-metformin-alert&#39; in stage &#39;overrides&#39;" in page
    assert "named in the stage" not in page


def test_report_shows_the_history_and_a_glossary_hash(cli, bm25_index: Path, write_config, tmp_path: Path):
    pytest.importorskip("jieba")
    glossary = tmp_path / "glossary.yaml"
    glossary.write_text("version: 1\nentries:\n  - {id: b12, terms: [vitamin B12, cobalamin]}\n", encoding="utf-8")
    config = write_config(f"""
version: 1
index: {bm25_index}
stages:
  - {{id: rewrite, type: rewrite.coreference, params: {{language: zh, glossary: {glossary}}}}}
  - {{id: bm25, type: recall.bm25, inputs: [rewrite], params: {{top_k: 20}}}}
output: bm25
trace: {{log: null}}
""")
    trace_file = tmp_path / "conversation.json"
    assert cli("search", config, "vitamin B12 and homocysteine", "-H", "Tell me about anaemia", "-H",
               "What causes it?", "--trace-out", trace_file).exit_code == 0
    trace = json.loads(trace_file.read_text())
    digest = next(m for m in trace["models"] if m["stage"] == "rewrite")["glossary"]["sha256"]
    html = tmp_path / "conversation.html"
    assert cli("report", trace_file, "--html", html).exit_code == 0
    page = html.read_text(encoding="utf-8")
    assert digest in page and "glossary (glossary.yaml)" in page
    assert '<ol class="history"><li>Tell me about anaemia</li><li>What causes it?</li></ol>' in page


def test_report_makes_bidi_controls_visible(cli, write_config, tmp_path: Path):
    from engine.index import build_index

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sneaky = "invoice\u202efdp.exe"
    (corpus / "corpus.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in [
        {"_id": "invoice", "title": "refund \u2067approved\u2069 policy", "text": "refund policy for invoices"},
        {"_id": "plain", "title": "other", "text": "refund of something else"},
    ]), encoding="utf-8")
    build_index(corpus, tmp_path / "idx", {"bm25": {}})
    config = write_config(f"""
version: 1
index: {tmp_path / 'idx'}
stages:
  - {{id: bm25, type: recall.bm25, params: {{top_k: 5}}}}
output: bm25
trace: {{log: null, include_document_text: true}}
""")
    trace_file = tmp_path / "t.json"
    assert cli("search", config, "refund policy", "--trace-out", trace_file).exit_code == 0
    # An id like this one is refused by `sieve index` since 0.10.0; a trace of an older index can still hold one.
    trace_file.write_text(trace_file.read_text(encoding="utf-8").replace('"invoice"', json.dumps(sneaky)),
                          encoding="utf-8")
    html = tmp_path / "r.html"
    assert cli("report", trace_file, "--html", html).exit_code == 0
    page = html.read_text(encoding="utf-8")
    assert "invoice[U+202E]fdp.exe" in page and "refund [U+2067]approved[U+2069] policy" in page
    assert not any(c in page for c in "\u202e\u2067\u2069")


def test_report_names_the_engine_that_ran_the_trace_and_the_one_that_rendered_it(cli, medical_trace: Path,
                                                                                tmp_path: Path):
    """From an upgrade audit: a 0.5.0 trace rendered by a later Sieve said 'by Sieve 0.5.0' in its footer and its
    generator tag; the page is the renderer's artefact, the run the trace's."""
    from engine import __version__

    old = tmp_path / "old.json"
    old.write_text(json.dumps({**json.loads(medical_trace.read_text()), "engine_version": "0.5.0"}), encoding="utf-8")
    html = tmp_path / "old.html"
    result = cli("report", old, "--html", html)
    assert result.exit_code == 0, result.output
    page = html.read_text(encoding="utf-8")
    assert f'<meta name="generator" content="Sieve {__version__}">' in page
    assert f"(run by Sieve 0.5.0) by Sieve {__version__}." in page


# From the report's accessibility and audit-completeness audit (report-only helper, real Chromium): the page left out
# how a rewrite and a rule fired, reused colours past ten signals, dropped collapsed trees from a printout, showed the
# verdict on page 1 only, and cut the drop list with a row that read as a document.


def test_report_shows_on_what_evidence_each_rule_fired_and_which_did_not(cli, medical_trace: Path, tmp_path: Path):
    html = tmp_path / "r.html"
    assert cli("report", medical_trace, "--html", html).exit_code == 0
    page = html.read_text(encoding="utf-8")
    trace = json.loads(medical_trace.read_text(encoding="utf-8"))
    overrides = next(s for s in trace["stages"] if s["type"].startswith("rules.override"))["details"]
    fired = overrides["firings"][0]
    assert fired["when"] or fired.get("match")
    row = page[page.index('<tr class="firing">'):].split("</tr>")[0]
    assert 'class="evidence"' in row and "matched" in row  # before: rule, action and effect only
    assert '<h3>Override rules (ranking)</h3>' in page  # before: under the "Access rules (prefilter)" heading
    for rule, reason in overrides["inactive_rules"].items():
        assert f"<strong>{rule}</strong></th><td>{reason}</td>" in page  # before: not on the page
    access = next(s for s in trace["stages"] if s["type"].startswith("rules.prefilter"))["details"]
    for tests in access.get("resolved_dates", {}).values():
        for moment in tests.values():
            assert moment in page


def test_report_shows_what_a_rewrite_changed_and_the_glossary_entries_it_applied(cli, bm25_index, tmp_path: Path):
    config = tmp_path / "conv.yaml"
    config.write_text((ROOT / "configs" / "conversational.yaml").read_text(encoding="utf-8")
                      .replace("glossary: glossary.yaml", f"glossary: {ROOT / 'configs' / 'glossary.yaml'}"),
                      encoding="utf-8")
    trace_file, html = tmp_path / "t.json", tmp_path / "r.html"
    searched = cli("search", config, "Is it treatable?", "-H", "What is throat cancer?", "--index", bm25_index,
                   "--trace-out", trace_file, "--no-log")
    assert searched.exit_code == 0, searched.output
    assert cli("report", trace_file, "--html", html).exit_code == 0
    page = html.read_text(encoding="utf-8")
    basis = page[page.index('id="rewrite-basis-rewrite"'):].split("</table>")[0]
    assert "'it' → 'throat cancer'" in basis and "pronoun" in basis and "most salient" in basis
    assert "glossary entry <strong>throat-cancer</strong>" in basis
    assert 'id="glossary-hits"' in page and "<strong>throat-cancer</strong></th><td>expand</td>" in page
    assert "<title>UNVERIFIED: Sieve trace" in page


def test_report_gives_every_signal_its_own_colour():
    from engine.workbench.report import _colour

    assigned: dict[str, str] = {}
    colours = [_colour(f"term '{i}'", assigned) for i in range(40)]
    assert len(set(colours)) == 40  # before: from the eleventh on, by hash among the ten: shared colours
    assert _colour("term '3'", assigned) == colours[3]


def test_report_prints_collapsed_trees_and_the_verdict_on_every_page(cli, medical_trace: Path, tmp_path: Path):
    chromium = _chromium()
    html = tmp_path / "r.html"
    assert cli("report", medical_trace, "--html", html).exit_code == 0
    page = html.read_text(encoding="utf-8")
    # `explain --trace-out` writes a trace it does not log: the report is of an unverified trace
    assert "details::details-content" in page and "@top-left" in page and "<title>UNVERIFIED: Sieve trace" in page
    closed = tmp_path / "closed.html"
    closed.write_text(page.replace('<details class="explanation" open>', '<details class="explanation">'),
                      encoding="utf-8")
    pdf = tmp_path / "r.pdf"
    printed = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--print-to-pdf={pdf}", closed.as_uri()],
                             capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0 and pdf.exists(), printed.stderr[-2000:]
    pdftotext = shutil.which("pdftotext")
    if pdftotext is None:
        pytest.skip("pdftotext (poppler-utils) not found: the PDF's text cannot be read")
    text = subprocess.run([pdftotext, "-layout", str(pdf), "-"], capture_output=True, text=True, timeout=60).stdout
    pages = text.split("\f")
    trace_id = json.loads(medical_trace.read_text(encoding="utf-8"))["trace_id"]
    assert all(f"UNVERIFIED: Sieve trace {trace_id}" in p for p in pages if p.strip())  # before: page 1 only
    assert "reciprocal rank fusion" in text or "BM25" in text  # a collapsed tree prints (before: its summary only)


def test_report_says_where_the_drops_beyond_its_cap_are_and_what_each_drop_had_received(cli, medical_trace: Path,
                                                                                        tmp_path: Path):
    from engine.workbench.report import MAX_DROPS_PER_STAGE, render_report

    trace = json.loads(medical_trace.read_text(encoding="utf-8"))
    final = next(s for s in trace["stages"] if s.get("drops") and len(s["inputs"]) == 1)
    received = dict((doc, rank) for rank, (doc, _) in enumerate(
        next(s for s in trace["stages"] if s["id"] == final["inputs"][0])["output"], start=1))
    dropped = final["drops"][0]["doc_id"]
    page = render_report(trace)
    row = page[page.index(f'<th scope="row" class="mono">{dropped}</th>'):].split("</tr>")[0]
    assert f'<td class="num">{received[dropped]}</td>' in row  # the rank it had in what the stage received
    many = json.loads(json.dumps(trace))
    stage = next(s for s in many["stages"] if s["id"] == final["id"])
    stage["drops"] = [{"doc_id": f"d{i}", "reason": "beyond_top_k", "detail": "k=5"} for i in range(250)]
    page = render_report(many)
    assert page.count('<tr class="drop">') == MAX_DROPS_PER_STAGE  # before: 201, one of them "…", "more"
    assert (f"Stage '{final['id']}' dropped 250 candidates: the first {MAX_DROPS_PER_STAGE} are listed" in page
            and f"stages[{final['id']}].drops" in page)


def test_report_holds_the_resolved_config_and_marks_the_querys_language(medical_trace: Path):
    from engine.workbench.report import render_report

    trace = json.loads(medical_trace.read_text(encoding="utf-8"))
    page = render_report(trace)
    block = page[page.index('id="resolved-config"'):].split("</details>")[0]
    assert '&#34;stages&#34;' in block or '"stages"' in block  # every stage's parameters, not only the sha256
    trace["query"]["language"] = "zh"
    assert '<dd dir="auto" lang="zh">' in render_report(trace)


def test_every_bar_colour_stands_out_from_the_bars_track():
    """Report audit F7: 7 of the 10 palette colours had under 3:1 contrast against the bar's track (WCAG 1.4.11)."""
    import colorsys
    import re

    from engine.workbench.report import _colour

    def luminance(rgb: tuple[float, float, float]) -> float:
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    def rgb(colour: str) -> tuple[float, float, float]:
        if colour.startswith("#"):
            return tuple(int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]
        hue, saturation, lightness = map(float, re.findall(r"[\d.]+", colour))
        return colorsys.hls_to_rgb(hue / 360, lightness / 100, saturation / 100)

    track = luminance(rgb("#f4f6fa"))
    assigned: dict[str, str] = {}
    for i in range(80):  # the palette, then golden-angle hues round the circle several times
        colour = _colour(f"signal {i}", assigned)
        assert (track + 0.05) / (luminance(rgb(colour)) + 0.05) >= 3.0, colour


_REFLOW_PROBE = """<script>
window.addEventListener('load', () => {
  const width = document.documentElement.clientWidth, outside = [];
  const scrolls = (e) => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX)
    && e.getBoundingClientRect().right <= width + 1;
  for (const e of document.querySelectorAll('body *')) {
    const box = e.getBoundingClientRect();
    if (box.width === 0 || box.right <= width + 1) continue;
    let p = e.parentElement;
    while (p && !scrolls(p)) p = p.parentElement;
    if (!p) outside.push(e.tagName + (e.id ? '#' + e.id : '') + ' right=' + Math.round(box.right));
  }
  parent.postMessage(JSON.stringify({width, scroll: document.documentElement.scrollWidth, outside}), '*');
});
</script>"""


def test_report_reflows_at_320_css_pixels(cli, medical_trace: Path, tmp_path: Path):
    """WCAG 2.2 1.4.10 (Reflow): at 320 CSS px the page does not scroll sideways; what is wider than that (the
    tables) scrolls inside its own region. The report rendered in a 320 px wide frame (a headless window cannot be
    made narrower than ~500 px), every element's box measured by the browser."""
    chromium = _chromium()
    html = tmp_path / "r.html"
    assert cli("report", medical_trace, "--html", html).exit_code == 0
    probed = tmp_path / "probed.html"
    probed.write_text(html.read_text(encoding="utf-8").replace("</body>", _REFLOW_PROBE + "</body>"), encoding="utf-8")
    frame = tmp_path / "frame.html"
    frame.write_text('<html><body><iframe src="probed.html" width="320" height="800"></iframe><pre id="out"></pre>'
                     "<script>addEventListener('message', e => document.getElementById('out').textContent = e.data)"
                     "</script></body></html>", encoding="utf-8")
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, "--allow-file-access-from-files", "--virtual-time-budget=10000",
                          "--dump-dom", frame.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    import html as markup
    import re

    found = re.search(r'<pre id="out">(.*?)</pre>', dom.stdout, re.S)
    assert found and found.group(1), dom.stdout[-2000:]
    measured = json.loads(markup.unescape(found.group(1)))
    assert measured["width"] <= 320 and measured["scroll"] == measured["width"], measured
    assert measured["outside"] == [], measured["outside"][:20]
