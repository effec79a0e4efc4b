"""Generation over a stepper (the eager backend): greedy, sampling, EOS, batching, beams, hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.generate import _beam_search, _left_pad, generate

PROMPT = [1, 2, 3, 4]
N = 10


def sequence_logprob(model, prompt: list[int], tokens: list[int]) -> float:
    """log p(tokens | prompt) under ``model``, from one full forward."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits, _ = model(ids)
    logp = F.log_softmax(logits[0, len(prompt) - 1:-1], dim=-1)  # the predictions of each new token
    return float(logp.gather(-1, torch.tensor(tokens).unsqueeze(1)).sum())


def manual_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step: no cache, no batching."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_is_deterministic_and_matches_a_cacheless_loop(eager, tiny_model):
    first = generate(eager, [PROMPT], N)
    assert first == generate(eager, [PROMPT], N)
    assert first == [manual_greedy(tiny_model, PROMPT, N)]
    assert len(first[0]) == N


def test_zero_new_tokens_returns_empty_lists(eager):
    assert generate(eager, [PROMPT, [5]], 0) == [[], []]


def test_top_k_1_sampling_equals_greedy(eager):
    assert generate(eager, [PROMPT], N, greedy=False, top_k=1, seed=3) == generate(eager, [PROMPT], N)


def test_tiny_top_p_sampling_equals_greedy(eager):
    # Nucleus sampling always keeps the most likely token; with a tiny top_p it keeps only that.
    assert generate(eager, [PROMPT], N, greedy=False, top_p=1e-6, seed=3) == generate(eager, [PROMPT], N)


def test_same_seed_reproduces_a_sample_and_different_seeds_differ(eager):
    # A random-weight model is close to uniform over 512 tokens: two seeds agreeing on all
    # ten tokens has probability around 512**-10.
    rng_before = torch.get_rng_state()
    a = generate(eager, [PROMPT], N, greedy=False, seed=1)
    b = generate(eager, [PROMPT], N, greedy=False, seed=1)
    c = generate(eager, [PROMPT], N, greedy=False, seed=2)
    assert a == b
    assert a != c
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG was not used


def test_sampling_respects_top_k(eager, tiny_model):
    k = 3
    with torch.no_grad():
        logits, _ = tiny_model(torch.tensor([PROMPT]), last_only=True)
    allowed = set(torch.topk(logits[0, -1], k).indices.tolist())
    firsts = {generate(eager, [PROMPT], 1, greedy=False, top_k=k, temperature=5.0, seed=s)[0][0]
              for s in range(40)}
    assert firsts <= allowed
    assert len(firsts) > 1  # a high temperature spreads the samples over the k tokens


def test_repetition_penalty_avoids_seen_tokens(eager):
    plain = generate(eager, [PROMPT], N)[0]
    assert len(set(plain) | set(PROMPT)) < len(plain) + len(PROMPT)  # this model repeats itself
    # A huge penalty pushes every seen token's logit to ~0 or far below, so an unseen token
    # with a positive logit always wins.
    penalised = generate(eager, [PROMPT], N, repetition_penalty=1e4)[0]
    assert len(set(penalised) | set(PROMPT)) == len(penalised) + len(PROMPT)


def test_eos_stops_a_sequence_and_keeps_the_eos(eager):
    [plain] = generate(eager, [PROMPT], N)
    eos = plain[3]
    stop = plain.index(eos)
    [stopped] = generate(eager, [PROMPT], N, eos_token_id=eos)
    assert stopped == plain[:stop + 1]


def test_eos_in_one_row_lets_the_others_run(eager):
    prompts = [PROMPT, [9, 8, 7, 6]]
    plain = generate(eager, prompts, N)
    eos = plain[0][0]
    assert eos not in plain[1]
    steps = []
    out = generate(eager, prompts, N, eos_token_id=eos, on_token=lambda s, t: steps.append(s))
    assert out == [[eos], plain[1]]
    assert steps == list(range(N))


def test_generation_ends_once_every_row_has_stopped(eager):
    [plain] = generate(eager, [PROMPT], N)
    steps = []
    out = generate(eager, [PROMPT], N, eos_token_id=plain[0], on_token=lambda s, t: steps.append(s))
    assert out == [plain[:1]]
    assert steps == [0]


def test_unequal_prompts_give_the_tokens_each_gets_alone(eager):
    prompts = [[5, 6], PROMPT + [7, 8, 9], [100], [3, 1, 4, 1, 5]]
    batched = generate(eager, prompts, N)
    assert batched == [generate(eager, [p], N)[0] for p in prompts]


