"""Runs -> one self-contained HTML file: inline CSS, inline JavaScript, charts as inline SVG.

The sections and tables are those of the Markdown report (``reports.sections.sections``); the
HTML adds charts to them. Nothing is fetched: the file opens offline. Every value from the store
goes through ``html.escape``.

The page checks itself, for the headless-browser test and for anyone curious: a handler
installed first records any script error in ``<html data-js-errors>``, and the last script
counts the charts that have marks and a laid-out size into ``<body data-charts-drawn>``, beside
``data-charts-expected`` (what the renderer emitted).
"""

from __future__ import annotations

from html import escape

from reports import charts
from reports.charts import Series
from reports.format import (HOW_TO_READ, Machine, Section, Table, best_by_threads, decode_interval, environment,
                            flat_samples, group_runs, is_ok, label, median, model_name, models, num, parity_passed,
                            quality_of, quality_verdict, thread_counts, threads_label)
from reports.sections import sections
from reports.tables import sentinel_rows, training_runs
from reports.training import is_train, throughput_charts

CSS = """
:root { --ink:#1f2328; --muted:#656d76; --line:#d8dee4; --bg:#f6f8fa; --accent:#4e79a7;
        --good:#1a7f37; --bad:#cf222e; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--ink);
       background:#fff; }
header.top { background:#24292f; color:#fff; padding:22px 32px 18px; }
header.top h1 { margin:0 0 4px; font-size:24px; font-weight:600; }
header.top p { margin:0; color:#c9d1d9; }
nav { position:sticky; top:0; z-index:2; background:#fff; border-bottom:1px solid var(--line);
      padding:8px 32px; font-size:13px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; white-space:nowrap; }
nav a:hover { text-decoration:underline; }
main { max-width:1340px; margin:0 auto; padding:8px 32px 48px; }
h2 { font-size:20px; margin:34px 0 6px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:17px; margin:26px 0 6px; }
p.lead { color:var(--muted); margin:4px 0 14px; max-width:960px; }
.howto { background:var(--bg); border-left:4px solid var(--accent); padding:10px 14px; margin:16px 0;
         max-width:1100px; }
dl.env { display:grid; grid-template-columns:max-content 1fr; gap:4px 18px; margin:10px 0;
         background:var(--bg); border:1px solid var(--line); border-radius:6px; padding:12px 16px; }
dl.env dt { font-weight:600; color:var(--muted); }
dl.env dd { margin:0; font-family:ui-monospace,SFMono-Regular,Menlo,monospace; font-size:12.5px;
            overflow-wrap:anywhere; }
.charts { display:grid; grid-template-columns:repeat(auto-fill,minmax(560px,1fr)); gap:16px; margin:14px 0; }
figure { margin:0; border:1px solid var(--line); border-radius:6px; padding:8px; background:#fff; }
figure svg { width:100%; height:auto; display:block; }
.table-wrap { overflow-x:auto; margin:10px 0 18px; }
table { border-collapse:collapse; font-size:13px; font-variant-numeric:tabular-nums; }
caption { caption-side:top; text-align:left; color:var(--muted); font-style:italic; padding:0 0 6px; }
th, td { border:1px solid var(--line); padding:5px 9px; vertical-align:top; }
th { background:var(--bg); text-align:left; cursor:pointer; user-select:none; white-space:nowrap;
     position:relative; padding-right:20px; }
th:hover { background:#eaeef2; }
th.num, td.num { text-align:right; }
th::after { content:"\\2195"; position:absolute; right:6px; color:#afb8c1; font-size:11px; }
th[aria-sort=ascending]::after { content:"\\25B2"; color:var(--ink); }
th[aria-sort=descending]::after { content:"\\25BC"; color:var(--ink); }
tbody tr:nth-child(even) { background:#fbfcfd; }
tbody tr:hover { background:#f0f6fc; }
td .sub { display:block; color:var(--muted); font-size:12px; white-space:nowrap; }
td strong { white-space:nowrap; }
td.good { color:var(--good); font-weight:600; }
td.bad, td.bad .sub { color:var(--bad); }
td.muted { color:var(--muted); font-style:italic; }
details summary { cursor:pointer; color:var(--accent); margin:8px 0; }
footer { color:var(--muted); font-size:12px; margin-top:40px; }
"""

