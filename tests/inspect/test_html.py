"""The HTML report: written for a compiled tiny LLaMA, checked as a document (self-contained,
well-formed, the facts it shows) and rendered in headless Chromium (no console errors,
script ran, plots decoded, screenshot not blank).

Chromium is required, not optional: CI installs it with ``scripts/install_chromium.sh``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from qqq_compile.annotations import annotate
from qqq_compile.inspect import write_html_report
from qqq_compile.inspect.graphview import segments

W4A8 = torch.ops.qqq.w4a8_linear.default
VOID = {"meta", "link", "img", "input", "br", "hr", "source", "wbr", "col", "area", "base", "embed", "track"}
ACCURACY = {
    "protocol": "BOS + 511 tokens, 40 windows",
    "rows": [
        {"name": "fp32", "perplexity": 20.5, "delta_pct": 0.0, "seconds": 10.0, "peak_rss": 1.0e9},
        {"name": "rtn", "perplexity": 25.1, "delta_pct": 22.4, "seconds": 12.0, "peak_rss": 1.1e9},
        {"name": "broken row without perplexity"},
    ],
}


class Structure(HTMLParser):
    """Checks that every non-void element is closed in order and collects ids, tags, links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.tags: dict[str, int] = {}
        self.refs: list[str] = []
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def _attrs(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for k, v in attrs:
            if k == "id":
                self.ids.append(v or "")
            if k in ("src", "href") and v is not None:
                self.refs.append(v)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)  # <rect/> and friends inside inline SVG

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
        else:
            self.stack.pop()


@pytest.fixture(scope="module")
def report(rtn_llama, tmp_path_factory):
    _, compiled = rtn_llama
    folder = tmp_path_factory.mktemp("report")
    acc = folder / "accuracy.json"
    acc.write_text(json.dumps(ACCURACY))
    path = write_html_report(compiled, folder / "sub" / "report.html", accuracy_json=acc)
    return compiled, path


def test_report_is_self_contained_and_well_formed(report):
    compiled, path = report
    text = path.read_text(encoding="utf-8")
    p = Structure()
    p.feed(text)
    p.close()
    assert p.doctype.lower() == "doctype html"
    assert p.errors == [] and p.stack == []
    assert len(p.ids) == len(set(p.ids)), "duplicate element ids"
    head = text.split("<body")[0]
    assert head.count("<title>") == 1 and '<meta charset="utf-8">' in head
    # Nothing outside the file: only in-page anchors and data: URIs.
    assert p.refs and all(r.startswith(("#", "data:")) for r in p.refs), [r[:60] for r in p.refs]
    assert not re.search(r"https?://", text)
    # Facts shown: 15 linear rows, one drawing per segment, one
    # highlighted box per W4A8 kernel in the graph and one float linear (lm_head).
    linears = text.split('<section id="linears">')[1].split("</table>")[0]
    assert linears.count("<tr") == 1 + 15
    # Plots: SQNR and perplexity; RTN without calibration has no activation statistics.
    assert re.findall(r'<img class="plot" alt="([^"]+)"', text) == ["weight SQNR per linear", "perplexity per pipeline"]
    assert "No smoothing in this pipeline" in text
    assert text.count('<svg class="graph"') == len(segments(compiled.graph_module))
    n_kernels = sum(1 for n in compiled.graph_module.graph.nodes if n.target is W4A8)
    assert text.count('class="node qqq') == n_kernels == 14
    assert text.count('class="node float-linear') == 1
    assert "14/15 linears lowered to W4A8" in text
    assert "BOS + 511 tokens" in text and "broken row" not in text


def test_report_renders_in_chromium(report, tmp_path):
    _, path = report
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.fail("headless Chromium is not installed; install it with scripts/install_chromium.sh")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--enable-logging=stderr", "--v=0",
    ]  # fmt: skip

    def console_of(url: str) -> tuple[str, list[str]]:
        run = subprocess.run([exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout, [line for line in run.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]

    # Control: this Chromium does report a page's script errors on stderr.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><title>x</title></head><body><script>nope();</script></body></html>")
    assert any("Uncaught ReferenceError" in line for line in console_of(bad.as_uri())[1])

    url = path.resolve().as_uri()
    dom, console = console_of(url)
    assert console == []  # any console message (script error, failed load, warning) is a defect
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    assert 'data-report-ready="1"' in body.group(0)  # the script ran to its end
    assert 'data-plots="2/2"' in body.group(0)  # every embedded PNG decoded

    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [exe, *flags, "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    import matplotlib.image

    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (1600, 1200)
    assert float(img[..., :3].std()) > 0.05, "screenshot is blank"


def test_report_shows_smoothing(rtn_llama, tmp_path):
    from tests.inspect.test_table import FakeSmooth

    _, compiled = rtn_llama
    nodes = [n for n in compiled.graph_module.graph.nodes if n.target is W4A8]
    before = torch.ones(64)
    before[7] = 40.0  # an outlier channel, flattened by smoothing
    rec = FakeSmooth("layers.0.attn_in", torch.full((64,), 2.0), before, torch.full((64,), 3.0), 2.0, 0.5)
    try:
        for n in nodes[:3]:
            annotate(n, smooth=rec)
        text = write_html_report(compiled, tmp_path / "r.html").read_text()
    finally:
        for n in nodes[:3]:
            annotate(n, smooth=None)
    section = text.split('<section id="smoothing">')[1].split("</section>")[0]
    assert "layers.0.attn_in" in section and "q_proj, k_proj, v_proj" in section
    assert 'data-v="40.0"' in section and 'data-v="1.0"' in section  # max/median before → after
    assert section.count("<img") == 1
    assert text.count('class="node qqq smoothed"') == 3
