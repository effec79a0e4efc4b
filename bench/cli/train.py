"""``bench train``: train a preset on a local corpus (the standard library by default), its metrics stored."""

from __future__ import annotations

import json
from pathlib import Path

from bench.cli.common import UsageError, err, positive_int, say
from reports.terminal import fmt

TRAIN_OPTIONS = ("steps", "batch_size", "context", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay",
                 "grad_clip", "precision", "grad_checkpointing", "eval_every", "checkpoint_every", "keep_last",
                 "patience", "seed")


def add_parser(sub, default_store: str) -> None:
    train = sub.add_parser("train", help="train a preset, or fine-tune a checkpoint (in full, LoRA, QLoRA), on a local "
                                         "corpus (the standard library by default), in one process or several")
    train.add_argument("--model", help="preset to train (tiny, small, llama-small, gpt2, ...)")
    train.add_argument("--from", dest="from_checkpoint", metavar="CKPT",
                       help="fine-tune a checkpoint (a trained run, a local Hugging Face directory or s3://...) "
                            "with its tokenizer, instead of a fresh --model")
    train.add_argument("--lora-rank", type=positive_int, help="train LoRA adapters of this rank only (needs --from)")
    train.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default 2 x rank)")
    train.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0)")
    train.add_argument("--lora-targets", help="comma list of attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (default all)")
    train.add_argument("--base-precision", choices=("fp32", "int8", "int4"),
                       help="hold the frozen LoRA base quantised (QLoRA-style; default fp32)")
    train.add_argument("--workers", type=positive_int, default=1,
                       help="data-parallel processes (DDP); --batch-size stays the global batch")
    train.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="where the workers run: processes here, or Ray actors (--address)")
    train.add_argument("--address", help="the Ray cluster's address (--executor ray; default RAY_ADDRESS, else "
                                          "a Ray started here for the run)")
    train.add_argument("--on", action="append", metavar="KEY=VALUE",
                       help="--executor ray: a label every worker's node must carry (repeatable)")
    train.add_argument("--config", help="a TOML or JSON file of train settings (and model = \"...\"); options override it")
    train.add_argument("--out", required=True, help="checkpoint directory (a finished run with the same key is reused), "
                                                   "or s3://bucket/prefix: each checkpoint uploaded as it is written")
    train.add_argument("--corpus", help="a text file or directory (default: this Python's standard library sources)")
    train.add_argument("--max-bytes", type=positive_int, help="keep at most this many bytes of the corpus")
    train.add_argument("--steps", type=positive_int)
    train.add_argument("--batch-size", type=positive_int)
    train.add_argument("--context", type=positive_int)
    train.add_argument("--grad-accum", type=positive_int)
    train.add_argument("--lr", type=float)
    train.add_argument("--min-lr", type=float)
    train.add_argument("--warmup-steps", type=int)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--grad-clip", type=float)
    train.add_argument("--precision", choices=("fp32", "bf16"))
    train.add_argument("--grad-checkpointing", action="store_true", default=None)
    train.add_argument("--eval-every", type=positive_int)
    train.add_argument("--checkpoint-every", type=positive_int)
    train.add_argument("--keep-last", type=positive_int)
    train.add_argument("--patience", type=int, help="evaluations without a better validation loss before stopping")
    train.add_argument("--seed", type=int)
    train.add_argument("--threads", type=positive_int, default=None)
    train.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    train.add_argument("--name")
    train.add_argument("--store", default=default_store)
    train.add_argument("--json", action="store_true")
    train.set_defaults(fn=cmd_train)


