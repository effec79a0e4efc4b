import csv
import io
import json
import math
import re
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.results.schema import CELL_FIELDS, STAT_KEYS
from bench.spec import cell_id as cell_key
from bench.store import (DEFAULT_STORE, SCHEMA_VERSION, Store, StoreError, UnknownRun, export_csv,
                         export_json, sweep_key)

REPO = Path(__file__).resolve().parent.parent
FINGERPRINT = {"cpu": {"brand": "Test CPU", "flags": ["avx2"]}, "versions": {"torch": "2.8.0"}, "python": "3.11"}
SWEEP = {"models": ["tiny"], "backends": ["eager", "mkl"], "batch": [1, 2]}


def stats(median):
    return dict(median=median, p90=median * 1.1, p99=median * 1.2, mean=median, stdev=0.1, cv=0.1 / median,
                ci95_low=median * 0.95, ci95_high=median * 1.05, n=5)


def make_cell(backend="eager", batch=1, status="ok", **extra):
    cell = dict(model="tiny", backend=backend, precision="fp32", device="cpu", batch=batch, threads=2,
                prompt_len=8, gen_len=4, status=status, reason="" if status == "ok" else "boom",
                ttft_ms=stats(2.0), tpot_ms=stats(1.0), decode_tok_s=batch / 1.0e-3,
                decode_tok_s_ci=[batch * 1000 / 1.05, batch * 1000 / 0.95],
                parity=dict(max_abs_logit_diff=1e-6, token_agreement=1.0, steps=8, precision="fp32",
                            tolerance=dict(max_abs_logit_diff=1e-3, min_token_agreement=1.0), passed=True),
                samples=dict(ttft_ms=[2.0, 2.1, 1.9], tpot_ms=[1.0, 1.1, 0.9]),
                backend_info=dict(providers=["CPUExecutionProvider"]))
    cell.update(extra)
    cell["cell_id"] = cell_key(cell)  # every record the harness writes carries its identity
    return cell


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "bench.sqlite") as s:
        yield s


def test_default_path_is_under_runs():
    assert DEFAULT_STORE == Path("runs") / "bench.sqlite"


def test_round_trip_keeps_every_sample(store):
    run_id = store.create_run(FINGERPRINT, SWEEP, name="smoke")
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", run_id)
    cells = [make_cell("eager", 1), make_cell("mkl", 2, status="failed")]
    for c in cells:
        store.add_cell(run_id, c)
    store.finish_run(run_id, "finished")
    run = store.get_run(run_id)
    assert run["run_id"] == run_id and run["name"] == "smoke" and run["status"] == "finished"
    assert run["fingerprint"] == FINGERPRINT and run["sweep"] == SWEEP
    assert run["sweep_key"] == sweep_key(SWEEP)
    assert run["cells"] == cells  # raw samples included, in the order added


def test_a_record_of_an_earlier_version_gets_its_decode_interval_on_read(store):
    """Records stored before decode_tok_s_ci existed open with it derived from their tpot_ms."""
    run_id = store.create_run(FINGERPRINT, SWEEP)
    old = make_cell("eager", 4)
    del old["decode_tok_s_ci"]
    store.add_cell(run_id, old)
    train = make_cell("eager", 1, scenario="train", tpot_ms=None)
    del train["decode_tok_s_ci"]
    store.add_cell(run_id, train)
    first, second = store.get_run(run_id)["cells"]
    assert first["decode_tok_s_ci"] == pytest.approx([4000 / 1.05, 4000 / 0.95])
    assert second["decode_tok_s_ci"] is None  # no time per token, no interval


def test_run_ids_are_unique(store):
    ids = {store.create_run(FINGERPRINT, SWEEP) for _ in range(20)}
    assert len(ids) == 20


def test_list_latest_and_counts(store):
    first = store.create_run(FINGERPRINT, SWEEP, name="a")
    store.add_cell(first, make_cell("eager"))
    second = store.create_run(FINGERPRINT, SWEEP, name="b")
    store.add_cell(second, make_cell("eager"))
    store.add_cell(second, make_cell("mkl", status="skipped"))
    assert store.latest_run_id() == second
    assert store.get_run("latest")["run_id"] == second
    runs = store.list_runs()
    assert [r["run_id"] for r in runs] == [second, first]
    assert runs[0]["n_cells"] == 2 and runs[0]["n_ok"] == 1 and runs[0]["status"] == "running"
    assert runs[1]["n_cells"] == 1 and runs[1]["n_ok"] == 1
    assert set(runs[0]) == {"run_id", "created_at", "name", "n_cells", "n_ok", "fingerprint_id", "status"}


