"""`int8`: PyTorch weight quantisation on the CPU: dynamic int8, or int4 weight-only.

precision int8: dynamic quantisation, int8 weights, activations quantised on the fly.

``torch.ao.quantization.quantize_dynamic`` swaps every ``nn.Linear`` (the LM head included) for
a quantised linear holding prepacked int8 weights; each call quantises its input per batch,
multiplies in int8 with int32 accumulation (FBGEMM on x86, QNNPACK on ARM) and returns fp32.
Everything else (embeddings, LayerNorm, attention over the fp32 KV cache) stays fp32.

The LM head shares its weight with the token embedding. Quantising it gives the head its own
int8 copy and leaves the embedding's fp32 table as it was, so this costs the embedding's
bytes once more in int8 and changes nothing upstream.

``int8_scheme`` chooses the weight scales: ``per_tensor`` (one scale per matrix, the default and
what ``quantize_dynamic`` does unasked) or ``per_channel`` (one per output row, its
``per_channel_dynamic_qconfig``); both symmetric, from torch's MinMax observers.

precision int4: weight-only, group-wise asymmetric 4-bit codes (``group_size`` columns share a
scale and a zero), run by torch's own CPU kernel
``aten._weight_int4pack_mm_for_cpu``, weights packed once at load by
``aten._convert_weight_to_int4pack_for_cpu``. Every Linear, the LM head included. The kernel
takes its activations, scales and zeros in bf16 (its vectorised path; measured here with
fp32 activations it ran 20x slower than with bf16), so each int4 Linear casts its input to
bf16 and its output back to fp32; the file keeps the scales in fp32.

The group is chosen per matrix unless ``group_size`` is given (``backends.base.int4_group``): the
largest of 128, 64 and 32 that divides the matrix's input width (SmolLM2-135M: 64 for its 576-wide
inputs, 128 for the MLP's 1536), and where none divides, 32 over the width padded with zero
columns to a multiple of 32, the activations padded with zeros to match at every call. An
explicit ``group_size`` is used for every matrix and refuses a width it does not divide. The
groups chosen are in ``info()`` (``group_sizes``: how many matrices got each).

Both precisions go through one tensor set (``quantized_state``: integer weights, scales, zero
points, the fp32 rest), the layout of a quantised checkpoint (``model/qcheckpoint.py``), and one
builder (``build_quantized``), so a model quantised afresh and one loaded from a file are the same.

``torch.ao.quantization`` is deprecated in favour of torchao (``torchao.quantization.quantize_``);
this stays on the built-in API because torchao is not a dependency of the project yet.
"""

from __future__ import annotations

import hashlib
import platform
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from backends.base import (BackendError, BackendUnavailable, Probe, TorchBackend, int4_group,
                           int4_group_counts)
from model.errors import InputError


def quantized_engine() -> str:
    """FBGEMM on x86 (AVX2/AVX-512 kernels); QNNPACK elsewhere (ARM)."""
    return "fbgemm" if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86") else "qnnpack"