# Installed before anything else runs, so it sees errors in every later script.
ERROR_TRAP = """
window.addEventListener("error", function (e) {
  var root = document.documentElement;
  var seen = root.getAttribute("data-js-errors") || "";
  root.setAttribute("data-js-errors", seen + (e.message || "error") + ";");
});
"""

SORT_JS = """
function sortValue(td) {
  var v = td.getAttribute("data-sort");
  if (v === null || v === "") return null;
  var n = Number(v);
  return isNaN(n) ? v.toLowerCase() : n;
}
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = sortValue(a.cells[col]), y = sortValue(b.cells[col]);
        if (x === null || y === null) return (x === null) - (y === null);  // blanks last
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

# Counts charts that have marks and a size after layout: a chart that failed to draw is not counted.
COUNT_JS = """
(function () {
  var drawn = 0;
  document.querySelectorAll("svg.chart").forEach(function (svg) {
    var box = svg.getBoundingClientRect();
    if (svg.querySelectorAll(".mark").length > 0 && box.width > 0 && box.height > 0) drawn++;
  });
  document.body.setAttribute("data-charts-drawn", String(drawn));
})();
"""


def _attr(v) -> str:
    return escape(str(v), quote=True)


NUM = ' class="num"'


def table_html(t: Table, prefix: str = "") -> str:
    head = "".join(f'<th scope="col"{NUM if n else ""}>{escape(c)}</th>'
                   for c, n in zip(t.columns, t.numeric))
    body = []
    for row in t.rows:
        tds = []
        for cell, n in zip(row, t.numeric):
            classes = " ".join(x for x in ("num" if n else "", cell.tone) if x)
            cls = f' class="{classes}"' if classes else ""
            sort = f' data-sort="{_attr(cell.sort)}"' if cell.sort is not None else ""
            lines = [escape(s) for s in cell.lines]
            first = f"<strong>{lines[0]}</strong>" if cell.strong and lines else (lines[0] if lines else "")
            rest = "".join(f'<span class="sub">{s}</span>' for s in lines[1:])
            tds.append(f"<td{cls}{sort}>{first}{rest}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    caption = f"<caption>{escape(t.caption)}</caption>" if t.caption else ""
    table_id = _attr(f"{prefix}table-{t.id}")
    return (f'<div class="table-wrap"><table class="sortable" id="{table_id}">{caption}'
            f"<thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table></div>")


# --- charts ------------------------------------------------------------------------------------

def _palette(m: Machine) -> dict[str, str]:
    return charts.colors([label(c) for c in m.cells if is_ok(c)])


def _thr(c: dict) -> str:
    return f"{threads_label(c.get('threads'))} thr"


def decode_vs_batch(m: Machine, model: str, pal: dict[str, str]) -> str | None:
    best = [c for k, c in best_by_threads(list(m.cells)).items() if k[0] == model]
    if not best:
        return None
    series = []
    for lab in sorted({label(c) for c in best}):
        cs = sorted((c for c in best if label(c) == lab), key=lambda c: c["batch"])
        series.append(Series(lab, tuple((c["batch"], c["decode_tok_s"]) for c in cs), pal[lab],
                             errors=tuple(decode_interval(c) for c in cs),
                             tips=tuple(f"{lab}, batch {c['batch']}, {_thr(c)}: "
                                        f"{num(c['decode_tok_s'])} tok/s" for c in cs)))
    batches = sorted({c["batch"] for c in best})
    return charts.xy_chart(f"Decode rate against batch — {model_name(model)}", series, x_label="batch size",
                           y_label="decode tokens/s", x_log=len(batches) > 2,
                           x_ticks=[(b, str(b)) for b in batches],
                           note="fastest thread count; bars: 95% interval")


def tpot_boxes(m: Machine, model: str, pal: dict[str, str]) -> str | None:
    best = {k: c for k, c in best_by_threads(list(m.cells)).items() if k[0] == model}
    if not best:
        return None
    batch = min(k[3] for k in best)
    groups = [(label(c), flat_samples(c, "tpot_ms"), pal[label(c)])
              for k, c in sorted(best.items(), key=lambda kv: label(kv[1])) if k[3] == batch]
    if not any(g[1] for g in groups):
        return None
    sizes = sorted(len(g[1]) for g in groups if g[1])
    n = f"{sizes[0]}" if sizes[0] == sizes[-1] else f"{sizes[0]}–{sizes[-1]}"
    return charts.box_chart(f"Time per output token — {model_name(model)}, batch {batch}", groups,
                            x_label="time per output token (ms)",
                            note=f"every decode step of every repetition ({n} per row); fastest thread count")


def latency_throughput(m: Machine, model: str, pal: dict[str, str]) -> str | None:
    cells = [c for c in m.cells if c.get("model") == model and is_ok(c)
             and median(c, "tpot_ms") and c.get("decode_tok_s")]
    if not cells:
        return None
    series = []
    for lab in sorted({label(c) for c in cells}):
        cs = [c for c in cells if label(c) == lab]
        series.append(Series(lab, tuple((c["decode_tok_s"], median(c, "tpot_ms")) for c in cs), pal[lab],
                             line=False,
                             tips=tuple(f"{lab}, batch {c['batch']}, {_thr(c)}: "
                                        f"{num(c['decode_tok_s'])} tok/s, "
                                        f"{num(median(c, 'tpot_ms'))} ms/token"
                                        + ("" if c.get("parity") is None or parity_passed(c)
                                           else " (parity failed: not on the front)") for c in cs)))
    # A configuration that gives wrong answers is no candidate, however fast.
    eligible = [(c["decode_tok_s"], median(c, "tpot_ms")) for c in cells
                if c.get("parity") is None or parity_passed(c)]
    front = charts.pareto_front(eligible)
    if front:
        series.append(Series("Pareto front", tuple(front), charts.INK, dashed=True, hollow=True))
    return charts.xy_chart(f"Latency against throughput — {model_name(model)}", series,
                           x_label="decode tokens/s (higher is better)",
                           y_label="ms per output token", x_log=True, y_log=True,
                           note="every batch and thread count; ringed: Pareto front")


def thread_scaling(m: Machine, model: str, pal: dict[str, str]) -> str | None:
    numeric = [t for t in thread_counts(list(m.cells)) if t is not None]
    if len(numeric) < 2:
        return None
    ok = [c for c in m.cells if c.get("model") == model and is_ok(c) and c.get("threads") in numeric
          and c.get("decode_tok_s")]  # a one-token generation has no decode rate
    if not ok:
        return None
    batch = min(c["batch"] for c in ok)
    t0 = numeric[0]
    series = []
    for lab in sorted({label(c) for c in ok}):
        rate = {c["threads"]: c["decode_tok_s"] for c in ok if label(c) == lab and c["batch"] == batch}
        if t0 not in rate or len(rate) < 2:
            continue
        pts = tuple((t, rate[t] / rate[t0]) for t in sorted(rate))
        series.append(Series(lab, pts, pal[lab],
                             tips=tuple(f"{lab}, {t} thr: ×{s:.2f}" for t, s in pts)))
    if not series:
        return None
    series.append(Series("linear scaling", tuple((t, t / t0) for t in numeric), "#999", marker=False,
                         dashed=True, end_label="linear"))
    return charts.xy_chart(f"Thread scaling — {model_name(model)}, batch {batch}", series, x_label="threads",
                           y_label=f"decode speed-up over {t0} thread{'s' * (t0 != 1)}",
                           x_ticks=[(t, str(t)) for t in numeric])


def memory_vs_size(m: Machine, pal: dict[str, str]) -> str | None:
    best = best_by_threads(list(m.cells))
    size = {c.get("model"): c.get("n_params") for c in m.cells}
    names = [n for n in models(list(m.cells)) if size.get(n)]
    series = []
    for lab in sorted({label(c) for c in best.values()}):
        pts, tips = [], []
        for n in names:
            cs = [c for k, c in best.items() if k[0] == n and label(c) == lab]
            if cs:
                c = min(cs, key=lambda c: c["batch"])
                if c.get("peak_rss_mb") is not None:
                    pts.append((size[n], c["peak_rss_mb"]))
                    tips.append(f"{lab}, {n}, batch {c['batch']}: {num(c['peak_rss_mb'])} MiB")
        if pts:
            series.append(Series(lab, tuple(pts), pal[lab], tips=tuple(tips)))
    if not series:
        return None
    return charts.xy_chart("Peak memory against model size", series, x_label="parameters",
                           y_label="peak resident memory (MiB)", x_log=len(names) > 1,
                           x_ticks=[(size[n], f"{n} {size[n] / 1e6:.1f}M") for n in names],
                           note="smallest batch")


def roofline(m: Machine, pal: dict[str, str]) -> str | None:
    cells = [c for c in best_by_threads(list(m.cells)).values()
             if c.get("roofline_decode_tok_s") and c.get("decode_tok_s")]
    if not cells:
        return None
    series = []
    for lab in sorted({label(c) for c in cells}):
        cs = [c for c in cells if label(c) == lab]
        series.append(Series(lab, tuple((c["roofline_decode_tok_s"], c["decode_tok_s"]) for c in cs),
                             pal[lab], line=False,
                             tips=tuple(f"{lab}, {c['model']}, batch {c['batch']}: "
                                        f"{num(c['decode_tok_s'])} of "
                                        f"{num(c['roofline_decode_tok_s'])} tok/s "
                                        f"({100 * c['decode_tok_s'] / c['roofline_decode_tok_s']:.0f}%)"
                                        for c in cs)))
    lo = min(c["roofline_decode_tok_s"] for c in cells)
    hi = max(c["roofline_decode_tok_s"] for c in cells)
    for share, name in ((1.0, "100% of roofline"), (0.1, "10%")):
        series.append(Series(name, ((lo, lo * share), (hi, hi * share)), "#999", marker=False, dashed=True,
                             end_label=name, legend=False))
    return charts.xy_chart("Achieved decode rate against the roofline", series,
                           x_label="roofline decode tokens/s",
                           y_label="achieved decode tokens/s", x_log=True, y_log=True,
                           note="roofline: the memory-bandwidth or compute bound; "
                                "each model and batch, fastest thread count")


def speed_quality(m: Machine, pal: dict[str, str]) -> str | None:
    """Decode rate against the KL divergence from eager fp32, with the Pareto front of the
    acceptable settings: the fastest setting at acceptable quality is the answer users want."""
    cells = [c for c in best_by_threads(list(m.cells)).values() if quality_of(c) and c.get("decode_tok_s")]
    if not cells:
        return None
    floor = 1e-7  # eager fp32 (and exact backends) have KL 0, which a log axis cannot show
    def kl(c):
        d = quality_of(c).get("divergence")
        return max(floor, d["kl_mean"]) if d else floor
    series = []
    for lab in sorted({label(c) for c in cells}):
        cs = sorted((c for c in cells if label(c) == lab), key=lambda c: c["batch"])
        series.append(Series(lab, tuple((kl(c), c["decode_tok_s"]) for c in cs), pal[lab], line=False,
                             tips=tuple(f"{lab}, {model_name(c['model'])}, batch {c['batch']}: "
                                        f"{num(c['decode_tok_s'])} tok/s, KL {kl(c):.1e}, "
                                        f"{quality_verdict(c)}" for c in cs)))
    ok = [(kl(c), c["decode_tok_s"]) for c in cells if quality_verdict(c) != "fail" and
          (c.get("parity") is None or parity_passed(c))]
    # the front: less divergence and more speed are both better
    front = sorted({p for p in ok if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in ok)})
    if front:
        series.append(Series("Pareto front", tuple(front), charts.INK, dashed=True, hollow=True))
    return charts.xy_chart("Decode speed against quality", series, x_label="mean KL divergence from eager fp32",
                           y_label="decode tokens/s", x_log=True, y_log=True,
                           note=f"each batch, fastest thread count; KL 0 drawn at {floor:g}; ringed: Pareto front")


def loss_curves(m: Machine) -> list[str]:
    """Each training run's loss against step: training loss every step, validation at each evaluation."""
    made = []
    for t in training_runs(m):
        steps = t.get("steps") or []
        train = tuple((s["step"], s["loss"]) for s in steps if isinstance(s.get("loss"), (int, float)))
        val = tuple((s["step"], s["val_loss"]) for s in steps if isinstance(s.get("val_loss"), (int, float)))
        if len(train) < 2:
            continue
        series = [Series("training loss", train, "#4e79a7", marker=False)]
        if val:
            series.append(Series("validation loss", val, "#f28e2b",
                                 tips=tuple(f"step {x}: validation loss {y:.4f}" for x, y in val)))
        made.append(charts.xy_chart(f"Training loss — {model_name(t.get('out_dir'))}", series, x_label="step",
                                    y_label="loss (nats per token)", y_zero=False,
                                    note=f"training run {t.get('run_id')}"))
    return made


