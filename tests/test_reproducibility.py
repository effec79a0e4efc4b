"""Numbers that reproduce: interleaved rounds, honest intervals, the drift sentinel, and compare's verdicts.

Most tests here drive ``run_sweep`` with a fake launch (``bench.executors.cell.run_cell`` replaced by a
function that returns a made-up launch record at once), so the bookkeeping -- rounds, orders,
storing every launch, resuming -- is tested without timing anything. The statistics are tested
on generated samples with a fixed seed, so a verdict never depends on chance. One test runs real
processes: a planted 25% slowdown must be found by ``bench compare``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

import bench.executors.cell
from backends.base import Probe
from bench.results import stats
from bench.results.compare import FASTER, SAME, SLOWER, compare_runs
from bench.results.records import cell_record
from bench.spec import CellSpec
from bench.store import Store
from bench.planner import Sweep, plan
from bench.sweep import round_order, run_sweep


AVAILABLE = Probe(True)
FP = {"cpu": {"brand": "Test CPU", "isa": {"avx2": True}}, "versions": {"torch": "2.8.0"}, "python": "3.11"}


def fake_sentinel(threads):
    return {"decode_ms": 1.5, "gemv_gb_s": 20.0, "threads": threads}


class FakeLaunches:
    """Stands in for ``bench.executors.cell.run_cell``: a made-up ok launch per call, every call recorded."""

    def __init__(self, fail=(), interrupt_at=None, tpot=1.0):
        self.calls: list[dict] = []
        self.fail = set(fail)  # (backend, nth launch of it) that fail
        self.interrupt_at = interrupt_at
        self.tpot = tpot

    def __call__(self, spec: dict, timeout: float) -> dict:
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(spec)
        nth = sum(c["backend"] == spec["backend"] for c in self.calls)
        if (spec["backend"], nth) in self.fail:
            return dict(status="failed", reason="RuntimeError: boom", wall_s=0.1)
        rng = random.Random(len(self.calls))
        steps = spec["gen_len"] - 1
        tpot = [[self.tpot * (1 + 0.01 * rng.random()) for _ in range(steps)] for _ in range(4)]
        return dict(status="ok", reason="", n_params=1, precision=spec["precision"], device=spec["device"],
                    load_s=0.1, first_call_ms=1.0, model_mb=1.0, weights_mb=1.0, warmup_reps=1,
                    warmup_settled=True, peak_rss_mb=100.0, device_peak_mb=None,
                    kv_cache_mb=0.1 if spec["measure_kv"] else None,
                    parity={"passed": True} if spec["parity_steps"] else None, backend_info={},
                    samples=dict(ttft_ms=[2.0, 2.1, 2.0, 2.05], tpot_ms=tpot, e2e_ms=[20.0] * 4), wall_s=0.2)


@pytest.fixture
def fake(monkeypatch):
    def install(**kw):
        launches = FakeLaunches(**kw)
        monkeypatch.setattr(bench.executors.cell, "run_cell", launches)
        return launches
    return install


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "bench.sqlite") as s:
        yield s


def sweep(**kw) -> Sweep:
    base = dict(models=["tiny"], backends=["eager", "int8"], batches=[1, 2], threads=[1], launches=3,
                gen_len=4, prompt_len=4)
    base.update(kw)
    return Sweep(**base)


PROBES = {"eager": AVAILABLE, "int8": AVAILABLE}


# -- interleaved rounds ---------------------------------------------------------------------------


def test_rounds_visit_every_cell_once_in_a_seeded_recorded_order(fake, store):
    launches = fake()
    run_id = run_sweep(sweep(), store, PROBES, FP, sentinel=fake_sentinel)
    rounds = store.rounds(run_id)
    cells = plan(sweep(), PROBES)
    keys = sorted(c.key for c in cells)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert sorted(r["order"]) == keys  # every cell once per round
        assert r["order"] == [c.key for c in round_order(cells, 0, r["round"])]  # the seeded order, recorded
        assert r["sentinel"]["decode_ms"] == 1.5 and r["sentinel"]["round"] == r["round"]
    assert len({tuple(r["order"]) for r in rounds}) > 1  # a fresh order per round
    # the launches ran in the recorded orders, round after round
    ran = [CellSpec.from_dict(s).id for s in launches.calls]
    assert ran == [k for r in rounds for k in r["order"]]
    # a different seed orders the rounds differently
    assert [c.key for c in round_order(cells, 1, 0)] != rounds[0]["order"]


def test_parity_and_kv_are_measured_in_each_cells_first_launch_only(fake, store):
    launches = fake()
    run_sweep(sweep(), store, PROBES, FP, sentinel=fake_sentinel)
    first_seen = set()
    for spec in launches.calls:
        key = CellSpec.from_dict(spec).id
        assert (spec["parity_steps"] > 0) == (key not in first_seen)
        assert spec["measure_kv"] == (key not in first_seen)
        first_seen.add(key)


def test_the_cell_record_is_derived_from_its_stored_launches(fake, store):
    fake()
    run_id = run_sweep(sweep(), store, PROBES, FP, sentinel=fake_sentinel)
    launches = store.launches(run_id)
    assert len(launches) == 4 * 3
    by_key = {}
    for launch in launches:
        by_key.setdefault(launch["key"], []).append(launch["record"])
    for cell in store.get_run(run_id)["cells"]:
        spec = next(c.spec for c in plan(sweep(), PROBES) if c.key == cell["cell_id"])
        again = cell_record(spec, by_key[cell["cell_id"]], 3, cell["n_params"])
        assert cell["status"] == "ok" and cell["launches"] == 3 and cell["launch_rounds"] == [0, 1, 2]
        assert cell["tpot_ms"] == again["tpot_ms"] and cell["decode_tok_s"] == again["decode_tok_s"]


def test_an_interrupted_run_keeps_every_finished_launch_and_resume_continues_from_the_last(fake, store):
    fake(interrupt_at=6)  # Ctrl-C during the second round
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep(), store, PROBES, FP, sentinel=fake_sentinel)
    run_id = store.latest_run_id()
    assert store.get_run(run_id)["status"] == "interrupted"
    assert len(store.launches(run_id)) == 6  # nothing finished is lost
    partial = {c["cell_id"]: c["launches"] for c in store.get_run(run_id)["cells"]}
    assert sorted(partial.values()) == [1, 1, 2, 2]  # merged records already, from what landed

    resumed = fake()
    assert run_sweep(sweep(), store, PROBES, FP, resume=True, sentinel=fake_sentinel) == run_id
    assert len(resumed.calls) == 12 - 6  # only what was missing
    run = store.get_run(run_id)
    assert run["status"] == "finished" and all(c["launches"] == 3 for c in run["cells"])
    assert len(store.launches(run_id)) == 12
    # the resumed launches are not first launches: parity was measured before the interruption
    assert all(s["parity_steps"] == 0 for s in resumed.calls)


def test_a_failed_launch_stops_its_cell_and_resume_retries_it_as_a_new_attempt(fake, store):
    launches = fake(fail={("int8", 3)})  # the third int8 launch: one of its two cells, in round 2
    run_id = run_sweep(sweep(), store, PROBES, FP, sentinel=fake_sentinel)
    cells = store.get_run(run_id)["cells"]
    failed = [c for c in cells if c["status"] != "ok"]
    assert len(failed) == 1 and failed[0]["backend"] == "int8"
    assert failed[0]["reason"].startswith("launch 2 of 3: RuntimeError: boom")
    assert failed[0]["launches"] == 1 and failed[0]["decode_tok_s"]  # its ok launch is kept in the record
    assert len(launches.calls) == 3 * 4 - 1  # no launches after the failure

    retry = fake()
    run_sweep(sweep(), store, PROBES, FP, resume=True, sentinel=fake_sentinel)
    assert len(retry.calls) == 3  # a new attempt of the failed cell, all its launches
    assert CellSpec.from_dict(retry.calls[0]).id == failed[0]["cell_id"]
    assert retry.calls[0]["parity_steps"] > 0  # a new attempt starts with its first launch
    redone = next(c for c in store.get_run(run_id)["cells"] if c["cell_id"] == failed[0]["cell_id"])
    assert redone["status"] == "ok" and redone["attempt"] == 1 and redone["launches"] == 3


def test_resume_does_not_rerun_finished_cuda_cells(fake, store, monkeypatch):
    """The planner used to key every cell with device "cpu" while cuda records said "cuda"."""
    fake()
    probes = {"cuda": AVAILABLE, "eager": AVAILABLE}
    s = sweep(backends=["cuda", "eager"], batches=[1], launches=1)
    run_sweep(s, store, probes, FP, sentinel=fake_sentinel)
    cuda = next(c for c in plan(s, probes) if c.spec.backend == "cuda")
    assert cuda.spec.device == "cuda" and cuda.spec.precision == "fp16"
    again = fake()
    run_sweep(s, store, probes, FP, resume=True, sentinel=fake_sentinel)
    assert again.calls == []


def test_backend_all_stores_unavailable_backends_as_skipped_with_the_reason(fake, tmp_path, monkeypatch):
    from backends import registry
    from bench.cli import main

    fake()
    probes = {n: AVAILABLE if n == "eager" else Probe(False, reason=f"{n} is missing", fix=f"install {n}")
              for n in registry.names()}
    monkeypatch.setattr(registry, "probe_all", lambda names=None: {n: probes[n] for n in names or probes})
    monkeypatch.setattr("bench.machine.sentinel.read_isolated", fake_sentinel)
    monkeypatch.setattr("bench.machine.roofline.roofline_for", lambda *a, **k: None)
    db = tmp_path / "b.sqlite"
    assert main(["run", "--model", "tiny", "--backend", "all", "--batch", "1", "--threads", "1",
                 "--launches", "1", "--store", str(db), "--json"]) == 0
    cells = Store(db).get_run("latest")["cells"]
    assert {c["backend"] for c in cells} == set(registry.names())
    skipped = [c for c in cells if c["backend"] != "eager"]
    assert skipped and all(c["status"] == "skipped" for c in skipped)
    onnx = next(c for c in skipped if c["backend"] == "onnxruntime")
    assert "onnxruntime is missing" in onnx["reason"] and "install onnxruntime" in onnx["reason"]


def test_each_cell_gets_the_roofline_of_its_own_device_and_thread_count():
    asked = []

    def roofline(device, threads, precisions):
        asked.append((device, threads, precisions))
        return None if device != "cpu" else {"bandwidth_gb_s": 10.0 * threads, "peak_gflops": {"fp32": 1.0}}

    s = sweep(backends=["eager", "cuda"], threads=[1, 2])
    cells = plan(s, {"eager": AVAILABLE, "cuda": AVAILABLE}, roofline)
    assert sorted(asked) == [("cpu", 1, ("fp32",)), ("cpu", 2, ("fp32",)), ("cuda", 1, ("fp16",)),
                             ("cuda", 2, ("fp16",))]
    for c in cells:
        if c.spec.device == "cuda":
            assert c.spec.roofline is None  # a GPU cell gets a device bound or none, never the CPU's
        else:
            assert c.spec.roofline["bandwidth_gb_s"] == 10.0 * c.spec.threads


def test_a_roofline_without_the_cells_precision_never_fails_the_cell():
    """cuda's default fp16 had no peak in the CPU roofline: the cell used to fail after timing."""
    spec = CellSpec(model="tiny", backend="cuda", precision="fp16", device="cuda", gen_len=4, prompt_len=4,
                    roofline={"bandwidth_gb_s": 20.0, "peak_gflops": {"fp32": 100.0}})
    launch = FakeLaunches()(dict(spec.to_dict()), 1)
    record = cell_record(spec, [launch], 1, 1)
    assert record["status"] == "ok" and record["decode_tok_s"] > 0


