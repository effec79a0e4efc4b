"""Proof against the reference: does a backend give the same answers as ``eager`` in fp32?

Both backends see the same weights and prompt. The reference decodes greedily; the backend
under test is fed the reference's tokens (teacher forcing), so every step compares the two
on identical inputs and one early disagreement cannot snowball into a meaningless tail.

Two numbers come out: the largest absolute logit difference over every step, and the share
of (step, sequence) pairs whose top-1 token agrees. The tolerances below are per precision:
fp32 must agree tightly; reduced precisions are judged by top-1 agreement, because their
logit error is expected and only a changed answer matters to a user.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from backends.base import Backend

# precision -> (largest allowed |logit difference| or None, smallest allowed top-1 agreement)
TOLERANCES: dict[str, tuple[float | None, float]] = {
    "fp32": (1e-3, 1.0),
    "bf16": (None, 0.90),
    "fp16": (None, 0.90),
    "int8": (None, 0.85),
    "int4": (None, 0.75),  # 16 levels per group: answers move more than int8's
}


# What the comparison rests on (``ParityResult.basis``).
TEACHER_FORCED = "teacher-forced logits"  # the backend fed the reference's tokens; logits compared
GENERATED = "generated tokens"  # an engine that exposes no logits: its own greedy tokens, free-running


@dataclass(frozen=True)
class ParityResult:
    max_abs_logit_diff: float | None  # None where the engine exposes no logits (basis GENERATED)
    token_agreement: float
    steps: int
    precision: str
    tolerance: dict
    passed: bool
    basis: str = TEACHER_FORCED

    def to_dict(self) -> dict:
        return asdict(self)


def reference_run(reference: Backend, ids: torch.Tensor, steps: int):
    """Greedy decode with the reference: the logits of every step and the tokens it chose."""
    logits, cache = reference.prefill(ids)
    all_logits, tokens = [logits], []
    for _ in range(steps - 1):
        nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(nxt)
        logits, cache = reference.decode(nxt, cache)
        all_logits.append(logits)
    return all_logits, tokens


def check_parity(backend: Backend, reference: Backend, ids: torch.Tensor, steps: int = 8,
                 reference_result=None) -> ParityResult:
    """Compare ``backend`` with ``reference`` over a prefill and ``steps - 1`` decode steps."""
    ref_logits, tokens = reference_result or reference_run(reference, ids, steps)
    logits, cache = backend.prefill(ids)
    got = [logits]
    for tok in tokens:
        logits, cache = backend.decode(tok, cache)
        got.append(logits)
    return _compare(backend, torch.stack(ref_logits), torch.stack(got).float())


def _compare(backend: Backend, ref: torch.Tensor, out: torch.Tensor) -> ParityResult:
    """Reference and backend logits (steps, B, vocab), the backend fed the reference's tokens."""
    max_diff = float((ref - out).abs().max())
    agreement = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    max_allowed, min_agreement = TOLERANCES[backend.precision]
    passed = agreement >= min_agreement and (max_allowed is None or max_diff <= max_allowed)
    if not torch.isfinite(out).all():
        passed = False
    return ParityResult(max_diff, agreement, out.shape[0], backend.precision,
                        dict(max_abs_logit_diff=max_allowed, min_token_agreement=min_agreement), passed)


def check_parity_generated(backend: Backend, reference: Backend, ids: torch.Tensor, steps: int = 8) -> ParityResult:
    """Parity for an engine that runs whole generations only (``backend.stepwise`` False).

    Where it exposes logits (``logits(ids)``), the prompt and the reference's greedy tokens go
    through it in one pass: teacher forcing, the same comparison as ``check_parity``. Where it
    does not, its own greedy tokens (``generate_greedy``) are compared position by position with
    the reference's: the share that agree, with no logit difference to report. That is stricter
    than teacher forcing (one early disagreement changes the rest), so it is said in ``basis``.
    """
    ref_logits, tokens = reference_run(reference, ids, steps)
    ref = torch.stack(ref_logits)  # (steps, B, vocab)
    if backend.exposes_logits:
        T = ids.shape[1]
        full = torch.cat([ids, *tokens], dim=1) if tokens else ids  # (B, T + steps - 1)
        out = backend.logits(full)[:, T - 1:].float().transpose(0, 1)  # (steps, B, vocab)
        return _compare(backend, ref, out)
    want = ref.argmax(-1).T  # (B, steps): the reference's greedy tokens
    got = torch.tensor(backend.generate_greedy(ids.tolist(), steps), dtype=torch.long)
    agreement = float((got == want).float().mean())
    max_allowed, min_agreement = TOLERANCES[backend.precision]
    return ParityResult(None, agreement, steps, backend.precision,
                        dict(max_abs_logit_diff=max_allowed, min_token_agreement=min_agreement),
                        agreement >= min_agreement, basis=GENERATED)