def quantize_linears(model: nn.Module, engine: str, per_channel: bool = False) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantised to int8 on ``engine``,
    one weight scale per tensor, or per output channel."""
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        # torch 2.8 warns on every call that torch.ao.quantization moves to torchao.
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated",
                                category=DeprecationWarning)
        quantized = torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig} if per_channel else {nn.Linear},
            dtype=torch.qint8, inplace=False)
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


INT8_SCHEMES = ("per_tensor", "per_channel")
DEFAULT_GROUP_SIZE = None  # int4: a group per matrix (backends.base.int4_group)
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
INT4_SCHEME = "groupwise_asym"
INT4_ACTIVATIONS = torch.bfloat16  # what the int4 kernel computes in (its fast path)
INT4_PACK_N = 16  # the CPU int4 pack wants a multiple of 16 output rows; the LM head is padded


def quantizable_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_int4(weight: torch.Tensor, group_size: int, padded: int | None = None):
    """Group-wise asymmetric 4-bit codes of ``weight`` (N, K): (packed uint8 (N, Kp/2), scales
    (N, Kp/G), zeros (N, Kp/G)), with w ~ (q - 8) * scale + zero (tinygemm's convention, which
    torch's int4 kernels compute: the zero is the value of code 8). ``padded`` (Kp, default K):
    the width after zero columns are appended, a multiple of ``group_size``; the last group
    then holds those zeros among its values."""
    N, K = weight.shape
    padded = K if padded is None else padded
    if padded % group_size or padded < K:
        raise BackendError(f"backend 'int8': group_size={group_size} does not divide in_features={padded}")
    w = weight.detach().float()
    if padded > K:
        w = torch.nn.functional.pad(w, (0, padded - K))  # (N, Kp): zero columns
    K = padded
    w = w.reshape(N, K // group_size, group_size)  # (N, groups, G)
    lo, hi = w.amin(-1), w.amax(-1)  # (N, groups)
    scales = ((hi - lo) / 15).clamp(min=1e-6)
    codes = ((w - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (N, K/2): column 2j low nibble, 2j+1 high
    return packed.contiguous(), scales.contiguous(), (lo + 8 * scales).contiguous()


class Int4Linear(nn.Module):
    """A Linear whose weight is held as torch's CPU int4 pack with group-wise scales and zeros.

    ``in_features``: the Linear's own input width, where the codes cover a wider, zero-padded one
    (``quantize_int4``'s ``padded``); its input is then padded with zeros on every call."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int, prepacked: tuple | None = None,
                 in_features: int | None = None):
        super().__init__()
        N, K = packed.shape[0], packed.shape[1] * 2
        self.in_features, self.out_features, self.group_size = in_features or K, N, group_size
        self.padded_in_features = K
        if prepacked is not None:  # (weight_int4pack, scales_and_zeros) as this code packed them before
            self.register_buffer("weight_int4pack", prepacked[0])
            self.register_buffer("scales_and_zeros", prepacked[1])
            self.register_buffer("bias", None if bias is None else bias.float().contiguous())
            return
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(N, K).to(torch.int32)  # (N, K)
        pad = -N % INT4_PACK_N
        if pad:  # padded rows: code 8, scale 1, zero 0, so their outputs are 0 and are cut off
            codes = torch.cat([codes, torch.full((pad, K), 8, dtype=torch.int32)])
            scales = torch.cat([scales, torch.ones(pad, scales.shape[1])])
            zeros = torch.cat([zeros, torch.zeros(pad, zeros.shape[1])])
        self.register_buffer("weight_int4pack", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        # (K/G, N_padded, 2): the kernel's layout of scale and zero per group and output row
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1)
                             .to(INT4_ACTIVATIONS).contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(INT4_ACTIVATIONS)
        if self.padded_in_features != self.in_features:  # zero activations for the zero columns
            x = torch.nn.functional.pad(x, (0, self.padded_in_features - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.weight_int4pack, self.group_size, self.scales_and_zeros)  # (M, N_padded)
        y = y[:, :self.out_features].float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def int4_pack_identity() -> dict:
    """What torch's CPU int4 pack depends on: its layout is per ISA (64-row blocks on AVX-512, 32 on
    AVX2) and per torch build, and this file's code decides how codes become the pack. A stored pack
    is used only where all three match; elsewhere the portable codes are packed again."""
    return dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                source=hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16])


def int4_groups(model: nn.Module, group_size: int | None = None) -> dict[str, tuple[int, int, int]]:
    """{Linear name: (group, in_features, padded width)} of ``model``'s int4 matrices: ``group_size``
    for every one (strict), or chosen per matrix (``backends.base.int4_group``)."""
    out = {}
    for name in quantizable_linears(model):
        K = model.get_submodule(name).in_features
        group, padded = int4_group(K, group_size, backend="int8", matrix=name)
        out[name] = (group, K, padded)
    return out


