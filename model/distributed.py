"""Data-parallel training: N worker processes, one ``DistributedDataParallel`` process group.

``bench train --workers N`` runs the training loop (``model.train.run_loop``) in N processes
joined by ``torch.distributed``: gloo on the CPU, NCCL where the workers hold CUDA devices.
Every worker builds the same model from the same seed (or the same checkpoint), draws the
same global batch and trains on its 1/N share; DDP averages the gradients, so each worker
takes the step one process would take on the whole batch, and the loss curve is one
worker's within floating-point tolerance (the sums are ordered differently). Rank 0 alone
evaluates and writes metrics and checkpoints; its checkpoints are a one-process run's (the
model or adapters, AdamW's state, the schedule, the data generator's state), so a run
resumes with any number of workers. Dropout masks are drawn per worker, so with dropout the
runs differ by N; without, they agree.

Launching here (``launch_local``): ``torch.multiprocessing``'s spawn context, the rendezvous
on a free port of 127.0.0.1 (``init_method="tcp://..."``), each worker with an even share of
this process's threads. The launching process supervises: it relays rank 0's progress and
finished checkpoints (a queue) to the caller's callbacks, and when a worker dies -- killed,
out of memory, an exception -- it stops the others and raises ``WorkerFailed``: one line
naming the worker, how it ended, and the last complete checkpoint that ``--resume``
continues from (checkpoints are written under a temporary name and renamed into place, so
one is either complete or absent).
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import signal
import socket
import time
from pathlib import Path

import torch

# A collective that waits longer than this for a peer gives up (a peer that hangs without dying).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
GRACE_S = 2.0  # after a first failure, how long to wait for the rest to tell what happened


class WorkerFailed(RuntimeError):
    """A data-parallel worker died or raised; the message is one line naming it."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class QueueEmitter:
    """Rank 0's reports, sent to the launching process: ("step", Progress), ("checkpoint", path)."""

    def __init__(self, queue):
        self.queue = queue

    def step(self, progress) -> None:
        self.queue.put(("step", progress))

    def checkpoint(self, path) -> None:
        self.queue.put(("checkpoint", str(path)))


def run_worker(job, rank: int, world: int, init_method: str, queue, threads: int | None = None,
               device: str = "cpu") -> dict | None:
    """One worker: join the process group, run the loop, leave. Rank 0 returns the loop's result
    (and puts it on ``queue``); an exception is put on ``queue`` as one line and raised again."""
    import torch.distributed as dist

    from model.train import Emitter, run_loop

    try:
        if threads:
            torch.set_num_threads(threads)
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
        try:
            result = run_loop(job, QueueEmitter(queue) if rank == 0 else Emitter(), rank=rank, world=world)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException as e:
        queue.put(("error", (rank, os.getpid(), f"{type(e).__name__}: {e}".splitlines()[0])))
        raise
    if rank == 0:
        queue.put(("done", result))
    return result


def _spawned(job, rank, world, init_method, queue, threads):
    """The body of a spawned worker process."""
    try:
        run_worker(job, rank, world, init_method, queue, threads)
    except BaseException:
        os._exit(1)  # already reported on the queue; no traceback from every worker


def launch_local(job, workers: int, emit, threads: int | None = None) -> dict:
    """Run ``job`` in ``workers`` processes on this machine; rank 0's loop result."""
    ctx = torch.multiprocessing.get_context("spawn")
    events = ctx.Queue()
    threads = threads or max(1, torch.get_num_threads() // workers)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_spawned, args=(job, rank, workers, init_method, events, threads),
                         name=f"bench-train-worker-{rank}") for rank in range(workers)]
    for p in procs:
        p.start()
    try:
        return supervise(job, events, emit, lambda: [(rank, p.pid, p.exitcode) for rank, p in enumerate(procs)])
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def supervise(job, events, emit, states) -> dict:
    """Relay rank 0's reports to ``emit`` until it is done; raise ``WorkerFailed`` when a worker fails.

    ``states()`` gives (rank, pid, exit code or None while running) of every worker. A worker
    killed by a signal is named before the errors its peers then report (a lost connection)."""
    result, errors, failed_at = None, [], None
    while True:
        try:
            event = events.get(timeout=0.2)
        except queue_module.Empty:
            event = None
        if event is not None:
            result = relay(event, emit, errors, result)
        current = states()
        died = [s for s in current if s[2] not in (None, 0)]
        if (errors or died) and failed_at is None:
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at >= GRACE_S:
            raise WorkerFailed(_failure_line(job, len(current), died, errors))
        if result is not None and all(code == 0 for _, _, code in current):
            return result
        if failed_at is None and all(code == 0 for _, _, code in current) and events.empty() and result is None:
            raise WorkerFailed(f"the {len(current)} workers ended without rank 0's result")


def relay(event: tuple, emit, errors: list, result):
    """One (kind, payload) report of rank 0 or a worker's error: a step or a checkpoint goes to
    ``emit``, an error onto ``errors``; returns the run's result ("done"'s payload) or ``result``."""
    kind, payload = event
    if kind == "step":
        emit.step(payload)
    elif kind == "checkpoint":
        emit.checkpoint(Path(payload))
    elif kind == "error":
        errors.append(payload)
    return payload if kind == "done" else result


def _failure_line(job, world: int, died, errors) -> str:
    signalled = [s for s in died if s[2] < 0]
    if signalled:
        rank, pid, code = signalled[0]
        what = f"worker {rank} of {world} (pid {pid}) was killed by {signal.Signals(-code).name}"
    elif errors:
        rank, pid, message = errors[0]
        what = f"worker {rank} of {world} (pid {pid}) failed: {message}"
    else:
        rank, pid, code = died[0]
        what = f"worker {rank} of {world} (pid {pid}) exited with code {code}"
    return stopped_line(job.out_dir, what)


def stopped_line(out_dir, what: str) -> str:
    """``what`` happened to a worker, then where ``--resume`` picks the run up: one line."""
    from model.train_files import latest_checkpoint

    latest = latest_checkpoint(Path(out_dir))
    where = (f"the last complete checkpoint is {latest.name}: bench train --resume continues from it"
             if latest is not None else "no checkpoint was completed: the run starts again from the beginning")
    return f"{what}; the run stopped, {where}"