def drift_chart(m: Machine) -> str | None:
    """The sentinel readings over the rounds, each relative to its run's first reading."""
    rows = sentinel_rows(m)
    series = []
    colours = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948")
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for i, run in enumerate(runs):
        mine = [r for r in rows if r["run"] == run and r["round"] is not None]
        for kind, name, invert in (("decode_ms", "decode step", False), ("gemv_gb_s", "gemv", True)):
            pts = [(r["round"] + 1, r[kind]) for r in mine if isinstance(r[kind], (int, float)) and r[kind] > 0]
            if len(pts) < 2:
                continue
            first = pts[0][1]
            # as a slowdown: > 1 means the machine was slower than at the run's first reading
            rel = tuple((x, first / y if invert else y / first) for x, y in pts)
            series.append(Series(f"{name} · {run}" if len(runs) > 1 else name, rel,
                                 colours[(2 * i + invert) % len(colours)], dashed=invert,
                                 tips=tuple(f"{name}, round {x}: ×{v:.3f}" for x, v in rel)))
    if not series:
        return None
    rounds = sorted({x for s in series for x, _ in s.points})
    return charts.xy_chart("Machine drift: the sentinel over the rounds", series, x_label="round",
                           y_label="slowdown vs the first round", y_zero=False,
                           x_ticks=[(r, str(r)) for r in rounds],
                           note="above 1: the machine ran the fixed workload slower than in round 1")