def quantized_state(model: nn.Module, precision: str, int8_scheme: str = "per_tensor",
                    group_size: int | None = DEFAULT_GROUP_SIZE,
                    prepack: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of ``model`` quantised as ``precision`` asks, in the quantised-checkpoint
    layout (``model/qcheckpoint.py``), and the "quantization" metadata that describes them.

    int4: ``group_size`` for every matrix, or None for a group per matrix; the metadata's
    ``group_sizes`` names each matrix's, and ``group_size`` is the one group where every matrix
    has it unpadded (what files before per-matrix groups held), else None.

    ``prepack`` (int4): also torch's packed form of each Linear (``L.int4pack``, ``L.scales_and_zeros``),
    so a checkpoint loads without packing again on the same torch build and CPU (``int4_pack_identity``)."""
    layers = quantizable_linears(model)
    tensors: dict[str, torch.Tensor] = {}
    if precision == "int8":
        quantized = quantize_linears(model, quantized_engine(), per_channel=int8_scheme == "per_channel")
        for name in layers:
            module = quantized.get_submodule(name)
            weight, bias = module._packed_params._weight_bias()
            tensors[f"{name}.qweight"] = weight.int_repr().contiguous()
            if int8_scheme == "per_channel":
                scales, zps = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
            else:
                scales, zps = torch.tensor([weight.q_scale()]), torch.tensor([weight.q_zero_point()])
            tensors[f"{name}.scales"] = scales.float()
            tensors[f"{name}.zero_points"] = zps.to(torch.int64)
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().float()
        scheme, group = int8_scheme, None
    elif precision == "int4":
        chosen = int4_groups(model, group_size)
        for name in layers:
            module = model.get_submodule(name)
            group, _, padded = chosen[name]
            packed, scales, zeros = quantize_int4(module.weight, group, padded)
            tensors.update({f"{name}.qweight": packed, f"{name}.scales": scales, f"{name}.zero_points": zeros})
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().float()
            if prepack:
                built = Int4Linear(packed, scales, zeros, None, group)
                tensors[f"{name}.int4pack"] = built.weight_int4pack
                tensors[f"{name}.scales_and_zeros"] = built.scales_and_zeros
        scheme = INT4_SCHEME
        distinct = {(g, k == p) for g, k, p in chosen.values()}
        group = next(iter(distinct))[0] if len(distinct) == 1 and next(iter(distinct))[1] else None
    else:
        raise BackendError(f"backend 'int8': no quantised state for precision {precision!r}")
    quantized_params = {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    for name, p in model.state_dict().items():
        if name not in quantized_params:
            tensors[name] = p.detach().float().contiguous()
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    meta = dict(backend="int8", precision=precision, scheme=scheme, group_size=group, layers=layers,
                libraries={"torch": torch.__version__}, engine=quantized_engine() if precision == "int8" else None)
    if precision == "int4":
        meta["group_sizes"] = {name: chosen[name][0] for name in layers}
        meta["group_choice"] = "asked" if group_size else "per_matrix"
    if prepack and precision == "int4":
        meta["prepacked"] = int4_pack_identity()
    return tensors, meta


def file_groups(meta: dict) -> dict[str, int]:
    """{Linear name: int4 group} of a quantised tensor set's metadata: its ``group_sizes``, or in a
    file written before groups were chosen per matrix, its one ``group_size`` for all."""
    return dict(meta.get("group_sizes") or {name: meta["group_size"] for name in meta["layers"]})


def build_quantized(config, tensors: dict[str, torch.Tensor], meta: dict) -> nn.Module:
    """The model from a quantised tensor set: fp32 rest, each listed Linear replaced by its
    quantised module. Nothing is quantised here; the integer weights are used as they are."""
    from model.checkpoint import meta_model

    model = meta_model(config)
    layers = set(meta["layers"])
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        if owner in layers or leaf in ("int4pack", "scales_and_zeros"):
            continue
        setattr(model.get_submodule(owner), leaf, nn.Parameter(t, requires_grad=False))
    if meta["precision"] == "int8":
        torch.backends.quantized.engine = quantized_engine()
    use_pack = bool(meta.get("prepacked")) and meta["prepacked"] == int4_pack_identity()
    groups = file_groups(meta)
    for name in meta["layers"]:
        q, scales, zps = (tensors[f"{name}.{k}"] for k in ("qweight", "scales", "zero_points"))
        bias = tensors.get(f"{name}.bias")
        if meta["precision"] == "int8":
            N, K = q.shape
            # Made 1x1 and given its size after: made (N, K), it would first prepack an (N, K)
            # placeholder, as costly as prepacking the real weight.
            module = torch.ao.nn.quantized.dynamic.Linear(1, 1, bias_=bias is not None, dtype=torch.qint8)
            module.in_features, module.out_features = K, N
            if meta["scheme"] == "per_channel":
                qweight = torch._make_per_channel_quantized_tensor(q, scales.double(), zps, 0)
            else:
                qweight = torch._make_per_tensor_quantized_tensor(q, float(scales[0]), int(zps[0]))
            module.set_weight_bias(qweight, bias)
        else:
            prepacked = (tensors[f"{name}.int4pack"], tensors[f"{name}.scales_and_zeros"]) if use_pack else None
            K = model.get_submodule(name).in_features  # the meta model's: padded codes are wider
            module = Int4Linear(q, scales, zps, bias, groups[name], prepacked, in_features=K)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf, module)
    for name, p in model.named_parameters():
        if p.is_meta:  # a bug in the tensor set, not bad input: the reader checked every name
            raise BackendError(f"backend 'int8': quantised model has no tensor for {name}")
    return model.eval()


class Int8Backend(TorchBackend):
    name = "int8"
    precisions = ("int8", "int4")
    default_precision = "int8"
    training_precisions = ()
    training_refusal = "its quantised linears have no backward pass"
    precision_options = {"int8": ("int8_scheme",), "int4": ("group_size",)}  # each precision's own
    description = ("PyTorch quantised Linears on the CPU: dynamic int8 (FBGEMM/QNNPACK, per-tensor or per-channel), "
                   "or int4 weight-only with group-wise scales (torch's CPU int4 kernel)")

    def __init__(self, precision=None, threads=None, device=None, int8_scheme: str | None = None,
                 group_size: int | None = None, **options):
        super().__init__(precision, threads, device, **options)
        if int8_scheme is not None and int8_scheme not in INT8_SCHEMES:
            raise InputError(f"int8_scheme={int8_scheme!r} is not one of {', '.join(INT8_SCHEMES)}")
        if group_size is not None and group_size not in INT4_KERNEL_GROUPS:
            raise InputError(f"group_size={group_size!r} is not one torch's int4 kernel takes "
                             f"({', '.join(map(str, INT4_KERNEL_GROUPS))}); leave it unset to choose per matrix")
        if int8_scheme is not None and self.precision != "int8":
            raise InputError(f"int8_scheme is an option of precision int8, not {self.precision}")
        if group_size is not None and self.precision != "int4":
            raise InputError(f"group_size is an option of precision int4, not {self.precision}")
        self.asked = dict(int8_scheme=int8_scheme, group_size=group_size)
        self.int8_scheme = int8_scheme or "per_tensor"
        self.group_size = group_size  # None: per matrix
        self._meta: dict = {}

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

    def load(self, model) -> None:
        """``model``: an fp32 ``GPT`` (quantised here) or a ``QuantizedCheckpoint`` (used as it is)."""
        from model.qcheckpoint import QuantizedCheckpoint, QuantizedCheckpointError

        self.engine = quantized_engine()
        if self.engine not in torch.backends.quantized.supported_engines:
            raise BackendUnavailable(f"backend 'int8': quantised engine {self.engine!r} is not in this "
                                     f"torch build ({', '.join(torch.backends.quantized.supported_engines)})")
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if isinstance(model, QuantizedCheckpoint):
            model.check_for(self.name, self.precision)
            held_groups = set(file_groups(model.meta).values()) if self.precision == "int4" else set()
            file_scheme = dict(int8_scheme=model.meta["scheme"] if self.precision == "int8" else None,
                               group_size=model.meta.get("group_size"))
            for key, asked in self.asked.items():
                # an asked group must be every matrix's (a file of per-matrix groups holds group_size null)
                held = {file_scheme[key]} if key == "int8_scheme" else held_groups
                if asked is not None and held != {asked}:
                    shown = file_scheme[key] if key == "int8_scheme" or file_scheme[key] else \
                        f"per matrix ({', '.join(map(str, sorted(held, reverse=True)))})"
                    raise QuantizedCheckpointError(f"{model.directory}: holds {key}={shown!r}, "
                                                   f"but {key}={asked!r} was asked for")
            self.int8_scheme = file_scheme["int8_scheme"] or self.int8_scheme
            self.group_size = file_scheme["group_size"] or self.group_size
            self.model = build_quantized(model.config, model.tensors, model.meta)
            self._meta = dict(quantized_checkpoint=str(model.directory), requantized=False,
                              source_digest=model.meta.get("source", {}).get("digest"))
            if self.precision == "int4":  # a file from before per-matrix groups had one, asked or default
                self._meta["group_choice"] = model.meta.get("group_choice", "asked")
            if self.precision == "int4":  # whether torch's pack came from the file or was made again
                held = model.meta.get("prepacked")
                self._meta["prepacked"] = ("from the file" if held and held == int4_pack_identity() else
                                           "packed again: " + ("the file holds none" if not held else
                                                               f"the file's pack is for {held}"))
            return
        super().load(model)
        self._meta = dict(requantized=True)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        # Through the checkpoint's tensor set, so a model quantised here and one loaded from a
        # quantised checkpoint are built by the same code from the same numbers.
        tensors, meta = quantized_state(model, self.precision, self.int8_scheme, self.group_size)
        return build_quantized(model.config, tensors, meta)

    def weight_bytes(self) -> int | None:
        model = getattr(self, "model", None)
        return None if model is None else quantized_weight_bytes(model)

    def info(self) -> dict:
        info = dict(super().info(), intra_op_threads=torch.get_num_threads(), **self._meta)
        model = getattr(self, "model", None)
        if model is None:
            return info
        if self.precision == "int4":
            groups = {name: (m.group_size, m.in_features, m.padded_in_features)
                      for name, m in model.named_modules() if isinstance(m, Int4Linear)}
            counts = int4_group_counts(groups)
            shown = ", ".join(f"{g} ({n})" for g, n in counts.items())
            return dict(info, quantized_linears=len(groups),
                        weight_dtype=f"int4 group-wise asymmetric, groups {shown}, bf16 scales and zeros",
                        scheme=INT4_SCHEME, group_size=self.group_size, group_sizes=counts,
                        group_choice=self._meta.get("group_choice") or (
                            "asked" if self.group_size else "per_matrix"),
                        padded_matrices={name: f"{k}->{p}" for name, (_, k, p) in groups.items() if p != k},
                        kernel="aten._weight_int4pack_mm_for_cpu", activations="bf16 in the int4 Linears, fp32 elsewhere",
                        weight_bytes=quantized_weight_bytes(model))
        return dict(
            info,
            quantized_engine=self.engine,
            quantized_linears=sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules()),
            weight_dtype=f"qint8 {self.int8_scheme.replace('_', '-')} symmetric",
            int8_scheme=self.int8_scheme,
            activations="fp32, quantised per call",
            weight_bytes=quantized_weight_bytes(model),
        )


# -- QLoRA: a frozen quantised base that gradients flow through -----------------------------------

class _DequantizedMatmul(torch.autograd.Function):
    """y = x W^T with W dequantised from its codes in the forward pass and again in the backward
    pass, so no fp32 copy of W is kept between them (autograd would otherwise save the
    dequantised weight of every layer for the backward pass: the whole fp32 base again). The
    weight is frozen: only the input gets a gradient, grad_x = grad_y W."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return torch.nn.functional.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.layer.dequantized(grad_y.dtype), None


class FrozenQuantLinear(nn.Module):
    """A frozen Linear held as int8 or int4 codes, computed by dequantising them (QLoRA's base).

    The codes are those of the quantised checkpoint's layout (``quantized_state``): int8 per output
    channel, symmetric (``w = q * scale``); int4 group-wise asymmetric from ``quantize_int4``
    (``w = (q - 8) * scale + zero``, the group chosen per matrix by ``int4_group``). Unlike
    ``Int4Linear`` and the dynamic int8 Linear, whose kernels have no backward pass, this one
    dequantises the weight for each matmul (``_DequantizedMatmul``), so a LoRA adapter on top
    receives gradients through the quantised base. It trades speed for memory: the base stays
    1 byte (int8) or about half a byte (int4) a weight; the dequantised matrix lives one matmul.
    """

    def __init__(self, linear: nn.Linear, precision: str):
        super().__init__()
        if precision not in ("int8", "int4"):
            raise InputError(f"base precision {precision!r} is not int8 or int4")
        self.precision = precision
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        if precision == "int8":
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (N,)
            self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
            self.register_buffer("scales", scale)
            self.group_size = None
        else:
            group, padded = int4_group(self.in_features, None, backend="int8", matrix="a LoRA base")
            packed, scales, zeros = quantize_int4(w, group, padded)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales", scales)
            self.register_buffer("zeros", zeros)
            self.group_size = group
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The weight (out, in) in ``dtype``, from the codes."""
        if self.precision == "int8":
            return (self.qweight.float() * self.scales[:, None]).to(dtype)
        N = self.out_features
        codes = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=-1).reshape(N, -1).float()  # (N, Kp)
        groups = codes.reshape(N, -1, self.group_size)
        w = (groups - 8) * self.scales[..., None] + self.zeros[..., None]
        return w.reshape(N, -1)[:, :self.in_features].to(dtype)

    def forward(self, x):
        y = _DequantizedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def quantized_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


def quantize_frozen_base(model: nn.Module, precision: str, names: list[str]) -> nn.Module:
    """Replace each named ``nn.Linear`` of ``model`` by a ``FrozenQuantLinear`` in place (QLoRA's base).
    The embeddings, norms and LM head stay fp32, as in QLoRA."""
    for name in names:
        owner, _, leaf = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        linear = getattr(parent, leaf)
        if not isinstance(linear, nn.Linear):
            raise BackendError(f"backend 'int8': {name} is {type(linear).__name__}, not a Linear to quantise")
        setattr(parent, leaf, FrozenQuantLinear(linear, precision))
    return model
