"""The machine's roofline: how fast a decode step could possibly run here.

Two numbers bound a decode step. Memory bandwidth: every step reads all the weights and
the KV cache. Peak matmul rate: every step does ``config.decode_flops`` of arithmetic. Both
are measured, not taken from a datasheet, with the same library and thread count the
backends use:

- bandwidth: STREAM-style kernels in torch over arrays far larger than the last-level
  cache, best of several repetitions. Bytes are counted as STREAM counts them (read: N,
  copy: 2N, triad: 3N); the best kernel's rate is the bandwidth. Decode traffic is mostly
  reads, so the read kernel usually sets it.
- peak: square ``torch.mm`` in fp32, bf16 and fp16, best rate over a few sizes. bf16 on a
  CPU without AVX-512 BF16 or AMX runs a slow fallback; that is measured, not assumed.
  int8: the faster of ``torch._int_mm`` (int8 x int8 -> int32) and a dynamically
  quantised ``Linear`` forward (what CPU int8 inference runs); the result says which.

Measurements take a few seconds, so they are cached in a JSON file keyed by the
environment fingerprint (``bench.machine.environment.fingerprint_id``), the device and the thread
count. The default cache sits beside the default result store (``runs/roofline.json``):
the harness and CI both write there, and a different machine or library version never
reuses another's numbers.
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable


if TYPE_CHECKING:
    from model.gpt import GPTConfig

DEFAULT_CACHE = Path("runs") / "roofline.json"  # beside the default store (bench.store.DEFAULT_STORE)
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
BANDWIDTH_MIB = 128  # per array: 4x the 32 MiB L3 here; three arrays keep first-touch cost low
MATMUL_SIZES = {"cpu": (256, 512, 1024, 2048), "cuda": (1024, 2048, 4096, 8192)}
PEAK_BUDGET_S = 1.5  # seconds per precision and method: bf16 on AVX2 is ~1 GFLOP/s, so sizes stop early
REPEATS = 8


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def _best_seconds(op: Callable[[], object], device: str, repeats: int, deadline: float | None = None) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up, stopping early at ``deadline``."""
    op()  # warm-up: first touch of pages, kernel selection, oneDNN primitive creation
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        op()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        if deadline is not None and time.perf_counter() + best > deadline:
            break
    return best


def measure_bandwidth(mib: int | None = None, repeats: int = REPEATS, device: str = "cpu") -> dict[str, float]:
    """GB/s (1e9 bytes) of the read, copy, triad and gemv kernels over fp32 arrays of ``mib`` MiB each.

    gemv (a matrix-vector product over an ``mib`` MiB matrix) is a decode step's own access
    pattern: every weight read once, almost no arithmetic.
    """
    import torch

    mib = mib or BANDWIDTH_MIB
    n = mib * 2**20 // 4
    a = torch.full((n,), 1.0, device=device)
    b = torch.full((n,), 2.0, device=device)
    c = torch.full((n,), 0.5, device=device)
    nbytes = n * 4
    side = int(n**0.5)
    m, v = b[: side * side].view(side, side), c[:side]
    nbytes_mv = side * side * 4
    kernels = {
        "read": (lambda: a.sum(), nbytes),
        "copy": (lambda: a.copy_(b), 2 * nbytes),
        "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3 * nbytes),  # a = b + 3c, one pass
        "gemv": (lambda: torch.mv(m, v), nbytes_mv),
    }
    with torch.inference_mode():
        return {name: nb / _best_seconds(op, device, repeats) / 1e9 for name, (op, nb) in kernels.items()}


# A cached bandwidth this far below a quick gemv check now was measured while the machine was
# busy (or on other hardware under the same fingerprint): every fraction of the bound would read
# too high, over 100%, so the roofline is measured again.
STALE_FACTOR = 1.5


def quick_bandwidth(device: str = "cpu") -> float:
    """GB/s of a quick gemv pass (three repeats over the usual array size; about half a second),
    the check of a cached bandwidth against this machine as it is now."""
    return measure_bandwidth(repeats=3, device=device)["gemv"]


def _int8_methods(device: str) -> dict[str, tuple[Callable[[int], Callable[[], object]], str]]:
    """The int8 matmuls to try: name -> (n -> op, description)."""
    import torch

    def int_mm(n):
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
        return lambda: torch._int_mm(a, b)

    methods = {"int_mm": (int_mm, "torch._int_mm int8 x int8 -> int32")}
    if device == "cpu":
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

        def dynamic_linear(n):
            lin = DynamicQuantLinear(n, n, bias_=False, dtype=torch.qint8)
            w = torch.randn(n, n)
            lin.set_weight_bias(torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8), None)
            x = torch.randn(n, n)
            return lambda: lin(x)

        engine = torch.backends.quantized.engine
        methods["dynamic_linear"] = (dynamic_linear, f"dynamically quantised Linear ({engine} engine)")
    return methods


