"""`ipex`: Intel Extension for PyTorch: ``ipex.optimize`` on the CPU (fp32, bf16) or an Intel GPU.

IPEX 2.8 is the project's last release and imports only beside torch 2.8.x: a mismatched
import ends the process, so the probe compares versions before importing it.

On the CPU, ``ipex.optimize`` replaces each ``nn.Linear`` with a prepacked oneDNN linear. Two
things it does not do, both visible in ``info()``:

- The LM head shares its weight with the token embedding, and IPEX leaves shared weights
  unpacked, so the largest matmul of a decode step runs as plain ``nn.Linear``.
- bf16 weight prepacking needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; without them IPEX refuses
  it. Its documented bf16 recipe (fp32 model, ``optimize(dtype=bf16)``, autocast) also fails
  on an AVX2-only CPU, in IPEX's oneDNN LayerNorm. So bf16 here converts the whole model to
  bf16 and prepacks only where the CPU supports it; on AVX2 that is the same arithmetic as
  ``mkl`` bf16.

``ipex.llm.optimize`` does not apply: it rewrites Hugging Face models of a fixed list of
architectures (by ``config.architectures``; GPT-2 is not on it) and leaves any other module
as it is.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import re
from pathlib import Path

import torch

from backends.base import (TORCH_DTYPES, BackendUnavailable, Probe, TorchBackend, TrainingUnsupported,
                           UnsupportedPrecision, isa_has_native_bf16)

DISTRIBUTION = "intel-extension-for-pytorch"
DEVICE_PRECISIONS = {"cpu": ("fp32", "bf16"), "xpu": ("fp32", "bf16", "fp16")}
XPU_INSTALL = ("Intel GPU driver plus the XPU builds of torch and IPEX: "
               "https://pytorch-extension.intel.com/installation?platform=gpu")


def _installed_version(distribution: str) -> str | None:
    """The installed version of a PyPI distribution, or None (tests replace this)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> str:
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{match.group(1)}.{match.group(2)}" if match else version


