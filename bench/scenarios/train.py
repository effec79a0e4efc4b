"""Measure one launch of a training cell in this process: warm-up steps, timed steps, memory.

This is ``bench.scenarios.inference`` for ``scenario="train"``: it runs inside the cell's own subprocess
(``bench.executors.cell``), so its memory is the cell's own. One *step* is ``bench train``'s step
(``model.train.train_step``): forward, backward and an AdamW update of ``batch`` sequences of
``seq_len`` tokens, with the backend's training autocast (bf16, fp16 with a gradient scaler on
CUDA) and, when the cell asks, gradient checkpointing (``GPT.grad_checkpointing``). The
batches are synthetic: uniform random token ids drawn from the cell's seed, so every launch
and every precision trains on the same tokens; the loss starts near ln(vocab_size).

A launch runs ``warmup_steps`` untimed steps (the first one creates the optimizer's moments
and warms the allocator), then up to ``train_steps`` timed steps, fewer when ``budget_s`` is
spent (two at least), each closed by a device synchronisation before the clock is read. Step
times are kept in groups of ``group_steps`` consecutive steps, the launch > group > step
nesting the hierarchical bootstrap resamples (``bench.results.stats.summarize_nested``), as an
inference launch keeps generations > decode steps.

Memory, after the timed steps, in one more step of its own:

- ``state_mb``: the resident size at the end of a step, once freed memory is returned to the
  system (``gc`` and glibc's ``malloc_trim``): the runtime, the weights, their gradients and
  AdamW's two moments. ``weights_mb``, ``grads_mb`` and ``optimizer_mb`` are the exact tensor
  bytes of each.
- ``activation_mb``: the high-water mark of the resident size through the step's forward
  and backward passes, read when they are done and before the update, above ``state_mb``.
  The kernel's mark (VmHWM) is reset just before the step by writing 5 to
  ``/proc/self/clear_refs``, so the mark is that step's own. It is what training needs
  beyond its state: the activations saved for the backward pass, the logits and their
  gradient, and the transient buffers of the op running at the peak; the gradients are
  freed at the step's start (``zero_grad(set_to_none=True)``) and re-created during the
  backward pass, so they cancel to within the part not yet re-created at the peak. Where
  the mark cannot be reset the field is None rather than a guess.
- ``step_transient_mb``: the same mark over the whole step, the update included: AdamW's
  multi-tensor (foreach) update makes temporaries the size of the weights, which on a
  checkpointed step can be the larger part, and are not activations.
- ``blocks_activation_mb``: the resident size when the forward pass reaches the LM head
  (a forward pre-hook, freed heap returned first) above the training state without its
  gradients (``state_mb - grads_mb``): what the transformer blocks keep for the backward
  pass (with checkpointing, each block's input only), before the logits and the loss add
  theirs. An upper bound by the allocator's fragmentation; None where the module has no
  ``lm_head`` to hook.
- ``device_activation_mb``: the same on a GPU, from the device allocator's peak above the
  bytes allocated at the step's start (exact, as the allocator counts them).

The optimizer and its schedule are ``bench train``'s (AdamW, weight decay on the matrices,
a linear warm-up into the peak learning rate), from its first step.

``loss_before`` and ``loss_after`` score one fixed batch (the first timed one), without a step,
before the timed steps and after every update: a precision whose updates do nothing or harm
shows as a loss that does not fall. A loss that is not finite (a precision that breaks
training) fails the cell with that reason.
"""

from __future__ import annotations

import gc
import math
import time

import torch

from backends import registry
from bench.scenarios.inference import MiB, _peak_rss_mb, _rss_mb, build, malloc_trim, reset_peak_rss
from bench.spec import CellSpec
from model.train import TrainConfig, lr_factor, make_optimizer, train_step


class TrainingDiverged(RuntimeError):
    """The loss of a training step is not finite."""


