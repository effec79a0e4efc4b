"""One launch, one process.

The parent (``run_cell``) starts ``python -m bench.executors.cell`` with the backend's thread
environment already in place (OMP/MKL/KMP variables act only if set before the libraries
load), sends the cell's spec on stdin and reads one JSON launch record back from stdout. A
crash, an abort in a native library, an out-of-memory kill or a hang ends that launch alone:
the parent records it as ``failed``, ``oom`` or ``timeout`` with the reason. A cell runs in
several such launches, one per round of the sweep (``bench.sweep.run_sweep``); its record is
derived from them (``bench.results.records``).
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
    proc = subprocess.Popen([sys.executable, "-m", "bench.executors.cell"], stdin=subprocess.PIPE,
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
    from backends.base import BackendUnavailable, TrainingUnsupported, UnsupportedPrecision
    from bench.scenarios.inference import measure_cell
    from bench.spec import CellSpec

    try:
        spec = CellSpec.from_dict(spec_dict)
        if spec.scenario == "train":
            from bench.scenarios.train import measure_train as measure
        else:
            measure = measure_cell
        record = dict(status="ok", reason="", **measure(spec))
    except (UnsupportedPrecision, BackendUnavailable, TrainingUnsupported) as e:
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
