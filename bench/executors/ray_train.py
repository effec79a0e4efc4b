"""``bench train --workers N --executor ray``: the data-parallel workers as a Ray Train job.

Ray Train's ``TorchTrainer`` starts N worker actors on the cluster and joins them in one
torch process group (gloo here: the loop trains on the CPU), then runs the same loop as a
local launch (``model.train.run_loop``) in each, with the rank and world size Ray gives
(``ray.train.get_context()``). Everything else is ``model.distributed``'s: the global batch
split evenly, DDP's averaged gradients, rank 0 writing checkpoints into ``--out``.

Placement follows the sweeps' labels: each ``--on KEY=VALUE`` must hold on a worker's node
(Ray's own node labels, ``ray start --labels``), passed to Ray Train as the workers'
``label_selector``; the backend-scoped form of ``bench run`` (``BACKEND:KEY=VALUE``) has no
meaning here and is refused. Rank 0 writes ``--out`` on its own node, so on a cluster of
several machines ``--out`` must be a directory every node shares (or the run's directory is
on rank 0's node); that is not checked.

Rank 0's progress and finished checkpoints reach this process through a Ray queue
(``ray.util.queue.Queue``), so the store logs every step as for a local run. A worker that
raises reports one line through the queue; a worker that dies (killed, its node lost) fails
the job with Ray's error; either way the job is not retried (``max_failures=0``) and
``WorkerFailed`` names the worker (or quotes Ray's first line) and the last complete
checkpoint that ``--resume`` continues from.
"""

from __future__ import annotations

import os
import tempfile
import threading

from bench.executors.ray import SelectorError, _check_reachable, import_ray, parse_selectors
from model.distributed import QueueEmitter, WorkerFailed, relay, stopped_line


def ray_launcher(address: str | None = None, on: list[str] | None = None, cpus_per_worker: int = 1):
    """A ``launch`` for ``model.train.train``: (job, workers, emit) -> rank 0's loop result on Ray."""
    selectors = parse_selectors(on)
    scoped = [s for s in selectors if s.backend]
    if scoped:
        raise SelectorError(f"--on {scoped[0].backend}:{scoped[0].key}={scoped[0].value}: bench train has no "
                            f"backends to scope a label to; give KEY=VALUE")
    labels = {s.key: s.value for s in selectors}

    def launch(job, workers: int, emit) -> dict:
        return launch_ray(job, workers, emit, address=address, labels=labels, cpus_per_worker=cpus_per_worker)
    return launch


def _ray_worker(config: dict) -> None:
    """The body of one Ray Train worker: the process group is Ray's, the loop is ours."""
    import ray.train
    import torch

    from model.train import Emitter, run_loop

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    events = config["events"]
    try:
        torch.set_num_threads(config["threads"])
        result = run_loop(config["job"], QueueEmitter(events) if rank == 0 else Emitter(), rank=rank, world=world)
    except BaseException as e:
        events.put(("error", (rank, os.getpid(), f"{type(e).__name__}: {e}".splitlines()[0])))
        raise
    if rank == 0:
        events.put(("done", result))


def launch_ray(job, workers: int, emit, address: str | None = None, labels: dict | None = None,
               cpus_per_worker: int = 1) -> dict:
    ray = import_ray()
    try:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.queue import Queue
    except ImportError as e:
        raise WorkerFailed(f"--executor ray needs Ray Train: pip install 'ray[train]' ({e})") from None
    owns = not ray.is_initialized()
    if owns:
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            _check_reachable(address)
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        events = Queue()
        trainer = TorchTrainer(
            _ray_worker, train_loop_config=dict(job=job, events=events, threads=cpus_per_worker),
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                         resources_per_worker={"CPU": cpus_per_worker},
                                         **(dict(label_selector=labels) if labels else {})),
            run_config=RunConfig(name=f"bench-train-{os.getpid()}", storage_path=tempfile.mkdtemp(prefix="ray-train-"),
                                 failure_config=FailureConfig(max_failures=0)))
        outcome: dict = {}

        def fit():
            try:
                outcome["result"] = trainer.fit()
            except BaseException as e:  # the job failed: a worker raised or died
                outcome["error"] = e
        thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
        thread.start()
        result, errors = None, []
        while thread.is_alive() or not events.empty():
            try:
                event = events.get(timeout=0.2)
            except Exception:  # ray.util.queue.Empty
                continue
            result = relay(event, emit, errors, result)
        thread.join()
        if errors or "error" in outcome or result is None:
            raise WorkerFailed(_failure_line(job, workers, errors, outcome.get("error")))
        return result
    finally:
        if owns:
            ray.shutdown()


def _failure_line(job, workers: int, errors: list, error: BaseException | None) -> str:
    if errors:
        rank, pid, message = errors[0]
        what = f"Ray Train worker {rank} of {workers} (pid {pid}) failed: {message}"
    elif error is not None:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        what = f"a Ray Train worker of {workers} died: {first}"
    else:
        what = f"the Ray Train job of {workers} workers ended without rank 0's result"
    return stopped_line(job.out_dir, what)
