"""The drift sentinel: a fixed small workload, measured at the start of every round of a sweep.

A shared machine changes speed over minutes (other tenants, frequency, memory placement).
Interleaved rounds spread that drift over every cell alike, but cannot say how large it was,
nor whether two runs were taken on a machine in the same state. The sentinel can: the same
two tiny measurements, taken between launches, when no cell is running, in a fresh process
with the same thread environment a cell gets (``read_isolated``; a first version read it in the
harness's own long-lived process, and its decode step moved 2.3x over one run while the cells
did not move with it):

- ``decode_ms``: the median time of a decode step of the ``small`` preset (eager fp32, batch
  1, a 32-token cache), over ``STEPS`` steps (about a quarter of a second): the per-step overhead and small-matrix work
  that overhead-bound cells are made of;
- ``gemv_gb_s``: the best bandwidth of a matrix-vector product over a 64 MiB matrix: the
  weight streaming that memory-bound cells are made of.

Each launch records the reading of the round it ran in; reports draw the readings over the
run; ``bench compare`` sets its noise floor from the two runs' sentinels and warns when they
differ beyond their spread.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from datetime import datetime

STEPS = 300
WARMUP = 20
GEMV_MIB = 64
GEMV_REPEATS = 5
PRESET = "small"
KINDS = ("decode_ms", "gemv_gb_s")  # what a reading holds; decode_ms lower is better, gemv higher


@functools.cache
def _model():
    from model.gpt import build_model, get_config

    return build_model(get_config(PRESET), seed=0).eval()


def read(threads: int | None = None) -> dict:
    """One sentinel reading, with ``threads`` intra-op threads (restored afterwards)."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = _model()
        with torch.inference_mode():
            ids = torch.zeros((1, 32), dtype=torch.long)
            _, cache = model(ids, None, None, None, last_only=True)
            token = torch.zeros((1, 1), dtype=torch.long)
            for _ in range(WARMUP):  # allocator, caches and kernel choice settle before timing
                model(token, None, cache, None, last_only=True)
            steps = []
            for _ in range(STEPS):
                t = time.perf_counter()
                model(token, None, cache, None, last_only=True)  # the same step each time: a fixed workload
                steps.append((time.perf_counter() - t) * 1e3)
            side = int((GEMV_MIB * 2**20 // 4) ** 0.5)
            m, v = torch.ones(side, side), torch.ones(side)
            torch.mv(m, v)  # first touch
            best = float("inf")
            for _ in range(GEMV_REPEATS):
                t = time.perf_counter()
                torch.mv(m, v)
                best = min(best, time.perf_counter() - t)
            del m
    finally:
        torch.set_num_threads(previous)
    steps.sort()
    return dict(at=datetime.now().astimezone().isoformat(timespec="seconds"),
                decode_ms=steps[len(steps) // 2], gemv_gb_s=side * side * 4 / best / 1e9,
                threads=threads, steps=STEPS)


def read_isolated(threads: int | None = None, timeout: float = 120.0) -> dict:
    """One reading in a fresh process, as a cell's launch would see the machine.

    A reading that cannot be taken says why (``error``) instead of stopping the sweep.
    """
    from bench.executors.cell import child_environment

    env = child_environment("eager", threads)
    cmd = [sys.executable, "-m", "bench.machine.sentinel", "" if threads is None else str(threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return dict(error=f"sentinel reading failed: {type(e).__name__}: {e}"[:300],
                    at=datetime.now().astimezone().isoformat(timespec="seconds"))


if __name__ == "__main__":
    print(json.dumps(read(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] else None)))
