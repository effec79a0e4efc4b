"""`int8`: PyTorch dynamic quantisation: int8 weights, activations quantised on the fly, CPU.

``torch.ao.quantization.quantize_dynamic`` swaps every ``nn.Linear`` (the LM head included) for
a quantised linear holding prepacked int8 weights; each call quantises its input per batch,
multiplies in int8 with int32 accumulation (FBGEMM on x86, QNNPACK on ARM) and returns fp32.
Everything else (embeddings, LayerNorm, attention over the fp32 KV cache) stays fp32.

The LM head shares its weight with the token embedding. Quantising it gives the head its own
int8 copy and leaves the embedding's fp32 table as it was, so this costs the embedding's
bytes once more in int8 and changes nothing upstream.

``torch.ao.quantization`` is deprecated in favour of torchao (``torchao.quantization.quantize_``);
this stays on the built-in API because torchao is not a dependency of the project yet.
"""

from __future__ import annotations

import platform
import warnings

import torch
import torch.nn as nn

from backends.base import BackendError, BackendUnavailable, Probe, TorchBackend


def quantized_engine() -> str:
    """FBGEMM on x86 (AVX2/AVX-512 kernels); QNNPACK elsewhere (ARM)."""
    return "fbgemm" if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86") else "qnnpack"


def quantize_linears(model: nn.Module, engine: str) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantised to int8 on ``engine``."""
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        # torch 2.8 warns on every call that torch.ao.quantization moves to torchao.
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated",
                                category=DeprecationWarning)
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)
    for name, module in quantized.named_modules():
        if isinstance(module, nn.Linear):  # quantised linears are not nn.Linear subclasses
            raise BackendError(f"backend 'int8': layer {name} was not quantised")
    return quantized


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights as held: int8 matrices (unpacked from FBGEMM/QNNPACK), their scales,
    zero points and fp32 biases, plus every remaining float parameter and buffer.

    The packed params are opaque to ``parameters()``, so they are unpacked to count them.
    """
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            weight, bias = module._packed_params._weight_bias()
            total += weight.numel() * weight.element_size()  # 1 byte per int8
            if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += weight.q_per_channel_scales().numel() * 8 + weight.q_per_channel_zero_points().numel() * 8
            else:
                total += 8 + 8  # one float64 scale, one int64 zero point
            if bias is not None:
                total += bias.numel() * bias.element_size()
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


class Int8Backend(TorchBackend):
    name = "int8"
    precisions = ("int8",)
    default_precision = "int8"
    description = "PyTorch dynamic quantisation: int8 weights for every Linear (FBGEMM/QNNPACK), CPU"
    training_precisions = ()
    training_refusal = "dynamically quantised int8 linears have no backward pass"

    @classmethod
    def probe(cls) -> Probe:
        engine = quantized_engine()
        versions = {"torch": torch.__version__}
        if engine not in torch.backends.quantized.supported_engines:
            return Probe(False, reason=f"torch {torch.__version__} has no {engine} quantised engine "
                                       f"(supported: {', '.join(torch.backends.quantized.supported_engines)})",
                         fix="pip install torch (the PyPI wheels include FBGEMM on x86 and QNNPACK on ARM)",
                         versions=versions)
        return Probe(True, devices=("cpu",), versions=versions)

    def load(self, model: torch.nn.Module) -> None:
        self.engine = quantized_engine()
        if self.engine not in torch.backends.quantized.supported_engines:
            raise BackendUnavailable(f"backend 'int8': quantised engine {self.engine!r} is not in this "
                                     f"torch build ({', '.join(torch.backends.quantized.supported_engines)})")
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        super().load(model)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return quantize_linears(model, self.engine)

    def weight_bytes(self) -> int | None:
        model = getattr(self, "model", None)
        return None if model is None else quantized_weight_bytes(model)

    def info(self) -> dict:
        info = dict(super().info(), intra_op_threads=torch.get_num_threads())
        model = getattr(self, "model", None)
        if model is None:
            return info
        return dict(
            info,
            quantized_engine=self.engine,
            quantized_linears=sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules()),
            weight_dtype="qint8 per-tensor affine",
            activations="fp32, quantised per call",
            weight_bytes=quantized_weight_bytes(model),
        )