# -- honest intervals -----------------------------------------------------------------------------


def launches_of(rng, L=3, G=8, S=15, launch_sd=0.02, gen_sd=0.01, step_sd=0.01, scale=1.0):
    """Samples with variance where real ones have it: between launches, generations and steps."""
    out = []
    for _ in range(L):
        launch = scale * rng.normal(1, launch_sd)
        out.append([list(launch * rng.normal(1, gen_sd) * rng.normal(1, step_sd, S)) for _ in range(G)])
    return out


def test_the_interval_resamples_launches_and_generations_not_single_steps():
    rng = np.random.default_rng(0)
    data = launches_of(rng)
    flat = [v for launch in data for g in launch for v in g]
    lo, hi = stats.nested_median_ci(data)
    flo, fhi = stats.median_ci(flat)  # the old way: every step as if independent
    assert lo <= stats.nested_median(data) <= hi
    assert (hi - lo) > 4 * (fhi - flo)
    # the launches disagree by more than the step-level interval admits
    medians = [float(np.median([v for g in launch for v in g])) for launch in data]
    assert max(medians) - min(medians) > fhi - flo


def test_small_sample_widening_is_students_t():
    assert stats.small_sample_factor(1) == 1.0
    assert stats.small_sample_factor(3) == pytest.approx(4.303 / 1.960 * (3 / 2) ** 0.5, rel=1e-3)
    assert stats.small_sample_factor(30) == pytest.approx(2.045 / 1.960 * (30 / 29) ** 0.5, rel=1e-3)


