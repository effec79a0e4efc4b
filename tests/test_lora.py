"""LoRA and QLoRA fine-tuning: only adapters train, the base is untouched, adapters save alone and
load onto their own base only, and merged weights compute what the adapted model does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backends.int8 import FrozenQuantLinear
from bench.cli import main
from bench.training import FineTuneStart
from model.checkpoint import load_checkpoint, save_checkpoint
from model.gpt import build_model, get_config
from model.lora import (ADAPTER_WEIGHTS, AdapterError, LoRAConfig, LoRALinear, load_adapter, merge_lora,
                        trainable_parameters)
from model.tokenizer import train_bpe
from model.train import TrainConfig, train

RUN = TrainConfig(steps=6, batch_size=4, context=16, warmup_steps=1, lr=1e-2, eval_every=3, eval_batches=2,
                  checkpoint_every=3)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread for these tests


@pytest.fixture(scope="module")
def tokenizer():
    import argparse
    text = Path(argparse.__file__).read_text()
    return train_bpe([text], 512)


def make_base(directory: Path, preset: str, tokenizer, seed: int = 0) -> Path:
    save_checkpoint(build_model(get_config(preset), seed=seed), directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module", params=["tiny", "llama-tiny"])
def base(request, tmp_path_factory, tokenizer) -> Path:
    return make_base(tmp_path_factory.mktemp(request.param) / "base", request.param, tokenizer)


def streams(seed=0):
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 512, (23,), generator=g)
    return pattern.repeat(120), pattern.repeat(20)


class Keep:
    """An ``init`` that keeps the model it makes, to look at after training (one process only)."""

    def __init__(self, start):
        self.start, self.model = start, None

    def __call__(self):
        self.model = self.start()
        return self.model


def fine_tune(base: Path, out: Path, lora=LoRAConfig(rank=4), precision="fp32"):
    start = FineTuneStart.open(str(base), lora, precision, seed=0)
    keep = Keep(start)
    summary = train(start.config, RUN, *streams(), out, tokenizer=start.tokenizer, init=keep)
    return summary, keep.model


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    summary, model = fine_tune(base, out)
    return out, summary, model


def test_only_adapters_train_and_the_base_is_untouched(base, tuned):
    out, summary, model = tuned
    assert summary.status == "complete"
    original = load_checkpoint(base).state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert trainable_parameters(model) < 0.1 * sum(t.numel() for t in original.values())
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base.", ".")
        assert torch.equal(tensor, original[key]), f"{name} changed"  # byte for byte
    assert all(layer.lora_B.abs().sum() > 0 for layer in model.modules() if isinstance(layer, LoRALinear))
    # one more backward pass: gradients on the adapters and nowhere else
    x = torch.randint(0, 512, (2, 8))
    model.zero_grad(set_to_none=True)
    model(x, targets=x)[0].backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable


def test_the_adapter_is_saved_alone_small_with_the_base_digest(base, tuned):
    out, _, _ = tuned
    assert not (out / "model.safetensors").exists()
    for directory in (out, out / "best", out / "step-000006"):
        assert (directory / ADAPTER_WEIGHTS).is_file()
        assert (directory / ADAPTER_WEIGHTS).stat().st_size < (base / "model.safetensors").stat().st_size / 5
    doc = json.loads((out / "adapter_config.json").read_text())
    assert doc["lora"]["rank"] == 4 and doc["base"]["source"] == str(base.resolve())


def test_save_load_merge_give_the_adapted_models_logits(base, tuned, tmp_path):
    out, _, trained = tuned
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        expected = trained.eval()(x)[0]
        loaded = load_adapter(load_checkpoint(base), out).eval()
        torch.testing.assert_close(loaded(x)[0], expected, rtol=0, atol=0)
        merged = merge_lora(loaded)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(x)[0], expected, rtol=1e-5, atol=1e-5)
    # bench convert --merge-lora: an ordinary checkpoint of the merged weights, base found from the adapter
    assert main(["convert", "--merge-lora", str(out), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "merged")(x)[0], expected, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_an_adapter_on_another_base_is_refused_in_one_line(base, tuned, tmp_path, capsys, tokenizer):
    out, _, _ = tuned
    preset = "llama-tiny" if load_checkpoint(base).config.family == "llama" else "tiny"
    other = make_base(tmp_path / "other", preset, tokenizer, seed=1)
    with pytest.raises(AdapterError, match="trained on base"):
        load_adapter(load_checkpoint(other), out)
    capsys.readouterr()
    rc = main(["convert", "--merge-lora", str(out), "--checkpoint", str(other), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "trained on base" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_frozen_quantised_base_passes_gradients_through_its_dequantised_weight(precision):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)  # 96: int4 groups of 32
    frozen = FrozenQuantLinear(linear, precision)
    assert frozen.quantized_bytes() < linear.weight.numel() * 4 / (3 if precision == "int8" else 5)
    w = frozen.dequantized()
    assert (w - linear.weight).abs().max() < (0.01 if precision == "int8" else 0.05)
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = frozen(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, linear.bias))
    y.square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(ref, w, linear.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_qlora_trains_adapters_on_an_int4_base_and_merges_onto_the_fp32_one(base, tmp_path):
    out = tmp_path / "qlora"
    summary, model = fine_tune(base, out, precision="int4")
    assert summary.status == "complete" and summary.train_loss == summary.train_loss  # finite
    quantised = [m for m in model.modules() if isinstance(m, FrozenQuantLinear)]
    assert len(quantised) == 4 * model.config.n_layer and all(m.precision == "int4" for m in quantised)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    doc = json.loads((out / "adapter_config.json").read_text())
    assert doc["base"]["precision"] == "int4"
    merged = merge_lora(load_adapter(load_checkpoint(base), out))  # the adapter names the fp32 base
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(merged(x)[0]).all()


def test_bench_train_from_a_checkpoint_with_lora(base, tmp_path, capsys):
    if load_checkpoint(base).config.family == "llama":
        pytest.skip("the CLI path is the same for both families; once is enough")
    corpus = tmp_path / "corpus.txt"
    import argparse
    corpus.write_text(Path(argparse.__file__).read_text())
    out, store = tmp_path / "run", tmp_path / "bench.sqlite"
    args = ["train", "--from", str(base), "--lora-rank", "4", "--lora-targets", "attn.c_attn,mlp.c_fc",
            "--steps", "2", "--batch-size", "2", "--context", "16", "--eval-every", "2", "--warmup-steps", "1",
            "--corpus", str(corpus), "--out", str(out), "--store", str(store), "--threads", "1", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "complete" and summary["step"] == 2
    doc = json.loads((out / "adapter_config.json").read_text())
    assert doc["lora"]["targets"] == ["attn.c_attn", "mlp.c_fc"] and doc["lora"]["alpha"] == 8.0
    run = json.loads((out / "run.json").read_text())
    assert run["start"]["lora"]["rank"] == 4 and run["start"]["digest"] == doc["base"]["digest"]
    # refusals: one line each, nothing trained
    rc = main(["train", "--model", "tiny", "--lora-rank", "4", "--out", str(tmp_path / "x"), "--store", str(store)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "give --from CKPT" in err
    rc = main(["train", "--from", str(base), "--base-precision", "int4", "--out", str(tmp_path / "y"),
               "--store", str(store)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "needs --lora-rank" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_training_cell_with_lora_rank_trains_only_the_adapters(tmp_path, capsys):
    from backends.base import Probe
    from bench.planner import Sweep, SweepError, plan
    from bench.store import Store
    from bench.sweep import run_sweep

    sweep = Sweep(scenario="train", models=["tiny"], backends=["eager"], precisions=["fp32"], batches=[2], threads=[1],
                  seq_lens=[16], grad_checkpointing=[False], launches=1, train_steps=2, warmup_steps=1,
                  timeout_s=300.0, options={"lora_rank": [4]})
    fp = {"cpu": {"brand": "Test CPU", "isa": {"avx2": True}}, "versions": {"torch": "2.8.0"}, "python": "3.11"}
    with Store(tmp_path / "bench.sqlite") as store:
        run_id = run_sweep(sweep, store, {"eager": Probe(True)}, fp,
                           sentinel=lambda threads: {"decode_ms": 1.0, "gemv_gb_s": 10.0})
        [cell] = store.get_run(run_id)["cells"]
    assert cell["status"] == "ok", cell.get("reason")
    config = get_config("tiny")
    adapters = 2 * 4 * sum(fc.in_features + fc.out_features for fc in build_model(config).transformer.h[0].modules()
                           if isinstance(fc, torch.nn.Linear))  # A (r, in) + B (out, r) per Linear, 2 layers
    assert cell["lora_rank"] == 4 and cell["trainable_params"] == adapters < config.n_params / 10
    assert cell["grads_mb"] == pytest.approx(adapters * 4 / 2**20) and cell["optimizer_mb"] < cell["weights_mb"] / 5
    assert all(x == x for x in cell["losses"])  # finite
    with pytest.raises(SweepError, match="an option of training cells"):
        plan(Sweep(models=["tiny"], backends=["eager"], options={"lora_rank": [4]}), {"eager": Probe(True)},
             available_bytes=2**36)
