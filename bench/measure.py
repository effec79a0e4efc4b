"""Measure one cell in this process: load, warm up, repeat generations, check parity.

This runs inside the cell's own subprocess (``bench.cell``), after the thread environment
was set and before anything else was loaded, so its peak memory is the cell's own.

One *repetition* is a whole greedy generation of ``gen_len`` tokens for the batch, timed
token by token through ``generate``'s per-token callback: the first callback closes the
time to first token (the prefill), each later one closes one decode step (time per output
token). Warm-up repeats until the end-to-end time settles; measurement repeats until the 95%
interval of the median time per output token is narrower than the target or the time budget
is spent. Every raw sample is kept.
"""

from __future__ import annotations

import gc
import resource
import time
from dataclasses import asdict, dataclass, field

import psutil
import torch

from backends import registry
from backends.parity import check_parity
from bench import stats
from model.generate import generate
from model.gpt import build_model, get_config
from model.checkpoint import load_checkpoint

MiB = 1024 * 1024


@dataclass(frozen=True)
class CellSpec:
    """Everything a cell needs, JSON-ready (it crosses a process boundary)."""

    model: str  # a preset name, or a checkpoint directory
    backend: str
    precision: str | None = None  # None: the backend's default
    batch: int = 1
    threads: int | None = None
    prompt_len: int = 32
    gen_len: int = 16
    device: str | None = None
    seed: int = 0
    checkpoint: bool = False  # model is a checkpoint directory
    min_warmup: int = 1
    max_warmup: int = 5
    min_reps: int = 3
    max_reps: int = 30
    target_ci: float = 0.05  # stop when the 95% interval of the median tpot is this narrow (relative)
    budget_s: float = 20.0  # time for the measured repetitions
    parity_steps: int = 8
    measure_kv: bool = True  # size the KV cache after a full generation (later launches skip it)
    roofline: dict | None = None  # the machine's bandwidth and peak rates, measured by the parent
    options: dict = field(default_factory=dict)  # backend options

    def to_dict(self) -> dict:
        return asdict(self)


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / MiB


def _peak_rss_mb() -> float:
    """This process's resident high-water mark.

    Read from /proc (VmHWM), not getrusage: Linux carries ru_maxrss across exec, so a cell
    process would report its parent's peak whenever the parent had been larger.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; bytes on macOS


def build(spec: CellSpec):
    if spec.checkpoint:
        return load_checkpoint(spec.model)
    return build_model(get_config(spec.model), seed=spec.seed)


def prompt_ids(spec: CellSpec, vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.seed + 1)
    return torch.randint(0, vocab_size, (spec.batch, spec.prompt_len), generator=g)


class _Clock:
    """The per-token callback: a timestamp after each step, the device synchronised first."""

    def __init__(self, backend):
        self.backend = backend
        self.stamps: list[float] = []

    def __call__(self, step, tokens):
        self.backend.synchronize()
        self.stamps.append(time.perf_counter())


def one_generation(backend, prompts: list[list[int]], gen_len: int):
    """(ttft_ms, [tpot_ms per decode step], e2e_ms) of one greedy generation."""
    clock = _Clock(backend)
    backend.synchronize()
    t0 = time.perf_counter()
    generate(backend, prompts, gen_len, greedy=True, on_token=clock)
    stamps = [t0] + clock.stamps
    steps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return steps[0], steps[1:], (stamps[-1] - t0) * 1e3


def measure_cell(spec: CellSpec) -> dict:
    """Run the cell and return its record fields (identity fields are added by the caller)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)  # the same way for every backend, before any work
    rss0 = _rss_mb()
    t = time.perf_counter()
    model = build(spec)
    build_s = time.perf_counter() - t
    config = model.config
    backend = registry.create(spec.backend, precision=spec.precision, threads=spec.threads,
                              device=spec.device, **spec.options)
    out: dict = dict(n_params=config.n_params, precision=backend.precision, device=backend.device,
                     build_s=build_s)
    with backend:
        t = time.perf_counter()
        backend.load(model)
        backend.synchronize()
        out["load_s"] = time.perf_counter() - t
        del model
        gc.collect()
        out["model_mb"] = _rss_mb() - rss0
        weights = backend.weight_bytes()
        out["weights_mb"] = None if weights is None else weights / MiB

        ids = prompt_ids(spec, config.vocab_size)
        prompts = ids.tolist()
        t = time.perf_counter()
        _, cache = backend.prefill(ids)
        backend.synchronize()
        out["first_call_ms"] = (time.perf_counter() - t) * 1e3
        del cache

        samples = _repeat(backend, prompts, spec)
        out["samples"] = samples
        out["ttft_ms"] = stats.summarize(samples["ttft_ms"])
        out["tpot_ms"] = stats.summarize(samples["tpot_ms"]) if samples["tpot_ms"] else None
        e2e = stats.summarize(samples["e2e_ms"])
        out["prefill_tok_s"] = spec.batch * spec.prompt_len / (out["ttft_ms"]["median"] / 1e3)
        out["decode_tok_s"] = spec.batch / (out["tpot_ms"]["median"] / 1e3) if out["tpot_ms"] else None
        out["e2e_tok_s"] = spec.batch * spec.gen_len / (e2e["median"] / 1e3)
        out["warmup_reps"] = samples.pop("warmup_reps")
        out["warmup_settled"] = samples.pop("warmup_settled")

        out["kv_cache_mb"] = _kv_cache_mb(backend, ids, spec.gen_len) if spec.measure_kv else None
        mem = backend.memory()
        out["device_peak_mb"] = None if mem is None else mem["peak"] / MiB
        out["peak_rss_mb"] = _peak_rss_mb()  # before the parity reference adds its own weights

        out["roofline_decode_tok_s"] = out["roofline_fraction"] = out["roofline_bound"] = None
        if spec.roofline and out["decode_tok_s"]:
            from bench.roofline import decode_bound  # measured by the parent; only arithmetic here
            past = spec.prompt_len + spec.gen_len // 2  # the mean cache length over the decode steps
            bound = decode_bound(config, spec.batch, past, backend.precision, spec.roofline)
            out["roofline_decode_tok_s"] = bound["roofline_decode_tok_s"]
            out["roofline_bound"] = bound["bound"]
            out["roofline_fraction"] = out["decode_tok_s"] / bound["roofline_decode_tok_s"]

        out["parity"] = _parity(backend, spec, ids) if spec.parity_steps > 0 else None
        out["backend_info"] = backend.info()
    return out


