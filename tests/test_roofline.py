import json
import math

import pytest
import torch

from bench.machine import roofline
from bench.machine.roofline import (decode_bound, kv_cache_bytes, measure_bandwidth, measure_peak_gflops, measure_roofline,
                            weight_bytes)
from model.gpt import get_config

# A hand-computable model: C=64, 2 layers, vocab 100.
#   n_matmul_params = 2 * 12 * 64^2 + 100 * 64 = 98304 + 6400 = 104704
CONFIG = get_config("tiny", n_layer=2, n_head=4, n_embd=64, vocab_size=100, block_size=128)


def test_config_arithmetic_the_tests_rely_on():
    assert CONFIG.n_matmul_params == 104704


def test_memory_bound_decode():
    roof = {"bandwidth_gb_s": 10.0, "peak_gflops": {"fp32": 100.0}}
    out = decode_bound(CONFIG, batch=1, past_len=10, precision="fp32", roofline=roof)
    # bytes: weights 104704 * 4 = 418816; KV 2 * 2 layers * 1 * 10 * 64 * 4 = 10240
    assert out["bytes_per_step"] == 418816 + 10240
    # flops: 2 * 104704 + attention 2 * 2 * 2 layers * 1 * 10 * 64 = 209408 + 5120
    assert out["flops_per_step"] == 209408 + 5120
    # memory 429056 / 1e10 = 42.9056 us > compute 214528 / 1e11 = 2.14528 us
    assert out["bound"] == "memory"
    assert out["roofline_decode_tok_s"] == pytest.approx(1 / 42.9056e-6)


def test_compute_bound_decode():
    # A slow bf16 path (1 GFLOP/s) with a large batch: arithmetic dominates.
    roof = {"bandwidth_gb_s": 10.0, "peak_gflops": {"bf16": 1.0}}
    out = decode_bound(CONFIG, batch=8, past_len=0, precision="bf16", roofline=roof)
    assert out["bytes_per_step"] == 104704 * 2  # empty cache
    assert out["flops_per_step"] == 2 * 8 * 104704
    # compute 1675264 / 1e9 s > memory 209408 / 1e10 s
    assert out["bound"] == "compute"
    assert out["roofline_decode_tok_s"] == pytest.approx(8 / 1.675264e-3)


def test_int8_weights_are_one_byte_and_the_cache_stays_fp32():
    roof = {"bandwidth_gb_s": 10.0, "peak_gflops": {"int8": 1000.0}}
    out = decode_bound(CONFIG, batch=2, past_len=5, precision="int8", roofline=roof)
    assert out["bytes_per_step"] == 104704 + 2 * 2 * 2 * 5 * 64 * 4


def test_a_precision_without_a_measured_peak_is_bounded_by_memory_alone():
    """cuda's default fp16 had no peak in the roofline: decode_bound raised after the cell's
    timing was done, and the cell was stored as failed."""
    roof = {"bandwidth_gb_s": 10.0, "peak_gflops": {"fp32": 100.0}}
    out = decode_bound(CONFIG, 1, 10, "fp16", roof)
    assert out["bound"] == "memory (no fp16 peak measured)"
    assert out["roofline_decode_tok_s"] == pytest.approx(1 / ((104704 * 2 + 2 * 2 * 10 * 64 * 2) / 1e10))


def test_byte_arithmetic_lives_here_and_the_config_gives_counts():
    assert weight_bytes(CONFIG, "bf16") == 2 * CONFIG.n_params
    assert kv_cache_bytes(CONFIG, 3, 7, "fp16") == 2 * CONFIG.kv_cache_elements(3, 7) == (2 * 2 * 3 * 7 * 64) * 2
    assert kv_cache_bytes(CONFIG, 1, 1, "int8") == 4 * CONFIG.kv_cache_elements(1, 1)  # int8 keeps the cache fp32
    assert not hasattr(CONFIG, "weight_bytes")


