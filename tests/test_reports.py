"""The renderers (reports/): golden files, structure, escaping, and the run comparison.

The fixtures are synthetic runs (tests/fixtures/run_a.json, run_b.json, written by
tests/fixtures/make_fixtures.py). The golden files hold the exact rendered output; after an
intended change to a renderer, regenerate them and review the diff:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_reports.py
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bench.results.compare import FASTER, NOT_COMPARABLE, SAME, SLOWER, compare_runs
from bench.spec import cell_id as cell_key
from bench.results.stats import nested_ratio_ci
from reports import charts
from reports.compare import compare_markdown, compare_table
from reports.format import group_runs
from reports.sections import sections
from reports.html import render_html
from reports.markdown import render_markdown

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"


def load(name: str) -> dict:
    return json.loads((HERE / "fixtures" / name).read_text())


@pytest.fixture(scope="module")
def run_a() -> dict:
    return load("run_a.json")


@pytest.fixture(scope="module")
def run_b() -> dict:
    return load("run_b.json")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing; create it with UPDATE_GOLDEN=1"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, (f"{name} differs from the golden file; if the change is intended, "
                              "regenerate with UPDATE_GOLDEN=1 and review the diff")


# --- helpers that read the output back -----------------------------------------------------------

def md_tables(md: str) -> dict[str, list[list[str]]]:
    """Markdown tables keyed by the heading above them ('Heading #2' for a second one): header row
    first, then the body rows; a cell keeps its Markdown (bold, <br>)."""
    tables: dict[str, list[list[str]]] = {}
    heading, current = None, None
    for line in md.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if current is None:
            n = sum(1 for k in tables if k == heading or k.startswith(f"{heading} #"))
            current = tables.setdefault(heading if n == 0 else f"{heading} #{n + 1}", [])
            current.append(cells)
        elif not set("".join(cells)) <= set("-:"):  # skip the alignment row
            current.append(cells)
    return tables


class Page(HTMLParser):
    """Tags, attributes and table cells of an HTML page."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.svgs: list[dict] = []  # per chart: number of elements with class "mark"
        self._table = self._cell = None
        self._svg_depth = 0
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "svg" and "chart" in (a.get("class") or "").split():
            self.svgs.append({"marks": 0, "label": a.get("aria-label")})
        elif self.svgs and "mark" in (a.get("class") or "").split():
            self.svgs[-1]["marks"] += 1
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data + " ")


def best_decode(run: dict, model: str, backend: str, precision: str, batch: int) -> dict:
    """The fixture's fastest ok cell over thread counts, computed here independently."""
    cells = [c for c in run["cells"] if (c["model"], c["backend"], c["precision"], c["batch"], c["status"])
             == (model, backend, precision, batch, "ok")]
    return max(cells, key=lambda c: c["decode_tok_s"])


# --- Markdown --------------------------------------------------------------------------------------

def test_markdown_golden(run_a):
    check_golden("report_a.md", render_markdown([run_a]))


def test_markdown_is_deterministic_and_order_independent(run_a):
    shuffled = copy.deepcopy(run_a)
    shuffled["cells"].reverse()
    assert render_markdown([run_a]) == render_markdown([shuffled])


def test_markdown_model_table_rows_columns_and_values(run_a):
    tables = md_tables(render_markdown([run_a]))
    tiny = tables["Model tiny (0.50 M parameters)"]
    assert tiny[0] == ["backend · precision", "batch 1", "batch 2", "batch 4"]
    rows = {r[0]: r[1:] for r in tiny[1:]}
    assert sorted(rows) == sorted({f"{c['backend']} · {c['precision']}" for c in run_a["cells"]})
    assert rows["cuda · fp16"] == ["skipped"] * 3
    # onnxruntime, batch 4: the fastest thread count's rate, with the interval derived from tpot's ci95
    c = best_decode(run_a, "tiny", "onnxruntime", "fp32", 4)
    lo, hi = 4000 / c["tpot_ms"]["ci95_high"], 4000 / c["tpot_ms"]["ci95_low"]
    expected = f"**{c['decode_tok_s']:,.0f} ({lo:,.0f}–{hi:,.0f})**"
    assert rows["onnxruntime · fp32"][2].split("<br>")[0] == expected
    assert f"{c['threads']} thr" in rows["onnxruntime · fp32"][2]
    assert "✓ 100%" in rows["onnxruntime · fp32"][2]
    # the parity failure shows as a cross with its agreement; the timeout beside an ok thread count too
    small = {r[0]: r[1:] for r in tables["Model small (4.34 M parameters)"][1:]}
    assert "✗ 81%" in small["int8 · int8"][2]
    assert "1 thr: timeout" in small["ipex · bf16"][2]