def _cpu_has_avx2() -> bool:
    try:
        return bool(re.search(r"\bavx2\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return True  # cannot tell; let IPEX's own check decide


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


class IPEXBackend(TorchBackend):
    name = "ipex"
    precisions = ("fp32", "bf16", "fp16")
    default_precision = "fp32"
    description = "Intel Extension for PyTorch: ipex.optimize on the CPU (fp32, bf16) or an Intel XPU"

    def __init__(self, precision: str | None = None, threads: int | None = None,
                 device: str | None = None, **options):
        super().__init__(precision, threads, device, **options)
        kind = self.device.split(":")[0]
        if kind not in DEVICE_PRECISIONS:
            raise ValueError(f"device={self.device!r} is not one of: cpu, xpu, xpu:N")
        if self.precision not in DEVICE_PRECISIONS[kind]:
            raise UnsupportedPrecision(
                f"backend 'ipex' on device {self.device!r} does not support precision "
                f"{self.precision!r}" + (": fp16 needs an XPU (device='xpu')" if kind == "cpu" else "")
                + f"; on {kind} it supports {', '.join(DEVICE_PRECISIONS[kind])}")
        if kind == "xpu" and not _xpu_available():
            raise BackendUnavailable(
                f"device {self.device!r} requested but torch.xpu.is_available() is False: no Intel "
                f"GPU visible to torch {torch.__version__}; needs the {XPU_INSTALL}")

    @classmethod
    def native_precisions(cls, isa: dict) -> tuple[str, ...]:
        """bf16 on the CPU (the default device) when it has AVX-512 BF16 or AMX; fp16 needs an XPU."""
        return ("bf16",) if isa_has_native_bf16(isa) else ()

    @classmethod
    def probe(cls) -> Probe:
        torch_version = torch.__version__
        versions = {"torch": torch_version}
        ipex_version = _installed_version(DISTRIBUTION)
        if ipex_version is None or importlib.util.find_spec("intel_extension_for_pytorch") is None:
            return Probe(False, reason=f"{DISTRIBUTION} is not installed",
                         fix=f"pip install '{DISTRIBUTION}=={_major_minor(torch_version)}.*' "
                             "(it must match torch's major.minor; 2.8 is its last release)",
                         versions=versions)
        versions[DISTRIBUTION] = ipex_version
        # Checked before the import: IPEX exits the process when the versions differ.
        if _major_minor(ipex_version) != _major_minor(torch_version):
            needed = _major_minor(ipex_version)
            return Probe(False, reason=f"{DISTRIBUTION} {ipex_version} imports only beside torch "
                                       f"{needed}.x, but torch {torch_version} is installed",
                         fix=f"pip install 'torch=={needed}.*' (or an IPEX release matching torch "
                             f"{_major_minor(torch_version)}, if one exists)",
                         versions=versions)
        if not _cpu_has_avx2():  # IPEX calls sys.exit on import without it
            return Probe(False, reason="IPEX needs a CPU with at least AVX2; /proc/cpuinfo lists no avx2",
                         fix="run on an x86-64 CPU with AVX2", versions=versions)
        try:
            import intel_extension_for_pytorch._C as core
        except BaseException as e:  # SystemExit included: IPEX exits on what it cannot run on
            return Probe(False, reason=f"importing intel_extension_for_pytorch failed: {type(e).__name__}: {e}",
                         fix=f"pip install --force-reinstall '{DISTRIBUTION}=={_major_minor(torch_version)}.*'",
                         versions=versions)
        versions["isa"] = core._get_current_isa_level()
        devices = ("cpu", "xpu") if _xpu_available() else ("cpu",)
        return Probe(True, devices=devices, versions=versions)

    def load(self, model: torch.nn.Module) -> None:
        probe = self.probe()
        if not probe.available:
            raise BackendUnavailable(f"backend 'ipex': {probe.reason}; fix: {probe.fix}")
        super().load(model)
        if self.device.startswith("xpu"):
            torch.xpu.synchronize()
            torch.xpu.reset_peak_memory_stats()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import intel_extension_for_pytorch as ipex
        import intel_extension_for_pytorch._C as core

        dtype = TORCH_DTYPES[self.precision]
        if self.device.startswith("xpu"):
            # IPEX does not prepack on XPU; it converts and swaps in its GPU kernels.
            self.weights_prepack = False
            model = copy.deepcopy(model).to(self.device, dtype)
            return ipex.optimize(model, dtype=None if dtype == torch.float32 else dtype, inplace=True)
        if dtype == torch.float32:
            self.weights_prepack = True
            return ipex.optimize(model, dtype=torch.float32, inplace=False)
        # bf16 on the CPU: the whole model in bf16 (see the module docstring for why not autocast).
        self.weights_prepack = bool(core.onednn_has_bf16_support())
        model = copy.deepcopy(model).to(dtype)
        return ipex.optimize(model, dtype=dtype, inplace=True, weights_prepack=self.weights_prepack)

    def prepare_training(self, model: torch.nn.Module, optimizer):
        """IPEX's training recipe: ``ipex.optimize(model, optimizer=..., dtype=...)`` on the fp32
        model, then autocast; for bf16 IPEX keeps bf16 weights with fp32 master copies in the
        optimizer (its split-SGD)."""
        if not self.device.startswith("cpu"):
            raise TrainingUnsupported(f"backend 'ipex' trains on the CPU only here, not on {self.device!r}")
        probe = self.probe()
        if not probe.available:
            raise BackendUnavailable(f"backend 'ipex': {probe.reason}; fix: {probe.fix}")
        import intel_extension_for_pytorch as ipex

        model.train()
        self.weights_prepack = True
        self.model, optimizer = ipex.optimize(model, optimizer=optimizer, dtype=TORCH_DTYPES[self.precision])
        return self.model, optimizer

    def synchronize(self) -> None:
        if self.device.startswith("xpu"):
            torch.xpu.synchronize()

    def memory(self) -> dict[str, int] | None:
        if not self.device.startswith("xpu"):
            return None
        return {"allocated": torch.xpu.memory_allocated(), "peak": torch.xpu.max_memory_allocated()}

    def info(self) -> dict:
        info = dict(super().info(), intra_op_threads=torch.get_num_threads())
        model = getattr(self, "model", None)
        if model is None:
            return info
        import intel_extension_for_pytorch as ipex
        import intel_extension_for_pytorch._C as core

        linears = [(n, type(m).__name__) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) or type(m).__name__ == "_IPEXLinear"]
        return dict(
            info,
            ipex_version=ipex.__version__,
            isa=core._get_current_isa_level(),
            bf16_weight_prepack_supported=bool(core.onednn_has_bf16_support()),
            weights_prepack=self.weights_prepack,
            prepacked_linears=sum(kind == "_IPEXLinear" for _, kind in linears),
            plain_linears=[n for n, kind in linears if kind != "_IPEXLinear"],
            autocast=self.training and self.precision != "fp32",
        )

    def close(self) -> None:
        super().close()
        if self.device.startswith("xpu"):
            torch.xpu.empty_cache()
