"""The ``compile`` backend: its static KV cache against eager's growing one, compile counting,
the flag on a launch that recompiled while measured, and the probe.

Inductor takes seconds per graph even for ``tiny``, so one loaded backend is shared by the
module and the tests reuse its shapes (batch 2, prompt 8, as the parity test does): a shape
that compiled once is served from dynamo's cache, and across runs inductor's FX graph cache
(``TORCHINDUCTOR_CACHE_DIR``) saves the C++ builds.
"""

from __future__ import annotations

import pytest
import torch

from backends import compile as compiled
from backends.base import BackendError, BackendUnavailable, UnsupportedPrecision
from backends.compile import CompileBackend, compile_options
from backends.eager import EagerBackend
from backends.parity import check_parity
from bench.results import records
from bench.spec import CellSpec
from model.generate import generate
from model.gpt import build_model, get_config

BATCH, PROMPT, GEN = 2, 8, 8


@pytest.fixture(scope="module")
def backend(tiny_model):
    probe = CompileBackend.probe()
    if not probe.available:
        pytest.skip(f"compile unavailable: {probe.reason}")
    b = CompileBackend()
    b.expect(BATCH, PROMPT, GEN)
    b.load(tiny_model)
    with b:
        yield b


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, get_config("tiny").vocab_size, (BATCH, PROMPT), generator=g)


class Recorder:
    """A stepper that passes every call on and keeps the logits it returned."""

    def __init__(self, backend):
        self.backend, self.logits = backend, []

    def prefill(self, *args):
        out = self.backend.prefill(*args)
        self.logits.append(out[0])
        return out

    def decode(self, *args):
        out = self.backend.decode(*args)
        self.logits.append(out[0])
        return out

    def reorder_cache(self, cache, index):
        return self.backend.reorder_cache(cache, index)


# -- the static cache ----------------------------------------------------------------------

def test_load_compiles_the_expected_shapes_and_shares_the_weights(backend, tiny_model):
    assert backend.compiles_in_load == 2  # the prefill and the decode step, nothing more
    assert backend.model is tiny_model  # fp32 on the CPU runs the caller's module: no copy
    info = backend.info()
    assert info["static_cache_max_len"] == 64  # prompt 8 + 8 new, rounded up to 64
    assert info["compile_mode"] == "default" and info["cuda_graphs"] is False
    assert info["decode_dynamic"] is False and info["weights_dtype"] == "float32"


def test_static_cache_gives_eager_logits_over_a_generation(backend, eager, prompt):
    result = check_parity(backend, eager, prompt, steps=GEN)
    assert result.steps == GEN and result.token_agreement == 1.0
    assert result.max_abs_logit_diff < 1e-4


def test_decode_compiles_once_across_growing_lengths(backend, prompt):
    before = backend.compile_count()
    logits, cache = backend.prefill(prompt)
    lengths = []
    for _ in range(GEN - 1):
        logits, cache = backend.decode(logits.argmax(-1, keepdim=True), cache)
        lengths.append(backend.cache_length(cache))
    assert lengths == list(range(PROMPT + 1, PROMPT + GEN))
    assert backend.compile_count() == before  # seven lengths, no new graph
    assert backend.cache_bytes(cache) == 2 * 2 * BATCH * 128 * 64 * 4 + BATCH * 64 + 8  # all 64 positions


def test_left_padded_batch_matches_eager(backend, eager):
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9]]  # unequal: left padding and a mask
    ours, theirs = Recorder(backend), Recorder(eager)
    tokens = generate(ours, prompts, GEN - 1)
    assert tokens == generate(theirs, prompts, GEN - 1)
    assert len(ours.logits) == len(theirs.logits) == GEN - 1
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_beam_search_reorders_the_static_cache(backend, eager):
    prompt = [[5, 7, 11, 13, 17, 19, 23, 29]]
    assert generate(backend, prompt, 5, num_beams=2) == generate(eager, prompt, 5, num_beams=2)


def test_a_superseded_cache_is_refused(backend, prompt):
    _, first = backend.prefill(prompt)
    backend.prefill(prompt)  # the same batch size: it takes over the same static buffers
    with pytest.raises(BackendError, match="taken over by a later prefill"):
        backend.decode(prompt[:, :1], first)


def test_a_full_cache_is_refused(backend, prompt):
    with pytest.raises(BackendError, match="leaves no room in the static cache of max_len=64"):
        backend.prefill(torch.zeros(1, 64, dtype=torch.long))


# -- recompiles: counted, and flagged in the record -------------------------------------------

def test_a_changed_batch_recompiles_and_is_counted(backend):
    before = backend.compile_count()
    ids = torch.ones(BATCH + 1, PROMPT, dtype=torch.long)
    logits, cache = backend.prefill(ids)
    backend.decode(logits.argmax(-1, keepdim=True), cache)
    assert backend.compile_count() - before == 2  # a prefill and a decode graph for batch 3


