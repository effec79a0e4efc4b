"""LoRA adapters for either family: low-rank updates beside a frozen base, saved alone, merged back.

LoRA (Hu et al. 2021) keeps a Linear's weight W frozen and learns W + (alpha / r) B A, with
A (r, in) and B (out, r): A starts random (Kaiming-uniform, as PEFT does) and B at zero, so
an adapted model starts as exactly its base. Only A and B train; the base's tensors are the
very ones the loaded checkpoint holds (wrapped, never copied).

Why a small implementation here rather than PEFT: PEFT is not installed, and it targets
Hugging Face modules by their names (``q_proj``, ``gate_proj``), while our decoder fuses
q/k/v into one ``attn.c_attn`` and SwiGLU's gate and up into one ``mlp.c_fc``
(``model/gpt.py``). Here an adapter sits on a whole matrix: one A and B for the stacked
q/k/v (or gate/up), which is one low-rank update of the fused matrix -- r x (in + out)
numbers, where PEFT's three per-projection adapters hold r x (3 in + out). The update merges
into the fused weight by one matmul, so a merged model is an ordinary checkpoint that every
backend loads. The base can be any module with ``in_features`` and ``out_features`` and a
forward: an ``nn.Linear``, or a frozen quantised one (QLoRA: ``backends.int8.FrozenQuantLinear``).

An adapter directory:

    adapter_config.json        {"format": "llm-backend-bench/lora", "lora": {rank, alpha, dropout, targets},
                                "base": {"digest", "config", "precision", "source"}}
    adapter_model.safetensors  ``{layer}.lora_A`` (r, in) and ``{layer}.lora_B`` (out, r), fp32

``base.digest`` is ``model_fingerprint`` of the fp32 base (its config and every weight): an
adapter loads onto that base and no other. A QLoRA adapter names its fp32 source's digest
and the precision it trained against (``base.precision``); merged, it lands on that fp32 base.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.errors import InputError
from model.gpt import GPT, model_fingerprint

ADAPTER_FORMAT = "llm-backend-bench/lora"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The Linears of a block an adapter may sit on; the default is all four.
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class AdapterError(InputError):
    """An adapter cannot be made, read or put on this model; the message names why in one line."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise AdapterError(f"lora rank={self.rank!r} must be a positive integer")
        if not self.alpha > 0:
            raise AdapterError(f"lora alpha={self.alpha!r} must be positive")
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"lora dropout={self.dropout!r} must be in [0, 1)")
        targets = tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise AdapterError(f"lora targets {', '.join(unknown) or '(none)'}: each must be one of {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dict(asdict(self), targets=list(self.targets))


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))``: a frozen base module and a trainable rank-r update."""

    def __init__(self, base: nn.Module, config: LoRAConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = config.rank, config.scale
        self.lora_A = nn.Parameter(torch.empty(config.rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank))
        # nn.Linear's (and PEFT's) default: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base(x) + self.scale * update

    def delta(self) -> torch.Tensor:
        """The update of the weight, (out, in) fp32: scale * B A."""
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def target_names(model: GPT, config: LoRAConfig) -> list[str]:
    """The block Linears the config targets, in model order: ``transformer.h.{i}.attn.c_attn`` ..."""
    return [f"transformer.h.{i}.{t}" for i in range(model.config.n_layer) for t in TARGETS if t in config.targets]


def apply_lora(model: GPT, config: LoRAConfig, *, base_digest: str, seed: int = 0, base_precision: str = "fp32",
               source: str | None = None) -> GPT:
    """Freeze every weight of ``model`` and wrap each targeted Linear in a ``LoRALinear``, in place.

    ``base_digest``: ``model_fingerprint`` of the fp32 base (computed before any quantising), written
    into every adapter saved from this model. The adapters' A matrices are drawn from ``seed``.
    """
    if has_lora(model):
        raise AdapterError("the model already carries LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name in target_names(model, config):
        owner, _, leaf = name.rpartition(".")
        parent = model.get_submodule(owner)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), config, g))
    model.lora = dict(config=config, base=dict(digest=base_digest, config=model.config.to_dict(),
                                               precision=base_precision, source=source))
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer}.lora_A`` and ``{layer}.lora_B`` of every adapter, fp32 CPU copies."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach().float().cpu().contiguous()
        out[f"{name}.lora_B"] = layer.lora_B.detach().float().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """The adapters alone (a few MB) and what base they belong to, into ``directory``."""
    from safetensors.torch import save_file

    if not has_lora(model):
        raise AdapterError("the model carries no LoRA adapters to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": ADAPTER_FORMAT})
    info = model.lora
    doc = dict(format=ADAPTER_FORMAT, format_version=ADAPTER_FORMAT_VERSION, lora=info["config"].to_dict(),
               base=info["base"])
    (directory / ADAPTER_CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
    return directory


def is_adapter(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: str | Path) -> tuple[LoRAConfig, dict]:
    """(LoRA config, base description) of an adapter directory, checked."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{directory}: not a LoRA adapter (no {ADAPTER_CONFIG})")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{path}: not an adapter of ours (no \"format\": {ADAPTER_FORMAT!r})")
    if doc.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version={doc.get('format_version')!r}; this code reads "
                           f"{ADAPTER_FORMAT_VERSION}")
    base = doc.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("digest"), str):
        raise AdapterError(f"{path}: \"base\" must name the base model's digest")
    try:
        config = LoRAConfig(**doc.get("lora", {}))
    except TypeError as e:
        raise AdapterError(f"{path}: lora: {e}") from None
    return config, base