def test_markdown_best_configuration_skips_parity_failures(run_a):
    best = md_tables(render_markdown([run_a]))["Best configuration"]
    rows = {(r[0], r[1]): r for r in best[1:]}
    assert len(rows) == 6  # 2 models x 3 batches
    # small, batch 4: int8 is the fastest cell but failed parity, so it is not the best
    fastest = max((c for c in run_a["cells"] if c["model"] == "small" and c["batch"] == 4
                   and c["status"] == "ok"), key=lambda c: c["decode_tok_s"])
    assert fastest["backend"] == "int8" and not fastest["parity"]["passed"]
    assert rows[("small", "4")][2] == "openvino · fp32"
    c = best_decode(run_a, "tiny", "onnxruntime", "fp32", 1)
    assert rows[("tiny", "1")][2] == "onnxruntime · fp32"
    assert rows[("tiny", "1")][4].startswith(f"**{c['decode_tok_s']:,.0f} (")
    eager = best_decode(run_a, "tiny", "eager", "fp32", 1)
    assert rows[("tiny", "1")][5] == f"×{c['decode_tok_s'] / eager['decode_tok_s']:.2f}"


def test_markdown_thread_scaling(run_a):
    scaling = md_tables(render_markdown([run_a]))["Thread scaling"]
    assert scaling[0] == ["model", "backend · precision", "batch", "1 thr tok/s", "2 thr tok/s",
                          "speed-up 2 vs 1 thr"]
    assert len(scaling) - 1 == 2 * 7 * 3  # models x backends that ran x batches
    by = {(c["model"], c["backend"], c["batch"], c["threads"]): c
          for c in run_a["cells"] if c["precision"] == "fp32"}
    one, two = by[("small", "mkl", 4, 1)], by[("small", "mkl", 4, 2)]
    row = next(r for r in scaling[1:] if r[:3] == ["small", "mkl · fp32", "4"])
    s = two["decode_tok_s"] / one["decode_tok_s"]
    assert row[5] == f"×{s:.2f} · {100 * s / 2:.0f}%"
    timeout_row = next(r for r in scaling[1:] if r[:3] == ["small", "ipex · bf16", "4"])
    assert timeout_row[3] == "—" and timeout_row[5] == "—"


def test_markdown_lists_cells_that_did_not_pass(run_a):
    md = render_markdown([run_a])
    tables = md_tables(md)
    parity = tables["Cells that did not pass"]
    assert parity[1][:4] == ["small", "int8 · int8", "4", "2"] and parity[1][5] == "81.2%"
    problems = {(r[0], r[1]): r for r in tables["Cells that did not pass #3"][1:]}
    assert set(problems) == {("cuda · fp16", "skipped"), ("ipex · bf16", "timeout"),
                             ("openvino · fp32", "failed")}
    assert problems[("cuda · fp16", "skipped")][2].startswith("12: tiny, small")
    assert "torch.cuda.is_available() is False" in problems[("cuda · fp16", "skipped")][3]
    # the failure's reason holds '<plugin>' and '&': escaped, so GitHub shows them as text
    assert "&lt;plugin>/cpu/node.cpp: past_key &amp; value" in problems[("openvino · fp32", "failed")][3]


def test_markdown_environment_header(run_a):
    md = render_markdown([run_a])
    for needle in ("AMD EPYC 7B13", "avx2 ✓", "avx512_bf16 ✗", "amx ✗", "2 physical / 2 logical cores",
                   "23.4 GB", "torch 2.8.0+cu128", "onnxruntime 1.32.0", "memory bandwidth 12.3 GB/s",
                   "fp32 150", "9d66642", "20261123-154500-ab12 (2026-11-23T15:45:00+00:00)",
                   "How to read this"):
        assert needle in md, needle


