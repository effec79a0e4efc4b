"""The Ray executor: one sweep over several machines, each launch a Ray task on the node it measures.

``bench run --executor ray [--address ADDR] [--on KEY=VALUE ...]`` connects to a running Ray
cluster (``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others,
each with the project installed) and runs every launch of the sweep as a Ray task. The task's
body is the same ``bench.executors.cell.run_cell`` as a local launch: a fresh process, the same
isolation, timeout and memory guard. Only where it runs changes.

Routing. A node is chosen by its *labels*, Ray's own key-value node attributes (``ray start
--labels accelerator=gpu,cpu_family=sapphire-rapids``; ``Cluster.add_node(labels=...)``;
Ray adds ``ray.io/node-id`` and, on accelerator nodes, ``ray.io/accelerator-type``). Each
``--on KEY=VALUE`` must hold on the node; ``--on BACKEND:KEY=VALUE`` holds for that backend's
cells only (``--on cuda:accelerator=gpu`` sends the cuda cells to the GPU box and the rest
anywhere). The labels are matched here, against ``ray.nodes()``, and the task is pinned to
the chosen node (a hard ``NodeAffinitySchedulingStrategy``) rather than handed to Ray with a
``label_selector``: Ray only warns about a request no node can meet and lets it wait forever,
while a sweep must know before it submits, and again whenever a node dies, which cells no
node can run, and record them instead. Choosing the node here also keeps one measurement per
node at a time: a launch reserves all of its node's CPUs and GPUs (two benchmarks on one
machine at once would spoil both), while different nodes measure in parallel.

At the start, every matching node is probed by a small task: its fingerprint
(``bench.machine.environment.fingerprint``), its free memory and the probe of each backend of the sweep,
as ``bench info`` would report them there. A cell goes only to a node whose probe says its
backend is available; a cell no node can run is stored ``skipped`` with the nodes' reasons.
The task bodies run with the node's own environment (the worker process's environment as the
raylet started it), not the one Ray sets up per task (``OMP_NUM_THREADS`` set to the task's CPU
count, ``CUDA_VISIBLE_DEVICES`` to its GPUs), so a cell sees the machine as a local run would.

What is recorded. Every launch record carries the measuring node (id, hostname, labels) and
its ``fingerprint_id``; the run's fingerprint holds each node's fingerprint once, under
``nodes``; cell records carry the fingerprint id of their launches, and reports group cells by
it, so cells from two machines never share a table. A cell's later launches (and a resume)
go to a node of the same fingerprint as its first. The drift sentinel is read on every node
that takes part, at the start of every round, and each launch keeps its own node's reading.

Faults. Tasks are submitted with ``max_retries=0``: a launch that fails, times out or runs
out of memory on its node is an ordinary launch record, as locally. A node that dies during a
launch (``NodeDiedError``, a lost worker, an unschedulable pinned task) gets that launch
re-queued on another alive node that matches, the re-queue noted in the launch record; when
none matches, the launch is recorded ``failed`` with the reason. Every finished launch has
already been returned to the sweep, which stored it: nothing finished is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from dataclasses import dataclass, field
from typing import Callable, Iterator

from bench.executors.local import Job
from model.errors import InputError

PROBE_TIMEOUT_S = 600.0  # a node's first probe imports every backend's libraries


class RayUnavailable(InputError):
    """Ray is not installed, or no Ray cluster answers at the address."""


class SelectorError(InputError):
    """An --on value that is not KEY=VALUE or BACKEND:KEY=VALUE."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--executor ray needs Ray: pip install '.[ray]'") from None
    return ray


@dataclass(frozen=True)
class Selector:
    """A label a node must carry: ``key=value``, for every cell or for one backend's cells."""

    key: str
    value: str
    backend: str | None = None

    def applies(self, backend: str) -> bool:
        return self.backend is None or self.backend == backend

    def __str__(self) -> str:
        return f"{self.backend + ':' if self.backend else ''}{self.key}={self.value}"