def test_empty_store(store):
    assert store.list_runs() == [] and store.latest_run_id() is None
    with pytest.raises(UnknownRun, match="latest"):
        store.get_run("latest")


def test_unknown_run_lists_nearby_ids(store):
    run_id = store.create_run(FINGERPRINT, SWEEP)
    typo = run_id[:-1] + ("0" if run_id[-1] != "0" else "1")
    with pytest.raises(UnknownRun, match=re.escape(run_id)) as err:
        store.get_run(typo)
    assert typo in str(err.value) and isinstance(err.value, LookupError)
    with pytest.raises(UnknownRun):
        store.add_cell("no-such-run", make_cell())


def test_invalid_statuses_are_rejected(store):
    run_id = store.create_run(FINGERPRINT, SWEEP)
    with pytest.raises(ValueError, match="'weird'"):
        store.add_cell(run_id, make_cell(status="weird"))
    with pytest.raises(ValueError, match="'done'"):
        store.finish_run(run_id, "done")


def test_resume_keeps_ok_and_skipped_and_retries_failures(store):
    run_id = store.create_run(FINGERPRINT, SWEEP)
    ok, skipped = make_cell("eager", 1), make_cell("eager", 2, status="skipped")
    failed, timeout, oom = (make_cell("mkl", b, status=s) for b, s in ((1, "failed"), (2, "timeout"), (4, "oom")))
    for c in (ok, skipped, failed, timeout, oom):
        store.add_cell(run_id, c)
    assert store.done_keys(run_id) == {cell_key(ok), cell_key(skipped)}
    assert store.done_keys(run_id, retry=()) == {cell_key(c) for c in (ok, skipped, failed, timeout, oom)}
    # A retried cell that now succeeds supersedes its failed attempt; both rows are kept.
    store.add_cell(run_id, make_cell("mkl", 1, status="ok"))
    assert cell_key(failed) in store.done_keys(run_id)
    run = store.get_run(run_id)
    assert len(run["cells"]) == 5
    assert [c["status"] for c in run["cells"] if cell_key(c) == cell_key(failed)] == ["ok"]
    assert store.db.execute("SELECT count(*) FROM cells").fetchone()[0] == 6


def test_find_resumable_matches_sweep_and_fingerprint(store):
    other_fp = {**FINGERPRINT, "versions": {"torch": "2.9.0"}}
    old = store.create_run(FINGERPRINT, SWEEP)
    store.finish_run(old, "finished")
    newer = store.create_run(FINGERPRINT, SWEEP)
    store.create_run(other_fp, SWEEP)
    store.create_run(FINGERPRINT, {**SWEEP, "batch": [8]})
    fp_id = store.get_run(old)["fingerprint_id"]
    assert store.find_resumable(sweep_key(SWEEP), fp_id) == newer
    assert store.find_resumable(sweep_key({"other": 1}), fp_id) is None
    assert sweep_key({"b": 1, "a": 2}) == sweep_key({"a": 2, "b": 1})  # key order does not matter
    # A caller's own key, carried in the sweep dict, is the one matched.
    own = store.create_run(FINGERPRINT, {**SWEEP, "sweep_key": "mine"})
    assert store.find_resumable("mine", fp_id) == own


def test_cells_survive_a_killed_writer(tmp_path):
    """Each add_cell commits at once: a process that dies mid-run loses nothing it finished."""
    path = tmp_path / "bench.sqlite"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from bench.store import Store
        from tests.test_store import FINGERPRINT, SWEEP, make_cell
        store = Store({str(path)!r})
        run_id = store.create_run(FINGERPRINT, SWEEP)
        store.add_cell(run_id, make_cell("eager", 1))
        store.add_cell(run_id, make_cell("eager", 2))
        print(run_id, flush=True)
        os._exit(9)  # no close, no atexit, no finish_run: like a SIGKILL
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 9, proc.stderr
    run_id = proc.stdout.strip()
    with Store(path) as store:
        run = store.get_run(run_id)
        assert run["status"] == "running"  # never finished
        assert [c["batch"] for c in run["cells"]] == [1, 2]
        assert len(store.done_keys(run_id)) == 2


