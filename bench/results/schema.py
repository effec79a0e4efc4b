"""The cell record: the one shape every stored, exported and rendered result has.

A *run* is one invocation of ``bench run``: its environment fingerprint and its sweep.
A *cell* is one point of the sweep (model x backend x precision x device x batch x threads x
lengths, ``bench.spec``), run in several fresh processes (launches). Records are plain dicts
(JSON-ready); the fields are listed here and documented in the README. Statistics are dicts
with the keys of ``STAT_KEYS``.
"""

from __future__ import annotations

from bench.spec import IDENTITY_FIELDS  # noqa: F401  (re-exported: the identity lives with the spec)

STATUSES = ("ok", "skipped", "failed", "timeout", "oom")
FAILED = ("failed", "timeout", "oom")  # ran and did not finish: retried by --resume, counted as failures

STAT_KEYS = ("median", "p90", "p99", "mean", "stdev", "cv", "ci95_low", "ci95_high", "n")

CELL_FIELDS = {
    # identity
    "cell_id": "the cell's identity as a string (bench.spec.cell_id): runs and reports match cells by it",
    "backend": "backend name (eager, mkl, ipex, cuda, onnxruntime, openvino, int8; peers hf, optimum-onnxruntime, optimum-openvino)",
    "peer": "true for a peer backend (what a user would run instead: hf, optimum-*), false for ours",
    "precision": "precision actually used: fp32, bf16, fp16, int8 or int4",
    "options": "backend options swept by --option or a TOML [options] table (int8_scheme, group_size, ...); part of cell_id when given, absent otherwise",
    "device": "device the model ran on (cpu, cuda, xpu, ...)",
    "model": "preset name, or the checkpoint directory",
    "n_params": "parameter count of the model",
    "batch": "sequences generated together",
    "threads": "intra-op threads given to the backend (null: the library's default)",
    "prompt_len": "prompt tokens per sequence",
    "gen_len": "new tokens per sequence",
    "status": "ok, skipped, failed, timeout or oom",
    "reason": "why a cell is not ok (empty when ok)",
    # cost of getting ready
    "build_s": "seconds to build the fp32 model (random weights) or read the checkpoint",
    "load_s": "seconds for the backend to load, export, compile or quantise the model (cached exports load fast)",
    "first_call_ms": "the first (cold) prefill, in milliseconds",
    # latency, each a statistics dict (STAT_KEYS)
    "ttft_ms": "time to first token: the prefill of the whole batch, ms",
    "tpot_ms": "time per output token: one decode step of the whole batch, ms",
    # throughput, tokens of all sequences
    "prefill_tok_s": "batch * prompt_len / median ttft",
    "decode_tok_s": "batch / median tpot",
    "decode_tok_s_ci": "the 95% interval of decode_tok_s, [low, high], from tpot_ms's (null: no interval)",
    "e2e_tok_s": "batch * gen_len / median end-to-end generation time",
    # memory
    "peak_rss_mb": "peak resident memory of the cell process while it runs the model (the peak restarts after the load; see peak_after_load), MiB",
    "load_peak_rss_mb": "peak resident memory up to the end of the load, export, quantisation or compilation included when the launch did them, MiB",
    "peak_after_load": "true when the peak could restart after the load (/proc/self/clear_refs); false: peak_rss_mb includes the load",
    "model_mb": "resident memory added by building and loading the model (freed heap handed back first), MiB",
    "weights_mb": "bytes of the weights as the backend holds them, MiB",
    "kv_cache_mb": "bytes of the KV cache at the end of generation, MiB",
    "device_peak_mb": "peak device memory where there is a device, MiB",
    # the physical limit
    "roofline_decode_tok_s": "decode tokens/s if a step ran at the memory-bandwidth or compute bound",
    "roofline_fraction": "decode_tok_s / roofline_decode_tok_s",
    "roofline_bound": "which bound applies: memory or compute",
    # proof against eager fp32
    "parity": "dict: max_abs_logit_diff (None where the engine exposes no logits), token_agreement, steps, tolerance, passed, basis ('teacher-forced logits' or 'generated tokens'); {reference: true} for eager fp32",
    "quality": "trained checkpoints: perplexity on the test split, and against eager fp32 the PPL ratio, KL divergence, same-top-token share and verdict",
    # how the numbers were taken
    "launches": "ok launches (fresh processes, one per round) the record pools; the interval spans their spread",
    "launches_planned": "launches the sweep asked for (fewer ran when the run was interrupted or a launch failed)",
    "screen": "a sweep with a screen (confirm = N): whether this cell was confirmed after its first launch (and got them all) or screened out (one launch: its interval spans that process only); absent otherwise",
    "launch_rounds": "the round each pooled launch ran in (rounds visit the cells in a seeded random order)",
    "launch_medians": "dict: the median ttft_ms and tpot_ms of each launch",
    "launch_sizes": "dict: how many generations each launch measured, per sample kind",
    "unsteady": "why the launches disagree (one ran over 1.5x slower or faster than the others, or compiled while measured), or empty",
    "compiles": "compiling backends (compile): graphs compiled per launch during load, warm-up and measurement; null for the others",
    "recompiles_measured": "graphs compiled while being measured, all launches (should be 0; more is flagged in unsteady); null if the backend does not compile",
    "attempt": "0 for a cell's first attempt; a --resume that retries a failed cell counts up",
    "node": "--executor ray: the node that measured the cell (id, hostname, labels); its fingerprint_id is the cell's own, "
            "and reports group cells by it (absent for local runs, whose run fingerprint covers them)",
    "planted_delay": "testing aid: the fraction each step was made slower by (0 in real measurements)",
    "warmup_reps": "whole generations run before measuring, all launches",
    "warmup_settled": "whether two consecutive warm-up generations agreed within 10% (false: the cap ended warm-up)",
    # the rest
    "samples": "raw samples by launch and generation: ttft_ms and e2e_ms [launch][generation], tpot_ms [launch][generation][step]",
    "backend_info": "what the backend reports of itself (runtime options, providers, versions)",
    "wall_s": "seconds the whole cell took, process start to result",
    # training cells (scenario "train", bench.scenarios.train)
    "scenario": "what the cell measures: inference (a generation) or train (optimizer steps)",
    "seq_len": "train: tokens per sequence of a training batch",
    "grad_checkpointing": "train: whether each block's activations were recomputed in the backward pass",
    "step_ms": "train: one optimizer step (forward, backward, AdamW) of the whole batch, ms",
    "train_tok_s": "train: batch * seq_len / median step_ms",
    "train_tok_s_ci": "train: the 95% interval of train_tok_s, [low, high], from step_ms's (null: one group of steps, spread unknown)",
    "loss_before": "train: the loss of a fixed batch (the first timed one) before the timed steps, nats per token",
    "loss_after": "train: the loss of the same batch after every timed step's update",
    "losses": "train: the loss of every step of the first launch, warm-up included",
    "state_mb": "train: resident memory holding the runtime, weights, gradients and optimizer state, MiB",
    "activation_mb": "train: the resident peak of a step's forward and backward above state_mb (activations and transients), MiB",
    "step_transient_mb": "train: the resident peak of the whole step above state_mb, the optimizer update included, MiB",
    "blocks_activation_mb": "train: resident memory the blocks keep for the backward pass, at the LM head's input, MiB",
    "device_activation_mb": "train: a step's device peak above the bytes allocated at its start, MiB",
    "grads_mb": "train: bytes of the gradients, MiB",
    "optimizer_mb": "train: bytes of the optimizer's state (AdamW's two moments), MiB",
    "trainable_params": "train: parameters the optimizer updates (all of them, or with lora_rank the adapters' only)",
    "lora_rank": "train: the rank of the LoRA adapters on a frozen base (--option lora_rank); 0: every weight trains",
}


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def diff_fields(a: dict, b: dict, skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Lines such as ``versions.torch: 2.8.0 -> 2.9.0``, one per differing field, sorted.

    Lists of names (CPU flags) show what was added and removed instead of both lists.
    """
    fa, fb = flatten(a or {}), flatten(b or {})
    missing = object()
    lines = []
    for key in sorted(set(fa) | set(fb)):
        if key.startswith(skip_prefixes):
            continue
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va == vb:
            continue
        if isinstance(va, list) and isinstance(vb, list) and all(isinstance(v, str) for v in va + vb):
            added, removed = sorted(set(vb) - set(va)), sorted(set(va) - set(vb))
            parts = [f"+{v}" for v in added] + [f"-{v}" for v in removed]
            lines.append(f"{key}: {', '.join(parts) if parts else 'reordered'}")
            continue
        shown = ["<missing>" if v is missing else str(v) for v in (va, vb)]
        lines.append(f"{key}: {shown[0]} -> {shown[1]}")
    return lines

