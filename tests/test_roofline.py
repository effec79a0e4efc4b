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
    return calls


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