def test_runs_with_one_fingerprint_merge_and_later_cells_win(run_a):
    later = copy.deepcopy(run_a)
    later.update(run_id="20261123-170000-ef56", created_at="2026-11-23T17:00:00+00:00")
    later["cells"] = [c for c in later["cells"] if c["model"] == "tiny" and c["backend"] == "eager"]
    for c in later["cells"]:
        c["decode_tok_s"] = 99999.0
    machines = group_runs([later, run_a])
    assert len(machines) == 1 and len(machines[0].cells) == len(run_a["cells"])
    assert [r["run_id"] for r in machines[0].runs] == ["20261123-154500-ab12", "20261123-170000-ef56"]
    merged = {cell_key(c): c for c in machines[0].cells}
    assert all(merged[cell_key(c)]["decode_tok_s"] == 99999.0 for c in later["cells"])


def test_runs_with_different_fingerprints_are_never_mixed(run_a, run_b):
    md = render_markdown([run_b, run_a])
    assert "## Environment 1 of 2: AMD EPYC 7B13, fingerprint 3f2a9c01d4e7" in md
    assert "## Environment 2 of 2: AMD EPYC 7B13, fingerprint 8b1e47f0c2d9" in md
    assert md.index("onnxruntime 1.32.0") < md.index("onnxruntime 1.33.0")  # oldest first
    assert md.count("### Model tiny") == 2


def test_degenerate_runs_render(run_a):
    skipped = copy.deepcopy(run_a)
    for c in skipped["cells"]:
        c.update(status="skipped", reason="no device", decode_tok_s=None, tpot_ms=None, ttft_ms=None,
                 samples=None, parity=None, peak_rss_mb=None)
    skipped["rounds"] = []
    md, page = render_markdown([skipped]), Page(render_html([skipped]))
    assert md.count("No cell ran to the end") == 2 and "Best configuration" not in md_tables(md)
    assert page.svgs == [] and "no device" in md
    assert "how much the machine drifted during them is unknown" in md
    # one model, one batch, the library's default thread count, no raw samples
    minimal = copy.deepcopy(run_a)
    minimal["cells"] = [c for c in minimal["cells"]
                        if (c["model"], c["batch"], c["threads"]) == ("tiny", 1, 1)]
    for c in minimal["cells"]:
        c.update(threads=None, samples=None)
    md, page = render_markdown([minimal]), Page(render_html([minimal]))
    assert "Thread scaling" not in md and "| tiny | 1 | onnxruntime · fp32 | default |" in md
    assert [s["label"] for s in page.svgs] == [
        "Decode rate against batch — tiny", "Latency against throughput — tiny",
        "Peak memory against model size", "Achieved decode rate against the roofline",
        "Machine drift: the sentinel over the rounds"]


def test_no_runs_is_an_error():
    with pytest.raises(ValueError, match="no runs"):
        render_markdown([])
    with pytest.raises(ValueError, match="'x'.*cells"):
        render_html([{"run_id": "x"}])


# --- HTML ------------------------------------------------------------------------------------------

CHARTS_PER_MODEL = 4  # decode against batch, tpot distribution, latency/throughput, thread scaling
CHARTS_PER_ENV = 4  # memory against model size, achieved against roofline, the drift sentinel, speed against quality


def test_html_golden(run_a):
    check_golden("report_a.html", render_html([run_a]))


def test_html_parses_and_has_every_chart_with_marks(run_a):
    html = render_html([run_a])
    page = Page(html)
    expected = 2 * CHARTS_PER_MODEL + CHARTS_PER_ENV
    assert len(page.svgs) == expected
    assert all(s["marks"] > 0 for s in page.svgs), [s["label"] for s in page.svgs if not s["marks"]]
    labels = [s["label"] for s in page.svgs]
    for title in ("Decode rate against batch — tiny", "Time per output token — small, batch 1",
                  "Latency against throughput — tiny", "Thread scaling — small, batch 1",
                  "Peak memory against model size", "Achieved decode rate against the roofline"):
        assert title in labels
    body = next(a for t, a in page.tags if t == "body")
    assert body["data-charts-expected"] == str(expected)
    ids = [a["id"] for _, a in page.tags if a.get("id")]
    assert len(ids) == len(set(ids)), "element ids must be unique"


