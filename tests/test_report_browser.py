"""The HTML report in a real browser: headless Chromium runs its scripts and lays it out.

No Python browser library: Chromium's own ``--dump-dom`` prints the DOM after the scripts ran,
and ``--screenshot`` writes a PNG. The page records script errors in ``<html data-js-errors>``
and counts its drawn charts into ``<body data-charts-drawn>`` (see reports/html.py). The
screenshot is kept at runs/report-screenshot.png for a person to look at.

Needs Debian's ``chromium`` (``make chromium`` installs it); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from reports.html import render_html

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXPECTED_CHARTS = 12  # the fixture: 2 models x 4 charts + memory + roofline + drift + speed against quality

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run `make chromium` "
                                "(apt-get install chromium) to test the HTML report in a browser")

# Added to a copy of the page by this test only: click the "decode tok/s" header of the best
# configuration table twice and record the column before and after, to prove the sorting works.
SORT_PROBE = """
<script>
(function () {
  var table = document.getElementById("table-best");
  var col = Array.prototype.findIndex.call(table.tHead.rows[0].cells,
                                           function (th) { return th.textContent === "decode tok/s"; });
  function column() {
    return Array.prototype.map.call(table.tBodies[0].rows,
                                    function (r) { return Number(r.cells[col].getAttribute("data-sort")); });
  }
  var th = table.tHead.rows[0].cells[col];
  th.click();
  var up = column();
  th.click();
  document.body.setAttribute("data-sort-probe", JSON.stringify({up: up, down: column(),
                                                                 state: th.getAttribute("aria-sort")}));
})();
</script>
"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


class Dom(HTMLParser):
    def __init__(self, html: str):
        super().__init__()
        self.attrs: dict[str, dict] = {}
        self.charts: list[int] = []  # marks per chart
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("html", "body"):
            self.attrs[tag] = a
        if tag == "svg" and "chart" in (a.get("class") or "").split():
            self.charts.append(0)
        elif self.charts and "mark" in (a.get("class") or "").split():
            self.charts[-1] += 1


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    run = json.loads((ROOT / "tests" / "fixtures" / "run_a.json").read_text())
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render_html([run]), encoding="utf-8")
    return path


def test_scripts_run_without_errors_and_every_chart_is_drawn(page, tmp_path):
    probed = page.with_name("probed.html")
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", SORT_PROBE + "</body>"),
                      encoding="utf-8")
    result = chromium("--dump-dom", probed.as_uri(), profile=tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = Dom(result.stdout)
    assert "body" in dom.attrs, "chromium printed no DOM"
    assert "data-js-errors" not in dom.attrs["html"], dom.attrs["html"]["data-js-errors"]
    assert "Uncaught" not in result.stderr, [ln for ln in result.stderr.splitlines() if "Uncaught" in ln]
    body = dom.attrs["body"]
    assert body["data-charts-expected"] == str(EXPECTED_CHARTS)
    assert body["data-charts-drawn"] == str(EXPECTED_CHARTS)  # written by the page's own script
    assert len(dom.charts) == EXPECTED_CHARTS and all(n > 0 for n in dom.charts)
    probe = json.loads(body["data-sort-probe"])
    assert probe["up"] == sorted(probe["up"]) and probe["down"] == sorted(probe["up"], reverse=True)
    assert probe["up"] != probe["down"] and probe["state"] == "descending"


def test_screenshot(page, tmp_path):
    out = ROOT / "runs" / "report-screenshot.png"
    out.parent.mkdir(exist_ok=True)
    out.unlink(missing_ok=True)
    result = chromium(f"--screenshot={out}", "--window-size=1400,3000", page.as_uri(),
                      profile=tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 3000)
