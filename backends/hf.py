"""`hf`: a peer, Hugging Face ``transformers``' own model in PyTorch eager mode.

Not one of our adapters but what a user would run anyway: the same weights, written as a
local Hugging Face directory (``backends.export.hf_dir``, cached by the model's fingerprint:
``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``,
whichever computes the model's config) and loaded with ``AutoModelForCausalLM.from_pretrained``,
in fp32 or bf16 weights; a config that no transformers class computes is refused by name. Its
KV cache is transformers' own ``DynamicCache``, grown in place each step (every token's keys and
values kept, a Mistral window applied by the mask); the attention is transformers' default
(SDPA) unless ``attn_implementation`` says otherwise. Threads are torch's, set as for eager.
"""

from __future__ import annotations

import torch

from backends import export
from backends.base import (TORCH_DTYPES, Backend, BackendError, Probe, isa_has_native_bf16,
                           model_fingerprint)

INSTALL_HINT = "pip install 'transformers>=4.57,<4.58'"
ATTENTION = ("sdpa", "eager")


def probe_transformers(fix: str = INSTALL_HINT) -> Probe | None:
    """None when transformers imports with what the peers use (GPT-2 and the Llama family,
    ``DynamicCache.layers``, 4.56 on); otherwise the unavailable Probe, with ``fix``."""
    try:
        import transformers
        from transformers import (DynamicCache, GPT2LMHeadModel, LlamaForCausalLM,  # noqa: F401
                                  MistralForCausalLM, Qwen2ForCausalLM)
    except ImportError as e:
        return Probe(False, reason=f"cannot import {e.name or e}", fix=fix)
    if not hasattr(DynamicCache(), "layers"):
        return Probe(False, reason=f"transformers {transformers.__version__} has no DynamicCache.layers "
                     f"(4.56 or later has)", fix=fix)
    return None


def version_mismatch(dist: str, dependency: str, fix: str) -> Probe | None:
    """None when the installed ``dependency`` satisfies what the installed ``dist`` declares it needs;
    otherwise the unavailable Probe naming both versions (optimum pins transformers tightly)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement
    try:
        declared = [Requirement(r) for r in requires(dist) or []]
        have = version(dependency)
    except PackageNotFoundError as e:
        return Probe(False, reason=f"{e.name or e} is not installed", fix=fix)
    for req in declared:
        if req.name == dependency and (req.marker is None or req.marker.evaluate({"extra": ""})):
            if not req.specifier.contains(have, prereleases=True):
                return Probe(False, reason=f"{dist} {version(dist)} needs {dependency}{req.specifier}, "
                             f"but {dependency} {have} is installed", fix=fix)
    return None


def peer_hf_dir(backend: str, model: torch.nn.Module):
    """``export.hf_dir`` for a peer: a model no transformers class computes is a ``BackendError``
    naming the backend and the config field, never another model."""
    from model.hf import ConvertError
    try:
        return export.hf_dir(model, model_fingerprint(model))
    except ConvertError as e:
        raise BackendError(f"{backend} backend cannot run this model: {e}") from None


class HFBackend(Backend):
    name = "hf"
    precisions = ("fp32", "bf16")
    default_precision = "fp32"
    peer = True
    peer_of = "eager"
    description = "peer: Hugging Face transformers (GPT-2 or Llama-family class), eager PyTorch, its own DynamicCache"

    def __init__(self, precision=None, threads=None, device=None, attn_implementation: str = "sdpa", **options):
        super().__init__(precision, threads, device, **options)
        if options:
            raise ValueError(f"unknown hf options: {', '.join(sorted(options))}")
        if attn_implementation not in ATTENTION:
            raise ValueError(f"attn_implementation={attn_implementation!r} is not one of {', '.join(ATTENTION)}")
        if self.device != "cpu":
            raise BackendError(f"hf backend: device {self.device!r} is not supported here; it runs on the CPU")
        self.attn_implementation = attn_implementation
        self.model = None
        self._meta: dict = {}

    @classmethod
    def probe(cls) -> Probe:
        missing = probe_transformers()
        if missing is not None:
            return missing
        import transformers
        return Probe(True, devices=("cpu",), versions={"transformers": transformers.__version__,
                                                        "torch": torch.__version__})

    @classmethod
    def native_precisions(cls, isa: dict) -> tuple[str, ...]:
        return ("bf16",) if isa_has_native_bf16(isa) else ()

    def load(self, model: torch.nn.Module) -> None:
        from transformers import AutoModelForCausalLM
        path, meta, hit = peer_hf_dir(self.name, model)
        self._meta = dict(export_s=0.0 if hit else meta["build_s"], export_cache_hit=hit, model_path=str(path),
                          architecture=meta["architecture"])
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=TORCH_DTYPES[self.precision], attn_implementation=self.attn_implementation,
            local_files_only=True).eval()

    def _forward(self, ids, pos, mask, cache):
        from transformers import DynamicCache
        if self.model is None:
            raise BackendError(f"backend {self.name!r}: call load() before prefill/decode")
        if cache is None:
            cache = DynamicCache()
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True,
                             attention_mask=None if mask is None else mask.long(),
                             position_ids=pos, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.past_key_values  # the same DynamicCache, grown in place

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise BackendError(f"backend {self.name!r}: call load() before logits")
        with torch.inference_mode():
            return self.model(input_ids=ids, use_cache=False).logits.float()

    def cache_length(self, cache) -> int:
        return int(cache.get_seq_length())

    def cache_bytes(self, cache) -> int:
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    def reorder_cache(self, cache, index: torch.Tensor):
        cache.reorder_cache(index)  # in place, as transformers' beam search does
        return cache

    def weight_bytes(self) -> int | None:
        if self.model is None:
            return None
        return sum(p.numel() * p.element_size() for p in self.model.parameters())  # tied weights count once

    def info(self) -> dict:
        import transformers
        return dict(super().info(), **self._meta, transformers=transformers.__version__,
                    attn_implementation=self.attn_implementation, intra_op_threads=torch.get_num_threads())

    def close(self) -> None:
        self.model = None
