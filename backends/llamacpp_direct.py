"""llama.cpp measured on its own, for the check that the harness's figure for the ``llamacpp`` peer is
llama.cpp's: ``converted_gguf`` names the GGUF the backend runs, ``direct_decode`` times llama.cpp's own
decode loop on it through llama-cpp-python's low-level API with nothing of ours in the loop, and
``llama_bench`` runs llama.cpp's ``llama-bench`` on it where that binary is on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from backends.base import BackendError
from backends.llamacpp import CTX_ROUND, DEFAULT_KV, FLASH_ATTN, LlamaCppBackend, _ggml_type, extra_buffers_setting

def converted_gguf(model, precision: str = "fp32", quant: str | None = None, threads: int | None = None) -> Path:
    """The GGUF the llamacpp backend runs for ``model`` at ``precision`` (its cache entry,
    ``<cache_dir>/llamacpp/<key>/model.gguf``, converted now if missing): what ``direct_decode`` takes."""
    backend = LlamaCppBackend(precision=precision, quant=quant, threads=threads)
    return backend._gguf_file(model)[0]


def direct_decode(path_or_dir, threads: int, prompt_len: int, gen_len: int, batch: int = 1, *,
                  kv_cache_type: str | None = None, flash_attn: str = "off", extra_buffers: str = "auto",
                  warmup: int = 1) -> dict:
    """llama.cpp alone on a GGUF (a file, or a cache entry directory holding ``model.gguf``): its
    decode rate and time to first token, timed around ``llama_decode`` with greedy sampling by
    llama.cpp's own sampler (``llama_sampler_init_greedy``), nothing of ours in the loop.

    ``batch`` rows are sequences 0..batch-1 of one llama_batch. TTFT is the prefill plus the first
    sampled tokens; decode_tok_s is batch x (gen_len - 1) tokens over the decode steps after it
    (the harness's split: its first on_token closes TTFT). ``warmup`` untimed generations come first.
    The KV cache type, flash attention and extra weight buffers default as the llamacpp backend's.
    If a ``llama-bench`` binary is on PATH, its text-generation figure is reported too.
    """
    import llama_cpp
    from gguf import GGUFReader

    from model.gguf import file_type_name, quiet_llama_cpp

    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "model.gguf"
    if not path.is_file():
        raise BackendError(f"direct_decode: {path} is not a GGUF file")
    if gen_len < 2 or prompt_len < 1 or batch < 1 or threads < 1:
        raise ValueError("direct_decode needs gen_len >= 2, prompt_len >= 1, batch >= 1 and threads >= 1")
    ftype = file_type_name(GGUFReader(str(path)))
    kv = kv_cache_type or DEFAULT_KV.get(ftype, "f16")
    quiet_llama_cpp()
    llama_cpp.llama_backend_init()
    extra = extra_buffers_setting(extra_buffers)
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mparams.use_extra_bufts = extra["on"]
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise BackendError(f"llama.cpp could not load {path}")
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    per_seq = -(-(prompt_len + gen_len) // CTX_ROUND) * CTX_ROUND
    p = llama_cpp.llama_context_default_params()
    p.n_ctx = per_seq * batch
    p.n_batch = p.n_ctx
    p.n_ubatch = min(512, p.n_ctx)
    p.n_seq_max = batch
    p.n_threads = p.n_threads_batch = threads
    p.type_k = p.type_v = _ggml_type(kv)
    p.flash_attn_type = FLASH_ATTN[flash_attn]
    ctx = llama_cpp.llama_init_from_model(model, p)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise BackendError("llama.cpp could not create a context")
    sparams = llama_cpp.llama_sampler_chain_default_params()
    sampler = llama_cpp.llama_sampler_chain_init(sparams)
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
    b = llama_cpp.llama_batch_init(p.n_batch, 0, 1)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, size=(batch, prompt_len)).tolist()
    mem = llama_cpp.llama_get_memory(ctx)

    def fill(entries):
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)

    def generation():
        llama_cpp.llama_memory_clear(mem, True)
        fill([(prompt[s][t], t, s, t == prompt_len - 1) for s in range(batch) for t in range(prompt_len)])
        t0 = time.perf_counter()
        if llama_cpp.llama_decode(ctx, b) != 0:
            raise BackendError("llama_decode failed in the prefill")
        toks = [llama_cpp.llama_sampler_sample(sampler, ctx, (s + 1) * prompt_len - 1) for s in range(batch)]
        t1 = time.perf_counter()
        for step in range(1, gen_len):
            fill([(toks[s], prompt_len + step - 1, s, True) for s in range(batch)])
            if llama_cpp.llama_decode(ctx, b) != 0:
                raise BackendError("llama_decode failed in a decode step")
            toks = [llama_cpp.llama_sampler_sample(sampler, ctx, s) for s in range(batch)]
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    try:
        for _ in range(warmup):
            generation()
        ttft, dec = generation()
        real_threads = llama_cpp.llama_n_threads(ctx)
    finally:
        llama_cpp.llama_batch_free(b)
        llama_cpp.llama_sampler_free(sampler)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    out = dict(decode_tok_s=batch * (gen_len - 1) / dec, ttft_ms=ttft * 1e3,
               how=(f"llama-cpp-python {llama_cpp.__version__} low-level API: llama_decode of a llama_batch "
                    f"({batch} sequence{'s' if batch > 1 else ''}), greedy llama_sampler, timed with perf_counter; "
                    f"{warmup} warm-up generation(s); n_threads={real_threads}, KV {kv}, flash_attn {flash_attn}; "
                    f"extra weight buffers {extra['why']}"),
               gguf=str(path), file_type=ftype, threads=real_threads, batch=batch, prompt_len=prompt_len,
               gen_len=gen_len, kv_cache_type=kv, flash_attn=flash_attn, extra_buffers=extra["on"])
    bench = llama_bench(path, threads)
    if bench is not None:
        out["llama_bench"] = bench
    return out


def llama_bench(path: Path, threads: int, n_gen: int = 32) -> dict | None:
    """``llama-bench -m F -p 0 -n 32 -t T -o json``'s text-generation rate, when the binary is on PATH."""
    exe = shutil.which("llama-bench")
    if exe is None:
        return None
    cmd = [exe, "-m", str(path), "-p", "0", "-n", str(n_gen), "-t", str(threads), "-o", "json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
        rows = json.loads(done.stdout)
        row = rows[-1]
        return dict(decode_tok_s=float(row["avg_ts"]), stddev_tok_s=float(row.get("stddev_ts", 0.0)),
                    command=" ".join(cmd), build=row.get("build_commit"))
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError, TypeError) as e:
        return dict(error=f"{type(e).__name__}: {e}", command=" ".join(cmd))


# -- llama.cpp's extra weight buffers (AMX, CPU_REPACK): on where they work --------------------
