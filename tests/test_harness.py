"""The sweep harness: planning, isolated cells, failure containment, and its timing on a virtual clock."""

from __future__ import annotations

import statistics

import pytest

from backends.base import Probe
from bench.executors.cell import _died, run_cell
from bench.scenarios.inference import prompt_ids
from bench.results.records import cell_record
from bench.machine.roofline import kv_cache_bytes, weight_bytes
from bench.spec import CellSpec
from bench.planner import Sweep, SweepError, estimate_peak_bytes, parse_list, plan
from model.gpt import build_model, get_config

AVAILABLE = Probe(True)


def test_parse_list_lists_and_ranges():
    assert parse_list("1,2,4", "batch", integer=True) == [1, 2, 4]
    assert parse_list("1-4", "batch", integer=True) == [1, 2, 3, 4]
    assert parse_list("2-8:2", "batch", integer=True) == [2, 4, 6, 8]
    assert parse_list("1-16:x2", "batch", integer=True) == [1, 2, 4, 8, 16]
    assert parse_list("tiny,small", "model") == ["tiny", "small"]


@pytest.mark.parametrize("text", ["0", "-1", "1,,2", "a", "1-x", "1-8:x1"])
def test_parse_list_rejects_bad_items_naming_them(text):
    with pytest.raises(SweepError, match="--batch"):
        parse_list(text, "batch", integer=True)


def test_plan_marks_unsupported_precision_and_unavailable_backend_as_skipped():
    sweep = Sweep(models=["tiny"], backends=["eager", "int8"], precisions=["fp32", "int8"], batches=[1])
    probes = {"eager": AVAILABLE, "int8": Probe(False, reason="no quantized engine", fix="install X")}
    cells = {(c.spec.backend, c.spec.precision): c.skip_reason for c in plan(sweep, probes, None)}
    assert cells[("eager", "fp32")] == ""
    assert "does not support precision 'int8'" in cells[("eager", "int8")]
    assert "no quantized engine" in cells[("int8", "int8")] and "install X" in cells[("int8", "int8")]


def test_memory_guard_skips_cells_that_would_not_fit():
    sweep = Sweep(models=["tiny", "gpt2"], backends=["eager"], batches=[1])
    config = get_config("gpt2")
    need = estimate_peak_bytes(config, "eager", "fp32", 1, sweep.prompt_len + sweep.gen_len,
                               sweep.prompt_len, True)
    assert need > 2 * weight_bytes(config, "fp32")  # the model and the parity reference at least
    cells = plan(sweep, {"eager": AVAILABLE}, None, available_bytes=int(need * 0.9))
    reasons = {c.spec.model: c.skip_reason for c in cells}
    assert reasons["tiny"] == ""
    assert "estimated peak memory" in reasons["gpt2"]


def test_plan_rejects_sequences_longer_than_the_context():
    with pytest.raises(SweepError, match="context length"):
        plan(Sweep(models=["tiny"], prompt_len=250, gen_len=16), {"eager": AVAILABLE}, None)


def _spec(**kw) -> CellSpec:
    base = dict(model="tiny", backend="eager", precision="fp32", device="cpu", batch=1, threads=1,
                prompt_len=8, gen_len=4, min_reps=2, max_reps=3, budget_s=2.0, parity_steps=4)
    base.update(kw)
    return CellSpec(**base)


