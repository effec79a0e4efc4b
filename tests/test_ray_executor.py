"""The executors: the local one needs no Ray; the Ray one routes, survives a dead node and skips the infeasible.

The Ray tests share one ``ray.cluster_utils.Cluster`` on this machine: a head labelled
``accelerator=cpu`` and two workers labelled ``accelerator=gpu`` (``rack=1`` and ``rack=2``;
the second started with another ``MALLOC_CONF``, so its fingerprint differs, as a different
machine's would). One test runs a real launch, a fresh ``bench.executors.cell`` process, on a node; the
others pass a stand-in launch (shipped to the node by Ray) so they take seconds and the
killed-node tests control exactly when a launch is in flight. The killed-node tests remove
the workers, so they come last.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from backends.base import Probe
from bench.executors.local import LocalExecutor
from bench.store import Store
from bench.planner import Sweep, plan
from bench.sweep import round_order, run_sweep

REPO = Path(__file__).resolve().parent.parent
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed: pip install '.[ray]' (make test installs it)")


def tiny_sweep(**kw) -> Sweep:
    base = dict(models=["tiny"], backends=["eager"], precisions=["fp32"], batches=[1], prompt_len=8, gen_len=3,
                launches=1, budget_s=0.3, parity=False, timeout_s=120)
    return Sweep(**{**base, **kw})


def fake_launch(spec: dict) -> dict:
    """A made-up ok launch record (two generations of 2 decode steps each)."""
    return dict(status="ok", reason="", samples=dict(ttft_ms=[2.0, 2.1], tpot_ms=[[1.0, 1.1], [1.0, 1.2]],
                                                     e2e_ms=[4.1, 4.3]), precision=spec["precision"],
                device="cpu", wall_s=0.01)


def gated_cell(gate: str, block: tuple, spec: dict, timeout: float) -> dict:
    """Stands in for ``bench.executors.cell.run_cell`` on a node: says where it started, and a launch whose batch
    is in ``block`` waits for the test's ``go`` file (at most a minute) before it returns."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    Path(gate, f"started-{spec['batch']}-{node}").touch()
    deadline = time.monotonic() + 60
    while spec["batch"] in block and not Path(gate, "go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return fake_launch(spec)


def node_sentinel(threads):
    """A stand-in drift sentinel that says which node read it."""
    import ray

    return dict(decode_ms=1.0, gemv_gb_s=1.0, node_id=ray.get_runtime_context().get_node_id())


def started(gate: Path) -> list[str]:
    return sorted(p.name for p in gate.glob("started-*"))


def wait_for(condition, what: str, limit: float = 90.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved]))  # the nodes run this checkout
    small = dict(num_cpus=1, object_store_memory=80 * 2**20)
    c = Cluster(initialize_head=True, head_node_args=dict(labels={"accelerator": "cpu"}, include_dashboard=False,
                                                          **small))
    a = c.add_node(labels={"accelerator": "gpu", "rack": "1"}, **small)
    b = c.add_node(labels={"accelerator": "gpu", "rack": "2"}, env_vars={"MALLOC_CONF": "narenas:1"}, **small)
    ray.init(address=c.address, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the stand-ins travel to the nodes
    try:
        yield SimpleNamespace(cluster=c, head=c.head_node.node_id, a=a, b=b)
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def ray_sweep(store, sweep, on, run_cell=None, sentinel=node_sentinel, resume=False):
    from bench.machine.environment import fingerprint
    from bench.executors.ray import RayExecutor, parse_selectors

    executor = RayExecutor(sweep.backends, parse_selectors(on), run_cell=run_cell, poll_s=0.2)
    probes = executor.probes(sweep.backends)
    run_id = run_sweep(sweep, store, probes, fingerprint(), executor=executor, sentinel=sentinel, resume=resume)
    return store.get_run(run_id), executor


# -- the local executor ----------------------------------------------------------------------------


def test_the_local_executor_and_the_cli_need_no_ray(tmp_path):
    """With ray unimportable, a local sweep runs and --executor ray says how to install it, in one line."""
    code = f"""
import sys
sys.modules["ray"] = None  # import ray now raises ImportError
import bench.executors.cell
from backends.base import Probe
from bench.executors.local import LocalExecutor
from bench.store import Store
from bench.planner import Sweep
from bench.sweep import run_sweep
bench.executors.cell.run_cell = lambda spec, timeout: dict(status="failed", reason="stand-in launch")
store = Store({str(tmp_path / 's.sqlite')!r})
run_id = run_sweep(Sweep(models=["tiny"], backends=["eager"], launches=1), store, {{"eager": Probe(True)}},
                   {{"cpu": {{}}}}, sentinel=lambda t: {{}})
cells = store.get_run(run_id)["cells"]
assert [c["status"] for c in cells] == ["failed"] and "stand-in launch" in cells[0]["reason"], cells
assert "ray" not in [m for m in sys.modules if sys.modules[m] is not None], "ray was imported"
from bench.cli import main
sys.exit(main(["run", "--model", "tiny", "--executor", "ray", "--store", {str(tmp_path / 't.sqlite')!r}]))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines[-1] == "error: --executor ray needs Ray: pip install '.[ray]'"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--executor", "ray", "--on", "foo"], "--on 'foo': expected KEY=VALUE"),
    (["--executor", "ray", "--on", "nosuch:a=b"], "unknown backend 'nosuch'"),
    (["--on", "accelerator=gpu"], "--on goes with --executor ray"),
    (["--executor", "ray", "--scenario", "serve"], "--scenario serve runs on this machine only"),
])
def test_bad_executor_options_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    from bench.cli import main

    assert main(["run", "--model", "tiny", "--store", str(tmp_path / "s.sqlite"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_parse_selectors_reads_labels_and_backend_scopes():
    from bench.executors.ray import Selector, parse_selectors

    assert parse_selectors(["accelerator=gpu", "cuda:ray.io/accelerator-type=H100"]) == [
        Selector("accelerator", "gpu"), Selector("ray.io/accelerator-type", "H100", "cuda")]


def test_reports_and_compare_keep_cells_of_different_nodes_apart():
    """One run whose two cells two Ray nodes measured renders as two machines, each with its node's
    fingerprint; comparing it with a run whose cell another machine measured is not a match."""
    from bench.results.compare import compare_runs
    from reports.format import group_runs

    def cell(batch, fp):
        from bench.spec import cell_id

        c = dict(model="tiny", backend="eager", precision="fp32", device="cpu", batch=batch, threads=None,
                 prompt_len=8, gen_len=3, status="skipped", reason="-", fingerprint_id=fp)
        return dict(c, cell_id=cell_id(c))

    node_fp = {"n1": {"cpu": {"brand": "Xeon"}}, "n2": {"cpu": {"brand": "EPYC"}}}
    run = dict(run_id="r", created_at="1", fingerprint_id="driver", fingerprint={"cpu": {"brand": "laptop"},
                                                                                  "nodes": node_fp},
               cells=[cell(1, "n1"), cell(2, "n2"), dict(cell(4, None), fingerprint_id=None)])
    machines = {m.fingerprint_id: m for m in group_runs([run])}
    assert set(machines) == {"n1", "n2", "driver"}  # the never-launched cell stays with the run's machine
    assert [c["batch"] for c in machines["n1"].cells] == [1]
    assert machines["n2"].fingerprint["cpu"]["brand"] == "EPYC"
    assert machines["driver"].fingerprint["cpu"]["brand"] == "laptop"
    other = dict(run, run_id="s", cells=[cell(1, "n2")])
    comparison = compare_runs(run, other)
    assert not comparison.environments_match
    assert any("Xeon" in line and "EPYC" in line for line in comparison.fingerprint_diff)
    assert compare_runs(run, dict(run, run_id="t")).environments_match


# -- the Ray executor ------------------------------------------------------------------------------


@needs_ray
def test_a_real_launch_runs_on_the_labelled_node_and_records_its_fingerprint(cluster, tmp_path):
    store = Store(tmp_path / "s.sqlite")
    run, executor = ray_sweep(store, tiny_sweep(), ["accelerator=cpu"])
    (cell,) = run["cells"]
    assert cell["status"] == "ok", cell.get("reason")
    assert cell["node"]["id"] == cluster.head and cell["node"]["labels"]["accelerator"] == "cpu"
    head = executor.nodes[cluster.head]
    assert cell["fingerprint_id"] == head.fingerprint_id
    assert run["fingerprint"]["nodes"][head.fingerprint_id]["cpu"]["brand"]  # the node's fingerprint, kept once
    # The launch ran in the node's own environment, not the one Ray sets up for a task.
    assert head.fingerprint["thread_env"]["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS")
    (launch,) = [x["record"] for x in store.launches(run["run_id"])]
    assert launch["samples"]["tpot_ms"] and launch["sentinel"]["node_id"] == cluster.head  # its own node's reading
    (round_,) = run["rounds"]
    assert [r["node_id"] for r in round_["sentinel"]["nodes"].values()] == [cluster.head]  # only the node used


@needs_ray
def test_cells_follow_their_labels_and_reports_split_them_by_node(cluster, tmp_path):
    from reports.format import group_runs
    from reports.tables import sentinel_rows

    store = Store(tmp_path / "s.sqlite")
    gate = tmp_path / "gate"
    gate.mkdir()
    cell = functools.partial(gated_cell, str(gate), ())
    on_b, on_b_executor = ray_sweep(store, tiny_sweep(batches=[1, 2]), ["rack=2"], run_cell=cell)
    on_cpu, executor = ray_sweep(store, tiny_sweep(batches=[1, 2]), ["accelerator=cpu"], run_cell=cell)
    assert {c["node"]["id"] for c in on_b["cells"]} == {cluster.b.node_id}
    assert {c["node"]["id"] for c in on_cpu["cells"]} == {cluster.head}
    assert all(c["status"] == "ok" for c in on_b["cells"] + on_cpu["cells"])
    assert list(on_b_executor.nodes) == [cluster.b.node_id]  # only the nodes that match are probed
    b_fp = on_b_executor.nodes[cluster.b.node_id].fingerprint_id
    assert b_fp != executor.nodes[cluster.head].fingerprint_id  # MALLOC_CONF differs: another machine
    machines = {m.fingerprint_id: m for m in group_runs([on_b, on_cpu])}
    assert set(machines) == {b_fp, executor.nodes[cluster.head].fingerprint_id}
    assert machines[b_fp].fingerprint["thread_env"]["MALLOC_CONF"] == "narenas:1"
    assert len(machines[b_fp].cells) == 2
    (b_round,) = machines[b_fp].runs[0]["rounds"]  # the machine's table reads its own node's sentinel
    assert b_round["sentinel"]["node_id"] == cluster.b.node_id
    assert len(sentinel_rows(machines[b_fp])) == 1
    # --resume finds the Ray run of the same sweep and --on, and has nothing left to launch
    again, _ = ray_sweep(store, tiny_sweep(batches=[1, 2]), ["rack=2"], run_cell=cell, resume=True)
    assert again["run_id"] == on_b["run_id"] and len(store.launches(on_b["run_id"])) == 2
    from bench.machine.environment import fingerprint

    local = run_sweep(tiny_sweep(batches=[1, 2]), store, {"eager": Probe(True)}, fingerprint(), resume=True,
                      sentinel=lambda t: {}, executor=LocalExecutor(run_cell=lambda spec, t: fake_launch(spec)))
    assert local not in (on_b["run_id"], on_cpu["run_id"])  # a local resume never picks up a Ray run


@needs_ray
def test_a_cell_no_node_can_run_is_skipped_with_the_reason(cluster, tmp_path):
    store = Store(tmp_path / "s.sqlite")
    run, _ = ray_sweep(store, tiny_sweep(batches=[1, 2]), ["accelerator=tpu"], run_cell=lambda s, t: fake_launch(s))
    assert run["status"] == "finished" and len(run["cells"]) == 2
    for c in run["cells"]:
        assert c["status"] == "skipped"
        assert "no node with accelerator=tpu among 3 alive Ray nodes" in c["reason"]
        assert "accelerator=gpu, rack=2" in c["reason"]  # the nodes there are, and their labels
    assert store.launches(run["run_id"]) == [] and run["rounds"] == []


@needs_ray
def test_cells_go_only_to_nodes_with_room_for_their_estimated_peak(cluster, tmp_path):
    """The memory guard on a cluster: a cell goes only to a matching node whose free memory (when
    probed) holds its estimated peak, and one that fits no matching node is skipped, saying so."""
    from bench.machine.environment import fingerprint
    from bench.executors.ray import RayExecutor, parse_selectors
    from bench.models import model_config
    from bench.planner import estimate_peak_bytes

    sweep = tiny_sweep(batches=[1, 2])
    need = estimate_peak_bytes(model_config("tiny", False), "eager", "fp32", 2, 11, 8, False)

    def run(room: dict) -> dict:
        executor = RayExecutor(sweep.backends, parse_selectors(["accelerator=gpu"]),
                               run_cell=lambda s, t: fake_launch(s), poll_s=0.2)
        probes = executor.probes(sweep.backends)
        for node_id, free in room.items():  # as if those machines had that much free memory
            executor.nodes[node_id].available_bytes = free
        store = Store(tmp_path / f"{len(list(tmp_path.iterdir()))}.sqlite")
        return store.get_run(run_sweep(sweep, store, probes, fingerprint(), executor=executor,
                                       sentinel=node_sentinel))

    roomy = run({cluster.a.node_id: 64 * 2**30, cluster.b.node_id: need // 2})
    assert [c["status"] for c in roomy["cells"]] == ["ok", "ok"]
    assert {c["node"]["id"] for c in roomy["cells"]} == {cluster.a.node_id}  # never the node without room
    cramped = run({cluster.a.node_id: need // 2, cluster.b.node_id: need // 3})
    assert {c["status"] for c in cramped["cells"]} == {"skipped"}
    assert all("of the free memory of every matching node" in c["reason"] for c in cramped["cells"])


@needs_ray
def test_a_killed_nodes_launch_is_requeued_on_another_matching_node(cluster, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    a, b = cluster.a.node_id, cluster.b.node_id
    sweep = tiny_sweep(batches=[1, 2])
    result = {}
    worker = threading.Thread(target=lambda: result.update(run=ray_sweep(  # SQLite: the thread opens its own
        Store(tmp_path / "s.sqlite"), sweep, ["accelerator=gpu"], run_cell=functools.partial(gated_cell, str(gate), (1, 2)))[0]))
    worker.start()
    wait_for(lambda: len(started(gate)) == 2, "a launch on each gpu node")
    on_b = next(name.split("-")[1] for name in started(gate) if name.endswith(b))
    cluster.cluster.remove_node(cluster.b)  # mid-launch
    (gate / "go").touch()
    worker.join(120)
    assert not worker.is_alive()
    cells = {c["batch"]: c for c in result["run"]["cells"]}
    assert all(c["status"] == "ok" for c in cells.values()), cells
    assert {c["node"]["id"] for c in cells.values()} == {a}  # both finished on the node that lived
    launches = Store(tmp_path / "s.sqlite").launches(result["run"]["run_id"])
    assert len(launches) == 2  # one stored launch per cell: the lost one was run again, not stored twice
    (requeued,) = [x for x in launches if x["record"].get("requeued")]
    assert requeued["key"] == cells[int(on_b)]["cell_id"]  # the launch that was on b
    (note,) = requeued["record"]["requeued"]
    assert f":{b[:8]} died during launch 1" in note
    assert started(gate).count(f"started-{on_b}-{a}") == 1  # the re-queued launch started on a


@needs_ray
def test_a_killed_node_with_no_other_match_records_the_launch_failed_and_keeps_the_rest(cluster, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    sweep = tiny_sweep(batches=[1, 2])
    first, second = (c.spec.batch for c in round_order(plan(sweep, {"eager": Probe(True)}), sweep.seed, 0))
    result = {}
    worker = threading.Thread(target=lambda: result.update(run=ray_sweep(  # SQLite: the thread opens its own
        Store(tmp_path / "s.sqlite"), sweep, ["rack=1"], run_cell=functools.partial(gated_cell, str(gate), (second,)))[0]))
    worker.start()
    wait_for(lambda: any(name.startswith(f"started-{second}-") for name in started(gate)), "the second launch")
    cluster.cluster.remove_node(cluster.a)
    worker.join(120)
    assert not worker.is_alive()
    cells = {c["batch"]: c for c in result["run"]["cells"]}
    assert cells[first]["status"] == "ok"  # finished before the node died: kept
    assert cells[second]["status"] == "failed"
    assert "died during launch 1" in cells[second]["reason"]
    assert "no other alive node matches rack=1 with backend eager" in cells[second]["reason"]
    assert result["run"]["status"] == "finished"