def test_roofline_for_each_device(monkeypatch, tmp_path):
    """A CPU cell gets the CPU's roofline at its own thread count; a GPU cell its device's or none."""
    calls = []
    monkeypatch.setattr(roofline, "measure_roofline", lambda **kw: calls.append(kw) or {"device": kw.get("device", "cpu")})
    assert roofline.roofline_for("cpu", 1, ("fp32", "bf16"), cache=tmp_path / "r.json") == {"device": "cpu"}
    assert calls[-1]["threads"] == 1 and calls[-1]["precisions"] == ("fp32", "bf16")
    assert roofline.roofline_for("xpu", 2, ("fp16",)) is None  # no XPU measurement: no bound, never the CPU's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert roofline.roofline_for("cuda", None, ("fp16",)) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert roofline.roofline_for("cuda", None, ("fp16",)) == {"device": "cuda"}
    assert calls[-1]["device"] == "cuda" and calls[-1]["precisions"] == ("fp16",)
    assert len(calls) == 2


def test_decode_bound_rejects_what_it_cannot_bound():
    roof = {"bandwidth_gb_s": 10.0, "peak_gflops": {"fp32": 100.0}}
    with pytest.raises(ValueError, match="'fp8'"):
        decode_bound(CONFIG, 1, 0, "fp8", roof)
    with pytest.raises(ValueError, match="batch=0"):
        decode_bound(CONFIG, 0, 0, "fp32", roof)


@pytest.fixture
def counted(monkeypatch):
    """Replace the measurements with counters returning fixed numbers."""
    calls = {"bandwidth": 0, "peak": []}

    def fake_bandwidth(device="cpu", **_):
        calls["bandwidth"] += 1
        return {"read": 12.0, "copy": 8.0, "triad": 10.0}

    def fake_peak(precision, device="cpu", **_):
        calls["peak"].append(precision)
        return {"fp32": 100.0, "bf16": 1.0, "fp16": 1.5, "int8": 200.0}[precision], f"fake {precision}"

    monkeypatch.setattr(roofline, "measure_bandwidth", fake_bandwidth)
    monkeypatch.setattr(roofline, "measure_peak_gflops", fake_peak)
    monkeypatch.setattr(roofline, "quick_bandwidth", lambda device="cpu": calls.get("now", 12.0))
    return calls


def test_a_cached_bandwidth_far_below_the_machine_now_is_measured_again(tmp_path, counted):
    """A roofline cached while the machine was busy (8.5 GB/s where it does 46) would put every
    cell over 100% of its bound: a quick gemv check catches it and the roofline is measured again."""
    cache = tmp_path / "roofline.json"
    measure_roofline(threads=1, cache=cache, fingerprint_id="fp", precisions=("fp32",))
    counted["now"] = 17.0  # within 1.5x of the cached 12 GB/s: reused
    assert "remeasured" not in measure_roofline(threads=1, cache=cache, fingerprint_id="fp", precisions=("fp32",))
    assert counted["bandwidth"] == 1
    counted["now"] = 46.0
    again = measure_roofline(threads=1, cache=cache, fingerprint_id="fp", precisions=("fp32",))
    assert counted["bandwidth"] == 2 and counted["peak"] == ["fp32", "fp32"]
    assert "12.0 GB/s" in again["remeasured"] and "46.0 GB/s" in again["remeasured"]


def test_cache_is_reused(tmp_path, counted):
    cache = tmp_path / "roofline.json"
    first = measure_roofline(threads=1, cache=cache, fingerprint_id="fp1")
    assert counted == {"bandwidth": 1, "peak": ["fp32", "bf16", "int8"]}
    assert first["bandwidth_gb_s"] == 12.0  # the best kernel
    assert first["peak_gflops"] == {"fp32": 100.0, "bf16": 1.0, "int8": 200.0}
    assert first["threads"] == 1 and first["fingerprint_id"] == "fp1"

    second = measure_roofline(threads=1, cache=cache, fingerprint_id="fp1")
    assert second == first
    assert counted["bandwidth"] == 1 and len(counted["peak"]) == 3  # nothing re-measured

    # Another thread count, another fingerprint or refresh=True measure again.
    measure_roofline(threads=2, cache=cache, fingerprint_id="fp1")
    measure_roofline(threads=1, cache=cache, fingerprint_id="fp2")
    measure_roofline(threads=1, cache=cache, fingerprint_id="fp1", refresh=True)
    assert counted["bandwidth"] == 4
    assert len(json.loads(cache.read_text())) == 3


