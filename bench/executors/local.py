"""Where a sweep's launches run: an executor behind one small interface, chosen once per run.

``bench.sweep.run_sweep`` decides *what* runs: the plan, the seeded rounds, resume and every
store write. An executor decides *where and when* each launch of a round runs and hands the
finished launch records back one by one, as they finish, so the sweep stores each at once.
A launch is always ``bench.executors.cell.run_cell``: a fresh process with the same isolation, timeout
and memory guard wherever it runs; the cell's code does not know which executor started it.

- ``LocalExecutor``: this machine, one launch at a time, in the round's order (what ``bench
  run`` always did; it needs nothing beyond the harness).
- ``bench.executors.ray.RayExecutor``: a Ray cluster, each launch a Ray task on a node chosen
  by its labels (``--on KEY=VALUE``); imported only when asked for, so Ray stays optional.

The interface, as ``run_sweep`` calls it:

- ``resume_key(sweep_key)``: the key ``--resume`` finds the run by (an executor that routes
  cells elsewhere must not resume a local run of the same sweep, nor the other way round);
- ``run_fingerprint(fingerprint)``: the fingerprint stored with the run;
- ``available_bytes``: the free memory the memory guard plans against (None: this machine's);
- ``place(cells)``: the planned cells, with a skip reason on those no place can run;
- ``sentinel(read, threads)``: the round's drift reading (``bench.machine.sentinel``), taken where the
  launches will run;
- ``run(jobs, timeout, started)``: run one round's jobs; yields ``(job, launch record)`` as
  each finishes and calls ``started(job)`` as each starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass
class Job:
    """One launch to run: which cell, the spec of this launch, and its number among the cell's."""

    key: str  # the cell's key (``Planned.key``)
    spec: dict  # ``CellSpec.to_dict()`` of this launch (a later launch skips the cold facts)
    number: int  # 1-based: the cell's launches so far + 1
    previous_fingerprint: str | None = None  # fingerprint id of the cell's earlier launches, if any
    peak_bytes: int = 0  # the memory guard's estimate of the launch's peak (0: none); a node needs room for it


class LocalExecutor:
    """Every launch on this machine, one after another, in the order given."""

    name = "local"
    available_bytes = None  # the memory guard reads this machine's free memory

    def __init__(self, run_cell: Callable[[dict, float], dict] | None = None):
        self.run_cell = run_cell  # None: ``bench.executors.cell.run_cell``, looked up at each launch

    def resume_key(self, sweep_key: str) -> str:
        return sweep_key  # local runs keep the keys they always had

    def run_fingerprint(self, fingerprint: dict) -> dict:
        return fingerprint

    def place(self, cells: list) -> list:
        return cells

    def sentinel(self, read: Callable[[int | None], dict], threads: int | None) -> dict:
        return read(threads)

    def run(self, jobs: list[Job], timeout: float, started: Callable[[Job], None]) -> Iterator[tuple[Job, dict]]:
        import bench.executors.cell

        for job in jobs:
            started(job)
            yield job, (self.run_cell or bench.executors.cell.run_cell)(job.spec, timeout)

    def close(self) -> None:
        pass
