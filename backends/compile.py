"""`compile`: ``torch.compile`` (inductor) of the model with a static KV cache.

The model's own cache grows by one position per step (``torch.cat``), so a compiled decode
step would see a new shape every token and recompile every token. This backend keeps its
own cache instead, as gpt-fast and Hugging Face's ``StaticCache`` do: per layer, keys and
values preallocated as (B, n_kv_head, max_len, head_dim), written in place at the current
position (``index_copy_``), attention over the whole buffer with a mask of the positions
that hold real tokens. Every decode step then has one shape, and compiles once.

- **Decode** is a step function written here (``StaticDecoder``) from the model's own
  submodules (``block.ln_1``, ``block.attn.c_attn``, ..., ``lm_head``): the weights are the
  model's, not a copy; only the cache handling differs from ``model.gpt``. It computes both
  families from the config, as the model does: learned, sinusoidal or rotary positions, either
  norm and MLP (the block's own modules), grouped-query attention over ``n_kv_head`` cached heads
  and a sliding window in its mask. Compiled with
  ``dynamic=False``: one graph per (batch, max_len), and a CUDA graph needs static shapes.
- **Prefill** is the model's own ``forward`` compiled with ``dynamic=False``: one graph per
  prompt shape. A benchmark repeats one shape, and a static graph is inductor's fastest for
  it; a symbolic length does not even trace, as the model's ``is_causal = T > 1`` becomes a
  symbolic bool that ``scaled_dot_product_attention`` refuses. Its keys and values are
  copied into the static cache. A new prompt shape is a recompile (counted, like any).
- **logits** (quality) runs the same compiled forward for all positions, so perplexity
  measures the compiled arithmetic, not eager's.

Compiling happens at the first call of each shape. The harness says which shapes it will
run (``expect``) before ``load``, and ``load`` runs them once on dummy input, so compile
time lands in ``load_s`` and the measured steps run compiled code. Every graph dynamo
compiles is counted (``compile_count``, from ``torch._dynamo.utils.counters``); the harness
records how many compiled while it measured, and flags a launch that recompiled then.

Precisions: fp32 and bf16 on the CPU, fp16, bf16 and fp32 on CUDA. Reduced precisions
convert a copy of the weights (as ``mkl`` does), not autocast: a decode step reads every
weight, and autocast would read the fp32 weights and convert them on every step. On CUDA
the compile mode is ``reduce-overhead`` (CUDA graphs: one launch per step instead of
hundreds); the cache buffers are marked static addresses, so the graph updates them in place.

Inductor needs a C++ compiler on the CPU (it builds its kernels at run time) and Triton on
CUDA; the probe looks for them the way inductor does.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import subprocess
import sysconfig
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from backends.base import (TORCH_DTYPES, BackendError, BackendUnavailable, Probe, TorchBackend,
                           UnsupportedPrecision, isa_has_native_bf16)
from model.gpt import GPT, apply_rotary, rotary_tables, sinusoidal_embedding

DEVICE_PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp16", "bf16", "fp32")}
CXX_FIX = "apt-get install g++ (or set CXX to a working C++ compiler; inductor runs $CXX, else g++)"
CACHE_ALIGN = 64  # max_len is rounded up to a multiple of this: aligned rows, few distinct shapes
RECOMPILE_LIMIT = 64  # graphs per compiled function (dynamo's default of 8 is too few prompt shapes)
WARMUP_DECODES = 3  # under CUDA graphs the first call warms up, the second records, the third replays


# -- what inductor needs -------------------------------------------------------------------

def cpp_compiler() -> tuple[str | None, str]:
    """The C++ compiler inductor would use on the CPU and its version line, or (None, what it searched).

    Asks inductor itself (``torch._inductor.cpp_builder.get_cpp_compiler``), which tries each
    entry of ``torch._inductor.config.cpp.cxx``: ``$CXX`` or ``g++`` (and a conda download of
    gcc only when TORCH_INDUCTOR_INSTALL_GXX is set).
    """
    from torch._inductor import config
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        cxx = cpp_builder.get_cpp_compiler()
    except (InvalidCxxCompiler, OSError, subprocess.SubprocessError):
        return None, repr(config.cpp.cxx)
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    return cxx, (version.splitlines() or [""])[0]


def python_header() -> str | None:
    """Path of ``Python.h``, which inductor's CPU kernels include (their Python bindings), or None."""
    path = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    return path if os.path.exists(path) else None