def test_cache_measures_only_missing_precisions(tmp_path, counted):
    cache = tmp_path / "roofline.json"
    measure_roofline(cache=cache, fingerprint_id="fp", precisions=("fp32",))
    out = measure_roofline(cache=cache, fingerprint_id="fp", precisions=("fp32", "fp16"))
    assert counted == {"bandwidth": 1, "peak": ["fp32", "fp16"]}
    assert out["peak_gflops"] == {"fp32": 100.0, "fp16": 1.5}


def test_damaged_cache_is_remeasured(tmp_path, counted):
    cache = tmp_path / "roofline.json"
    cache.write_text("{not json")
    out = measure_roofline(cache=cache, fingerprint_id="fp", precisions=("fp32",))
    assert counted["bandwidth"] == 1 and out["bandwidth_gb_s"] == 12.0
    assert "fp/cpu/threads=default" in json.loads(cache.read_text())


def test_threads_are_restored(tmp_path, counted):
    before = torch.get_num_threads()
    measure_roofline(threads=1, cache=tmp_path / "r.json", fingerprint_id="fp", precisions=("fp32",))
    assert torch.get_num_threads() == before


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="'fp64'"):
        measure_roofline(precisions=("fp64",), cache=tmp_path / "r.json", fingerprint_id="fp")
    with pytest.raises(ValueError, match="threads=0"):
        measure_roofline(threads=0, cache=tmp_path / "r.json", fingerprint_id="fp")


def test_small_real_measurement_is_positive_and_finite():
    kernels = measure_bandwidth(mib=4, repeats=2)
    assert set(kernels) == {"read", "copy", "triad", "gemv"}
    assert all(v > 0 and math.isfinite(v) for v in kernels.values())
    for precision in ("fp32", "bf16", "fp16", "int8"):  # fp16 too: torch.mm runs it on the CPU
        rate, how = measure_peak_gflops(precision, sizes=(32, 64), budget_s=0.5)
        assert rate > 0 and math.isfinite(rate), precision
        assert how


def test_int8_method_is_named():
    _, how = measure_peak_gflops("int8", sizes=(32,), budget_s=0.5)
    assert "torch._int_mm" in how or "quantised Linear" in how


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU roofline path is not exercised")
def test_small_cuda_measurement_is_positive_and_finite():
    kernels = measure_bandwidth(mib=16, repeats=2, device="cuda")
    assert all(v > 0 and math.isfinite(v) for v in kernels.values())
    for precision in ("fp32", "fp16", "bf16", "int8"):
        rate, _ = measure_peak_gflops(precision, device="cuda", sizes=(256, 512), budget_s=0.5)
        assert rate > 0 and math.isfinite(rate), precision


def test_the_default_cache_lies_beside_the_default_store():
    from bench.machine.roofline import DEFAULT_CACHE
    from bench.store import DEFAULT_STORE

    assert DEFAULT_CACHE.parent == DEFAULT_STORE.parent


# --- units: GB/s is 1e9 bytes a second, GFLOP/s 1e9 FLOPs a second, times in seconds --------------

