"""`llamacpp`: a peer, llama.cpp itself (through llama-cpp-python's low-level API) on a GGUF of our weights.

The model is written as a GGUF (``model.gguf.save_gguf``: llama.cpp's ``gpt2``, ``llama`` or ``qwen2``
architecture, whichever computes its config) and cached by the model's fingerprint, the file type
and the converter's source. Precisions are llama.cpp's own file types:

    precision   GGUF (engine_precision)      made by
    fp32        f32                          gguf-py (our writer)
    bf16        bf16 (1-D tensors f32)       gguf-py
    fp16        f16 (1-D tensors f32)        gguf-py
    int8        q8_0                         llama.cpp's quantiser (llama_model_quantize) on the f32 file
    int4        q4_0, or q4_K_M (quant=...)  llama.cpp's quantiser on the f32 file

llama.cpp picks some tensors' types itself when it quantises (an output matrix, fallbacks where a
width does not divide 256 for the K-quants): ``info()["tensor_types"]`` counts what the file holds.
A model that came from a GGUF file (``model.gguf.load_gguf``, a ``.gguf`` model entry) and is run
at that file's own type, its weights unchanged, runs the file itself, unconverted (``info()["source"]``
says which; ``gguf_path`` is the file run). llama.cpp's q8_0/q4_0 kernels quantise the activations
to 8 bits as well (ggml's vec_dot_type): that is part of what its int8 and int4 are.

Running: prefill and decode are ``llama_decode`` on one ``llama_batch``; each row of a batch is its
own sequence (seq_id = row, its own positions; ``n_seq_max`` = the batch); the logits are read with
``llama_get_logits_ith``. Left padding works: the tokens a mask hides are never given to llama.cpp,
and each row's real tokens are at positions 0, 1, ... (what ``model.generate`` passes), so a padded
row computes what it would alone. ``logits(ids)`` is one decode with every position's logits.
Beam search reorders rows through llama.cpp's per-sequence state (``llama_state_seq_get_data`` and
``set_data``); where it needs more rows than the context has sequences, a larger context is made
and the rows' tokens decoded again. The cache is inside the context: the cache object is a handle,
and only the latest one is valid (as optimum-openvino's).

The context (llama.cpp allocates every sequence's keys and values up front) holds what ``expect()``
said (prompt + generation, rounded up to 256), or 4096 tokens without it, within block_size; a
fresh sequence longer than that makes it anew, longer; the ``n_ctx`` option fixes it instead. A
Mistral window caps it, since llama.cpp's ``llama`` has none (within it, full attention is the
window's answer). llama.cpp rounds its context up to 256; the limit is kept exactly here.

llama.cpp's extra weight buffers (``use_extra_bufts``: its AMX and CPU_REPACK layouts) are on
unless this build's AMX kernels crash here, which a child process checks once per machine
(``extra_buffers_setting``; option ``extra_buffers``): with llama-cpp-python 0.3.36 built with
GGML_NATIVE on a Xeon with AMX, ggml's AMX matmul dies in ``ldtilecfg`` on any multi-token batch.

The KV cache type follows the precision (f32 for fp32, int8 and int4, as our backends keep theirs;
bf16 and f16 for those) and flash attention is off, unless the ``kv_cache_type`` and
``flash_attn`` options say otherwise: llama.cpp's own defaults (f16 cache, flash attention
"auto", which is on for the CPU) change fp32 logits by about 1e-2 (8e-3 measured on the lively
test models with flash attention alone, which rounds to f16 inside). Threads are llama.cpp's
``n_threads`` and ``n_threads_batch``, read back from the context.

Known difference at fp32: llama.cpp's CPU GELU reads a table of fp16 values (ggml's
GGML_GELU_FP16), so a GPT-2-family model's fp32 logits differ from eager's by about 2e-3 on the
lively test model (over the project's 1e-3). The Llama family has no GELU and agrees to about 1e-5.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from backends import export
from backends.base import (Backend, BackendError, BackendUnavailable, Probe, isa_has_native_bf16,
                           model_fingerprint)

INSTALL_HINT = "make install, or scripts/install-llamacpp .venv (builds llama-cpp-python 0.3.36 for this CPU, about 4 min)"
GGUF_INSTALL_HINT = "pip install gguf"
GGUF_TYPE = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "q8_0", "int4": "q4_0"}
INT4_QUANTS = ("q4_0", "q4_K_M")
KV_TYPES = ("f32", "f16", "bf16", "q8_0")
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 values in 34 bytes
DEFAULT_KV = {"f32": "f32", "bf16": "bf16", "f16": "f16", "q8_0": "f32", "q4_0": "f32", "q4_K_M": "f32"}
FLASH_ATTN = {"off": 0, "on": 1, "auto": -1}
EXTRA_BUFFERS = ("auto", "on", "off")
CTX_DEFAULT = 4096  # context per sequence unless expect() asks for more (up to block_size)
CTX_ROUND = 256


@dataclass(frozen=True)
class LlamaCppHandle:
    """The KV cache inside the llama.cpp context, as a handle: ``length`` columns as the caller
    sees them (padding included), ``real`` tokens per row in llama.cpp, and the step that made it."""

    length: int
    batch: int
    step: int
    real: tuple[int, ...]


def _ggml_type(name: str) -> int:
    """ggml's type id of ``name`` (gguf-py's table: llama-cpp-python's lacks bf16)."""
    from gguf import GGMLQuantizationType
    return int(GGMLQuantizationType[name.upper()])