def test_a_launch_runs_in_its_own_process_and_keeps_raw_samples_by_generation():
    launch = run_cell(_spec(backend="int8", precision="int8").to_dict(), timeout=300)
    assert launch["status"] == "ok", launch.get("reason")
    for key in ("load_s", "first_call_ms", "peak_rss_mb", "model_mb", "weights_mb", "kv_cache_mb", "parity",
                "samples"):
        assert launch[key] is not None, key
    samples = launch["samples"]
    n = len(samples["e2e_ms"])
    assert 2 <= n <= 3 and len(samples["ttft_ms"]) == len(samples["tpot_ms"]) == n
    assert all(len(steps) == 3 for steps in samples["tpot_ms"])  # gen_len - 1 decode steps per generation
    # the cell process measures; it derives nothing (that is done once, after the launches merge)
    assert "decode_tok_s" not in launch and "tpot_ms" not in launch
    assert launch["parity"]["passed"] and launch["parity"]["token_agreement"] >= 0.85
    assert launch["backend_info"]["threads"] == 1
    config = get_config("tiny")
    assert launch["kv_cache_mb"] * 2**20 == kv_cache_bytes(config, 1, 8 + 3)  # prompt + decoded tokens


def test_eager_fp32_is_the_reference_not_a_parity_pass():
    launch = run_cell(_spec().to_dict(), timeout=300)
    assert launch["status"] == "ok", launch.get("reason")
    assert launch["parity"] == {"reference": True, "passed": True, "precision": "fp32"}


def test_launches_merge_and_the_interval_spans_their_spread():
    spec = _spec()
    launches = [run_cell(spec.to_dict(), timeout=300), run_cell(spec.later_launch().to_dict(), timeout=300)]
    record = cell_record(spec, launches, planned=2)
    assert record["status"] == "ok", record.get("reason")
    assert record["launches"] == 2 and record["cell_id"] == spec.id
    sizes = record["launch_sizes"]["tpot_ms"]
    assert sizes == [len(launch["samples"]["tpot_ms"]) for launch in launches]
    assert record["tpot_ms"]["n"] == 3 * sum(sizes)
    low, high = min(record["launch_medians"]["tpot_ms"]), max(record["launch_medians"]["tpot_ms"])
    assert record["tpot_ms"]["ci95_low"] <= high and record["tpot_ms"]["ci95_high"] >= low
    assert record["decode_tok_s"] == pytest.approx(1e3 / record["tpot_ms"]["median"])
    assert record["parity"]["reference"] and launches[1]["parity"] is None  # checked once, in the first launch
    assert record["kv_cache_mb"] == launches[0]["kv_cache_mb"] and launches[1]["kv_cache_mb"] is None


def test_a_failing_cell_is_a_record_not_an_exception(tmp_path):
    record = run_cell(_spec(model=str(tmp_path / "missing"), checkpoint=True).to_dict(), timeout=300)
    assert record["status"] == "failed"
    assert "missing" in record["reason"]


def test_a_bad_spec_is_a_failed_record_naming_the_field():
    record = run_cell({"not_a_field": 1, "backend": "eager"}, timeout=300)
    assert record["status"] == "failed"
    assert "not_a_field" in record["reason"]


def test_a_cell_past_its_timeout_is_killed_and_recorded():
    record = run_cell(_spec().to_dict(), timeout=0.2)
    assert record["status"] == "timeout"
    assert "0 s" in record["reason"] or "within" in record["reason"]


def test_killed_and_crashed_cells_are_told_apart():
    assert _died(-9, "")["status"] == "oom"
    crashed = _died(-6, "free(): invalid pointer")
    assert crashed["status"] == "failed" and "SIGABRT" in crashed["reason"]