def test_wal_mode_and_schema_version(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_corrupt_file_is_a_one_line_store_error(tmp_path):
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(b"this is not an sqlite database at all" * 100)
    with pytest.raises(StoreError, match=re.escape(str(path))) as err:
        Store(path)
    assert "\n" not in str(err.value)


def test_foreign_sqlite_file_and_newer_schema_are_refused(tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(StoreError, match="photos"):
        Store(other)
    newer = tmp_path / "newer.sqlite"
    Store(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="schema version"):
        Store(newer)


def test_export_json_is_strict_and_complete(store):
    run_id = store.create_run(FINGERPRINT, SWEEP)
    store.add_cell(run_id, make_cell(roofline_fraction=float("nan")))
    text = export_json(store.get_run(run_id))
    data = json.loads(text)  # strict: NaN became null
    assert data["cells"][0]["roofline_fraction"] is None
    assert data["cells"][0]["samples"]["ttft_ms"] == [2.0, 2.1, 1.9]
    assert data["fingerprint"] == FINGERPRINT
    assert "NaN" not in text


def test_export_csv_columns(store):
    run_id = store.create_run(FINGERPRINT, SWEEP)
    store.add_cell(run_id, make_cell("eager", 1, my_extra=3))
    store.add_cell(run_id, make_cell("mkl", 2, status="failed", ttft_ms=None, tpot_ms=None, parity=None))
    run = store.get_run(run_id)
    rows = list(csv.DictReader(io.StringIO(export_csv(run))))
    header = list(rows[0])
    assert header[:4] == ["run_id", "fingerprint_id", "cell_id", "backend"]
    assert [f"ttft_ms_{k}" for k in STAT_KEYS] == header[header.index("ttft_ms_median"):][:len(STAT_KEYS)]
    assert "parity_max_abs_logit_diff" in header and "parity_tolerance_min_token_agreement" in header
    assert "samples" not in header and not any(h.startswith("samples") for h in header)
    assert header[-1] == "my_extra"
    # schema order: every plain field appears in CELL_FIELDS order
    plain = [h for h in header if h in CELL_FIELDS]
    assert plain == [f for f in CELL_FIELDS if f in plain]
    assert rows[0]["ttft_ms_median"] == "2.0" and rows[0]["parity_passed"] == "True"
    assert json.loads(rows[0]["backend_info"]) == {"providers": ["CPUExecutionProvider"]}
    assert rows[1]["status"] == "failed" and rows[1]["ttft_ms_median"] == "" and rows[1]["parity_passed"] == ""
    # the same columns whatever the cells: an empty run has the schema's header too
    empty = export_csv({"run_id": "x", "cells": []}).splitlines()[0].split(",")
    assert empty == header[:-1]
    assert not math.isnan(float(rows[0]["decode_tok_s"]))


def test_training_runs_keep_their_logged_steps(store):
    run_id = store.create_training_run(FINGERPRINT, {"model": "tiny", "steps": 3}, "/tmp/ckpt", name="t")
    assert run_id.startswith("train-")
    for step, loss in ((1, 5.0), (2, 4.5), (3, 4.1)):
        store.add_training_step(run_id, step, {"loss": loss, "lr": 1e-3})
    store.add_training_step(run_id, 3, {"loss": 4.0, "lr": 1e-3, "val_loss": 4.2})  # a resume logs it again
    store.finish_training_run(run_id, "finished", {"best_val_loss": 4.2})
    run = store.get_training_run("latest")
    assert run["run_id"] == run_id and run["status"] == "finished" and run["summary"] == {"best_val_loss": 4.2}
    assert [(s["step"], s["loss"]) for s in run["steps"]] == [(1, 5.0), (2, 4.5), (3, 4.0)]
    assert store.training_runs_for("/tmp/ckpt") == [run_id]
    assert store.list_runs() == []  # training runs are not benchmark runs
    with pytest.raises(UnknownRun):
        store.get_training_run("train-nope")