def cuda_probe() -> Probe:
    """Whether the CUDA path can run: what the ``cuda`` backend needs (a CUDA build, a visible
    GPU), and Triton, inductor's GPU code generator."""
    from backends.cuda import CUDABackend

    gpu = CUDABackend.probe()
    if not gpu.available:
        return gpu
    versions = dict(gpu.versions)
    if importlib.util.find_spec("triton") is None:
        return Probe(False, reason="inductor generates its CUDA kernels with Triton, which is not installed",
                     fix="pip install triton (the version torch pins: see pip show torch)", versions=versions)
    import triton

    versions["triton"] = triton.__version__
    return Probe(True, devices=gpu.devices, versions=versions)


def compile_options(device_type: str, mode: str | None = None, freezing: bool = False,
                    max_autotune: bool = False) -> dict:
    """Keyword arguments for ``torch.compile`` of a step on ``device_type`` (``cpu`` or ``cuda``).

    CUDA: ``mode="reduce-overhead"`` (CUDA graphs) unless another mode is asked for. CPU:
    inductor's default mode; ``freezing`` folds the weights into the graph as constants, which
    lets inductor prepack them for oneDNN/MKL. torch.compile takes a mode or an options dict,
    not both, so freezing is an option only without a mode; ``max_autotune`` (with freezing)
    lets inductor benchmark its C++ GEMM template against ATen's for each linear.
    """
    if device_type not in DEVICE_PRECISIONS:
        raise ValueError(f"device type {device_type!r} is not one of: {', '.join(DEVICE_PRECISIONS)}")
    if mode is None:
        mode = "reduce-overhead" if device_type == "cuda" else "default"
    if max_autotune and not freezing:
        raise ValueError("max_autotune is offered with freezing (or pass mode='max-autotune-no-cudagraphs')")
    if freezing:
        if mode != "default":
            raise ValueError(f"freezing is an inductor option; torch.compile cannot take it with mode={mode!r}")
        options = {"freezing": True, **({"max_autotune": True} if max_autotune else {})}
        return dict(backend="inductor", options=options)
    return dict(backend="inductor", mode=mode)


def compile_count() -> int:
    """Graphs dynamo has compiled in this process so far (every recompile is one more)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _fresh(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """A contiguous copy on ``device``: a compiled step guards on strides, and a slice of a
    growing mask has a new stride every step."""
    out = torch.empty(t.shape, device=device, dtype=dtype or t.dtype)
    return out.copy_(t)


# -- the static cache ----------------------------------------------------------------------

class _Buffers:
    """One batch size's preallocated cache: keys and values per layer, the valid-position mask
    and the write position, reused by every generation of that batch size (a CUDA graph
    captures their addresses)."""

    def __init__(self, config, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, config.n_kv_head, max_len, config.head_dim)  # (B, n_kv_head, max_len, head_dim)
        # Zeros, not empty: attention multiplies masked positions by a zero weight, and 0 * NaN
        # from uninitialised memory would still be NaN.
        self.keys = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer))
        self.values = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer))
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # the next position to write
        self.owner: StaticCache | None = None
        if torch.device(device).type == "cuda":
            for t in (*self.keys, *self.values, self.valid, self.index):
                torch._dynamo.mark_static_address(t)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, self.valid, self.index))


@dataclass(eq=False)
class StaticCache:
    """What ``prefill`` and ``decode`` return: the static buffers it lives in, how many positions
    are filled, and each row's next position. Opaque to callers, as every backend's cache is.

    A batch size has one set of buffers, so a later ``prefill`` (or ``reorder_cache``) of the same
    batch size takes them over, and decoding from the older cache is refused.
    """

    buffers: _Buffers
    length: int
    next_pos: torch.Tensor  # (B, 1) the position id of each row's next token
    max_len: int = field(init=False)

    def __post_init__(self):
        self.max_len = self.buffers.valid.shape[1]
        self.buffers.owner = self


def _attend(q, k, v, allowed):
    """Attention of one query per row as plain ops for inductor to fuse, the softmax in fp32 as
    SDPA's kernels do: the ``attention="math"`` option. An experiment, kept for comparison: on
    the 2-core AVX-512 VM inductor's kernels for it made a gpt2 decode step 5x slower than
    ``scaled_dot_product_attention`` (the default, a call to ATen's flash kernel)."""
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, heads, queries, max_len)
    weights = scores.float().masked_fill(~allowed, float("-inf")).softmax(-1).to(q.dtype)
    return weights @ v  # (B, heads, queries, head_dim)