def _peak_of(make_op: Callable[[int], Callable[[], object]], sizes: tuple[int, ...], device: str,
             budget_s: float) -> tuple[float, int]:
    """Best GFLOP/s of ``make_op(n)`` over growing square sizes, within ``budget_s``."""
    deadline = time.perf_counter() + budget_s
    best, best_n = 0.0, 0
    for i, n in enumerate(sizes):
        seconds = _best_seconds(make_op(n), device, REPEATS, deadline)
        rate = 2 * n**3 / seconds / 1e9
        if rate > best:
            best, best_n = rate, n
        # The next size does ~8x the work twice (warm-up and one timed call): stop if that overruns.
        if i + 1 < len(sizes) and time.perf_counter() + 16 * seconds > deadline:
            break
    return best, best_n


def measure_peak_gflops(precision: str, device: str = "cpu", sizes: tuple[int, ...] | None = None,
                        budget_s: float | None = None) -> tuple[float, str]:
    """(GFLOP/s, how) of the fastest square matmul at ``precision``; 2 FLOPs per multiply-add."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    sizes = sizes or MATMUL_SIZES["cuda" if device.startswith("cuda") else "cpu"]
    budget_s = budget_s or PEAK_BUDGET_S
    with torch.inference_mode():
        if precision != "int8":
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

            def make_mm(n):
                a = torch.randn(n, n, device=device).to(dtype)
                b = torch.randn(n, n, device=device).to(dtype)
                return lambda: torch.mm(a, b)

            rate, n = _peak_of(make_mm, sizes, device, budget_s)
            return rate, f"torch.mm {precision} {n}x{n}"
        results = []
        for make_op, description in _int8_methods(device).values():
            try:
                rate, n = _peak_of(make_op, sizes, device, budget_s)
            except RuntimeError as e:  # e.g. _int_mm has no kernel for this device or shape
                results.append((0.0, f"{description} failed: {str(e).splitlines()[0]}"))
                continue
            results.append((rate, f"{description} {n}x{n}"))
        rate, how = max(results)
        if rate == 0.0:
            raise RuntimeError(f"no int8 matmul runs on {device}: {'; '.join(h for _, h in results)}")
        others = [f"{h}: {r:.1f} GFLOP/s" for r, h in results if h != how]
        return rate, how + (f" (also tried {'; '.join(others)})" if others else "")


def _cache_key(fingerprint_id: str, device: str, threads: int | None) -> str:
    return f"{fingerprint_id}/{device}/threads={threads if threads is not None else 'default'}"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: a cache miss, the numbers get re-measured
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file, never half


def measure_roofline(threads: int | None = None, precisions: tuple[str, ...] = ("fp32", "bf16", "int8"),
                     cache: Path | None = None, refresh: bool = False, device: str = "cpu",
                     fingerprint_id: str | None = None) -> dict:
    """Bandwidth and peak matmul rates of this machine, from the cache when it has them.

    ``threads``: intra-op threads for the measurement (None: torch's default); the caller's
    setting is restored afterwards. ``cache``: the JSON cache file (default ``runs/roofline.json``).
    ``refresh``: measure even if cached. A cached entry is checked against a quick gemv pass
    first (``quick_bandwidth``): one more than ``STALE_FACTOR`` times below it was measured on a
    busy machine and is measured again, the reason kept under "remeasured". ``fingerprint_id``: the cache key's environment,
    computed from ``bench.machine.environment.fingerprint()`` when not given.
    Returns {"bandwidth_gb_s", "bandwidth_kernels", "peak_gflops": {precision: GFLOP/s},
    "peak_method": {precision: how}, "threads", "device", "method", "measured_at", "fingerprint_id"}.
    """
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"precision={p!r} is not one of {', '.join(PRECISIONS)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    if fingerprint_id is None:
        from bench.machine.environment import fingerprint, fingerprint_id as compute_id
        fingerprint_id = compute_id(fingerprint())
    path = Path(cache) if cache is not None else DEFAULT_CACHE
    key = _cache_key(fingerprint_id, device, threads)
    entries = _read_cache(path)
    cached = None if refresh else entries.get(key)
    stale = None
    if cached is not None:
        now = quick_bandwidth(device)
        if now > STALE_FACTOR * cached["bandwidth_gb_s"]:
            stale = (f"the cached bandwidth, {cached['bandwidth_gb_s']:.1f} GB/s (measured "
                     f"{cached.get('measured_at', '?')}), was below a gemv check now ({now:.1f} GB/s): measured again")
            cached = None
    missing = [p for p in precisions if cached is None or p not in cached.get("peak_gflops", {})]
    if cached is not None and not missing:
        return cached

    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if cached is None:
            kernels = measure_bandwidth(device=device)
            result = {
                "bandwidth_gb_s": max(kernels.values()),
                "bandwidth_kernels": kernels,
                "peak_gflops": {},
                "peak_method": {},
                "threads": torch.get_num_threads(),
                "device": device,
                "method": (f"bandwidth: best of {REPEATS} torch read/copy/triad/gemv passes over {BANDWIDTH_MIB} MiB "
                           f"fp32 arrays, STREAM byte counting; peak: best square matmul rate per precision "
                           f"(see peak_method), 2 FLOPs per multiply-add"),
                "fingerprint_id": fingerprint_id,
            }
            if stale:
                result["remeasured"] = stale
        else:
            result = dict(cached)
            result["peak_gflops"] = dict(cached["peak_gflops"])
            result["peak_method"] = dict(cached.get("peak_method", {}))
        for p in missing:
            result["peak_gflops"][p], result["peak_method"][p] = measure_peak_gflops(p, device=device)
        result["measured_at"] = datetime.now().astimezone().isoformat(timespec="seconds")
    finally:
        torch.set_num_threads(previous)
    entries[key] = result
    _write_cache(path, entries)
    return result


BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}


def weight_bytes(config: GPTConfig, precision: str = "fp32") -> int:
    """Bytes of every parameter at ``precision`` (int8: one byte a weight, scales not counted).

    ``config.n_params`` counts either family's parts: SwiGLU's three matrices, an untied head
    beside the embedding, grouped-query k and v projections of n_kv_head heads."""
    _check_precision(precision)
    return int(config.n_params * BYTES_PER_PARAM[precision])


def kv_cache_bytes(config: GPTConfig, batch: int, seq_len: int, precision: str = "fp32") -> int:
    """Bytes of the KV cache for ``batch`` sequences of ``seq_len`` tokens; int8 backends keep it fp32.

    A token costs 2 x n_layer x n_kv_head x head_dim numbers (``config.kv_cache_elements``):
    grouped-query attention stores n_kv_head heads, never n_head (SmolLM2-135M in fp32:
    2 x 30 x 3 x 64 x 4 = 46,080 bytes a token, a third of what 9 heads would need)."""
    _check_precision(precision)
    return config.kv_cache_elements(batch, seq_len) * BYTES_PER_PARAM["fp32" if precision in ("int8", "int4") else precision]


def _check_precision(precision: str) -> None:
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(BYTES_PER_PARAM)}")


def decode_bound(config: GPTConfig, batch: int, past_len: int, precision: str, roofline: dict) -> dict:
    """The fastest one decode step of ``batch`` sequences after ``past_len`` tokens could run.

    bytes = the matmul weights at ``precision`` (``config.n_matmul_params``, int8: 1 byte:
              every block's q, k, v, o and two or three MLP matrices, and the LM head, tied or not)
            + the KV cache read (``kv_cache_bytes(config, batch, past_len, precision)``: n_kv_head heads)
    flops = ``config.decode_flops(batch, past_len)``
    time  = max(bytes / bandwidth, flops / peak);  tokens/s = batch / time

    This is a lower bound on the step's time, so an upper bound on its speed: it assumes
    the weights stream from memory once per step at the measured bandwidth (no cache reuse
    across steps, which holds when the weights exceed the last-level cache; a model that
    fits in cache can beat it), compute overlaps memory traffic perfectly, and activations,
    embeddings, layer norms, softmax and the new token's K/V writes cost nothing. A backend
    whose kernels beat the measured torch.mm rate (a different library's int8 or bf16 path)
    can also exceed a compute bound.

    A roofline without a peak for ``precision`` (nobody measured fp16 on this device) still
    bounds the step by memory: the result says so in ``bound`` ("memory (no fp16 peak
    measured)") rather than failing a cell whose timing is already done.
    """
    _check_precision(precision)
    if batch < 1:
        raise ValueError(f"batch={batch} must be at least 1")
    if past_len < 0:
        raise ValueError(f"past_len={past_len} must not be negative")
    peak = roofline.get("peak_gflops", {}).get(precision)
    bandwidth = roofline["bandwidth_gb_s"]
    bytes_per_step = int(config.n_matmul_params * BYTES_PER_PARAM[precision]) + kv_cache_bytes(
        config, batch, past_len, precision)
    flops_per_step = config.decode_flops(batch, past_len)
    memory_s = bytes_per_step / (bandwidth * 1e9)
    compute_s = flops_per_step / (peak * 1e9) if peak else 0.0
    if not peak:
        bound = f"memory (no {precision} peak measured)"
    else:
        bound = "memory" if memory_s >= compute_s else "compute"
    return {
        "roofline_decode_tok_s": batch / max(memory_s, compute_s),
        "bound": bound,
        "bytes_per_step": bytes_per_step,
        "flops_per_step": flops_per_step,
    }


def roofline_for(device: str, threads: int | None, precisions, cache: Path | None = None) -> dict | None:
    """The roofline that bounds cells on ``device`` at ``threads``: measured once, then cached.

    The CPU's is measured here (``measure_roofline``) for the precisions asked for; a CUDA
    device's is measured on that device when torch sees one. Any other device (an Intel XPU,
    or a CUDA device torch cannot see) gets None: its cells get no bound, never the CPU's.
    """
    wanted = tuple(p for p in dict.fromkeys(precisions) if p in PRECISIONS) or ("fp32",)
    if device == "cpu":
        return measure_roofline(threads=threads, precisions=wanted, cache=cache)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        return measure_roofline(threads=threads, precisions=wanted, cache=cache, device=device)
    return None
