"""``bench inspect``: a page of what a model does with a prompt (attention per head, embeddings,
architecture, activation norms), written as HTML and PNG files."""

from __future__ import annotations

from pathlib import Path

from bench.cli.common import UsageError, one_model, positive_int, say

DEFAULT_PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"


def add_inspect(sub, default_store: str) -> None:
    ins = sub.add_parser("inspect", help="look inside a model: attention heatmaps per layer and head, attention "
                                         "entropy, embeddings (PCA), parameters per module, activation norms")
    ins.add_argument("--model", help="a preset (random weights from --weights-seed)")
    ins.add_argument("--checkpoint", help="a checkpoint directory or s3://bucket/prefix (fp32/bf16; its tokenizer)")
    ins.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to look at (default: a line of Python)")
    ins.add_argument("--out", help="directory for index.html and the PNG files (default: CHECKPOINT/inspect, "
                                   "or runs/inspect-MODEL for a preset)")
    ins.add_argument("--corpus", help="text file or directory to count token frequencies in, for the embedding "
                                      "labels (default: the Python standard library, as bench train)")
    ins.add_argument("--frequency-bytes", type=positive_int, default=300_000,
                     help="bytes of the corpus tokenised to count frequencies (default 300000)")
    ins.add_argument("--weights-seed", type=int, default=0, help="seed of a preset's random weights (default 0)")
    ins.set_defaults(fn=cmd_inspect)


def cmd_inspect(args) -> int:
    from model.inspection import inspect_model
    from bench.models import is_quantized_checkpoint
    from model.checkpoint import load_checkpoint
    from model.gpt import build_model, get_config
    from model.tokenizer import load_tokenizer
    from reports.inspect import write

    one_model(args.model, args.checkpoint, "bench inspect")
    if args.checkpoint is not None:
        if not Path(args.checkpoint).is_dir():
            raise UsageError(f"bench inspect: checkpoint directory {args.checkpoint!r} does not exist")
        if is_quantized_checkpoint(args.checkpoint):
            raise UsageError(f"bench inspect: {args.checkpoint} is a quantised checkpoint; inspect the fp32 "
                             "checkpoint it was made from")
        model = load_checkpoint(args.checkpoint).float()
        title = Path(args.checkpoint).resolve().name
    else:
        model = build_model(get_config(args.model), seed=args.weights_seed)
        title = f"{args.model} (random weights, seed {args.weights_seed})"
    out = Path(args.out) if args.out else (Path(args.checkpoint) / "inspect" if args.checkpoint
                                            else Path("runs") / f"inspect-{args.model}")
    tokenizer = load_tokenizer(args.checkpoint, model.config.vocab_size)
    result = inspect_model(model, tokenizer, args.prompt, corpus=args.corpus, frequency_bytes=args.frequency_bytes)
    page = write(result, out, title)
    n = sum(len(layer) for layer in result["attentions"])
    say(f"{page}: {n} attention heatmaps over {len(result['tokens'])} tokens, embeddings, architecture, norms "
        f"(PNG files beside it)")
    return 0
