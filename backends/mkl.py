"""`mkl`: PyTorch on the CPU with its threading tuned: MKL/oneDNN kernels, fp32 or bf16.

The same module as ``eager``; what changes is the environment it runs in. Thread counts and
OpenMP affinity must be in the environment before torch loads its OpenMP runtime, so the
harness applies ``thread_environment`` to a fresh process and ``load`` only does what can
still be changed at run time.

The PyPI torch wheel links GNU OpenMP (``libgomp``), which ignores the ``KMP_*`` variables.
If the ``intel-openmp`` package is installed, its ``libiomp5.so`` is preloaded: it provides
the GNU OpenMP entry points too, so torch's parallel regions then run on Intel's runtime and
``KMP_AFFINITY``/``KMP_BLOCKTIME`` take effect. ``openmp_runtime()`` reports which library
really serves the calls.

bf16 on a CPU without AVX512-BF16 or AMX (this project's CI has AVX2 only) is emulated: the
kernels widen bf16 to fp32 and compute in fp32. That costs time where a step is compute- or
overhead-bound (tiny) and can still pay where decode is bound by reading the weights, which
bf16 halves (gpt2, batch 1, one thread, AVX2 EPYC: bf16 37 ms vs fp32 45 ms per step).
"""

from __future__ import annotations

import copy
import ctypes
import importlib.metadata
import os
import re
from pathlib import Path

import torch

from backends.base import TORCH_DTYPES, Probe, TorchBackend, isa_has_native_bf16

# Variables this backend sets, recorded in info() as the process really saw them.
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "GOMP_SPINCOUNT",
            "KMP_AFFINITY", "KMP_BLOCKTIME", "LD_PRELOAD")


def intel_openmp_library() -> Path | None:
    """Path of ``libiomp5.so`` from the ``intel-openmp`` PyPI package, if it is installed."""
    try:
        files = importlib.metadata.distribution("intel-openmp").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "libiomp5.so":
            path = Path(f.locate_file(f)).resolve()
            if path.is_file():
                return path
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def openmp_runtime() -> str:
    """Which OpenMP library serves this process's parallel regions, e.g. ``"libgomp.so.1"``.

    Both libgomp and libiomp5 may be mapped at once (torch links one, LD_PRELOAD adds the
    other); what matters is which one the dynamic linker resolves ``GOMP_parallel`` to,
    so ask it (dladdr) rather than list the mapped files.
    """
    torch.get_num_threads()  # make sure torch, and so its OpenMP runtime, is loaded
    try:
        process = ctypes.CDLL(None)
        fn = ctypes.cast(process.GOMP_parallel, ctypes.c_void_p)
        info = _DlInfo()
        if process.dladdr(fn, ctypes.byref(info)) and info.dli_fname:
            return Path(info.dli_fname.decode()).name
    except (AttributeError, OSError):
        pass
    return "unknown (GOMP_parallel not resolvable in this process)"


def _config_line(text: str, pattern: str) -> str:
    match = re.search(pattern, text, flags=re.MULTILINE)
    return match.group(1).strip() if match else "not found"


def torch_build_info() -> dict:
    """What this torch is built with and how it is threaded, for ``bench info``.

    Digested from ``torch.__config__.show()`` and ``parallel_info()`` so the report need
    not parse free text.
    """
    show = torch.__config__.show()
    parallel = torch.__config__.parallel_info()
    settings = dict(re.findall(r"(\w+)=([^,\s]*)", _config_line(show, r"Build settings:(.*)$")))
    return dict(
        torch=torch.__version__,
        blas=settings.get("BLAS_INFO", "not found"),
        lapack=settings.get("LAPACK_INFO", "not found"),
        mkl=_config_line(show, r"Math Kernel Library Version ([\d.]+)"),
        onednn=_config_line(show, r"MKL-DNN (v[\d.]+)"),
        openmp=_config_line(show, r"- (OpenMP [^\n]*)"),
        openmp_runtime=openmp_runtime(),
        cpu_capability=_config_line(show, r"CPU capability usage: (\w+)"),
        parallel_backend=_config_line(parallel, r"ATen parallel backend: (.*)$"),
        intra_op_threads=torch.get_num_threads(),
        inter_op_threads=torch.get_num_interop_threads(),
        mkldnn_available=torch.backends.mkldnn.is_available(),
        mkldnn_bf16_native=cpu_has_native_bf16(),
    )


