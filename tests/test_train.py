"""The training loop: repeatable, resumable exactly, early stopping, and refusing bad input."""

import json
import math
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.corpus import load_corpus
from model.gpt import build_model, get_config
from model.tokenizer import HFTokenizer, load_tokenizer
from model.train import (OutputDirError, TrainConfig, TrainingDataError, lr_factor, make_optimizer, check_out_dir,
                         corpus_run_key, finished_run, read_metrics, train, train_on_corpus)

TINY = get_config("tiny", dropout=0.1)  # dropout exercises the saved torch RNG state
SMALL_RUN = dict(batch_size=4, context=16, warmup_steps=2, eval_every=25, eval_batches=2,
                 checkpoint_every=25, keep_last=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread for these tests


def streams(seed=0, n_train=4000, n_val=600):
    """A learnable stream: a repeating pattern with noise, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, TINY.vocab_size, (37,), generator=g)
    def make(n):
        ids = pattern.repeat(n // 37 + 1)[:n].clone()
        noise = torch.rand(n, generator=g) < 0.1
        ids[noise] = torch.randint(0, TINY.vocab_size, (int(noise.sum()),), generator=g)
        return ids
    return make(n_train), make(n_val)


def weights(directory):
    return load_checkpoint(directory).state_dict()


def snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_fifty_plus_fifty_resumed_steps_equal_a_hundred_straight(tmp_path):
    config = TrainConfig(steps=100, **SMALL_RUN)
    train_ids, val_ids = streams()
    straight = train(TINY, config, train_ids, val_ids, tmp_path / "straight")

    paused = train(TINY, config, train_ids, val_ids, tmp_path / "resumed", stop_at=50)
    assert paused.status == "paused" and paused.step == 50
    resumed = train(TINY, config, train_ids, val_ids, tmp_path / "resumed", resume=True)
    assert resumed.status == "complete" and resumed.step == 100

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    losses = lambda d: [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(d)]
    got, want = losses(tmp_path / "resumed"), losses(tmp_path / "straight")
    assert [s for s, *_ in got] == list(range(1, 101))
    for (s1, l1, v1), (s2, l2, v2) in zip(got, want):
        assert l1 == pytest.approx(l2, rel=1e-5) and (v1 is None) == (v2 is None)
    assert resumed.best_val_loss == pytest.approx(straight.best_val_loss, rel=1e-5)


def test_a_run_leaves_loadable_weights_the_best_and_the_last_checkpoints(tmp_path):
    config = TrainConfig(steps=100, **SMALL_RUN)
    seen = []
    summary = train(TINY, config, *streams(), tmp_path, on_step=seen.append)
    assert [p.step for p in seen] == list(range(1, 101)) and seen[-1].eta_s == 0
    assert [p.step for p in seen if p.val_loss is not None] == [25, 50, 75, 100]
    assert "step 100/100 | loss" in seen[-1].line() and "tok/s | ETA 0:00 | val" in seen[-1].line()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000075", "step-000100"]  # keep_last=2
    assert (tmp_path / "step-000100" / "training_state.pt").is_file()
    assert load_checkpoint(tmp_path).config == TINY and load_checkpoint(tmp_path / "best").config == TINY
    assert summary.val_loss < math.log(TINY.vocab_size), "it learned the pattern"
    assert summary.best_step in (25, 50, 75, 100) and summary.tokens_seen == 100 * config.tokens_per_step
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "complete" and run["train_config"] == config.to_dict()
    records = read_metrics(tmp_path)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [25, 50, 75, 100]


def test_the_same_seed_repeats_a_run_and_another_seed_does_not(tmp_path):
    config = TrainConfig(steps=5, **SMALL_RUN)
    train(TINY, config, *streams(), tmp_path / "a")
    train(TINY, config, *streams(), tmp_path / "b")
    train(TINY, TrainConfig(steps=5, seed=1, **SMALL_RUN), *streams(), tmp_path / "c")
    a, b, c = (weights(tmp_path / d)["lm_head.weight"] for d in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_early_stopping_when_validation_loss_stops_improving(tmp_path):
    # Training on ids 0..99 while validating on 100..199 makes the validation loss rise.
    g = torch.Generator().manual_seed(0)
    train_ids = torch.randint(0, 100, (2000,), generator=g)
    val_ids = torch.randint(100, 200, (500,), generator=g)
    config = TrainConfig(steps=100, batch_size=4, context=16, warmup_steps=1, eval_every=2, eval_batches=1,
                         checkpoint_every=50, patience=3)
    summary = train(TINY, config, train_ids, val_ids, tmp_path)
    assert summary.status == "stopped_early"
    assert summary.best_step == 2 and summary.step == 8  # three evaluations (4, 6, 8) without a new best
    assert (tmp_path / "step-000008").is_dir() and load_checkpoint(tmp_path / "best")
    again = train(TINY, config, train_ids, val_ids, tmp_path, resume=True)
    assert again.status == "stopped_early" and again.step == 8, "a stopped run stays stopped"


def test_gradient_accumulation_matches_one_bigger_batch(tmp_path):
    tiny = get_config("tiny")  # no dropout: its masks depend on the batch shape
    base = dict(SMALL_RUN, batch_size=4)
    train(tiny, TrainConfig(steps=3, **base), *streams(), tmp_path / "big")
    train(tiny, TrainConfig(steps=3, **dict(base, batch_size=2, grad_accum=2)), *streams(), tmp_path / "accum")
    a, b = weights(tmp_path / "big"), weights(tmp_path / "accum")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_changes_memory_not_results(tmp_path):
    tiny = get_config("tiny")
    train(tiny, TrainConfig(steps=3, **SMALL_RUN), *streams(), tmp_path / "plain")
    train(tiny, TrainConfig(steps=3, grad_checkpointing=True, **SMALL_RUN), *streams(), tmp_path / "ckpt")
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains(tmp_path):
    summary = train(TINY, TrainConfig(steps=4, precision="bf16", **SMALL_RUN), *streams(), tmp_path)
    assert math.isfinite(summary.train_loss) and math.isfinite(summary.val_loss)
    assert load_checkpoint(tmp_path).transformer.wte.weight.dtype == torch.float32


def test_the_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    f = lr_factor(config)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(99) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(f(i) >= f(i + 1) for i in range(10, 99))


def test_weight_decay_only_on_matrix_weights():
    model = build_model(TINY)
    decay, no_decay = make_optimizer(model, TrainConfig()).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(".weight") and "ln_" not in n and "wte" not in n and "wpe" not in n for n in decayed)
    assert "transformer.h.0.attn.c_attn.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_an_out_dir_holding_a_different_model_is_refused_untouched(tmp_path):
    save_checkpoint(build_model(get_config("tiny", n_layer=1)), tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(OutputDirError, match=f"{tmp_path}.*different model.*n_layer=1 there, 2 here"):
        train(TINY, TrainConfig(steps=2, **SMALL_RUN), *streams(), tmp_path)
    assert snapshot(tmp_path) == before


def test_an_existing_run_is_resumed_only_on_request_and_with_the_same_config(tmp_path):
    config = TrainConfig(steps=2, **SMALL_RUN)
    train(TINY, config, *streams(), tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(OutputDirError, match="already holds a training run"):
        train(TINY, config, *streams(), tmp_path)
    with pytest.raises(OutputDirError, match="different train config.*lr="):
        train(TINY, TrainConfig(steps=2, lr=5e-4, **SMALL_RUN), *streams(), tmp_path, resume=True)
    assert snapshot(tmp_path) == before


def test_a_non_empty_directory_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty"):
        check_out_dir(tmp_path, TINY, TrainConfig(), resume=False)


def test_streams_shorter_than_the_context_are_refused(tmp_path):
    config = TrainConfig(steps=2, **SMALL_RUN)
    with pytest.raises(TrainingDataError, match="fewer than context \\+ 1 = 17"):
        train(TINY, config, torch.arange(16), torch.arange(100), tmp_path / "out")
    with pytest.raises(TrainingDataError, match="block_size=256"):
        train(TINY, TrainConfig(steps=2, context=512), torch.arange(1000), torch.arange(1000), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "steps=0"), (dict(precision="fp16"), "precision='fp16'"),
    (dict(min_lr=1.0, lr=0.1), "min_lr=1.0"), (dict(warmup_steps=-1), "warmup_steps=-1"),
    (dict(grad_clip=-1.0), "grad_clip=-1.0"),
])
def test_train_config_names_the_bad_value(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_train_config_from_a_file_refuses_unknown_keys():
    assert TrainConfig.from_dict(dict(steps=7, lr=3e-4)) == TrainConfig(steps=7, lr=3e-4)
    with pytest.raises(ValueError, match="unknown train config keys: stepz"):
        TrainConfig.from_dict(dict(stepz=7))


def _text_corpus(directory: Path, n_files=30) -> Path:
    directory.mkdir()
    for i in range(n_files):
        (directory / f"mod{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n"
                                                        for j in range(20)))
    return directory


def test_train_on_corpus_ships_tokenizer_manifest_and_a_cache_key(tmp_path):
    corpus = load_corpus(_text_corpus(tmp_path / "corpus"))
    config = TrainConfig(steps=4, **SMALL_RUN)
    tiny = get_config("tiny")
    summary = train_on_corpus(tiny, config, corpus, tmp_path / "run")
    out = tmp_path / "run"
    assert summary.key == corpus_run_key(tiny, config, corpus) == json.loads((out / "run.json").read_text())["key"]
    assert finished_run(out, summary.key)["status"] == "complete"
    assert finished_run(out, "another key") is None
    assert json.loads((out / "corpus_manifest.json").read_text())["digest"] == corpus.digest
    tok = load_tokenizer(out, tiny.vocab_size)
    assert isinstance(tok, HFTokenizer) and tok.eos_token_id == 2
    assert (out / "best" / "tokenizer.json").is_file() and (out / "step-000004" / "tokenizer.json").is_file()
    assert corpus_run_key(tiny, TrainConfig(steps=4, seed=1, **SMALL_RUN), corpus) != summary.key
    assert corpus_run_key(tiny, config, load_corpus(tmp_path / "corpus", max_bytes=5000)) != summary.key


def test_a_corpus_too_small_for_the_context_is_a_clear_error_before_writing(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("x = 1\n" * 30)
    corpus = load_corpus(small)
    with pytest.raises(TrainingDataError, match=f"{small}: the val split has .* tokens"):
        train_on_corpus(get_config("tiny"), TrainConfig(steps=2, batch_size=2, context=64), corpus, tmp_path / "run")
    assert not (tmp_path / "run").exists()
