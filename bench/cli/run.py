"""``bench run``: a sweep of cells (inference or train), or ``--scenario serve`` load points, planned then run."""

from __future__ import annotations

import json
from pathlib import Path

from bench.cli.common import EXIT_FAILURE, UsageError, err, names, one_model, out_console, positive_int, say


def add_parser(sub, default_store: str) -> None:
    run = sub.add_parser("run", help="run a sweep of benchmark cells, each in its own process")
    run.add_argument("--config", help="a TOML sweep file; command-line options override it")
    run.add_argument("--model", help="preset names, comma-separated (tiny, small, gpt2, ...)")
    run.add_argument("--checkpoint",
                     help="checkpoint directories, .gguf files or s3://bucket/prefix, comma-separated (instead of --model)")
    run.add_argument("--backend", help="backend names, comma-separated, or 'all' (every available one)")
    run.add_argument("--precision", help="fp32, bf16, fp16, int8, int4, comma-separated; 'all' (every precision "
                                         "each backend runs here) or 'fastest' (its int8, int4 and native bf16, "
                                         "else its default); default: each backend's own and native bf16")
    run.add_argument("--batch", help="batch sizes: 1,4 or 1-8 or 1-16:x2")
    run.add_argument("--threads", help="thread counts: 1,2 or 1-4; 'all' for one per physical core; 'default' for the libraries' choice")
    run.add_argument("--prompt-len", type=positive_int, help="prompt tokens per sequence (default 32)")
    run.add_argument("--gen-len", type=positive_int, help="new tokens per sequence (default 16)")
    run.add_argument("--timeout", type=float, help="seconds before a cell is killed (default 600)")
    run.add_argument("--budget", type=float, help="seconds of measured repetitions per cell (default 20)")
    run.add_argument("--target-ci", type=float, help="stop repeating when the 95%% CI of the median "
                                                     "time per token is this narrow, relative (default 0.05)")
    run.add_argument("--launches", type=positive_int,
                     help="fresh processes per cell, one per round of interleaved launches (default 3); "
                          "the 95%% interval spans their spread")
    run.add_argument("--confirm", type=int, metavar="N",
                     help="screen first: every cell runs one launch, then only the N fastest of each model and "
                          "batch that pass parity and quality (ours or peers) and eager fp32 get the other "
                          "launches (default 0: every cell gets them all)")
    run.add_argument("--plant-slowdown", type=float, default=None, metavar="FRACTION",
                     help="testing aid: make every step this fraction slower (0.2: about 20%%), to check "
                          "that bench compare detects a slowdown of that size on this machine")
    run.add_argument("--no-parity", action="store_true", help="skip the parity check against eager fp32")
    run.add_argument("--option", action="append", metavar="KEY=VALUE[,VALUE...]",
                     help="a backend option swept as an axis, repeatable: int8_scheme=per_tensor,per_channel; "
                          "each backend takes the options it has at each precision (the others run without); "
                          "the options are part of the cell's identity")
    run.add_argument("--scenario", choices=("inference", "train", "serve"), default=None,
                     help="inference: generations in fresh processes (the default); train: forward + backward + "
                          "AdamW steps; serve: a bench serve process per backend and precision, loaded by "
                          "bench load at each --rate")
    run.add_argument("--seq-len", help="train: tokens per sequence, e.g. 128,512 (default 128)")
    run.add_argument("--grad-checkpointing", help="train: off, on or off,on (default off)")
    run.add_argument("--train-steps", type=positive_int, help="train: timed steps per launch (default 6)")
    run.add_argument("--warmup-steps", type=positive_int, help="train: untimed steps before them (default 2)")
    run.add_argument("--store", default=default_store, help=f"SQLite results store (default {default_store})")
    run.add_argument("--resume", action="store_true", help="continue the last run of this same sweep")
    run.add_argument("--name", help="a name to remember the run by")
    run.add_argument("--json", action="store_true", help="print the run's cells as a JSON list")
    run.add_argument("--rate", default="1,4,inf", help="serve: request rates, comma-separated (default 1,4,inf)")
    run.add_argument("--num-requests", type=positive_int, default=32, help="serve: requests per rate (default 32)")
    run.add_argument("--max-batch", type=positive_int, default=8, help="serve: the server's max batch (default 8)")
    run.add_argument("--slo", action="append", metavar="KIND:MS", help="serve: an SLO for goodput (repeatable)")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="where launches run: this machine (default) or a Ray cluster (pip install '.[ray]')")
    run.add_argument("--address", help="ray: the cluster's address (default RAY_ADDRESS, else the local `ray start`)")
    run.add_argument("--on", action="append", metavar="KEY=VALUE",
                     help="ray: run on nodes with this label (repeatable; BACKEND:KEY=VALUE for one backend's cells)")
    run.set_defaults(fn=cmd_run)


