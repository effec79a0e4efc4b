"""One decoder-only transformer with an explicit KV cache: GPT-2 and the Llama family.

One readable file, leaves first: config and presets, norms and positions, attention, MLP,
block, the model. Plain config fields choose each part, in the spirit of litgpt's ``Config``
and gpt-fast's ``ModelArgs``:

    part         GPT-2 (the defaults)           Llama family (Llama, Mistral, Qwen2, SmolLM)
    norm         LayerNorm with bias            RMSNorm (``norm="rmsnorm"``)
    positions    learned table (or sinusoids)   rotary (``pos_encoding="rotary"``, ``rope_*``)
    MLP          GELU (tanh), 4 x n_embd        SwiGLU (``mlp="swiglu"``, ``intermediate_size``)
    attention    n_head keys/values             grouped-query: ``n_kv_head`` keys/values
    biases       every linear                   none (Llama, Mistral) or q/k/v only (Qwen2)
    head         tied to the embedding          tied or not (``tie_embeddings``)
    window       none                           ``sliding_window`` (Mistral)

It follows GPT-2 (Radford et al. 2019; https://github.com/openai/gpt-2 and Hugging Face's
``GPT2LMHeadModel``) so that a GPT-2 checkpoint loads with a transpose, and Hugging Face's
``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` so that theirs load by
renaming and stacking (``model.checkpoint``). The parameter names are GPT-2's for both
families, with two fused matrices: ``attn.c_attn`` holds q, k and v stacked (the Llama family's
``q_proj``, ``k_proj``, ``v_proj``; k and v are ``n_kv_head`` heads each), and a SwiGLU
``mlp.c_fc`` holds the gate and up projections stacked, so every backend sees the same few
linears per block and a decode step runs one matmul where Hugging Face runs three or two.

The KV cache is explicit: ``forward`` takes the past keys/values and the positions and
returns the logits and the present keys/values, ``n_kv_head`` heads each (never expanded to
``n_head`` before they are stored). Nothing is cached in hidden buffers, so the same forward
traces cleanly into ONNX and OpenVINO. The model knows nothing of backends, devices or
precisions; those belong to ``backends/``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from model.errors import InputError

# One layer's cache: (keys, values), each (B, n_kv_head, T_past, head_dim).
LayerCache = tuple[torch.Tensor, torch.Tensor]
KVCache = tuple[LayerCache, ...]

POS_ENCODINGS = ("learned", "sinusoidal", "rotary")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
ROPE_SCALINGS = ("none", "linear", "llama3")


class ConfigError(InputError):
    """An invalid config field or an unknown preset name (a ``ValueError``)."""


@dataclass(frozen=True)
class GPTConfig:
    """The shape and parts of one model. The defaults are GPT-2's; see the module docstring."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024  # context length
    dropout: float = 0.0
    pos_encoding: str = "learned"  # GPT-2's learned table, fixed sinusoids, or rotary (Llama)
    tie_embeddings: bool = True  # the LM head shares the token embedding
    layer_norm_epsilon: float = 1e-5  # of either norm (Hugging Face's rms_norm_eps for RMSNorm)
    norm: str = "layernorm"  # LayerNorm with a bias, or RMSNorm (a weight only)
    mlp: str = "gelu"  # GPT-2's tanh GELU, or SwiGLU: silu(gate) * up
    intermediate_size: int | None = None  # the MLP's width; None: 4 * n_embd
    n_kv_head: int | None = None  # key/value heads (grouped-query < n_head; 1: multi-query); None: n_head
    qkv_bias: bool = True  # biases on q, k, v (GPT-2, Qwen2)
    out_bias: bool = True  # a bias on the attention's output projection (GPT-2)
    mlp_bias: bool = True  # biases on the MLP's matrices (GPT-2)
    rope_theta: float = 10000.0  # rotary base
    rope_scaling: str = "none"  # none, linear (positions / factor) or llama3 (Llama 3.1+ long context)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_context: int = 8192  # llama3 only: the context the model was first trained on
    sliding_window: int | None = None  # a query sees this many keys, itself included (Mistral)

    def __post_init__(self):
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.n_embd)
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "intermediate_size", "n_kv_head",
                     "rope_original_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1)")
        for name, valid in (("pos_encoding", POS_ENCODINGS), ("norm", NORMS), ("mlp", MLPS),
                            ("rope_scaling", ROPE_SCALINGS)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(valid)}")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"n_embd={self.n_embd} must be even for sinusoidal positions")
        if self.pos_encoding == "rotary" and self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary positions")
        for name in ("qkv_bias", "out_bias", "mlp_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        for name in ("layer_norm_epsilon", "rope_theta", "rope_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name}={value!r} must be a positive number")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ConfigError(f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                              f"rope_low_freq_factor={self.rope_low_freq_factor}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or isinstance(self.sliding_window, bool) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window={self.sliding_window!r} must be a positive integer or null")

    @property
    def family(self) -> str:
        """"gpt2" or "llama": the Llama family is RMSNorm + rotary + SwiGLU; anything else reads as GPT-2-like."""
        return "llama" if (self.norm, self.pos_encoding, self.mlp) == ("rmsnorm", "rotary", "swiglu") else "gpt2"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values) of one token in one layer: n_kv_head * head_dim."""
        return self.n_kv_head * self.head_dim

    @property
    def n_layer_matmul_params(self) -> int:
        """Matrix weights of one block: q, k, v and the output projection, and the MLP's two or three."""
        C, I = self.n_embd, self.intermediate_size
        attention = C * (C + 2 * self.kv_dim) + C * C
        mlp = (3 if self.mlp == "swiglu" else 2) * C * I
        return attention + mlp

    @property
    def n_block_params(self) -> int:
        """Parameters of the transformer blocks: matrices, their biases and the two norms."""
        C, I = self.n_embd, self.intermediate_size
        biases = ((C + 2 * self.kv_dim) * self.qkv_bias + C * self.out_bias
                  + ((2 * I if self.mlp == "swiglu" else I) + C) * self.mlp_bias)
        norms = 2 * C * (2 if self.norm == "layernorm" else 1)
        return self.n_layer * (self.n_layer_matmul_params + biases + norms)

    @property
    def n_params(self) -> int:
        C = self.n_embd
        final_norm = C * (2 if self.norm == "layernorm" else 1)
        n = self.vocab_size * C + self.n_block_params + final_norm  # wte, blocks, ln_f
        if self.pos_encoding == "learned":
            n += self.block_size * C
        if not self.tie_embeddings:
            n += self.vocab_size * C
        return n

    @property
    def n_matmul_params(self) -> int:
        """Weights every decode step reads in full: the blocks' matrices and the LM head.

        The embeddings are only gathered a row at a time, so they are left out (a tied head
        is the embedding, read in full once, as the head).
        """
        return self.n_layer * self.n_layer_matmul_params + self.vocab_size * self.n_embd

    def kv_cache_elements(self, batch: int, seq_len: int) -> int:
        """Numbers in the keys and values of ``batch`` sequences of ``seq_len`` tokens:
        2 x n_layer x n_kv_head x head_dim per token (bytes per precision are the harness's
        business: ``bench.machine.roofline.kv_cache_bytes``)."""
        return 2 * self.n_layer * batch * seq_len * self.kv_dim

    def decode_flops(self, batch: int, past_len: int) -> int:
        """Multiply-add FLOPs (2 per MAC) of one decode step: matmuls plus attention over the cache."""
        attention = 2 * 2 * self.n_layer * batch * past_len * self.n_embd  # q.k and p.v, every query head
        return 2 * batch * self.n_matmul_params + attention

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_LLAMA = dict(pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", qkv_bias=False, out_bias=False, mlp_bias=False)

PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, vocab_size=512, block_size=256),  # 0.5M, for tests
    "small": dict(n_layer=4, n_head=4, n_embd=256, vocab_size=4096, block_size=512),  # 4.3M
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # The Llama family, with the published shapes (random weights: nothing is downloaded).
    "llama-tiny": dict(_LLAMA, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=352,
                       vocab_size=512, block_size=256),  # 0.4M, for tests; GQA, an MLP width only 32 divides
    "llama-small": dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=688,
                        vocab_size=4096, block_size=512),  # 4.0M, trained by make bench like "small"
    "smollm2-135m": dict(_LLAMA, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                         vocab_size=49152, block_size=8192, rope_theta=100000.0),  # 134.5M
    "smollm2-360m": dict(_LLAMA, n_layer=32, n_head=15, n_kv_head=5, n_embd=960, intermediate_size=2560,
                         vocab_size=49152, block_size=8192, rope_theta=100000.0),  # 361.8M
    "qwen2.5-0.5b": dict(_LLAMA, n_layer=24, n_head=14, n_kv_head=2, n_embd=896, intermediate_size=4864,
                         vocab_size=151936, block_size=32768, rope_theta=1000000.0, layer_norm_epsilon=1e-6,
                         qkv_bias=True),  # 494.0M
    "llama-3.2-1b": dict(_LLAMA, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192,
                         vocab_size=128256, block_size=131072, rope_theta=500000.0, rope_scaling="llama3",
                         rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                         rope_original_context=8192),  # 1235.8M
    # 7.2B: 29 GB in fp32, for planning and the roofline on a machine that cannot hold it.
    "mistral-7b": dict(_LLAMA, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                       vocab_size=32000, block_size=32768, sliding_window=4096, tie_embeddings=False),
}