def synthetic_batches(spec: CellSpec, vocab_size: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (inputs, targets) pairs of shape (batch, seq_len), seeded: next-token targets of random ids."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (spec.batch, spec.seq_len + 1), generator=g)  # (B, T + 1)
        out.append((ids[:, :-1], ids[:, 1:]))  # each (B, T)
    return out


def _tensor_mb(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / MiB


def measure_train(spec: CellSpec) -> dict:
    """Run one launch of a training cell and return its raw measurements (the launch record's fields)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)  # the same way for every backend, before any work
    t = time.perf_counter()
    model = build(spec)
    build_s = time.perf_counter() - t
    config = model.config
    if spec.seq_len > config.block_size:
        raise ValueError(f"seq_len={spec.seq_len} exceeds the model's block_size={config.block_size}")
    options = dict(spec.options)
    lora_rank = options.pop("lora_rank", 0)  # a training option (bench.planner.cells.TRAIN_OPTIONS), not the backend's
    if lora_rank:
        from model.lora import LoRAConfig, apply_lora

        # every weight frozen, adapters on the four block Linears; no adapter is saved, so no base digest
        apply_lora(model, LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank), base_digest="", seed=spec.seed)
    backend = registry.create(spec.backend, precision=spec.precision, threads=spec.threads,
                              device=spec.device, training=True, **options)
    hyper = TrainConfig(batch_size=spec.batch, context=spec.seq_len, seed=spec.seed)
    out: dict = dict(n_params=config.n_params, precision=backend.precision, device=backend.device,
                     trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad), lora_rank=lora_rank,
                     build_s=build_s, data="synthetic", lr=hyper.lr, optimizer="AdamW",
                     lr_warmup_steps=hyper.warmup_steps)
    with backend:
        torch.manual_seed(spec.seed)  # dropout
        model.train()
        model.grad_checkpointing = spec.grad_checkpointing
        optimizer = make_optimizer(model, hyper)
        t = time.perf_counter()
        model, optimizer = backend.prepare_training(model, optimizer)
        # bench train's schedule, from its first step: a warm-up from lr/100. The peak lr at once
        # (no warm-up) overshoots on a fresh gpt2 and the loss of the probe batch rises.
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(hyper))
        backend.synchronize()
        out["load_s"] = time.perf_counter() - t
        scaler = backend.grad_scaler()
        batches = [(x.to(backend.device), y.to(backend.device))
                   for x, y in synthetic_batches(spec, config.vocab_size, spec.warmup_steps + spec.train_steps + 1)]
        losses: list[float] = []

        def step(i: int, before_update=None) -> float:
            loss, _ = train_step(model, optimizer, [batches[i]], autocast=backend.training_autocast,
                                 scaler=scaler, grad_clip=hyper.grad_clip, before_update=before_update)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"the loss is {loss} at step {i + 1} of the launch "
                                       f"({backend.precision}): training diverged in this precision")
            losses.append(loss)
            schedule.step()
            return loss

        for i in range(spec.warmup_steps):
            step(i)
        probe = batches[spec.warmup_steps]  # the first timed batch, scored again after every timed update
        out["loss_before"] = _probe_loss(model, probe, backend)
        step_ms: list[float] = []
        start = time.perf_counter()
        while len(step_ms) < spec.train_steps:
            backend.synchronize()
            t = time.perf_counter()
            step(spec.warmup_steps + len(step_ms))
            backend.synchronize()
            step_ms.append((time.perf_counter() - t) * 1e3)
            if len(step_ms) >= 2 and time.perf_counter() - start > spec.budget_s:
                break
        n_timed = len(step_ms)
        g = spec.group_steps
        out["samples"] = dict(step_ms=[step_ms[i:i + g] for i in range(0, n_timed, g)])  # groups of steps
        out["warmup_reps"] = spec.warmup_steps
        out["warmup_settled"] = True  # a fixed count of steps; nothing is detected
        out.update(_memory_step(backend, model, lambda hook: step(spec.warmup_steps + n_timed, hook)))
        out["loss_after"] = _probe_loss(model, probe, backend)
        out["losses"] = losses
        out["weights_mb"] = _tensor_mb(model.parameters())
        out["grads_mb"] = _tensor_mb(p.grad for p in model.parameters())
        out["optimizer_mb"] = _tensor_mb(v for s in optimizer.state.values() for v in s.values())
        out["backend_info"] = dict(backend.info(), grad_scaler=scaler is not None)
    return out


@torch.no_grad()
def _probe_loss(model, batch, backend) -> float:
    """The loss of one fixed batch (inputs, targets), in the training precision, without a step."""
    x, y = batch
    model.eval()  # no dropout: the same batch scores the same on the same weights
    try:
        with backend.training_autocast():
            logits, _ = model(x)
    finally:
        model.train()
    loss = float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()))
    if not math.isfinite(loss):
        raise TrainingDiverged(f"the loss of the probe batch is {loss} ({backend.precision}): "
                               f"training diverged in this precision")
    return loss


def _memory_step(backend, model, run_step) -> dict:
    """The resident training state, and the peak above it during one step (see the module docstring)."""
    lifetime_peak = _peak_rss_mb()
    gc.collect()
    malloc_trim()
    state = _rss_mb()
    device = backend.memory()
    if device is not None:
        backend.reset_memory_peak()
        device = backend.memory()
    at_head: list[float] = []

    def before_head(module, args):
        gc.collect()
        malloc_trim()
        at_head.append(_rss_mb())

    head = next((m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "lm_head"), None)
    hook = head.register_forward_pre_hook(before_head) if head is not None else None
    at_update: list[float] = []

    def before_update():  # forward and backward are done: their high-water mark, before the update's
        backend.synchronize()
        at_update.append(_peak_rss_mb())

    reset = reset_peak_rss()
    try:
        run_step(before_update)
    finally:
        if hook is not None:
            hook.remove()
    backend.synchronize()
    step_peak = _peak_rss_mb()
    grads = _tensor_mb(p.grad for p in model.parameters())
    result = dict(state_mb=state, activation_mb=at_update[0] - state if reset and at_update else None,
                  step_transient_mb=step_peak - state if reset else None,
                  blocks_activation_mb=at_head[0] - (state - grads) if at_head else None,
                  peak_rss_mb=max(lifetime_peak, step_peak), activation_method="VmHWM reset" if reset else None)
    after = backend.memory()
    if device is not None and after is not None:
        result["device_peak_mb"] = after["peak"] / MiB
        result["device_activation_mb"] = (after["peak"] - device["allocated"]) / MiB
    else:
        result["device_peak_mb"] = result["device_activation_mb"] = None
    return result