def serve_latency(m: Machine, model: str, kind: str) -> str | None:
    """Median latency (TTFT or TPOT) against output throughput, one line per backend over its load points."""
    cells = [c for c in m.serve_cells if c.get("model") == model and is_ok(c) and (c.get(f"{kind}_pct") or {})
             .get("median") and c.get("output_tok_s")]
    if not cells:
        return None
    pal = charts.colors([label(c) for c in m.serve_cells])
    series = []
    for lab in sorted({label(c) for c in cells}):
        cs = [c for c in cells if label(c) == lab]
        series.append(Series(lab, tuple((c["output_tok_s"], c[f"{kind}_pct"]["median"]) for c in cs), pal[lab],
                             tips=tuple(f"{lab}, rate {'inf' if c.get('rate') is None else num(c['rate'])} req/s: "
                                        f"{num(c['output_tok_s'])} tok/s, {kind.upper()} p50 "
                                        f"{num(c[f'{kind}_pct']['median'])} ms" for c in cs)))
    name = {"ttft": "time to first token", "tpot": "time per output token"}[kind]
    return charts.xy_chart(f"{kind.upper()} against throughput under load — {model_name(model)}", series,
                           x_label="output tokens/s (all requests)", y_label=f"median {name} (ms)",
                           note="one point per offered request rate")