def test_calibration_on_generated_runs():
    """Two runs of the same generated cells: a launch-to-launch spread of 2% is not called a
    change; the same cells 20% slower are, every one of them, from three launches each."""
    rng = np.random.default_rng(1)
    same = changed = 0
    cells = 40
    for _ in range(cells):
        base, new = launches_of(rng), launches_of(rng)
        ratio, lo, hi = stats.nested_ratio_ci(base, new, n_boot=500)
        same += lo <= 1 <= hi
        _, lo, hi = stats.nested_ratio_ci(base, launches_of(rng, scale=1.2), n_boot=500)
        changed += lo > 1
    assert same >= 0.95 * cells
    assert changed >= 0.95 * cells


# -- compare --------------------------------------------------------------------------------------


def generated_run(rng, run_id: str, scale: float = 1.0, sentinel_ms: float = 1.5, cells: int = 16) -> dict:
    records = []
    for i in range(cells):
        spec = CellSpec(model="tiny", backend="eager", precision="fp32", device="cpu", batch=1 + i, gen_len=16)
        launches = []
        for r in range(3):
            data = launches_of(rng, L=1, G=8, S=15, scale=scale * (1 + 0.1 * i))[0]
            launches.append(dict(status="ok", n_params=1, samples=dict(ttft_ms=[2.0 * scale] * 8, tpot_ms=data,
                                                                      e2e_ms=[30.0] * 8), round=r))
        records.append(cell_record(spec, launches, 3, 1))
    rounds = [{"round": r, "sentinel": {"decode_ms": sentinel_ms * rng.normal(1, 0.005),
                                        "gemv_gb_s": 20 * rng.normal(1, 0.005)}} for r in range(3)]
    return {"run_id": run_id, "cells": records, "rounds": rounds, "fingerprint_id": "x", "fingerprint": {}}