def test_a_launch_that_compiled_while_measured_is_flagged():
    spec = CellSpec(model="tiny", backend="compile", precision="fp32", device="cpu", batch=1,
                    prompt_len=4, gen_len=3)
    samples = dict(ttft_ms=[1.0] * 5, tpot_ms=[[1.0, 1.0]] * 5, e2e_ms=[3.0] * 5)
    steady = dict(status="ok", samples=samples, compiles=dict(load=2, warmup=0, measured=0))
    recompiled = dict(status="ok", samples=samples, compiles=dict(load=2, warmup=1, measured=3))
    record = records.derive(records.merge([steady, recompiled]), spec)
    assert record["recompiles_measured"] == 3
    assert record["unsteady"] == "launch 2 of 2 compiled 3 graph(s) while measured: its steps include compile time"
    clean = records.derive(records.merge([steady, steady]), spec)
    assert clean["recompiles_measured"] == 0 and clean["unsteady"] == ""
    eager = records.derive(records.merge([dict(status="ok", samples=samples)]), spec)
    assert eager["compiles"] is None and eager["recompiles_measured"] is None


def test_the_harness_records_compiles_in_load_and_none_while_measuring(backend):
    from bench.scenarios.inference import measure_cell

    spec = CellSpec(model="tiny", backend="compile", precision="fp32", device="cpu", batch=BATCH,
                    prompt_len=PROMPT, gen_len=GEN, min_warmup=1, max_warmup=2, min_reps=2, max_reps=3,
                    budget_s=1.0, parity_steps=0, measure_kv=False)
    out = measure_cell(spec)
    # Everything the measurement runs was compiled in load (here already by the module's backend:
    # dynamo reuses a graph for another module of the same shapes, its weights being inputs).
    assert out["compiles"] == dict(load=out["compiles"]["load"], warmup=0, measured=0)
    assert out["backend_info"]["expected_shapes"] == (BATCH, PROMPT, GEN)
    assert out["backend_info"]["compiles_in_load"] == out["compiles"]["load"]


# -- options, precisions, probe ------------------------------------------------------------

def test_cuda_compiles_with_cuda_graphs_and_the_cpu_without():
    assert compile_options("cuda") == dict(backend="inductor", mode="reduce-overhead")
    assert compile_options("cpu") == dict(backend="inductor", mode="default")
    assert compile_options("cuda", mode="max-autotune") == dict(backend="inductor", mode="max-autotune")
    assert compile_options("cpu", freezing=True) == dict(backend="inductor", options={"freezing": True})
    assert compile_options("cpu", freezing=True, max_autotune=True) == dict(
        backend="inductor", options={"freezing": True, "max_autotune": True})
    with pytest.raises(ValueError, match="max_autotune is offered with freezing"):
        compile_options("cpu", max_autotune=True)
    with pytest.raises(ValueError, match="freezing is an inductor option"):
        compile_options("cuda", freezing=True)
    with pytest.raises(ValueError, match="'xpu' is not one of"):
        compile_options("xpu")
    # Building the backend needs no GPU; only load does.
    assert CompileBackend(device="cuda", precision="fp16").compile_kwargs["mode"] == "reduce-overhead"
    assert CompileBackend().compile_kwargs["mode"] == "default"


def test_fp16_needs_cuda():
    with pytest.raises(UnsupportedPrecision, match="'fp16': fp16 needs CUDA.*fp32, bf16"):
        CompileBackend(precision="fp16")


def test_bf16_is_native_with_avx512_bf16_or_amx():
    assert CompileBackend.native_precisions({}) == ()
    assert CompileBackend.native_precisions({"avx512_bf16": True}) == ("bf16",)
    assert CompileBackend.native_precisions({"amx_bf16": True}) == ("bf16",)


def test_probe_without_a_cpp_compiler_says_how_to_install_one(monkeypatch):
    from torch._inductor import config

    # Inductor's own search, made to find nothing: no conda download, no such compiler.
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    with config.patch({"cpp.cxx": (None, "no-such-c++-compiler")}):  # (monkeypatch would delete the entry)
        probe = CompileBackend.probe()
    assert not probe.available
    assert "C++ compiler" in probe.reason and "no-such-c++-compiler" in probe.reason
    assert probe.fix.startswith("apt-get install g++")


def test_probe_finds_the_compiler_here():
    probe = CompileBackend.probe()
    if not probe.available:
        pytest.skip(f"compile unavailable: {probe.reason}")
    assert probe.versions["cxx"] and probe.devices[0] == "cpu"


def test_cuda_path(tiny_model):
    probe = compiled.cuda_probe()
    if not probe.available:
        with pytest.raises(BackendUnavailable, match="backend 'compile' on cuda") as err:
            CompileBackend(device="cuda", precision="fp16").load(tiny_model)
        assert probe.reason in str(err.value)
        pytest.skip(f"compile on cuda unavailable: {probe.reason}")
    with CompileBackend(device="cuda", precision="fp16") as b, EagerBackend() as e:
        b.expect(BATCH, PROMPT, GEN)
        b.load(tiny_model)
        e.load(tiny_model)
        assert b.info()["cuda_graphs"] is True
        before = b.compile_count()
        ids = torch.randint(0, 512, (BATCH, PROMPT), generator=torch.Generator().manual_seed(3))
        result = check_parity(b, e, ids, steps=GEN)
        assert result.passed, result
        assert b.compile_count() == before