def get_config(name: str, **overrides) -> GPTConfig:
    """The preset ``name``; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# -- norms and positions ------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), computed in fp32 and cast back, as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.layer_norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


def rope_inv_freq(config: GPTConfig, device=None) -> torch.Tensor:
    """The rotary frequencies (head_dim / 2,) fp32, with the config's scaling applied.

    Plain: theta^(-2i/d) (Su et al. 2021, RoFormer). linear: every frequency / factor.
    llama3: wavelengths longer than original_context / low_freq_factor are slowed by the
    factor, shorter than original_context / high_freq_factor are kept, and the band between
    is interpolated smoothly (Meta's Llama 3.1 recipe, as Hugging Face computes it).
    """
    D = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D))
    if config.rope_scaling == "linear":
        return inv / config.rope_factor
    if config.rope_scaling == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old = config.rope_original_context
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, smoothed, scaled)
    return inv


def rotary_tables(config: GPTConfig, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (B, 1, T, head_dim) in ``dtype`` (computed in fp32)."""
    angles = pos.float().unsqueeze(-1) * rope_inv_freq(config, pos.device)  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (B, 1, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) by the position angles: the two halves of head_dim pair up."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def sinusoidal_embedding(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin/cos position codes (Vaswani et al. 2017) for integer positions (B, T) -> (B, T, dim)."""
    freq = torch.exp(torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = pos.to(torch.float32).unsqueeze(-1) * freq  # (B, T, dim/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (B, T, dim), interleaved


# -- the block -----------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.splits = [config.n_embd, config.kv_dim, config.kv_dim]  # q, k, v widths
        self.c_attn = nn.Linear(config.n_embd, sum(self.splits), bias=config.qkv_bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.out_bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, past: LayerCache | None, attn_mask, is_causal: bool, rotary=None, need_weights: bool = False):
        """(output, present), and with ``need_weights`` the attention weights (B, n_head, T, T_past + T) as a
        third item: softmax(q k^T / sqrt(head_dim)) under the same mask, computed beside the fused kernel
        (which does not return them), whose output stays the layer's."""
        B, T, C = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split(self.splits, dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, KV, D).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, KV, D).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, n_kv_head, T_past + T, head_dim)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        if KV != H:  # each group of H / KV query heads reads one key/value head
            k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)  # (B, n_head, T_past + T, head_dim)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        if need_weights:
            return self.resid_dropout(self.c_proj(y)), present, attention_weights(q, k, attn_mask, is_causal)
        return self.resid_dropout(self.c_proj(y)), present


