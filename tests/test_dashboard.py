"""`bench dashboard`: the read-only store handle, the pages over real HTTP, the live event stream,
and the page in headless Chromium (Playwright driving Debian's chromium) while another process
writes the store.

Every server listens on 127.0.0.1 on a free port; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bench.cli import main
from bench.store import Store, StoreError
from reports.dashboard import create_app, key_label, progress
from tests.dashboard_writer import add_cell, fixture_cell

ROOT = Path(__file__).resolve().parent.parent
WRITER = ROOT / "tests" / "dashboard_writer.py"
HOSTILE = '<img src=x onerror="window.__pwned=1">'
FINGERPRINT = json.loads((ROOT / "tests" / "fixtures" / "run_a.json").read_text())["fingerprint"]


def write(store_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Write the store from another process, as a running sweep or training would."""
    return subprocess.run([sys.executable, str(WRITER), str(store_path), *args], capture_output=True, text=True,
                          timeout=60, check=True)


@pytest.fixture
def stored(tmp_path) -> dict:
    """A store with a running sweep (3 cells planned, 1 finished, with a hostile model name) and a
    running training run with 5 steps."""
    path = tmp_path / "bench.sqlite"
    store = Store(path)
    run_id = store.create_run(FINGERPRINT, dict(launches=1, models=["small"], backends=["eager"]), name="live")
    keys = [fixture_cell(m)["cell_id"] for m in (HOSTILE, "second", "third")]
    store.add_round(run_id, 0, keys, dict(decode_ms=1.0, gemv_gb_s=20.0))
    add_cell(store, run_id, HOSTILE)
    train_id = store.create_training_run(FINGERPRINT, dict(train=dict(steps=100)), str(tmp_path / "ckpt"))
    for step in range(1, 6):
        store.add_training_step(train_id, step, dict(loss=5.0 - 0.1 * step, lr=1e-3, tokens_per_s=900.0, step_s=0.1))
    store.close()
    return dict(path=path, run_id=run_id, train_id=train_id, keys=keys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The dashboard on a real uvicorn server in a thread; ``stop()`` shuts it down as Ctrl-C would."""

    def __init__(self, store_path: Path, port: int | None = None):
        import uvicorn

        from bench.results.compare import compare_runs

        self.port = port or free_port()
        app = create_app(lambda: Store(store_path, read_only=True), compare=compare_runs, poll_s=0.2)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        app.state.stopping = lambda: self.server.should_exit  # as bench dashboard does
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the dashboard did not start within 20 s"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "the dashboard did not shut down within 20 s"


@pytest.fixture
def server(stored):
    s = Server(stored["path"])
    yield s
    s.stop()


# --- the store, read-only ----------------------------------------------------------------------------

def test_a_read_only_store_reads_and_never_writes(stored):
    before = stored["path"].read_bytes()
    store = Store(stored["path"], read_only=True)
    with store.snapshot():
        run = store.get_run(stored["run_id"])
        assert run["cells"][0]["model"] == HOSTILE
        assert store.list_training_runs()[0]["n_steps"] == 5
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.add_launch(stored["run_id"], "k", 0, dict(status="ok"))
    store.close()
    assert stored["path"].read_bytes() == before


def test_a_read_only_store_that_is_not_there_is_one_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no bench store at"):
        Store(tmp_path / "missing.sqlite", read_only=True)
    assert not (tmp_path / "missing.sqlite").exists()
    foreign = tmp_path / "foreign.sqlite"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(StoreError, match="not a bench store"):
        Store(foreign, read_only=True)


def test_the_change_marker_moves_with_every_kind_of_write(stored):
    def marker():
        with Store(stored["path"], read_only=True) as s:
            return s.change_marker()

    seen = [marker()]
    write(stored["path"], stored["run_id"], "cell", "second")
    seen.append(marker())
    write(stored["path"], stored["train_id"], "steps", "6", "1")
    seen.append(marker())
    with Store(stored["path"]) as s:
        s.finish_run(stored["run_id"])
    seen.append(marker())
    assert len(set(seen)) == 4


def test_reading_never_blocks_or_breaks_a_writer(stored):
    """A writer commits 150 launches and cells back to back while readers take snapshots without pause:
    the writer sees no 'database is locked' and the readers never fail."""
    writer = subprocess.Popen([sys.executable, str(WRITER), str(stored["path"]), stored["run_id"], "burst", "150"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads, failures = [0], []

    def reader():
        while writer.poll() is None:
            try:
                with Store(stored["path"], read_only=True) as s, s.snapshot():
                    run = s.get_run(stored["run_id"])
                    progress(run, s.launches(run["run_id"]))
                reads[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure of a reader is what this test catches
                failures.append(repr(e))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    out, errors = writer.communicate(timeout=120)
    for t in threads:
        t.join(timeout=30)
    assert writer.returncode == 0, errors
    assert json.loads(out.strip().splitlines()[-1]) == dict(errors=0), errors
    assert failures == []
    assert reads[0] > 0
    with Store(stored["path"], read_only=True) as s:
        assert len(s.get_run(stored["run_id"])["cells"]) == 1 + 150


# --- progress, from what the run stored ---------------------------------------------------------------

def _launch(key, round_, wall, attempt=0):
    return dict(key=key, round=round_, record=dict(status="ok", wall_s=wall, attempt=attempt))


def test_progress_counts_planned_and_done_launches_and_names_the_running_cell():
    a, b, c = (json.dumps(["small", backend, "fp32", "cpu", 1, 2, 32, 16]) for backend in ("eager", "mkl", "ipex"))
    run = dict(status="running", created_at="2026-12-01T10:00:00+00:00", sweep=dict(launches=3),
               rounds=[dict(round=0, order=[a, b, c]), dict(round=1, order=[c, a])],
               cells=[dict(cell_id=a, status="ok"), dict(cell_id=b, status="failed", reason="launch 1 of 3: boom"),
                      dict(cell_id=c, status="ok"), dict(cell_id="s", status="skipped")])
    launches = [_launch(a, 0, 4.0), _launch(b, 0, 2.0), _launch(c, 0, 6.0), _launch(c, 1, 4.0)]
    p = progress(run, launches)
    # b failed after 1 launch and runs no more: 3 + 1 + 3 planned; a has 1, b 1, c 2 done
    assert (p["planned"], p["done"], p["skipped"], p["cells"]) == (7, 4, 1, 3)
    assert p["current"] == dict(label="small eager/fp32 batch 1 threads 2", round=2)  # round 1 did c, a is next
    assert p["eta_s"] == pytest.approx(4.0 * 3)  # the mean launch (4 s) times the 3 left
    assert p["failures"] == [dict(label="small mkl/fp32 batch 1 threads 2", status="failed",
                                  reason="launch 1 of 3: boom")]
    finished = progress(dict(run, status="finished", finished_at="2026-12-01T10:05:00+00:00"), launches)
    assert finished["current"] is None and finished["eta_s"] is None and finished["elapsed_s"] == 300


def test_a_run_without_rounds_shows_its_stored_cells():
    """bench load stores one cell per load point as each finishes, and plans no rounds."""
    from reports.dashboard import progress_html

    run = dict(status="running", created_at="2026-12-01T10:00:00+00:00", sweep={}, rounds=[],
               cells=[dict(cell_id="a", status="ok", scenario="serve"), dict(cell_id="b", status="ok", scenario="serve")])
    p = progress(run, [])
    assert (p["cells"], p["stored"]) == (0, 2)
    assert '<span id="cells-stored">2</span> cells stored' in progress_html(p)


def test_key_labels_read_every_scenario():
    assert key_label(json.dumps(["/x/small-trained", "cuda", "fp16", "cuda:0", 4, None, 32, 16])) == \
        "small-trained cuda/fp16 on cuda:0 batch 4 threads default"
    assert key_label(json.dumps(["train", "gpt2", "eager", "bf16", "cpu", 4, 2, 32, 16, 512, True])).startswith(
        "train · gpt2 eager/bf16 batch 4")
    assert key_label("not json") == "not json"


# --- pages and events over real HTTP ------------------------------------------------------------------

def test_pages_render_every_view_and_escape_stored_values(server, stored):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        index = client.get("/")
        assert index.status_code == 200 and stored["run_id"] in index.text and stored["train_id"] in index.text
        run = client.get(f"/runs/{stored['run_id']}")
        assert run.status_code == 200
        assert "1</span> of <span id=\"launches-planned\">3</span>" in run.text
        assert HOSTILE not in run.text and "&lt;img src=x" in run.text
        report = client.get(f"/runs/{stored['run_id']}/report")
        assert report.status_code == 200 and "Benchmark report" in report.text and HOSTILE not in report.text
        train = client.get(f"/train/{stored['train_id']}")
        assert train.status_code == 200 and 'class="mark"' in train.text
        script = client.get("/static/dashboard.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        missing = client.get("/runs/20990101-000000-beef")
        assert missing.status_code == 404 and "unknown run id" in missing.text
        assert client.get("/train/train-nope").status_code == 404


def _store_fixture_run(store: Store, name: str) -> str:
    """The report fixture's run, its tiny eager and onnxruntime cells only (the comparison bootstraps
    each cell; onnxruntime's are the ones the fixtures make slower)."""
    run = json.loads((ROOT / "tests" / "fixtures" / f"{name}.json").read_text())
    run_id = store.create_run(run["fingerprint"], run["sweep"], name=name)
    for r in run["rounds"]:
        store.add_round(run_id, r["round"], r["order"], r["sentinel"])
    for cell in [c for c in run["cells"] if c["model"] == "tiny" and c["backend"] in ("eager", "onnxruntime")]:
        store.add_cell(run_id, cell)
    return run_id


def test_compare_page_shows_the_verdicts_of_two_runs(tmp_path):
    from bench.results.compare import compare_runs

    path = tmp_path / "two.sqlite"
    with Store(path) as store:
        a, b = _store_fixture_run(store, "run_a"), _store_fixture_run(store, "run_b")
        expected = compare_runs(store.get_run(a), store.get_run(b))
    slower = len(expected.by_verdict("slower"))
    assert slower > 0, "the fixtures are made to differ"
    s = Server(path)
    try:
        with httpx.Client(base_url=s.url, timeout=60) as client:
            index = client.get("/")
            assert f'<option value="{a}">' in index.text and f'<option value="{b}">' in index.text
            page = client.get("/compare", params=dict(base=a, new=b))
            missing = client.get("/compare", params=dict(base=a, new="nope"))
    finally:
        s.stop()
    assert page.status_code == 200
    assert f"{len(expected.cells)} matched cells: <strong>{slower} slower</strong>" in page.text
    assert page.text.count('data-verdict="slower"') == slower
    assert missing.status_code == 404 and "unknown run id" in missing.text


def test_event_stream_pushes_a_cell_written_by_another_process(server, stored):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("GET", "/events", params=dict(view=f"run:{stored['run_id']}")) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = _events(stream.iter_lines())
            first = next(events)
            assert "second" not in first["fragments"]["results"]
            write(stored["path"], stored["run_id"], "cell", "second")
            # The launch and the cell are two commits, so one or two updates come; each is bounded
            # by the client's 30 s read timeout, and the count by the loop.
            for _ in range(3):
                update = next(events)
                if "second" in update["fragments"]["results"]:
                    break
            assert "second" in update["fragments"]["results"]
            assert '<span id="launches-done">2</span>' in update["fragments"]["progress"]


def _events(lines):
    """The data of each 'update' event of a server-sent event stream."""
    kind = None
    for line in lines:
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and kind == "update":
            yield json.loads(line.split(":", 1)[1])


@pytest.mark.parametrize("args, message", [
    (["--store", "{missing}"], "error: no bench store at"),
    (["--port", "0"], "--port 0 is not a TCP port (1-65535)"),
    (["--port", "70000"], "--port 70000 is not a TCP port (1-65535)"),
    (["--port", "http"], "--port: invalid int value: 'http'"),
    (["--poll", "0"], "--poll 0.0 must be a positive number of seconds"),
])
def test_cli_refuses_bad_input_in_one_line_and_exit_code_2(tmp_path, capsys, stored, args, message):
    argv = ["dashboard", "--store", str(stored["path"]), "--host", "127.0.0.1"]
    argv += [a.format(missing=tmp_path / "none.sqlite") for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "none.sqlite").exists()  # a missing store is not created


def test_the_dashboard_command_serves_the_store_and_stops_cleanly_on_ctrl_c(stored):
    """`bench dashboard` itself, in its own process as a user starts it (the tests above use ``Server``,
    which repeats the command's wiring in a thread): it serves the index and a run page naming the
    stored cells, keeps an event stream open, and Ctrl-C (SIGINT) ends the stream and the process:
    "stopped", no traceback, and exit code 130 (uvicorn shuts down gracefully, then raises the signal
    again; docs/commands.md: 130 is an interrupt). Loopback only; every wait is bounded."""
    with Store(stored["path"]) as s:
        cell = add_cell(s, stored["run_id"], "cli-model")
    port = free_port()
    cmd = [sys.executable, "-m", "bench.cli", "dashboard", "--store", str(stored["path"]), "--host", "127.0.0.1",
           "--port", str(port), "--poll", "0.2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 90  # a cold start imports torch (bench.models)
            while True:
                assert proc.poll() is None, f"bench dashboard exited with {proc.returncode}: {proc.communicate()[1]}"
                assert time.monotonic() < deadline, "bench dashboard did not answer within 90 s"
                try:
                    index = client.get("/")
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            assert index.status_code == 200
            assert stored["run_id"] in index.text and stored["train_id"] in index.text and "live" in index.text
            run = client.get(f"/runs/{stored['run_id']}")
            assert run.status_code == 200
            assert "cli-model" in run.text and f"{cell['backend']} · {cell['precision']}" in run.text
            assert HOSTILE not in run.text and "&lt;img src=x" in run.text  # the other stored cell, escaped
            assert client.get("/runs/20990101-000000-beef").status_code == 404
            with client.stream("GET", "/events", params=dict(view=f"run:{stored['run_id']}")) as stream:
                events = _events(stream.iter_lines())
                assert "cli-model" in next(events)["fragments"]["results"]
                proc.send_signal(signal.SIGINT)
                for _ in events:  # the stream ends at shutdown; a hung one trips the client's 30 s read timeout
                    pass
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines == [f"dashboard of {stored['path']} at http://127.0.0.1:{port}/ (Ctrl-C stops it)", "stopped"], err


# --- the page in a real browser ------------------------------------------------------------------------

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def open_page(browser, url: str):
    """A page that collects every script error and console error for the test to check."""
    page = browser.new_page(viewport=dict(width=1400, height=1800))
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: page.errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.goto(url)
    page.wait_for_function("document.body.getAttribute('data-updates') !== '0'", timeout=15_000)  # live
    return page


def test_the_run_page_shows_a_new_cell_within_seconds_and_hostile_names_stay_text(browser, server, stored):
    page = open_page(browser, f"{server.url}/runs/{stored['run_id']}")
    assert page.text_content("#launches-done") == "1"
    write(stored["path"], stored["run_id"], "cell", "second")
    page.wait_for_function("document.getElementById('launches-done').textContent === '2'", timeout=10_000)
    assert "second" in page.text_content("#results")
    assert HOSTILE in page.text_content("#results")  # shown as the text it is
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
    assert page.get_attribute("html", "data-js-errors") is None
    assert page.errors == []
    out = ROOT / "runs" / "dashboard-screenshot.png"
    out.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_training_curve_grows_as_steps_are_recorded(browser, server, stored):
    page = open_page(browser, f"{server.url}/train/{stored['train_id']}")
    marks = "document.querySelectorAll('#train-charts svg.chart .mark').length"
    before = page.evaluate(marks)
    assert before > 0 and page.text_content("#train-step") == "5"
    write(stored["path"], stored["train_id"], "steps", "6", "10")
    page.wait_for_function("document.getElementById('train-step').textContent === '15'", timeout=10_000)
    assert page.evaluate(marks) > before
    assert page.errors == []


def test_the_page_reconnects_after_the_server_restarts(browser, stored):
    first = Server(stored["path"])
    page = open_page(browser, f"{first.url}/runs/{stored['run_id']}")
    first.stop()
    page.wait_for_function("document.getElementById('live').className.indexOf('off') >= 0", timeout=10_000)
    write(stored["path"], stored["run_id"], "cell", "second")
    second = Server(stored["path"], port=first.port)
    try:
        page.wait_for_function("document.getElementById('launches-done').textContent === '2'", timeout=15_000)
        assert "live" in page.text_content("#live")
    finally:
        second.stop()
    # the dropped stream itself shows as a console error in Chromium; nothing else may
    assert [e for e in page.errors if "EventSource" not in e and "ERR_" not in e] == []