def parse_selectors(items: list[str] | None) -> list[Selector]:
    """``--on`` values: 'KEY=VALUE' or 'BACKEND:KEY=VALUE' (a Ray label key may contain '/' and '.')."""
    out = []
    for item in items or []:
        scope, _, pair = item.rpartition(":") if ":" in item.split("=", 1)[0] else ("", "", item)
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise SelectorError(f"--on {item!r}: expected KEY=VALUE (a node label) or BACKEND:KEY=VALUE")
        if scope:
            from backends import registry

            registry.get_backend_class(scope)  # an unknown backend names the valid ones
        out.append(Selector(key.strip(), value.strip(), scope or None))
    return out


def _describe(selectors: list[Selector]) -> str:
    return " and ".join(map(str, selectors)) or "no --on label"


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT that nothing answers on is one line now (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", "local" and ray:// addresses: Ray answers these promptly itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayUnavailable(f"no Ray cluster reachable at --address {address}: {e.strerror or e} "
                             "(start one with `ray start --head`, or pass the head's HOST:PORT)") from None


@dataclass
class Node:
    """A node that was probed at the start of the run."""

    id: str
    hostname: str
    labels: dict
    cpus: float
    gpus: float
    fingerprint: dict = field(default_factory=dict)
    fingerprint_id: str = ""
    probes: dict = field(default_factory=dict)  # backend -> backends.base.Probe
    available_bytes: int = 0
    alive: bool = True

    @property
    def name(self) -> str:
        return f"{self.hostname}:{self.id[:8]}"

    def matches(self, selectors: list[Selector], backend: str | None = None) -> bool:
        return all(self.labels.get(s.key) == s.value for s in selectors if backend is None or s.applies(backend))

    def record(self) -> dict:
        """What a launch record says about where it ran."""
        return dict(id=self.id, hostname=self.hostname, labels=self.labels)


# -- the task bodies (they run on the nodes) -------------------------------------------------


def _node_environment() -> dict[str, str]:
    """The worker's environment as the raylet started it, before Ray's per-task settings.

    ``/proc/self/environ`` is the environment the process was started with; Ray's changes for
    a task (``os.environ[...]``) do not reach it. Elsewhere than Linux, the current one.
    """
    try:
        raw = open("/proc/self/environ", "rb").read()
    except OSError:
        return dict(os.environ)
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if b"=" in item)
    return {k: v for k, _, v in pairs}