def _kv_cache_mb(backend, ids: torch.Tensor, gen_len: int) -> float:
    """The KV cache as it stands at the end of a generation of ``gen_len`` tokens."""
    _, cache = backend.prefill(ids)
    for _ in range(gen_len - 1):
        _, cache = backend.decode(ids[:, :1], cache)
    return backend.cache_bytes(cache) / MiB


def _repeat(backend, prompts, spec: CellSpec) -> dict:
    """Warm up until settled, then repeat until the interval is tight or the budget is spent.

    Warm-up ends when two consecutive generations take within 10% of each other (after at
    least ``min_warmup``), or after ``max_warmup`` generations or half the budget; whether it
    settled is recorded, so an unsettled cell is visible rather than hidden.
    """
    warm: list[float] = []
    settled = False
    start = time.perf_counter()
    while len(warm) < spec.max_warmup:
        warm.append(one_generation(backend, prompts, spec.gen_len)[2])
        if len(warm) > spec.min_warmup and stats.settled(warm, window=1, tol=0.10):
            settled = True
            break
        if len(warm) >= spec.min_warmup and time.perf_counter() - start > spec.budget_s / 2:
            break
    ttft, tpot, e2e = [], [], []
    start = time.perf_counter()
    while len(e2e) < spec.max_reps:
        a, b, c = one_generation(backend, prompts, spec.gen_len)
        ttft.append(a)
        tpot.extend(b)
        e2e.append(c)
        if len(e2e) < spec.min_reps:
            continue
        tight = stats.relative_ci_width(tpot or ttft) <= spec.target_ci
        if tight or time.perf_counter() - start > spec.budget_s:
            break
    return dict(ttft_ms=ttft, tpot_ms=tpot, e2e_ms=e2e, warmup_reps=len(warm), warmup_settled=settled)


def _parity(backend, spec: CellSpec, ids: torch.Tensor) -> dict:
    """Against eager fp32 on the same weights and the first (up to) two prompts."""
    reference = registry.create("eager")
    reference.load(build(spec))
    with reference:
        steps = max(1, min(spec.parity_steps, spec.gen_len))
        return check_parity(backend, reference, ids[:2], steps=steps).to_dict()