def read_config_file(path) -> dict:
    """A train config file: TOML ([train] table or top level) or JSON."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"config file {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}")
    return dict(data.get("train", data))


def cmd_train(args) -> int:
    import torch

    from bench.machine.environment import fingerprint
    from bench.store import Store
    from bench.training import remote_uploader, train_preset
    from model.gpt import get_config
    from model.train import TrainConfig

    values = read_config_file(args.config) if args.config else {}
    model = values.pop("model", None)
    overrides = values.pop("model_overrides", {})
    if args.model is not None:
        model = args.model
    start = _start(args, values.get("seed", 0) if args.seed is None else args.seed)
    if start is not None and (model is not None or overrides):
        raise UsageError("bench train: --from fine-tunes that checkpoint's model; give --model only for a fresh one")
    if model is None and start is None:
        raise UsageError("bench train: give --model PRESET (or model = \"...\" in --config), or --from CKPT")
    corpus = values.pop("corpus", None) if args.corpus is None else args.corpus
    max_bytes = values.pop("max_bytes", None) if args.max_bytes is None else args.max_bytes
    for name in TRAIN_OPTIONS:
        given = getattr(args, name, None)
        if given is not None and given is not False:
            values[name] = given
    model_config = start.config if start is not None else get_config(model, **overrides)
    train_config = TrainConfig.from_dict(values)
    if train_config.batch_size % args.workers:
        raise UsageError(f"bench train: --batch-size {train_config.batch_size} is the global batch and must divide "
                         f"evenly among --workers {args.workers}")
    if args.executor != "ray" and (args.address or args.on):
        raise UsageError("bench train: --address and --on place Ray workers: give --executor ray")
    launch = _ray_launch(args) if args.executor == "ray" else None
    if args.threads:
        torch.set_num_threads(args.threads)
    store = Store(args.store)
    # s3://: trained in a local staging directory, each checkpoint uploaded as it is written
    out_dir, uploader = remote_uploader(args.out, announce=None if args.json else
                                        lambda line: err.print(line, markup=False))
    if uploader is not None:
        say(f"training in {out_dir}, uploading to {args.out}")
    with _TrainProgress(train_config.steps, live=err.is_terminal and not args.json, quiet=args.json) as show:
        summary = train_preset(model_config, train_config, out_dir, store, fingerprint(), corpus_path=corpus,
                               max_bytes=max_bytes, resume=args.resume, name=args.name, on_step=show,
                               on_checkpoint=uploader, start=start, workers=args.workers, launch=launch)
    if uploader is not None:
        summary.update(uploaded=uploader.finish(), remote=args.out)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    elif summary.get("cached"):
        print(f"{args.out}: already trained with this corpus, config and seed (key {summary['key']}); "
              f"best validation loss {fmt(summary.get('best_val_loss'), 4)}")
    else:
        print(f"{args.out}: {summary['status']} at step {summary['step']}, best validation loss "
              f"{fmt(summary.get('best_val_loss'), 4)} (step {summary.get('best_step')}), "
              f"{fmt(summary.get('tokens_per_s'), 0)} tok/s; training run {summary['run_id']}")
    return 0


def _start(args, seed: int):
    """The fine-tuning start of ``--from`` (None without it); LoRA options without ``--from`` are refused."""
    from bench.training import FineTuneStart
    from model.lora import TARGETS, LoRAConfig

    lora_given = [f"--{n.replace('_', '-')}" for n in ("lora_alpha", "lora_dropout", "lora_targets")
                  if getattr(args, n) is not None]
    if args.from_checkpoint is None:
        extra = lora_given + (["--lora-rank"] if args.lora_rank else []) + \
            (["--base-precision"] if args.base_precision else [])
        if extra:
            raise UsageError(f"bench train: {', '.join(extra)} fine-tune a checkpoint: give --from CKPT")
        return None
    if lora_given and not args.lora_rank:
        raise UsageError(f"bench train: {', '.join(lora_given)} need --lora-rank")
    lora = None
    if args.lora_rank:
        targets = TARGETS if args.lora_targets is None else tuple(t.strip() for t in args.lora_targets.split(",")
                                                                  if t.strip())
        lora = LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank if args.lora_alpha is None
                          else args.lora_alpha, dropout=args.lora_dropout or 0.0, targets=targets)
    return FineTuneStart.open(args.from_checkpoint, lora, args.base_precision or "fp32", seed)


def _ray_launch(args):
    """``--executor ray``: the workers as Ray actors (``bench.executors.ray_train``)."""
    from bench.executors.ray_train import ray_launcher

    return ray_launcher(args.address, args.on)


class _TrainProgress:
    """One live line (step, loss, learning rate, tokens/s, ETA); each evaluation is kept on screen.
    Piped (make, CI): one line per evaluation instead."""

    def __init__(self, steps: int, live: bool, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err,
                            disable=not live)
        self.steps, self.quiet = steps, quiet

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task("gathering the corpus and training the tokenizer", total=self.steps)
        return self.show

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def show(self, progress) -> None:
        self.bar.update(self.task, completed=progress.step, description=progress.line())
        if progress.val_loss is not None and not self.quiet:
            self.bar.console.print(progress.line(), markup=False, highlight=False)
