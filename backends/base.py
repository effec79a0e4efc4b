"""The backend interface: one model, many ways to run it.

A backend adapts a built ``model.gpt.GPT`` to some runtime. The harness drives every
backend through the same few verbs:

    probe()                       -> Probe: available, or why not and how to fix it
    load(model)                   export / compile / quantise (timed apart by the harness)
    prefill(ids, pos, mask)       -> (logits (B, vocab) float32 on the CPU, cache)
    decode(ids, cache, pos, mask) -> (logits (B, vocab) float32 on the CPU, cache)
    logits(ids)                   -> every position's logits (B, T, vocab) float32 on the CPU,
                                     for quality measurement (perplexity, KL divergence)
    synchronize()                 wait for queued device work before a timer is read
    expect(batch, prompt, gen)    optional: the shapes to come, so a compiling backend compiles in load
    compile_count()               optional: graphs compiled so far (a JIT backend), else None
    memory()                      device bytes in use and at peak, or None on the CPU
    close()                       free everything; also runs on leaving a ``with`` block

Training (``bench run --scenario train``) is a second, smaller set, on backends built with
``training=True``; ``precision`` then means the autocast precision of the forward pass, the
weights and optimizer state staying fp32 (``bench train``'s recipe):

    check_training(precision)     -> the precision it trains in, or TrainingUnsupported (why not)
    prepare_training(model, opt)  -> (model, optimizer) to train: placed, optimised, compiled
    training_autocast()           a context for the forward pass and the loss
    grad_scaler()                 a torch.amp.GradScaler where the precision needs one (fp16), else None
    reset_memory_peak()           start the device's peak-memory reading afresh (no-op on the CPU)

The cache is opaque to callers: only the backend that made it reads it, reorders it
(``reorder_cache``, for beam search) or measures it (``cache_bytes``). A backend whose
``supports_join`` is true can also join caches along the batch axis (``join_caches``) and drop
leading positions that every sequence masks (``trim_cache``): that is what lets a server batch
continuously, sequences joining and leaving a running batch between decode steps.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from model.errors import InputError
from model.gpt import model_fingerprint  # noqa: F401  (the key for cached exports; imported from here)

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")  # int8/int4: the weights' bits
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class BackendError(Exception):
    """A backend cannot do what was asked; the message says why."""


class BackendUnavailable(BackendError):
    """The backend cannot run on this machine (library missing, no device, version mismatch)."""


class UnsupportedPrecision(BackendError, InputError):
    """The backend does not implement the requested precision."""


class TrainingUnsupported(BackendError):
    """The backend cannot train (an exported inference graph, quantised weights); the message says why."""


@dataclass(frozen=True)
class Probe:
    """Whether a backend can run here. ``reason`` and ``fix`` are set when it cannot."""

    available: bool
    reason: str = ""
    fix: str = ""
    devices: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(available=self.available, reason=self.reason, fix=self.fix,
                    devices=list(self.devices), versions=dict(self.versions))

    @classmethod
    def from_dict(cls, d: dict) -> Probe:
        return cls(available=bool(d["available"]), reason=d.get("reason", ""), fix=d.get("fix", ""),
                   devices=tuple(d.get("devices", ())), versions=dict(d.get("versions", {})))


# -- int4 groups: one per matrix ----------------------------------------------------------------

INT4_GROUPS = (128, 64, 32)  # the per-matrix choice, largest first: fewer scales, as long as it divides
INT4_PAD_GROUP = 32  # a width none of them divides is padded with zero columns to a multiple of this


class GroupSizeError(BackendError, InputError):
    """An int4 group size asked for explicitly does not divide a matrix's input width."""