class LlamaCppBackend(Backend):
    name = "llamacpp"
    precisions = ("fp32", "bf16", "fp16", "int8", "int4")
    default_precision = "fp32"
    peer = True
    peer_of = None
    description = "peer: llama.cpp (llama-cpp-python's low-level API) on a GGUF; int8/int4 its q8_0/q4_0 (q4_K_M)"
    precision_options = {"int4": ("quant",)}  # a sweep's quant=q4_K_M applies to its int4 cells only

    def __init__(self, precision=None, threads=None, device=None, quant: str | None = None,
                 kv_cache_type: str | None = None, flash_attn: str = "off", n_ctx: int | None = None,
                 extra_buffers: str = "auto", **options):
        super().__init__(precision, threads, device, **options)
        if options:
            raise ValueError(f"unknown llamacpp options: {', '.join(sorted(options))}")
        if self.device != "cpu":
            raise BackendUnavailable(f"llamacpp backend: device {self.device!r} is not supported; it runs on the CPU")
        if quant is not None:
            if self.precision != "int4":
                raise ValueError(f"llamacpp option quant={quant!r} applies to precision int4 only, "
                                 f"not {self.precision}")
            if quant not in INT4_QUANTS:
                raise ValueError(f"llamacpp option quant={quant!r} is not one of {', '.join(INT4_QUANTS)}")
        self.gguf_type = quant or GGUF_TYPE[self.precision]
        if kv_cache_type is not None and kv_cache_type not in KV_TYPES:
            raise ValueError(f"llamacpp option kv_cache_type={kv_cache_type!r} is not one of {', '.join(KV_TYPES)}")
        self.kv_cache_type = kv_cache_type or DEFAULT_KV[self.gguf_type]
        if flash_attn not in FLASH_ATTN:
            raise ValueError(f"llamacpp option flash_attn={flash_attn!r} is not one of {', '.join(FLASH_ATTN)}")
        self.flash_attn = flash_attn
        if extra_buffers not in EXTRA_BUFFERS:
            raise ValueError(f"llamacpp option extra_buffers={extra_buffers!r} is not one of {', '.join(EXTRA_BUFFERS)}")
        self.extra_buffers = extra_buffers
        self._extra: dict = {}
        if n_ctx is not None and (not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1):
            raise ValueError(f"llamacpp option n_ctx={n_ctx!r} must be a positive integer")
        self.n_ctx_option = n_ctx
        self._expected: tuple[int, int, int] | None = None
        self._model = None  # llama_model *
        self._ctx = None  # llama_context *
        self._batch = None
        self._batch_cap = 0
        self._limit = 0
        self._longest = 0  # the longest sequence a call has started: the context grows to hold it
        self._n_seq = 0
        self._step = 0
        self._history: list[list[int]] = []  # each row's real tokens in llama.cpp (for reorder_cache)
        self._meta: dict = {}
        self._ctx_info: dict = {}
        self.config = None

    @classmethod
    def native_precisions(cls, isa: dict) -> tuple[str, ...]:
        return ("bf16",) if isa_has_native_bf16(isa) else ()

    @classmethod
    def probe(cls) -> Probe:
        try:
            import llama_cpp
        except ImportError as e:
            return Probe(False, reason=f"cannot import {e.name or e}", fix=INSTALL_HINT)
        except Exception as e:  # the shared library failed to load
            return Probe(False, reason=f"llama_cpp does not import: {type(e).__name__}: {e}", fix=INSTALL_HINT)
        try:
            import gguf  # noqa: F401
        except ImportError as e:
            return Probe(False, reason=f"cannot import {e.name or e}", fix=GGUF_INSTALL_HINT)
        from importlib.metadata import PackageNotFoundError, version
        try:
            gguf_version = version("gguf")
        except PackageNotFoundError:
            gguf_version = "unknown"
        system = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        return Probe(True, devices=("cpu",), versions={"llama-cpp-python": llama_cpp.__version__, "gguf": gguf_version,
                                                       "llama.cpp system": system})

    def expect(self, batch: int, prompt_len: int, gen_len: int) -> None:
        self._expected = (batch, prompt_len, gen_len)

    # -- load ------------------------------------------------------------------------------
    def load(self, model: torch.nn.Module) -> None:
        import llama_cpp

        from model.gguf import quiet_llama_cpp
        from model.gpt import GPT
        if not isinstance(model, GPT):
            raise BackendError(f"llamacpp backend runs a GPT model (converted to GGUF), not {type(model).__name__}")
        self.close()  # a second load replaces the first
        quiet_llama_cpp()
        llama_cpp.llama_backend_init()
        self.config = model.config
        path, meta = self._gguf_file(model)
        self._extra = extra_buffers_setting(self.extra_buffers)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = self._extra["on"]
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            self._model = None
            raise BackendError(f"llama.cpp could not load {path} (llama_model_load_from_file returned NULL)")
        vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        if vocab != model.config.vocab_size:
            self.close()
            raise BackendError(f"llama.cpp reads {vocab} tokens from {path}, the model has {model.config.vocab_size}")
        self._vocab = vocab
        self._meta = meta
        batch = self._expected[0] if self._expected else 1
        self._new_context(batch)

    def _gguf_file(self, model) -> tuple[Path, dict]:
        """The GGUF to run: the model's own file where it came from one of this type and is
        unchanged since, else the cached conversion."""
        from importlib.metadata import version

        import llama_cpp
        source = getattr(model, "gguf_source", None)
        if source and source.get("file_type") == self.gguf_type and Path(source["path"]).is_file() \
                and model_fingerprint(model) == source.get("fingerprint"):
            path = Path(source["path"])
            from model.gguf import tensor_types
            return path, dict(gguf_path=str(path), source="the model's own GGUF file, not converted",
                              export_s=0.0, export_cache_hit=True, tensor_types=tensor_types(path),
                              architecture=source.get("architecture"), tokenizer=source.get("tokenizer"),
                              weight_bytes=_tensor_bytes(path))
        from model.gguf import GGUFError, gguf_architecture, save_gguf
        try:
            gguf_architecture(model.config)
        except GGUFError as e:
            raise BackendError(f"llamacpp backend cannot run this model: {e}") from None
        fingerprint = model_fingerprint(model)
        parts = dict(fingerprint=fingerprint, config=model.config.to_dict(), gguf_type=self.gguf_type,
                     llama_cpp_python=llama_cpp.__version__, gguf=version("gguf"),
                     source=export.source_digest("model.gguf", __name__))
        key = export.cache_key("llamacpp", **parts)

        def build(tmp: Path) -> dict:
            written = save_gguf(model, tmp / "model.gguf", self.gguf_type, threads=self.threads)
            return dict(parts, key=key, **written, weight_bytes=_tensor_bytes(tmp / "model.gguf"))

        entry, meta, hit = export.cached("llamacpp", key, build)
        path = entry / "model.gguf"
        return path, dict(gguf_path=str(path), source="converted (model.gguf.save_gguf)",
                          export_s=0.0 if hit else meta["build_s"], export_cache_hit=hit,
                          tensor_types=meta["tensor_types"], architecture=meta["architecture"],
                          tokenizer=meta["tokenizer"], weight_bytes=meta["weight_bytes"])

    def _cap(self) -> int:
        """The most tokens a sequence may hold: block_size, or a Mistral window (llama.cpp's llama has none)."""
        cap = self.config.block_size
        if self.config.sliding_window is not None:
            cap = min(cap, self.config.sliding_window)
        return cap

    def _context_per_seq(self) -> int:
        """Tokens each sequence may hold (llama.cpp allocates their keys and values up front): the
        n_ctx option; else what expect() said (prompt + generation), or CTX_DEFAULT without it, or
        a longer prompt seen since; rounded up to 256 and within ``_cap``. llama.cpp rounds its
        context up to a multiple of 256 itself; this limit is kept exactly by ``_forward``."""
        cap = self._cap()
        if self.n_ctx_option is not None:
            if self.n_ctx_option > cap:
                raise BackendError(f"llamacpp n_ctx={self.n_ctx_option} exceeds what the model allows ({cap}: "
                                   f"block_size" + (" and sliding_window)" if cap != self.config.block_size else ")"))
            return self.n_ctx_option
        need = self._expected[1] + self._expected[2] if self._expected else CTX_DEFAULT
        need = max(need, self._longest)
        return min(cap, -(-need // CTX_ROUND) * CTX_ROUND)

    def _new_context(self, n_seq: int) -> None:
        import llama_cpp
        self._free_context()
        per_seq = self._context_per_seq()
        self._limit = per_seq
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = -(-per_seq // CTX_ROUND) * CTX_ROUND * n_seq  # what llama.cpp would round it to
        p.n_batch = p.n_ctx  # a whole batch of prompts (or logits()) in one llama_decode
        p.n_ubatch = min(512, p.n_ctx)
        p.n_seq_max = n_seq
        p.n_outputs_max_per_seq = 0  # every position's logits may be asked for (logits())
        if self.threads is not None:
            p.n_threads = p.n_threads_batch = self.threads
        p.type_k = p.type_v = _ggml_type(self.kv_cache_type)
        p.flash_attn_type = FLASH_ATTN[self.flash_attn]
        p.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model, p)
        if not ctx:
            raise BackendError(f"llama.cpp could not create a context (n_ctx={p.n_ctx}, n_seq_max={n_seq}, "
                               f"kv_cache_type={self.kv_cache_type}, flash_attn={self.flash_attn})")
        self._ctx = ctx
        self._n_seq = n_seq
        self._batch_cap = p.n_batch
        self._batch = llama_cpp.llama_batch_init(p.n_batch, 0, 1)
        self._step += 1
        self._ctx_info = dict(context_per_sequence=per_seq, n_ctx=llama_cpp.llama_n_ctx(ctx),
                              n_ctx_seq=llama_cpp.llama_n_ctx_seq(ctx),
                              n_seq_max=llama_cpp.llama_n_seq_max(ctx), n_batch=llama_cpp.llama_n_batch(ctx),
                              n_ubatch=llama_cpp.llama_n_ubatch(ctx),
                              llama_threads=llama_cpp.llama_n_threads(ctx),
                              llama_threads_batch=llama_cpp.llama_n_threads_batch(ctx))

    def _free_context(self) -> None:
        import llama_cpp
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    # -- run -------------------------------------------------------------------------------
    def _check_loaded(self, verb: str) -> None:
        if self._ctx is None:
            raise BackendError(f"backend {self.name!r}: call load() before {verb}")

    def _check_current(self, cache) -> None:
        if not isinstance(cache, LlamaCppHandle) or cache.step != self._step:
            raise BackendError("llamacpp keeps its KV cache inside the llama.cpp context: only the cache "
                               "returned by the latest prefill/decode can be continued, not an older one")

    def _start(self, batch: int, tokens: int) -> None:
        """A fresh state for ``batch`` sequences starting with up to ``tokens`` tokens: the context
        made anew if it holds fewer sequences or shorter ones (up to ``_cap``, unless the n_ctx
        option fixes it), the memory cleared."""
        import llama_cpp
        longer = tokens > self._limit and self.n_ctx_option is None and self._limit < self._cap()
        if longer:
            self._longest = tokens
        if batch > self._n_seq or longer:
            self._new_context(max(batch, self._n_seq))
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._step += 1

    def _decode(self, rows: list[list[tuple[int, int, bool]]]) -> None:
        """One llama_decode of (token, position, wants logits) per row; row b is sequence b."""
        import llama_cpp
        n = sum(len(r) for r in rows)
        if n > self._batch_cap:
            raise BackendError(f"llamacpp: {n} tokens in one call exceed the batch of {self._batch_cap} "
                               f"(n_ctx {self._ctx_info['n_ctx']})")
        b = self._batch
        i = 0
        for seq, row in enumerate(rows):
            for tok, pos, out in row:
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = out
                i += 1
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            self._step += 1  # the state is no longer what any handle says
            if rc == 1:
                raise BackendError(self._full())
            raise BackendError(f"llama_decode failed (returned {rc})")

    def _full(self) -> str:
        window = self.config.sliding_window
        why = (f"; sliding_window={window} caps it, as llama.cpp's {self._meta.get('architecture')} has no window"
               if window is not None and self._limit == window else "")
        return (f"llamacpp: the context is full ({self._limit} tokens per sequence; the n_ctx option sets it, "
                f"up to block_size={self.config.block_size}{why})")

    def _read_logits(self, outputs: list[int]) -> torch.Tensor:
        """The logits of the batch's tokens at ``outputs`` (their indices in the batch), copied
        out of llama.cpp's buffer: (len(outputs), vocab) float32."""
        import llama_cpp
        out = torch.empty(len(outputs), self._vocab, dtype=torch.float32)
        row_bytes = self._vocab * 4
        for j, i in enumerate(outputs):
            ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
            if not ptr:
                raise BackendError(f"llama.cpp returned no logits for the batch's token {i}")
            ctypes.memmove(out.data_ptr() + j * row_bytes, ptr, row_bytes)
        return out

    def _forward(self, ids, pos, mask, cache):
        self._check_loaded("prefill/decode")
        B, T = ids.shape
        if cache is None:
            past, real = 0, [0] * B
        else:
            self._check_current(cache)
            if cache.batch != B:
                raise ValueError(f"ids has batch {B} but the cache holds {cache.batch} sequences")
            past, real = cache.length, list(cache.real)
        if mask is not None and tuple(mask.shape) != (B, past + T):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(B, past + T)} (batch, past + new tokens)")
        tokens = ids.tolist()
        if mask is None and pos is None:  # no padding: every token, at the positions that follow
            rows = [[(tok, real[b] + t, t == T - 1) for t, tok in enumerate(tokens[b])] for b in range(B)]
        else:
            rows = self._real_tokens(tokens, real, None if mask is None else mask[:, past:].bool().tolist(),
                                     None if pos is None else pos.tolist())
        if cache is None:
            self._start(B, max(len(row) for row in rows))
            self._history = [[] for _ in range(B)]
        for b, row in enumerate(rows):
            if real[b] + len(row) > self._limit:
                self._step += 1  # a started state that holds nothing of this call
                raise BackendError(self._full())
        self._decode(rows)
        outputs, n = [], 0
        for b, row in enumerate(rows):
            self._history[b].extend(x[0] for x in row)
            n += len(row)
            outputs.append(n - 1)
            real[b] += len(row)
        logits = self._read_logits(outputs)
        self._step += 1
        return logits, LlamaCppHandle(past + T, B, self._step, tuple(real))

    @staticmethod
    def _real_tokens(tokens, real, keep, wanted) -> list[list[tuple[int, int, bool]]]:
        """Each row's (token, position, wants logits) for llama.cpp: the tokens the mask keeps
        (padding is never given to it), at the row's next positions, which ``pos`` must agree with."""
        rows = []
        for b, row_tokens in enumerate(tokens):
            row = []
            for t, tok in enumerate(row_tokens):
                if keep is not None and not keep[b][t]:
                    continue  # padding: never given to llama.cpp
                p = real[b] + len(row)
                if wanted is not None and wanted[b][t] != p:
                    raise BackendError(f"llamacpp: row {b}'s token {t} is at position {wanted[b][t]}, but llama.cpp "
                                       f"places each row's real tokens at 0, 1, ... (this one at {p}); positions "
                                       f"that skip or repeat are not supported")
                row.append((tok, p, False))
            if not row:
                raise BackendError(f"llamacpp: row {b} has no real token in this call (the mask hides them all)")
            row[-1] = (row[-1][0], row[-1][1], True)
            rows.append(row)
        return rows

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits from one llama_decode (each row its own sequence, from position 0)."""
        import llama_cpp
        self._check_loaded("logits")
        B, T = ids.shape
        self._start(B, T)
        if T > self._limit:
            raise BackendError(self._full())
        tokens = ids.tolist()
        self._decode([[(tokens[b][t], t, True) for t in range(T)] for b in range(B)])
        ptr = llama_cpp.llama_get_logits(self._ctx)
        out = torch.empty(B, T, self._vocab, dtype=torch.float32)
        ctypes.memmove(out.data_ptr(), ptr, out.numel() * 4)  # outputs in batch order: row by row
        self._step += 1  # the state now holds these rows: earlier handles are stale
        return out

    def reorder_cache(self, cache: LlamaCppHandle, index: torch.Tensor) -> LlamaCppHandle:
        """Beam search: row i of the next step continues row ``index[i]``, through each sequence's
        state saved and restored by llama.cpp (``llama_state_seq_get_data``/``set_data``)."""
        import llama_cpp
        self._check_current(cache)
        idx = [int(i) for i in index.tolist()]
        if len(idx) > self._n_seq:
            # More rows than the context has sequences (the first step of a beam search): a larger
            # context (its KV cache is split into another number of streams, so the states do not
            # carry over), and each new row's tokens decoded again into it.
            history = [self._history[i] for i in idx]
            self._new_context(len(idx))
            self._decode([[(tok, p, False) for p, tok in enumerate(h)] for h in history])
            self._history = history
        else:
            states = {}
            for src in sorted(set(idx)):
                size = llama_cpp.llama_state_seq_get_size(self._ctx, src)
                buf = (ctypes.c_uint8 * size)()
                if llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, src) != size:
                    raise BackendError(f"llama.cpp could not save sequence {src}'s state")
                states[src] = buf
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
            for dst, src in enumerate(idx):
                buf = states[src]
                if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(buf), dst) != len(buf):
                    self._step += 1
                    raise BackendError(f"llama.cpp could not restore sequence {src}'s state into row {dst}")
            self._history = [list(self._history[i]) for i in idx]
        self._step += 1
        return LlamaCppHandle(cache.length, len(idx), self._step, tuple(cache.real[i] for i in idx))

    def cache_length(self, cache: LlamaCppHandle) -> int:
        return cache.length

    def cache_bytes(self, cache: LlamaCppHandle) -> int:
        """Keys and values of the real tokens at the cache's type (llama.cpp allocates the whole
        context up front; this counts what the sequences hold)."""
        self._check_current(cache)
        per_token = 2 * self.config.n_layer * self.config.kv_dim
        return int(sum(cache.real) * per_token * KV_BYTES[self.kv_cache_type])

    def weight_bytes(self) -> int | None:
        return self._meta.get("weight_bytes")

    def info(self) -> dict:
        info = dict(super().info(), engine_precision=self.gguf_type, kv_cache_type=self.kv_cache_type,
                    flash_attn=self.flash_attn, **self._meta, **self._ctx_info)
        if self._extra:
            info["extra_buffers"] = self._extra["why"]
        try:
            import llama_cpp
            info["llama_cpp_python"] = llama_cpp.__version__
        except ImportError:
            pass
        if self._ctx_info:
            info["threads"] = self._ctx_info["llama_threads"]  # what llama.cpp runs with (its default if unset)
            info["threads_requested"] = self.threads
        if self.config is not None and self.config.sliding_window is not None:
            info["sliding_window"] = (f"{self.config.sliding_window}: llama.cpp's {info.get('architecture')} has no "
                                      f"window, so the context is capped at it (full attention agrees there)")
        return info

    def close(self) -> None:
        import llama_cpp
        self._free_context()
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _tensor_bytes(path: Path) -> int:
    """Bytes of a GGUF's tensor data, as stored."""
    from gguf import GGUFReader
    return int(sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors))


