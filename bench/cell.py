"""One cell, one process.

The parent (``run_cell``) starts ``python -m bench.cell`` with the backend's thread
environment already in place (OMP/MKL/KMP variables act only if set before the libraries
load), sends the cell's spec on stdin and reads one JSON record back from stdout. A crash,
an abort in a native library, an out-of-memory kill or a hang ends that cell alone: the
parent records it as ``failed``, ``oom`` or ``timeout`` with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback

RESULT_MARK = "@@CELL-RESULT@@ "


def child_environment(backend: str, threads: int | None) -> dict[str, str]:
    """This process's environment plus the backend's thread settings for ``threads``."""
    from backends import registry

    env = dict(os.environ)
    env.update(registry.get_backend_class(backend).thread_environment(threads))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cell(spec: dict, timeout: float) -> dict:
    """Run one cell in a fresh subprocess; always returns a record with a status."""
    start = time.perf_counter()
    env = child_environment(spec["backend"], spec.get("threads"))
    proc = subprocess.Popen([sys.executable, "-m", "bench.cell"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(json.dumps(spec), timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: runtimes may have started helpers
        proc.communicate()
        return dict(status="timeout", reason=f"cell did not finish within {timeout:.0f} s",
                    wall_s=time.perf_counter() - start)
    record = _parse(stdout)
    if record is None:
        record = _died(proc.returncode, stderr)
    record["wall_s"] = time.perf_counter() - start
    return record


def run_launches(spec: dict, timeout: float, launches: int) -> dict:
    """Run a cell ``launches`` times, each in a fresh process, and merge them into one record.

    Samples taken inside one process move together (where its pages and threads landed), so
    the spread between processes is part of the answer: on a 2-core VM the median time per
    token of the same small-model cell varied by 40% from process to process while each
    process's own interval was +-2%. Parity and the KV-cache size are measured in the first
    launch only.
    """
    records = []
    for i in range(launches):
        # Parity and the KV-cache size are the same in every launch: measured in the first only.
        record = run_cell(spec if i == 0 else dict(spec, parity_steps=0, measure_kv=False), timeout)
        if record["status"] != "ok":
            if i:
                record["reason"] = f"launch {i + 1} of {launches}: {record['reason']}"
                record["wall_s"] += sum(r["wall_s"] for r in records)
            return record
        records.append(record)
    return merge_launches(records, spec)


SAMPLE_KINDS = ("ttft_ms", "tpot_ms", "e2e_ms")


def merge_launches(records: list[dict], spec: dict) -> dict:
    """One record from the records of one or more launches of the same cell.

    Statistics are recomputed over the pooled samples with a two-level bootstrap interval
    (launches, then samples); memory is the largest of the launches; load time, first call,
    parity, KV-cache size and backend details are the first launch's (the cold one).
    """
    from bench import stats

    first = records[0]
    merged = dict(first, launches=len(records))
    groups = {k: [r["samples"][k] for r in records] for k in SAMPLE_KINDS}
    merged["samples"] = {k: [x for g in groups[k] for x in g] for k in SAMPLE_KINDS}
    merged["launch_sizes"] = {k: [len(g) for g in groups[k]] for k in SAMPLE_KINDS}
    merged["launch_medians"] = {k: [r[k]["median"] for r in records] for k in ("ttft_ms", "tpot_ms")}
    for k in ("ttft_ms", "tpot_ms"):
        merged[k] = stats.summarize(merged["samples"][k], groups=groups[k])
    e2e = stats.summarize(merged["samples"]["e2e_ms"])["median"]
    batch = spec["batch"]
    merged["prefill_tok_s"] = batch * spec["prompt_len"] / (merged["ttft_ms"]["median"] / 1e3)
    merged["decode_tok_s"] = batch / (merged["tpot_ms"]["median"] / 1e3)
    merged["e2e_tok_s"] = batch * spec["gen_len"] / (e2e / 1e3)
    if first.get("roofline_decode_tok_s"):
        merged["roofline_fraction"] = merged["decode_tok_s"] / first["roofline_decode_tok_s"]
    for k in ("peak_rss_mb", "model_mb", "device_peak_mb"):
        values = [r[k] for r in records if r.get(k) is not None]
        merged[k] = max(values) if values else None
    merged["warmup_reps"] = sum(r["warmup_reps"] for r in records)
    merged["warmup_settled"] = all(r["warmup_settled"] for r in records)
    merged["wall_s"] = sum(r["wall_s"] for r in records)
    return merged


def _parse(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return None


def _died(returncode: int, stderr: str) -> dict:
    """The record of a cell process that ended without a result."""
    tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    if returncode == -signal.SIGKILL:
        return dict(status="oom", reason="killed by SIGKILL (the kernel's out-of-memory killer, most likely)")
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return dict(status="failed", reason=f"cell process died of {name}: {tail[0][:300]}")
    return dict(status="failed", reason=f"cell process exited {returncode} without a result: {tail[0][:300]}")


def _child() -> None:
    spec_dict = json.loads(sys.stdin.read())
    # Imported here, after the environment is in place, so thread settings take effect.
    from backends.base import BackendUnavailable, UnsupportedPrecision
    from bench.measure import CellSpec, measure_cell

    spec = CellSpec(**spec_dict)
    try:
        record = dict(status="ok", reason="", **measure_cell(spec))
    except (UnsupportedPrecision, BackendUnavailable) as e:
        record = dict(status="skipped", reason=str(e))
    except MemoryError as e:
        record = dict(status="oom", reason=f"MemoryError: {e}")
    except Exception as e:  # one cell's failure is a record, never the end of the sweep
        record = dict(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0][:500],
                      traceback=traceback.format_exc()[-4000:])
    sys.stdout.write(RESULT_MARK + json.dumps(record, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


if __name__ == "__main__":
    _child()