class StaticDecoder:
    """One decode step over a static cache, built from ``model``'s own submodules (its weights)
    and helpers (``rotary_tables``, ``apply_rotary``, ``sinusoidal_embedding``), for either family.

    Only the cache and the mask differ from ``model.gpt``: keys and values are written in place
    at ``index`` and attention reads the whole buffer under a mask. Grouped-query attention reads
    the ``n_kv_head`` cached heads as they are, without ``repeat_kv``'s copy of the whole cache:
    with one new token per row, the ``n_head / n_kv_head`` query heads that share a key/value head
    are laid along the query axis, (B, n_kv_head, n_rep, head_dim), and attend to that head's keys
    together under the same mask (head ``h`` reads key/value head ``h // n_rep``, as in the model).
    """

    def __init__(self, model: GPT, attention: str = "sdpa"):
        self.model = model
        self.attention = attention

    def allowed(self, valid, index):
        """Which cache positions the new token sees: the real tokens, always itself, and with a
        sliding window only the last ``window`` positions up to itself (the model's rule: key
        index > query index - window). (B, 1, 1, max_len)."""
        window = self.model.config.sliding_window
        k_idx = torch.arange(valid.shape[1], device=valid.device)  # (max_len,)
        allowed = valid | (k_idx == index)  # (B, max_len)
        if window is not None:
            allowed = allowed & (k_idx > index - window)
        return allowed.view(valid.shape[0], 1, 1, -1)

    def __call__(self, ids, pos, new_valid, index, keys, values, valid):
        """ids, pos, new_valid: (B, 1); index: (1,) the write position; keys, values: per layer
        (B, n_kv_head, max_len, head_dim), written in place; valid: (B, max_len), updated in place.
        Returns the logits (B, vocab)."""
        model, cfg = self.model, self.model.config
        B, C, H, KV, D = ids.shape[0], cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        x = model.transformer.wte(ids)  # (B, 1, C)
        rotary = None
        if cfg.pos_encoding == "learned":
            x = x + model.transformer.wpe(pos)
        elif cfg.pos_encoding == "sinusoidal":
            x = x + sinusoidal_embedding(pos, C).to(x.dtype)
        else:  # rotary: q and k turned in every block by the same tables, (B, 1, 1, head_dim)
            rotary = rotary_tables(cfg, pos, x.dtype)
        valid.index_copy_(1, index, new_valid)
        allowed = self.allowed(valid, index)  # (B, 1, 1, max_len)
        for block, k_cache, v_cache in zip(model.transformer.h, keys, values):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(attn.splits, dim=2)
            q = q.view(B, 1, H, D).transpose(1, 2)  # (B, n_head, 1, head_dim)
            k = k.view(B, 1, KV, D).transpose(1, 2)  # (B, n_kv_head, 1, head_dim)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            k_cache.index_copy_(2, index, k)
            v_cache.index_copy_(2, index, v.view(B, 1, KV, D).transpose(1, 2))
            q = q.reshape(B, KV, H // KV, D)  # (B, n_kv_head, n_rep, head_dim): a group's heads as queries
            if self.attention == "sdpa":
                y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=allowed)
            else:
                y = _attend(q, k_cache, v_cache, allowed)  # (B, n_kv_head, n_rep, head_dim)
            x = x + attn.c_proj(y.reshape(B, 1, C))  # heads in order h = kv * n_rep + r: (B, 1, C)
            x = x + block.mlp(block.ln_2(x))
        index.add_(1)
        return model.lm_head(model.transformer.ln_f(x))[:, -1, :]  # (B, vocab)


# -- the backend ---------------------------------------------------------------------------

