"""`cuda`: the PyTorch module on an NVIDIA GPU, fp16 by default (bf16 and fp32 too).

Weights, activations and the KV cache all live on the GPU in the chosen precision; attention
is the model's ``scaled_dot_product_attention``, which dispatches to the flash or
memory-efficient kernels for half precision. CUDA launches are asynchronous, so
``synchronize`` must run before any timer is read, and ``memory`` reports the CUDA caching
allocator's live and peak bytes (peak reset once the weights are in place).

No compiled or CUDA-graph mode: the cache grows by one position per step, so a graph
captured for one step's shapes does not fit the next without a static-shape cache.
"""

from __future__ import annotations

import copy

import torch

from backends.base import TORCH_DTYPES, BackendUnavailable, Probe, TorchBackend

CUDA_INSTALL = ("install an NVIDIA driver and a CUDA build of torch, e.g. "
                "pip install torch --index-url https://download.pytorch.org/whl/cu128")


def place_model(model: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` on ``device`` with every parameter and buffer in ``dtype``.

    A copy, because the caller's fp32 CPU model may also be the parity reference. Ties
    (the LM head and the token embedding) survive ``deepcopy`` and ``.to``.
    """
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


class CUDABackend(TorchBackend):
    name = "cuda"
    precisions = ("fp16", "bf16", "fp32")
    default_precision = "fp16"
    training_precisions = ("fp16", "bf16", "fp32")  # autocast; fp16 with a gradient scaler
    description = "PyTorch on an NVIDIA GPU: fp16 (or bf16/fp32) weights and activations, SDPA attention"

    def __init__(self, precision: str | None = None, threads: int | None = None,
                 device: str | None = None, **options):
        super().__init__(precision, threads, device, **options)
        if torch.device(self.device).type != "cuda":
            raise ValueError(f"device={self.device!r} is not a CUDA device (cuda or cuda:N)")

    @classmethod
    def default_device(cls) -> str:
        return "cuda"

    @classmethod
    def probe(cls) -> Probe:
        versions = {"torch": torch.__version__}
        if torch.version.cuda is None:
            return Probe(False, reason=f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)",
                         fix=CUDA_INSTALL, versions=versions)
        versions["cuda"] = torch.version.cuda
        if not torch.cuda.is_available():
            return Probe(False, reason=f"torch.cuda.is_available() is False: no NVIDIA GPU/driver visible "
                                       f"(torch {torch.__version__} built with CUDA {torch.version.cuda})",
                         fix="on a machine with an NVIDIA GPU, install or update the driver (nvidia-smi must "
                             "list the GPU) and check CUDA_VISIBLE_DEVICES",
                         versions=versions)
        if torch.backends.cudnn.is_available():
            versions["cudnn"] = str(torch.backends.cudnn.version())
        n = torch.cuda.device_count()
        for i in range(n):
            versions[f"cuda:{i}"] = torch.cuda.get_device_name(i)
        return Probe(True, devices=tuple(f"cuda:{i}" for i in range(n)), versions=versions)

    def load(self, model: torch.nn.Module) -> None:
        self._check_device()
        super().load(model)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def _check_device(self) -> None:
        probe = self.probe()
        if not probe.available:
            raise BackendUnavailable(f"backend 'cuda': {probe.reason}; fix: {probe.fix}")
        torch.cuda.set_device(torch.device(self.device))
        if self.precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise BackendUnavailable(f"backend 'cuda': {torch.cuda.get_device_name()} has no native bf16 "
                                     "(needs compute capability 8.0+); use precision fp16 or fp32")

    def prepare_training(self, model: torch.nn.Module, optimizer):
        """fp32 weights moved to the GPU in place (the optimizer's parameters are the same
        tensors, and it has no state yet); fp16 and bf16 are autocast."""
        self._check_device()
        self.model = model.to(self.device).train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return self.model, optimizer

    def grad_scaler(self):
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    def reset_memory_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return place_model(model, self.device, TORCH_DTYPES[self.precision])

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def memory(self) -> dict[str, int] | None:
        return {"allocated": torch.cuda.memory_allocated(self.device),
                "peak": torch.cuda.max_memory_allocated(self.device)}

    def info(self) -> dict:
        info = dict(super().info(), cuda_graphs=False, compiled=False)
        if torch.cuda.is_available():
            index = torch.device(self.device).index or 0
            props = torch.cuda.get_device_properties(index)
            info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                        gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version(),
                        sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
                        sdpa_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled())
        return info

    def close(self) -> None:
        super().close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
