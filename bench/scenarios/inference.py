"""Measure one cell in this process: load, warm up, repeat generations, check parity.

This runs inside the cell's own subprocess (``bench.executors.cell``), after the thread environment
was set and before anything else was loaded, so its peak memory is the cell's own.

One *generation* is a whole greedy generation of ``gen_len`` tokens for the batch, timed
token by token through ``generate``'s per-token callback: the first callback closes the
time to first token (the prefill), each later one closes one decode step (time per output
token). Warm-up repeats until the end-to-end time settles; measurement repeats generations
until the 95% interval of the median time per output token, resampling whole generations
(``stats.nested_relative_ci_width``; steps of one generation are not independent), is
narrower than the target or the time budget is spent. Every raw sample is kept, grouped by
generation: ``tpot_ms`` is a list of generations, each the list of its decode steps.

This process measures; it derives nothing. Statistics, rates and the roofline fraction are
computed once, by the parent, after the cell's launches are merged (``bench.results.records``).
"""

from __future__ import annotations

import gc
import resource
import time
import psutil
import torch

from backends import registry
from backends.parity import check_parity, check_parity_generated
from bench.results import stats
from bench.models import open_model, reference_model
from bench.spec import CellSpec

MiB = 1024 * 1024


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


def malloc_trim() -> None:
    """Return freed heap pages to the system (glibc), so the resident size is what is live."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed heap stays with the process
        pass


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current resident size; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build(spec: CellSpec):
    """What the backend loads: a preset's fp32 model, a checkpoint's, or a quantised checkpoint
    as it is (checked against the cell's backend and precision)."""
    return open_model(spec.model, spec.backend, spec.precision, checkpoint=spec.checkpoint, seed=spec.seed)


def build_reference(spec: CellSpec):
    """The fp32 model eager checks the backend against: for a quantised checkpoint, its source."""
    return reference_model(spec.model, checkpoint=spec.checkpoint, seed=spec.seed)


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
    backend.generate_greedy(prompts, gen_len, on_token=clock)
    stamps = [t0] + clock.stamps
    steps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return steps[0], steps[1:], (stamps[-1] - t0) * 1e3


def measure_cell(spec: CellSpec) -> dict:
    """Run one launch of the cell and return its raw measurements (the launch record's fields)."""
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
        backend.expect(spec.batch, spec.prompt_len, spec.gen_len)
        compiled = [backend.compile_count()]
        t = time.perf_counter()
        backend.load(model)
        backend.synchronize()
        out["load_s"] = time.perf_counter() - t
        compiled.append(backend.compile_count())
        del model
        gc.collect()
        out["load_peak_rss_mb"] = _peak_rss_mb()  # export, quantise or compile included, when they ran
        # The peak from here on is that of running the model, whether or not this launch also
        # exported or quantised it: a cold export cache once put a gpt2 ONNX Runtime int8 cell at
        # 4.2 GB against 1.4 GB warm. Where the kernel refuses, the peak includes the load.
        malloc_trim()
        out["peak_after_load"] = reset_peak_rss()
        out["model_mb"] = _rss_mb() - rss0
        weights = backend.weight_bytes()
        out["weights_mb"] = None if weights is None else weights / MiB

        ids = prompt_ids(spec, config.vocab_size)
        prompts = ids.tolist()
        t = time.perf_counter()
        if backend.stepwise:
            _, cache = backend.prefill(ids)
            del cache
        else:  # an engine with its own loop: a generation of one token is its prefill
            backend.generate_greedy(prompts, 1)
        backend.synchronize()
        out["first_call_ms"] = (time.perf_counter() - t) * 1e3

        timed = PlantedDelay(backend, spec.planted_delay) if spec.planted_delay else backend
        samples = _repeat(timed, prompts, spec)
        out["warmup_reps"] = samples.pop("warmup_reps")
        out["warmup_settled"] = samples.pop("warmup_settled")
        compiled += samples.pop("compiled")
        out["samples"] = samples
        out["compiles"] = _compiles(compiled)

        # An engine that keeps its cache out of reach (its own generation loop) has none to weigh.
        out["kv_cache_mb"] = _kv_cache_mb(backend, ids, spec.gen_len) if spec.measure_kv and backend.stepwise \
            else None
        mem = backend.memory()
        out["device_peak_mb"] = None if mem is None else mem["peak"] / MiB
        out["peak_rss_mb"] = _peak_rss_mb()  # before the parity reference adds its own weights
        reference = _Reference(spec)
        out["parity"] = _parity(backend, spec, ids, reference) if spec.parity_steps > 0 else None
        out["quality"] = _quality(backend, spec, reference) if spec.quality_tokens and spec.checkpoint else None
        reference.close()
        out["backend_info"] = backend.info()
    return out


class PlantedDelay:
    """A testing aid: the backend, with every prefill and decode made slower by a known fraction.

    Each call spins (a busy wait, like real work) for ``fraction`` of the time the call itself
    took, so a planted 0.2 makes every step about 20% slower whatever the machine's speed. It
    exists to prove that ``bench compare`` detects a slowdown of that size; a record measured
    with it says so (``planted_delay``).
    """

    def __init__(self, backend, fraction: float):
        self.backend, self.fraction = backend, fraction

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _slowed(self, call, *args, **kwargs):
        t = time.perf_counter()
        result = call(*args, **kwargs)
        self.backend.synchronize()
        until = time.perf_counter() + self.fraction * (time.perf_counter() - t)
        while time.perf_counter() < until:
            pass
        return result

    def prefill(self, *args, **kwargs):
        return self._slowed(self.backend.prefill, *args, **kwargs)

    def decode(self, *args, **kwargs):
        return self._slowed(self.backend.decode, *args, **kwargs)

    def generate_greedy(self, prompts, max_new_tokens, on_token=None):
        """What the harness times, slowed: through this wrapper's prefill and decode where the
        backend steps; for an engine with its own loop, a spin in its per-token callback for the
        fraction of the time since the previous token (or the start)."""
        if self.backend.stepwise:
            from model.generate import generate
            return generate(self, prompts, max_new_tokens, greedy=True, on_token=on_token)
        last = [time.perf_counter()]

        def slowed(step, tokens):
            until = time.perf_counter() + self.fraction * (time.perf_counter() - last[0])
            while time.perf_counter() < until:
                pass
            last[0] = time.perf_counter()
            if on_token is not None:
                on_token(step, tokens)
        return self.backend.generate_greedy(prompts, max_new_tokens, on_token=slowed)


def _compiles(counts: list[int | None]) -> dict | None:
    """Graphs compiled during load, warm-up (the first call included) and measurement, from the
    backend's running count before load, after load, before and after the measured generations;
    None for a backend that does not compile at run time."""
    if any(c is None for c in counts):
        return None
    before_load, after_load, before_measure, after_measure = counts
    return dict(load=after_load - before_load, warmup=before_measure - after_load,
                measured=after_measure - before_measure)


def _kv_cache_mb(backend, ids: torch.Tensor, gen_len: int) -> float:
    """The KV cache as it stands at the end of a generation of ``gen_len`` tokens."""
    _, cache = backend.prefill(ids)
    for _ in range(gen_len - 1):
        _, cache = backend.decode(ids[:, :1], cache)
    return backend.cache_bytes(cache) / MiB


def _repeat(backend, prompts, spec: CellSpec) -> dict:
    """Warm up until settled, then repeat generations until the interval is tight or the budget is spent.

    Warm-up ends when two consecutive generations take within 10% of each other (after at
    least ``min_warmup``), or after ``max_warmup`` generations or half the budget; whether it
    settled is recorded, so an unsettled cell is visible rather than hidden. The stopping rule
    resamples whole generations: the decode steps of one generation are not independent.
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
    compiled = [backend.compile_count()]
    start = time.perf_counter()
    while len(e2e) < spec.max_reps:
        a, b, c = one_generation(backend, prompts, spec.gen_len)
        ttft.append(a)
        tpot.append(b)
        e2e.append(c)
        if len(e2e) < spec.min_reps:
            continue
        width = stats.nested_relative_ci_width(tpot if spec.gen_len > 1 else ttft)
        if width <= spec.target_ci or time.perf_counter() - start > spec.budget_s:
            break
    compiled.append(backend.compile_count())
    return dict(ttft_ms=ttft, tpot_ms=tpot, e2e_ms=e2e, warmup_reps=len(warm), warmup_settled=settled,
                compiled=compiled)


REFERENCE = ("eager", "fp32")


def _is_reference(backend, spec: CellSpec) -> bool:
    return (spec.backend, backend.precision) == REFERENCE and backend.device == "cpu"


class _Reference:
    """Eager fp32 on the same weights, built on first use and shared by parity and quality."""

    def __init__(self, spec: CellSpec):
        self.spec, self.backend = spec, None

    def get(self):
        if self.backend is None:
            self.backend = registry.create("eager")
            self.backend.load(build_reference(self.spec))
        return self.backend

    def close(self):
        if self.backend is not None:
            self.backend.close()


def _parity(backend, spec: CellSpec, ids: torch.Tensor, reference: _Reference) -> dict:
    """Against eager fp32 on the same weights and the first (up to) two prompts.

    Eager fp32 on the CPU is the reference itself: checking it against itself proves nothing,
    so its record says so instead of showing a meaningless 100%.
    """
    if _is_reference(backend, spec):
        return dict(reference=True, passed=True, precision="fp32")
    steps = max(1, min(spec.parity_steps, spec.gen_len))
    if not backend.stepwise:
        return check_parity_generated(backend, reference.get(), ids[:2], steps=steps).to_dict()
    return check_parity(backend, reference.get(), ids[:2], steps=steps).to_dict()


def _quality(backend, spec: CellSpec, reference: _Reference) -> dict:
    """A trained checkpoint's perplexity and divergence from eager fp32 on its test split."""
    from bench.scenarios.quality import QualityInputError, backend_quality, checkpoint_stream

    try:
        stream = checkpoint_stream(spec.model, max_tokens=spec.quality_tokens)
    except QualityInputError as e:  # a checkpoint without a tokenizer or corpus: said, not failed
        return dict(skipped=str(e))
    if not backend.exposes_logits:
        return dict(skipped=f"backend {spec.backend!r} exposes no logits, so no perplexity or divergence; "
                            f"its parity is on its generated tokens")
    if _is_reference(backend, spec):
        return backend_quality(backend, None, stream, is_reference=True)
    return backend_quality(backend, reference.get(), stream)