def test_compare_calls_nothing_different_when_nothing_changed():
    rng = np.random.default_rng(2)
    a, b = generated_run(rng, "a"), generated_run(rng, "b")
    result = compare_runs(a, b)
    assert [c.verdict for c in result.cells] == [SAME] * 16
    assert result.drift_warning is None
    assert "measured" in result.noise_floor_source and 0 < result.noise_floor_pct < 5


def test_compare_finds_a_planted_slowdown_in_generated_runs():
    rng = np.random.default_rng(3)
    a, b = generated_run(rng, "a"), generated_run(rng, "b", scale=1.2)
    result = compare_runs(a, b)
    assert sum(c.verdict == SLOWER for c in result.cells) >= 15 and not result.by_verdict(FASTER)
    assert all(-0.22 < c.decode.change < -0.12 for c in result.cells)
    back = compare_runs(b, a)
    assert sum(c.verdict == FASTER for c in back.cells) >= 15 and not back.by_verdict(SLOWER)


def test_compare_warns_when_the_sentinels_moved_and_raises_its_floor():
    rng = np.random.default_rng(4)
    a, b = generated_run(rng, "a"), generated_run(rng, "b", scale=1.04, sentinel_ms=1.5 * 1.08)
    result = compare_runs(a, b)
    assert result.drift_warning and "decode step" in result.drift_warning
    assert result.noise_floor_pct > 6  # the machine drifted by about 8%: a 4% change is within that
    assert all(c.verdict == SAME for c in result.cells)
    assert result.noise_floor_pct == pytest.approx(compare_runs(a, b).noise_floor_pct)  # seeded: the same twice