def test_html_has_the_markdown_tables(run_a):
    page = Page(render_html([run_a]))
    md = md_tables(render_markdown([run_a]))
    machine = group_runs([run_a])[0]
    ids = [f"table-{t.id}" for s in sections(machine) for t in s.tables]
    assert set(ids) <= set(page.tables)
    # same row count and header as the Markdown table (the header here carries no sort arrows)
    assert len(page.tables["table-model-tiny"]) == len(md["Model tiny (0.50 M parameters)"])
    assert page.tables["table-thread-scaling"][0] == md["Thread scaling"][0]
    assert len(page.tables["table-cells"]) - 1 == len(run_a["cells"])
    tiny_ort = next(r for r in page.tables["table-model-tiny"] if r[0] == "onnxruntime · fp32")
    assert tiny_ort[3].startswith(md["Model tiny (0.50 M parameters)"][7][3].split("<br>")[0].strip("*"))


def test_html_references_nothing_remote(run_a):
    html = render_html([run_a])
    page = Page(html)
    for tag, attrs in page.tags:
        for name in ("src", "href", "xlink:href", "action", "data"):
            value = (attrs.get(name) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//")), (tag, name, value)
        assert not (tag == "script" and attrs.get("src")), "scripts must be inline"
        assert not (tag == "link" and attrs.get("rel") == "stylesheet"), "styles must be inline"
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", html), "CSS must not fetch anything"
    assert "@import" not in html


def test_html_sortable_tables_carry_numeric_sort_keys(run_a):
    html = render_html([run_a])
    assert html.count('class="sortable"') == sum(len(s.tables) for s in sections(group_runs([run_a])[0]))
    c = best_decode(run_a, "tiny", "onnxruntime", "fp32", 4)
    assert f'data-sort="{c["decode_tok_s"]}"' in html


def test_html_with_several_runs(run_a, run_b):
    page = Page(render_html([run_a, run_b]))
    assert len(page.svgs) == 2 * (2 * CHARTS_PER_MODEL + CHARTS_PER_ENV)
    ids = [a.get("id") for _, a in page.tags if a.get("id")]
    assert len(ids) == len(set(ids)), "element ids must be unique across environments"
    assert "env1-model-tiny" in ids and "env2-model-tiny" in ids


def hostile(run: dict) -> dict:
    """The fixture with markup in every kind of field that comes from the store."""
    run = copy.deepcopy(run)
    run["run_id"] = "<b>run</b>"
    run["fingerprint"]["cpu"]["brand"] = "EPYC <img src=x onerror=alert(1)>"
    run["fingerprint"]["versions"]["torch"] = "2.8 & <i>more</i>"
    failed = next(c for c in run["cells"] if c["status"] == "failed")
    failed["reason"] = "<script>alert('x')</script> & friends"
    return run


def test_html_escapes_every_value_from_the_store(run_a):
    html = render_html([hostile(run_a)])
    page = Page(html)
    assert [t for t, _ in page.tags].count("script") == 3  # the page's own three, no injected one
    assert not any(t in ("img", "b", "i") for t, _ in page.tags)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; friends" in html
    assert "EPYC &lt;img src=x onerror=alert(1)&gt;" in html
    assert "2.8 &amp; &lt;i&gt;more&lt;/i&gt;" in html
    assert "<script>alert" not in html


def test_markdown_escapes_every_value_from_the_store(run_a):
    md = render_markdown([hostile(run_a)])
    assert "<script>" not in md and "<img" not in md and "<b>" not in md
    assert "&lt;script>alert('x')&lt;/script> &amp; friends" in md


# --- charts ----------------------------------------------------------------------------------------

def test_pareto_front_keeps_only_undominated_points():
    pts = [(100, 5.0), (200, 4.0), (150, 6.0), (300, 9.0), (300, 8.0), (50, 1.0)]
    assert charts.pareto_front(pts) == [(50, 1.0), (200, 4.0), (300, 8.0)]


@pytest.mark.parametrize("lo,hi", [(0.23, 0.97), (120, 95000), (3, 4), (1, 1)])
def test_ticks_cover_the_data(lo, hi):
    for ticks in (charts.linear_ticks(lo, hi), charts.log_ticks(lo, hi)):
        assert ticks[0] <= lo and ticks[-1] >= hi and ticks == sorted(ticks) and len(ticks) >= 2


def test_chart_without_data_is_an_error():
    with pytest.raises(ValueError, match="no points"):
        charts.xy_chart("empty", [], x_label="x", y_label="y")
    with pytest.raises(ValueError, match="no samples"):
        charts.box_chart("empty", [("a", [], "#000")], x_label="x")


def test_chart_escapes_labels():
    svg = charts.xy_chart("a <b> & c", [charts.Series("<x>", ((1, 1), (2, 2)), "#000")],
                          x_label="&", y_label="y")
    assert "<b>" not in svg and "<x>" not in svg and "a &lt;b&gt; &amp; c" in svg


# --- compare ---------------------------------------------------------------------------------------

def verdicts(result) -> dict[tuple, str]:
    fields = ("model", "backend", "precision", "batch", "threads")
    return {tuple(c.base[f] for f in fields): c.verdict for c in result.cells}


def test_compare_verdicts_on_the_fixture(run_a, run_b):
    # run_b: onnxruntime ~15% slower, ipex fp32 ~12% faster, everything else only re-measured
    v = verdicts(compare_runs(run_a, run_b))
    assert len(v) == len(run_a["cells"])
    for (model, backend, precision, batch, threads), verdict in v.items():
        if backend == "cuda" or (model, backend, precision, batch, threads) in {
                ("small", "openvino", "fp32", 4, 1), ("small", "ipex", "bf16", 4, 1)}:
            assert verdict == NOT_COMPARABLE
        elif backend == "onnxruntime":
            assert verdict == SLOWER
        elif (backend, precision) == ("ipex", "fp32"):
            assert verdict == FASTER
        else:
            assert verdict == SAME, (model, backend, precision, batch, threads)


def test_compare_ratio_and_interval(run_a, run_b):
    result = compare_runs(run_a, run_b)
    key = cell_key(best_decode(run_a, "tiny", "onnxruntime", "fp32", 1))
    cell = next(c for c in result.cells if c.key == key)
    d, a, b = cell.decode, cell.base, cell.new
    assert d.ratio == pytest.approx(b["decode_tok_s"] / a["decode_tok_s"])
    # the interval comes from the raw samples (launches > generations > steps), not the stored intervals
    ratio, low, high = nested_ratio_ci(a["samples"]["tpot_ms"], b["samples"]["tpot_ms"], n_boot=1000)
    assert (d.ratio, d.low, d.high) == pytest.approx((1 / ratio, 1 / high, 1 / low))
    assert d.low <= d.ratio <= d.high < 1
    tpot = cell.metrics["tpot_ms"]
    assert tpot.ratio > 1 and tpot.significant and tpot.improved is False


def synthetic(median: float, lo: float, hi: float, **extra) -> dict:
    """One ok cell with a given tpot median and interval (batch 1, so decode = 1000 / tpot)."""
    return {"model": "tiny", "backend": "eager", "precision": "fp32", "device": "cpu", "batch": 1,
            "threads": 1, "prompt_len": 32, "gen_len": 32, "status": "ok", "reason": "",
            "decode_tok_s": 1000 / median, "peak_rss_mb": 300.0,
            "tpot_ms": {"median": median, "ci95_low": lo, "ci95_high": hi},
            "ttft_ms": {"median": 2.0, "ci95_low": 1.9, "ci95_high": 2.1}, "parity": None, **extra}


def pair(base_cell: dict, new_cell: dict):
    return compare_runs({"run_id": "a", "cells": [base_cell]}, {"run_id": "b", "cells": [new_cell]}).cells[0]


def test_compare_clear_changes_and_overlap():
    base = synthetic(1.00, 0.99, 1.01)
    assert pair(base, synthetic(0.80, 0.79, 0.81)).verdict == FASTER
    assert pair(base, synthetic(1.25, 1.24, 1.26)).verdict == SLOWER
    # 5% slower by the medians, but the new run is so noisy that the intervals overlap
    assert pair(base, synthetic(1.05, 0.95, 1.15)).verdict == SAME
    # intervals apart, but by less than the 2% noise floor
    assert pair(base, synthetic(1.015, 1.012, 1.018)).verdict == SAME
    # no interval at all: nothing can be called significant
    bare = synthetic(1.25, 1.24, 1.26)
    bare["tpot_ms"] = {"median": 1.25}
    assert pair(base, bare).verdict == SAME


def test_compare_memory_has_its_own_floor():
    base = synthetic(1.0, 0.99, 1.01)
    grown = pair(base, synthetic(1.0, 0.99, 1.01, peak_rss_mb=330.0)).metrics["peak_rss_mb"]
    assert grown.significant and grown.improved is False and grown.low is None
    assert not pair(base, synthetic(1.0, 0.99, 1.01, peak_rss_mb=306.0)).metrics["peak_rss_mb"].significant


def test_regressions_threshold(run_a, run_b):
    result = compare_runs(run_a, run_b)
    slower = result.by_verdict(SLOWER)
    assert {c.base["backend"] for c in slower} == {"onnxruntime"}
    assert result.regressions(5) == slower
    assert all(c.decode.ratio == pytest.approx(c.new["decode_tok_s"] / c.base["decode_tok_s"]) for c in slower)
    drops = sorted(-100 * c.decode.change for c in slower)
    cut = drops[len(drops) // 2]  # a threshold inside the range: some cells above it, some not
    expected = [c for c in slower if -100 * c.decode.change > cut]
    assert 0 < len(expected) < len(slower)
    assert result.regressions(cut) == expected
    assert result.regressions(20) == []
    assert all(c.base["backend"] != "ipex" for c in result.regressions(0))  # faster is never a regression
    with pytest.raises(ValueError, match="threshold_pct=-1"):
        result.regressions(-1)


def test_compare_fingerprint_differences(run_a, run_b):
    result = compare_runs(run_a, run_b)
    assert result.fingerprint_diff == ("versions.onnxruntime: 1.32.0 -> 1.33.0",)
    assert not result.environments_match
    md = compare_markdown(result)
    assert "Warning: the environments differ" in md and "versions.onnxruntime: 1.32.0 -> 1.33.0" in md
    other = copy.deepcopy(run_b)
    other["fingerprint"]["cpu"]["flags"] = [*other["fingerprint"]["cpu"]["flags"][1:], "avx512f"]
    del other["fingerprint"]["versions"]["nncf"]
    other["fingerprint"]["roofline"]["bandwidth_gb_s"] = 11.1  # a measurement, not an identity
    changes = compare_runs(run_a, other).fingerprint_diff
    assert changes == ("cpu.flags: +avx512f, -avx", "versions.nncf: 2.19.0 -> <missing>",
                       "versions.onnxruntime: 1.32.0 -> 1.33.0")
    same = compare_runs(run_a, run_a)
    assert same.fingerprint_diff == () and same.environments_match
    assert "Warning" not in compare_markdown(same)
    # same fingerprint id, another commit: said, but not as a warning
    moved = copy.deepcopy(run_a)
    moved["fingerprint"]["git_commit"] = "0badc0de"
    result = compare_runs(run_a, moved)
    assert result.environments_match and result.fingerprint_diff == ("git_commit: 9d66642 -> 0badc0de",)
    md = compare_markdown(result)
    assert "Warning" not in md and "other differences: git_commit: 9d66642 -> 0badc0de" in md


def test_compare_unmatched_and_broken_cells(run_a, run_b):
    new = copy.deepcopy(run_b)
    gone = new["cells"].pop(0)
    extra = copy.deepcopy(new["cells"][-1])
    extra["batch"] = 8
    extra["cell_id"] = cell_key(extra)
    new["cells"].append(extra)
    broken = next(c for c in new["cells"] if c["backend"] == "mkl" and c["model"] == "tiny")
    broken.update(status="oom", reason="killed at 23 GiB")
    result = compare_runs(run_a, new)
    assert [cell_key(c) for c in result.only_base] == [cell_key(gone)]
    assert [cell_key(c) for c in result.only_new] == [cell_key(extra)]
    assert [c.key for c in result.broken()] == [cell_key(broken)]
    assert result.broken()[0].note == "new oom: killed at 23 GiB"
    md = compare_markdown(result)
    assert "## Only in base" in md and "## Only in new" in md and "killed at 23 GiB" in md


def test_compare_notes_a_parity_change():
    base = synthetic(1.0, 0.99, 1.01, parity={"passed": True, "token_agreement": 1.0})
    new = synthetic(1.0, 0.99, 1.01, parity={"passed": False, "token_agreement": 0.5})
    assert pair(base, new).note == "parity now fails"


def test_compare_rejects_non_runs():
    with pytest.raises(ValueError, match="base run"):
        compare_runs({"run_id": "x"}, {"cells": []})
    with pytest.raises(ValueError, match="noise_floor_pct"):
        compare_runs({"cells": []}, {"cells": []}, noise_floor_pct=-2)


def test_compare_markdown_golden(run_a, run_b):
    check_golden("compare_a_b.md", compare_markdown(compare_runs(run_a, run_b)))


def test_compare_table_for_the_terminal(run_a, run_b):
    from rich.console import Console

    result = compare_runs(run_a, run_b)
    table = compare_table(result)
    assert table.row_count == len(result.cells)
    console = Console(record=True, width=240, color_system=None)
    console.print(table)
    out = console.export_text()
    assert "versions.onnxruntime: 1.32.0 -> 1.33.0" in out
    lines = [ln for ln in out.splitlines() if "slower" in ln or "faster" in ln]
    assert len(lines) == len(result.by_verdict(SLOWER)) + len(result.by_verdict(FASTER))
    assert "slower" in lines[0]  # regressions first


def test_renderers_import_nothing_heavy():
    """Reports are pure functions of records: no torch, no model, no backends, no store."""
    code = ("import sys, reports; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'model', 'backends', 'sqlite3', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=HERE.parent, check=True)
    assert out.stdout.strip() == "[]"


def test_quality_section_and_best_configuration_skip_quality_failures(run_a):
    md = render_markdown([run_a])
    quality = md_tables(md)["Quality on a trained model"]
    assert quality[0][:3] == ["model", "backend · precision", "batch"] and quality[0][-2] == "verdict"
    rows = {(r[1], r[2]): r for r in quality[1:]}
    assert rows[("eager · fp32", "1")][5] == "reference"
    assert rows[("int8 · int8", "4")][-2] == "fail" and rows[("int8 · int8", "1")][-2] == "pass"
    assert "Intel Neural Compressor" in md and "max_drop=0.01" in md
    page = Page(render_html([run_a]))
    assert "Decode speed against quality" in [s["label"] for s in page.svgs]
    failures = md_tables(md)["Cells that did not pass #2"]  # after the parity failures, before the rest
    assert failures[0][4] == "PPL ratio" and failures[1][:3] == ["small", "int8 · int8", "4"]


def test_terminal_summary_shows_a_parity_judged_on_tokens(run_a):
    """An engine without logits has no logit difference (None): bench run's closing table says
    "tokens" there instead of failing after the whole sweep ran (it did, once)."""
    from rich.console import Console

    from reports.terminal import summary_table
    cells = copy.deepcopy([c for c in run_a["cells"] if c.get("status") == "ok"][:2])
    cells[0]["parity"] = dict(passed=True, token_agreement=1.0, max_abs_logit_diff=None, basis="generated tokens")
    console = Console(width=250, record=True)
    console.print(summary_table(cells))
    assert "100% tokens" in console.export_text()
