"""A real headless Chromium opens the report offline: no console errors, every image decodes, a screenshot; and the
page of every study: a row per study, each link opening its report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support.stores import index_rows, study_site

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package `chromium`)"),
]

# Injected first in <head> of a copy of the page: records errors from any later script or resource, clicks a
# table header (the page's only script), then writes what it saw into the DOM for --dump-dom to print.
ERRORS = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  __errors.push(String(e.message || (e.target && e.target.src)));
}, true);
var __consoleError = console.error;
console.error = function () {
  __errors.push(Array.from(arguments).join(" ")); __consoleError.apply(console, arguments);
};
</script>"""
PROBE = ERRORS + """<script>
window.addEventListener("load", function () {
  var th = document.querySelector("table.sortable th"); if (th) { th.click(); th.click(); }
  var images = Array.from(document.images).map(function (i) { return [i.alt, i.complete, i.naturalWidth]; });
  var pre = document.createElement("pre"); pre.id = "ablate-probe";
  pre.textContent = JSON.stringify({errors: __errors, images: images});
  document.body.appendChild(pre);
});
</script>"""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_page_loads_without_errors_and_every_image_decodes(tmp_path, built_ablation):
    _, path, page = built_ablation
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")
    out = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="ablate-probe">(.*?)</pre>', out.stdout, re.S)
    assert found, f"the probe never ran: {out.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert seen["errors"] == []
    assert [line for line in out.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line] == []
    assert len(seen["images"]) == page.count("<img ")
    assert [img for img in seen["images"] if not (img[1] and img[2] > 0)] == []

    shot = tmp_path / "report.png"
    chromium(tmp_path, "--window-size=1366,3000", f"--screenshot={shot}", path.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000


# Injected into a copy of reports/index.html: the rows the browser shows (after a sort, so the script ran), each
# study's link as the browser resolves it, and any error.
INDEX_PROBE = """<script>
window.addEventListener("load", function () {
  var th = document.querySelector("table.sortable th"); if (th) { th.click(); th.click(); }
  var rows = Array.from(document.querySelectorAll("tr.study")).map(function (tr) {
    var a = tr.querySelector("a"); return [tr.dataset.study, tr.cells.length, a ? a.href : null];
  });
  var pre = document.createElement("pre"); pre.id = "ablate-index-probe";
  pre.textContent = JSON.stringify({errors: __errors, rows: rows});
  document.body.appendChild(pre);
});
</script>"""
FOLLOW = """<script>
window.addEventListener("load", function () { document.querySelector('tr[data-study="%s"] a').click(); });
</script>"""


def test_index_page_shows_a_row_per_study_and_its_links_open_the_reports(tmp_path, built_ablation):
    from ablate.report import build_index

    root = study_site(built_ablation)
    site = tmp_path / "reports"
    shutil.copytree(root / "reports", site)
    page = build_index([f"sqlite:///{root / 'optuna.db'}"], site).read_text()
    assert len(index_rows(page)) == 4

    probe = site / "probe.html"  # beside the index, so its relative links resolve as the index's own
    probe.write_text(page.replace("<head>", "<head>\n" + ERRORS + INDEX_PROBE, 1), encoding="utf-8")
    out = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="ablate-index-probe">(.*?)</pre>', out.stdout, re.S)
    assert found, f"the probe never ran: {out.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert seen["errors"] == []
    assert sorted(name for name, _, _ in seen["rows"]) == ["fresh", "hunt", "toy", "weird"]
    assert {cells for _, cells, _ in seen["rows"]} == {10}
    links = {name: href for name, _, href in seen["rows"] if href}
    assert links == {name: (site / name / "index.html").as_uri() for name in ("toy", "hunt")}

    probe.write_text(page.replace("<head>", "<head>\n" + FOLLOW % "toy", 1), encoding="utf-8")
    out = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert "<title>toy: ablate report</title>" in out.stdout  # the click landed on the study's own report
    assert '<section id="answer">' in out.stdout
