"""The model itself: config validation, parameter counts, the KV cache, causality and padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.gpt import GPT, PRESETS, GPTConfig, build_model, get_config

ATOL = 1e-5  # fp32: a cached computation differs from a full one only by summation order


def ids_for(config: GPTConfig, B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# -- config --------------------------------------------------------------------------------
def test_indivisible_heads_name_both_values():
    with pytest.raises(ValueError, match=r"n_embd=100 is not divisible by n_head=12"):
        GPTConfig(n_embd=100, n_head=12)


def test_bad_pos_encoding_is_named():
    with pytest.raises(ValueError, match=r"pos_encoding='alibi'"):
        GPTConfig(pos_encoding="alibi")


@pytest.mark.parametrize("field, value", [("n_layer", 0), ("vocab_size", -3), ("block_size", 1.5)])
def test_non_positive_sizes_are_named(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r}"):
        GPTConfig(**{field: value})


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="gpt3") as err:
        get_config("gpt3")
    for name in PRESETS:
        assert name in str(err.value)


def test_preset_overrides_apply():
    config = get_config("tiny", pos_encoding="sinusoidal", tie_embeddings=False)
    assert (config.n_layer, config.pos_encoding, config.tie_embeddings) == (2, "sinusoidal", False)


# -- parameter count -----------------------------------------------------------------------
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
@pytest.mark.parametrize("tie", [True, False])
def test_n_params_matches_the_built_model(preset, pos_encoding, tie):
    config = get_config(preset, pos_encoding=pos_encoding, tie_embeddings=tie)
    # The GPT-2 sizes are built on the meta device: shapes without memory.
    device = "cpu" if preset in ("tiny", "small") else "meta"
    with torch.device(device):
        model = GPT(config)
    assert config.n_params == sum(p.numel() for p in model.parameters())  # tied weights count once


def test_gpt2_preset_is_124m():
    assert get_config("gpt2").n_params == 124_439_808  # GPT-2 small as published by OpenAI


# -- KV cache ------------------------------------------------------------------------------
def test_incremental_decode_matches_one_full_forward(tiny_model):
    ids = ids_for(tiny_model.config, 2, 12)
    with torch.no_grad():
        full, _ = tiny_model(ids)  # (B, T, vocab)
        logits, cache = tiny_model(ids[:, :4])
        steps = [logits]
        for t in range(4, 12):
            logits, cache = tiny_model(ids[:, t:t + 1], past=cache)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert cache[0][0].shape == (2, tiny_model.config.n_head, 12, tiny_model.config.head_dim)


def test_chunked_prefill_with_a_past_matches_one_full_forward(tiny_model):
    ids = ids_for(tiny_model.config, 2, 20, seed=1)
    with torch.no_grad():
        full, _ = tiny_model(ids)
        first, cache = tiny_model(ids[:, :7])
        second, cache = tiny_model(ids[:, 7:15], past=cache)  # several new tokens after a past
        third, _ = tiny_model(ids[:, 15:], past=cache)
    torch.testing.assert_close(torch.cat([first, second, third], dim=1), full, atol=ATOL, rtol=0)


def test_causality_later_tokens_do_not_change_earlier_logits(tiny_model):
    ids = ids_for(tiny_model.config, 1, 16, seed=2)
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % tiny_model.config.vocab_size
    with torch.no_grad():
        a, _ = tiny_model(ids)
        b, _ = tiny_model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=ATOL, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)  # the change is visible after it


def test_last_only_returns_the_last_position(tiny_model):
    ids = ids_for(tiny_model.config, 3, 9, seed=3)
    with torch.no_grad():
        full, cache_full = tiny_model(ids)
        last, cache_last = tiny_model(ids, last_only=True)
    assert last.shape == (3, 1, tiny_model.config.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=ATOL, rtol=0)
    for (k1, v1), (k2, v2) in zip(cache_full, cache_last):  # the cache still covers every token
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


# -- padding -------------------------------------------------------------------------------
def left_padded(ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (1, T) left-padded with ``pad`` tokens: (ids, mask, positions), each (1, pad + T)."""
    padded = torch.cat([torch.full((1, pad), 7), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool)], dim=1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return padded, mask, pos


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_left_padding_gives_the_unpadded_logits(pos_encoding):
    model = build_model(get_config("tiny", pos_encoding=pos_encoding), seed=4)
    ids = ids_for(model.config, 1, 6, seed=4)
    padded, mask, pos = left_padded(ids, pad=5)
    with torch.no_grad():
        want, cache = model(ids, last_only=True)
        got, pcache = model(padded, pos=pos, mask=mask, last_only=True)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        # And the decode steps after it: the mask grows by one real column, the position by one.
        nxt = want.argmax(-1)  # (1, 1)
        want2, _ = model(nxt, past=cache)
        mask2 = torch.cat([mask, torch.ones(1, 1, dtype=torch.bool)], dim=1)
        got2, _ = model(nxt, pos=pos[:, -1:] + 1, past=pcache, mask=mask2)
    torch.testing.assert_close(got2, want2, atol=ATOL, rtol=0)