def test_decode_bound_of_gpt2_is_its_weight_bytes_over_the_bandwidth():
    """GPT-2 124M in fp32 with an empty cache at 20 GB/s: a step streams its 123.5M matmul weights (the
    blocks and the LM head) once, 4 bytes each, 494 MB, so it takes n_matmul_params * 4 / 20e9 s (about
    25 ms: about 40 tok/s). A GiB for a GB (7%), a bit for a byte (8x) or a millisecond for a second
    (1000x) changes the number."""
    gpt2 = get_config("gpt2")
    roof = {"bandwidth_gb_s": 20.0, "peak_gflops": {"fp32": 1e6}}  # compute is never the bound here
    out = decode_bound(gpt2, batch=1, past_len=0, precision="fp32", roofline=roof)
    assert out["bytes_per_step"] == gpt2.n_matmul_params * 4
    step_s = gpt2.n_matmul_params * 4 / 20e9
    assert out["bound"] == "memory"
    assert out["roofline_decode_tok_s"] == pytest.approx(1 / step_s, rel=1e-12)
    assert 35 < out["roofline_decode_tok_s"] < 45  # the same in words: tens of tokens a second, not 40 000
    # A batch of 4 reads the weights once for four tokens: four times the rate.
    four = decode_bound(gpt2, batch=4, past_len=0, precision="fp32", roofline=roof)
    assert four["roofline_decode_tok_s"] == pytest.approx(4 / step_s, rel=1e-12)


def test_bandwidth_and_peak_arithmetic_with_a_known_time(monkeypatch):
    """The measurements' own arithmetic, with every timed call taking exactly 0.5 s: bytes as STREAM
    counts them (read N, copy 2N, triad 3N, gemv the matrix) over 1e9, and 2 n^3 FLOPs over 1e9."""
    monkeypatch.setattr(roofline, "_best_seconds", lambda op, device, repeats, deadline=None: 0.5)
    n_bytes = 4 * 2**20  # 4 MiB of fp32
    kernels = measure_bandwidth(mib=4, repeats=1)
    side = int((n_bytes // 4) ** 0.5)  # 1024: the gemv matrix is 1024 x 1024 fp32, 4 MiB too
    assert kernels == pytest.approx({"read": n_bytes / 0.5 / 1e9, "copy": 2 * n_bytes / 0.5 / 1e9,
                                     "triad": 3 * n_bytes / 0.5 / 1e9, "gemv": side * side * 4 / 0.5 / 1e9},
                                    rel=1e-12)
    assert kernels["read"] == pytest.approx(0.008388608, rel=1e-12)  # 4 MiB in half a second, in GB/s
    rate, how = measure_peak_gflops("fp32", sizes=(64,), budget_s=10)
    assert rate == pytest.approx(2 * 64**3 / 0.5 / 1e9, rel=1e-12) and "64x64" in how


def _numpy_copy_gb_s(mib: int = 256, repeats: int = 3) -> float:
    """STREAM copy with numpy: best of ``repeats`` copies of a ``mib`` MiB array, 2 x its bytes moved."""
    import time

    import numpy as np

    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch of dst's pages, outside the timing
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def _numpy_matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    import time

    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def test_measured_roofline_agrees_in_units_with_an_independent_numpy_measurement(tmp_path):
    """A plausibility check of units, not an assertion on speed: the roofline's bandwidth and fp32 peak
    must be within a broad factor (0.2x to 5x bandwidth, 0.1x to 10x peak) of the same quantities measured
    here, on the same machine at the same moment, by another library with its own clock arithmetic
    (numpy: a 256 MiB copy counted as 2 x 256 MiB, and a 1024 x 1024 fp32 matmul counted as 2 n^3).
    However fast or slow or busy the machine, both see the same one, so they agree within a few x;
    a GB/s that is really MB/s, a time in ms taken for s, or bits for bytes is a factor of 8 to 1000 off
    and fails. (The exact arithmetic is pinned by the test above; this one checks the real clock path.)"""
    before = _numpy_copy_gb_s()
    roof = measure_roofline(threads=torch.get_num_threads(), precisions=("fp32",), cache=tmp_path / "r.json",
                            fingerprint_id="units-test")
    reference = max(before, _numpy_copy_gb_s())  # on both sides of the roofline's measurement
    assert 0.2 < roof["bandwidth_gb_s"] / reference < 5, (roof["bandwidth_kernels"], reference)
    peak = _numpy_matmul_gflops()
    assert 0.1 < roof["peak_gflops"]["fp32"] / peak < 10, (roof["peak_gflops"], roof["peak_method"], peak)