def check_base(directory: str | Path, base: GPT, base_digest: str | None = None) -> tuple[LoRAConfig, dict]:
    """The adapter's config if ``base`` (an fp32 model, no adapters) is the model it was trained on;
    otherwise one line naming both digests. ``base_digest``: the base's fingerprint, if known."""
    config, info = read_adapter_config(directory)
    digest = base_digest or model_fingerprint(base)
    if digest != info["digest"]:
        source = f" ({info['source']})" if info.get("source") else ""
        raise AdapterError(f"{directory}: this adapter was trained on base {info['digest']}{source}, but the model "
                           f"given is {digest}; load it onto the base it was trained on")
    return config, info


def load_adapter(base: GPT, directory: str | Path, base_digest: str | None = None) -> GPT:
    """``base`` (fp32, in place) with the adapter in ``directory`` on it; another base is refused."""
    config, info = check_base(directory, base, base_digest)
    apply_lora(base, config, base_digest=info["digest"], base_precision=info.get("precision", "fp32"),
               source=info.get("source"))
    load_adapter_weights(base, directory)
    return base


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Fill the adapters already on ``model`` from ``directory`` (every tensor present, every shape checked)."""
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{path}: missing; an adapter directory needs {ADAPTER_WEIGHTS}")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type
        raise AdapterError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None
    ours = {n: p for name, layer in lora_layers(model).items()
            for n, p in ((f"{name}.lora_A", layer.lora_A), (f"{name}.lora_B", layer.lora_B))}
    if set(state) != set(ours):
        extra, missing = sorted(set(state) - set(ours)), sorted(set(ours) - set(state))
        raise AdapterError(f"{path}: tensors do not match the adapters ({len(missing)} missing, e.g. "
                           f"{missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]})")
    with torch.no_grad():
        for name, p in ours.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise AdapterError(f"{path}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                   f"expected {tuple(p.shape)}")
            p.copy_(state[name])


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight (W + scale B A) and unwrap it, in place: a plain ``GPT``
    again, which ``save_checkpoint`` writes as an ordinary checkpoint. Needs an fp32 ``nn.Linear`` base."""
    for name, layer in lora_layers(model).items():
        if not isinstance(layer.base, nn.Linear):
            raise AdapterError(f"{name}: the base is {type(layer.base).__name__}, not an fp32 Linear; merge onto "
                               f"the fp32 base (load the adapter onto the checkpoint it names)")
        layer.base.weight += layer.delta().to(layer.base.weight.dtype)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, layer.base)
    model.__dict__.pop("lora", None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