def test_runs_without_sentinels_fall_back_to_a_stated_floor():
    rng = np.random.default_rng(5)
    a, b = generated_run(rng, "a"), generated_run(rng, "b")
    a["rounds"] = []
    result = compare_runs(a, b)
    assert result.noise_floor_pct == 2.0 and "no sentinel" in result.noise_floor_source


@pytest.mark.serial  # real launches against each other: run alone, after the parallel part of make test
def test_bench_compare_detects_a_planted_slowdown_in_real_launches():
    """Real processes, real timings: the same cell with every step made twice as slow.

    The VMs this runs on drift by 20% and more over seconds (launch medians of one cell here:
    0.60 to 0.90 ms), so the two variants' launches take turns (A B A B ...), as a sweep's
    rounds do, and the drift lands on both alike. With five launches each the honest interval
    of the ratio is about +-25% on a quiet machine and reached -55%/+8% with other processes
    loading both cores (a planted 50% then went undetected: ratio 0.69, 0.44 to 1.08), so the
    planted change is 100%: this test proves the wiring from real launches to the verdict, and
    the 20% sensitivity is shown on generated samples above, where chance cannot make it flaky.
    """
    from bench.executors.cell import run_cell

    base = CellSpec(model="small", backend="eager", precision="fp32", device="cpu", threads=1, prompt_len=8,
                    gen_len=12, budget_s=1.0, parity_steps=0, measure_kv=False)
    slow = CellSpec(**dict(base.to_dict(), planted_delay=1.0))
    launches = {"base": [], "slow": []}
    for _ in range(5):
        for name, spec in (("base", base), ("slow", slow)):
            launch = run_cell(spec.to_dict(), timeout=300)
            assert launch["status"] == "ok", launch.get("reason")
            launches[name].append(launch)
    runs = [{"run_id": name, "cells": [cell_record(spec, launches[name], 5, 1)]}
            for name, spec in (("base", base), ("slow", slow))]
    (cell,) = compare_runs(*runs).cells
    assert cell.new["planted_delay"] == 1.0 and cell.base["planted_delay"] == 0.0
    assert cell.verdict == SLOWER, cell.decode


def test_the_sentinel_reads_in_a_fresh_process():
    from bench.machine.sentinel import read_isolated

    reading = read_isolated(1)
    assert reading["decode_ms"] > 0 and reading["gemv_gb_s"] > 0 and reading["threads"] == 1


def test_a_launch_that_lands_far_from_the_others_is_named_and_kept():
    from bench.results.records import unsteady

    assert unsteady([49.1, 48.1, 595.9], "per token") == (
        "launch 3 of 3 ran 12.1x slower than the median launch (596 vs 49.1 ms per token)")
    assert unsteady([10.0, 10.5, 9.8], "per token") == ""
    assert unsteady([10.0, 20.0], "per token").startswith("its two launches differ 2.0x")
    spec = CellSpec(model="tiny", backend="eager", precision="fp32", device="cpu", gen_len=4, prompt_len=4)
    fake = FakeLaunches()
    launches = [fake(spec.to_dict(), 1) for _ in range(3)]
    launches[2]["samples"]["tpot_ms"] = [[12.0 * v for v in g] for g in launches[2]["samples"]["tpot_ms"]]
    record = cell_record(spec, launches, 3, 1)
    assert record["unsteady"].startswith("launch 3 of 3 ran") and record["status"] == "ok"
    assert record["tpot_ms"]["n"] == 3 * 4 * 3  # the outlier stays in the statistics