def int4_group(in_features: int, asked: int | None = None, backend: str = "", matrix: str = "",
               option: str = "group_size") -> tuple[int, int]:
    """(group, padded input width) of one int4 matrix with ``in_features`` inputs.

    Unasked (``asked`` None): the largest of ``INT4_GROUPS`` that divides the width, unpadded;
    where none does, groups of ``INT4_PAD_GROUP`` over the width padded with zero columns to a
    multiple of it, as llama.cpp's 32-wide blocks would need (the activations are padded with
    zeros too, so the padded columns add nothing). SmolLM2-135M's 576 gets 64 and its MLP's 1536
    128; llama-tiny's 352 gets 32; a width of 100 gets 32 over 128 columns. An ``asked`` group
    is strict: one that does not divide the width is refused (``GroupSizeError``), never padded
    or replaced.
    """
    if asked is not None:
        if in_features % asked:
            where = f" of {matrix}" if matrix else ""
            raise GroupSizeError(f"backend {backend!r}: {option}={asked} does not divide in_features={in_features}"
                                 f"{where}; leave {option} unset to choose "
                                 f"{', '.join(map(str, INT4_GROUPS))} per matrix")
        return asked, in_features
    for group in INT4_GROUPS:
        if in_features % group == 0:
            return group, in_features
    return INT4_PAD_GROUP, -(-in_features // INT4_PAD_GROUP) * INT4_PAD_GROUP


def int4_group_counts(groups: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    """How many matrices got each group, for a backend's ``info()`` and a report cell:
    ``{"128": 6, "32": 2, "32 padded": 1}`` from {matrix: (group, in_features, padded width)}."""
    counts: dict[str, int] = {}
    for group, width, padded in sorted(groups.values(), key=lambda g: (-g[0], g[2] != g[1])):
        key = f"{group} padded" if padded != width else str(group)
        counts[key] = counts.get(key, 0) + 1
    return counts


def isa_has_native_bf16(isa: dict) -> bool:
    """Whether a CPU with these ISA flags (``bench.machine.environment.fingerprint()["cpu"]["isa"]``) has bf16
    matmul instructions (AVX-512 BF16 or AMX-BF16); without them bf16 runs a slow fp32 emulation."""
    return bool(isa.get("avx512_bf16") or isa.get("amx_bf16"))


def cache_dir() -> Path:
    """Where exported and compiled models are kept (``BENCH_CACHE_DIR`` overrides)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-backend-bench"
    return Path(os.environ.get("BENCH_CACHE_DIR", default))


class Backend(ABC):
    """A way to run the model. Subclasses set the class attributes and implement the verbs."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    default_precision: ClassVar[str] = "fp32"
    description: ClassVar[str] = ""
    # Whether join_caches and trim_cache work: a graph runtime whose cache lives in its own
    # buffers may not, and a server then runs one batch at a time (bench.scenarios.serve).
    supports_join: ClassVar[bool] = False
    # A peer is not one of our adapters but what a user would run instead (backends/hf.py,
    # optimum_*.py); reports mark its rows and rate our backends against the best peer.
    peer: ClassVar[bool] = False
    peer_of: ClassVar[str | None] = None  # a peer's counterpart among ours, on the same runtime
    # The autocast precisions it trains in; empty: it cannot train, for ``training_refusal``.
    training_precisions: ClassVar[tuple[str, ...]] = ()
    training_refusal: ClassVar[str] = "it implements inference only"
    # Whether prefill/decode work: a step at a time, with the logits, on tokens the caller chooses.
    # An engine that only runs whole generations through its own loop (a peer such as
    # CTranslate2's generate_tokens or OpenVINO GenAI's LLMPipeline) sets it False and implements
    # ``generate_greedy``; the harness then times that loop and checks parity on what it gives.
    stepwise: ClassVar[bool] = True
    # Whether ``logits(ids)`` works (perplexity and KL divergence, teacher-forced parity).
    exposes_logits: ClassVar[bool] = True

    def __init__(self, precision: str | None = None, threads: int | None = None,
                 device: str | None = None, training: bool = False, **options: Any):
        self.training = training
        self.precision = self.check_training(precision) if training else self.check_precision(precision)
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads} must be at least 1")
        self.threads = threads
        self.device = device or self.default_device()
        self.options = options

    # -- what the backend is -------------------------------------------------------------
    @classmethod
    @abstractmethod
    def probe(cls) -> Probe:
        """Can this backend run here? Never raises: a failure is a Probe with its reason."""

    @classmethod
    def check_precision(cls, precision: str | None) -> str:
        precision = precision or cls.default_precision
        if precision not in cls.precisions:
            raise UnsupportedPrecision(
                f"backend {cls.name!r} does not support precision {precision!r}; "
                f"it supports {', '.join(cls.precisions)}")
        return precision

    @classmethod
    def check_training(cls, precision: str | None) -> str:
        """The precision a training cell runs in (``precision``, or the backend's default)."""
        if not cls.training_precisions:
            raise TrainingUnsupported(f"backend {cls.name!r} cannot train: {cls.training_refusal}")
        if precision is None:
            precision = cls.default_precision if cls.default_precision in cls.training_precisions \
                else cls.training_precisions[0]
        if precision not in cls.training_precisions:
            raise UnsupportedPrecision(
                f"backend {cls.name!r} does not train in precision {precision!r}; "
                f"it trains in {', '.join(cls.training_precisions)}")
        return precision

    @classmethod
    def default_device(cls) -> str:
        return "cpu"

    @classmethod
    def model_refusal(cls, config) -> str | None:
        """Why this backend cannot run a model of this ``model.gpt.GPTConfig`` (an engine whose
        converter does not take GPT-2, or a RoPE scaling it computes otherwise), or None. The
        planner stores such a cell as skipped with this reason; ``load`` refuses it the same way."""
        return None

    @classmethod
    def native_precisions(cls, isa: dict) -> tuple[str, ...]:
        """The reduced precisions, among ``precisions`` and besides the default, that this backend
        runs natively fast on a CPU with these ISA flags (``bench.machine.environment.fingerprint()["cpu"]["isa"]``):
        a default sweep measures them too. None unless a backend says so.
        """
        return ()

    @classmethod
    def thread_environment(cls, threads: int | None) -> dict[str, str]:
        """Environment to set before torch or any runtime is imported (so in a fresh process)."""
        if threads is None:
            return {}
        return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def info(self) -> dict:
        """What this instance really runs with, recorded beside every result."""
        info = dict(backend=self.name, precision=self.precision, device=self.device, threads=self.threads,
                    peer=self.peer)
        if self.peer_of:
            info["peer_of"] = self.peer_of
        return info

    # -- the verbs -----------------------------------------------------------------------
    @abstractmethod
    def load(self, model: torch.nn.Module) -> None:
        """Prepare ``model`` (export, compile, quantise). Keep no reference to it unless it runs it."""

    def prefill(self, ids: torch.Tensor, pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None):
        """Run the prompt ``ids`` (B, T); return the last position's logits (B, vocab) and the cache."""
        return self._forward(ids, pos, mask, None)

    def decode(self, ids: torch.Tensor, cache, pos: torch.Tensor | None = None,
               mask: torch.Tensor | None = None):
        """Run one new token per sequence, ``ids`` (B, 1), after ``cache``."""
        return self._forward(ids, pos, mask, cache)

    @abstractmethod
    def _forward(self, ids, pos, mask, cache):
        """The shared body of prefill (cache None) and decode."""

    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int, on_token=None) -> list[list[int]]:
        """``max_new_tokens`` greedy tokens after each prompt (no end-of-sequence stop), calling
        ``on_token(step, tokens)`` as each step's tokens are chosen: what the harness times.

        The default is ``model.generate.generate`` over prefill/decode. An engine with its own
        generation loop (``stepwise`` False) overrides it, calling ``on_token`` from that loop (its
        streamer or callback), so the first call closes the time to first token and each later
        one a decode step, as for every other backend.
        """
        from model.generate import generate
        return generate(self, prompts, max_new_tokens, greedy=True, on_token=on_token)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits for ``ids`` (B, T), no padding: (B, T, vocab) float32 on the CPU.

        This default steps through the sequence, a prefill of the first token and then one
        decode per token, so it works on any backend, including graphs exported to return the
        last position only; a backend that can return all positions at once overrides it.
        """
        logits, cache = self.prefill(ids[:, :1])
        steps = [logits]
        for t in range(1, ids.shape[1]):
            logits, cache = self.decode(ids[:, t:t + 1], cache)
            steps.append(logits)
        return torch.stack(steps, dim=1)  # (B, T, vocab)

    def cache_length(self, cache) -> int:
        return int(cache[0][0].shape[2])

    def cache_bytes(self, cache) -> int:
        return sum(t.numel() * t.element_size() for layer in cache for t in layer)

    def reorder_cache(self, cache, index: torch.Tensor):
        """Select sequences of the cache along the batch axis (beam search)."""
        return tuple((k.index_select(0, index.to(k.device)), v.index_select(0, index.to(v.device)))
                     for k, v in cache)

    def join_caches(self, caches: list):
        """One cache of the sequences of ``caches``, in order along the batch axis.

        Caches of different lengths are left-padded to the longest; the caller's mask must hide
        the padded positions (False there), as it hides the left padding of a prompt.
        """
        raise BackendError(f"backend {self.name!r} cannot join caches (supports_join is False)")

    def trim_cache(self, cache, keep: int):
        """The cache without its first positions: only the last ``keep`` remain (for positions
        every sequence masks, so a long-running batch does not grow without bound)."""
        raise BackendError(f"backend {self.name!r} cannot trim caches (supports_join is False)")

    def weight_bytes(self) -> int | None:
        """Bytes of the weights as this backend holds them, where it can tell."""
        return None

    def expect(self, batch: int, prompt_len: int, gen_len: int) -> None:
        """The shapes the caller will run, told before ``load``. A backend that compiles per
        shape compiles these inside ``load`` (so ``load_s`` holds the compile time, not the
        measured steps); the others ignore it."""

    def compile_count(self) -> int | None:
        """Graphs compiled in this process so far, for a backend that compiles at run time
        (the harness counts what compiled while it measured); None for the others."""
        return None

    def synchronize(self) -> None:
        """Wait for queued device work. Nothing to wait for on the CPU."""

    def memory(self) -> dict[str, int] | None:
        """Device memory, ``{"allocated": bytes, "peak": bytes}``, or None without a device."""
        return None

    def close(self) -> None:
        """Release the model and runtime state."""

    # -- training ------------------------------------------------------------------------
    def prepare_training(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """(model, optimizer) ready to train, the model in train mode."""
        raise TrainingUnsupported(f"backend {self.name!r} cannot train: {self.training_refusal}")

    def training_autocast(self):
        """A context for a training step's forward pass and loss; none by default."""
        import contextlib
        return contextlib.nullcontext()

    def grad_scaler(self):
        """The gradient scaler a training step uses, or None (the precision does not need one)."""
        return None

    def reset_memory_peak(self) -> None:
        """Start the device's peak reading (``memory()["peak"]``) afresh; nothing to do on the CPU."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class TorchBackend(Backend):
    """Shared body for backends that run the PyTorch module itself (eager, mkl, ipex, cuda, int8)."""

    supports_join: ClassVar[bool] = True

    def join_caches(self, caches: list):
        longest = max(self.cache_length(c) for c in caches)

        def padded(t):  # (B, n_head, T, head_dim) -> (B, n_head, longest, head_dim), zeros on the left
            return F.pad(t, (0, 0, longest - t.shape[2], 0))

        return tuple((torch.cat([padded(c[i][0]) for c in caches], dim=0),
                      torch.cat([padded(c[i][1]) for c in caches], dim=0)) for i in range(len(caches[0])))

    def trim_cache(self, cache, keep: int):
        return tuple((k[:, :, -keep:], v[:, :, -keep:]) for k, v in cache)  # (B, n_head, keep, head_dim)

    training_precisions = ("fp32", "bf16")
    training_refusal = ""

    def prepare_training(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """The default trains the module as it is, on the CPU. A backend that compiles returns
        ``torch.compile(model)`` here (after this default), the optimizer unchanged."""
        self.model = model.train()
        return self.model, optimizer

    def training_autocast(self):
        """Autocast to the training precision on the backend's device; none in fp32."""
        if self.precision == "fp32":
            return super().training_autocast()
        return torch.autocast(torch.device(self.device).type, dtype=TORCH_DTYPES[self.precision])

    def load(self, model: torch.nn.Module) -> None:
        self.model = self.prepare(model.eval())

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Turn the fp32 CPU model into what this backend runs. The default runs it as it is."""
        return model

    def autocast(self):
        """A context for the forward pass; none by default."""
        import contextlib
        return contextlib.nullcontext()

    def _forward(self, ids, pos, mask, cache):
        if getattr(self, "model", None) is None:
            raise BackendError(f"backend {self.name!r}: call load() before prefill/decode")
        dev = self.device
        with torch.inference_mode(), self.autocast():
            logits, present = self.model(
                ids.to(dev), None if pos is None else pos.to(dev), cache,
                None if mask is None else mask.to(dev), last_only=True)
        return logits[:, -1, :].float().cpu(), present

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """All positions in one forward pass, as the module computes them (``last_only=False``)."""
        if getattr(self, "model", None) is None:
            raise BackendError(f"backend {self.name!r}: call load() before logits")
        with torch.inference_mode(), self.autocast():
            logits, _ = self.model(ids.to(self.device))
        return logits.float().cpu()

    def weight_bytes(self) -> int | None:
        model = getattr(self, "model", None)
        if model is None:
            return None
        seen, total = set(), 0
        for t in list(model.parameters()) + list(model.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def close(self) -> None:
        self.model = None
