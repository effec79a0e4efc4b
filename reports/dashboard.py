"""`bench dashboard`: a live page over the result store, for sweeps, training and serving as they run.

A renderer that keeps watching: stored records in, pages out. It never runs a model and never
writes. The store is read through ``open_store``, given by the caller (``bench.cli`` passes a
read-only ``bench.store.Store``): one handle per request and one short transaction per read, so the
processes writing the store are never blocked by the page (SQLite in WAL mode: readers take no write
lock, and a reader that holds no transaction open never holds back a checkpoint).

A page is a frame around *fragments*: HTML rendered here from the records with every value escaped
(``html.escape``, and the report's own renderers, which escape too). The page's one script
(``static/dashboard.js``, served by the app: nothing comes from a CDN, so the page works offline)
subscribes to ``/events`` by server-sent events; the server polls the store's change marker and
pushes the view's fragments whenever it moved, within ``poll_s`` of a record landing. The stream
tells the browser to reconnect after a second (``retry:``), so a restarted server is picked up
without a reload.

Views: ``/`` (every run and training run, and a form to compare two runs), ``/runs/{id}`` (progress:
launches done of planned, the cell running now, an ETA, failures with their reasons; then the
report's tables and charts filling in), ``/runs/{id}/report`` (the static HTML report),
``/train/{id}`` (loss, learning rate and tokens/s curves growing), ``/compare?base=&new=``
(``bench compare``'s verdicts, computed by the ``compare`` function the caller passes).
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from collections import defaultdict
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Callable

from fastapi import Request  # at module level: FastAPI resolves the endpoints' annotations here

from reports import charts
from reports.charts import Series
from reports.format import group_runs, model_name, num
from reports.html import CSS, ERROR_TRAP, machine_html, render_html

STATIC = Path(__file__).with_name("static")
FAILED = ("failed", "timeout", "oom")

DASHBOARD_CSS = CSS + """
.live { float:right; font-size:12px; padding:2px 8px; border-radius:10px; background:#eaeef2; color:var(--muted); }
.live.on { background:#dafbe1; color:var(--good); }
.live.off { background:#ffebe9; color:var(--bad); }
.bar { height:14px; background:var(--bg); border:1px solid var(--line); border-radius:7px; overflow:hidden;
       max-width:720px; }
.bar > div { height:100%; background:var(--accent); }
ul.failures li { color:var(--bad); }
p.warning { color:var(--bad); font-weight:600; }
form.compare select { max-width:320px; }
"""


# --- reading the store ---------------------------------------------------------------------------

def key_label(key: str) -> str:
    """A cell's label from its stored key (``bench.spec.cell_id``: the identity values as JSON)."""
    try:
        values = json.loads(key)
    except (TypeError, ValueError):
        return str(key)
    if not isinstance(values, list):
        return str(key)
    scenario = ""
    if values and isinstance(values[0], str) and len(values) > 8:  # another scenario leads with its name
        scenario, values = values[0] + " · ", values[1:]
    model, backend, precision, device, batch, threads = (values + [None] * 6)[:6]
    where = "" if device in (None, "cpu") else f" on {device}"
    thr = "default" if threads is None else threads
    return f"{scenario}{model_name(model)} {backend}/{precision}{where} batch {batch} threads {thr}"


def progress(run: dict, launches: list[dict], now: datetime | None = None) -> dict:
    """Where a run stands, from what it stored: its rounds (the planned order of every cell that
    runs), its launches and its cells. A failed cell gets no more launches (``run_sweep`` stops it),
    so its planned launches are those it had; the ETA is the mean launch's wall time times the
    launches left."""
    per_cell = int((run.get("sweep") or {}).get("launches") or 1)
    cells = {c.get("cell_id"): c for c in run.get("cells", [])}
    keys = list(dict.fromkeys(k for r in run.get("rounds", []) for k in r["order"]))
    mine = defaultdict(list)
    for launch in launches:
        mine[launch["key"]].append(launch)
    planned = done = 0
    failures = []
    for key in keys:
        cell = cells.get(key) or {}
        attempt = cell.get("attempt", 0)
        count = sum(1 for x in mine[key] if x["record"].get("attempt", 0) == attempt)
        if cell.get("status") in FAILED:
            planned += count
            done += count
            failures.append(dict(label=key_label(key), status=cell["status"], reason=cell.get("reason") or ""))
        else:
            planned += per_cell
            done += min(count, per_cell)
    current = None
    rounds = run.get("rounds") or []
    if run.get("status") == "running" and rounds:
        last = rounds[-1]
        n = sum(1 for x in launches if x["round"] == last["round"])
        if n < len(last["order"]):
            current = dict(label=key_label(last["order"][n]), round=last["round"] + 1)
    walls = [x["record"].get("wall_s") for x in launches]
    walls = [w for w in walls if isinstance(w, (int, float)) and math.isfinite(w)]
    eta = statistics.fmean(walls) * (planned - done) if run.get("status") == "running" and walls else None
    return dict(status=run.get("status"), planned=planned, done=done, current=current, eta_s=eta,
                failures=failures, skipped=sum(1 for c in cells.values() if c.get("status") == "skipped"),
                cells=len(keys), stored=len(cells), elapsed_s=_elapsed(run, now))


def _elapsed(run: dict, now: datetime | None) -> float | None:
    try:
        start = datetime.fromisoformat(run["created_at"])
        end = datetime.fromisoformat(run["finished_at"]) if run.get("finished_at") else (now or datetime.now(start.tzinfo))
    except (KeyError, TypeError, ValueError):
        return None
    return (end - start).total_seconds()


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


# --- fragments -------------------------------------------------------------------------------------

def progress_html(p: dict) -> str:
    if not p["cells"]:  # no rounds planned: a run of load points (bench load), stored as each finishes
        return (f'<p>status: <strong>{escape(str(p["status"]))}</strong> · <span id="cells-stored">{p["stored"]}'
                f'</span> cells stored · elapsed {duration(p["elapsed_s"])}</p>')
    share = p["done"] / p["planned"] if p["planned"] else 1.0
    now = (f"now running: <strong>{escape(p['current']['label'])}</strong> (round {p['current']['round']})"
           if p["current"] else f"status: <strong>{escape(str(p['status']))}</strong>")
    lines = [f'<p>{now}</p>',
             f'<div class="bar" title="{share:.0%}"><div style="width:{100 * share:.1f}%"></div></div>',
             f'<p><span id="launches-done">{p["done"]}</span> of <span id="launches-planned">{p["planned"]}</span>'
             f' launches done ({p["cells"]} cells to run, {p["skipped"]} skipped) · elapsed '
             f'{duration(p["elapsed_s"])} · ETA {duration(p["eta_s"])}</p>']
    if p["failures"]:
        items = "".join(f"<li><strong>{escape(f['label'])}</strong>: {escape(f['status'])} — {escape(f['reason'])}</li>"
                        for f in p["failures"])
        lines.append(f'<h3>Failures</h3><ul class="failures">{items}</ul>')
    return "\n".join(lines)


def results_html(run: dict) -> str:
    """The report's sections for this run (tables and charts), as far as its cells have landed."""
    if not run.get("cells"):
        return '<p class="lead">No cell has finished yet.</p>'
    blocks = []
    for i, machine in enumerate(group_runs([run]), 1):
        html, _, _ = machine_html(machine, f"m{i}-", 2)
        blocks.append(html)
    return "\n".join(blocks)


def runs_html(runs: list[dict]) -> str:
    if not runs:
        return '<p class="lead">No benchmark runs stored yet: start one with <code>bench run</code>.</p>'
    rows = "".join(
        f'<tr><td><a href="/runs/{escape(r["run_id"], quote=True)}">{escape(r["run_id"])}</a></td>'
        f'<td>{escape(str(r.get("created_at", ""))[:19])}</td><td>{escape(r.get("name") or "")}</td>'
        f'<td class="num">{r["n_ok"]} / {r["n_cells"]}</td><td>{escape(str(r.get("status")))}</td>'
        f'<td><a href="/runs/{escape(r["run_id"], quote=True)}/report">report</a></td></tr>' for r in runs)
    return ('<div class="table-wrap"><table id="table-runs"><thead><tr><th>run</th><th>created</th><th>name</th>'
            f'<th class="num">cells ok</th><th>status</th><th></th></tr></thead><tbody>{rows}</tbody></table></div>')


def training_list_html(runs: list[dict]) -> str:
    if not runs:
        return '<p class="lead">No training runs stored yet: start one with <code>bench train</code>.</p>'
    rows = []
    for t in runs:
        last = t.get("last") or {}
        rows.append(f'<tr><td><a href="/train/{escape(t["run_id"], quote=True)}">{escape(t["run_id"])}</a></td>'
                    f'<td>{escape(str(t.get("created_at", ""))[:19])}</td><td>{escape(model_name(t.get("out_dir")))}</td>'
                    f'<td class="num">{t["n_steps"]}</td><td class="num">{num(last.get("loss"))}</td>'
                    f'<td>{escape(str(t.get("status")))}</td></tr>')
    return ('<div class="table-wrap"><table id="table-training"><thead><tr><th>training run</th><th>created</th>'
            '<th>checkpoint</th><th class="num">steps logged</th><th class="num">last loss</th><th>status</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def compare_form_html(runs: list[dict]) -> str:
    if len(runs) < 2:
        return '<p class="lead">Two stored runs are needed to compare.</p>'
    options = "".join(f'<option value="{escape(r["run_id"], quote=True)}">{escape(r["run_id"])}'
                      f'{escape(" · " + r["name"]) if r.get("name") else ""}</option>' for r in runs)
    return (f'<form class="compare" action="/compare" method="get"><label>base <select name="base">{options}'
            f'</select></label> <label>new <select name="new">{options}</select></label> '
            '<button type="submit">compare</button></form>')


def inspection_page(t: dict) -> Path | None:
    """The training run's ``bench inspect`` page (its default place: CHECKPOINT/inspect/index.html), if written."""
    out_dir = t.get("out_dir")
    if not out_dir or "://" in str(out_dir):
        return None
    page = Path(out_dir) / "inspect" / "index.html"
    return page if page.is_file() else None


def training_html(t: dict) -> tuple[str, str]:
    """(summary, charts) of a training run: where it stands, and its curves over the steps."""
    steps = t.get("steps") or []
    total = ((t.get("config") or {}).get("train") or {}).get("steps")
    last = steps[-1] if steps else {}
    step_s = [s["step_s"] for s in steps[-20:] if isinstance(s.get("step_s"), (int, float))]
    eta = (total - last.get("step", 0)) * statistics.median(step_s) if (
        t.get("status") == "running" and step_s and isinstance(total, int)) else None
    inspection = inspection_page(t)
    look = (f' · <a id="train-inspect" href="/train/{escape(str(t.get("run_id")), quote=True)}/inspect">'
            'inspection</a>' if inspection else
            f' · inspect it: <code>bench inspect --checkpoint {escape(str(t.get("out_dir")))}</code>'
            if t.get("status") == "finished" else "")
    summary = (f'<p>status: <strong>{escape(str(t.get("status")))}</strong> · step '
               f'<span id="train-step">{last.get("step", 0)}</span> of {escape(str(total))} · loss '
               f'{num(last.get("loss"))} · {num(last.get("tokens_per_s"))} tokens/s · ETA {duration(eta)}'
               f' · checkpoint {escape(str(t.get("out_dir")))}{look}</p>')
    curves = []
    for key, title, y_label, colour in (("loss", "Loss", "loss (nats per token)", "#4e79a7"),
                                        ("lr", "Learning rate", "learning rate", "#59a14f"),
                                        ("tokens_per_s", "Training throughput", "tokens/s", "#f28e2b")):
        pts = tuple((s["step"], s[key]) for s in steps if isinstance(s.get(key), (int, float))
                    and math.isfinite(s[key]))
        if not pts:
            continue
        series = [Series(title.lower(), pts, colour, marker=len(pts) < 40)]
        if key == "loss":
            val = tuple((s["step"], s["val_loss"]) for s in steps if isinstance(s.get("val_loss"), (int, float)))
            if val:
                series.append(Series("validation loss", val, "#e15759"))
        curves.append(charts.xy_chart(f"{title} — {model_name(t.get('out_dir'))}", series, x_label="step",
                                      y_label=y_label, y_zero=key != "loss", note=f"training run {t.get('run_id')}"))
    figures = "".join(f"<figure>{c}</figure>" for c in curves)
    return summary, (f'<div class="charts">{figures}</div>' if curves else '<p class="lead">No step logged yet.</p>')


# --- the app ---------------------------------------------------------------------------------------

def page(title: str, view: str, fragments: dict[str, str], heading: str = "") -> str:
    """A page: the frame, the fragments as first rendered, and the script that keeps them live."""
    sections = "\n".join(f'<section id="{escape(k, quote=True)}">{v}</section>' for k, v in fragments.items())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<link rel="icon" href="data:,">
<script>{ERROR_TRAP}</script>
<style>{DASHBOARD_CSS}</style>
</head>
<body data-view="{escape(view, quote=True)}" data-updates="0">
<header class="top"><h1>{escape(title)}</h1><p>{heading}</p></header>
<nav><a href="/">all runs</a><span class="live" id="live">connecting…</span></nav>
<main>
{sections}
</main>
<script src="/static/dashboard.js"></script>
</body>
</html>
"""


def create_app(open_store: Callable, compare: Callable | None = None, poll_s: float = 0.5):
    """The dashboard as a FastAPI app over the store that ``open_store()`` opens (read-only).

    ``compare(base_run, new_run)``: ``bench.results.compare.compare_runs``, passed in so this renderer does
    not depend on the harness. ``app.state.stopping``: a callable the server sets (uvicorn's
    ``should_exit``), so open event streams end by themselves at shutdown instead of being cut.
    """
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from reports.compare import compare_html

    app = FastAPI(title="bench dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stopping = lambda: False

    def read(fn):
        store = open_store()
        try:
            with store.snapshot():
                return fn(store)
        finally:
            store.close()

    def fragments(view: str) -> dict[str, str]:
        kind, _, ident = view.partition(":")
        if kind == "index":
            return read(lambda s: dict(runs=runs_html(s.list_runs()),
                                       training=training_list_html(s.list_training_runs()),
                                       compare=compare_form_html(s.list_runs())))
        if kind == "run":
            def run_view(s):
                run = s.get_run(ident)
                return dict(progress=progress_html(progress(run, s.launches(run["run_id"]))),
                            results=results_html(run))
            return read(run_view)
        if kind == "train":
            def train_view(s):
                summary, curves = training_html(s.get_training_run(ident))
                return {"train-summary": summary, "train-charts": curves}
            return read(train_view)
        raise LookupError(f"unknown view {view!r}: expected index, run:ID or train:ID")

    def not_found(e: Exception) -> HTMLResponse:
        return HTMLResponse(page("Not found", "none", dict(error=f'<p class="warning">{escape(str(e))}</p>')),
                            status_code=404)

    async def view_page(title: str, view: str, heading: str = "") -> HTMLResponse:
        try:
            parts = await run_in_threadpool(fragments, view)
        except LookupError as e:
            return not_found(e)
        return HTMLResponse(page(title, view, parts, heading))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return await view_page("Benchmark dashboard", "index", "every stored run; live")

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    async def run_page(run_id: str):
        return await view_page(f"Run {run_id}", f"run:{run_id}", f'<a href="/runs/{escape(run_id, quote=True)}/report"'
                               ' style="color:#c9d1d9">the full report</a>')

    @app.get("/runs/{run_id}/report", response_class=HTMLResponse)
    async def run_report(run_id: str):
        try:
            run = await run_in_threadpool(read, lambda s: s.get_run(run_id))
        except LookupError as e:
            return not_found(e)
        return HTMLResponse(render_html([run]))

    @app.get("/train/{run_id}", response_class=HTMLResponse)
    async def train_page(run_id: str):
        return await view_page(f"Training run {run_id}", f"train:{run_id}")

    @app.get("/train/{run_id}/inspect", response_class=HTMLResponse)
    async def train_inspection(run_id: str):
        try:
            found = await run_in_threadpool(read, lambda s: inspection_page(s.get_training_run(run_id)))
        except LookupError as e:
            return not_found(e)
        if found is None:
            return not_found(LookupError(f"training run {run_id} has no inspection yet: run "
                                         "bench inspect --checkpoint on its checkpoint"))
        return HTMLResponse(found.read_text(encoding="utf-8"))  # self-contained: its figures are inside

    @app.get("/compare", response_class=HTMLResponse)
    async def compare_page(base: str, new: str):
        if compare is None:
            return PlainTextResponse("this dashboard was started without a comparison function", status_code=501)
        try:
            base_run, new_run = await run_in_threadpool(read, lambda s: (s.get_run(base), s.get_run(new)))
        except LookupError as e:
            return not_found(e)
        result = await run_in_threadpool(compare, base_run, new_run)
        return HTMLResponse(page(f"Compare {base} → {new}", "none", dict(compare=compare_html(result))))

    @app.get("/static/dashboard.js")
    async def script():
        return Response((STATIC / "dashboard.js").read_text(encoding="utf-8"), media_type="text/javascript")

    @app.get("/events")
    async def events(request: Request, view: str):
        async def stream():
            yield "retry: 1000\n\n"  # reconnect a second after the server goes away
            last, quiet = None, 0.0
            while not await request.is_disconnected() and not app.state.stopping():
                try:
                    marker = await run_in_threadpool(read, lambda s: s.change_marker())
                    if marker != last:
                        parts = await run_in_threadpool(fragments, view)
                        last, quiet = marker, 0.0
                        yield f"event: update\ndata: {json.dumps(dict(fragments=parts))}\n\n"
                except LookupError as e:  # the run is not there (yet): say so, keep watching
                    yield f"event: problem\ndata: {json.dumps(str(e))}\n\n"
                quiet += poll_s
                if quiet >= 15:  # a comment line keeps proxies and the browser from timing out
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(poll_s)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