def extra_buffers_setting(asked: str = "auto") -> dict:
    """Whether llama.cpp may put weights in its extra buffer types (``use_extra_bufts``: ggml's AMX
    and CPU_REPACK layouts for quantised matrices), and why: {"on": bool, "why": str}.

    "auto" turns them on unless this build's kernels crash here: ggml's AMX matmul has been seen
    to die in ``ldtilecfg`` (a general protection fault; llama.cpp issue #20824, PR #26954: the
    tile config kept on the stack) on a multi-token batch of q8_0/q4_0 weights. That is checked
    once per machine and build in a child process (``extra_buffers_check``), and remembered in
    the cache directory."""
    if asked == "on":
        return dict(on=True, why="on (asked)")
    if asked == "off":
        return dict(on=False, why="off (asked)")
    verdict = _extra_buffers_verdict()
    if verdict["ok"]:
        return dict(on=True, why=f"on ({verdict['why']})")
    return dict(on=False, why=f"off: {verdict['why']}")


_VERDICT: dict | None = None


def _extra_buffers_verdict() -> dict:
    global _VERDICT
    if _VERDICT is not None:
        return _VERDICT
    import hashlib
    import sys

    import llama_cpp

    from backends.base import cache_dir
    system = llama_cpp.llama_print_system_info().decode(errors="replace")
    # the libraries llama-cpp-python loaded: its own, or those LLAMA_CPP_LIB_PATH points it at
    lib = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    stamp = [str(lib.resolve())] + [(p.name, p.stat().st_size, int(p.stat().st_mtime))
                                    for p in sorted(lib.glob("libggml-cpu*.so*"))]
    key = hashlib.sha256(json.dumps([llama_cpp.__version__, system, stamp]).encode()).hexdigest()[:16]
    record = cache_dir() / "llamacpp-extra-buffers" / f"{key}.json"
    if record.is_file():
        _VERDICT = json.loads(record.read_text())
        return _VERDICT
    if "AMX_INT8 = 1" not in system:
        _VERDICT = dict(ok=True, why="no AMX in this build")
    else:
        cmd = [sys.executable, "-m", "backends.llamacpp", "--check-extra-buffers"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                  cwd=str(Path(__file__).resolve().parents[1]))
            ok = done.returncode == 0
            how = "signal %d" % -done.returncode if done.returncode < 0 else f"exit code {done.returncode}"
            tail = (done.stderr.strip().splitlines() or [""])[-1][:200]
        except subprocess.TimeoutExpired:
            ok, how, tail = False, "no answer in 300 s", ""
        _VERDICT = dict(ok=ok, why="this build's AMX kernels ran a q8_0/q4_0 batch in a child process" if ok else
                        f"this build's AMX kernels crashed on a q8_0/q4_0 batch in a child process ({how}"
                        + (f": {tail}" if tail and done.returncode > 0 else "") + "; llama.cpp issue #20824)")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(_VERDICT))
    return _VERDICT


