"""A real headless Chromium opens the report offline: no console errors, every image decodes, a screenshot."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package `chromium`)"),
]

# Injected first in <head> of a copy of the page: records errors from any later script or resource, clicks a
# table header (the page's only script), then writes what it saw into the DOM for --dump-dom to print.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  __errors.push(String(e.message || (e.target && e.target.src)));
}, true);
var __consoleError = console.error;
console.error = function () {
  __errors.push(Array.from(arguments).join(" ")); __consoleError.apply(console, arguments);
};
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