def cpu_has_native_bf16() -> bool:
    """Does the CPU compute bf16 natively (AVX512-BF16 or AMX-BF16)? Otherwise it is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


class MKLBackend(TorchBackend):
    name = "mkl"
    precisions = ("fp32", "bf16")
    default_precision = "fp32"
    description = "PyTorch on the CPU with tuned OpenMP/MKL threading and oneDNN; fp32 or bf16"

    @classmethod
    def native_precisions(cls, isa: dict) -> tuple[str, ...]:
        return ("bf16",) if isa_has_native_bf16(isa) else ()

    @classmethod
    def probe(cls) -> Probe:
        versions = {"torch": torch.__version__}
        if not torch.backends.mkldnn.is_available():
            return Probe(False, reason=f"torch {torch.__version__} is built without oneDNN (mkldnn)",
                         fix="pip install torch (the PyPI x86-64 wheels include MKL and oneDNN)",
                         versions=versions)
        iomp = intel_openmp_library()
        versions["intel-openmp"] = importlib.metadata.version("intel-openmp") if iomp else "not installed"
        return Probe(True, devices=("cpu",), versions=versions)

    @classmethod
    def thread_environment(cls, threads: int | None) -> dict[str, str]:
        env = dict(super().thread_environment(threads))
        # Intel OpenMP: pin each thread to its own core, and spin only 1 ms after a parallel
        # region instead of 200 ms, so idle workers do not steal a core from other work.
        # libgomp ignores KMP_* silently.
        env["KMP_AFFINITY"] = "granularity=fine,compact,1,0"
        env["KMP_BLOCKTIME"] = "1"
        iomp = intel_openmp_library()
        if iomp is not None:
            preload = os.environ.get("LD_PRELOAD", "")
            env["LD_PRELOAD"] = f"{iomp}:{preload}" if preload else str(iomp)
            return env  # libiomp5 warns that OMP_PROC_BIND/OMP_PLACES lose to KMP_AFFINITY
        # GNU OpenMP: the same two ideas in its own terms. Pinning stops the scheduler moving a
        # thread away from its cache between decode steps; a short spin (default ~300k spins)
        # gave gpt2 2-thread decode 84 ms/step instead of 142 ms on a 2-core box with one
        # core busy elsewhere.
        env["OMP_PROC_BIND"] = "close"
        env["OMP_PLACES"] = "cores"
        env["GOMP_SPINCOUNT"] = "10000"
        return env

    def load(self, model: torch.nn.Module) -> None:
        self._runtime_settings()
        super().load(model)

    def prepare_training(self, model: torch.nn.Module, optimizer):
        """The module as it is, in the same thread settings as inference; bf16 is autocast."""
        self._runtime_settings()
        return super().prepare_training(model, optimizer)

    def _runtime_settings(self) -> None:
        """What can still be set in a running process: threads, inter-op threads, oneDNN."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        # Decode is one sequence of ops: inter-op parallelism only adds idle threads. Allowed
        # only before the first inter-op parallel work, so record whether it took.
        try:
            torch.set_num_interop_threads(1)
            self.interop_set = True
        except RuntimeError:
            self.interop_set = False
        torch.backends.mkldnn.enabled = True

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.precision == "fp32":
            return model
        # Convert a copy: the caller's fp32 model may also be the parity reference.
        return copy.deepcopy(model).to(TORCH_DTYPES[self.precision])

    def info(self) -> dict:
        return dict(
            super().info(),
            intra_op_threads=torch.get_num_threads(),
            inter_op_threads=torch.get_num_interop_threads(),
            interop_set_to_1=getattr(self, "interop_set", None),
            openmp_runtime=openmp_runtime(),
            mkldnn_enabled=torch.backends.mkldnn.enabled,
            bf16_native=cpu_has_native_bf16(),
            env={k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        )