# -- a screen before the launches -------------------------------------------------------------------


class SpeedByBackend(FakeLaunches):
    """Launches whose time per token depends on the backend and precision: a known ranking."""

    TPOT = {("eager", "fp32"): 4.0, ("onnxruntime", "fp32"): 2.0, ("onnxruntime", "int8"): 1.0,
            ("onnxruntime", "int4"): 0.5, ("int8", "int8"): 1.5, ("int8", "int4"): 3.0}

    def __call__(self, spec, timeout):
        self.tpot = self.TPOT[(spec["backend"], spec["precision"])]
        launch = super().__call__(spec, timeout)
        if (spec["backend"], spec["precision"]) == ("onnxruntime", "int4") and launch.get("parity"):
            launch["parity"] = {"passed": False}  # the fastest gives other answers: never confirmed
        return launch


def test_a_screen_confirms_the_fastest_that_pass_and_the_reference(monkeypatch, store):
    launches = SpeedByBackend()
    monkeypatch.setattr(bench.executors.cell, "run_cell", launches)
    backends = ["eager", "onnxruntime", "int8"]
    s = sweep(backends=backends, precisions=["all"], batches=[1], confirm=2)
    run_id = run_sweep(s, store, {b: AVAILABLE for b in backends}, FP, sentinel=fake_sentinel)
    cells = {(c["backend"], c["precision"]): c for c in store.get_run(run_id)["cells"]}
    confirmed = {k for k, c in cells.items() if c["launches"] == 3}
    # onnxruntime int8 (1.0 ms) and int8 int8 (1.5 ms) are the two fastest that pass; eager is the reference
    assert confirmed == {("onnxruntime", "int8"), ("int8", "int8"), ("eager", "fp32")}
    for key, c in cells.items():
        assert c["launches_planned"] == c["launches"]
        assert c["screen"].startswith("confirmed" if key in confirmed else "screened out"), (key, c["screen"])
    assert "it did not pass" in cells[("onnxruntime", "int4")]["screen"]
    assert len(launches.calls) == len(cells) + 2 * len(confirmed)  # one each, then two more for three cells
    rounds = store.rounds(run_id)
    assert [len(r["order"]) for r in rounds] == [len(cells), 3, 3]


def test_without_a_screen_every_cell_gets_every_launch_and_no_note(fake, store):
    launches = fake()
    run_id = run_sweep(sweep(), store, PROBES, FP, sentinel=fake_sentinel)
    cells = store.get_run(run_id)["cells"]
    assert all(c["launches"] == 3 and "screen" not in c for c in cells)
    assert len(launches.calls) == 3 * len(cells)


def test_parts_after_the_screen_run_the_finalists_only(monkeypatch, store):
    """The screen at batch 1 picks the finalists; the batch-2 part runs those pairs alone, three
    launches each; the other pairs there are stored as skipped, screened out."""
    launches = SpeedByBackend()
    monkeypatch.setattr(bench.executors.cell, "run_cell", launches)
    backends = ["eager", "onnxruntime", "int8"]
    top = sweep(backends=backends, precisions=["all"], batches=[1], confirm=1)
    top.also = [sweep(backends=backends, precisions=["all"], batches=[2], after_screen=True)]
    run_id = run_sweep(top, store, {b: AVAILABLE for b in backends}, FP, sentinel=fake_sentinel)
    cells = store.get_run(run_id)["cells"]
    at2 = {(c["backend"], c["precision"]): c for c in cells if c["batch"] == 2}
    ran = {k for k, c in at2.items() if c["status"] == "ok"}
    assert ran == {("onnxruntime", "int8"), ("eager", "fp32")}  # the fastest that passed, and the reference
    assert all(at2[k]["launches"] == 3 for k in ran)
    assert all(c["status"] == "skipped" and c["reason"].startswith("screened out") for k, c in at2.items()
               if k not in ran)
    assert len(at2) == 6  # every pair of the part is in the run, ran or screened out
    assert len(launches.calls) == 6 + 2 * 2 + 3 * 2  # the screen, the finalists' other launches, the part