class Recorder:
    """A stepper that records what generation passes to the backend it wraps."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def prefill(self, ids, pos=None, mask=None):
        self.calls.append(("prefill", ids, pos, mask))
        return self.backend.prefill(ids, pos, mask)

    def decode(self, ids, cache, pos=None, mask=None):
        self.calls.append(("decode", ids, pos, mask))
        return self.backend.decode(ids, cache, pos, mask)

    def reorder_cache(self, cache, index):
        self.calls.append(("reorder", index, None, None))
        return self.backend.reorder_cache(cache, index)


def test_equal_prompts_take_the_unmasked_fast_path(eager):
    rec = Recorder(eager)
    generate(rec, [PROMPT, [4, 3, 2, 1]], 3)
    assert [c[0] for c in rec.calls] == ["prefill", "decode", "decode"]  # one prefill, n - 1 decodes
    assert all(pos is None and mask is None for _, _, pos, mask in rec.calls)


def test_unequal_prompts_pass_the_mask_and_positions(eager):
    rec = Recorder(eager)
    generate(rec, [[5, 6], [1, 2, 3, 4]], 3, pad_token_id=0)
    (_, ids, pos, mask), (_, _, pos1, mask1), (_, _, pos2, mask2) = rec.calls
    assert ids.tolist() == [[0, 0, 5, 6], [1, 2, 3, 4]]
    assert mask.tolist() == [[False, False, True, True], [True] * 4]
    assert pos.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert pos1.tolist() == [[2], [4]] and pos2.tolist() == [[3], [5]]
    assert mask1.shape == (2, 5) and mask1[:, -1].all() and torch.equal(mask1[:, :4], mask)
    assert mask2.shape == (2, 6) and mask2[:, -1].all()


def test_on_token_is_called_once_per_step_with_the_chosen_tokens(eager):
    calls = []
    out = generate(eager, [PROMPT, [9, 8, 7, 6]], 5, on_token=lambda s, t: calls.append((s, t.tolist())))
    assert [s for s, _ in calls] == list(range(5))
    assert [[t[0] for _, t in calls], [t[1] for _, t in calls]] == out


def test_beam_search_with_one_beam_is_greedy(eager):
    prompts = [PROMPT, [5, 6, 7]]
    greedy = generate(eager, prompts, N)
    assert generate(eager, prompts, N, num_beams=1) == greedy
    ids, mask, pos = _left_pad(prompts, 0)  # the beam code itself, with K = 1
    assert _beam_search(eager, ids, mask, pos, N, 1, 1.0, None, 0, None) == greedy


@pytest.mark.parametrize("prompt", [PROMPT, [5, 6], [300, 20, 77, 1, 9]])
def test_beam_search_finds_at_least_greedys_log_prob(eager, tiny_model, prompt):
    [greedy] = generate(eager, [prompt], N)
    [beam] = generate(eager, [prompt], N, num_beams=4)
    assert len(beam) == N
    assert generate(eager, [prompt], N, num_beams=4) == [beam]  # deterministic
    assert sequence_logprob(tiny_model, prompt, beam) >= sequence_logprob(tiny_model, prompt, greedy) - 1e-4


def test_beam_search_batches_unequal_prompts(eager):
    prompts = [[5, 6], PROMPT]
    assert generate(eager, prompts, 6, num_beams=3) == [generate(eager, [p], 6, num_beams=3)[0] for p in prompts]


def test_beam_search_stops_at_eos(eager):
    [beam] = generate(eager, [PROMPT], N, num_beams=3)
    eos = beam[2]
    [stopped] = generate(eager, [PROMPT], N, num_beams=3, eos_token_id=eos)
    assert stopped[-1] == eos and eos not in stopped[:-1]
    assert len(stopped) <= N


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(greedy=False, temperature=0.0), "temperature=0.0"),
    (dict(greedy=False, temperature=-1.0), "temperature=-1.0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=0), "top_k=0"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(num_beams=0), "num_beams=0"),
    (dict(num_beams=2, greedy=False), "num_beams=2"),
    (dict(max_length=12), "max_length=12"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[[1, -5]]), "-5"),
    (dict(pad_token_id=-1), "pad_token_id=-1"),
])
def test_bad_arguments_raise_value_error_naming_the_value(eager, kwargs, match):
    args = dict(prompts=[PROMPT], max_new_tokens=N) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(eager, args.pop("prompts"), args.pop("max_new_tokens"), **args)


def test_max_length_allows_an_exact_fit(eager):
    assert len(generate(eager, [PROMPT], N, max_length=len(PROMPT) + N)[0]) == N


def test_beam_search_applies_the_repetition_penalty(eager):
    [plain] = generate(eager, [PROMPT], N, num_beams=3)
    assert len(set(plain) | set(PROMPT)) < len(plain) + len(PROMPT)
    [penalised] = generate(eager, [PROMPT], N, num_beams=3, repetition_penalty=1e4)
    assert len(set(penalised) | set(PROMPT)) == len(penalised) + len(PROMPT)
