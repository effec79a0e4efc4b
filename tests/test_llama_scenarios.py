"""Every scenario on the Llama family: estimates that follow its shape, training, quality,
continuous batching, generation, sweeps and quantised files, on ``llama-tiny`` (GQA: 4 heads and
2 key/value heads, SwiGLU 352, rotary, RMSNorm, no biases).

The estimates are checked against numbers worked out by hand from the published shapes (and the
activation estimate against the tensors torch really saves); the commands run end to end, a few
steps or tokens each. No test asserts on how fast anything ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backends.base import Probe
from backends.eager import EagerBackend
from bench.cli import main
from bench.machine.roofline import decode_bound, kv_cache_bytes, weight_bytes
from bench.models import describe
from bench.planner import Sweep, plan
from bench.planner.cells import (GiB, block_widths, estimate_peak_bytes, estimate_train_peak_bytes,
                                 saved_activation_width)
from model.gpt import build_model, get_config, rotary_tables

AVAILABLE = Probe(True)


# -- estimates: the roofline and the memory guard ------------------------------------------------

def test_kv_cache_bytes_count_key_value_heads_not_query_heads():
    smol = get_config("smollm2-135m")  # 30 layers, 9 heads of 64, 3 key/value heads
    assert kv_cache_bytes(smol, 1, 1, "fp32") == 2 * 30 * 3 * 64 * 4 == 46_080
    assert kv_cache_bytes(smol, 4, 100, "bf16") == 2 * 30 * 3 * 64 * 2 * 4 * 100
    assert kv_cache_bytes(smol, 1, 1, "int8") == 46_080  # the int8 backends keep the cache fp32
    qwen = get_config("qwen2.5-0.5b")  # 24 layers, 14 heads of 64, 2 key/value heads
    assert kv_cache_bytes(qwen, 1, 1, "fp32") == 2 * 24 * 2 * 64 * 4


def test_weight_bytes_count_swiglu_untied_heads_and_gqa_by_hand():
    C, I, L, V, kv = 576, 1536, 30, 49152, 3 * 64
    block = C * (C + 2 * kv) + C * C + 3 * C * I + 2 * C  # q, k, v, o, gate, up, down, two RMSNorms
    smol = V * C + L * block + C  # tied head: the embedding is the head
    assert smol == 134_515_008  # SmolLM2-135M's published parameter count
    assert weight_bytes(get_config("smollm2-135m"), "fp32") == 4 * smol
    C, I, L, V, kv = 4096, 14336, 32, 32000, 8 * 128
    mistral = 2 * V * C + L * (C * (C + 2 * kv) + C * C + 3 * C * I + 2 * C) + C  # untied: embedding and head
    assert mistral == 7_241_732_096  # Mistral-7B's published parameter count
    assert weight_bytes(get_config("mistral-7b"), "bf16") == 2 * mistral


def test_decode_bound_of_llama_tiny_by_hand():
    config = get_config("llama-tiny")  # 2 layers, width 128, kv_dim 2 x 32, SwiGLU 352, vocab 512, tied
    matmul = 2 * (128 * (128 + 2 * 64) + 128 * 128 + 3 * 128 * 352) + 512 * 128  # blocks' matrices + head
    assert matmul == 434_176
    bound = decode_bound(config, 1, 10, "fp32", dict(bandwidth_gb_s=1.0, peak_gflops={"fp32": 1e9}))
    assert bound["bytes_per_step"] == 4 * matmul + 2 * 2 * 10 * 64 * 4  # weights + a 10-token GQA cache
    assert bound["flops_per_step"] == 2 * matmul + 2 * 2 * 2 * 10 * 128  # every query head reads the cache
    assert bound["bound"] == "memory"


def test_activation_widths_reduce_to_gpt2s_and_follow_the_llama_shape():
    gpt2 = get_config("gpt2")
    assert sum(block_widths(gpt2).values()) == 8 * 768  # the GELU MLP's 4C, q/k/v 3C, residual C
    assert saved_activation_width(gpt2) == 34 * 768  # Korthikanti et al.'s 34 h
    tiny = get_config("llama-tiny")
    # q, k, v (128 + 2 x 64), k and v repeated to 4 heads (2 x 128), SwiGLU gate, up and product (3 x 352), residual
    assert block_widths(tiny) == dict(qkv=256, kv_repeat=256, mlp=1056, residual=128)
    # attention 7C + 4 kv_dim + 4C (repeated k, v), MLP 3C + 8I, two RMSNorms 8C
    assert saved_activation_width(tiny) == (7 * 128 + 4 * 64 + 4 * 128) + (3 * 128 + 8 * 352) + 8 * 128


def test_inference_and_training_estimates_by_hand():
    tiny = get_config("llama-tiny")
    fp32, B, T, S = 4 * tiny.n_params, 2, 16, 24
    kv = 2 * 2 * 64 * 4  # bytes a token
    assert estimate_peak_bytes(tiny, "eager", "bf16", B, S, T, parity=True) == (
        fp32 + fp32 // 2 + 2 * B * S * kv + 4 * B * T * (4 * T + 1696 + 512) + fp32 + 2 * S * kv
        + int(0.8 * GiB))
    W = saved_activation_width(tiny)
    layer = 2 * B * T * (W + 5 * 4 * T)
    assert estimate_train_peak_bytes(tiny, "fp32", B, T, False) == (
        4 * fp32 + 2 * layer + 3 * 4 * B * T * 512 + int(0.8 * GiB))
    assert estimate_train_peak_bytes(tiny, "bf16", B, T, True) == (
        4 * fp32 + fp32 // 2 + 2 * 4 * B * T * 128 + layer + 3 * 4 * B * T * 512 + int(0.8 * GiB))


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny", "qwen2.5-0.5b"])
def test_the_training_estimate_covers_what_a_block_really_saves(preset):
    """The tensors one block saves for its backward pass in fp32 (a saved-tensor hook, weights
    left out) never exceed the per-layer estimate: the count follows the family, GQA and SwiGLU included."""
    config = get_config(preset, n_layer=1, vocab_size=512)
    model = build_model(config).train()
    B, T = 2, 32
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(B, T, config.n_embd, requires_grad=True)  # the block's input
    pos = torch.arange(T).expand(B, T)
    rotary = rotary_tables(config, pos, x.dtype) if config.pos_encoding == "rotary" else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.transformer.h[0](x, None, None, True, rotary)
    measured = sum(saved.values())
    estimate = 2 * B * T * (saved_activation_width(config) + 5 * config.n_head * T)
    assert 0 < measured <= estimate


def test_the_planner_refuses_mistral_7b_on_24_gib_and_names_its_estimate():
    sweep = Sweep(models=["mistral-7b", "smollm2-135m"], backends=["eager"], batches=[1], threads=[1])
    cells = {c.spec.model: c for c in plan(sweep, {"eager": AVAILABLE}, available_bytes=24 * GiB, isa={})}
    refused, fits = cells["mistral-7b"], cells["smollm2-135m"]
    need = estimate_peak_bytes(get_config("mistral-7b"), "eager", "fp32", 1, sweep.prompt_len + sweep.gen_len,
                               sweep.prompt_len, sweep.parity)
    assert refused.skip_reason.startswith(f"estimated peak memory {need / GiB:.1f} GiB (largest parts: ")
    assert "fp32 weights 27.0 GiB" in refused.skip_reason  # 7.24 B parameters, the untied head included
    assert refused.skip_reason.endswith("exceeds 85% of the 24.0 GiB available")
    assert fits.skip_reason == "" and 0 < fits.peak_bytes < 0.85 * 24 * GiB
    train = Sweep(models=["llama-3.2-1b"], backends=["eager"], batches=[4], threads=[1], scenario="train",
                  seq_lens=[512], grad_checkpointing=[False])
    (cell,) = plan(train, {"eager": AVAILABLE}, available_bytes=24 * GiB, isa={})
    assert "weights, gradients and AdamW 18.4 GiB" in cell.skip_reason  # 4 x 1.24 B x 4 bytes


def test_describe_names_the_family_and_the_shape():
    assert describe(get_config("smollm2-135m")) == "llama · 30 layers · 9 heads (3 kv) · 576 wide · SwiGLU 1536"
    assert describe(get_config("gpt2")) == "gpt2 · 12 layers · 12 heads · 768 wide · GELU 3072"
    assert describe(get_config("mistral-7b")).endswith("untied head · window 4096")


# -- training ------------------------------------------------------------------------------------

def test_a_few_steps_of_llama_tiny_lower_the_loss_and_save_a_checkpoint_that_generates(tmp_path):
    from model.checkpoint import load_checkpoint
    from model.generate import generate
    from model.train import TrainConfig, make_optimizer, train

    config = get_config("llama-tiny")
    cycle = [20, 31, 45, 27, 60, 38, 52]
    stream = torch.tensor(cycle * 600)  # easy to learn
    hyper = TrainConfig(steps=10, batch_size=4, context=32, lr=3e-3, warmup_steps=2, eval_every=10, eval_batches=2,
                        checkpoint_every=10, precision="bf16", grad_checkpointing=True)
    summary = train(config, hyper, stream[:3000], stream[3000:], tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary.status == "complete" and losses[-1] < 0.6 * losses[0] and summary.val_loss < 0.6 * losses[0]
    model = load_checkpoint(tmp_path / "run")
    assert model.config == config and model.config.family == "llama"
    with EagerBackend() as backend:
        backend.load(model)
        out = generate(backend, [stream[:12].tolist()], 8)[0]
    assert len(out) == 8 and set(out) <= set(cycle)  # it has learned which tokens the stream holds
    # Weight decay by shape, not by name: an untied head is decayed, the RMSNorm gains are not.
    untied = build_model(get_config("llama-tiny", tie_embeddings=False))
    decay, no_decay = make_optimizer(untied, hyper).param_groups
    assert any(p is untied.lm_head.weight for p in decay["params"])
    assert any(p is untied.transformer.ln_f.weight for p in no_decay["params"])
    assert not any(p is untied.transformer.wte.weight for p in decay["params"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import argparse
    import textwrap

    text = "\n".join(Path(m.__file__).read_text() for m in (argparse, textwrap)) * 2
    path = tmp_path_factory.mktemp("corpus") / "corpus.py.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """``bench train --model llama-tiny`` with bf16 autocast and gradient checkpointing."""
    out = tmp_path_factory.mktemp("ckpt") / "llama-tiny-trained"
    store = tmp_path_factory.mktemp("store") / "bench.sqlite"
    assert main(["train", "--model", "llama-tiny", "--steps", "6", "--batch-size", "2", "--context", "32",
                 "--eval-every", "3", "--checkpoint-every", "3", "--warmup-steps", "2", "--threads", "1",
                 "--precision", "bf16", "--grad-checkpointing", "--corpus", str(corpus), "--out", str(out),
                 "--store", str(store), "--json"]) == 0
    return out


def test_bench_train_then_bench_quality_on_a_llama_checkpoint(trained, capsys):
    config = json.loads((trained / "run.json").read_text())
    assert config["model_config"]["n_kv_head"] == 2 and config["train_config"]["precision"] == "bf16"
    assert config["train_config"]["grad_checkpointing"] is True
    assert main(["quality", "--checkpoint", str(trained), "--backend", "eager,int8", "--context", "32",
                 "--max-tokens", "256", "--threads", "1", "--json"]) == 0
    eager, int8 = json.loads(capsys.readouterr().out)["results"]
    assert eager["quality"]["verdict"]["verdict"] == "reference"
    assert eager["quality"]["perplexity"]["perplexity"] > 1
    div = int8["quality"]["divergence"]
    assert div["kl_mean"] >= 0 and 0 < div["same_top"] <= 1 and div["ppl_ratio"] > 0


def test_bench_quantize_a_llama_checkpoint_and_generate_from_the_file(trained, tmp_path, capsys):
    q8 = tmp_path / "q8"
    assert main(["quantize", "--checkpoint", str(trained), "--precision", "int8", "--out", str(q8), "--json"]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(q8), "--backend", "int8", "--prompt", "def f",
                 "--max-new-tokens", "5", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 5
    # int4 with an explicit group that divides llama-tiny's widths (128 and SwiGLU's 352)
    q4 = tmp_path / "q4"
    assert main(["quantize", "--checkpoint", str(trained), "--precision", "int4", "--group-size", "32",
                 "--out", str(q4), "--json"]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(q4), "--backend", "int8", "--precision", "int4",
                 "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


# -- generation and serving ----------------------------------------------------------------------

def test_bench_generate_a_llama_preset(capsys):
    assert main(["generate", "--model", "llama-tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "6",
                 "--json"]) == 0
    ids = json.loads(capsys.readouterr().out)["token_ids"]
    from model.generate import generate
    with EagerBackend() as backend:
        backend.load(build_model(get_config("llama-tiny")))
        assert ids == generate(backend, [[1, 2, 3]], 6)[0]
    assert main(["generate", "--model", "llama-tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                 "--num-beams", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


@pytest.fixture(scope="module")
def sharp_llama():
    """llama-tiny with its matrices scaled up: random weights whose greedy path wanders across the
    vocabulary instead of repeating one token, so a wrong cache, mask or position shows."""
    model = build_model(get_config("llama-tiny"), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def test_continuous_batching_on_llama_gives_each_request_its_tokens_alone(sharp_llama):
    """Requests of different lengths join a running batch mid-generation; the joined, padded and
    trimmed grouped-query cache (n_kv_head heads) gives each the tokens ``generate`` gives it alone."""
    import threading
    import time

    from bench.scenarios.engine import Engine, Metrics, Sequence
    from model.generate import generate

    class Slow(EagerBackend):
        def decode(self, ids, cache, pos=None, mask=None):
            time.sleep(0.003)
            return super().decode(ids, cache, pos, mask)

    backend = Slow()
    backend.load(sharp_llama)
    engine = Engine(backend, block_size=sharp_llama.config.block_size, max_batch=4, metrics=Metrics())
    prompts = [list(range(10 + 7 * i, 10 + 7 * i + n)) for i, n in enumerate((3, 9, 5, 17, 1, 12))]
    done = {i: threading.Event() for i in range(len(prompts))}
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}

    def emitter(i):
        def emit(event):
            if event[0] == "token":
                got[i].append(event[1])
            else:
                done[i].set()
        return emit

    engine.start()
    try:
        for i, p in enumerate(prompts):
            engine.submit(Sequence(prompt=p, max_tokens=16, emit=emitter(i)))
            time.sleep(0.01)  # staggered: later ones join a running batch
        assert all(e.wait(60) for e in done.values())
    finally:
        engine.stop()
    with EagerBackend() as reference:
        reference.load(sharp_llama)
        alone = [generate(reference, [p], 16)[0] for p in prompts]
    assert [got[i] for i in range(len(prompts))] == alone
    assert len({t for seq in alone for t in seq}) > 20  # the paths really differ
    assert engine.joins > 0 and engine.peak_running > 1


def test_bench_run_scenario_serve_on_llama_tiny_names_the_shape(tmp_path, capsys):
    from bench.store import Store

    store = tmp_path / "bench.sqlite"
    assert main(["run", "--scenario", "serve", "--backend", "eager", "--model", "llama-tiny", "--rate", "inf",
                 "--num-requests", "4", "--prompt-len", "4", "--gen-len", "4", "--max-batch", "2",
                 "--store", str(store)]) == 0
    (cell,) = Store(store).get_run("latest")["cells"]
    assert cell["status"] == "ok" and cell["n_ok"] == 4 and cell["batching"] == "continuous"
    assert cell["server"]["model_shape"] == describe(get_config("llama-tiny"))
    assert "llama-tiny (llama · 2 layers · 4 heads (2 kv)" in capsys.readouterr().out


# -- sweeps --------------------------------------------------------------------------------------

def test_bench_run_inference_and_train_cells_on_llama_tiny(tmp_path, capsys):
    store = str(tmp_path / "bench.sqlite")
    assert main(["run", "--model", "llama-tiny", "--backend", "eager", "--precision", "fp32", "--batch", "2",
                 "--threads", "1", "--prompt-len", "8", "--gen-len", "4", "--budget", "1", "--launches", "1",
                 "--store", store, "--json"]) == 0
    (cell,) = json.loads(capsys.readouterr().out)
    config = get_config("llama-tiny")
    assert cell["status"] == "ok" and cell["parity"]["passed"] and cell["n_params"] == config.n_params
    # the cache after prompt + gen_len - 1 tokens, n_kv_head heads: as the roofline counts it
    assert cell["kv_cache_mb"] == pytest.approx(kv_cache_bytes(config, 2, 8 + 4 - 1) / 2**20)
    assert cell["roofline_decode_tok_s"] > 0
    assert main(["run", "--scenario", "train", "--model", "llama-tiny", "--backend", "eager", "--precision",
                 "bf16", "--batch", "2", "--seq-len", "32", "--grad-checkpointing", "on", "--threads", "1",
                 "--train-steps", "3", "--launches", "1", "--store", store, "--json"]) == 0
    (train,) = json.loads(capsys.readouterr().out)
    assert train["status"] == "ok" and train["grad_checkpointing"] is True and train["precision"] == "bf16"
    assert train["loss_after"] < train["loss_before"]