def test_padding_without_the_mask_changes_the_answer(tiny_model):
    """The mask is what makes padding harmless: without it, the pad tokens are attended."""
    ids = ids_for(tiny_model.config, 1, 6, seed=5)
    padded, _, pos = left_padded(ids, pad=5)
    with torch.no_grad():
        want, _ = tiny_model(ids, last_only=True)
        got, _ = tiny_model(padded, pos=pos, last_only=True)
    assert not torch.allclose(got, want, atol=1e-3)


def test_batch_of_padded_and_unpadded_rows(tiny_model):
    long = ids_for(tiny_model.config, 1, 8, seed=6)
    short = ids_for(tiny_model.config, 1, 3, seed=7)
    padded, mask_short, pos_short = left_padded(short, pad=5)
    ids = torch.cat([long, padded])
    mask = torch.cat([torch.ones(1, 8, dtype=torch.bool), mask_short])
    pos = torch.cat([torch.arange(8).unsqueeze(0), pos_short])
    with torch.no_grad():
        batch, _ = tiny_model(ids, pos=pos, mask=mask, last_only=True)
        alone_long, _ = tiny_model(long, last_only=True)
        alone_short, _ = tiny_model(short, last_only=True)
    torch.testing.assert_close(batch[0], alone_long[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batch[1], alone_short[0], atol=ATOL, rtol=0)


# -- sinusoidal positions ------------------------------------------------------------------
def test_sinusoidal_model_has_no_position_table_and_caches_correctly():
    model = build_model(get_config("tiny", pos_encoding="sinusoidal"), seed=8)
    assert "wpe" not in model.transformer
    ids = ids_for(model.config, 2, 10, seed=8)
    with torch.no_grad():
        full, _ = model(ids)
        first, cache = model(ids[:, :6])
        rest, _ = model(ids[:, 6:], past=cache)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=ATOL, rtol=0)
    # Positions matter: the same tokens at shifted positions give different logits.
    with torch.no_grad():
        shifted, _ = model(ids, pos=torch.arange(3, 13).expand(2, 10))
    assert not torch.allclose(shifted, full, atol=1e-3)


def test_build_model_is_reproducible_and_in_eval_mode():
    a = build_model(get_config("tiny"), seed=3)
    b = build_model(get_config("tiny"), seed=3)
    c = build_model(get_config("tiny"), seed=4)
    assert not a.training
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    assert a.lm_head.weight is a.transformer.wte.weight  # tied by default


def test_checkpointed_loss_in_pieces_equals_the_whole_loss_and_its_gradients():
    """Under gradient checkpointing the LM head and loss run in pieces of LOSS_CHUNK positions
    (200 positions: two pieces here); the loss and every gradient must be those of the plain path."""
    model = build_model(get_config("tiny"), seed=3).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 512, (2, 200), generator=g)
    y = torch.randint(0, 512, (2, 200), generator=g)
    results = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        model.grad_checkpointing = checkpointing
        loss, _ = model(x, targets=y)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (pieces, piece_grads) = results
    assert pieces == pytest.approx(plain, rel=1e-6)
    reference = F.cross_entropy(model(x)[0].float().flatten(0, 1), y.flatten()).item()
    assert plain == pytest.approx(reference, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(piece_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
