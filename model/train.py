"""Training the model, either family: AdamW, a cosine schedule, checkpoints that resume exactly.

From scratch, or (``init``) from a checkpoint, in full or with LoRA adapters on a frozen base
(``model.lora``; only the adapters are then saved); in one process or in several data-parallel
workers (``run_loop`` in each, launched by ``model.distributed`` or Ray Train).

The loop is nanoGPT's (https://github.com/karpathy/nanoGPT/blob/master/train.py): random
windows of the token stream, AdamW with weight decay on the matrices only, a linear warmup
into a cosine decay, gradient clipping and accumulation, optional bf16 autocast and
gradient checkpointing. Everything random comes from ``TrainConfig.seed``: the weights,
a ``torch.Generator`` that draws the batches, and torch's global RNG (dropout). A
checkpoint keeps all of their states with the optimizer's and the scheduler's, so a run
stopped and resumed takes the same steps as one that never stopped.

An output directory, once training ends:

    run.json              what was trained (model and train configs, corpus digest, cache key)
                          and how it ended (status, step, losses)
    metrics.jsonl         one line per step: loss, lr, grad norm, tokens/s; val_loss when evaluated
    corpus_manifest.json  the corpus's files and digests (``train_on_corpus``)
    config.json, model.safetensors, tokenizer.json
                          the final weights: ``load_checkpoint(out_dir)`` and
                          ``load_tokenizer(out_dir, ...)`` read them
    best/                 the weights with the lowest validation loss, a checkpoint directory too
    step-000100/          the last ``keep_last`` checkpoints, each with training_state.pt

Every directory is written under a temporary name and renamed into place, so a crash never
leaves half a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from model.checkpoint import CheckpointError, read_config
from model.errors import InputError
from model.gpt import GPT, GPTConfig
from model.train_files import (METRICS_FILE, RUN_FILE, RUN_FORMAT, STATE_FILE, OutputDirError,  # noqa: F401
                               checkpoint_step, latest_checkpoint, read_metrics, read_run, restore, save_step,
                               save_weights, step_dirs, write_json, write_metrics)

MANIFEST_FILE = "corpus_manifest.json"
RUN_FORMAT_VERSION = 1  # part of every cache key: bump when the loop's results change
PRECISIONS = ("fp32", "bf16")


class TrainingDataError(InputError):
    """The token streams cannot feed this configuration (too short for the context)."""


class TrainConfigError(InputError):
    """A train config field out of range, or an unknown key; the message names it."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch
    context: int = 128  # tokens per sequence; at most the model's block_size
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-4  # the cosine's floor, reached at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrix weights only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    precision: str = "fp32"  # or "bf16": autocast, with fp32 weights and optimizer state
    grad_checkpointing: bool = False
    eval_every: int = 100  # steps between validation losses (and at the last step)
    eval_batches: int = 8  # fixed validation micro-batches, the same at every evaluation
    checkpoint_every: int = 100
    keep_last: int = 2  # step checkpoints kept; best/ is kept apart
    patience: int = 0  # evaluations without a new best before stopping; 0 never stops early
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "context", "grad_accum", "eval_every", "eval_batches",
                     "checkpoint_every", "keep_last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TrainConfigError(f"{name}={value!r} must be a positive integer")
        for name in ("warmup_steps", "patience", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TrainConfigError(f"{name}={value!r} must be a non-negative integer")
        if not self.lr > 0:
            raise TrainConfigError(f"lr={self.lr!r} must be positive")
        if not 0 <= self.min_lr <= self.lr:
            raise TrainConfigError(f"min_lr={self.min_lr!r} must be in [0, lr={self.lr}]")
        if not self.weight_decay >= 0:
            raise TrainConfigError(f"weight_decay={self.weight_decay!r} must be non-negative")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainConfigError(f"{name}={getattr(self, name)!r} must be in [0, 1)")
        if not self.grad_clip >= 0:
            raise TrainConfigError(f"grad_clip={self.grad_clip!r} must be non-negative (0 turns clipping off)")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context * self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from plain data (a ``--config`` file); unknown keys are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainConfigError(f"unknown train config keys: {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**values)


@dataclass(frozen=True)
class Progress:
    """What ``on_step`` receives after every optimizer step."""

    step: int
    steps: int
    loss: float  # mean training loss of this step's micro-batches (nats per token)
    lr: float  # the learning rate this step used
    grad_norm: float  # before clipping
    tokens_per_s: float  # this step's training tokens over its wall time
    elapsed_s: float  # since this call to ``train`` began
    eta_s: float  # remaining steps at this session's mean time per step
    val_loss: float | None = None  # set on evaluation steps
    best_val_loss: float | None = None

    def line(self) -> str:
        val = "" if self.val_loss is None else f" | val {self.val_loss:.4f} (best {self.best_val_loss:.4f})"
        return (f"step {self.step}/{self.steps} | loss {self.loss:.4f} | lr {self.lr:.2e} | "
                f"{self.tokens_per_s:,.0f} tok/s | ETA {_duration(self.eta_s)}{val}")


@dataclass(frozen=True)
class TrainSummary:
    out_dir: str
    status: str  # "complete", "stopped_early" (patience ran out) or "paused" (stop_at)
    step: int
    steps: int
    train_loss: float | None  # the last step's
    val_loss: float | None  # the last evaluation's
    best_val_loss: float | None
    best_step: int | None
    tokens_seen: int
    wall_s: float  # this call's wall time
    tokens_per_s: float  # this call's training tokens over its wall time, evaluations included
    key: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- the run's identity ------------------------------------------------------------------

def run_key(model_config: GPTConfig, config: TrainConfig, corpus_digest: str, tokenizer: dict | None = None,
            start: dict | None = None) -> str:
    """A digest of everything that decides the trained weights: the corpus, both configs
    (the seed included) and the tokenizer's recipe; for fine-tuning, what it starts from
    (``start``: the base's digest, the LoRA config, the base's precision). ``make bench``
    skips training when a finished run in its output directory has the same key."""
    fields = dict(format_version=RUN_FORMAT_VERSION, model=model_config.to_dict(), train=config.to_dict(),
                  corpus=corpus_digest, tokenizer=tokenizer)
    if start is not None:
        fields["start"] = start
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def corpus_run_key(model_config: GPTConfig, config: TrainConfig, corpus, start: dict | None = None) -> str:
    """The key ``train_on_corpus`` gives this run, known before training: ``make bench``
    passes it to ``finished_run`` to skip a run that is already done. Fine-tuning keeps the
    start's tokenizer, so ``start`` stands for it."""
    from model.tokenizer import SPECIAL_TOKENS
    if start is not None:
        return run_key(model_config, config, corpus.digest, None, start)
    return run_key(model_config, config, corpus.digest, _tokenizer_recipe(SPECIAL_TOKENS))


def finished_run(out_dir: str | Path, key: str) -> dict | None:
    """The ``run.json`` of a finished run in ``out_dir`` with this key, else None."""
    run = read_run(Path(out_dir))
    if run and run.get("key") == key and run.get("status") in ("complete", "stopped_early"):
        return run
    return None


def check_out_dir(out_dir: str | Path, model_config: GPTConfig, config: TrainConfig, resume: bool) -> dict | None:
    """Refuse an output directory this run must not write into; return its ``run.json`` if any.

    A directory holding a different model, another run (unless resuming it with the same
    train config), or anything that is not a run is refused before a byte is written.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise OutputDirError(f"{out_dir}: exists and is not a directory")
    run = read_run(out_dir)
    held = None
    if run is not None:
        held = run.get("model_config")
    elif (out_dir / "config.json").is_file():
        try:
            held = read_config(out_dir).to_dict()
        except CheckpointError as e:
            raise OutputDirError(f"{out_dir}: holds a config.json that is not a model of ours ({e}); "
                                 f"nothing was written") from None
    if held is not None and held != model_config.to_dict():
        raise OutputDirError(f"{out_dir}: holds a checkpoint of a different model "
                             f"({_differences(held, model_config.to_dict())}); nothing was written: "
                             f"choose another output directory")
    if run is None:
        if any(out_dir.iterdir()):
            raise OutputDirError(f"{out_dir}: is not empty and holds no training run; nothing was written: "
                                 f"choose an empty or new output directory")
        return None
    if not resume:
        raise OutputDirError(f"{out_dir}: already holds a training run (status {run.get('status')}, "
                             f"step {run.get('step')}); resume it or choose another output directory")
    if run.get("train_config") != config.to_dict():
        raise OutputDirError(f"{out_dir}: was trained with a different train config "
                             f"({_differences(run.get('train_config') or {}, config.to_dict())}); "
                             f"resuming needs the same one")
    return run


# -- the loop ----------------------------------------------------------------------------

def train(model_config: GPTConfig, config: TrainConfig, train_ids: torch.Tensor, val_ids: torch.Tensor,
          out_dir: str | Path, *, resume: bool = False, on_step: Callable[[Progress], None] | None = None,
          tokenizer=None, manifest: dict | None = None, run_info: dict | None = None,
          stop_at: int | None = None, on_checkpoint: Callable[[Path], None] | None = None,
          init: Callable[[], torch.nn.Module] | None = None, workers: int = 1,
          launch: Callable | None = None) -> TrainSummary:
    """Train a fresh model (or resume the latest checkpoint in ``out_dir``) and save it there.

    train_ids, val_ids: 1-D int64 token streams; each needs at least ``context + 1`` tokens.
    tokenizer: saved as ``tokenizer.json`` beside every set of weights, when given.
    manifest: the corpus manifest, saved as ``corpus_manifest.json``, when given.
    run_info: extra fields for ``run.json`` (the corpus digest and cache key).
    stop_at: checkpoint and return after this step, as if interrupted ("paused"); a later
        call with ``resume=True`` continues exactly where it left off.
    on_checkpoint: called with each checkpoint directory (``step-*``, ``best``) once it is
        complete and in place (``bench train --out s3://`` uploads it then).
    init: makes the starting model instead of a fresh one (fine-tuning: a loaded checkpoint,
        perhaps with LoRA adapters, ``model.lora``; then only the adapters are saved). With
        several workers it is called in each, so it must pickle (a module-level class or function).
    workers: data-parallel processes (``model.distributed``): ``batch_size`` is the global batch,
        split evenly among them, so the losses are one worker's within floating-point tolerance.
    launch: how the workers start, needed with ``workers`` > 1: ``model.distributed.launch_local``
        (processes on this machine, gloo on 127.0.0.1; that module builds on this one, so it is
        passed in, not imported here), or ``bench train --executor ray``'s.
    """
    out_dir = Path(out_dir)
    train_ids, val_ids = _check_streams(train_ids, val_ids, model_config, config)
    if stop_at is not None and not 0 < stop_at <= config.steps:
        raise ValueError(f"stop_at={stop_at} must be in [1, steps={config.steps}]")
    if not isinstance(workers, int) or workers < 1:
        raise TrainConfigError(f"workers={workers!r} must be a positive integer")
    if workers > 1 and launch is None:
        raise ValueError("workers > 1 needs a launch (model.distributed.launch_local, or Ray's)")
    if config.batch_size % workers:
        raise TrainConfigError(f"batch_size={config.batch_size} is the global batch and must divide evenly "
                               f"among workers={workers}")
    run = check_out_dir(out_dir, model_config, config, resume)
    run_info = dict(run_info or {})
    if run is not None and run_info.get("key") not in (None, run.get("key")):
        raise OutputDirError(f"{out_dir}: holds a run with key {run.get('key')} but this one is "
                             f"{run_info['key']} (a different corpus?); nothing was written")

    latest = latest_checkpoint(out_dir) if resume else None
    step = checkpoint_step(latest) if latest is not None else 0
    history = [r for r in read_metrics(out_dir) if r["step"] <= step] if latest is not None else []
    out_dir.mkdir(parents=True, exist_ok=True)
    run_meta = dict(format=RUN_FORMAT, format_version=RUN_FORMAT_VERSION, **run_info,
                    model_config=model_config.to_dict(), train_config=config.to_dict(), workers=workers)
    write_json(out_dir / RUN_FILE, dict(run_meta, status="running", step=step))
    write_metrics(out_dir, history)
    if tokenizer is not None:
        tokenizer.save(out_dir)
    if manifest is not None:
        write_json(out_dir / MANIFEST_FILE, manifest)

    # A run that stopped early stays stopped: resuming it trains no further.
    job = Job(model_config, config, train_ids, val_ids, str(out_dir), None if latest is None else str(latest),
              stopped=run is not None and run.get("status") == "stopped_early", stop_at=stop_at,
              tokenizer=tokenizer, init=init,
              last_loss=history[-1]["loss"] if history else None,
              last_val=next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None))
    start = time.perf_counter()
    if workers == 1:
        result = run_loop(job, emit=Emitter(on_step, on_checkpoint))
    else:
        result = launch(job, workers, Emitter(on_step, on_checkpoint))
    status, step, best = result["status"], result["step"], result["best"]
    wall = time.perf_counter() - start
    summary = TrainSummary(
        str(out_dir), status, step, config.steps, result["last_loss"], result["last_val"],
        None if best["step"] is None else best["loss"], best["step"], step * config.tokens_per_step, wall,
        (step - result["start_step"]) * config.tokens_per_step / wall if wall > 0 else 0.0, run_info.get("key"))
    write_json(out_dir / RUN_FILE, dict(run_meta, status=status, step=step, summary=summary.to_dict()))
    return summary


@dataclass
class Job:
    """What one training process needs to run the loop: sent whole to each data-parallel worker."""

    model_config: GPTConfig
    config: TrainConfig
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    out_dir: str
    latest: str | None  # the checkpoint to resume from
    stopped: bool = False  # the run stopped early before: train no further
    stop_at: int | None = None
    tokenizer: object = None
    init: Callable[[], torch.nn.Module] | None = None
    last_loss: float | None = None
    last_val: float | None = None


class Emitter:
    """Where the loop reports steps and finished checkpoints: the caller's callbacks, or (in a
    data-parallel worker) a queue the launching process reads them from."""

    def __init__(self, on_step=None, on_checkpoint=None):
        self.on_step, self.on_checkpoint = on_step, on_checkpoint

    def step(self, progress: Progress) -> None:
        if self.on_step is not None:
            self.on_step(progress)

    def checkpoint(self, path: Path) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)


def run_loop(job: Job, emit: Emitter | None = None, rank: int = 0, world: int = 1) -> dict:
    """The training loop of one process: build (or restore) the model, step, evaluate, checkpoint.

    With ``world`` > 1 it runs in every worker of a process group that is already initialised:
    the model is wrapped in ``DistributedDataParallel``; each worker draws the same global batch
    from the shared seed and takes its ``rank``-th share, DDP averages the gradients, so every
    worker takes the same step. Rank 0 alone evaluates, writes metrics and checkpoints, and
    reports through ``emit``; its early-stopping decision is broadcast to the others.
    """
    config, out_dir = job.config, Path(job.out_dir)
    lead = rank == 0
    emit = emit or Emitter()
    torch.manual_seed(config.seed)  # dropout; restored from the checkpoint when resuming
    model = job.init() if job.init is not None else GPT(job.model_config).init_weights(config.seed)
    model.train()
    model.grad_checkpointing = config.grad_checkpointing
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
    data_gen = torch.Generator().manual_seed(config.seed)
    val_batches = _val_offsets(len(job.val_ids), config)
    best = dict(loss=math.inf, step=None, since=0)
    step = 0
    if job.latest is not None:
        step, best = restore(Path(job.latest), model, optimizer, scheduler, data_gen)
    stepped = model
    if world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables, a quantised base's codes) are the same everywhere: not sent every step.
        stepped = DistributedDataParallel(model, broadcast_buffers=False)

    status = "stopped_early" if job.stopped else "complete"
    start, start_step = time.perf_counter(), step
    last_loss, last_val = job.last_loss, job.last_val
    metrics = open(out_dir / METRICS_FILE, "a") if lead else None
    try:
        while step < config.steps and status == "complete":
            step += 1
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss, grad_norm = _step(stepped, optimizer, job.train_ids, config, data_gen, rank, world)
            scheduler.step()
            step_s = time.perf_counter() - t0
            record = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=step * config.tokens_per_step,
                          step_s=step_s, tokens_per_s=config.tokens_per_step / step_s)
            last_loss = loss

            if step % config.eval_every == 0 or step == config.steps:
                if lead:
                    last_val = record["val_loss"] = _evaluate(model, job.val_ids, val_batches, config)
                    if last_val < best["loss"]:
                        best = dict(loss=last_val, step=step, since=0)
                        save_weights(out_dir / "best", model, job.tokenizer)
                        emit.checkpoint(out_dir / "best")
                    else:
                        best["since"] += 1
                        if config.patience and best["since"] >= config.patience:
                            status = "stopped_early"
                if world > 1:
                    stop = torch.tensor([status == "stopped_early"], dtype=torch.int32)
                    dist.broadcast(stop, 0)
                    status = "stopped_early" if stop.item() else status
            if lead:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if step == job.stop_at and step < config.steps and status == "complete":
                status = "paused"
            if lead and (step % config.checkpoint_every == 0 or step == config.steps or status != "complete"):
                save_step(out_dir, step, model, optimizer, scheduler, data_gen, best, job.tokenizer, config.keep_last)
                emit.checkpoint(out_dir / f"step-{step:06d}")
            if lead:
                elapsed = time.perf_counter() - start
                emit.step(Progress(step, config.steps, loss, lr, grad_norm, record["tokens_per_s"], elapsed,
                                   elapsed / (step - start_step) * (config.steps - step), record.get("val_loss"),
                                   None if best["step"] is None else best["loss"]))
            if status != "complete":
                break
    finally:
        if metrics is not None:
            metrics.close()
    if lead and status != "paused":
        save_weights(out_dir, model, job.tokenizer, replace=False)  # the final weights at the top
    return dict(status=status, step=step, start_step=start_step, last_loss=last_loss, last_val=last_val, best=best)


def train_on_corpus(model_config: GPTConfig, config: TrainConfig, corpus, out_dir: str | Path, *,
                    resume: bool = False, on_step: Callable[[Progress], None] | None = None,
                    stop_at: int | None = None, on_checkpoint: Callable[[Path], None] | None = None,
                    start=None, workers: int = 1, launch: Callable | None = None) -> TrainSummary:
    """Train a byte-level BPE on the corpus's train split, then the model; save both in ``out_dir``.

    ``corpus`` is a ``model.corpus.Corpus``. Every check (output directory, corpus size)
    runs before anything is written. Resuming reuses the run's own tokenizer.
    ``start``: fine-tune instead (``bench.training.FineTuneStart``: its ``tokenizer``, its
    ``info`` for the key, and called to make the model); ``workers``, ``launch``: as ``train``'s.
    """
    from model.tokenizer import SPECIAL_TOKENS, HFTokenizer, encode_documents, train_bpe

    out_dir = Path(out_dir)
    run = check_out_dir(out_dir, model_config, config, resume)
    key = corpus_run_key(model_config, config, corpus, None if start is None else start.info)
    if run is not None and run.get("corpus_digest") != corpus.digest:
        raise OutputDirError(f"{out_dir}: was trained on another corpus (digest {run.get('corpus_digest')}, "
                             f"this one {corpus.digest}); resuming needs the same corpus")
    if start is not None:
        tokenizer = start.tokenizer
    elif resume and (out_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFRaw
        raw = HFRaw.from_file(str(out_dir / "tokenizer.json"))
        tokenizer = HFTokenizer(raw, raw.token_to_id(SPECIAL_TOKENS[2]))
    else:
        tokenizer = train_bpe(corpus.documents("train"), model_config.vocab_size)
    streams = {}
    for split in ("train", "val"):
        ids = encode_documents(tokenizer, corpus.documents(split))
        if len(ids) < config.context + 1:
            raise TrainingDataError(
                f"{corpus.root}: the {split} split has {len(ids)} tokens ({corpus.n_bytes(split)} bytes), "
                f"fewer than context + 1 = {config.context + 1}; use a bigger corpus or a shorter context")
        streams[split] = ids
    info = dict(key=key, corpus_digest=corpus.digest, corpus_source=corpus.source, corpus_root=corpus.root,
                corpus_max_bytes=corpus.max_bytes, tokens=dict(train=len(streams["train"]), val=len(streams["val"])))
    if start is not None:
        info["start"] = start.info
    return train(model_config, config, streams["train"], streams["val"], out_dir, resume=resume,
                 on_step=on_step, tokenizer=tokenizer, manifest=corpus.manifest(), run_info=info, stop_at=stop_at,
                 on_checkpoint=on_checkpoint, init=start, workers=workers, launch=launch)


# -- pieces of the loop ------------------------------------------------------------------

def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the Linear weights only.

    Chosen by shape and type, not by name, so it holds for either family: every matrix of a
    ``Linear`` is decayed (q/k/v, the output projection, the MLP's, an untied LM head);
    biases, the norms' gains (LayerNorm's or RMSNorm's) and the embeddings (the tied LM head
    among them) are not, as in minGPT and the first nanoGPT: decay pulls them towards zero
    for no gain. Frozen parameters (a LoRA base) are left out; LoRA's A and B are matrices, decayed.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # each tied tensor once, in a fixed order
        if not p.requires_grad:  # a frozen base (LoRA): only the adapters train
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=config.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), foreach=False)


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """The multiplier of ``lr`` for step i (0-based): linear warmup, then cosine down to min_lr."""
    floor = config.min_lr / config.lr

    def factor(i: int) -> float:
        if i < config.warmup_steps:
            return (i + 1) / config.warmup_steps
        progress = (i - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _autocast(config: TrainConfig):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16")


def _batch(ids: torch.Tensor, offsets: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = offsets.unsqueeze(1) + torch.arange(context + 1)  # (B, context + 1)
    window = ids[index]
    return window[:, :-1], window[:, 1:]  # inputs and next-token targets, each (B, context)


def _loss(model: GPT, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    with _autocast(config):
        logits, _ = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # the loss in fp32 either way


def _step(model, optimizer, ids: torch.Tensor, config: TrainConfig, gen: torch.Generator,
          rank: int = 0, world: int = 1) -> tuple[float, float]:
    """One optimizer step over ``grad_accum`` micro-batches; (mean loss, gradient norm before clipping).

    Every worker draws the same global batch from ``gen`` and takes the ``rank``-th of ``world``
    equal shares: the gradients DDP averages are then the whole batch's, and the loss averaged
    over the workers is the whole batch's mean loss."""
    share = config.batch_size // world
    batches = []
    for _ in range(config.grad_accum):
        offsets = torch.randint(0, len(ids) - config.context, (config.batch_size,), generator=gen)
        batches.append(_batch(ids, offsets[rank * share:(rank + 1) * share], config.context))
    loss, grad_norm = train_step(model, optimizer, batches, autocast=lambda: _autocast(config),
                                 grad_clip=config.grad_clip)
    if world > 1:
        import torch.distributed as dist

        total = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(total)
        loss = float(total) / world
    return loss, grad_norm


def train_step(model, optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
               autocast: Callable[[], object] | None = None, scaler=None,
               grad_clip: float = 1.0, before_update: Callable[[], None] | None = None) -> tuple[float, float]:
    """One optimizer step: forward, backward and AdamW over the micro-batches ``batches``,
    each (inputs, targets) of shape (B, T); returns (mean loss, gradient norm before clipping).

    ``bench train`` and the sweep's training cells (``bench run --scenario train``) both take
    their steps here. ``autocast`` makes the context of each forward pass (bf16, fp16); the
    loss is computed in fp32 either way. ``scaler``, a ``torch.amp.GradScaler``, scales the
    loss for fp16, whose small gradients would otherwise underflow; the gradients are
    unscaled before clipping, and the scaler skips a step whose gradients overflowed.
    ``before_update`` is called once the backward passes are done, before the update (the
    training cells read the memory high-water mark of forward and backward there).
    """
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in batches:
        with autocast() if autocast is not None else contextlib.nullcontext():
            loss, _ = model(x, targets=y)  # the model's own loss: in pieces under checkpointing
        loss = loss / len(batches)
        (loss if scaler is None else scaler.scale(loss)).backward()
        total += loss.item()
    if before_update is not None:
        before_update()
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return total, float(grad_norm)


def _val_offsets(n: int, config: TrainConfig) -> torch.Tensor:
    """The validation windows, drawn once from the seed: every evaluation scores the same tokens."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    return torch.randint(0, n - config.context, (config.eval_batches, config.batch_size), generator=gen)


@torch.no_grad()
def _evaluate(model: GPT, ids: torch.Tensor, offsets: torch.Tensor, config: TrainConfig) -> float:
    model.eval()
    try:
        return sum(_loss(model, *_batch(ids, o, config.context), config).item() for o in offsets) / len(offsets)
    finally:
        model.train()


def _check_streams(train_ids, val_ids, model_config: GPTConfig, config: TrainConfig):
    if config.context > model_config.block_size:
        raise TrainingDataError(f"context={config.context} is longer than the model's block_size="
                                f"{model_config.block_size}")
    streams = []
    for name, ids in (("train", train_ids), ("validation", val_ids)):
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 1:
            raise TrainingDataError(f"the {name} tokens must be one stream (1-D), got shape {tuple(ids.shape)}")
        if len(ids) < config.context + 1:
            raise TrainingDataError(f"the {name} stream has {len(ids)} tokens, fewer than "
                                    f"context + 1 = {config.context + 1}")
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= model_config.vocab_size):
            raise TrainingDataError(f"the {name} stream has ids outside [0, vocab_size={model_config.vocab_size})")
        streams.append(ids)
    return streams


def _tokenizer_recipe(special_tokens) -> dict:
    import tokenizers
    return dict(kind="byte-level-bpe", special_tokens=list(special_tokens), min_frequency=2,
                tokenizers=tokenizers.__version__)


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}={old.get(k)!r} there, {new.get(k)!r} here" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs) or "no field differs"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"
