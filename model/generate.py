"""Autoregressive generation over any "stepper": greedy, sampling and beam search.

A stepper is anything with the backend verbs ``prefill``, ``decode`` and ``reorder_cache``
(every ``backends.base.Backend`` is one). The cache it returns is opaque here: generation
only passes it back, or asks the stepper to reorder it for beam search. So this file knows
nothing of backends and ``model/`` keeps importing nothing downstream.

Batches: prompts of equal length go straight through with no mask (the fast path). Unequal
prompts are left-padded; the mask (True for real tokens) and the positions it implies are
passed on every call, so a padded row sees exactly what it would see alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from model.errors import InputError


class GenerationError(InputError):
    """Prompts or settings ``generate`` cannot use (a ``ValueError``); the message names the value."""


class Stepper(Protocol):
    def prefill(self, ids: torch.Tensor, pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]: ...

    def decode(self, ids: torch.Tensor, cache: Any, pos: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]: ...

    def reorder_cache(self, cache: Any, index: torch.Tensor) -> Any: ...


OnToken = Callable[[int, torch.Tensor], None]


def generate(
    stepper: Stepper,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    seed: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    max_length: int | None = None,
    on_token: OnToken | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt; return them, prompts excluded.

    greedy: take the most likely token; otherwise sample with ``temperature``, ``top_k`` and
        ``top_p`` (nucleus), which have no effect when greedy.
    repetition_penalty: CTRL's penalty, as Hugging Face applies it: the logit of every token
        already in the sequence (prompt included) is divided by it when positive and
        multiplied by it when negative. Applies to greedy, sampling and beam search.
    num_beams: > 1 runs beam search (deterministic; ``greedy`` must stay True). Beams are
        ranked by the plain sum of token log-probabilities, not length-normalised, so the
        returned sequence is the most likely one the beams found (with an EOS, that sum
        favours sequences that end early).
    seed: seeds a private ``torch.Generator``; the same seed reproduces a sample and the
        global RNG is never touched.
    eos_token_id: a sequence that emits it stops; the EOS is returned, nothing after it.
    pad_token_id: fills the left padding of short prompts and the rows that have stopped;
        it must be an id of the model's vocabulary (the mask hides it from attention).
    max_length: if given, the longest prompt plus ``max_new_tokens`` must fit in it (pass the
        model's ``block_size``).
    on_token: called as ``on_token(step, tokens)`` right after each step's tokens are chosen:
        ``tokens`` is (B,), or (B * num_beams,) in beam search, one row per beam.
    """
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not prompts:
        raise GenerationError("prompts is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty: every prompt needs at least one token")
        if min(p) < 0:
            raise GenerationError(f"prompt {i} holds a negative token id {min(p)}")
    if pad_token_id < 0:
        raise GenerationError(f"pad_token_id={pad_token_id} must be a token id (>= 0)")
    if not greedy and not temperature > 0:
        raise GenerationError(f"temperature={temperature} must be > 0 when sampling")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p={top_p} must be in (0, 1]")
    if not repetition_penalty > 0:
        raise GenerationError(f"repetition_penalty={repetition_penalty} must be > 0")
    if num_beams < 1:
        raise GenerationError(f"num_beams={num_beams} must be >= 1")
    if num_beams > 1 and not greedy:
        raise GenerationError(f"num_beams={num_beams} needs greedy=True: beam sampling is not implemented")
    longest = max(len(p) for p in prompts)
    if max_length is not None and longest + max_new_tokens > max_length:
        raise GenerationError(f"longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} "
                         f"exceeds max_length={max_length}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]

    ids, mask, pos = _left_pad(prompts, pad_token_id)
    if num_beams > 1:
        return _beam_search(stepper, ids, mask, pos, max_new_tokens, num_beams,
                            repetition_penalty, eos_token_id, pad_token_id, on_token)
    generator = None
    if not greedy:
        generator = torch.Generator()
        if seed is None:
            generator.seed()  # fresh entropy, still without touching the global RNG
        else:
            generator.manual_seed(seed)

    B = ids.shape[0]
    chosen: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool)
    logits, cache = stepper.prefill(ids, pos, mask)
    seen = _seen_table(ids, mask, logits.shape[-1], repetition_penalty)
    for step in range(max_new_tokens):
        logits = _penalise(logits, seen, repetition_penalty)
        if greedy:
            tok = logits.argmax(-1)  # (B,)
        else:
            tok = _sample(logits, temperature, top_k, top_p, generator)
        tok = torch.where(done, pad_token_id, tok)  # stopped rows only mark time
        chosen.append(tok)
        if seen is not None:
            seen[torch.arange(B), tok] = True
        if on_token is not None:
            on_token(step, tok)
        if eos_token_id is not None:
            done |= tok == eos_token_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask, pos = _next_mask_pos(mask, pos)
        logits, cache = stepper.decode(tok.unsqueeze(1), cache, pos, mask)
    out = torch.stack(chosen, dim=1)  # (B, steps)
    return [_until_eos(row.tolist(), eos_token_id) for row in out]