def test_plain_attention_of_the_decode_step_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 32, generator=g)  # (B, n_head, 1, head_dim)
    k, v = torch.randn(2, 4, 64, 32, generator=g), torch.randn(2, 4, 64, 32, generator=g)
    allowed = torch.arange(64).view(1, 1, 1, 64) < torch.tensor([10, 40]).view(2, 1, 1, 1)  # (B, 1, 1, 64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(compiled._attend(q, k, v, allowed), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention='flash' is not one of: math, sdpa"):
        CompileBackend(attention="flash")


def test_compile_trains_a_compiled_module_through_the_training_hook():
    """The train scenario's hook: a compiled module, loss lowered by the timed steps, and
    freezing (weights as constants) refused for training."""
    from backends.base import BackendError
    from backends.compile import CompileBackend
    from bench.scenarios.train import measure_train
    from bench.spec import CellSpec

    spec = CellSpec(model="tiny", backend="compile", precision="fp32", device="cpu", batch=2, threads=1,
                    scenario="train", seq_len=32, train_steps=2, warmup_steps=1)
    record = measure_train(spec)
    assert record["backend_info"]["backend"] == "compile" and record["backend_info"]["compiles_total"] >= 1
    assert record["loss_after"] < record["loss_before"]
    frozen = CompileBackend(training=True, freezing=True)
    with pytest.raises(BackendError, match="cannot train"):
        frozen.prepare_training(build_model(get_config("tiny")), None)


# -- the Llama family: grouped-query static cache, rotary, a sliding window --------------------------

@pytest.fixture(scope="module")
def llama():
    """llama-tiny (4 query heads on 2 key/value heads) with a sliding window shorter than a prompt
    plus its generation, so the decode step's window term is exercised; and eager on it."""
    probe = CompileBackend.probe()
    if not probe.available:
        pytest.skip(f"compile unavailable: {probe.reason}")
    model = build_model(get_config("llama-tiny", sliding_window=6, qkv_bias=True), seed=2)
    with CompileBackend() as b, EagerBackend() as e:
        b.expect(BATCH, PROMPT, GEN)
        b.load(model)
        e.load(model)
        yield b, e


def test_llama_static_cache_holds_n_kv_head_heads_and_matches_eager(llama, prompt):
    backend, eager = llama
    cfg = backend.model.config
    before = backend.compile_count()
    logits, cache = backend.prefill(prompt)
    for _ in range(GEN - 1):  # the shapes load compiled: no new graph at any length
        logits, cache = backend.decode(logits.argmax(-1, keepdim=True), cache)
    assert backend.compile_count() == before
    assert all(t.shape == (BATCH, cfg.n_kv_head, 64, cfg.head_dim) for t in (*cache.buffers.keys, *cache.buffers.values))
    assert cfg.n_kv_head == 2 < cfg.n_head
    result = check_parity(backend, eager, prompt, steps=GEN)  # 8 + 7 positions > the window of 6
    assert result.token_agreement == 1.0 and result.max_abs_logit_diff < 1e-4, result


def test_llama_left_padded_batch_and_beams_match_eager(llama):
    backend, eager = llama
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9]]
    ours, theirs = Recorder(backend), Recorder(eager)
    assert generate(ours, prompts, GEN - 1) == generate(theirs, prompts, GEN - 1)
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    prompt = [[5, 7, 11, 13, 17, 19, 23, 29]]
    assert generate(backend, prompt, 5, num_beams=2) == generate(eager, prompt, 5, num_beams=2)


def test_the_decode_step_reads_grouped_heads_as_eager_does():
    """The step's grouped-query attention (query heads laid along the query axis) and its window,
    uncompiled, against the model's own forward, with multi-query attention too (one kv head)."""
    for overrides in (dict(n_kv_head=1), dict(n_kv_head=2, sliding_window=3)):
        model = build_model(get_config("llama-tiny", **overrides), seed=1)
        cfg = model.config
        ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
        for attention in ("sdpa", "math"):
            step = compiled.StaticDecoder(model, attention)
            buffers = compiled._Buffers(cfg, 2, 16, torch.float32, "cpu")
            with torch.no_grad():
                full, _ = model(ids)
                _, present = model(ids[:, :4])
                for (k, v), kc, vc in zip(present, buffers.keys, buffers.values):
                    kc[:, :, :4].copy_(k)
                    vc[:, :, :4].copy_(v)
                buffers.valid[:, :4] = True
                buffers.index.fill_(4)
                for t in range(4, 10):
                    logits = step(ids[:, t:t + 1], torch.full((2, 1), t), torch.ones(2, 1, dtype=torch.bool),
                                  buffers.index, buffers.keys, buffers.values, buffers.valid)
                    torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)