@contextlib.contextmanager
def node_environment():
    """Run the block with the node's own environment (see ``_node_environment``), then restore."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_node_environment())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def probe_node(backends: list[str]) -> dict:
    """This node's fingerprint, free memory and backend probes (a Ray task's body)."""
    import psutil
    import ray

    from backends import registry
    from bench.machine.environment import fingerprint, fingerprint_id

    with node_environment():
        fp = fingerprint()
        probes = {b: registry.probe_isolated(b).to_dict() for b in backends}
    return dict(node_id=ray.get_runtime_context().get_node_id(), hostname=socket.gethostname(), fingerprint=fp,
                fingerprint_id=fingerprint_id(fp), probes=probes, available_bytes=psutil.virtual_memory().available)


def launch_on_node(spec: dict, timeout: float, run_cell: Callable | None) -> dict:
    """One launch on this node, in a fresh process as locally (a Ray task's body)."""
    import bench.executors.cell

    with node_environment():
        return (run_cell or bench.executors.cell.run_cell)(spec, timeout)


def sentinel_on_node(read: Callable, threads: int | None) -> dict:
    """The drift sentinel's reading on this node (a Ray task's body)."""
    with node_environment():
        return read(threads)


# -- the executor ------------------------------------------------------------------------------


class RayExecutor:
    """Launches as Ray tasks, each on a probed node that matches its labels, one per node at a time."""

    name = "ray"

    def __init__(self, backends: list[str], on: list[Selector] | None = None, address: str | None = None,
                 run_cell: Callable[[dict, float], dict] | None = None, poll_s: float = 0.5):
        """Connect (unless Ray is already initialised in this process) and probe the matching nodes.

        ``address``: the cluster (default: ``RAY_ADDRESS``, else ``auto``, the one started on this
        machine by ``ray start``). ``run_cell``: what a launch runs on the node (default
        ``bench.executors.cell.run_cell``; tests pass a stand-in, which Ray ships to the node).
        """
        self.ray = ray = import_ray()
        self.selectors = list(on or [])
        self.run_cell = run_cell
        self.poll_s = poll_s
        self.address = address or os.environ.get("RAY_ADDRESS") or "auto"
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RayUnavailable(f"no Ray cluster reachable at --address {self.address}: {first} "
                                     "(start one with `ray start --head`, or pass --address HOST:PORT)") from None
        self._remote_probe = ray.remote(max_retries=0)(probe_node)
        self._remote_launch = ray.remote(max_retries=0)(launch_on_node)
        self._remote_sentinel = ray.remote(max_retries=0)(sentinel_on_node)
        self._readings: dict[str, dict] = {}  # node id -> this round's sentinel reading
        self._backends: set[str] = set()  # backends of the cells that run (``place``)
        self.alive_at_start = 0
        self.nodes: dict[str, Node] = {}
        self.probe_failures: dict[str, str] = {}  # node name -> why it could not be probed
        self._probe(list(dict.fromkeys(backends)))

    # -- set-up ------------------------------------------------------------------------------
    def _pin(self, node: Node, whole: bool = True) -> dict:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return dict(scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
                    num_cpus=node.cpus if whole else 0, num_gpus=node.gpus if whole else 0)

    def _probe(self, backends: list[str]) -> None:
        from backends.base import Probe
        from bench.machine.environment import fingerprint_id

        alive = [n for n in self.ray.nodes() if n.get("Alive")]
        self.alive_at_start = len(alive)
        candidates = []
        for n in alive:
            res = n.get("Resources") or {}
            node = Node(n["NodeID"], n.get("NodeManagerHostname") or "?", dict(n.get("Labels") or {}),
                        res.get("CPU", 0.0), res.get("GPU", 0.0))
            if node.matches([s for s in self.selectors if s.backend is None]):
                candidates.append(node)
        self._unmatched = [Node(n["NodeID"], n.get("NodeManagerHostname") or "?", dict(n.get("Labels") or {}), 0, 0)
                           for n in alive if n["NodeID"] not in {c.id for c in candidates}]
        refs = {self._remote_probe.options(**self._pin(node, whole=False)).remote(backends): node for node in candidates}
        for ref, node in refs.items():
            try:
                found = self.ray.get(ref, timeout=PROBE_TIMEOUT_S)
            except Exception as e:  # a node that cannot be probed takes no cells; the reason is kept
                self.probe_failures[node.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            node.fingerprint, node.available_bytes = found["fingerprint"], found["available_bytes"]
            node.fingerprint_id = fingerprint_id(node.fingerprint)
            node.probes = {b: Probe.from_dict(p) for b, p in found["probes"].items()}
            self.nodes[node.id] = node

    def probes(self, backends: list[str]) -> dict:
        """backend -> Probe over the cluster: available when a matching node has it, else every
        matching node's reason (or that no node matches), for the planner."""
        from backends.base import Probe

        out = {}
        for b in backends:
            nodes = [n for n in self.nodes.values() if n.matches(self.selectors, b)]
            if any(n.probes[b].available for n in nodes):
                out[b] = Probe(True, reason=f"on {sum(n.probes[b].available for n in nodes)} Ray node(s)")
            elif nodes:
                reasons = "; ".join(f"{n.name}: {n.probes[b].reason}" for n in nodes)
                fix = next((n.probes[b].fix for n in nodes if n.probes[b].fix), "")
                out[b] = Probe(False, reason=f"on every matching Ray node: {reasons}", fix=fix)
            else:
                out[b] = Probe(False, reason=self._no_node(b), fix=self._label_fix(b))
        return out

    def _no_node(self, backend: str) -> str:
        wanted = [s for s in self.selectors if s.applies(backend)]
        seen = ", ".join(f"{n.name} {{{', '.join(f'{k}={v}' for k, v in sorted(n.labels.items()) if not k.startswith('ray.io/'))}}}"
                         for n in [*self.nodes.values(), *self._unmatched])
        failed = "".join(f"; {name} could not be probed ({why})" for name, why in self.probe_failures.items())
        return (f"no node with {_describe(wanted)} among {self.alive_at_start} alive Ray nodes"
                f"{' (' + seen + ')' if seen else ''}{failed}")

    def _label_fix(self, backend: str) -> str:
        wanted = [s for s in self.selectors if s.applies(backend)]
        labels = ",".join(f"{s.key}={s.value}" for s in wanted)
        return f"start a node with `ray start --labels {labels}`, or change --on" if labels else ""

    @property
    def available_bytes(self) -> float:
        """No limit for the plan: the memory guard runs per node instead, in ``place`` (a cell no
        matching node has room for is skipped, naming the nodes' free memory) and in ``run`` (a
        launch goes only to a node it fits, by ``Job.peak_bytes``)."""
        return float("inf")

    # -- the executor interface ------------------------------------------------------------------
    def resume_key(self, sweep_key: str) -> str:
        routed = "/".join(sorted(map(str, self.selectors)))
        return hashlib.sha256(f"{sweep_key}/ray/{routed}".encode()).hexdigest()[:16]

    def run_fingerprint(self, fingerprint: dict) -> dict:
        """The driver's fingerprint (its id is the run's, which --resume matches), each probed node's
        fingerprint once under ``nodes`` (by fingerprint id) and how the run was routed."""
        return dict(fingerprint, executor=dict(name="ray", address=self.address, on=list(map(str, self.selectors))),
                    nodes={n.fingerprint_id: n.fingerprint for n in self.nodes.values()})

    def place(self, cells: list) -> list:
        """Cells no probed node can run are skipped, with why (the planner's probes usually said so)."""
        from dataclasses import replace

        out = []
        for c in cells:
            if not c.skip_reason and not self._eligible(c.spec.backend, None):
                c = replace(c, skip_reason=self._no_node(c.spec.backend))
            elif not c.skip_reason and not self._eligible(c.spec.backend, None, c.peak_bytes):
                c = replace(c, skip_reason=self._no_room(c.spec.backend, c.peak_bytes))
            out.append(c)
        self._backends = {c.spec.backend for c in out if not c.skip_reason}
        return out

    def _eligible(self, backend: str, fingerprint_id: str | None, need: int = 0) -> list[Node]:
        """Alive probed nodes that match the backend's labels, have it available, have room for
        ``need`` bytes (the memory guard's estimate, against the node's free memory when probed)
        and, for a cell with earlier launches, are the same machine as those (by fingerprint id);
        by id, for a stable order."""
        from bench.planner import MEMORY_HEADROOM

        return sorted((n for n in self.nodes.values()
                       if n.alive and n.matches(self.selectors, backend) and backend in n.probes
                       and n.probes[backend].available
                       and (not need or not n.available_bytes or need <= MEMORY_HEADROOM * n.available_bytes)
                       and (fingerprint_id is None or n.fingerprint_id == fingerprint_id)), key=lambda n: n.id)

    def _no_room(self, backend: str, need: int) -> str:
        from bench.planner import MEMORY_HEADROOM

        room = ", ".join(f"{n.name} {n.available_bytes / 2**30:.1f} GiB" for n in self._eligible(backend, None))
        return (f"estimated peak memory {need / 2**30:.1f} GiB exceeds {MEMORY_HEADROOM:.0%} of the free memory "
                f"of every matching node ({room})")

    def _refresh(self) -> None:
        alive = {n["NodeID"] for n in self.ray.nodes() if n.get("Alive")}
        for node in self.nodes.values():
            node.alive = node.alive and node.id in alive

    def _await_death(self, node: Node, wait_s: float = 5.0) -> None:
        """After a lost task: give the cluster a moment to mark its node dead, if it died."""
        import time

        deadline = time.monotonic() + wait_s
        self._refresh()
        while node.alive and time.monotonic() < deadline:
            time.sleep(0.25)
            self._refresh()

    def sentinel(self, read: Callable[[int | None], dict], threads: int | None) -> dict:
        """One reading on every alive node that can take a cell, side by side; the round's record
        holds them by node, each launch its own node's (``run``)."""
        from datetime import datetime

        self._refresh()
        wanted = {n.id: n for b in sorted(self._backends) for n in self._eligible(b, None)}
        refs = {n.id: self._remote_sentinel.options(**self._pin(n)).remote(read, threads) for n in wanted.values()}
        self._readings = {}
        for node_id, ref in refs.items():
            try:
                self._readings[node_id] = dict(self.ray.get(ref), node=wanted[node_id].name,
                                               fingerprint_id=wanted[node_id].fingerprint_id)
            except Exception as e:  # a node lost while reading: its launches find that out too
                self._readings[node_id] = dict(error=f"sentinel reading failed on {wanted[node_id].name}: "
                                                     f"{type(e).__name__}"[:300],
                                               at=datetime.now().astimezone().isoformat(timespec="seconds"),
                                               node=wanted[node_id].name, fingerprint_id=wanted[node_id].fingerprint_id)
        return dict(nodes={wanted[i].name: r for i, r in self._readings.items()})

    def run(self, jobs: list[Job], timeout: float, started: Callable[[Job], None]) -> Iterator[tuple[Job, dict]]:
        """Run a round's jobs on the nodes, in the given order as nodes free up; yield each launch
        as it finishes. A node that dies mid-launch gets its launch re-queued (see the module doc)."""
        from ray.exceptions import OutOfMemoryError, RayTaskError

        queue = list(jobs)
        running: dict = {}  # ObjectRef -> (job, node)
        notes: dict[str, list[str]] = {}  # job key -> why it was re-queued
        while queue or running:
            self._refresh()
            for job in list(queue):  # a launch no alive node can take is failed now, never left waiting
                if not self._eligible(job.spec["backend"], job.previous_fingerprint, job.peak_bytes):
                    queue.remove(job)
                    yield job, self._nowhere(job, notes.get(job.key, []))
            busy = {node.id for _, node in running.values()}
            for node in sorted((n for n in self.nodes.values() if n.alive and n.id not in busy), key=lambda n: n.id):
                job = next((j for j in queue
                            if node in self._eligible(j.spec["backend"], j.previous_fingerprint, j.peak_bytes)), None)
                if job is None:
                    continue
                queue.remove(job)
                started(job)
                ref = self._remote_launch.options(**self._pin(node)).remote(job.spec, timeout, self.run_cell)
                running[ref] = (job, node)
            if not running:
                continue
            done, _ = self.ray.wait(list(running), num_returns=1, timeout=self.poll_s)
            for ref in done:
                job, node = running.pop(ref)
                try:
                    launch = self.ray.get(ref)
                except RayTaskError as e:  # the task body raised: a bug, recorded like a crashed launch
                    launch = dict(status="failed", reason=f"the Ray task failed on {node.name}: "
                                                          f"{str(e).strip().splitlines()[-1][:300]}")
                except OutOfMemoryError as e:  # Ray's memory monitor killed the worker
                    launch = dict(status="oom", reason=f"killed by Ray's memory monitor on {node.name}: "
                                                       f"{str(e).strip().splitlines()[0][:300]}")
                except self.ray.exceptions.RayError as e:
                    self._await_death(node)
                    if node.alive:  # the worker was lost, the node was not: a launch that died
                        launch = dict(status="failed", reason=f"the Ray worker on {node.name} was lost: "
                                                              f"{type(e).__name__}")
                    else:
                        notes.setdefault(job.key, []).append(
                            f"node {node.name} died during launch {job.number} ({type(e).__name__})")
                        queue.insert(0, job)  # first in line for the next matching node
                        continue
                launch.update(node=node.record(), fingerprint_id=node.fingerprint_id)
                if node.id in self._readings:
                    launch["sentinel"] = self._readings[node.id]
                if notes.get(job.key):
                    launch["requeued"] = notes[job.key]
                yield job, launch

    def _nowhere(self, job: Job, notes: list[str]) -> dict:
        """The failed launch record of a job that no alive node can run any more."""
        backend = job.spec["backend"]
        wanted = _describe([s for s in self.selectors if s.applies(backend)])
        same = f" of fingerprint {job.previous_fingerprint} (the machine of its earlier launches)" \
            if job.previous_fingerprint else ""
        alive = sum(n.alive for n in self.nodes.values())
        if not notes and self._eligible(backend, job.previous_fingerprint):  # they match, but none has room
            return dict(status="failed", reason=self._no_room(backend, job.peak_bytes), requeued=notes, wall_s=0.0)
        if notes:
            reason = f"{'; '.join(notes)}, and no other alive node{same} matches {wanted} with backend {backend}"
        else:
            reason = f"no alive node{same} matches {wanted} with backend {backend} ({alive} probed nodes alive)"
        return dict(status="failed", reason=reason, requeued=notes, wall_s=0.0)

    def close(self) -> None:
        if self._owns_connection and self.ray.is_initialized():
            self.ray.shutdown()
