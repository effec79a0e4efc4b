"""A GPT-2-style decoder-only transformer with an explicit KV cache.

One readable file, leaves first: config and presets, attention, MLP, block, the model.
It follows GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners"; reference code https://github.com/openai/gpt-2 and Hugging Face's
``GPT2LMHeadModel``) closely enough that a GPT-2 checkpoint loads with a transpose:
the parameter names and shapes are GPT-2's, except that GPT-2's ``Conv1D`` weights are
stored (in, out) and ours are ``nn.Linear`` (out, in).

The KV cache is explicit: ``forward`` takes the past keys/values and the positions and
returns the logits and the present keys/values. Nothing is cached in hidden buffers, so the
same forward traces cleanly into ONNX and OpenVINO. The model knows nothing of backends,
devices or precisions; those belong to ``backends/``.
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

# One layer's cache: (keys, values), each (B, n_head, T_past, head_dim).
LayerCache = tuple[torch.Tensor, torch.Tensor]
KVCache = tuple[LayerCache, ...]

POS_ENCODINGS = ("learned", "sinusoidal")


class ConfigError(InputError):
    """An invalid config field or an unknown preset name (a ``ValueError``)."""


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024  # context length
    dropout: float = 0.0
    pos_encoding: str = "learned"  # GPT-2's learned table, or fixed sinusoids
    tie_embeddings: bool = True  # the LM head shares the token embedding
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ConfigError(f"pos_encoding={self.pos_encoding!r} is not one of {', '.join(POS_ENCODINGS)}")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"n_embd={self.n_embd} must be even for sinusoidal positions")
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"layer_norm_epsilon={self.layer_norm_epsilon!r} must be positive")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_block_params(self) -> int:
        """Parameters of the transformer blocks: 12*C^2 matrix weights plus biases and LayerNorms."""
        C = self.n_embd
        return self.n_layer * (12 * C * C + 13 * C)

    @property
    def n_params(self) -> int:
        C = self.n_embd
        n = self.vocab_size * C + self.n_block_params + 2 * C  # wte, blocks, ln_f
        if self.pos_encoding == "learned":
            n += self.block_size * C
        if not self.tie_embeddings:
            n += self.vocab_size * C
        return n

    @property
    def n_matmul_params(self) -> int:
        """Weights every decode step reads in full: the blocks' matrices and the LM head.

        The embeddings are only gathered a row at a time, so they are left out.
        """
        C = self.n_embd
        return self.n_layer * 12 * C * C + self.vocab_size * C

    def kv_cache_elements(self, batch: int, seq_len: int) -> int:
        """Numbers in the keys and values of ``batch`` sequences of ``seq_len`` tokens (bytes per
        precision are the harness's business: ``bench.machine.roofline.kv_cache_bytes``)."""
        return 2 * self.n_layer * batch * seq_len * self.n_embd

    def decode_flops(self, batch: int, past_len: int) -> int:
        """Multiply-add FLOPs (2 per MAC) of one decode step: matmuls plus attention over the cache."""
        attention = 2 * 2 * self.n_layer * batch * past_len * self.n_embd  # q.k and p.v
        return 2 * batch * self.n_matmul_params + attention

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, vocab_size=512, block_size=256),  # 0.5M, for tests
    "small": dict(n_layer=4, n_head=4, n_embd=256, vocab_size=4096, block_size=512),  # 4.3M
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def get_config(name: str, **overrides) -> GPTConfig:
    """The preset ``name``; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, past: LayerCache | None, attn_mask, is_causal: bool):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, head_dim)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, n_head, T_past + T, head_dim)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's "gelu_new" is the tanh approximation; the exact erf form would break parity.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, past: LayerCache | None, attn_mask, is_causal: bool):
        a, present = self.attn(self.ln_1(x), past, attn_mask, is_causal)  # pre-LayerNorm residual
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


def sinusoidal_embedding(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin/cos position codes (Vaswani et al. 2017) for integer positions (B, T) -> (B, T, dim)."""
    freq = torch.exp(torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = pos.to(torch.float32).unsqueeze(-1) * freq  # (B, T, dim/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (B, T, dim), interleaved


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
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
        """GPT-2's initialisation, reproducible from ``seed`` without touching the global RNG."""
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
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits for ``idx`` given the cache of the tokens before it.

        idx:  (B, T) token ids.
        pos:  (B, T) absolute positions; by default they follow on from the cache.
        past: one (keys, values) pair per layer, each (B, n_head, T_past, head_dim), or None.
        mask: (B, T_past + T), true for real tokens and false for padding, or None for no padding.
        last_only: compute logits for the last position only (decode, and a prefill that
            only needs the next token), which skips most of the LM head's work.
        targets: (B, T) next tokens, for training: then the first value returned is the mean
            cross-entropy (fp32) instead of the logits (see ``_loss``).
        Returns logits (B, T or 1, vocab_size) and the present cache, one pair per layer,
        each (B, n_head, T_past + T, head_dim).
        """
        B, T = idx.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        if pos is None:
            pos = torch.arange(past_len, past_len + T, device=idx.device).unsqueeze(0).expand(B, T)
        assert past is None or len(past) == self.config.n_layer, "one cache entry per layer"

        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            x = x + sinusoidal_embedding(pos, self.config.n_embd).to(x.dtype)
        x = self.transformer.drop(x)

        attn_mask, is_causal = self._attention_mask(T, past_len, mask, idx.device)
        presents = []
        for i, block in enumerate(self.transformer.h):
            layer_past = None if past is None else past[i]
            if self.grad_checkpointing and self.training:
                x, present = torch.utils.checkpoint.checkpoint(
                    block, x, layer_past, attn_mask, is_causal, use_reentrant=False)
            else:
                x, present = block(x, layer_past, attn_mask, is_causal)
            presents.append(present)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        if targets is not None:
            return self._loss(self.transformer.ln_f(x), targets), tuple(presents)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T or 1, vocab_size)
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
    def _attention_mask(T: int, past_len, mask: torch.Tensor | None, device):
        """(attn_mask, is_causal) for scaled_dot_product_attention.

        Without padding, a prefill uses SDPA's own causal mask and a one-token decode needs
        none. Otherwise build a boolean (B or 1, 1, T, T_past + T) mask: query i sits at
        absolute index T_past + i and may see keys up to it that are not padding. A query
        always sees itself, so a padding row is never fully masked (that would give NaN).
        """
        if mask is None and (T == 1 or past_len == 0):
            return None, T > 1
        q_idx = torch.arange(T, device=device) + past_len  # (T,)
        k_idx = torch.arange(past_len + T, device=device)  # (S,)
        allowed = k_idx.unsqueeze(0) <= q_idx.unsqueeze(1)  # (T, S)
        if mask is not None:
            itself = k_idx.unsqueeze(0) == q_idx.unsqueeze(1)  # (T, S)
            allowed = allowed & (mask.bool().unsqueeze(1) | itself)  # (B, T, S)
        return allowed.unsqueeze(-3), False  # (B or 1, 1, T, S)


def build_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A model in eval mode with GPT-2-initialised random weights drawn from ``seed``."""
    return GPT(config).init_weights(seed).eval()