def section_charts(m: Machine, s: Section, pal: dict[str, str]) -> list[str]:
    if s.id.startswith("train-") and s.id not in ("train-vs-inference", "train-did-not-pass"):
        model = next(n for n in models([c for c in m.cells if is_train(c)]) if f"train-{model_name(n)}" == s.id)
        return throughput_charts(m, model, pal)
    if any(is_train(c) for c in m.cells):  # the inference charts draw the inference cells only
        m = Machine(m.fingerprint_id, m.fingerprint, m.runs, tuple(c for c in m.cells if not is_train(c)))
    if s.id.startswith("model-"):
        model = next(n for n in models(list(m.cells)) if f"model-{model_name(n)}" == s.id)
        made = [decode_vs_batch(m, model, pal), tpot_boxes(m, model, pal), latency_throughput(m, model, pal)]
    elif s.id == "thread-scaling":
        made = [thread_scaling(m, n, pal) for n in models(list(m.cells))]
    elif s.id == "memory":
        made = [memory_vs_size(m, pal), roofline(m, pal)]
    elif s.id == "drift":
        made = [drift_chart(m)]
    elif s.id == "serving":
        names = sorted({c.get("model") for c in m.serve_cells}, key=str)
        made = [serve_latency(m, n, kind) for n in names for kind in ("ttft", "tpot")]
    elif s.id == "quality":
        made = [speed_quality(m, pal), *loss_curves(m)]
    else:
        made = []
    return [c for c in made if c is not None]


