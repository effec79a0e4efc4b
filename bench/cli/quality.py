"""``bench quality`` (perplexity and divergence per backend) and ``bench quantize`` (a quantised checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.cli.common import UsageError, names, out_console, positive_int, say


def add_quality(sub, default_store: str) -> None:
    quality = sub.add_parser("quality", help="perplexity and divergence from eager fp32 per backend and precision")
    quality.add_argument("--checkpoint", required=True,
                         help="a trained checkpoint directory or s3://bucket/prefix (bench train --out)")
    quality.add_argument("--backend", default="eager,int8", help="backends, comma-separated, or 'all'")
    quality.add_argument("--precision", help="precisions, comma-separated (default: each backend's own)")
    quality.add_argument("--corpus", help="score this text file's whole text instead of the test split")
    quality.add_argument("--context", type=positive_int, default=128, help="tokens per window (default 128)")
    quality.add_argument("--stride", type=positive_int, default=None, help="tokens between windows (default: the context)")
    quality.add_argument("--max-tokens", type=positive_int, default=None,
                         help="score at most this many tokens, in blocks spread over the stream")
    quality.add_argument("--threads", type=positive_int, default=None)
    quality.add_argument("--option", action="append", metavar="BACKEND.KEY=VALUE",
                         help="a backend option, repeatable: int8.int8_scheme=per_channel, int8.group_size=32, "
                              "onnxruntime.block_size=32, openvino.int4_mode=sym")
    quality.add_argument("--json", action="store_true",
                         help="print n_tokens, nll_sum, perplexity, bits per byte and the divergence statistics")
    quality.set_defaults(fn=cmd_quality)


def add_quantize(sub, default_store: str) -> None:
    quant = sub.add_parser("quantize", help="quantise a checkpoint once into a quantised checkpoint that loads as it is")
    quant.add_argument("--checkpoint", required=True,
                       help="an fp32 checkpoint directory (ours or a local GPT-2) or s3://bucket/prefix")
    quant.add_argument("--precision", required=True, choices=("int8", "int4"))
    quant.add_argument("--backend", default="int8",
                       help="the backend that will load it: int8 (PyTorch, the default), onnxruntime or openvino")
    quant.add_argument("--out", required=True,
                       help="a new directory for the quantised checkpoint, or s3://bucket/prefix")
    quant.add_argument("--int8-scheme", choices=("per_tensor", "per_channel"), default=None,
                       help="int8 weight scales: one per tensor (default) or per output channel")
    quant.add_argument("--group-size", type=positive_int, default=None,
                       help="int4: weights per scale, for every matrix (default: per matrix, the largest of "
                            "128, 64, 32 that divides its width; int8 and openvino backends)")
    quant.add_argument("--option", action="append", metavar="KEY=VALUE",
                       help="a quantiser option of the backend, repeatable: block_size=32, accuracy_level=4, "
                            "symmetric=true (onnxruntime); int4_mode=sym, ratio=0.8, all_layers=true (openvino)")
    quant.add_argument("--json", action="store_true")
    quant.set_defaults(fn=cmd_quantize)


def cmd_quality(args) -> int:
    import torch

    from backends import registry
    from bench.planner import check_quantized_request, parse_options
    from bench.scenarios.quality import quality_sweep
    from reports.terminal import quality_line, quality_table

    if not Path(args.checkpoint).is_dir():
        raise UsageError(f"bench quality: checkpoint directory {args.checkpoint!r} does not exist")
    backends = names(args.backend, registry.names())
    precisions = [p.strip() for p in args.precision.split(",")] if args.precision else []
    for name in backends:
        registry.get_backend_class(name)
    options = parse_options(args.option or [], example="int8.int8_scheme=per_channel", per_backend=True)
    check_quantized_request(args.checkpoint, backends, precisions)
    if args.threads:
        torch.set_num_threads(args.threads)
    stream, results = quality_sweep(args.checkpoint, backends, precisions, corpus=args.corpus,
                                    max_tokens=args.max_tokens, context=args.context, stride=args.stride,
                                    threads=args.threads, options=options,
                                    on_row=None if args.json else lambda row: say(quality_line(row)))
    if args.json:
        print(json.dumps(dict(checkpoint=str(args.checkpoint), stream=stream, results=results), indent=1))
    else:
        out_console().print(quality_table(results, stream))
    return 0


def cmd_quantize(args) -> int:
    from bench.planner import parse_options
    from bench.quantize import quantize_to

    if not Path(args.checkpoint).is_dir():
        raise UsageError(f"bench quantize: checkpoint directory {args.checkpoint!r} does not exist")
    options = parse_options(args.option or [], example="block_size=32")
    done = quantize_to(args.checkpoint, args.precision, args.out, backend=args.backend,
                       int8_scheme=args.int8_scheme, group_size=args.group_size, options=options)
    if args.json:
        print(json.dumps(done, indent=1))
    else:
        group = f", group size {done['group_size']}" if done["group_size"] else ""
        if not done["group_size"] and done.get("group_sizes"):  # chosen per matrix
            group = ", groups " + ", ".join(f"{g}: {n} matrices" for g, n in done["group_sizes"].items())
        group += "".join(f", {k}={v}" for k, v in done["options"].items() if k not in ("group_size", "block_size"))
        print(f"wrote {done['out']}: {done['backend']}/{done['precision']} {done['scheme']}{group}, "
              f"{done['bytes'] / 2**20:,.2f} MiB (source {done['source_bytes'] / 2**20:,.2f} MiB), "
              f"quantised in {done['quantize_s']:.2f} s; load it with --checkpoint {done['out']} "
              f"--backend {done['backend']} --precision {done['precision']}")
    return 0
