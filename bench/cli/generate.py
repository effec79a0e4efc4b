"""``bench generate`` (text from one backend) and ``bench convert`` (our model as a Hugging Face directory:
GPT-2, or the Llama-family class that computes it; or a LoRA adapter merged into its base)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.cli.common import UsageError, one_model, positive_int


def add_generate(sub, default_store: str) -> None:
    gen = sub.add_parser("generate", help="generate text with one backend")
    gen.add_argument("--backend", default="eager")
    gen.add_argument("--precision", default=None)
    gen.add_argument("--model", help="a preset (random weights from --seed)")
    gen.add_argument("--checkpoint", help="a checkpoint directory, a .gguf file or s3://bucket/prefix")
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--greedy", action="store_true", help="greedy decoding (the default without sampling options)")
    gen.add_argument("--temperature", type=float,
                     help="sampling temperature (default 1.0 when sampling); 0 means greedy decoding, as in llama.cpp")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--num-beams", type=positive_int, default=1)
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (a seed reproduces a sample)")
    gen.add_argument("--weights-seed", type=int, default=0, help="seed of a preset's random weights (default 0)")
    gen.add_argument("--threads", type=positive_int, default=None)
    gen.add_argument("--json", action="store_true", help="print a JSON object with token_ids")
    gen.set_defaults(fn=cmd_generate)


def add_convert(sub, default_store: str) -> None:
    convert = sub.add_parser("convert", help="write a preset or checkpoint as a local Hugging Face directory "
                                             "(GPT-2, Llama, Mistral or Qwen2)")
    convert.add_argument("--to", choices=("hf", "ours"), help="the format to write (hf: a Hugging Face directory that "
                         "AutoModelForCausalLM loads, the default; ours: our checkpoint, the default with --merge-lora)")
    convert.add_argument("--out", required=True, help="output directory (must be empty unless --force)")
    convert.add_argument("--model", help="a preset (random weights from --seed)")
    convert.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (default 0)")
    convert.add_argument("--checkpoint",
                         help="a checkpoint directory or s3://bucket/prefix (its tokenizer is written too)")
    convert.add_argument("--merge-lora", metavar="ADAPTER",
                         help="merge a LoRA adapter (bench train --lora-rank's output) into the checkpoint it was "
                              "trained on (default: the one it names; another base is refused)")
    convert.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    convert.set_defaults(fn=cmd_convert)


def _prompt(args, tokenizer, vocab_size: int) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"bench generate: --prompt-ids {args.prompt_ids!r} is not a comma list of integers")
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UsageError("bench generate: the prompt is empty")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"bench generate: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def _sampling(args) -> bool:
    """Whether to sample. Temperature 0 is greedy decoding, as in llama.cpp: sampling's limit as the
    temperature falls to 0, whatever --top-k or --top-p keep (the most likely token is always kept)."""
    if args.temperature is not None and args.temperature < 0:
        raise UsageError(f"bench generate: --temperature {args.temperature} must not be negative (0 is greedy)")
    sampling = args.temperature != 0 and (
        args.temperature is not None or args.top_k is not None or args.top_p is not None)
    if args.greedy and sampling:
        raise UsageError("bench generate: --greedy cannot be combined with --temperature, --top-k or --top-p")
    return sampling


def cmd_generate(args) -> int:
    import torch

    from backends import registry
    from bench.models import is_gguf_file, open_model
    from model.generate import generate
    from model.tokenizer import load_tokenizer

    one_model(args.model, args.checkpoint, "bench generate")
    if (args.prompt is None) == (args.prompt_ids is None):
        raise UsageError("bench generate: give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if args.max_new_tokens < 0:
        raise UsageError(f"bench generate: --max-new-tokens {args.max_new_tokens} must not be negative")
    registry.get_backend_class(args.backend)
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise UsageError(f"bench generate: checkpoint directory {args.checkpoint!r} does not exist")
    if args.checkpoint is not None and not (Path(args.checkpoint).is_dir() or is_gguf_file(args.checkpoint)):
        raise UsageError(f"bench generate: checkpoint {args.checkpoint!r} is neither a directory nor a .gguf file")
    model = open_model(args.checkpoint or args.model, args.backend, args.precision,
                       checkpoint=args.checkpoint is not None, seed=args.weights_seed)  # a quantised one as it is
    tokenizer = load_tokenizer(args.checkpoint, model.config.vocab_size)
    ids = _prompt(args, tokenizer, model.config.vocab_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    sampling = _sampling(args)
    with registry.create(args.backend, precision=args.precision, threads=args.threads) as backend:
        probe = backend.probe()
        if not probe.available:
            raise UsageError(f"bench generate: backend {args.backend!r} is unavailable: {probe.reason}"
                             + (f" (fix: {probe.fix})" if probe.fix else ""))
        backend.load(model)
        new = generate(backend, [ids], args.max_new_tokens, greedy=not sampling,
                       temperature=1.0 if args.temperature is None else args.temperature,  # read only when sampling
                       top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                       num_beams=args.num_beams, seed=args.seed, eos_token_id=tokenizer.eos_token_id,
                       max_length=model.config.block_size)[0]
        precision = backend.precision
    if args.json:
        print(json.dumps(dict(backend=args.backend, precision=precision, prompt_ids=ids, token_ids=new,
                              text=tokenizer.decode(new))))
    else:
        print(tokenizer.decode(ids) + tokenizer.decode(new))
    return 0


def cmd_convert(args) -> int:
    from model.hf import convert

    to = args.to or ("ours" if args.merge_lora else "hf")
    print(convert(args.out, to=to, preset=args.model, seed=args.seed, checkpoint=args.checkpoint,
                  force=args.force, merge_lora=args.merge_lora))
    return 0
