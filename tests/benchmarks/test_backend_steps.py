"""pytest-benchmark: one prefill and one decode step of the tiny preset on every backend.

These measure; they assert nothing about time. A backend that cannot run here (its probe
says so, or its adapter does not import) is skipped with the probe's reason. The full
harness (``bench run``) is the real measurement, with fresh processes per cell; this suite
is the quick in-process view, and ``--benchmark-disable`` turns it into a smoke test that
runs each step once.
"""

from __future__ import annotations

import psutil
import pytest
import torch

from backends import registry
from model.gpt import build_model, get_config

# Measures real launches against each other: run alone, after the parallel part of make test.
pytestmark = pytest.mark.serial

PRESET = "tiny"
BATCH, PROMPT_LEN = 1, 32
ROUNDS, WARMUP = 30, 3
MIB = 2**20


@pytest.fixture(scope="module", params=registry.names())
def backend(request):
    """The backend named by the parameter, loaded with a fresh tiny model; skipped if unavailable."""
    name = request.param
    probe = registry.probe(name)  # in-process: the benchmark runs the library here anyway
    if not probe.available:
        pytest.skip(f"{name}: {probe.reason}" + (f" (fix: {probe.fix})" if probe.fix else ""))
    cls = registry.get_backend_class(name)
    if not cls.stepwise:
        pytest.skip(f"{name} runs whole generations through its own loop (no prefill or decode step to time); "
                    f"bench run times that loop")
    if cls.model_refusal(get_config(PRESET)):
        pytest.skip(f"{name} cannot run {PRESET}: {cls.model_refusal(get_config(PRESET))}")
    instance = registry.create(name)
    instance.load(build_model(get_config(PRESET), seed=0))  # fresh: a backend may change the module
    with instance:
        yield instance


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    vocab = get_config(PRESET).vocab_size
    return torch.randint(0, vocab, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(0))


def record(benchmark, backend, tokens_per_call: int) -> None:
    """Throughput from the median (absent when benchmarks are disabled) and memory after the run."""
    info = benchmark.extra_info
    info.update(backend.info())
    info["preset"] = PRESET
    info["tokens_per_call"] = tokens_per_call
    info["torch_threads"] = torch.get_num_threads()
    if benchmark.stats:  # None under --benchmark-disable
        info["tokens_per_s"] = tokens_per_call / benchmark.stats.stats.median
        # The fastest round: what the step costs when nothing else competes for the cores.
        info["tokens_per_s_best"] = tokens_per_call / benchmark.stats.stats.min
    info["rss_mib"] = psutil.Process().memory_info().rss / MIB
    device = backend.memory()
    if device is not None:
        info["device_peak_mib"] = device["peak"] / MIB


def test_prefill(benchmark, backend, prompt):
    benchmark.group = f"prefill: batch {BATCH}, {PROMPT_LEN} tokens, {PRESET}"

    def step():
        out = backend.prefill(prompt)
        backend.synchronize()
        return out

    logits, _ = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP)
    assert logits.shape == (BATCH, get_config(PRESET).vocab_size)  # it ran the right thing
    record(benchmark, backend, BATCH * PROMPT_LEN)


def test_decode(benchmark, backend, prompt):
    benchmark.group = f"decode: batch {BATCH}, 1 token after {PROMPT_LEN}, {PRESET}"

    def setup():
        # A fresh prefill before every round (not timed): each decode starts from a cache of
        # PROMPT_LEN tokens, whatever the backend keeps internally.
        logits, cache = backend.prefill(prompt)
        backend.synchronize()
        return (logits.argmax(-1, keepdim=True), cache), {}

    def step(token, cache):
        out = backend.decode(token, cache)
        backend.synchronize()
        return out

    logits, cache = benchmark.pedantic(step, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    assert logits.shape == (BATCH, get_config(PRESET).vocab_size)
    assert backend.cache_length(cache) == PROMPT_LEN + 1
    record(benchmark, backend, BATCH)
