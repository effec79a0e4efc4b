"""Behaviour of the PyTorch-module backends (mkl, ipex, cuda, int8) beyond parity."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from backends import cuda, int8, ipex, mkl
from backends.base import BackendError, BackendUnavailable, UnsupportedPrecision
from backends.eager import EagerBackend
from bench.machine.roofline import weight_bytes
from model.gpt import build_model, get_config


@pytest.fixture
def tiny():
    return build_model(get_config("tiny"), seed=0)


# -- precision validation ----------------------------------------------------------------

@pytest.mark.parametrize("cls,precision", [
    (mkl.MKLBackend, "fp16"),
    (mkl.MKLBackend, "int8"),
    (ipex.IPEXBackend, "int8"),
    (cuda.CUDABackend, "int8"),
    (int8.Int8Backend, "fp32"),
])
def test_unsupported_precision_names_it_and_the_supported_ones(cls, precision):
    with pytest.raises(UnsupportedPrecision) as err:
        cls(precision=precision)
    message = str(err.value)
    assert repr(precision) in message
    assert all(p in message for p in cls.precisions), message


def test_ipex_fp16_on_cpu_says_it_needs_an_xpu():
    with pytest.raises(UnsupportedPrecision, match=r"'fp16'.*needs an XPU.*fp32, bf16"):
        ipex.IPEXBackend(precision="fp16", device="cpu")


def test_default_precisions():
    assert mkl.MKLBackend().precision == "fp32"
    assert ipex.IPEXBackend().precision == "fp32"
    assert cuda.CUDABackend().precision == "fp16"
    assert int8.Int8Backend().precision == "int8"


# A CPU with AVX-512 but no bf16 instructions (Skylake-SP), one with AVX-512 BF16 (Cooper
# Lake, Zen 4) and one with AMX (Sapphire Rapids), as bench.machine.environment's fingerprint lists them.
NO_BF16 = {"avx2": True, "fma": True, "avx512f": True, "avx512_vnni": True, "avx_vnni": False,
           "avx512_bf16": False, "amx_bf16": False, "amx_int8": False, "amx_tile": False}
AVX512_BF16 = {**NO_BF16, "avx512_bf16": True}
AMX = {**NO_BF16, "amx_bf16": True, "amx_int8": True, "amx_tile": True}


@pytest.mark.parametrize("name", ["eager", "mkl", "ipex", "cuda", "onnxruntime", "openvino", "int8"])
def test_native_precisions_are_reduced_precisions_the_backend_supports(name):
    from backends import registry

    cls = registry.get_backend_class(name)
    for isa in ({}, NO_BF16, AVX512_BF16, AMX):
        assert set(cls.native_precisions(isa)) <= set(cls.precisions) - {cls.default_precision}, isa


@pytest.mark.parametrize("name", ["mkl", "ipex", "openvino"])
def test_bf16_is_native_with_avx512_bf16_or_amx(name):
    """A default sweep on a CPU with native bf16 used to leave bf16 out."""
    from backends import registry

    cls = registry.get_backend_class(name)
    assert cls.native_precisions({}) == cls.native_precisions(NO_BF16) == ()
    assert cls.native_precisions(AVX512_BF16) == cls.native_precisions(AMX) == ("bf16",)


@pytest.mark.parametrize("name", ["eager", "cuda", "onnxruntime", "int8"])
def test_other_backends_add_no_native_precision(name):
    from backends import registry

    assert registry.get_backend_class(name).native_precisions(AMX) == ()


# -- int8 ---------------------------------------------------------------------------------

def test_int8_quantises_every_linear_including_the_tied_head(tiny):
    n_linear = sum(isinstance(m, nn.Linear) for m in tiny.modules())
    embedding = tiny.transformer.wte.weight.detach().clone()
    backend = int8.Int8Backend()
    backend.load(tiny)
    quantized = backend.model
    assert n_linear == 4 * tiny.config.n_layer + 1  # four per block plus the LM head
    assert sum(isinstance(m, nn.Linear) for m in quantized.modules()) == 0
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules()) == n_linear
    assert isinstance(quantized.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    # The embedding the head was tied to is untouched, in the copy and in the caller's model.
    assert quantized.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(quantized.transformer.wte.weight, embedding)
    assert torch.equal(tiny.transformer.wte.weight, embedding)
    assert isinstance(tiny.lm_head, nn.Linear)
    assert backend.info()["quantized_linears"] == n_linear
    assert backend.info()["quantized_engine"] in torch.backends.quantized.supported_engines


def test_int8_weight_bytes_count_int8_matrices(tiny):
    fp32 = EagerBackend()
    fp32.load(tiny)
    q = int8.Int8Backend()
    q.load(tiny)
    cfg = tiny.config
    n_linear = 4 * cfg.n_layer + 1
    float_params = cfg.n_params - cfg.n_layer * 12 * cfg.n_embd ** 2  # embeddings, biases, LayerNorms
    # One byte per matrix weight (the blocks' and the LM head's own copy), fp32 for the rest,
    # and a float64 scale plus an int64 zero point per quantised layer.
    assert q.weight_bytes() == cfg.n_matmul_params + 4 * float_params + 16 * n_linear
    assert fp32.weight_bytes() == weight_bytes(cfg, "fp32")
    assert q.weight_bytes() < 0.5 * fp32.weight_bytes()
    assert q.info()["weight_bytes"] == q.weight_bytes()


def test_int8_refuses_a_linear_it_could_not_quantise():
    class OddLinear(nn.Linear):  # quantize_dynamic maps exact types, so a subclass is left float
        pass

    model = nn.Sequential(nn.Linear(8, 8), OddLinear(8, 8))
    with pytest.raises(BackendError, match="layer 1 was not quantised"):
        int8.quantize_linears(model, int8.quantized_engine())


# -- mkl ----------------------------------------------------------------------------------

def test_mkl_thread_environment_sets_the_variables(monkeypatch):
    monkeypatch.setattr(mkl, "intel_openmp_library", lambda: None)
    env = mkl.MKLBackend.thread_environment(3)
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3"
    assert env["KMP_AFFINITY"] == "granularity=fine,compact,1,0"
    assert env["KMP_BLOCKTIME"] == "1"
    assert env["OMP_PROC_BIND"] == "close" and env["OMP_PLACES"] == "cores"  # for libgomp
    assert env["GOMP_SPINCOUNT"] == "10000"
    assert "LD_PRELOAD" not in env
    assert "OMP_NUM_THREADS" not in mkl.MKLBackend.thread_environment(None)


def test_mkl_thread_environment_preloads_intel_openmp_when_installed(monkeypatch, tmp_path):
    lib = tmp_path / "libiomp5.so"
    monkeypatch.setattr(mkl, "intel_openmp_library", lambda: lib)
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    env = mkl.MKLBackend.thread_environment(1)
    assert env["LD_PRELOAD"] == f"{lib}:/opt/other.so"
    assert env["KMP_AFFINITY"] and env["KMP_BLOCKTIME"] == "1"
    assert "OMP_PROC_BIND" not in env and "OMP_PLACES" not in env  # Intel's runtime would warn and ignore them
    monkeypatch.delenv("LD_PRELOAD")
    assert mkl.MKLBackend.thread_environment(1)["LD_PRELOAD"] == str(lib)


def test_mkl_thread_environment_takes_effect_in_a_fresh_process():
    env = {**os.environ, **mkl.MKLBackend.thread_environment(1)}
    code = "import torch; from backends.mkl import openmp_runtime; print(torch.get_num_threads(), openmp_runtime())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(mkl.__file__))).stdout.split()
    assert out[0] == "1"
    expected = "libiomp5.so" if mkl.intel_openmp_library() else "libgomp"
    assert out[1].startswith(expected)


def test_mkl_bf16_converts_a_copy(tiny):
    backend = mkl.MKLBackend(precision="bf16")
    backend.load(tiny)
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tiny.parameters()} == {torch.float32}  # the caller's model is intact
    assert backend.model.lm_head.weight is backend.model.transformer.wte.weight  # still tied
    logits, cache = backend.prefill(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.float32 and cache[0][0].dtype == torch.bfloat16
    assert backend.weight_bytes() == weight_bytes(tiny.config, "bf16")


def test_torch_build_info_digests_the_build():
    info = mkl.torch_build_info()
    assert info["torch"] == torch.__version__
    assert info["intra_op_threads"] == torch.get_num_threads()
    assert info["mkldnn_available"] == torch.backends.mkldnn.is_available()
    for key in ("blas", "lapack", "mkl", "onednn", "openmp", "openmp_runtime", "cpu_capability", "parallel_backend"):
        assert isinstance(info[key], str) and info[key], key
    if torch.backends.mkldnn.is_available():
        assert info["onednn"].startswith("v")


# -- ipex probe ---------------------------------------------------------------------------

def test_ipex_probe_says_when_it_is_not_installed(monkeypatch):
    monkeypatch.setattr(ipex, "_installed_version", lambda dist: None)
    probe = ipex.IPEXBackend.probe()
    assert not probe.available
    assert "intel-extension-for-pytorch is not installed" in probe.reason
    assert probe.fix.startswith("pip install 'intel-extension-for-pytorch==")


def test_ipex_probe_reports_a_torch_version_mismatch_without_importing(monkeypatch):
    monkeypatch.setattr(ipex, "_installed_version", lambda dist: "2.7.0")
    monkeypatch.setattr(ipex.importlib.util, "find_spec", lambda name: object())
    # Any import of IPEX now fails, so a mismatch reason proves the versions were compared first.
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", None)
    probe = ipex.IPEXBackend.probe()
    assert not probe.available
    assert "intel-extension-for-pytorch 2.7.0 imports only beside torch 2.7.x" in probe.reason
    assert f"torch {torch.__version__} is installed" in probe.reason
    assert "pip install 'torch==2.7.*'" in probe.fix


def test_ipex_probe_reports_a_failed_import(monkeypatch):
    monkeypatch.setattr(ipex, "_installed_version", lambda dist: torch.__version__)
    monkeypatch.setattr(ipex.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", None)
    probe = ipex.IPEXBackend.probe()
    assert not probe.available
    assert probe.reason.startswith("importing intel_extension_for_pytorch failed: ")


def test_ipex_xpu_without_an_xpu_is_unavailable():
    if ipex._xpu_available():
        pytest.skip("this machine has an XPU")
    with pytest.raises(BackendUnavailable, match=r"torch.xpu.is_available\(\) is False"):
        ipex.IPEXBackend(device="xpu", precision="fp16")
    with pytest.raises(ValueError, match="device='tpu'"):
        ipex.IPEXBackend(device="tpu")


# -- cuda ---------------------------------------------------------------------------------

def test_cuda_probe_reason_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    probe = cuda.CUDABackend.probe()
    assert not probe.available
    if torch.version.cuda is None:
        assert "CPU-only build" in probe.reason
    else:
        assert probe.reason == (f"torch.cuda.is_available() is False: no NVIDIA GPU/driver visible "
                                f"(torch {torch.__version__} built with CUDA {torch.version.cuda})")
    assert probe.fix
    with pytest.raises(BackendUnavailable, match=r"is_available\(\) is False|CPU-only"):
        cuda.CUDABackend().load(build_model(get_config("tiny")))


def test_cuda_refuses_a_non_cuda_device():
    with pytest.raises(ValueError, match="device='cpu' is not a CUDA device"):
        cuda.CUDABackend(device="cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_place_model_converts_a_tied_copy(tiny, precision):
    # The placement the cuda backend uses, exercised on the CPU: a converted copy that runs.
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    placed = cuda.place_model(tiny, "cpu", dtype)
    assert placed is not tiny and not placed.training
    assert {p.dtype for p in placed.parameters()} == {dtype}
    assert {p.dtype for p in tiny.parameters()} == {torch.float32}
    assert placed.lm_head.weight is placed.transformer.wte.weight
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        got, _ = placed(ids, last_only=True)
        want, _ = tiny(ids, last_only=True)
    assert got.dtype == dtype
    assert torch.isfinite(got.float()).all()
    assert got.float().argmax(-1).equal(want.argmax(-1))


def test_cuda_memory_peak_is_reset_after_load(tiny):
    probe = cuda.CUDABackend.probe()
    if not probe.available:
        pytest.skip(f"cuda unavailable: {probe.reason}")
    with cuda.CUDABackend() as backend:
        backend.load(tiny)
        loaded = backend.memory()
        assert loaded["allocated"] >= weight_bytes(tiny.config, "fp16")
        assert loaded["peak"] == loaded["allocated"]
        backend.prefill(torch.randint(0, tiny.config.vocab_size, (2, 16)))
        backend.synchronize()
        assert backend.memory()["peak"] >= loaded["peak"]