class CompileBackend(TorchBackend):
    name = "compile"
    precisions = ("fp32", "bf16", "fp16")
    default_precision = "fp32"
    description = "torch.compile (inductor) with a static KV cache; CUDA graphs on an NVIDIA GPU"

    def __init__(self, precision: str | None = None, threads: int | None = None,
                 device: str | None = None, mode: str | None = None, freezing: bool = False,
                 max_autotune: bool = False, max_len: int | None = None, attention: str = "sdpa",
                 **options):
        super().__init__(precision, threads, device, **options)
        kind = torch.device(self.device).type
        if kind not in DEVICE_PRECISIONS:
            raise ValueError(f"device={self.device!r} is not one of: cpu, cuda, cuda:N")
        if self.precision not in DEVICE_PRECISIONS[kind]:
            raise UnsupportedPrecision(
                f"backend 'compile' on device {self.device!r} does not support precision {self.precision!r}"
                + (": fp16 needs CUDA (device='cuda')" if kind == "cpu" else "")
                + f"; on {kind} it supports {', '.join(DEVICE_PRECISIONS[kind])}")
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len={max_len} must be at least 2 (a prompt token and a new one)")
        if attention not in ("math", "sdpa"):
            raise ValueError(f"attention={attention!r} is not one of: math, sdpa")
        self.attention = attention
        self.kind = kind
        self.freezing = bool(freezing)
        self.compile_kwargs = compile_options(kind, mode, self.freezing, max_autotune)
        self.max_len_option = max_len
        self.expected: tuple[int, int, int] | None = None
        self.compiles_in_load = None
        self.model = None

    @classmethod
    def native_precisions(cls, isa: dict) -> tuple[str, ...]:
        """bf16 on the CPU (the default device) when it has AVX-512 BF16 or AMX; fp16 needs CUDA."""
        return ("bf16",) if isa_has_native_bf16(isa) else ()

    @classmethod
    def probe(cls) -> Probe:
        versions = {"torch": torch.__version__}
        try:
            dynamo = importlib.import_module("torch._dynamo")
            importlib.import_module("torch._inductor.config")
        except Exception as e:  # a torch too old or built without them
            return Probe(False, reason=f"torch {torch.__version__} cannot import torch._dynamo/inductor: "
                                       f"{type(e).__name__}: {e}",
                         fix="pip install 'torch==2.8.*'", versions=versions)
        if not dynamo.is_dynamo_supported():
            return Probe(False, reason=f"torch.compile does not support this Python/platform "
                                       f"(torch {torch.__version__})",
                         fix="use a Python version torch.compile supports (3.9-3.13 for torch 2.8)",
                         versions=versions)
        cxx, version = cpp_compiler()
        if cxx is None:
            return Probe(False, reason=f"inductor builds its CPU kernels with a C++ compiler at run time and "
                                       f"found none (it tried torch._inductor.config.cpp.cxx = {version})",
                         fix=CXX_FIX, versions=versions)
        versions["cxx"] = f"{cxx}: {version}"
        if python_header() is None:
            return Probe(False, reason=f"inductor's CPU kernels include Python.h, which is missing from "
                                       f"{sysconfig.get_paths()['include']}",
                         fix="install this Python's development headers (apt-get install python3-dev)",
                         versions=versions)
        devices = ["cpu"]
        gpu = cuda_probe()
        if gpu.available:
            devices += gpu.devices
            versions.update(gpu.versions)
        return Probe(True, devices=tuple(devices), versions=versions)

    # -- loading ---------------------------------------------------------------------------
    def expect(self, batch: int, prompt_len: int, gen_len: int) -> None:
        """Compile for these shapes inside ``load`` and size the cache for ``prompt_len + gen_len``."""
        self.expected = (batch, prompt_len, gen_len)

    def prepare_training(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """Training compiles the module's whole forward; AOTAutograd derives the backward from it.
        The static cache is a decoding device and plays no part. Freezing folds weights into
        constants, which training must not do, so it is refused here."""
        if self.freezing:
            raise BackendError("backend 'compile': freezing=True makes the weights constants; it cannot train")
        model, optimizer = super().prepare_training(model, optimizer)
        self.model = torch.compile(model, **self.compile_kwargs)
        return self.model, optimizer

    def load(self, model: torch.nn.Module) -> None:
        probe = cuda_probe() if self.kind == "cuda" else self.probe()
        if not probe.available:
            raise BackendUnavailable(f"backend 'compile' on {self.kind}: {probe.reason}; fix: {probe.fix}")
        if self.kind == "cuda":
            torch.cuda.set_device(torch.device(self.device))
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # inductor's kernels take the count at compile time
        # One graph per prompt shape (see the module docstring): allow a quality run's or a test
        # session's few dozen, and past that raise, where dynamo would quietly run eagerly.
        config = importlib.import_module("torch._dynamo").config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        config.fail_on_recompile_limit_hit = True
        before = compile_count()
        self.model = self.prepare(model.eval())
        self.block_size = self.model.config.block_size
        self.max_len = self._max_len()
        self._pool: dict[int, _Buffers] = {}
        self._compiled_forward = torch.compile(self.model, fullgraph=True, dynamic=False, **self.compile_kwargs)
        self._compiled_step = torch.compile(StaticDecoder(self.model, self.attention), fullgraph=True, dynamic=False,
                                   **self.compile_kwargs)
        if self.expected is not None:
            self._warm_up(*self.expected)
        self.synchronize()
        self.compiles_in_load = compile_count() - before
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        dtype = TORCH_DTYPES[self.precision]
        if self.kind == "cpu" and dtype == torch.float32:
            return model  # the caller's module itself: its weights, no copy
        # A copy: the caller's fp32 CPU model may also be the parity reference. The tie of the
        # LM head to the embedding survives deepcopy and .to.
        return copy.deepcopy(model).to(device=self.device, dtype=dtype).eval()

    def _max_len(self) -> int:
        """Positions the static cache holds: the option, else what the harness expects, else the context."""
        if self.max_len_option is not None:
            wanted = self.max_len_option
        elif self.expected is not None:
            wanted = _round_up(self.expected[1] + self.expected[2], CACHE_ALIGN)
        else:
            wanted = self.block_size
        return min(wanted, self.block_size)

    def _warm_up(self, batch: int, prompt_len: int, gen_len: int) -> None:
        """Compile the shapes the harness will run: a prefill, then decode steps (the unpadded path)."""
        ids = torch.zeros(batch, prompt_len, dtype=torch.long)
        _, cache = self.prefill(ids)
        for _ in range(min(WARMUP_DECODES, self.max_len - prompt_len)):
            _, cache = self.decode(ids[:, :1], cache)

    # -- the verbs -------------------------------------------------------------------------
    def _check_loaded(self):
        if self.model is None:
            raise BackendError("backend 'compile': call load() before prefill/decode")

    def _buffers(self, batch: int) -> _Buffers:
        if batch not in self._pool:
            self._pool[batch] = _Buffers(self.model.config, batch, self.max_len,
                                         next(self.model.parameters()).dtype, self.device)
        return self._pool[batch]

    def _mark_step(self):
        if self.kind == "cuda" and "reduce-overhead" in str(self.compile_kwargs.get("mode")):
            torch.compiler.cudagraph_mark_step_begin()  # earlier outputs are consumed: reuse their memory

    def prefill(self, ids, pos=None, mask=None):
        self._check_loaded()
        B, T = ids.shape
        if T >= self.max_len:
            raise BackendError(f"backend 'compile': a prompt of {T} tokens leaves no room in the static "
                               f"cache of max_len={self.max_len} positions; pass a larger max_len")
        dev = self.device
        self._mark_step()
        with torch.inference_mode():
            logits, present = self._compiled_forward(
                ids.to(dev), None if pos is None else pos.to(dev), None,
                None if mask is None else mask.to(dev), last_only=True)
            buffers = self._buffers(B)
            for (k, v), k_cache, v_cache in zip(present, buffers.keys, buffers.values):
                k_cache[:, :, :T].copy_(k)
                v_cache[:, :, :T].copy_(v)
            buffers.valid.zero_()
            buffers.valid[:, :T] = True if mask is None else mask.to(dev, torch.bool)
            buffers.index.fill_(T)
            next_pos = (torch.full((B, 1), T, dtype=torch.long, device=dev) if pos is None
                        else _fresh(pos[:, -1:] + 1, dev, torch.long))
            logits = logits[:, -1, :].float().cpu()
        return logits, StaticCache(buffers, T, next_pos)

    def decode(self, ids, cache, pos=None, mask=None):
        self._check_loaded()
        if not isinstance(cache, StaticCache):
            raise BackendError(f"backend 'compile' decodes only from its own cache, not {type(cache).__name__}")
        if cache.buffers.owner is not cache:
            raise BackendError("backend 'compile': this cache's static buffers were taken over by a later "
                               "prefill or reorder_cache of the same batch size; decode from that newer cache")
        if cache.length >= cache.max_len:
            raise BackendError(f"backend 'compile': the static cache is full (max_len={cache.max_len} "
                               f"positions); pass a larger max_len")
        B, dev = ids.shape[0], self.device
        if mask is not None and mask.shape[1] != cache.length + 1:
            raise BackendError(f"backend 'compile': mask covers {mask.shape[1]} positions, the cache "
                               f"{cache.length} plus the new token")
        buffers = cache.buffers
        self._mark_step()
        # Every input made inside inference mode: dynamo guards on it (an inference tensor lacks
        # the ADInplaceOrView key), and the prefill's positions are made there too.
        with torch.inference_mode():
            pos = cache.next_pos if pos is None else _fresh(pos, dev, torch.long)
            new_valid = (torch.ones(B, 1, dtype=torch.bool, device=dev) if mask is None
                         else _fresh(mask[:, -1:], dev, torch.bool))
            logits = self._compiled_step(_fresh(ids, dev, torch.long), pos, new_valid, buffers.index,
                                buffers.keys, buffers.values, buffers.valid)
            logits = logits.float().cpu()
            cache = StaticCache(buffers, cache.length + 1, pos + 1)
        return logits, cache

    def _forward(self, ids, pos, mask, cache):
        return self.prefill(ids, pos, mask) if cache is None else self.decode(ids, cache, pos, mask)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """All positions through the compiled forward (a graph of its own: ``last_only=False``)."""
        self._check_loaded()
        self._mark_step()
        with torch.inference_mode():
            logits, _ = self._compiled_forward(ids.to(self.device))
            return logits.float().cpu()

    def cache_length(self, cache) -> int:
        return cache.length

    def cache_bytes(self, cache) -> int:
        """The whole static allocation: it is held for max_len positions whatever the length."""
        return cache.buffers.nbytes()

    def reorder_cache(self, cache, index: torch.Tensor):
        """The rows ``index`` of the cache, in the static buffers of the new batch size."""
        if cache.buffers.owner is not cache:
            raise BackendError("backend 'compile': cannot reorder a cache whose buffers a later prefill took over")
        index = index.to(self.device)
        src, dst = cache.buffers, self._buffers(index.numel())
        with torch.inference_mode():
            # index_select first: the destination may be the source's own buffers.
            for a, b in zip((*src.keys, *src.values, src.valid), (*dst.keys, *dst.values, dst.valid)):
                b.copy_(a.index_select(0, index))
            dst.index.copy_(src.index)
            next_pos = cache.next_pos.index_select(0, index)
        return StaticCache(dst, cache.length, next_pos)

    def compile_count(self) -> int | None:
        return compile_count()

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)

    def memory(self) -> dict[str, int] | None:
        if self.kind != "cuda":
            return None
        return {"allocated": torch.cuda.memory_allocated(self.device),
                "peak": torch.cuda.max_memory_allocated(self.device)}

    def info(self) -> dict:
        from torch._dynamo.utils import counters

        info = dict(super().info(), intra_op_threads=torch.get_num_threads(),
                    compile_mode=self.compile_kwargs.get("mode", "default"),
                    compile_options=self.compile_kwargs.get("options", {}),
                    decode_dynamic=False, prefill_dynamic=False, decode_attention=self.attention,
                    weights_dtype=str(TORCH_DTYPES[self.precision]).replace("torch.", ""), autocast=False,
                    cuda_graphs=self.kind == "cuda" and self.compile_kwargs.get("mode") == "reduce-overhead",
                    static_cache_max_len=getattr(self, "max_len", None),
                    expected_shapes=self.expected, compiles_in_load=self.compiles_in_load,
                    compiles_total=compile_count(),
                    fx_graph_cache_hits=int(counters["inductor"]["fxgraph_cache_hit"]),
                    fx_graph_cache_misses=int(counters["inductor"]["fxgraph_cache_miss"]))
        if self.kind == "cpu":
            info["cxx"] = cpp_compiler()[1]
        return info

    def close(self) -> None:
        self.model = self._compiled_forward = self._compiled_step = None
        self._pool = {}
        if self.kind == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