def attention_weights(q: torch.Tensor, k: torch.Tensor, attn_mask, is_causal: bool) -> torch.Tensor:
    """The softmax ``scaled_dot_product_attention`` applies, explicitly: (B, H, T, S) in fp32. ``attn_mask``
    is boolean (true: may attend) or None; ``is_causal`` is SDPA's top-left causal mask."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if is_causal:
        T, S = scores.shape[-2:]
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv_head, S, D) -> (B, n_kv_head * n_rep, S, D), each head repeated n_rep times in place."""
    B, KV, S, D = x.shape
    return x[:, :, None, :, :].expand(B, KV, n_rep, S, D).reshape(B, KV * n_rep, S, D)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        width = config.intermediate_size
        # SwiGLU's gate and up projections are stacked in one matrix (gate first).
        self.c_fc = nn.Linear(config.n_embd, 2 * width if self.gated else width, bias=config.mlp_bias)
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.mlp_bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            # GPT-2's "gelu_new" is the tanh approximation; the exact erf form would break parity.
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, past: LayerCache | None, attn_mask, is_causal: bool, rotary=None, need_weights: bool = False):
        a, present, *weights = self.attn(self.ln_1(x), past, attn_mask, is_causal, rotary, need_weights)  # pre-norm
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return (x, present, *weights)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=make_norm(config),
        )
        if config.pos_encoding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # Set by the training loop (model/train.py): in training mode, recompute each block's
        # activations in the backward pass instead of storing them. Inference never uses it.
        self.grad_checkpointing = False

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> GPT:
        """GPT-2's initialisation (both families), reproducible from ``seed`` without touching the global RNG."""
        g = torch.Generator().manual_seed(seed)
        std = 0.02
        for name, p in self.named_parameters():  # tied weights appear once
            if name.endswith(".bias"):
                p.zero_()
            elif "ln_" in name:
                p.fill_(1.0)
            else:
                # Residual projections are scaled down by depth, as in GPT-2.
                s = std / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else std
                p.copy_(torch.randn(p.shape, generator=g) * s)
        return self

    def forward(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor | None = None,
        past: KVCache | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, KVCache] | tuple[torch.Tensor, KVCache, dict]:
        """Logits for ``idx`` given the cache of the tokens before it.

        idx:  (B, T) token ids.
        pos:  (B, T) absolute positions; by default they follow on from the cache.
        past: one (keys, values) pair per layer, each (B, n_kv_head, T_past, head_dim), or None.
        mask: (B, T_past + T), true for real tokens and false for padding, or None for no padding.
        last_only: compute logits for the last position only (decode, and a prefill that
            only needs the next token), which skips most of the LM head's work.
        targets: (B, T) next tokens, for training: then the first value returned is the mean
            cross-entropy (fp32) instead of the logits (see ``_loss``).
        return_attention: also return, third, a dict for looking inside (``bench inspect``):
            ``attentions``, per layer the weights (B, n_head, T, T_past + T) in fp32, the softmax
            the layer applied (see ``attention_weights``), and ``hidden``, the residual stream
            (B, T, C) entering each block and leaving the last (n_layer + 1 tensors). An explicit
            option of this call only: nothing stays hooked in, and the logits do not change.
        Returns logits (B, T or 1, vocab_size) and the present cache, one pair per layer,
        each (B, n_kv_head, T_past + T, head_dim).
        """
        B, T = idx.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        if pos is None:
            pos = torch.arange(past_len, past_len + T, device=idx.device).unsqueeze(0).expand(B, T)
        assert past is None or len(past) == self.config.n_layer, "one cache entry per layer"

        x = self.transformer.wte(idx)  # (B, T, C)
        rotary = None
        if self.config.pos_encoding == "learned":
            x = x + self.transformer.wpe(pos)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + sinusoidal_embedding(pos, self.config.n_embd).to(x.dtype)
        else:  # rotary: q and k are turned in every block, by the same tables
            rotary = rotary_tables(self.config, pos, x.dtype)
        x = self.transformer.drop(x)

        attn_mask, is_causal = self._attention_mask(T, past_len, mask, idx.device, self.config.sliding_window)
        presents = []
        inside: dict | None = dict(attentions=[], hidden=[]) if return_attention else None
        for i, block in enumerate(self.transformer.h):
            layer_past = None if past is None else past[i]
            if inside is not None:
                inside["hidden"].append(x)
                x, present, weights = block(x, layer_past, attn_mask, is_causal, rotary, need_weights=True)
                inside["attentions"].append(weights)
            elif self.grad_checkpointing and self.training:
                x, present = torch.utils.checkpoint.checkpoint(
                    block, x, layer_past, attn_mask, is_causal, rotary, use_reentrant=False)
            else:
                x, present = block(x, layer_past, attn_mask, is_causal, rotary)
            presents.append(present)
        if inside is not None:
            inside["hidden"].append(x)
            inside = {k: tuple(v) for k, v in inside.items()}
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        if targets is not None:
            return self._loss(self.transformer.ln_f(x), targets), tuple(presents)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T or 1, vocab_size)
        if inside is not None:
            return logits, tuple(presents), inside
        return logits, tuple(presents)

    # Positions per piece of the checkpointed loss: a (B, LOSS_CHUNK, vocab) slice of logits at a time.
    LOSS_CHUNK = 128

    def _loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the final hidden states ``h`` (B, T, C), in fp32.

        With gradient checkpointing in training, the LM head and the loss run over pieces of
        the sequence, each recomputed in the backward pass: the logits, their log-softmax and
        their gradient (each B x T x vocab, 411 MB for gpt2 at 4 x 512) then exist one piece at
        a time instead of whole, which is most of what checkpointing the blocks leaves behind.
        """
        if not (self.grad_checkpointing and self.training):
            return F.cross_entropy(self.lm_head(h).float().flatten(0, 1), targets.flatten())
        total = h.new_zeros((), dtype=torch.float32)
        for hs, ys in zip(h.split(self.LOSS_CHUNK, dim=1), targets.split(self.LOSS_CHUNK, dim=1)):
            total = total + torch.utils.checkpoint.checkpoint(self._piece_loss, hs, ys, use_reentrant=False)
        return total / targets.numel()

    def _piece_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)  # (B, piece, vocab_size)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")

    @staticmethod
    def _attention_mask(T: int, past_len, mask: torch.Tensor | None, device, window: int | None = None):
        """(attn_mask, is_causal) for scaled_dot_product_attention.

        Without padding, a prefill uses SDPA's own causal mask and a one-token decode needs
        none. Otherwise build a boolean (B or 1, 1, T, T_past + T) mask: query i sits at
        absolute index T_past + i and may see keys up to it that are not padding. A query
        always sees itself, so a padding row is never fully masked (that would give NaN).
        With a sliding window, a query sees only the ``window`` cache positions ending at
        itself (Mistral's rule, as Hugging Face applies it: key index > query index - window).
        """
        within = window is None or past_len + T <= window  # no key is ever out of the window
        if mask is None and within and (T == 1 or past_len == 0):
            return None, T > 1
        q_idx = torch.arange(T, device=device) + past_len  # (T,)
        k_idx = torch.arange(past_len + T, device=device)  # (S,)
        allowed = k_idx.unsqueeze(0) <= q_idx.unsqueeze(1)  # (T, S)
        if window is not None:
            allowed = allowed & (k_idx.unsqueeze(0) > q_idx.unsqueeze(1) - window)
        if mask is not None:
            itself = k_idx.unsqueeze(0) == q_idx.unsqueeze(1)  # (T, S)
            allowed = allowed & (mask.bool().unsqueeze(1) | itself)  # (B, T, S)
        return allowed.unsqueeze(-3), False  # (B or 1, 1, T, S)


def build_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A model in eval mode with GPT-2-initialised random weights drawn from ``seed`` (either family)."""
    return GPT(config).init_weights(seed).eval()


def meta_model(config: GPTConfig) -> GPT:
    """``GPT(config)`` on the meta device: its names and shapes, to be filled from a file. The
    modules' default initialisers are skipped (a meta tensor has no values to set, and running
    them goes through torch's Python decompositions, whose first import cost about 2 s of every
    fresh process that loaded a checkpoint)."""
    import contextlib
    from unittest import mock

    with contextlib.ExitStack() as stack:
        for name in ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_"):
            stack.enter_context(mock.patch.object(torch.nn.init, name, lambda tensor, *a, **k: tensor))
        stack.enter_context(torch.device("meta"))
        return GPT(config)


def model_fingerprint(model: nn.Module) -> str:
    """A digest of a model's config and every weight: the key for cached exports."""
    import hashlib

    h = hashlib.sha256(repr(sorted(model.config.to_dict().items())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()
                 if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return h.hexdigest()[:16]