class SpeedByFamily(SpeedByBackend):
    """As ``SpeedByBackend``, but on a Llama-family model int8's int8 is the fastest that passes."""

    def __call__(self, spec, timeout):
        if spec["model"].startswith("llama") and (spec["backend"], spec["precision"]) == ("int8", "int8"):
            self.tpot = 0.1
            return FakeLaunches.__call__(self, spec, timeout)
        return super().__call__(spec, timeout)


def test_a_part_after_the_screen_runs_each_familys_own_finalists(monkeypatch, store):
    """The screen measures tiny (GPT-2) and llama-tiny; at batch 2 each runs its own winner, never
    the other family's."""
    launches = SpeedByFamily()
    monkeypatch.setattr(bench.executors.cell, "run_cell", launches)
    backends = ["eager", "onnxruntime", "int8"]
    top = sweep(models=["tiny", "llama-tiny"], backends=backends, precisions=["all"], batches=[1], confirm=1)
    top.also = [sweep(models=["tiny", "llama-tiny"], backends=backends, precisions=["all"], batches=[2],
                      after_screen=True)]
    run_id = run_sweep(top, store, {b: AVAILABLE for b in backends}, FP, sentinel=fake_sentinel)
    ran = {(c["model"], c["backend"], c["precision"]) for c in store.get_run(run_id)["cells"]
           if c["batch"] == 2 and c["status"] == "ok"}
    assert ran == {("tiny", "onnxruntime", "int8"), ("tiny", "eager", "fp32"),
                   ("llama-tiny", "int8", "int8"), ("llama-tiny", "eager", "fp32")}


def test_a_part_after_the_screen_needs_one():
    from bench.planner import SweepError, sweep_from_config

    with pytest.raises(SweepError, match="needs a screen"):
        sweep_from_config({"model": "tiny", "also": [{"batch": 4, "after_screen": True}]})
    with pytest.raises(SweepError, match="belongs to an"):
        sweep_from_config({"model": "tiny", "confirm": 1, "after_screen": True})


def test_a_screened_run_resumed_after_the_screen_keeps_its_finalists(monkeypatch, store):
    """Ctrl-C after the screen: --resume decides the same finalists from the stored first launches
    and runs only what they still lack."""
    backends = ["eager", "onnxruntime", "int8"]

    def make():
        top = sweep(backends=backends, precisions=["all"], batches=[1], confirm=1)
        top.also = [sweep(backends=backends, precisions=["all"], batches=[2], after_screen=True)]
        return top

    first = SpeedByBackend(interrupt_at=8)  # the 6 screen launches, then 2 of the finalists' launches
    monkeypatch.setattr(bench.executors.cell, "run_cell", first)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(make(), store, {b: AVAILABLE for b in backends}, FP, sentinel=fake_sentinel)
    rest = SpeedByBackend()
    monkeypatch.setattr(bench.executors.cell, "run_cell", rest)
    run_id = run_sweep(make(), store, {b: AVAILABLE for b in backends}, FP, resume=True, sentinel=fake_sentinel)
    assert len(first.calls) + len(rest.calls) == 6 + 2 * 2 + 3 * 2  # nothing run twice, nothing lost
    assert {(c["backend"], c["precision"]) for c in rest.calls} <= {("onnxruntime", "int8"), ("eager", "fp32")}
    ok = {(c["backend"], c["precision"], c["batch"]): c["launches"] for c in store.get_run(run_id)["cells"]
          if c["status"] == "ok" and c["launches"] == 3}
    assert ok == {("onnxruntime", "int8", 1): 3, ("eager", "fp32", 1): 3, ("onnxruntime", "int8", 2): 3,
                  ("eager", "fp32", 2): 3}