class _VirtualClock:
    """A clock that moves only when told: time spent in a step is exactly what the step says."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_harness_attributes_prefill_and_decode_time_exactly(monkeypatch):
    """On a virtual clock that a backend advances by known amounts (prefill 30 ms, each decode
    7 ms, sampling between steps 0), the harness must report exactly those times: nothing of
    a step is lost, double-counted or given to its neighbour."""
    from backends.eager import EagerBackend
    from bench.scenarios import inference as measure

    clock = _VirtualClock()
    monkeypatch.setattr(measure.time, "perf_counter", clock)

    class Timed(EagerBackend):
        def prefill(self, ids, pos=None, mask=None):
            clock.now += 0.030
            return super().prefill(ids, pos, mask)

        def decode(self, ids, cache, pos=None, mask=None):
            clock.now += 0.007
            return super().decode(ids, cache, pos, mask)

    backend = Timed()
    backend.load(build_model(get_config("tiny"), seed=0))
    spec = CellSpec(model="tiny", backend="eager", precision="fp32", device="cpu", batch=2,
                    prompt_len=8, gen_len=6, min_reps=5, max_reps=5, parity_steps=0)
    samples = measure._repeat(backend, prompt_ids(spec, 512).tolist(), spec)
    assert len(samples["ttft_ms"]) == 5
    assert samples["ttft_ms"] == pytest.approx([30.0] * 5)
    assert all(g == pytest.approx([7.0] * (spec.gen_len - 1)) for g in samples["tpot_ms"])
    assert samples["e2e_ms"] == pytest.approx([30.0 + 7.0 * (spec.gen_len - 1)] * 5)


def test_harness_decode_rate_agrees_with_an_outside_timing(monkeypatch):
    """The harness's decode tokens/s against generate() timed from outside, on a virtual clock.

    The backend is an asynchronous device: a decode returns at once and queues 7 ms of work
    (a prefill 30 ms), which the clock passes only in ``synchronize``, as a GPU's queue would.
    Outside: a synchronised stopwatch around generating ``gen_len`` tokens minus that around
    generating one token (the prefill and its token), over the ``gen_len - 1`` decode steps
    between them. A harness that read its timer before synchronising, or lost or double-counted
    part of a step, would disagree; on a virtual clock the agreement is exact, whatever else
    runs on the machine.
    """
    from backends.eager import EagerBackend
    from bench.scenarios import inference as measure
    from model.generate import generate

    clock = _VirtualClock()
    monkeypatch.setattr(measure.time, "perf_counter", clock)

    class Queued(EagerBackend):
        pending = 0.0

        def prefill(self, ids, pos=None, mask=None):
            self.pending += 0.030
            return super().prefill(ids, pos, mask)

        def decode(self, ids, cache, pos=None, mask=None):
            self.pending += 0.007
            return super().decode(ids, cache, pos, mask)

        def synchronize(self):
            clock.now += self.pending
            self.pending = 0.0

    spec = CellSpec(model="tiny", backend="eager", precision="fp32", device="cpu", batch=2, threads=1,
                    prompt_len=16, gen_len=24, min_reps=5, max_reps=10, budget_s=3, parity_steps=0)
    backend = Queued()
    backend.load(build_model(get_config("tiny"), seed=0))
    prompts = prompt_ids(spec, backend.model.config.vocab_size).tolist()

    def outside(n: int) -> float:
        backend.synchronize()
        t = clock()
        generate(backend, prompts, n, greedy=True)
        backend.synchronize()
        return clock() - t

    tpot = [step for generation in measure._repeat(backend, prompts, spec)["tpot_ms"] for step in generation]
    harness_rate = spec.batch / (statistics.fmean(tpot) / 1e3)
    outside_rate = spec.batch * (spec.gen_len - 1) / (outside(spec.gen_len) - outside(1))
    assert harness_rate == pytest.approx(outside_rate, rel=1e-9)
    assert harness_rate == pytest.approx(spec.batch / 0.007, rel=1e-9)


def test_the_peak_restarts_after_the_load_so_a_cold_export_does_not_count():
    """What a launch loaded and let go of (an exporter's or quantiser's memory) is not in the
    peak it reports for running the model, so a cold and a warm export cache agree."""
    from bench.scenarios.inference import _peak_rss_mb, malloc_trim, reset_peak_rss

    big = bytearray(400 * 2**20)  # touched: 400 MiB resident, as an export's scratch would be
    big[::4096] = b"x" * len(big[::4096])
    loading = _peak_rss_mb()
    del big
    malloc_trim()
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process restart its peak RSS (/proc/self/clear_refs)")
    assert _peak_rss_mb() < loading - 300  # the peak now starts from what is still resident