def build_sweep(args):
    """The sweep the command line (over its --config file) asks for, validated by the planner."""
    from bench.models import localize
    from bench.planner import load_toml, parse_options, sweep_from_config

    values = load_toml(args.config) if args.config else {}
    for table in (values, *values.get("also", [])):
        table.update({k: localize(table[k]) for k in ("model", "checkpoint") if k in table})
    cli = dict(model=args.model, checkpoint=args.checkpoint, backend=args.backend, precision=args.precision,
               batch=args.batch, threads=args.threads, prompt_len=args.prompt_len, gen_len=args.gen_len,
               timeout=args.timeout, budget=args.budget, target_ci=args.target_ci, launches=args.launches,
               confirm=args.confirm,
               planted_delay=args.plant_slowdown, scenario=args.scenario, seq_len=args.seq_len,
               grad_checkpointing=args.grad_checkpointing, train_steps=args.train_steps,
               warmup_steps=args.warmup_steps)
    given = {k: v for k, v in cli.items() if v is not None}
    if args.no_parity:
        given["parity"] = False
    if getattr(args, "option", None):
        options = parse_options(args.option, example="int8_scheme=per_tensor,per_channel[,...]", parse=False)
        given["options"] = dict(values.get("options") or {}, **options)
    return sweep_from_config(values, given, model_flag=args.model is not None)


def cmd_run(args) -> int:
    if args.executor != "ray" and (args.on or args.address):
        raise UsageError(f"--{'on' if args.on else 'address'} goes with --executor ray")
    if args.scenario == "serve":
        if args.executor == "ray":
            raise UsageError("bench run --scenario serve runs on this machine only; --executor ray runs "
                             "inference and train sweeps")
        return cmd_run_serve(args)
    from bench.executors import choose
    from bench.machine import roofline as rooflines
    from bench.machine.environment import fingerprint
    from bench.planner import all_backends, check_store
    from bench.results.schema import FAILED
    from bench.store import Store
    from bench.sweep import run_sweep
    from reports.terminal import summary_table, train_summary_table

    sweep = build_sweep(args)  # every value, length and path checked before anything is probed or measured
    store = Store(check_store(args.store))
    executor, probes = choose(args.executor, all_backends(sweep), args.on, args.address, announce=say)
    for n, p in probes.items():
        if not p.available:
            err.print(f"[yellow]not run:[/] {n}: {p.reason}", markup=True)
    cache = Path(args.store).parent / "roofline.json"
    if executor is None:
        err.print("[dim]memory bandwidth and matmul peaks: measured once per machine, device and thread count, "
                  "then cached (bench info --remeasure measures again)[/]")
    else:  # the cells run on other machines: this one's roofline would bound them wrongly
        err.print("[dim]no roofline on Ray: this machine's would not bound the nodes' cells[/]")

    def roofline(device, threads, precisions):
        return rooflines.roofline_for(device, threads, precisions, cache=cache)

    from bench.cli.progress import SweepProgress

    with SweepProgress(sweep, args.json) as events:
        run_id = run_sweep(sweep, store, probes, fingerprint(), roofline=None if executor else roofline,
                           name=args.name, resume=args.resume, events=events, executor=executor)
    cells = store.get_run(run_id)["cells"]
    if args.json:
        print(json.dumps(cells, indent=1, default=str))
    else:
        out_console().print((train_summary_table if sweep.scenario == "train" else summary_table)(cells))
    ran = [c for c in cells if c["status"] != "skipped"]
    failed = [c for c in ran if c["status"] in FAILED]
    return EXIT_FAILURE if failed and len(failed) == len(ran) else 0


def cmd_run_serve(args) -> int:
    """bench run --scenario serve: a bench serve process per backend and precision, a load point per rate."""
    from backends import registry
    from bench.machine.environment import fingerprint
    from bench.models import is_gguf_file, model_config
    from bench.planner import check_store, parse_threads
    from bench.scenarios.load import parse_rates, parse_slo, sweep_serve
    from bench.store import Store
    from reports.terminal import load_table, serve_line

    if args.config:
        raise UsageError("bench run --scenario serve takes its settings from the command line, not --config")
    if args.option:
        raise UsageError("bench run --scenario serve: --option sweeps inference and train cells only")
    one_model(args.model, args.checkpoint, "bench run --scenario serve")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise UsageError(f"checkpoint directory {args.checkpoint!r} does not exist")
    if args.checkpoint is not None and not (Path(args.checkpoint).is_dir() or is_gguf_file(args.checkpoint)):
        raise UsageError(f"checkpoint {args.checkpoint!r} is neither a directory nor a .gguf file")
    model_config(args.model or args.checkpoint, args.checkpoint is not None)  # an unknown preset fails here
    backends = names(args.backend, registry.names())
    for b in backends:
        registry.get_backend_class(b)
    precisions = [p.strip() for p in args.precision.split(",")] if args.precision else []
    threads = parse_threads(args.threads)[0] if args.threads else None
    slo = dict(parse_slo(x) for x in args.slo or [])
    rates = parse_rates(args.rate)
    store = Store(check_store(args.store))
    cells = []

    def shown(record):
        cells.append(record)
        say(serve_line(record))

    run_id = sweep_serve(store, fingerprint(), backends=backends, model=args.model,
                         checkpoint=args.checkpoint, precisions=precisions, rates=rates,
                         num_requests=args.num_requests, prompt_len=args.prompt_len or 32,
                         gen_len=args.gen_len or 32, max_batch=args.max_batch, threads=threads, slo_ms=slo,
                         name=args.name, on_cell=shown)
    served = [c for c in cells if c["status"] == "ok"]
    if args.json:
        print(json.dumps(dict(run_id=run_id, cells=cells), indent=1, default=str))
    elif served:
        for backend in dict.fromkeys((c["backend"], c["precision"]) for c in served):
            out_console().print(load_table([c for c in served if (c["backend"], c["precision"]) == backend], run_id))
    ran = [c for c in cells if c["status"] != "skipped"]
    return EXIT_FAILURE if ran and not served else 0