def extra_buffers_check() -> None:
    """The child side: q8_0 and q4_0 files of a small model, a 32-token batch on 2 threads with
    the extra buffers on. A crash kills this process, which is the answer."""
    import tempfile

    import llama_cpp

    from model.gguf import quiet_llama_cpp, save_gguf
    from model.gpt import build_model, get_config
    quiet_llama_cpp()
    llama_cpp.llama_backend_init()
    model = build_model(get_config("llama-tiny", n_embd=256, intermediate_size=512), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        for ftype in ("q8_0", "q4_0"):
            path = Path(tmp) / f"{ftype}.gguf"
            save_gguf(model, path, ftype, threads=2)
            params = llama_cpp.llama_model_default_params()
            params.use_extra_bufts = True
            m = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
            p = llama_cpp.llama_context_default_params()
            p.n_ctx = p.n_batch = p.n_ubatch = 256
            p.n_threads = p.n_threads_batch = 2
            ctx = llama_cpp.llama_init_from_model(m, p)
            tokens = (llama_cpp.llama_token * 32)(*range(1, 33))  # kept alive while the batch points at it
            b = llama_cpp.llama_batch_get_one(tokens, 32)
            if llama_cpp.llama_decode(ctx, b) != 0:
                raise SystemExit(3)
            llama_cpp.llama_free(ctx)
            llama_cpp.llama_model_free(m)


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--check-extra-buffers"]:
        extra_buffers_check()