def _left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int):
    """ids (B, T); mask and positions (B, T), or None for both when all prompts are equally long."""
    T = max(len(p) for p in prompts)
    if all(len(p) == T for p in prompts):
        return torch.tensor([list(p) for p in prompts], dtype=torch.long), None, None
    ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = True
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count from 0
    return ids, mask, pos


def _next_mask_pos(mask: torch.Tensor | None, pos: torch.Tensor | None):
    """The mask and position for one more token; both stay None on the unpadded fast path."""
    if mask is None:
        return None, None
    mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.bool)], dim=1)  # (B, S + 1)
    return mask, pos[:, -1:] + 1  # (B, 1)


def _seen_table(ids: torch.Tensor, mask: torch.Tensor | None, vocab_size: int,
                penalty: float) -> torch.Tensor | None:
    """(B, vocab) bool: which ids each prompt holds (padding excluded); None without a penalty."""
    if penalty == 1.0:
        return None
    table = torch.zeros(ids.shape[0], vocab_size, dtype=torch.bool)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)  # (B, T)
    table[rows[real], ids[real]] = True
    return table


def _penalise(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    if seen is None:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator) -> torch.Tensor:
    """One token per row from ``logits`` (B, vocab), filtered in Hugging Face's order."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the tokens ranked above it already hold top_p of the mass;
        # the most likely token is therefore always kept.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)


def _beam_search(stepper: Stepper, ids, mask, pos, max_new_tokens: int, K: int,
                 repetition_penalty: float, eos_token_id: int | None, pad_token_id: int,
                 on_token: OnToken | None) -> list[list[int]]:
    """Keep the K best partial sequences per prompt, scored by their summed log-probability.

    A beam that has emitted EOS is frozen: its only continuation is ``pad_token_id`` at
    log-prob 0, so its score stays and it competes with the live beams until the end.
    """
    B = ids.shape[0]
    logits, cache = stepper.prefill(ids, pos, mask)
    V = logits.shape[-1]
    seen = _seen_table(ids, mask, V, repetition_penalty)
    if K > V:
        raise GenerationError(f"num_beams={K} exceeds the vocabulary size {V}")

    # The first step expands each prompt into its K best first tokens.
    logp = F.log_softmax(_penalise(logits, seen, repetition_penalty), dim=-1)  # (B, V)
    scores, tok = torch.topk(logp, K, dim=-1)  # (B, K) each
    scores, tok = scores.reshape(B * K), tok.reshape(B * K)
    index = torch.arange(B).repeat_interleave(K)  # beam row -> prompt row
    cache, mask, pos, seen = _follow(stepper, index, tok, cache, mask, pos, seen)
    out = tok.unsqueeze(1)  # (B*K, 1)
    done = torch.zeros(B * K, dtype=torch.bool) if eos_token_id is None else tok == eos_token_id
    if on_token is not None:
        on_token(0, tok)

    base = (torch.arange(B) * K).repeat_interleave(K)  # (B*K,): first beam row of each prompt
    for step in range(1, max_new_tokens):
        if bool(done.all()):
            break
        mask, pos = _next_mask_pos(mask, pos)
        logits, cache = stepper.decode(tok.unsqueeze(1), cache, pos, mask)
        logp = F.log_softmax(_penalise(logits, seen, repetition_penalty), dim=-1)  # (B*K, V)
        frozen = torch.full((V,), float("-inf"))
        frozen[pad_token_id] = 0.0
        logp = torch.where(done.unsqueeze(1), frozen, logp)
        candidates = (scores.unsqueeze(1) + logp).view(B, K * V)  # (B, K*V)
        scores, flat = torch.topk(candidates, K, dim=-1)  # (B, K) each, best first
        scores = scores.reshape(B * K)
        parent = base + (flat // V).reshape(B * K)  # (B*K,): the beam row each new beam extends
        tok = (flat % V).reshape(B * K)
        cache, mask, pos, seen = _follow(stepper, parent, tok, cache, mask, pos, seen)
        done = done.index_select(0, parent)
        out = torch.cat([out.index_select(0, parent), tok.unsqueeze(1)], dim=1)  # (B*K, step + 1)
        if on_token is not None:
            on_token(step, tok)
        if eos_token_id is not None:
            done |= tok == eos_token_id

    # topk sorts each prompt's beams best first, so the first beam is the answer.
    best = out.view(B, K, -1)[:, 0, :]  # (B, steps)
    return [_until_eos(row.tolist(), eos_token_id) for row in best]


def _follow(stepper: Stepper, rows: torch.Tensor, tok: torch.Tensor, cache, mask, pos, seen):
    """Beam state for new beams that extend ``rows`` with ``tok``: cache, mask, positions, seen tokens."""
    cache = stepper.reorder_cache(cache, rows)
    if mask is not None:
        mask, pos = mask.index_select(0, rows), pos.index_select(0, rows)
    if seen is not None:
        seen = seen.index_select(0, rows)
        seen[torch.arange(rows.numel()), tok] = True
    return cache, mask, pos, seen


def _until_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    """The tokens up to and including the first EOS."""
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1]
    return tokens