# --- the page ----------------------------------------------------------------------------------

def machine_html(m: Machine, prefix: str, level: int) -> tuple[str, int, list[tuple[str, str]]]:
    """The sections of one machine; also the number of charts and the (anchor, title) for the nav."""
    pal = _palette(m)
    h = f"h{level}"
    env = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in environment(m))
    parts = [f'<section id="{prefix}environment"><{h}>Environment</{h}><dl class="env">{env}</dl></section>']
    nav = [(f"{prefix}environment", "Environment")]
    n_charts = 0
    for s in sections(m):
        anchor = f"{prefix}{s.id}"
        nav.append((anchor, s.title))
        figs = section_charts(m, s, pal)
        n_charts += len(figs)
        body = "".join(table_html(t, prefix) for t in s.tables)
        if s.collapsed:
            body = f"<details><summary>Show the table</summary>{body}</details>"
        lead = f'<p class="lead">{escape(s.text)}</p>' if s.text else ""
        grid = "".join(f"<figure>{f}</figure>" for f in figs)
        grid = f'<div class="charts">{grid}</div>' if figs else ""
        parts.append(f'<section id="{_attr(anchor)}"><{h}>{escape(s.title)}</{h}>'
                     f"{lead}{body}{grid}</section>")
    return "\n".join(parts), n_charts, nav


def render_html(runs: list[dict]) -> str:
    """The whole report as one HTML document that needs nothing but a browser."""
    machines = group_runs(runs)
    n_cells = sum(len(m.cells) + len(m.serve_cells) for m in machines)
    blocks, nav, n_charts = [], [], 0
    for i, m in enumerate(machines, 1):
        several = len(machines) > 1
        prefix = f"env{i}-" if several else ""
        html, n, links = machine_html(m, prefix, 3 if several else 2)
        n_charts += n
        if several:
            cpu = (m.fingerprint.get("cpu") or {}).get("brand", "?")
            title = f"Environment {i} of {len(machines)}: {cpu}, fingerprint {m.fingerprint_id[:12]}"
            html = f'<h2 id="env{i}">{escape(title)}</h2>\n{html}'
            links = [(f"env{i}", f"Environment {i}")]
        blocks.append(html)
        nav += links
    run_ids = ", ".join(escape(str(r.get("run_id"))) for m in machines for r in m.runs)
    subtitle = (f"{len(runs)} run{'s' * (len(runs) != 1)} ({run_ids}) · {n_cells} cells"
                + (f" · {len(machines)} environments, never mixed in one table"
                   if len(machines) > 1 else ""))
    links = "".join(f'<a href="#{_attr(a)}">{escape(t)}</a>' for a, t in nav)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Benchmark report</title>
<script>{ERROR_TRAP}</script>
<style>{CSS}</style>
</head>
<body data-charts-expected="{n_charts}">
<header class="top"><h1>Benchmark report</h1><p>{subtitle}</p></header>
<nav>{links}</nav>
<main>
<div class="howto"><strong>How to read this.</strong> {escape(HOW_TO_READ)}</div>
{chr(10).join(blocks)}
<footer>Self-contained report: inline CSS, JavaScript and SVG; nothing is fetched. Click a column
header to sort a table.</footer>
</main>
<script>{SORT_JS}</script>
<script>{COUNT_JS}</script>
</body>
</html>
"""
